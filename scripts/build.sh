#!/usr/bin/env bash
# Configures and builds torchfunc, its tests and examples against the libtorch
# chosen by TORCHFUNC_LIBTORCH (see scripts/setup.sh):
#   wheel (default)  ./build          the torch 2.13 wheel's libtorch in .venv
#   debian           ./build-debian   Debian's libtorch-dev
#   /path/to/libtorch ./build-custom  any other libtorch
# BUILD_DIR overrides the folder. Prints the folder on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
flavour="${TORCHFUNC_LIBTORCH:-wheel}"
args=()
case "$flavour" in
  wheel)
    dir="${BUILD_DIR:-build}"
    args+=("-DCMAKE_PREFIX_PATH=$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')")
    args+=("-DTORCHFUNC_PYTHON=$PWD/.venv/bin/python") ;;  # its torch drives the OpInfo sweep
  debian)
    dir="${BUILD_DIR:-build-debian}" ;;
  *)
    dir="${BUILD_DIR:-build-custom}"
    args+=("-DCMAKE_PREFIX_PATH=$flavour") ;;
esac
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release "${args[@]}" >&2
cmake --build "$dir" -j"${JOBS:-2}" >&2
echo "$dir"
