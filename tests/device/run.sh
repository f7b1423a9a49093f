#!/usr/bin/env bash
# dsc's GPU checks and measurements, on the GPU machine from the repository root, with what
# tests/device/build.sh built here. Stages run in the order given, each stage name followed
# by its N where it takes one (`run.sh checks step profile`: the first thing to run after
# changing the backend, about 8 minutes of one call; device time is counted):
#   checks    the GPU test suites (every kernel kind against the CPU reference; the bench
#             plan's FP8 and grouped FP8 GEMMs; training steps of the tiny plans against the
#             CPU; a cut-down bench plan's steps from CUDA graphs against its kernels launched
#             one by one; gpu_kernels' whole output in $OUT/gpu-kernels.txt) and every generated
#             kernel of the bench plan against float64 (CuPy)
#   step      that plan's attention and backward on the fused kernels against float64, and
#             one step of a bench-shaped plan on the GPU against two CPU steps (about 4
#             minutes of a call on its own: the CPU's are 415M-parameter FP8 steps)
#   profile   the bench model trained 6 steps with `--profile`: where the GPU's time goes
#             (the report also in $OUT/profile.txt)
#   tune      `dsc tune target/plan-bench`: its expert GEMMs on every tile it carries and on
#             cuBLASLt, the fastest recorded in target/plan-bench/tuning.json (copied to $OUT),
#             which the stages after it train with (`profile tune profile`: before and after)
#   quick     for little device time (about 2 minutes): the tiny plans' GPU tests (every
#             kernel against the CPU, whole functions and training steps) and the bench model
#             4 steps with `--profile`
#   table N   issue 5's table: dsc FP8 (with CUDA graphs, and without), dsc BF16 and PyTorch,
#             N steps each (default 20; benches/bench_model.py), each dsc run's metrics in $OUT
#   long N    the same without BF16, for a run too long to take both policies in one call
#             (N = 300 takes most of a call)
#   fp8 N, bf16 N   one policy's run alone, its metrics in $OUT/dsc-fp8.jsonl or
#             $OUT/dsc-bf16.jsonl (`fp8 300 bf16 300` fit one call; the gap: run
#             `benches/bench_model.py --gap dsc-fp8.jsonl dsc-bf16.jsonl` on the two files);
#             with SEED=S in the environment, from seed S (initialisation and data order) into
#             dsc-bf16-seedS.jsonl: a third file for `--gap`, the gap's noise floor
#   gemm      the generated FP8 GEMMs (target/gemm/*.ptx) checked against float64 and timed
#             beside cuBLASLt (benches/fp8_gemm.py --generated; under a minute), the results
#             also in $OUT/gemm.jsonl, then issue 9's table of them (benches/gemm_table.py); with
#             GEMM="DIR ...", every folder's kernels (e.g. a branch's PTX beside main's), timed
#             together in turns, those of the same name told apart by their folder's
#   attention the generated fused attention on packed BF16 inputs (target/attention/*bf16_*.ptx:
#             the plans' kernels) checked against float64 and timed beside PyTorch's SDPA, every
#             backend it has (benches/attention.py; a few minutes a folder), the results also
#             in $OUT/attention.jsonl; with ATTENTION="DIR ..." in the environment, each folder's
#             kernels in turn (e.g. a branch's PTX beside main's, written by kernel_ptx), the
#             results in $OUT/<folder's name>.jsonl; with ATTENTION_F32=1, the kernels on f32
#             inputs too (a test policy's, timed as long again: session 37's three folders of
#             both forms took most of a call); each folder within ATTENTION_TIMEOUT seconds
#             (default 300: a kernel that hangs fails its folder, not the call)
#   train N   the bench model trained to step N with checkpoints in target/run-bench, resuming
#             from there (so a long run takes several calls)
#   ncu N     Nsight Compute's counters (speed of light, pipes, memory, warp stalls, where the
#             warps stall most) for the first N launches (default 1) of the kernels whose names
#             match the regex $KERNELS, in `dsc tune target/plan-bench` (the generated GEMMs);
#             with RUN=train, in the bench model's first step; with RUN=gemm, in
#             benches/fp8_gemm.py --profile $SHAPE (default 7168,16384: cuBLASLt's product and
#             target/gemm's kernels on issue 9's shape); with RUN=attention, in benches/attention.py
#             --profile $SHAPE (S,H; default 4096,16: target/attention's packed forward and
#             backward passes and cuDNN SDPA's): $OUT/ncu-$NAME.txt (NAME defaults to RUN),
#             and each SASS instruction's executions and warp stall samples in $OUT/ncu-$NAME-sass.csv
#   dp N      issue 8's data parallelism: the bench model N steps (default 20) on one GPU, then
#             on two as two processes with ZeRO-1 (torchrun), the same global batch: losses
#             side by side, the scaling of tokens/s (benches/data_parallel.py; a kind with two
#             GPUs or more), both runs' metrics in $OUT
# Outputs that matter go to $OUT (the device tool brings them back). What each stage needs
# carried (64 MiB in all; or carry target/device-pack.tar.xz, which build.sh packs with all of
# it, and run `tar -xJf target/device-pack.tar.xz` first): checks: target/gpu/gpu_kernels,
# target/gpu/gpu_scaled and the plans tiny, tiny-f32, tiny-stages, bench, bench-small; step: target/gpu/gpu_kernels and
# target/plan-bench-step; profile, tune and train:
# target/gpu/dsc and target/plan-bench; quick: target/gpu/gpu_kernels, target/gpu/dsc and the plans
# tiny, tiny-f32, tiny-stages, bench; table: target/gpu/dsc, target/plan-bench and
# target/plan-bench-bf16; long and fp8: those of profile; bf16: target/gpu/dsc and
# target/plan-bench-bf16; gemm: target/gemm; attention: target/attention; dp: target/gpu/dsc,
# target/plan-bench and target/plan-bench-dp2.
set -uo pipefail
cd "$(dirname "$0")/../.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
OUT=${OUT:-target/device-out}
mkdir -p "$OUT"
bench=(models/deepseek-v3-bench.dsc --set 'train.data.sources=[synthetic { weight = 1 }]' --set train.data.fim_rate=0)
usage="usage: tests/device/run.sh STAGE [N] [STAGE [N] ...]; stages: checks step profile tune quick table [N] long N fp8 N bf16 N gemm attention train N ncu [N] dp [N]"
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# Which build runs, and whether it was built from these sources (build.sh's checksums).
if [ -f target/pack-sources.sha256 ]; then
  echo "pack built from $(paste -sd ' ' target/pack-built-from)"
  differ=$(sha256sum --check --quiet target/pack-sources.sha256 2>/dev/null | cut -d: -f1)
  [ -z "$differ" ] || echo "WARNING: the pack was built from other sources than these; they differ in: $(echo $differ | head -c 600)"
