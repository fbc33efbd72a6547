#!/usr/bin/env bash
# The benchmark command: set up (libtorch 2.13 from the torch wheel in .venv,
# plus JAX, matplotlib and Opacus there), build, run every workload on torchfunc,
# torch.func 2.13 (same wheel) and JAX (jax.jit, CPU) side by side.
# Arguments go to bench/run.py (e.g. --threads 1 --cases W9 --procs 3).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCHFUNC_LIBTORCH=wheel bash scripts/setup.sh
.venv/bin/python -c 'import jax, matplotlib' 2>/dev/null ||
  .venv/bin/pip install -q --disable-pip-version-check jax jaxlib matplotlib
# W10's Python side. Pinned; torch 2.13 already satisfies its torch requirement.
.venv/bin/python -c 'import opacus' 2>/dev/null ||
  .venv/bin/pip install -q --disable-pip-version-check opacus==1.6.0
# AOT/cos_cos/min_cut's Python side: functorch's min-cut partitioner needs networkx.
.venv/bin/python -c 'import networkx' 2>/dev/null ||
  .venv/bin/pip install -q --disable-pip-version-check networkx
TORCHFUNC_LIBTORCH=wheel bash scripts/build.sh >/dev/null
.venv/bin/python bench/run.py "$@"
