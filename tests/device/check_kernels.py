#!/usr/bin/env python3
"""Runs every generated kernel of a dsc plan on the GPU and checks it.

For each kernel with PTX (`dsc compile SPEC -o PLAN`): fresh random inputs, outputs poisoned
with NaN first, one launch, then ||gpu - ref|| / ||ref|| against a float64 reference computed
here from the kernel's op list in plan.json (written independently of dsc's CPU backend) must
be within DESIGN.md's bound for each output's precision: 1e-5 in f32, 1e-2 when the kernel
rounds to bf16 (the reference rounds too, but one f32 ulp before the rounding can flip a bf16
ulp), 1e-3 for FP8 outputs (dequantised, against the reference quantised the same way in
float64), and index outputs (top-k, routing, the sort by expert) must be exact. A fused op
with several results writes each part its `get` nodes read. Index inputs get valid
random values for the op that reads them (positions in range, permutations for the MoE
order). Kernels marked `zeroed` get their outputs zeroed before the launch, as the runtime
does. Then each kernel is timed (CUDA events around back-to-back launches, median of several
such runs, so that host launch latency is not counted) and its bandwidth compared with a
device-to-device copy measured in the same run.

The float64 reference runs on the GPU through CuPy's own array operations (bench-size values
reach 2 GB); it shares nothing with the generated kernels but the device.

Usage (on a machine with an NVIDIA GPU, CuPy and NumPy):
    python3 tests/device/check_kernels.py PLAN_DIR [--out results.json] [--only OP,OP]
(--only: the kernels whose first op is one of these.) Prints one line per kernel and a summary; exits 1 if any kernel is wrong.
"""
import json
import math
import sys

import cupy as cp
import cupyx
import numpy as np

xp = cp  # the reference's array module


def op_name(op):
    return op if isinstance(op, str) else next(iter(op))


def bf16(x):
    """Round float64 values to bfloat16 (through float32, ties to even), as the GPU does."""
    f = xp.asarray(x, dtype=xp.float32).view(xp.uint32).astype(xp.uint64)
    rounded = ((f + 0x7FFF + ((f >> 16) & 1)) >> 16) << 16
    return rounded.astype(xp.uint32).view(xp.float32).astype(xp.float64)


def bf16_bits(x):
    """bfloat16 values (already rounded) as the uint16 words of a packed buffer."""
    return (xp.asarray(x, dtype=xp.float32).view(xp.uint32) >> 16).astype(xp.uint16)


def from_bf16_bits(words):
    return (words.astype(xp.uint32) << 16).view(xp.float32).astype(xp.float64)


def attrs(node):
    op = node["op"]
    return {} if isinstance(op, str) else next(iter(op.values()))


