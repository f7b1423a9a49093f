#!/usr/bin/env python3
"""Issue 9's table from the JSON lines of `benches/fp8_gemm.py --generated` (run.sh gemm keeps
them in $OUT/gemm.jsonl): per dense shape, cuBLASLt's TFLOP/s with BF16 and f32 output, each
generated kernel's, the fastest kernel and its ratio to cuBLASLt (f32 output, as the generated
kernel writes, and cuBLASLt's faster output), the medians of those ratios; then the grouped
shapes. A generated result whose error check failed ("ok": false) is shown as "wrong" and
never chosen.

Usage: python3 benches/gemm_table.py benches/results/fp8-gemm-generated-tma.jsonl
"""
import json
import statistics
import sys


def tile(label):
    """`fp8_gemm_m128_n192_s4_c2` -> `128×192, 4 st., ×2`; a folder before the name (`main/fp8_…`:
    builds timed together) stays before it (`main: 128×192, 4 st., ×2`)."""
    folder, _, name = label.rpartition("/")
    fields = dict((part[0], part[1:]) for part in name.split("_")[2:])
    text = f"{fields['m']}×{fields['n']}, {fields['s']} st."
    text += f", ×{fields['c']}" if "c" in fields else ""
    return f"{folder}: {text}" if folder else text


def generated(label):
    """Whether a result is a generated kernel's (`fp8_…`, perhaps after its folder)."""
    return label.rpartition("/")[2].startswith("fp8_")


def main(path):
    rows = [json.loads(line) for line in open(path) if line.startswith("{")]
    dense = [r for r in rows if "experts" not in r and "n" in r and "k" in r]
    shapes = list(dict.fromkeys((r["n"], r["k"]) for r in dense))
    kernels = list(dict.fromkeys(r["impl"] for r in dense if generated(r["impl"])))
    print("| N, K | cuBLASLt BF16 out | cuBLASLt f32 out | " + " | ".join(map(tile, kernels))
          + " | fastest | / cuBLASLt f32 out | / cuBLASLt faster |")
    print("|" + "---|" * (6 + len(kernels)))
    to_f32, to_best = [], []
    for n, k in shapes:
        here = [r for r in dense if (r["n"], r["k"]) == (n, k)]
        library = {r["out"]: r["tflops"] for r in here if r["impl"] == "torch scaled_mm" and "tflops" in r}
        ours = {r["impl"]: r for r in here if generated(r["impl"])}
        cells = [("wrong" if not ours[x]["ok"] else f"{ours[x]['tflops']:,}") if x in ours else "–" for x in kernels]
        right = {x: r["tflops"] for x, r in ours.items() if r["ok"]}
        bf16, f32 = library.get("torch.bfloat16"), library.get("torch.float32")
        if right and f32:
            best = max(right, key=right.get)
            to_f32.append(right[best] / f32)
            to_best.append(right[best] / max(bf16 or 0, f32))
            summary = [tile(best), f"{to_f32[-1]:.2f}×", f"{to_best[-1]:.2f}×"]
        else:
            summary = ["–"] * 3
        library_cells = [f"{x:,}" if x else "–" for x in (bf16, f32)]
        print(f"| {n}, {k} | " + " | ".join(library_cells + cells + summary) + " |")
    if to_f32:
        print(f"\nmedian ratio: {statistics.median(to_f32):.2f}× cuBLASLt with f32 output, "
              f"{statistics.median(to_best):.2f}× its faster output")
    grouped = [r for r in rows if "experts" in r and "tflops" in r]
    if grouped:
        print("\n| grouped (M, N, K, experts) | kernel | TFLOP/s | right |")
        print("|---|---|---|---|")
        for r in grouped:
            name = tile(r["impl"]) if generated(r["impl"]) else r["impl"]
            print(f"| {r['m']}, {r['n']}, {r['k']}, {r['experts']} | {name} | {r['tflops']:,} | "
                  f"{'yes' if r.get('ok', True) else 'no'} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
