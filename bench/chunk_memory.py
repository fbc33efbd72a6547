#!/usr/bin/env python3
"""Peak memory of chunked Jacobians: runs each MEM/ case of torchfunc_bench in
a fresh process (one call) and prints its peak RSS next to the size of the
result. Usage: .venv/bin/python bench/chunk_memory.py [path/to/torchfunc_bench]"""
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPP = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build", "bench", "torchfunc_bench")


def peak_rss_mib(case):
    t0 = time.time()
    p = subprocess.Popen([CPP, "--case", case, "--reps", "1"], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)  # the child's own rusage (ru_maxrss in KiB)
    if status != 0:
        sys.exit(f"chunk_memory.py: {case} failed ({status})")
    return usage.ru_maxrss / 1024.0, time.time() - t0


def main():
    names = subprocess.run([CPP, "--list"], capture_output=True, text=True, check=True).stdout.split("\n")
    cases = [n.split()[0] for n in names if n.startswith("MEM/")]
    print("| case | result | peak RSS (MiB) | wall (s) |\n|---|---|---|---|")
    for c in cases:
        rss, wall = peak_rss_mib(c)
        print(f"| {c} | 256 MiB | {rss:.0f} | {wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
