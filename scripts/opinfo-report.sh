#!/usr/bin/env bash
# Regenerates tests/opinfo/REPORT.md: exports PyTorch 2.13's OpInfo samples,
# runs torchfunc's transforms over them (build/tests/torchfunc_opinfo_sweep)
# and compares with torch.func. Sets up and builds first (the wheel's libtorch).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
dir=$(bash scripts/build.sh | tail -n 1)
.venv/bin/python tests/opinfo/run.py --sweep "$dir/tests/torchfunc_opinfo_sweep" --report tests/opinfo/REPORT.md "$@"
