#!/usr/bin/env bash
# Installs what building and testing dsc needs on Debian 12 besides Rust: MLIR 22 (kernels to
# PTX; melior's build also needs libclang, Polly and libxml2) from Debian's packages, and
# ptxas 13.0 (to check generated PTX in the tests, no GPU needed) from PyPI into
# target/tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(llvm-22-dev libmlir-22-dev mlir-22-tools libclang-22-dev libpolly-22-dev libxml2-dev libzstd-dev libz3-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ ! -x target/tools/nvidia/cu13/bin/ptxas ]; then
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps --target target/tools "nvidia-cuda-nvcc==13.0.*" \
    || echo "note: ptxas could not be installed; the PTX assembly test will say it skipped" >&2
fi