fi
# The checks that failed, named again at the very end (a long call's first lines do not come
# back), which then exits 1.
failed=()
while [ $# -gt 0 ]; do
  stage=$1
  shift
  n=
  if [[ ${1:-} =~ ^[0-9]+$ ]]; then n=$1; shift; fi
  case "$stage" in
    checks)
      DSC_TEST_PLAN=target/plan-tiny DSC_TEST_PLAN_F32=target/plan-tiny-f32 DSC_TEST_PLAN_STAGES=target/plan-tiny-stages \
        DSC_TEST_PLAN_BENCH_SMALL=target/plan-bench-small target/gpu/gpu_kernels --nocapture --skip a_bench 2>&1 | tee "$OUT/gpu-kernels.txt" | tail -n 40 \
        || failed+=(gpu_kernels)
      DSC_TEST_PLAN_BENCH=target/plan-bench target/gpu/gpu_scaled --nocapture 2>&1 | tail -n 20 || failed+=(gpu_scaled)
      python3 tests/device/check_kernels.py target/plan-bench --out "$OUT/bench-kernels.json" | tail -n 15 \
        || failed+=(check_kernels)
      ;;
    step)
      DSC_TEST_PLAN_BENCH_STEP=target/plan-bench-step target/gpu/gpu_kernels --nocapture a_bench 2>&1 | tail -n 30 \
        || failed+=("gpu_kernels a_bench")
      ;;
    tune)
      target/gpu/dsc tune target/plan-bench 2>&1 | tee "$OUT/tune.txt"
      cp target/plan-bench/tuning.json "$OUT/" 2>/dev/null
      ;;
    quick)
      DSC_TEST_PLAN=target/plan-tiny DSC_TEST_PLAN_F32=target/plan-tiny-f32 DSC_TEST_PLAN_STAGES=target/plan-tiny-stages \
        target/gpu/gpu_kernels --nocapture --skip a_bench 2>&1 | grep -v '^seed' | tail -n 20 || failed+=(gpu_kernels)
      target/gpu/dsc train "${bench[@]}" --plan target/plan-bench --backend cuda --steps 4 --profile 2>&1 | tail -n 40
      ;;
    profile)
      # The whole report also in $OUT/profile.txt, as it comes (a call's time limit cut the
      # tail's, printed at the end, in session 36).
      target/gpu/dsc train "${bench[@]}" --plan target/plan-bench --backend cuda --steps 6 --profile \
        --metrics "$OUT/profile.jsonl" 2>&1 | tee "$OUT/profile.txt" | tail -n 80
      ;;
    table | long)
      bf16=()
      [ "$stage" = table ] && bf16=(--bf16-plan target/plan-bench-bf16)
      python3 benches/bench_model.py --dsc target/gpu/dsc --fp8-plan target/plan-bench "${bf16[@]}" \
        --steps "${n:-20}" --keep "$OUT"
      ;;
    fp8 | bf16)
      policy=(--plan target/plan-bench)
      [ "$stage" = bf16 ] && policy=(--set precision.gemm=bf16 --plan target/plan-bench-bf16)
      seed=()
      [ -n "${SEED:-}" ] && seed=(--seed "$SEED")
      target/gpu/dsc train "${bench[@]}" "${policy[@]}" "${seed[@]}" --backend cuda --steps "${n:?$stage N}" \
        --metrics "$OUT/dsc-$stage${SEED:+-seed$SEED}.jsonl" 2>&1 | tail -n 20
      ;;
    gemm)
      kernels=()
      for dir in ${GEMM:-target/gemm}; do kernels+=("$dir"/*.ptx); done
      python3 benches/fp8_gemm.py --generated "${kernels[@]}" | tee "$OUT/gemm.jsonl" | grep -v '"probe"'
      python3 benches/gemm_table.py "$OUT/gemm.jsonl"
      ;;
    attention)
      for dir in ${ATTENTION:-target/attention}; do
        echo "== $dir"
        kernels=("$dir"/*bf16_*.ptx)
        [ -n "${ATTENTION_F32:-}" ] && kernels=("$dir"/*.ptx)
        timeout "${ATTENTION_TIMEOUT:-300}" python3 benches/attention.py "${kernels[@]}" \
          --out "$OUT/$(basename "$dir").jsonl" 2>&1 | grep -v Warning || failed+=("attention $dir")
      done
      ;;
    train)
      resume=()
      [ -d target/run-bench ] && resume=(--resume target/run-bench)
      target/gpu/dsc train "${bench[@]}" --plan target/plan-bench --backend cuda --steps "${n:?train N}" \
        --checkpoint-dir target/run-bench --checkpoint-every 50 --keep 1 "${resume[@]}" \
        --metrics "$OUT/train.jsonl" 2>&1 | tail -n 20
      ;;
    ncu)
      # What runs under ncu, and whether profiling starts with it or where the run asks for it.
      case "${RUN:-tune}" in
        train) run=(target/gpu/dsc train "${bench[@]}" --plan target/plan-bench --backend cuda --steps 1) from=on ;;
        gemm) run=(python3 benches/fp8_gemm.py --generated target/gemm/*.ptx --profile "${SHAPE:-7168,16384}") from=off ;;
        attention) run=(python3 benches/attention.py target/attention/*bf16_*.ptx --profile "${SHAPE:-4096,16}") from=off ;;
        *) run=(target/gpu/dsc tune target/plan-bench --repeats 1) from=on ;;
      esac
      name="$OUT/ncu-${NAME:-${RUN:-tune}}"
      ncu --clock-control none --profile-from-start "$from" -k "regex:${KERNELS:?ncu needs KERNELS, a regex of kernel names}" -c "${n:-1}" \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
        --section SourceCounters \
        --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio$' \
        -f -o "$name" "${run[@]}" > "$name.txt" 2>&1
      ncu -i "$name.ncu-rep" --page details >> "$name.txt" 2>&1
      # Per SASS instruction: executions and the warps' stall samples by reason (the report
      # itself is not kept: it can be tens of MB).
      ncu -i "$name.ncu-rep" --page source --print-source sass --csv > "$name-sass.csv" 2>&1
      rm -f "$name.ncu-rep"
      grep -E '^  [a-z_0-9]+.*\(|Duration|Throughput|Pipe|Issue Slots|Warp Cycles|Stall|Registers|Achieved Occupancy' \
        "$name.txt" | head -n 80
      ;;
    dp)
      python3 benches/data_parallel.py --dsc target/gpu/dsc --plan target/plan-bench --dp-plan target/plan-bench-dp2 \
        --gpus 2 --steps "${n:-20}" --keep "$OUT"
      ;;
    *)
      echo "$usage" >&2
      exit 2
      ;;
  esac
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
