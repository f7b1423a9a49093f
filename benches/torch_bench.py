#!/usr/bin/env python3
"""The PyTorch baseline of issue 5: models/deepseek-v3-bench.dsc written in plain PyTorch.

Same architecture and sizes as the spec: MLA attention (16 heads, q rank 768, kv rank 512,
nope 128 + rope 64, v 128), layer 0 dense (SwiGLU 8192), layers 1-7 DeepSeekMoE (1 shared +
32 routed experts of 1024, top-6, sigmoid gating, 4 groups keeping 2, routed scale 2.5,
bias-adjusted auxiliary-loss-free balancing), one MTP module sharing embedding and head
(loss weight 0.3), vocab 32768, sequences of 2048, 2 micro-batches of 4 per step. BF16
autocast over FP32 master weights, `torch.compile`, fused AdamW, experts as one grouped GEMM
per projection (`torch._grouped_mm`). Prints tokens/s, model TFLOP/s (6 x active parameters
+ causal attention), MFU against the BF16 dense peak, and peak memory.

Usage (GPU machine): python3 benches/torch_bench.py [--steps 20] [--no-compile]
"""
import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, HIDDEN, LAYERS, HEADS = 32768, 2048, 8, 16
Q_RANK, KV_RANK, NOPE, ROPE, V = 768, 512, 128, 64, 128
DENSE_FF, EXPERT_FF, EXPERTS, TOP_K, GROUPS, KEEP, SCALE = 8192, 1024, 32, 6, 4, 2, 2.5
SEQ, MICRO, MICROS, MTP_WEIGHT = 2048, 4, 2, 0.3
BF16_PEAK = {"H100": 989e12, "H200": 989e12}


def rope_tables(device):
    inv = 1.0 / (10000 ** (torch.arange(0, ROPE, 2, device=device, dtype=torch.float32) / ROPE))
    angles = torch.outer(torch.arange(SEQ, device=device, dtype=torch.float32), inv)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, cos, sin):
    # x [..., S, ROPE] with interleaved pairs, as DeepSeek-V3 stores them.
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[: x.shape[-2]], sin[: x.shape[-2]]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)


