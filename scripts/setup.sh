#!/usr/bin/env bash
# Installs what torchfunc needs on Debian bookworm (run as root, or with sudo).
# OpenBLAS is installed so that libtorch does not fall back to the reference
# BLAS (about 16x slower for matrix products on these machines).
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
# zlib, libgd, CLI11, nlohmann-json and the Fashion-MNIST dataset serve the
# DP-SGD demo and the tutorial programs.
PKGS="build-essential cmake ccache libtorch-dev libgtest-dev googletest libopenblas0-openmp
      zlib1g-dev libgd-dev libcli11-dev nlohmann-json3-dev dataset-fashion-mnist"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "setup: installing$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi
