#!/usr/bin/env bash
# The demo command: set up a fresh Debian machine, build, run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
./build/apps/dpsgd/torchfunc-dpsgd "$@"
