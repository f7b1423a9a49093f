#!/usr/bin/env python3
"""Issue 5's benchmark table in one device call: the bench model trained by dsc under the FP8
policy, by dsc under the FP8 policy launching every kernel from the host (`--no-cuda-graphs`:
what the step's CUDA graphs save), by dsc under the BF16 policy, and by plain PyTorch
(benches/torch_bench.py, BF16 autocast, torch.compile), one after the other on the same GPU.

For each: tokens/s (median of the steps after the warm-up), model TFLOP/s and MFU against the
BF16 dense peak (FLOPs per token as torch_bench.py counts them: 6 x active parameters + causal
attention, the same figure for all three), and peak GPU memory (nvidia-smi's used memory,
sampled every 0.2 s, minus what was used before the run: the same measure for all three).
Ratios are against PyTorch measured in the same call. With both dsc runs, it also prints the
relative gap between their mean losses over the last 10 steps (same data and seed).

With --keep DIR each dsc run's metrics (JSONL, one line per step) stay in DIR as
dsc-fp8.jsonl, dsc-fp8-no-cuda-graphs.jsonl and dsc-bf16.jsonl, and each run's loss and expert load (max/mean) over its first
and last 10 steps are printed. Runs too long for one call (300 steps of both policies) take two:
the table with the FP8 run, then the BF16 run alone (the same `dsc train` line as below), and
`--gap FP8.jsonl BF16.jsonl [BF16-OTHER-SEED.jsonl]` prints the gap from the files (and, with
the third, the gap between two BF16 runs from different seeds: the noise floor).

Usage (GPU machine, repository root; plans compiled with the same --set values as below):
  python3 benches/bench_model.py --dsc target/gpu/dsc --fp8-plan target/plan-bench \\
      [--bf16-plan target/plan-bench-bf16] [--steps 20] [--torch-steps 15] [--no-compile] [--keep DIR]
  python3 benches/bench_model.py --gap FP8.jsonl BF16.jsonl
"""
import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

SPEC = "models/deepseek-v3-bench.dsc"
DATA = ["--set", "train.data.sources=[synthetic { weight = 1 }]", "--set", "train.data.fim_rate=0"]
BF16 = ["--set", "precision.gemm=bf16"]  # as tests/device/build.sh compiles target/plan-bench-bf16
WARMUP_STEPS = 3
BF16_PEAK = 989e12  # H100 and H200 SXM, dense


def used_mib():
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
        capture_output=True, text=True, check=True,
    )
    return int(out.stdout.split()[0])


def sampled(command):
    """Runs `command`; returns (its completed process, peak GPU MiB above the start)."""
    base, peak, done = used_mib(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], used_mib())
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        proc = subprocess.run(command, capture_output=True, text=True)
    finally:
        done.set()
        sampler.join()
    return proc, max(peak[0] - base, 0)


def read_metrics(path):
    return [json.loads(line) for line in open(path)]


def summary(name, rows):
    """The loss and the expert load (max over experts / mean, worst layer) at both ends of a run."""
    def mean(key, part):
        return statistics.mean(r[key] for r in part)
    for label, part in [("first", rows[:10]), ("last", rows[-10:])]:
        print(f"{name}: {label} {len(part)} steps: loss {mean('loss', part):.4f}, expert load max/mean "
              f"{mean('expert_load_max', part):.2f} (worst layer), {mean('expert_load_mean', part):.2f} (layer mean)")
    bad = [r["step"] for r in rows if r.get("skipped") or not all(map(math.isfinite, (r["loss"], r["grad_norm"])))]
    print(f"{name}: {len(rows)} steps, {len(bad)} skipped or not finite {bad[:10]}")


def gap(fp8, bf16, other_seed=None):
    """The relative gap of the mean losses over the last 10 steps all runs have (the shortest
    run's); with a BF16 run from another seed, the same gap between the two BF16 runs: how far
    runs differ without FP8."""
    runs = [r for r in (fp8, bf16, other_seed) if r is not None]
    end = min(map(len, runs))
    last = min(10, end)
    a, b, *c = (statistics.mean(r["loss"] for r in run[end - last:end]) for run in runs)
    print(f"FP8 vs BF16 mean loss over steps {end - last + 1}-{end}: {a:.5f} vs {b:.5f}, "
          f"relative gap {(a - b) / b:+.3%}")
    if c:
        print(f"BF16 from another seed vs BF16: {c[0]:.5f} vs {b:.5f}, relative gap {(c[0] - b) / b:+.3%} "
              "(the noise floor)")


