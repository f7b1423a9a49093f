#!/usr/bin/env python3
"""PyTorch's FP8 block-scaled GEMM (cuBLASLt under `scaled_mm`) on issue 9's shapes, the
baseline for `cargo bench -p dsc-runtime --features cuda --bench scaled_gemm`.

First it finds which scale layouts PyTorch accepts for 1x128 activation tiles and 128x128
weight blocks and checks each accepted one against a float64 product of the dequantised
operands (PyTorch hands the scale pointer to cuBLASLt as is, so an accepted and correct layout
is cuBLASLt's). Then it times y = a @ w.T at M = 4096 (median of 20 runs of 10, synchronised)
with BF16 and, where accepted, FP32 output. One JSON line per result.

With `--generated PTX...` it also runs dsc's generated FP8 GEMMs (`compiler::mlir::gemm`,
written by `cargo run --release -p dsc-compiler --features mlir --example kernel_ptx -- DIR
MxNxSTAGES...`: entry `fp8_gemm_m{M}_n{N}_s{STAGES}` in a file of that name, whose first line
says how to launch it, loaded with CuPy) on the same
operands: first on a small product with a float64 reference, then on each shape, where their
relative error over the first 512 rows (against float64) must be at most 1.1x cuBLASLt's, and
timed together with cuBLASLt, in turns (`timed`); "ok": false marks a wrong result. Kernels
of the same name from several folders (two builds' `kernel_ptx` output) are told apart by
their folder's name ("FOLDER/NAME") and timed together in the same turns. A generated kernel
reads its operands through TMA tensor maps (made here with the driver's
cuTensorMapEncodeTiled). The grouped kernels (`fp8_grouped_*`:
the experts' offsets read on the device) run on uneven experts against float64, then on issue
9's grouped shapes beside cuBLASLt called once per expert.

With `--profile N,K` it only launches each kernel once on that shape (M = 4096: cuBLASLt's
F32-output product, then each generated kernel), between cudaProfilerStart and Stop, for
Nsight Compute (`ncu --profile-from-start off`; `tests/device/run.sh ncu` with RUN=gemm).

Usage (GPU machine): python3 benches/fp8_gemm.py [--generated PTX...] [--profile N,K]
"""
import argparse
import itertools
import os
import re
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
    ref = exact(qa, sa, qw, sw, m)
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
                    err = rel(y, ref)
                    result.update(ok=err < 1e-2, rel_error=err)
                    if err < 1e-2 and accepted is None:
                        accepted = (a_mn_major, w_layout == "n-blocks contiguous", name)
                except Exception as e:  # noqa: BLE001 - report what PyTorch says
                    result.update(ok=False, error=str(e).splitlines()[0][:200])
                print(json.dumps(result), flush=True)
    return accepted


def exact(qa, sa, qw, sw, rows):
    """The float64 product of the dequantised operands, over the first `rows` rows."""
    a = qa[:rows].double() * sa[:rows].double().repeat_interleave(128, 1)
    w = qw.double() * sw.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[: qw.shape[0]]
    return a @ w.t()


def rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def tensor_map(t, box_rows, box_columns=128):
    """A `CUtensorMap` on the GPU (128 bytes, 64-aligned) for t (row-major [..., columns], all
    leading dimensions as rows): an E4M3 operand as a 2-D u8 tensor (what
    `compiler::mlir::gemm::TensorMap` says a launch passes), the dense form's f32 output as
    a 3-D tensor of one layer (what `compiler::mlir::gemm::fp8_gemm` says), or the attention's
    BF16 inputs as 2-D tensors (`compiler::mlir::attention::MAP_ARGS`); box box_columns x
    box_rows elements (x 1 layer), 128-byte swizzle, zeros out of bounds; L2 promotion of 128
    bytes as the runtime encodes (`runtime::cuda::tensor_maps`), or 256 with DSC_L2_PROMOTION=256
    in the environment (to measure the alternative)."""
    import ctypes
    columns = t.shape[-1]
    rows = t.numel() // columns
    u64, u32 = ctypes.c_uint64, ctypes.c_uint32
    raw = (ctypes.c_uint8 * 192)()
    at = ctypes.addressof(raw) + (-ctypes.addressof(raw)) % 64
    driver = ctypes.CDLL("libcuda.so.1")
    # CU_TENSOR_MAP_DATA_TYPE_FLOAT32, _BFLOAT16 or _UINT8.
    kind, rank = {torch.float32: (7, 3), torch.bfloat16: (9, 2)}.get(t.dtype, (0, 2))
    size = t.element_size()
    # CU_TENSOR_MAP_L2_PROMOTION_L2_128B or _L2_256B.
    promotion = {"128": 2, "256": 3}[os.environ.get("DSC_L2_PROMOTION", "128")]
    result = driver.cuTensorMapEncodeTiled(
        ctypes.c_void_p(at), kind, rank, ctypes.c_void_p(t.data_ptr()), (u64 * 3)(columns, rows, 1),
        (u64 * 2)(columns * size, rows * columns * size), (u32 * 3)(box_columns, box_rows, 1), (u32 * 3)(1, 1, 1),
        0, 3, promotion, 0)
    assert result == 0, f"cuTensorMapEncodeTiled: CUresult {result}"
    return torch.tensor(list(ctypes.string_at(at, 128)), dtype=torch.uint8, device="cuda")


def launch(ptx):
    """How a generated kernel is launched, from the first line of its PTX as `kernel_ptx` writes
    it (what the runtime gives it): (threads a block, dynamic shared bytes)."""
    found = re.match(r"// dsc launch: threads (\d+), shared bytes (\d+)\n", ptx)
    if not found:
        raise SystemExit("a generated kernel's PTX starts with `// dsc launch: …` (written by kernel_ptx)")
    return int(found.group(1)), int(found.group(2))


