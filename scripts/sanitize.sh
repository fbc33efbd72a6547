#!/usr/bin/env bash
# The whole GoogleTest suite built with AddressSanitizer + UndefinedBehaviorSanitizer
# (and LeakSanitizer at exit) against the torch 2.13 wheel's libtorch, in
# ./build-asan. libtorch is not instrumented; leaks inside it are suppressed
# (tests/sanitize/lsan.supp), torchfunc's are not.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
dir=build-asan
# -O1 -g1: line tables for the reports' stack traces, at a lower build cost than
# RelWithDebInfo's -O2 -g; NDEBUG as libtorch was built (its headers' layout depends on it).
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -g1 -DNDEBUG" -DTORCHFUNC_SANITIZE=ON \
  -DTORCHFUNC_BUILD_EXAMPLES=OFF -DTORCHFUNC_BUILD_BENCH=OFF \
  "-DCMAKE_PREFIX_PATH=$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')" >&2
cmake --build "$dir" -j"${JOBS:-2}" --target torchfunc_tests >&2
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:halt_on_error=1:detect_odr_violation=0"
export LSAN_OPTIONS="suppressions=$PWD/tests/sanitize/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
"$dir/tests/torchfunc_tests" "$@"
echo "sanitize: torchfunc_tests passed under ASan + UBSan + LSan"
