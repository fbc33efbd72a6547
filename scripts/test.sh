#!/usr/bin/env bash
# The test command: set up a fresh Debian machine, build, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
ctest --test-dir build --output-on-failure -j"${JOBS:-2}"
