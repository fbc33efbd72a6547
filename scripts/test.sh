#!/usr/bin/env bash
# The test command: set up a fresh Debian machine, build, run every test,
# against libtorch 2.13 (the torch wheel) by default; TORCHFUNC_LIBTORCH=debian
# (or a libtorch folder) tests another libtorch in its own build folder.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
dir=$(bash scripts/build.sh | tail -n 1)
ctest --test-dir "$dir" --output-on-failure -j"${JOBS:-2}"
