#!/usr/bin/env bash
# The demo command: set up a fresh Debian machine, build (libtorch 2.13 by
# default; see scripts/setup.sh), run the DP-SGD demo. Arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
dir=$(bash scripts/build.sh | tail -n 1)
"./$dir/apps/dpsgd/torchfunc-dpsgd" "$@"
