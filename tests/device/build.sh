#!/usr/bin/env bash
# Builds, on this machine, what tests/device/run.sh runs on the GPU machine (which has no
# Rust): the plans (target/plan-*), the runtime-only dsc and the GPU test binaries
# (target/gpu), the generated FP8 GEMM's and attention's PTX (target/gemm, target/attention),
# and all of them packed in target/device-pack.tar.xz. Send them with the device tool's
# `carry`: the pack (then `tar -xJf target/device-pack.tar.xz` there), or target/gpu and the
# plans a stage needs (64 MiB in all).
set -euo pipefail
cd "$(dirname "$0")/../.."
export MLIR_SYS_220_PREFIX=${MLIR_SYS_220_PREFIX:-/usr/lib/llvm-22} TABLEGEN_220_PREFIX=${TABLEGEN_220_PREFIX:-/usr/lib/llvm-22}
export CARGO_INCREMENTAL=0
cargo build --release --locked -p dsc
dsc=target/release/dsc
synthetic=(--set 'train.data.sources=[synthetic { weight = 1 }]' --set train.data.fim_rate=0)
$dsc compile models/deepseek-v3-tiny.dsc -o target/plan-tiny
$dsc compile models/deepseek-v3-tiny.dsc -o target/plan-tiny-f32 --set precision.gemm=f32 \
  --set precision.saved_activations=f32 --set precision.dispatch=f32 --set precision.combine=f32 \
  --set precision.adam_moments=f32
$dsc compile models/deepseek-v3-bench.dsc "${synthetic[@]}" -o target/plan-bench
$dsc compile models/deepseek-v3-bench.dsc "${synthetic[@]}" --set model.layers=2 --set 'model.ffn.1.layers=1..2' \
  --set train.seq_len=128 --set train.batch=1 --set train.micro_batch=1 -o target/plan-bench-step
# The bench model cut down, two micro-batches a step (`run.sh checks`: its steps from CUDA graphs).
$dsc compile models/deepseek-v3-bench.dsc "${synthetic[@]}" --set model.layers=2 --set 'model.ffn.1.layers=1..2' \
  --set train.seq_len=128 --set train.batch=4 --set train.micro_batch=2 -o target/plan-bench-small
$dsc compile models/deepseek-v3-bench.dsc "${synthetic[@]}" --set precision.gemm=bf16 -o target/plan-bench-bf16
# The f32 tiny model on 4 ranks: 2 pipeline stages (DualPipe) × 2 replicas, the routed experts
# split over 2 (`run.sh checks`: its stages on the GPU against the CPU).
$dsc compile models/deepseek-v3-tiny.dsc -o target/plan-tiny-stages --set precision.gemm=f32 \
  --set precision.saved_activations=f32 --set precision.dispatch=f32 --set precision.combine=f32 \
  --set precision.adam_moments=f32 --set model.layers=4 --set 'model.ffn.1.layers=1..4' --set train.seq_len=8 \
  --set train.micro_batch=2 --set train.batch=16 --set parallel.gpus_per_node=4 \
  --set 'parallel.pipeline=dualpipe { stages = 2 }' --set 'parallel.data={ size = 2 }' \
  --set 'parallel.expert={ size = 2, max_nodes = 1 }'
# Two data-parallel processes (`run.sh dp`; benches/data_parallel.py sets the same values).
$dsc compile models/deepseek-v3-bench.dsc "${synthetic[@]}" --set parallel.gpus_per_node=2 --set parallel.data.size=2 \
  -o target/plan-bench-dp2
# The generated FP8 GEMMs' PTX for `run.sh gemm` (benches/fp8_gemm.py --generated) and the
# fused attention's for `run.sh attention` (benches/attention.py).
# (Afresh: a kernel a tile list no longer names would be timed as if it were this build's.)
rm -rf target/gemm target/attention
mkdir -p target/gemm target/attention
cargo run --release --locked -p dsc-compiler --features mlir --example kernel_ptx -- target/gemm 128x128x4 128x192x4 128x64x7 128x192x4x2 128x128x5x2 g128x128x4 g128x192x4 g128x192x4x2
cargo run --release --locked -p dsc-compiler --features mlir --example kernel_ptx -- target/attention attention:192x128 attention:bf16:192x128
# The runtime-only dsc (no MLIR) replaces the full one in target/release.
cargo build --release --locked -p dsc --no-default-features --features cuda
mkdir -p target/gpu
cp target/release/dsc target/gpu/dsc
for test in gpu_kernels gpu_scaled; do
  cargo test --release --locked -p dsc-runtime --features cuda --test "$test" --no-run --message-format=json \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | tail -n 1 | xargs -I{} cp {} "target/gpu/$test"
done
du -sh target/gpu target/gemm target/attention target/plan-*
# What it was built from: the commit, and every tracked file's checksum, which run.sh checks
# against the sources the GPU machine got (the device tool sends its session's own checkout,
# whatever worktree built the pack: session 38 measured an older pack so).
{ git describe --always --dirty; pwd; } > target/pack-built-from
git ls-files -z | xargs -0 sha256sum > target/pack-sources.sha256
# All of it in one file to carry (about 9 MB: the plans' buffers compress well), which
# `tar -xJf target/device-pack.tar.xz` puts back on the GPU machine.
tar -cJf target/device-pack.tar.xz target/gpu target/gemm target/attention target/plan-* target/pack-built-from \
  target/pack-sources.sha256
du -sh target/device-pack.tar.xz
