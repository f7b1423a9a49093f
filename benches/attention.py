#!/usr/bin/env python3
"""dsc's generated fused causal attention (compiler::mlir::attention: `attention_fwd_*.ptx` and
the backward's `attention_bwd_{dq,dkv}_*.ptx`, as `kernel_ptx` writes them)
beside PyTorch's scaled_dot_product_attention on the same GPU, for MLA's head dims.

The generated kernel reads Q, K [B, S, H, Dqk] and V [B, S, H, Dv] in f32 (the plan's
buffers; it rounds them to BF16 as it stages them), or all three in BF16 where its name says
`bf16_` (the plan's casts where they are made; given here the same values rounded), writes O
[B, S, H, Dv] in f32 and the rows' log-sum-exp [B, H, S]. SDPA gets the same values in BF16,
[B, H, S, D] contiguous, causal; every backend it has is timed and the fastest reported (the
issue's "best backend it picks").

Correctness first, against float64 (the BF16-rounded inputs, exact softmax) at S = 256, 1K, 2K,
4K and 32K (one head there: the float64 scores alone are 8.6 GB):
relative errors (Frobenius) of O, dQ, dK and dV for the kernels and for each SDPA backend (BF16
autograd), and the largest error of the log-sum-exp; "ok" when each of the kernels' errors is at
most twice the smallest of SDPA's (all round P and dS to BF16 before their products), the
log-sum-exp within 1e-3, and a second launch of each kernel, its outputs poisoned with NaN
first, gives the same bits ("deterministic": the kernels have no atomics, so a difference is a
race or an unwritten output).

FLOPs counted as causal attention is: 2·B·H·(S²/2)·(Dqk + Dv) for the forward, 2·B·H·(S²/2)·
(3·Dqk + 2·Dv) for the backward (its five products, the recomputed scores among them). SDPA's
backward is timed as `out.backward(dO)` of one forward, its inputs' gradients cleared before
each (so that none is added to the last). Per shape, the kernels' passes and every backend's
forward and backward are timed together: the median of 5 rounds, each running all of them in
turn (the GPU's clocks drift with its power and heat over a run).

With `--profile S,H` it only launches each kernel set's forward and backward, and cuDNN
SDPA's, once on that shape (B = 32K / S), between cudaProfilerStart and Stop, for Nsight
Compute (`ncu --profile-from-start off`; `tests/device/run.sh ncu` with RUN=attention).

Usage (GPU machine): python3 benches/attention.py PTX... [--out FILE] [--profile S,H]; one JSON
line per result.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fp8_gemm import launch, profiled, tensor_map, timed  # noqa: E402

BLOCK_ROWS = 128


class Generated:
    """One head shape's generated kernels: the forward, and the backward's passes (dQ and D
    first, then dK and dV in one pass) where their PTX is given."""

    def __init__(self, paths):
        import cupy

        self.shape = re.search(r"_((?:bf16_)?qk\d+_v\d+)\.ptx$", paths[0]).group(1)
        packed, qk, v = re.search(r"(bf16_)?qk(\d+)_v(\d+)", self.shape).groups()
        self.qk, self.v, self.packed = int(qk), int(v), packed is not None
        self.name = f"attention_{self.shape}"
        texts = {}
        for path in paths:
            name = os.path.splitext(os.path.basename(path))[0]
            kind = "fwd" if name.startswith("attention_fwd_") else name.split("_")[2]
            texts[kind] = (path, name, open(path).read())
        self.kernels = {}
        for kind, (path, name, text) in texts.items():
            kernel = cupy.RawModule(path=path).get_function(name)
            threads, shared = launch(text)
            kernel.max_dynamic_shared_size_bytes = shared
            self.kernels[kind] = (kernel, shared, threads)
        # Each backward pass and the gradients it writes (of Q, K, V: 0, 1, 2).
        passes = [("dq", (0,)), ("dkv", (1, 2))]
        self.backward = all(kind in self.kernels for kind, _ in passes)
        self.passes = passes if self.backward else []

    def maps(self, b, s, tensors):
        """The tensor maps a kernel takes after its other arguments where it streams its tiles
        by TMA from a producer warpgroup (`Heads::streams`: on packed inputs): Q, K and V (and
        dO's copy) as [B·S, H·D] BF16 tensors in boxes of 64 x 64 (`attention::MAP_BOX`)."""
        if not self.packed:
            return []
        return [tensor_map(x.view(b * s, -1), 64, 64) for x in tensors]

    def launch(self, kind, grid, args):
        kernel, shared, threads = self.kernels[kind]
        kernel(grid, (threads, 1, 1), args, shared_mem=shared)

    def stored(self, x):
        """Q, K or V as the kernels read it: BF16 where they read it packed."""
        return x.to(torch.bfloat16).contiguous() if self.packed else x

    def forward(self, q, k, v, scale):
        b, s, h, _ = q.shape
        q, k, v = self.stored(q), self.stored(k), self.stored(v)
        o = torch.full((b, s, h, self.v), float("nan"), device="cuda")
        lse = torch.full((b, h, s), float("nan"), device="cuda")
        args = tuple(np.uint64(t.data_ptr()) for t in (q, k, v, o, lse)) + (
            np.uint32(s), np.uint32(h), np.float32(scale))
        maps = self.maps(b, s, (q, k, v))
        args += tuple(np.uint64(m.data_ptr()) for m in maps)
        # The launches keep the tensors whose addresses they pass (here and in `grads`).
        return o, lse, lambda kept=(q, k, v, o, lse, maps): self.launch("fwd", (s // BLOCK_ROWS, b * h, 1), args)

    def grads(self, q, k, v, o, do, lse, scale):
        b, s, h, _ = q.shape
        delta = torch.full((b, h, s), float("nan"), device="cuda")
        grads = [torch.full_like(x, float("nan")) for x in (q, k, v)]
        q, k, v = self.stored(q), self.stored(k), self.stored(v)
        grid = (s // BLOCK_ROWS, b * h, 1)
        common = tuple(np.uint64(t.data_ptr()) for t in (q, k, v, o, do, lse, delta))
        tail = (np.uint32(s), np.uint32(h), np.float32(scale))
        # Where the passes stream (packed inputs), dO's packed copy, which the dQ pass writes
        # (`ring::store_rows`) and the key pass streams: every pass takes its map with Q's, K's
        # and V's.
        do_copy = torch.full_like(do, float("nan"), dtype=torch.bfloat16) if self.packed else None
        maps = self.maps(b, s, (q, k, v, do_copy))
        streamed = tuple(np.uint64(m.data_ptr()) for m in maps)

        def run(kept=(q, k, v, o, do, lse, delta, do_copy, maps)):
            for kind, written in self.passes:
                pointers = tuple(np.uint64(grads[i].data_ptr()) for i in written)
                self.launch(kind, grid, common + pointers + tail + streamed)

        return grads, run


def bf16(x):
    return x.to(torch.bfloat16).to(torch.float32)


def heads_major(x):
    """A BF16 [B, H, S, D] contiguous copy of an f32 [B, S, H, D] tensor, as SDPA takes it."""
    return x.to(torch.bfloat16).transpose(1, 2).contiguous()


def reference(q, k, v, scale):
    """float64 causal attention of [B, S, H, D] inputs: O [B, S, H, Dv], LSE [B, H, S]."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
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


def sdpa(backend, qh, kh, vh, scale):
    """SDPA's forward on BF16 [B, H, S, D] tensors (`heads_major`); the call, or None where the
    backend refuses."""

    def call():
        with sdpa_kernel([BACKENDS[backend]]):
            return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)

    try:
        call()
        torch.cuda.synchronize()
    except (RuntimeError, torch.OutOfMemoryError):
        return None
    return call


def inputs(b, s, h, g, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, s, h, g.qk, device="cuda", generator=gen)
    k = torch.randn(b, s, h, g.qk, device="cuda", generator=gen)
    v = torch.randn(b, s, h, g.v, device="cuda", generator=gen)
    return q, k, v


def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def relaunched(run, outputs):
    """Runs `run` (which writes `outputs`), then again on outputs poisoned with NaN: whether
    the second launch gave the first's bits."""
    run()
    torch.cuda.synchronize()
    first = [x.clone() for x in outputs]
    for x in outputs:
        x.fill_(float("nan"))
    run()
    torch.cuda.synchronize()
    return all(torch.equal(a, b) for a, b in zip(first, outputs))


def check(g, emit):
    ok = True
    for b, s, h in [(2, 256, 3), (1, 1024, 2), (1, 2048, 2), (1, 4096, 2), (1, 32768, 1)]:
        q, k, v = inputs(b, s, h, g, seed=s)
        do = torch.randn(b, s, h, g.v, device="cuda", generator=torch.Generator(device="cuda").manual_seed(7))
        scale = 1 / math.sqrt(g.qk)
        exact = [bf16(x).double().requires_grad_() for x in (q, k, v)]
        ref_o, ref_lse = reference(*exact, scale)
        ref_o.backward(do.double())
        o, lse, run = g.forward(q, k, v, scale)
        deterministic = relaunched(run, [o, lse])
        row = {"impl": g.name, "check": True, "b": b, "s": s, "h": h, "o_rel_error": rel(o, ref_o.detach()),
               "lse_max_error": (lse.double() - ref_lse.detach()).abs().max().item()}
        if g.backward:
            grads, run = g.grads(q, k, v, o, do, lse, scale)
            deterministic &= relaunched(run, list(grads))
            for name, grad, x in zip(("dq", "dk", "dv"), grads, exact):
                row[f"{name}_rel_error"] = rel(grad, x.grad)
        row["deterministic"] = deterministic
        sdpa_err = {}
        for name in BACKENDS:
            qh, kh, vh = (heads_major(x).detach().requires_grad_() for x in (q, k, v))
            try:
                with sdpa_kernel([BACKENDS[name]]):
                    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
                out.backward(heads_major(do))
            except RuntimeError:
                continue
            errs = {"o": rel(out.float().transpose(1, 2), ref_o.detach())}
            for gname, x, e in zip(("dq", "dk", "dv"), (qh, kh, vh), exact):
                errs[gname] = rel(x.grad.float().transpose(1, 2), e.grad)
            sdpa_err[name] = errs
        row["sdpa_rel_error"] = sdpa_err
        right = row["lse_max_error"] <= 1e-3 and deterministic
        for key in ("o", "dq", "dk", "dv"):
            if f"{key}_rel_error" in row:
                right &= row[f"{key}_rel_error"] <= 2 * min(e[key] for e in sdpa_err.values())
        row["ok"] = right
        ok &= right
        emit(row)
    return ok


def bench(g, emit):
    for s, h in [(4096, 16), (4096, 128), (32768, 16), (32768, 128)]:
        b = max(1, 32768 // s)
        q, k, v = inputs(b, s, h, g, seed=1)
        do = torch.randn(b, s, h, g.v, device="cuda")
        scale = 1 / math.sqrt(g.qk)
        forward_flops = 2 * b * h * (s * s / 2) * (g.qk + g.v)
        # The backward's five products: S recomputed, dP, dV, dK, dQ.
        backward_flops = 2 * b * h * (s * s / 2) * (3 * g.qk + 2 * g.v)
        o, lse, run = g.forward(q, k, v, scale)
        # The kernels' passes and every SDPA backend's (but math: never the fastest, its S×S
        # scores do not fit at these sizes), timed together.
        calls = {("ours", "fwd"): run}
        if g.backward:
            calls[("ours", "bwd")] = g.grads(q, k, v, o, do, lse, scale)[1]
        qh, kh, vh, dout = (heads_major(x) for x in (q, k, v, do))
        for name in BACKENDS:
            call = sdpa(name, qh, kh, vh, scale) if name != "math" else None
            if call is not None:
                calls[(name, "fwd")] = call
                calls[(name, "bwd")] = sdpa_backward(name, qh, kh, vh, dout, scale)
        # One call a round: a pass takes milliseconds.
        us = dict(zip(calls, (1e6 * t for t in timed(*calls.values(), rounds=5, calls=1))))
        flops = {"fwd": forward_flops, "bwd": backward_flops}

        def timings(name):
            row = {}
            for kind in ("fwd", "bwd"):
                if (name, kind) in us:
                    row[f"{kind}_us"] = round(us[name, kind], 1)
                    row[f"{kind}_tflops"] = round(flops[kind] / us[name, kind] / 1e6)
            return row
        row = {"impl": g.name, "b": b, "s": s, "h": h, **timings("ours")}
        for name in dict.fromkeys(name for name, _ in calls if name != "ours"):
            emit({"impl": f"sdpa {name}", "b": b, "s": s, "h": h, **timings(name)})
        for kind in ("fwd", "bwd"):
            best = [t for (name, timed_kind), t in us.items() if name != "ours" and timed_kind == kind]
            if best and ("ours", kind) in us:
                row[f"{kind}_vs_sdpa_best"] = round(min(best) / us["ours", kind], 3)
        emit(row)
        del calls, qh, kh, vh, dout
        del q, k, v, o, lse, do
        torch.cuda.empty_cache()


def profile(generated, s, h):
    """Each kernel set's forward and backward and cuDNN SDPA's on one shape, `profiled` (each
    backward after its forward, whose O and log-sum-exp it reads)."""
    b = max(1, 32768 // s)
    launches = []
    for g in generated:
        q, k, v = inputs(b, s, h, g, seed=1)
        do = torch.randn(b, s, h, g.v, device="cuda")
        scale = 1 / math.sqrt(g.qk)
        o, lse, run = g.forward(q, k, v, scale)
        launches.append(run)
        if g.backward:
            launches.append(g.grads(q, k, v, o, do, lse, scale)[1])
    qh, kh, vh, dout = (heads_major(x) for x in (q, k, v, do))
    call = sdpa("cudnn", qh, kh, vh, scale)
    if call is not None:
        launches += [call, sdpa_backward("cudnn", qh, kh, vh, dout, scale)]
    profiled(launches)


def sdpa_backward(backend, qh, kh, vh, dout, scale):
    """SDPA's backward on BF16 [B, H, S, D] tensors (`heads_major`), after its forward once: a
    call computing the gradients afresh (not added to the last call's)."""
    leaves = [x.detach().requires_grad_() for x in (qh, kh, vh)]
    with sdpa_kernel([BACKENDS[backend]]):
        out = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale)

    def call():
        for x in leaves:
            x.grad = None
        out.backward(dout, retain_graph=True)
    return call


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ptx", nargs="+")
    ap.add_argument("--out")
    ap.add_argument("--profile", metavar="S,H", help="launch each kernel once on this shape, for ncu")
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
    shapes = {}
    for path in args.ptx:
        shapes.setdefault(re.search(r"_((?:bf16_)?qk\d+_v\d+)\.ptx$", path).group(1), []).append(path)
    if args.profile:
        profile([Generated(paths) for paths in shapes.values()], *map(int, args.profile.split(",")))
        return
    for paths in shapes.values():
        g = Generated(paths)
        if check(g, emit):
            bench(g, emit)
        else:
            ok = False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
