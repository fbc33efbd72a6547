#!/usr/bin/env bash
# Installs what torchfunc needs on Debian 12 / 13 (run as root, or with sudo).
#
#   bash scripts/setup.sh            libtorch 2.13 from the torch 2.13.0 CPU wheel, in a
#                                    project-local virtual environment (.venv, git-ignored)
#   TORCHFUNC_LIBTORCH=debian ...    Debian's libtorch-dev (1.13.1 on Debian 12, 2.6 on 13)
#   TORCHFUNC_LIBTORCH=/path ...     any other libtorch (e.g. the unpacked libtorch zip):
#                                    nothing to install for it
#
# With Debian's libtorch, OpenBLAS is installed too: without it Debian's
# libtorch uses the reference BLAS (about 16x slower for matrix products).
# The wheel bundles its own BLAS.
set -euo pipefail
cd "$(dirname "$0")/.."
flavour="${TORCHFUNC_LIBTORCH:-wheel}"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
echo "setup: Debian $(cat /etc/debian_version 2>/dev/null || echo '?'), libtorch: $flavour"

# zlib, libgd, CLI11, nlohmann-json, FFTW (the PRV accountant), gloo's headers (--nproc) and the Fashion-MNIST dataset serve the
# DP-SGD demo and the tutorial programs; nlohmann-json also libtorch 2.x's
# functorch headers (the wheel does not ship it).
PKGS="build-essential cmake ccache libgtest-dev googletest zlib1g-dev libgd-dev libcli11-dev
      nlohmann-json3-dev dataset-fashion-mnist libfftw3-dev libgloo-dev"
case "$flavour" in
  debian) PKGS="$PKGS libtorch-dev libopenblas0-openmp" ;;
  wheel) PKGS="$PKGS python3-venv" ;;
esac
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "setup: installing$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

if [ "$flavour" = wheel ]; then
  # The wheel is built for CPython 3.11. Pinned: an unpinned `pip install
  # torch` fetches a CUDA build of several GB.
  TORCH_PIN="torch==2.13.0"
  if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    py=""
    for c in python3.11 python3; do
      if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
        py="$c"; break
      fi
    done
    if [ -z "$py" ]; then
      echo "setup: the torch 2.13.0 wheel needs Python 3.11 (python3.11 not found)." >&2
      echo "       Install it, or use TORCHFUNC_LIBTORCH=debian or TORCHFUNC_LIBTORCH=/path/to/libtorch." >&2
      exit 1
    fi
    rm -rf .venv
    "$py" -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check "$TORCH_PIN" numpy
  fi
  # The OpInfo sweep (tests/opinfo) imports PyTorch's test database, which needs expecttest.
  .venv/bin/python -c 'import expecttest' 2>/dev/null ||
    .venv/bin/pip install -q --disable-pip-version-check expecttest==0.3.0
  .venv/bin/python -c 'import torch; print("setup: torch", torch.__version__, "at", torch.utils.cmake_prefix_path)'
fi
