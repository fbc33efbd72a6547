#!/usr/bin/env python3
"""Where jacrev and jacfwd cost the same: runs the XO/ cases of torchfunc_bench
(one thread) and prints, per function and input size n, the time of reverse
over forward mode for each output size m. Reverse mode wins where the ratio
is below 1; kJacobianCrossover (include/torchfunc/options.h) is the m/n where
it crosses 1. Usage: .venv/bin/python bench/jacobian_crossover.py [torchfunc_bench]"""
import json
import os
import subprocess
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPP = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build", "bench", "torchfunc_bench")


def main():
    names = subprocess.run([CPP, "--list"], capture_output=True, text=True, check=True).stdout.split("\n")
    cases = [n.split()[0] for n in names if n.startswith("XO/")]
    us = {}
    for c in cases:
        out = subprocess.run([CPP, "--case", c, "--reps", "20", "--min-time", "0.5"], capture_output=True, text=True,
                             check=True).stdout
        us[c] = json.loads(out.strip().splitlines()[-1])["median_us"]
    table = defaultdict(dict)  # (fn, n) -> m -> (rev, fwd)
    for c, t in us.items():
        _, fn, mode, size = c.split("/")
        n, m = map(int, size.split("x"))
        table[(fn, n)].setdefault(m, {})[mode] = t
    print("| function | n | " + " | ".join(f"m/n={r}" for r in ("1/8", "1/4", "1/2", "1", "2", "4", "8")) + " |")
    print("|---|---|" + "---|" * 7)
    for (fn, n), row in sorted(table.items()):
        cells = [f"{row[m]['rev'] / row[m]['fwd']:.2f}" for m in sorted(row)]
        print(f"| {fn} | {n} | " + " | ".join(cells) + " |")
    print("\nrev/fwd time: below 1 reverse mode is faster.")


if __name__ == "__main__":
    main()
