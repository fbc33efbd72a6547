#!/usr/bin/env bash
# The benchmark command: set up (adds Python's torch and matplotlib), build,
# run every workload on torchfunc and on Python's functorch / torch.func side
# by side. Arguments go to bench/run.py (e.g. --threads 1 --cases W9).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
for p in python3-torch python3-matplotlib; do
  dpkg -s "$p" >/dev/null 2>&1 || { $SUDO apt-get update -qq; DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-torch python3-matplotlib; break; }
done
bash scripts/build.sh
/usr/bin/python3 bench/run.py "$@"
