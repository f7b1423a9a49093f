#!/usr/bin/env python3
"""dsc's generated fused causal attention (compiler::mlir::attention, `attention_fwd_*.ptx`)
beside PyTorch's scaled_dot_product_attention on the same GPU, for MLA's head dims.

The generated kernel reads Q, K [B, S, H, Dqk] and V [B, S, H, Dv] in f32 (the plan's
buffers; it rounds them to BF16 as it stages them), writes O [B, S, H, Dv] in f32 and the rows'
log-sum-exp [B, H, S]. SDPA gets the same values in BF16, [B, H, S, D] contiguous, causal; every
backend it has is timed and the fastest reported (the issue's "best backend it picks").

Correctness first, on small shapes against float64 (the BF16-rounded inputs, exact softmax):
relative error of O (Frobenius) for the kernel and for SDPA's fastest backend, and the largest
error of the log-sum-exp; "ok" when the kernel's O error is at most twice SDPA's (both round P
to BF16 before P·V) and its log-sum-exp within 1e-3.

FLOPs counted as causal attention is: 2·B·H·(S²/2)·(Dqk + Dv) for the forward.

Usage (GPU machine): python3 benches/attention.py PTX... [--out FILE]; one JSON line per result.
"""
import argparse
import json
import math
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BLOCK_ROWS = 64
THREADS = 128


class Generated:
    def __init__(self, path):
        import cupy

        self.name = os.path.splitext(os.path.basename(path))[0]
        self.qk, self.v = map(int, re.search(r"_qk(\d+)_v(\d+)$", self.name).groups())
        self.shared = BLOCK_ROWS * (2 * (2 * self.qk + 16) + 2 * self.v + 16)
        self.kernel = cupy.RawModule(path=path).get_function(self.name)
        self.kernel.max_dynamic_shared_size_bytes = self.shared

    def prepare(self, q, k, v, scale):
        b, s, h, _ = q.shape
        o = torch.full((b, s, h, self.v), float("nan"), device="cuda")
        lse = torch.full((b, h, s), float("nan"), device="cuda")
        args = tuple(np.uint64(t.data_ptr()) for t in (q, k, v, o, lse)) + (
            np.uint32(s), np.uint32(h), np.float32(scale))
        grid = (s // BLOCK_ROWS, b * h, 1)
        return o, lse, lambda: self.kernel(grid, (THREADS, 1, 1), args, shared_mem=self.shared)


def bf16(x):
    return x.to(torch.bfloat16).to(torch.float32)


def reference(q, k, v, scale):
    """float64 causal attention of [B, S, H, D] inputs: O [B, S, H, Dv], LSE [B, H, S]."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    s = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) * scale
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=q.device), 1)
    scores = scores.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    o = torch.softmax(scores, -1) @ v
    return o.transpose(1, 2), lse


BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def sdpa(backend, q, k, v, scale):
    """SDPA on BF16 [B, H, S, D] copies; the call, or None where the backend refuses."""
    qh, kh, vh = (x.to(torch.bfloat16).transpose(1, 2).contiguous() for x in (q, k, v))

    def call():
        with sdpa_kernel([BACKENDS[backend]]):
            return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)

    try:
        call()
        torch.cuda.synchronize()
    except (RuntimeError, torch.OutOfMemoryError):
        return None
    return call


def timed(f, reps=10):
    f()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        f()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def inputs(b, s, h, g, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, s, h, g.qk, device="cuda", generator=gen)
    k = torch.randn(b, s, h, g.qk, device="cuda", generator=gen)
    v = torch.randn(b, s, h, g.v, device="cuda", generator=gen)
    return q, k, v


def check(g, emit):
    ok = True
    for b, s, h in [(2, 256, 3), (1, 1024, 2)]:
        q, k, v = inputs(b, s, h, g, seed=s)
        scale = 1 / math.sqrt(g.qk)
        ref_o, ref_lse = reference(bf16(q), bf16(k), bf16(v), scale)
        o, lse, run = g.prepare(q, k, v, scale)
        run()
        torch.cuda.synchronize()
        err = ((o.double() - ref_o).norm() / ref_o.norm()).item()
        lse_err = (lse.double() - ref_lse).abs().max().item()
        sdpa_err = {}
        for name in BACKENDS:
            call = sdpa(name, q, k, v, scale)
            if call:
                out = call().float().transpose(1, 2)
                sdpa_err[name] = ((out.double() - ref_o).norm() / ref_o.norm()).item()
        best = min(sdpa_err.values())
        right = err <= 2 * best and lse_err <= 1e-3
        ok &= right
        emit({"impl": g.name, "check": True, "b": b, "s": s, "h": h, "ok": right, "rel_error": err,
              "lse_max_error": lse_err, "sdpa_rel_error": sdpa_err})
    return ok


def bench(g, emit):
    for s, h in [(4096, 16), (4096, 128), (32768, 16), (32768, 128)]:
        b = max(1, 32768 // s)
        q, k, v = inputs(b, s, h, g, seed=1)
        scale = 1 / math.sqrt(g.qk)
        flops = 2 * b * h * (s * s / 2) * (g.qk + g.v)
        o, lse, run = g.prepare(q, k, v, scale)
        us = timed(run)
        row = {"impl": g.name, "b": b, "s": s, "h": h, "us": round(us, 1), "tflops": round(flops / us / 1e6)}
        best = None
        for name in BACKENDS:
            if name == "math":  # never the fastest; its S×S scores do not fit at these sizes
                continue
            call = sdpa(name, q, k, v, scale)
            if call is None:
                continue
            t = timed(call)
            emit({"impl": f"sdpa {name}", "b": b, "s": s, "h": h, "us": round(t, 1), "tflops": round(flops / t / 1e6)})
            best = min(best or t, t)
        if best:
            row["vs_sdpa_best"] = round(best / us, 3)
        emit(row)
        del q, k, v, o, lse
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ptx", nargs="+")
    ap.add_argument("--out")
    args = ap.parse_args()
    out = open(args.out, "w") if args.out else None

    def emit(row):
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    emit({"torch": torch.__version__, "gpu": torch.cuda.get_device_name()})
    ok = True
    for path in args.ptx:
        g = Generated(path)
        if check(g, emit):
            bench(g, emit)
        else:
            ok = False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
