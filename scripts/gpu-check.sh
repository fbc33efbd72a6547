#!/usr/bin/env bash
# GPU readiness check, for a machine with a CUDA GPU and Python torch 2.x
# (a CUDA build): builds torchfunc against that torch's libtorch, runs every
# unit test (the CUDA ones included: they skip without a GPU elsewhere) and
# W1, W2, W9 on the GPU side by side with torch.func. Writes everything to
# ${OUT:-gpu-check-out}/ (tests.log, bench.jsonl, summary.txt). Aims at under
# 8 minutes on a 16-core machine. Needs cmake, g++, GoogleTest, CLI11 and
# nlohmann-json (it installs them with apt where it can).
#   PYTHON=python3 bash scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check-out}"
mkdir -p "$out"
PY="${PYTHON:-python3}"
start=$SECONDS
log() { echo "gpu-check: $*" | tee -a "$out/summary.txt"; }
"$PY" -c 'import torch, sys; print(torch.__version__, torch.version.cuda); sys.exit(0 if torch.cuda.is_available() else 1)' \
  > "$out/torch.txt" 2>&1 || { log "no CUDA torch in $PY: $(cat "$out/torch.txt")"; exit 1; }
log "torch $(cat "$out/torch.txt"), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
for p in cmake g++ libgtest-dev libcli11-dev nlohmann-json3-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || { apt-get install -y -qq --no-install-recommends cmake g++ libgtest-dev \
    libcli11-dev nlohmann-json3-dev >/dev/null 2>&1 || true; break; }
done
prefix=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" -DTORCHFUNC_BUILD_EXAMPLES=OFF \
  > "$out/configure.log" 2>&1 || { log "configure failed (configure.log)"; exit 1; }
cmake --build build-gpu -j"$(nproc)" --target torchfunc_tests torchfunc_bench > "$out/build.log" 2>&1 ||
  { log "build failed (build.log)"; exit 1; }
log "built in $((SECONDS - start)) s"
./build-gpu/tests/torchfunc_tests > "$out/tests.log" 2>&1
rc=$?
log "unit tests: $(grep -E '^\[  (PASSED|FAILED) ' "$out/tests.log" | tr '\n' ' ') (rc $rc); CUDA test: $(grep -E 'CudaTransformsMatchCpu \(' "$out/tests.log" | head -1)"
: > "$out/bench.jsonl"
for c in W9/grad_sin W9/vmap_sin W9/jvp_sin W9/vjp_sin W9/autograd_sin W2/vmap W2/loop W1/vmap W1/loop; do
  ./build-gpu/bench/torchfunc_bench --case "$c" --device cuda --reps 20 --min-time 0.5 >> "$out/bench.jsonl" 2>>"$out/bench.err"
  "$PY" bench/workloads.py --case "$c" --device cuda --reps 20 --min-time 0.5 >> "$out/bench.jsonl" 2>>"$out/bench.err"
done
"$PY" - "$out/bench.jsonl" <<'PYEOF' | tee -a "$out/summary.txt"
import json, sys
rows = {}
for line in open(sys.argv[1]):
    if line.strip().startswith("{"):
        r = json.loads(line)
        rows.setdefault(r["case"], {})[r["side"]] = r["median_us"]
print(f"{'case':<16} {'torchfunc':>12} {'torch.func':>12} {'ratio':>6}   (CUDA, medians)")
for c, s in rows.items():
    tf, py = s.get("torchfunc"), s.get("python")
    ratio = f"{tf / py:6.2f}" if tf and py else ""
    print(f"{c:<16} {tf or 0:10.1f}us {py or 0:10.1f}us {ratio}")
PYEOF
log "done in $((SECONDS - start)) s"
exit $rc
