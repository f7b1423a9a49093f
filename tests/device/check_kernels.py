#!/usr/bin/env python3
"""Runs every generated kernel of a dsc plan on the GPU and checks it.

For each kernel with PTX (`dsc compile SPEC -o PLAN`): fresh random inputs, outputs poisoned
with NaN first, one launch, then ||gpu - ref|| / ||ref|| against a float64 reference computed
here from the kernel's op list in plan.json (written independently of dsc's CPU backend) must
be within DESIGN.md's bound for the kernel's precision: 1e-5 in f32, 1e-2 when the kernel
rounds to bf16 (the reference rounds too, but one f32 ulp before the rounding can flip a bf16
ulp). Then each kernel is timed (CUDA events around 20 back-to-back launches, median of 10
such runs, so that host launch latency is not counted) and its bandwidth compared with a
device-to-device copy measured in the same run.

Usage (on a machine with an NVIDIA GPU, CuPy and NumPy):
    python3 tests/device/check_kernels.py PLAN_DIR [--out results.json]
Prints one line per kernel and a summary; exits 1 if any kernel is wrong.
"""
import json
import math
import sys

import cupy as cp
import numpy as np


def op_name(op):
    return op if isinstance(op, str) else next(iter(op))


def bf16(x):
    """Round float64 values to bfloat16 (through float32, ties to even), as the GPU does."""
    f = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((f + 0x7FFF + ((f >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


def reference(function, kernel, inputs):
    """Evaluates the kernel's nodes in float64 over flat arrays."""
    nodes = function["nodes"]
    values = dict(inputs)

    def value(v):
        while v not in values:
            node = nodes[v]
            name = op_name(node["op"])
            if name == "const":
                return np.float64(node["op"]["const"])
            if name in ("reshape", "stop_gradient"):
                v = node["args"][0]
                continue
            raise KeyError(f"value %{v} ({name}) is not available")
        return values[v]

    for v in kernel["nodes"]:
        node = nodes[v]
        name = op_name(node["op"])
        a = [value(x) for x in node["args"]]
        sig = lambda x: 1.0 / (1.0 + np.exp(-x))
        if name == "neg": r = -a[0]
        elif name == "exp": r = np.exp(a[0])
        elif name == "log": r = np.log(a[0])
        elif name == "sigmoid": r = sig(a[0])
        elif name == "silu": r = a[0] * sig(a[0])
        elif name == "swi_glu": r = a[0] * sig(a[0]) * a[1]
        elif name == "rsqrt": r = 1.0 / np.sqrt(a[0])
        elif name == "sqrt": r = np.sqrt(a[0])
        elif name == "square": r = a[0] * a[0]
        elif name == "sign": r = np.sign(a[0])
        elif name == "add": r = a[0] + a[1]
        elif name == "sub": r = a[0] - a[1]
        elif name == "mul": r = a[0] * a[1]
        elif name == "div": r = a[0] / a[1]
        elif name == "maximum": r = np.maximum(a[0], a[1])
        elif name == "cast":
            r = bf16(a[0]) if node["op"]["cast"] == "bf16" else a[0]
        elif name in ("rms_norm", "softmax"):
            n = node["shape"][-1]
            x = a[0].reshape(-1, n)
            if name == "rms_norm":
                r = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + node["op"]["rms_norm"]["eps"]) * a[1].reshape(1, n)
            else:
                e = np.exp(x - x.max(axis=1, keepdims=True))
                r = e / e.sum(axis=1, keepdims=True)
            r = r.reshape(-1)
        else:
            raise ValueError(f"no reference for {name}")
        values[v] = np.broadcast_to(np.asarray(r, dtype=np.float64), (max(1, math.prod(node["shape"])),)).copy()
    return values


def copy_bandwidth():
    """Device-to-device copy bandwidth (bytes read + written per second) of a 1 GiB buffer."""
    src = cp.ones(1 << 28, dtype=cp.float32)
    dst = cp.empty_like(src)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    for _ in range(3):
        dst[...] = src
    times = []
    for _ in range(10):
        start.record()
        dst[...] = src
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    return 2 * src.nbytes / float(np.median(times))


def main():
    plan_dir = sys.argv[1]
    out_path = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    plan = json.load(open(f"{plan_dir}/plan.json"))
    rng = np.random.default_rng(0)
    copy_bw = copy_bandwidth()
    print(f"device copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
    results, failures = [], 0
    for function, pf in zip(plan["module"]["functions"], plan["functions"]):
        for k in pf["kernels"]:
            code = k["code"]
            if code["kind"] != "generated":
                continue
            nodes = function["nodes"]
            size = lambda v: max(1, math.prod(nodes[v]["shape"]))
            # Positive inputs keep log, sqrt and rsqrt in their domain.
            host = {v: rng.uniform(0.5, 1.5, size(v)) for v in k["inputs"]}
            ref = reference(function, k, host)
            dev = {v: cp.asarray(host[v], dtype=cp.float32) for v in k["inputs"]}
            for v in k["outputs"]:
                dev[v] = cp.full(size(v), cp.nan, dtype=cp.float32)
            module = cp.RawModule(path=f"{plan_dir}/kernels/{k['name']}.ptx")
            kern = module.get_function(k["name"])
            args = []
            for v in code["args"]:
                a = dev[v]
                args += [a, a, np.int64(0), np.int64(a.size), np.int64(1)]
            grid, block = (code["grid"],), (code["block"],)
            kern(grid, block, tuple(args))
            cp.cuda.runtime.deviceSynchronize()
            errors = []
            for v in k["outputs"]:
                got = cp.asnumpy(dev[v]).astype(np.float64)
                want = ref[v]
                err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)) if np.all(np.isfinite(got)) else float("inf")
                errors.append(err)
            err = max(errors)
            bound = 1e-2 if "cast" in k["ops"] else 1e-5
            ok = err <= bound
            failures += not ok
            start, end = cp.cuda.Event(), cp.cuda.Event()
            times = []
            for _ in range(10):
                start.record()
                for _ in range(20):
                    kern(grid, block, tuple(args))
                end.record()
                end.synchronize()
                times.append(cp.cuda.get_elapsed_time(start, end) / 1e3 / 20)
            seconds = float(np.median(times))
            moved = sum(dev[v].nbytes for v in set(code["args"]))
            bw = moved / seconds
            results.append({"kernel": k["name"], "ops": k["ops"], "rel_error": err, "bound": bound, "ok": ok, "bytes": moved, "us": seconds * 1e6, "gb_s": bw / 1e9, "of_copy": bw / copy_bw})
            print(f"{'ok  ' if ok else 'FAIL'} {k['name']:<40} err {err:.1e}  {moved / 1e6:9.2f} MB  {seconds * 1e6:8.1f} us  {bw / 1e9:7.0f} GB/s ({100 * bw / copy_bw:5.1f}% of copy)")
    big = [r for r in results if r["bytes"] >= 32e6]
    print(f"\n{len(results)} kernels, {failures} wrong; {len(big)} moving >= 32 MB: median {np.median([r['of_copy'] for r in big]) * 100 if big else 0:.1f}% of copy bandwidth, "
          f"min {min([r['of_copy'] for r in big] or [0]) * 100:.1f}%, max {max([r['of_copy'] for r in big] or [0]) * 100:.1f}%")
    if out_path:
        json.dump({"copy_gb_s": copy_bw / 1e9, "kernels": results}, open(out_path, "w"), indent=1)
    print("PASS" if failures == 0 else "FAIL")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