class MLA(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_a = nn.Linear(HIDDEN, Q_RANK, bias=False)
        self.q_norm = nn.RMSNorm(Q_RANK, eps=1e-6)
        self.q_b = nn.Linear(Q_RANK, HEADS * (NOPE + ROPE), bias=False)
        self.kv_a = nn.Linear(HIDDEN, KV_RANK + ROPE, bias=False)
        self.kv_norm = nn.RMSNorm(KV_RANK, eps=1e-6)
        self.kv_b = nn.Linear(KV_RANK, HEADS * (NOPE + V), bias=False)
        self.o = nn.Linear(HEADS * V, HIDDEN, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q = self.q_b(self.q_norm(self.q_a(x))).view(b, s, HEADS, NOPE + ROPE).transpose(1, 2)
        q_nope, q_pe = q.split([NOPE, ROPE], dim=-1)
        kv, k_pe = self.kv_a(x).split([KV_RANK, ROPE], dim=-1)
        kv = self.kv_b(self.kv_norm(kv)).view(b, s, HEADS, NOPE + V).transpose(1, 2)
        k_nope, v = kv.split([NOPE, V], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(1), cos, sin).expand(b, HEADS, s, ROPE)
        q = torch.cat([q_nope, apply_rope(q_pe, cos, sin)], dim=-1)
        k = torch.cat([k_nope, k_pe], dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=(NOPE + ROPE) ** -0.5)
        return self.o(out.transpose(1, 2).reshape(b, s, HEADS * V))


class SwiGLU(nn.Module):
    def __init__(self, ff):
        super().__init__()
        self.w1 = nn.Linear(HIDDEN, ff, bias=False)
        self.w3 = nn.Linear(HIDDEN, ff, bias=False)
        self.w2 = nn.Linear(ff, HIDDEN, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.register_buffer("bias", torch.zeros(EXPERTS))
        self.shared = SwiGLU(EXPERT_FF)
        std = 0.006
        self.w1 = nn.Parameter(torch.randn(EXPERTS, HIDDEN, EXPERT_FF) * std)
        self.w3 = nn.Parameter(torch.randn(EXPERTS, HIDDEN, EXPERT_FF) * std)
        self.w2 = nn.Parameter(torch.randn(EXPERTS, EXPERT_FF, HIDDEN) * std)

    def route(self, x):
        scores = torch.sigmoid(self.gate(x).float())
        biased = scores + self.bias
        t = biased.shape[0]
        group_scores = biased.view(t, GROUPS, -1).topk(2, dim=-1).values.sum(-1)
        kept = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(KEEP, dim=-1).indices, 1.0)
        mask = kept.repeat_interleave(EXPERTS // GROUPS, dim=1)
        chosen = biased.masked_fill(mask == 0, float("-inf")).topk(TOP_K, dim=-1).indices
        gates = scores.gather(1, chosen)
        return chosen, gates / gates.sum(-1, keepdim=True) * SCALE

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, HIDDEN)
        chosen, gates = self.route(x)
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=EXPERTS)
        offsets = counts.cumsum(0).to(torch.int32)
        rows = x[order // TOP_K].to(torch.bfloat16)
        w1, w3, w2 = (w.to(torch.bfloat16) for w in (self.w1, self.w3, self.w2))
        h = F.silu(torch._grouped_mm(rows, w1, offs=offsets)) * torch._grouped_mm(rows, w3, offs=offsets)
        y = torch._grouped_mm(h, w2, offs=offsets)
        out = torch.zeros_like(x, dtype=y.dtype).index_add_(0, order // TOP_K, y * gates.reshape(-1)[order, None].to(y.dtype))
        if self.training:
            with torch.no_grad():
                load = counts.float()
                self.bias += 1e-3 * torch.sign(load.mean() - load)
        return (out + self.shared(x)).view(shape)


class Block(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.attn_norm = nn.RMSNorm(HIDDEN, eps=1e-6)
        self.attn = MLA()
        self.ffn_norm = nn.RMSNorm(HIDDEN, eps=1e-6)
        self.ffn = MoE() if moe else SwiGLU(DENSE_FF)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList([Block(moe=i >= 1) for i in range(LAYERS)])
        self.norm = nn.RMSNorm(HIDDEN, eps=1e-6)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.mtp_h = nn.RMSNorm(HIDDEN, eps=1e-6)
        self.mtp_e = nn.RMSNorm(HIDDEN, eps=1e-6)
        self.mtp_proj = nn.Linear(2 * HIDDEN, HIDDEN, bias=False)
        self.mtp_block = Block(moe=True)
        self.mtp_norm = nn.RMSNorm(HIDDEN, eps=1e-6)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.006)

    def forward(self, tokens, cos, sin):
        inputs, labels = tokens[:, :-2], tokens[:, 1:-1]
        x = self.embed(inputs)
        for block in self.blocks:
            x = block(x, cos, sin)
        loss = F.cross_entropy(self.head(self.norm(x)).float().view(-1, VOCAB), labels.reshape(-1))
        # MTP depth 1: predict token t+2 from the final hidden state and the embedding of t+1.
        h = self.mtp_proj(torch.cat([self.mtp_h(x), self.mtp_e(self.embed(labels))], dim=-1))
        h = self.mtp_block(h, cos, sin)
        mtp = F.cross_entropy(self.head(self.mtp_norm(h)).float().view(-1, VOCAB), tokens[:, 2:].reshape(-1))
        return loss + MTP_WEIGHT * mtp


def active_parameters(model):
    total = sum(p.numel() for p in model.parameters()) - model.embed.weight.numel()
    per_expert = 3 * HIDDEN * EXPERT_FF
    moe_layers = sum(isinstance(b.ffn, MoE) for b in model.blocks) + 1
    return total - moe_layers * (EXPERTS - TOP_K) * per_expert


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = "cuda"
    model = Model().to(device)
    cos, sin = rope_tables(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    step_fn = model if args.no_compile else torch.compile(model)
    data = torch.randint(0, VOCAB, (args.warmup + args.steps, MICROS, MICRO, SEQ + 2), device=device)

    def step(i):
        for m in range(MICROS):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = step_fn(data[i, m], cos, sin) / MICROS
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach() * MICROS

    for i in range(args.warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step(args.warmup + i) for i in range(args.steps)]
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    tokens = MICROS * MICRO * SEQ
    active = active_parameters(model)
    attention = (LAYERS + 1) * 3 * MICROS * MICRO * HEADS * SEQ * SEQ * (NOPE + ROPE + V)  # causal: half of 2·S²·d, ×3
    flops = 6 * active * tokens + attention
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in BF16_PEAK.items() if k in name), 989e12)
    result = {
        "impl": "pytorch-bf16" + ("" if args.no_compile else "-compile"),
        "device": name,
        "tokens_per_s": tokens / seconds,
        "step_s": seconds,
        "model_tflops": flops / seconds / 1e12,
        "mfu_bf16": flops / seconds / peak,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "active_params": active,
        "loss_last": float(losses[-1]),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
