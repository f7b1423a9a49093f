#!/usr/bin/env python3
"""Issue 8's data-parallel run in one device call: the bench model trained by dsc on one GPU,
then on G GPUs as G data-parallel processes with ZeRO-1 (torchrun starting the runtime-only
dsc; the plan compiled for G processes), the same global batch, data and seed.

Prints, per step, both losses and their relative difference (the G processes sum the same
micro-batches' gradients in another order, and FP8 rounding makes such differences grow), the
largest difference, the median tokens/s of each after the warm-up, the scaling (G GPUs'
tokens/s over one GPU's: the issue's goal is at least 1.8 on two) and GPU 0's peak memory in
each run.

Usage (GPU machine, repository root; tests/device/build.sh compiled both plans):
  python3 benches/data_parallel.py --dsc target/gpu/dsc --plan target/plan-bench \\
      --dp-plan target/plan-bench-dp2 --gpus 2 --steps 20 [--keep DIR]
"""
import argparse
import os
import sys
import tempfile

from bench_model import DATA, SPEC, measured


def processes(gpus):
    """The --set values of a plan of `gpus` data-parallel processes (as build.sh compiles it)."""
    return ["--set", f"parallel.gpus_per_node={gpus}", "--set", f"parallel.data.size={gpus}"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsc", required=True)
    ap.add_argument("--plan", required=True, help="the bench plan for one GPU")
    ap.add_argument("--dp-plan", required=True, help="the bench plan for --gpus processes")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--keep", help="a folder to keep both runs' metrics in")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or tmp
        one_metrics = os.path.join(folder, "dp-1.jsonl")
        many_metrics = os.path.join(folder, f"dp-{args.gpus}.jsonl")
        train = ["train", SPEC, *DATA, "--steps", str(args.steps)]
        one = measured("1 GPU", [args.dsc, *train, "--plan", args.plan, "--backend", "cuda", "--metrics", one_metrics],
                  one_metrics)
        torchrun = ["torchrun", "--standalone", f"--nproc-per-node={args.gpus}", "--no-python", args.dsc]
        many = measured(f"{args.gpus} GPUs", [*torchrun, *train, *processes(args.gpus), "--plan", args.dp_plan,
                                         "--metrics", many_metrics], many_metrics)
    if one is None or many is None:
        sys.exit(1)
    worst = 0.0
    for a, b in zip(one["rows"], many["rows"]):
        difference = abs(b["loss"] - a["loss"]) / abs(a["loss"])
        worst = max(worst, difference)
        print(f"step {a['step']}: loss 1 GPU {a['loss']:.5f}, {args.gpus} GPUs {b['loss']:.5f} ({difference:.2e})")
    print(f"largest relative loss difference: {worst:.2e}")
    scaling = many["tokens_per_s"] / one["tokens_per_s"]
    print(f"tokens/s: 1 GPU {one['tokens_per_s']:,.0f}, {args.gpus} GPUs {many['tokens_per_s']:,.0f}: "
          f"scaling {scaling:.2f}x on {args.gpus} (ideal {args.gpus})")
    print(f"GPU 0 peak memory: 1 GPU {one['peak_gib']:.1f} GiB, {args.gpus} GPUs {many['peak_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