def reference(function, kernel, inputs):
    """Evaluates the kernel's nodes in float64 (int64 for index values), each value shaped."""
    nodes = function["nodes"]
    values = {v: x.reshape(shape_of(nodes[v])) for v, x in inputs.items()}

    def value(v):
        node = nodes[v]
        if v in values:
            return values[v]
        name = op_name(node["op"])
        if name == "const":
            return np.float64(node["op"]["const"])
        if name == "reshape":
            return value(node["args"][0]).reshape(shape_of(node))
        if name == "stop_gradient":
            return value(node["args"][0])
        raise KeyError(f"value %{v} ({name}) is not available")

    sig = lambda x: 1.0 / (1.0 + xp.exp(-x))
    rms_norm = lambda x, w, eps: x / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w
    softmax = lambda x: (lambda e: e / e.sum(axis=-1, keepdims=True))(xp.exp(x - x.max(axis=-1, keepdims=True)))
    rows = lambda x: x.reshape(-1, x.shape[-1])
    # The parts of a fused op's tuple, by the `get` nodes that read them.
    gets = {(n["args"][0], n["op"]["get"]): i for i, n in enumerate(nodes) if op_name(n["op"]) == "get"}
    for v in sorted(kernel["nodes"]):  # in the function's order (read-through slices follow their op)
        node = nodes[v]
        name, at, shape = op_name(node["op"]), attrs(node), shape_of(node)
        a = [value(x) for x in node["args"]]
        if name == "neg": r = -a[0]
        elif name == "exp": r = xp.exp(a[0])
        elif name == "log": r = xp.log(a[0])
        elif name == "sigmoid": r = sig(a[0])
        elif name == "silu": r = a[0] * sig(a[0])
        elif name == "swi_glu": r = a[0] * sig(a[0]) * a[1]
        elif name == "rsqrt": r = 1.0 / xp.sqrt(a[0])
        elif name == "sqrt": r = xp.sqrt(a[0])
        elif name == "square": r = a[0] * a[0]
        elif name == "sign": r = xp.sign(a[0])
        elif name == "add": r = a[0] + a[1]
        elif name == "sub": r = a[0] - a[1]
        elif name == "mul": r = a[0] * a[1]
        elif name == "div": r = a[0] / a[1]
        elif name == "maximum": r = xp.maximum(a[0], a[1])
        elif name == "stop_gradient": r = a[0]
        elif name == "cast": r = bf16(a[0]) if node["op"]["cast"] == "bf16" else a[0]
        elif name == "rms_norm":
            x = a[0]
            r = x / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + at["eps"]) * a[1]
        elif name == "softmax": r = softmax(a[0])
        elif name == "masked_softmax": r = softmax(a[0] * at["scale"] + a[1])
        elif name == "softmax_grad":
            y = softmax(a[0])
            r = y * (a[1] - (a[1] * y).sum(axis=-1, keepdims=True))
        elif name in ("cross_entropy", "cross_entropy_grad"):
            x, labels = a[0], a[1]
            onehot = (xp.arange(x.shape[-1]) == labels).astype(xp.float64)
            if name == "cross_entropy":
                m = x.max(axis=-1, keepdims=True)
                z = xp.exp(x - m).sum(axis=-1, keepdims=True)
                r = (xp.log(z) + m - (x * onehot).sum(axis=-1, keepdims=True), m, z)
            else:
                # The row max and sum are the forward's, inputs here (random, as any input).
                g, m, z = a[2], a[3], a[4]
                r = g / z * xp.exp(x - m) - g * onehot
        elif name == "add_rms_norm":
            x = a[0] + a[1]
            r = (x, rms_norm(x, a[2], at["eps"]))
        elif name == "rms_norm_grad":
            x, w, g = a[0], a[1], a[2]
            inv = 1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + at["eps"])
            dx = g * w * inv - x * inv**3 / x.shape[-1] * (g * w * x).sum(axis=-1, keepdims=True)
            r = (dx + a[3] if len(a) == 4 else dx, rows(g * x * inv).sum(axis=0))
        elif name == "swi_glu_grad":
            s_ = sig(a[0])
            r = (a[2] * a[1] * s_ * (1 + a[0] * (1 - s_)), a[2] * a[0] * s_)
        elif name == "rms_norm_quantize": r = quantized(rows(rms_norm(a[0], a[1], at["eps"])), 1, at["cols"])
        elif name == "swi_glu_quantize": r = quantized(rows(a[0] * sig(a[0]) * a[1]), 1, at["cols"])
        elif name == "permute_quantize":
            x = a[0][a[1] // at["k"]] * (a[2].reshape(-1)[a[1]][:, None] if at.get("gated") else 1)
            r = quantized(x, 1, at["cols"])
        elif name == "quantize":
            x = xp.swapaxes(a[0], -1, -2) if at["transpose"] else a[0]
            x = x.reshape(-1, x.shape[-1])
            x = xp.pad(x, ((0, 0), (0, shape[-1] - x.shape[1])))  # K padded to whole groups
            r = quantized(x, at["rows"], at["cols"]).reshape(shape)
        elif name == "quantize_by_expert":
            d, capacity = shape
            source = at.get("rows", "stored")
            if source == "swi_glu": x = a[0] * sig(a[0]) * a[2]
            elif source == "stored": x = a[0]
            elif "permuted" in source: x = a[0][a[2] // source["permuted"]["k"]]
            else: x = a[0][a[2] // source["unpermuted_grad"]["k"]] * a[3].reshape(-1)[a[2]][:, None]
            padded, start = xp.zeros((d, capacity)), 0
            for e in range(at["experts"]):
                o0, o1 = int(a[1][e]), int(a[1][e + 1])
                padded[:, start:start + o1 - o0] = x[o0:o1].T
                start += -(-(o1 - o0) // at["tile"]) * at["tile"]
            r = quantized(padded, 1, at["tile"])
        elif name == "route": r = route(a[0], a[1], **at)
        elif name == "rope_concat":
            nope, pe, cos, sin = a
            half = pe.shape[-1] // 2
            x = xp.concatenate([pe[..., 0::2], pe[..., 1::2]], axis=-1)
            rot = xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
            rope = xp.broadcast_to(x * cos + rot * sin, nope.shape[:-1] + (pe.shape[-1],))
            r = xp.concatenate([nope, rope], axis=-1)
        elif name == "broadcast_to": r = xp.broadcast_to(xp.asarray(a[0]), shape)
        elif name == "transpose": r = xp.transpose(a[0], node["op"]["transpose"])
        elif name == "slice": r = xp.take(a[0], xp.arange(at["start"], at["end"]), axis=at["axis"])
        elif name == "pad_slice":
            r = xp.zeros(shape)
            index = [slice(None)] * len(shape)
            index[at["axis"]] = slice(at["start"], at["start"] + a[0].shape[at["axis"]])
            r[tuple(index)] = a[0]
        elif name == "concat": r = xp.concatenate(a, axis=at["axis"])
        elif name == "sum": r = a[0].sum(axis=at["axis"], keepdims=at["keep"])
        elif name == "max": r = a[0].max(axis=at["axis"], keepdims=at["keep"])
        elif name == "sum_to":
            x, target = a[0], node["op"]["sum_to"]
            x = x.sum(axis=tuple(range(x.ndim - len(target)))) if x.ndim > len(target) else x
            r = x.sum(axis=tuple(i for i, d in enumerate(target) if d == 1 and x.shape[i] != 1), keepdims=True)
        elif name == "gather": r = a[0][a[1]]
        elif name == "take_along": r = xp.take_along_axis(a[0], a[1], axis=-1)
        elif name == "put_along":
            idx, g = a[0].reshape(-1, a[0].shape[-1]), a[1].reshape(-1, a[0].shape[-1])
            r = xp.zeros((idx.shape[0], at["n"]))
            cupyx.scatter_add(r, (xp.arange(idx.shape[0])[:, None], idx), g)
        elif name == "top_k": r = xp.argsort(-a[0], axis=-1, kind="stable")[..., : at["k"]]
        elif name == "count":
            idx = a[0].reshape(-1, a[0].shape[-1])
            r = (idx[:, :, None] == xp.arange(at["bins"])[None, None, :]).sum(axis=1).astype(xp.float64)
        elif name == "sort_by_expert": r = xp.argsort(a[0].reshape(-1), kind="stable")
        elif name == "expert_offsets":
            counts = xp.bincount(a[0].reshape(-1), minlength=at["experts"])
            r = xp.concatenate([xp.zeros(1, dtype=counts.dtype), xp.cumsum(counts)])
        elif name == "permute": r = a[0][a[1] // at["k"]]
        elif name == "invert_order":
            r = xp.empty_like(a[0])
            r[a[0]] = xp.arange(a[0].size)
        elif name == "permute_grad":
            # Row t gathers its k rows through the inverse permutation.
            r = a[0][a[1]].reshape(shape[0], at["k"], -1).sum(axis=1)
        elif name == "unpermute":
            ys, positions, gates = a
            r = (gates.reshape(shape[0], at["k"], 1) * ys[positions].reshape(shape[0], at["k"], -1)).sum(axis=1)
        elif name == "unpermute_grad_rows":
            g, order, gates = a
            r = gates.reshape(-1)[order][:, None] * g[order // at["k"]]
        elif name == "unpermute_grad_gates":
            g, ys, order = a
            r = xp.zeros(math.prod(shape))
            r[order] = (g[order // at["k"]] * ys).sum(axis=1)
            r = r.reshape(shape)
        elif name == "scatter_rows":
            ids, g = a
            r = xp.zeros(shape)
            cupyx.scatter_add(r, ids.reshape(-1), g.reshape(-1, shape[-1]))
        else:
            raise ValueError(f"no reference for {name}")
        if isinstance(r, tuple):
            for i, part in enumerate(r):
                if (v, i) in gets:
                    values[gets[(v, i)]] = part.reshape(shape_of(nodes[gets[(v, i)]]))
        else:
            values[v] = xp.broadcast_to(xp.asarray(r), shape).copy()
    return {v: x.reshape(-1) for v, x in values.items()}


def e4m3(v):
    """Round to the nearest E4M3 value (ties to even), saturating at 448."""
    a = xp.abs(v)
    step = 2.0 ** (xp.maximum(xp.floor(xp.log2(xp.maximum(a, 2.0**-10))), -6) - 3)
    return xp.sign(v) * xp.minimum(xp.rint(a / step) * step, 448.0)


def quantized(x, rows, cols):
    """x [m, n] quantised in rows x cols groups as DeepSeek-V3 does (scale = amax / 448 in f32,
    1 where 0; elements the E4M3 value nearest the f32 product with the scale's f32 reciprocal),
    dequantised."""
    m, n = x.shape
    gm, gn = -(-m // rows), -(-n // cols)
    padded = xp.zeros((gm * rows, gn * cols))
    padded[:m, :n] = xp.abs(x)
    scale = (padded.reshape(gm, rows, gn, cols).max(axis=(1, 3)) / 448).astype(xp.float32).astype(xp.float64)
    scale[scale == 0] = 1
    full = xp.repeat(xp.repeat(scale, rows, axis=0), cols, axis=1)[:m, :n]
    inverse = (1 / full).astype(xp.float32).astype(xp.float64)
    return e4m3((x * inverse).astype(xp.float32).astype(xp.float64)) * full


def route(scores, bias, groups, keep, k, scale):
    """DeepSeek-V3's routing: (chosen experts, gates) per token."""
    t, e = scores.shape
    biased = scores + bias
    best_two = -xp.sort(-biased.reshape(t, groups, e // groups), axis=-1)[..., :2]
    group_scores = best_two[..., 0] + best_two[..., 1]
    kept = xp.zeros((t, groups))
    xp.put_along_axis(kept, xp.argsort(-group_scores, axis=-1, kind="stable")[:, :keep], 1.0, axis=-1)
    candidates = biased - (1 - xp.repeat(kept, e // groups, axis=1)) * 1e30
    chosen = xp.argsort(-candidates, axis=-1, kind="stable")[:, :k]
    picked = xp.take_along_axis(scores, chosen, axis=-1)
    return chosen, picked / picked.sum(axis=-1, keepdims=True) * scale


def fp8_tiling(node):
    at = attrs(node)
    name = op_name(node["op"])
    return (at["rows"], at["cols"]) if name == "quantize" else (1, at["tile"] if name == "quantize_by_expert" else at["cols"])


def fp8_layout(node):
    """An FP8 value's buffer: E4M3 bytes of [m, n], then from a 16-byte boundary one f32 scale
    per group: M-major for one-row groups, row-major over taller groups with each row padded to
    4 scales (compiler/src/mlir/fp8.rs)."""
    n = node["shape"][-1]
    m = math.prod(node["shape"]) // n
    rows, cols = fp8_tiling(node)
    gm, gn = -(-m // rows), -(-n // cols)
    offset = -(-(m * n) // 16) * 16
    return m, n, rows, cols, gm, gn, offset, offset + 4 * gm * (gn if rows == 1 else -(-gn // 4) * 4)


E4M3 = np.array([
    float("nan") if (b & 0x7F) == 0x7F else (-1) ** (b >> 7) * (
        (b & 7) / 8 * 2.0**-6 if (b >> 3) & 15 == 0 else (1 + (b & 7) / 8) * 2.0 ** (((b >> 3) & 15) - 7))
    for b in range(256)])


def dequantize(buffer, node):
    """The GPU's FP8 buffer as the float64 values it stands for."""
    m, n, rows, cols, gm, gn, offset, end = fp8_layout(node)
    values = xp.asarray(E4M3)[buffer[: m * n].astype(xp.int64)].reshape(m, n)
    scales = buffer[offset:end].view(xp.float32).astype(xp.float64)
    scales = scales.reshape(gn, gm).T if rows == 1 else scales.reshape(gm, -1)[:, :gn]
    return (values * xp.repeat(xp.repeat(scales, rows, axis=0), cols, axis=1)[:m, :n]).reshape(-1)


def shape_of(node):
    return tuple(node["shape"]) or (1,)


def index_input(function, kernel, v):
    """Valid random values for index input %v, from how the kernel's ops read it: positions
    into a table or a row, experts, or a permutation of rows. Layout ops (slices of the token
    ids, reshapes) pass it on; values nothing bounds are below 1000."""
    nodes = function["nodes"]

    def base(x):
        while op_name(nodes[x]["op"]) in ("reshape", "stop_gradient"):
            x = nodes[x]["args"][0]
        return x

    size = math.prod(shape_of(nodes[v]))
    bounds, distinct = [1000], False
    for n in kernel["nodes"]:
        node = nodes[n]
        name, at = op_name(node["op"]), attrs(node)
        if v not in [base(x) for x in node["args"]]:
            continue
        if name in ("permute", "permute_grad", "unpermute", "unpermute_grad_rows", "unpermute_grad_gates", "permute_quantize", "invert_order"):
            return xp.random.permutation(size)
        if name == "quantize_by_expert" and base(node["args"][1]) != v:
            return xp.random.permutation(size)  # a permutation's order, read through
        if name == "quantize_by_expert":
            # Expert offsets over the rows: sorted, from 0 to all of them, some experts empty.
            permuted = isinstance(at.get("rows"), dict)
            rows = nodes[node["args"][2 if permuted else 0]]["shape"][0]
            inner = xp.sort(xp.random.randint(0, rows + 1, size - 2))
            return xp.concatenate([xp.zeros(1, dtype=inner.dtype), inner, xp.full(1, rows, dtype=inner.dtype)])
        shape = lambda i: nodes[node["args"][i]]["shape"]
        bound = {
            "gather": lambda: shape(0)[0],
            "take_along": lambda: shape(0)[-1],
            "cross_entropy": lambda: shape(0)[-1],
            "cross_entropy_grad": lambda: shape(0)[-1],
            "put_along": lambda: at["n"],
            "count": lambda: at["bins"],
            "sort_by_expert": lambda: at["experts"],
            "expert_offsets": lambda: at["experts"],
            "scatter_rows": lambda: at["rows"],
        }.get(name)
        if bound:
            bounds.append(bound())
        if name in ("put_along", "take_along"):
            # Distinct positions per row of the index as the op reads it, as top-k gives them.
            distinct = nodes[next(x for x in node["args"] if base(x) == v)]["shape"][-1]
    bound = min(bounds)
    if distinct:
        k = distinct
        return xp.argsort(xp.random.random((size // k, bound)), axis=1)[:, :k].reshape(-1)
    return xp.random.randint(0, bound, size)


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
    # --only OP,OP: the kernels whose first op is one of these.
    only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
    plan = json.load(open(f"{plan_dir}/plan.json"))
    xp.random.seed(0)
    copy_bw = copy_bandwidth()
    print(f"device copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
    results, failures = [], 0
    for function, pf in zip(plan["module"]["functions"], plan["functions"]):
        for k in pf["kernels"]:
            code = k["code"]
            if code["kind"] != "generated" or (only and k["ops"][0] not in only):
                continue
            nodes = function["nodes"]
            size = lambda v: max(1, math.prod(nodes[v]["shape"]))
            is_index = lambda v: nodes[v]["dtype"] == "i32"
            packed = set(pf["packed"])  # stored as bf16 (dsc's `fuse::kernels::packed_bf16`)
            # Positive inputs keep log, sqrt and rsqrt in their domain; packed ones are bf16.
            try:
                host = {v: index_input(function, k, v) if is_index(v) else xp.random.uniform(0.5, 1.5, size(v)) for v in k["inputs"]}
                host.update({v: bf16(host[v]) for v in k["inputs"] if v in packed})
                ref = reference(function, k, host)
            except (ValueError, KeyError, IndexError, TypeError) as e:
                failures += 1
                print(f"FAIL {k['name']:<40} no reference: {e}")
                continue
            dev = {v: bf16_bits(host[v]) if v in packed else host[v].astype(cp.int32 if is_index(v) else cp.float32) for v in k["inputs"]}
            # The values the kernel writes: its arguments after its inputs (a fused op's
            # tuple is written as its parts).
            outputs = [v for v in code["args"] if v not in k["inputs"]]
            is_fp8 = lambda v: nodes[v]["dtype"] == "f8e4m3"
            for v in outputs:
                if is_fp8(v):
                    dev[v] = cp.full(fp8_layout(nodes[v])[-1], 0xFF, dtype=cp.uint8)
                elif is_index(v):
                    dev[v] = cp.full(size(v), -(2**31), dtype=cp.int32)
                elif v in packed:
                    dev[v] = cp.full(size(v), 0x7FC0, dtype=cp.uint16)  # NaN
                else:
                    dev[v] = cp.full(size(v), cp.nan, dtype=cp.float32)
                if code.get("zeroed"):
                    dev[v][...] = 0
            module = cp.RawModule(path=f"{plan_dir}/kernels/{k['name']}.ptx")
            kern = module.get_function(k["name"])
            args = []
            for v in code["args"]:
                a = dev[v]
                args += [a, a, np.int64(0), np.int64(a.size), np.int64(1)]
            grid, block = (code["grid"],), (code["block"],)
            kern(grid, block, tuple(args))
            cp.cuda.runtime.deviceSynchronize()
            # Per output: its error and DESIGN.md's bound for it.
            checks = []
            for v in outputs:
                got = dequantize(dev[v], nodes[v]) if is_fp8(v) else from_bf16_bits(dev[v]) if v in packed else dev[v].astype(xp.float64)
                want = ref[v].astype(xp.float64)
                if is_index(v):
                    # Positions must be exact: the fraction that differ.
                    checks.append((float(xp.mean(got != want)) if got.size else 0.0, 0.0))
                    continue
                finite = bool(xp.all(xp.isfinite(got)))
                err = float(xp.linalg.norm(got - want) / max(float(xp.linalg.norm(want)), 1e-30)) if finite else float("inf")
                checks.append((err, 1e-3 if is_fp8(v) else 1e-2 if "cast" in k["ops"] else 1e-5))
            err, bound = max(checks, key=lambda c: c[0] - c[1])
            ok = all(e <= b for e, b in checks)
            failures += not ok
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            kern(grid, block, tuple(args))
            end.record()
            end.synchronize()
            once = cp.cuda.get_elapsed_time(start, end) / 1e3
            # 20 launches x 10 runs, fewer for slow kernels (about 50 ms per kernel at most).
            launches, runs = (20, 10) if once < 2.5e-4 else (2, 3)
            times = []
            for _ in range(runs):
                start.record()
                for _ in range(launches):
                    kern(grid, block, tuple(args))
                end.record()
                end.synchronize()
                times.append(cp.cuda.get_elapsed_time(start, end) / 1e3 / launches)
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
