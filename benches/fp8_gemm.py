#!/usr/bin/env python3
"""PyTorch's FP8 block-scaled GEMM (cuBLASLt under `scaled_mm`) on issue 9's shapes, the
baseline for `cargo bench -p dsc-runtime --features cuda --bench scaled_gemm`.

First it finds which scale layouts PyTorch accepts for 1x128 activation tiles and 128x128
weight blocks and checks each accepted one against a float64 product of the dequantised
operands (PyTorch hands the scale pointer to cuBLASLt as is, so an accepted and correct layout
is cuBLASLt's). Then it times y = a @ w.T at M = 4096 (median of 20 runs of 10, synchronised)
with BF16 and, where accepted, FP32 output. One JSON line per result.

Usage (GPU machine): python3 benches/fp8_gemm.py
"""
import json
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
E4M3 = torch.float8_e4m3fn


def quantize(x, rows, cols):
    """x [r, c] in rows x cols groups: E4M3 values and the [r/rows, c/cols] scales."""
    r, c = x.shape
    g = x.reshape(r // rows, rows, c // cols, cols).abs().amax(dim=(1, 3)).float() / 448.0
    g = torch.where(g == 0, torch.ones_like(g), g)
    full = g.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
    return (x / full).to(E4M3), g


def strided(logical, transposed_memory):
    """`logical` [p, q] stored with the first index contiguous when `transposed_memory`."""
    if transposed_memory:
        return logical.t().contiguous().t()
    return logical.contiguous()


def call(a, b_t, sa, sb, out_dtype):
    recipes = getattr(F, "ScalingType", None)
    if recipes is not None and hasattr(F, "scaled_mm"):
        return F.scaled_mm(a, b_t, sa, recipes.BlockWise1x128, sb, recipes.BlockWise128x128, output_dtype=out_dtype)
    return torch._scaled_mm(a, b_t, sa, sb, out_dtype=out_dtype)


def probe(m=256, n=512, k=1024):
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda") * torch.logspace(-2, 2, m, device="cuda")[:, None]
    w = torch.randn(n, k, device="cuda")
    qa, sa = quantize(x, 1, 128)
    qw, sw = quantize(w, 128, 128)
    exact = (qa.double() * sa.double().repeat_interleave(128, 1)) @ (
        qw.double() * sw.double().repeat_interleave(128, 0).repeat_interleave(128, 1)).t()
    accepted = None
    for a_mn_major in (True, False):
        for w_layout in ("n-blocks contiguous", "k-blocks contiguous"):
            scale_a = strided(sa, a_mn_major)
            scale_w = strided(sw, w_layout == "n-blocks contiguous")
            for name, sb in (("scale_w [n/128, k/128]", scale_w), ("scale_w.T [k/128, n/128]", scale_w.t())):
                result = {"probe": True, "scale_a": "m contiguous" if a_mn_major else "k contiguous",
                          "scale_w memory": w_layout, "passed as": name}
                try:
                    y = call(qa, qw.t(), scale_a, sb, torch.bfloat16).double()
                    err = ((y - exact).norm() / exact.norm()).item()
                    result.update(ok=err < 1e-2, rel_error=err)
                    if err < 1e-2 and accepted is None:
                        accepted = (a_mn_major, w_layout == "n-blocks contiguous", name)
                except Exception as e:  # noqa: BLE001 - report what PyTorch says
                    result.update(ok=False, error=str(e).splitlines()[0][:200])
                print(json.dumps(result), flush=True)
    return accepted


def bench(accepted, m=4096):
    a_mn_major, w_n_contiguous, passed = accepted
    for n, k in SHAPES:
        x = torch.randn(m, k, device="cuda")
        w = torch.randn(n, k, device="cuda")
        qa, sa = quantize(x, 1, 128)
        qw, sw = quantize(w, 128, 128) if n % 128 == 0 else quantize(torch.nn.functional.pad(w, (0, 0, 0, -n % 128)), 128, 128)
        qw = qw[:n]
        scale_a, scale_w = strided(sa, a_mn_major), strided(sw, w_n_contiguous)
        sb = scale_w if passed.startswith("scale_w [") else scale_w.t()
        for out_dtype in (torch.bfloat16, torch.float32):
            try:
                f = lambda: call(qa, qw.t(), scale_a, sb, out_dtype)  # noqa: E731
                for _ in range(5):
                    f()
                samples = []
                for _ in range(20):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(10):
                        f()
                    torch.cuda.synchronize()
                    samples.append((time.perf_counter() - start) / 10)
                s = statistics.median(samples)
                print(json.dumps({"impl": "torch scaled_mm", "out": str(out_dtype), "m": m, "n": n, "k": k,
                                  "us": round(s * 1e6, 1), "tflops": round(2 * m * n * k / s / 1e12)}), flush=True)
            except Exception as e:  # noqa: BLE001
                print(json.dumps({"impl": "torch scaled_mm", "out": str(out_dtype), "n": n, "k": k,
                                  "error": str(e).splitlines()[0][:200]}), flush=True)


if __name__ == "__main__":
    print(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}))
    accepted = probe()
    if accepted:
        bench(accepted)