class Generated:
    """A generated FP8 GEMM: C = A·Bᵀ, A's 1x128 scales M-contiguous, B's 128x128 block scales
    with the K-blocks fastest, each row of them padded to 4, f32 output; its tile (m x n in
    `stages` shared-memory stages) read from its name, its launch from its PTX (`launch`); A and
    B passed as tensor maps."""

    def __init__(self, path, label=None):
        import cupy
        self.name = os.path.splitext(os.path.basename(path))[0]
        # What its results are called: its name, or its folder's and its name where kernels of
        # the same name from several folders (builds) are timed together.
        self.label = label or self.name
        self.grouped = self.name.startswith("fp8_grouped_")
        shape = re.search(r"_m(\d+)_n(\d+)_s(\d+)(?:_c(\d+))?$", self.name).groups()
        self.tile_m, self.tile_n, self.stages = map(int, shape[:3])
        self.cluster = int(shape[3] or 1)
        with open(path) as ptx:
            self.threads, self.shared = launch(ptx.read())
        self.kernel = cupy.RawModule(path=path).get_function(self.name)
        self.kernel.max_dynamic_shared_size_bytes = self.shared

    def fits(self, m, n, k):
        return not self.grouped and m % self.tile_m == 0 and n % 4 == 0 and k % 128 == 0

    def prepare(self, qa, sa, qw, sw, offsets=None, c=None):
        """The kernel's operands, and a launch writing C (a new one), or adding to c where given.
        Grouped: qw [E, N, K] and sw [E, N/128, K/128], expert e's rows of qa
        offsets[e]..offsets[e + 1]."""
        import numpy as np
        m, k = qa.shape
        n = qw.shape[-2]
        blocks = k // 128
        padded = torch.zeros(*sw.shape[:-1], -(-blocks // 4) * 4, device="cuda")
        padded[..., :blocks] = sw
        scale_a = sa.t().contiguous()
        accumulate = c is not None
        c = c if accumulate else torch.full((m, n), float("nan"), device="cuda")
        # C's tensor map (32 f32 x 64 rows a box) for the dense form, which stores through one;
        # the grouped form stores from registers, through C's pointer.
        out = c if self.grouped else tensor_map(c, 64, 32)
        keep = (tensor_map(qa, self.tile_m // self.cluster), tensor_map(qw, self.tile_n), scale_a, padded, out, qa, qw, c)
        args = tuple(np.uint64(t.data_ptr()) for t in keep[:5]) + (np.uint32(m), np.uint32(n), np.uint32(k))
        args += (np.uint32(accumulate),)  # add to C's values, else store over them
        rows = m // self.tile_m
        if self.grouped:
            experts = offsets.numel() - 1
            keep += (offsets,)
            args += (np.uint64(offsets.data_ptr()), np.uint32(experts))
            # The second pair of operands (a product added to the first's): none, over K2 = 0.
            args += args[:4] + (np.uint32(0),)
            rows = -(-m // self.tile_m) + experts
        # Persistent: at most a block per multiprocessor, each looping over its tiles (a cluster
        # of blocks over neighbouring tiles along N).
        units = -(-n // (self.tile_n * self.cluster)) * rows
        clusters = torch.cuda.get_device_properties(0).multi_processor_count // self.cluster
        grid = (min(units, clusters) * self.cluster, 1, 1)
        return c, lambda: (keep, self.kernel(grid, (self.threads, 1, 1), args, shared_mem=self.shared))


def check_generated(generated):
    """Each generated kernel on small products against float64 (K = 256: fewer blocks of K than
    stages): the error and the place of the worst element (which row and column block a
    layout mistake shows in)."""
    torch.manual_seed(1)
    for m, n, k in ((256, 512, 1024), (128, 256, 256)):
        x = torch.randn(m, k, device="cuda") * torch.logspace(-2, 2, m, device="cuda")[:, None]
        w = torch.randn(n, k, device="cuda")
        qa, sa = quantize(x, 1, 128)
        qw, sw = quantize(w, 128, 128)
        ref = exact(qa, sa, qw, sw, m)
        for g in (g for g in generated if not g.grouped):
            # Stored, then the same product added to it by a launch that accumulates: 2·A·Bᵀ.
            c, store = g.prepare(qa, sa, qw, sw)
            _, add = g.prepare(qa, sa, qw, sw, c=c)
            for launch, check, want in ((store, "", ref), (add, ", added", 2 * ref)):
                launch()
                torch.cuda.synchronize()
                err = rel(c, want)
                worst = ((c.double() - want).abs() / want.abs().amax(dim=1, keepdim=True)).argmax().item()
                print(json.dumps({"impl": g.label, "check": f"m {m} n {n} k {k}{check}", "ok": err < 1e-3,
                                  "rel_error": err, "worst at": [worst // n, worst % n]}), flush=True)


def grouped_operands(rows, n, k, seed=2):
    """Experts' rows (a list of counts), sorted A [sum, k] and weights [E, n, k], quantised; the
    offsets (i32 on the GPU) and the float64 product expert by expert."""
    torch.manual_seed(seed)
    m = sum(rows)
    x = torch.randn(m, k, device="cuda") * torch.logspace(-1, 1, m, device="cuda")[:, None]
    w = torch.randn(len(rows), n, k, device="cuda")
    qa, sa = quantize(x, 1, 128)
    quantised = [quantize(w[e], 128, 128) for e in range(len(rows))]
    qw = torch.stack([q for q, _ in quantised])
    sw = torch.stack([s for _, s in quantised])
    offsets = torch.tensor([0] + list(itertools.accumulate(rows)), dtype=torch.int32, device="cuda")
    return qa, sa, qw, sw, offsets


def grouped_exact(qa, sa, qw, sw, offsets):
    bounds = offsets.tolist()
    out = torch.zeros(qa.shape[0], qw.shape[1], dtype=torch.float64, device="cuda")
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = exact(qa[lo:hi], sa[lo:hi], qw[e], sw[e], hi - lo)
    return out


def bench_grouped(accepted, generated):
    """Each generated grouped kernel: on uneven experts (empty ones, rows not multiples of the
    tile) against float64, then on issue 9's grouped shapes (32 experts x 1024 rows) against
    float64 and timed beside cuBLASLt called once per expert (what dsc's backend does now)."""
    grouped = [g for g in generated if g.grouped]
    if not grouped:
        return
    a_mn_major, w_n_contiguous, passed = accepted
    cases = [([0, 16, 200, 64, 1000, 48, 0, 130, 512], 256, 512, False),
             ([1024] * 32, 2048, 2048, True), ([1024] * 32, 2048, 1024, True)]
    for rows, n, k, time_it in cases:
        qa, sa, qw, sw, offsets = grouped_operands(rows, n, k)
        ref = grouped_exact(qa, sa, qw, sw, offsets)
        m = qa.shape[0]
        bounds = offsets.tolist()
        experts = [(bounds[e], bounds[e + 1], e) for e in range(len(rows)) if bounds[e + 1] > bounds[e]]

        def per_expert():
            out = torch.empty(m, n, device="cuda")
            for lo, hi, e in experts:
                sb = strided(sw[e], w_n_contiguous)
                sb = sb if passed.startswith("scale_w [") else sb.t()
                out[lo:hi] = call(qa[lo:hi], qw[e].t(), strided(sa[lo:hi], a_mn_major), sb, torch.float32)
            return out
        base = {"m": m, "n": n, "k": k, "experts": len(rows)}
        library_error = rel(per_expert(), ref) if time_it else None
        results, runs = [], []
        for g in grouped:
            c, run = g.prepare(qa, sa, qw, sw, offsets)
            run()
            torch.cuda.synchronize()
            err = rel(c, ref)
            bound = 1.1 * library_error + 1e-7 if library_error is not None else 1e-3
            results.append({"impl": g.label, **base, "ok": bool(err <= bound and torch.isfinite(c).all().item()),
                            "rel_error": err})
            runs.append(run)
        if time_it:
            baseline_s, *seconds = timed(per_expert, *runs)
            print(json.dumps({"impl": "torch scaled_mm per expert", **base, "rel_error": library_error,
                              "us": round(baseline_s * 1e6, 1), "tflops": round(2 * m * n * k / baseline_s / 1e12)}),
                  flush=True)
            for result, s in zip(results, seconds):
                result.update(us=round(s * 1e6, 1), tflops=round(2 * m * n * k / s / 1e12),
                              vs_per_expert_cublaslt=round(baseline_s / s, 3))
        for result in results:
            print(json.dumps(result), flush=True)


def timed(*fs, rounds=20, calls=10):
    """Each of `fs`'s seconds a call: the median of `rounds` rounds of `calls` calls,
    synchronised, after as many to warm up; the rounds go through all of `fs` in turn, so that
    the GPU's clocks (which drift with its power and heat over a run) weigh on each alike."""
    for f in fs:
        for _ in range(calls):
            f()
    samples = [[] for _ in fs]
    for _ in range(rounds):
        for f, mine in zip(fs, samples):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                f()
            torch.cuda.synchronize()
            mine.append((time.perf_counter() - start) / calls)
    return [statistics.median(mine) for mine in samples]


def operands(accepted, n, k, m):
    """Random A [m, k] and B [n, k] quantised: (qa, sa, qw, sw) as the generated kernels take
    them and the scales (A's, B's) as `scaled_mm` takes them in the accepted layout."""
    a_mn_major, w_n_contiguous, passed = accepted
    x = torch.randn(m, k, device="cuda")
    w = torch.randn(n, k, device="cuda")
    qa, sa = quantize(x, 1, 128)
    qw, sw = quantize(w, 128, 128) if n % 128 == 0 else quantize(torch.nn.functional.pad(w, (0, 0, 0, -n % 128)), 128, 128)
    qw = qw[:n]
    scale_a, scale_w = strided(sa, a_mn_major), strided(sw, w_n_contiguous)
    sb = scale_w if passed.startswith("scale_w [") else scale_w.t()
    return (qa, sa, qw, sw), (scale_a, sb)


def profile(accepted, generated, n, k, m=4096):
    """cuBLASLt's F32-output product and each fitting generated kernel on one shape, each run
    once to warm up, then once between cudaProfilerStart and Stop."""
    (qa, sa, qw, sw), (scale_a, sb) = operands(accepted, n, k, m)
    launches = [lambda: call(qa, qw.t(), scale_a, sb, torch.float32)]
    launches += [g.prepare(qa, sa, qw, sw)[1] for g in generated if g.fits(m, n, k)]
    profiled(launches)


def profiled(launches):
    """Runs each of `launches` once to warm up, then once between cudaProfilerStart and Stop
    (what `ncu --profile-from-start off` measures; benches/attention.py's too)."""
    for launch in launches:
        launch()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for launch in launches:
        launch()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def bench(accepted, generated, m=4096):
    """Per shape, cuBLASLt (BF16 and f32 output, where accepted) and each fitting generated
    kernel (checked against float64 first), timed together (`timed`)."""
    for n, k in SHAPES:
        (qa, sa, qw, sw), (scale_a, sb) = operands(accepted, n, k, m)
        library = []
        for out_dtype in (torch.bfloat16, torch.float32):
            try:
                call(qa, qw.t(), scale_a, sb, out_dtype)
                library.append((out_dtype, lambda out_dtype=out_dtype: call(qa, qw.t(), scale_a, sb, out_dtype)))
            except Exception as e:  # noqa: BLE001
                print(json.dumps({"impl": "torch scaled_mm", "out": str(out_dtype), "n": n, "k": k,
                                  "error": str(e).splitlines()[0][:200]}), flush=True)
        ours = []
        fitting = [g for g in generated if g.fits(m, n, k)]
        if fitting:
            ref = exact(qa, sa, qw, sw, 512)
            library_error = rel(call(qa, qw.t(), scale_a, sb, torch.float32)[:512], ref)
        for g in fitting:
            c, run = g.prepare(qa, sa, qw, sw)
            run()
            torch.cuda.synchronize()
            ours.append((g, rel(c[:512], ref), run))
        seconds = timed(*[f for _, f in library], *[run for _, _, run in ours])
        baseline = dict(zip([out_dtype for out_dtype, _ in library], seconds))
        for out_dtype, s in baseline.items():
            print(json.dumps({"impl": "torch scaled_mm", "out": str(out_dtype), "m": m, "n": n, "k": k,
                              "us": round(s * 1e6, 1), "tflops": round(2 * m * n * k / s / 1e12)}), flush=True)
        best = min(baseline.values()) if baseline else None
        for (g, err, _), s in zip(ours, seconds[len(library):]):
            print(json.dumps({"impl": g.label, "m": m, "n": n, "k": k, "ok": err <= 1.1 * library_error + 1e-7,
                              "rel_error": err, "cublaslt_rel_error": library_error, "us": round(s * 1e6, 1),
                              "tflops": round(2 * m * n * k / s / 1e12),
                              "vs_cublaslt": round(best / s, 3) if best else None}), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--generated", nargs="*", default=[], metavar="PTX")
    ap.add_argument("--profile", metavar="N,K", help="launch each kernel once on this shape, for ncu")
    args = ap.parse_args()
    names = [os.path.basename(path) for path in args.generated]
    generated = [Generated(path, f"{os.path.basename(os.path.dirname(path))}/{name[:-4]}" if names.count(name) > 1 else None)
                 for path, name in zip(args.generated, names)]
    print(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}))
    if not args.profile:
        check_generated(generated)
    accepted = probe()
    if args.profile:
        if not accepted:
            raise SystemExit(1)
        profile(accepted, generated, *map(int, args.profile.split(",")))
    elif accepted:
        bench(accepted, generated)
        bench_grouped(accepted, generated)
