#!/usr/bin/env bash
# A walk through dsc's front end on the shipped models. Run from the repository root.
set -euo pipefail
cargo build --release --locked -q
dsc=./target/release/dsc
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@" || true; }

# A spec is checked as a whole before anything runs.
step $dsc check models/deepseek-v3.dsc

# How big is it, how many FLOPs per token, and does each pipeline rank fit in 80 GB?
step $dsc info models/deepseek-v3.dsc

# Any value can be overridden from the command line, with the same checks.
step $dsc info models/deepseek-v3.dsc --set parallel.pipeline='1f1b { stages = 16 }'

# A mistake is reported with its location and a fix (exit code 1).
step $dsc check models/deepseek-v3.dsc --set model.ffn.1.keep_groups=9

# Train the tiny model for 20 steps on the CPU (FP8 policy, exact emulation).
step $dsc train models/deepseek-v3-tiny.dsc --steps 20

# The canonical form, and the resolved spec that every later stage reads.
step $dsc fmt models/deepseek-v3-tiny.dsc
step $dsc compile models/deepseek-v3-tiny.dsc --emit=spec