def measured(name, command, metrics):
    """Runs a dsc training `command` writing `metrics`: its rows, median tokens/s after the
    warm-up and peak GPU memory (None, with its stderr printed, where it failed)."""
    proc, peak = sampled(command)
    if proc.returncode != 0:
        print(f"{name}: dsc failed ({proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    rows = read_metrics(metrics)
    summary(name, rows)
    timed = [r["tokens_per_s"] for r in rows[WARMUP_STEPS:]] or [r["tokens_per_s"] for r in rows]
    return {"impl": name, "tokens_per_s": statistics.median(timed), "peak_gib": peak / 1024, "rows": rows}


def dsc_run(dsc, plan, steps, name, keep, sets=(), flags=()):
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(keep or tmp, re.sub(r"[^a-z0-9]+", "-", name.lower()) + ".jsonl")
        command = [dsc, "train", SPEC, *DATA, *sets, "--plan", plan, "--backend", "cuda", "--steps", str(steps),
                   "--metrics", metrics, *flags]
        return measured(name, command, metrics)


def torch_run(steps, compile_):
    here = os.path.dirname(os.path.abspath(__file__))
    command = [sys.executable, os.path.join(here, "torch_bench.py"), "--steps", str(steps)]
    if not compile_:
        command.append("--no-compile")
    proc, peak = sampled(command)
    if proc.returncode != 0:
        print(f"pytorch failed ({proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    flops_per_token = result["model_tflops"] * 1e12 / result["tokens_per_s"]
    name = "pytorch bf16, torch.compile" if compile_ else "pytorch bf16, eager"
    return {"impl": name, "tokens_per_s": result["tokens_per_s"], "peak_gib": peak / 1024}, flops_per_token


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gap", nargs="+", metavar="JSONL",
                    help="FP8.jsonl BF16.jsonl [BF16-other-seed.jsonl]: the loss gap from kept metrics")
    ap.add_argument("--dsc")
    ap.add_argument("--fp8-plan")
    ap.add_argument("--bf16-plan")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--torch-steps", type=int, default=15)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--keep", help="a folder to keep each dsc run's metrics in")
    args = ap.parse_args()
    if args.gap:
        if len(args.gap) not in (2, 3):
            ap.error("--gap takes FP8.jsonl BF16.jsonl and optionally a BF16 run from another seed")
        gap(*map(read_metrics, args.gap))
        return
    if not (args.dsc and args.fp8_plan):
        ap.error("--dsc and --fp8-plan are needed for the table")

    fp8 = dsc_run(args.dsc, args.fp8_plan, args.steps, "dsc fp8", args.keep)
    eager = dsc_run(args.dsc, args.fp8_plan, args.steps, "dsc fp8, no CUDA graphs", args.keep,
                    flags=["--no-cuda-graphs"])
    bf16 = dsc_run(args.dsc, args.bf16_plan, args.steps, "dsc bf16", args.keep, BF16) if args.bf16_plan else None
    rows = [fp8, eager, bf16]
    torch = torch_run(args.torch_steps, not args.no_compile)
    if torch is None:
        sys.exit("no PyTorch baseline, so no table")
    baseline, flops_per_token = torch
    rows.append(baseline)

    print("| implementation | tokens/s | model TFLOP/s | MFU (BF16 dense) | peak GPU memory | vs PyTorch |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if row is None:
            continue
        tflops = row["tokens_per_s"] * flops_per_token / 1e12
        print(f"| {row['impl']} | {row['tokens_per_s']:,.0f} | {tflops:.0f} | {tflops * 1e12 / BF16_PEAK:.1%} "
              f"| {row['peak_gib']:.1f} GiB | {row['tokens_per_s'] / baseline['tokens_per_s']:.2f}x |")
    if fp8 and bf16:
        gap(fp8["rows"], bf16["rows"])


if __name__ == "__main__":
    main()
