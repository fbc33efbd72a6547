#!/usr/bin/env python3
"""Writes tests/data/prv_opacus.csv: epsilon from Opacus's PRVAccountant (and
its RDP accountant, for comparison) on a grid of (q, sigma, steps, delta),
plus runs that change (q, sigma) midway, and runs that start with plain
Gaussian mechanisms (q = 1: the scatternet preset's private whitening). The C++ PRV accountant is tested
against this file (tests/test_dpsgd.cpp). Needs opacus (its accountants use
numpy and scipy only): pip install opacus scipy."""
import csv
import os

import opacus
from opacus.accountants import PRVAccountant, RDPAccountant

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prv_opacus.csv")


def run(schedule, delta):
    prv, rdp = PRVAccountant(), RDPAccountant()
    for q, sigma, steps in schedule:
        for _ in range(steps):
            prv.step(noise_multiplier=sigma, sample_rate=q)
            rdp.step(noise_multiplier=sigma, sample_rate=q)
    return prv.get_epsilon(delta), rdp.get_epsilon(delta)


def main():
    rows = []
    for q in (0.001, 0.01, 0.034, 0.1, 0.5):
        for sigma in (0.8, 1.0, 2.0, 5.0):
            for steps in (1, 50, 1176, 5000):
                for delta in (1e-5, 1e-3):
                    try:
                        p, r = run([(q, sigma, steps)], delta)
                    except Exception as e:  # Opacus cannot discretise some corners; skip them
                        print("skip", q, sigma, steps, delta, e)
                        continue
                    rows.append([f"{q}:{sigma}:{steps}", delta, p, r])
    for sched in ([(0.034, 2.0, 600), (0.01, 1.0, 500)], [(0.1, 5.0, 100), (0.001, 0.8, 2000), (0.1, 5.0, 50)],
                  [(1.0, 8.0, 2), (8192 / 60000, 4.98, 640)], [(1.0, 8.0, 2), (0.034, 2.0, 1176)],
                  [(1.0, 4.0, 1), (0.01, 1.0, 500)], [(1.0, 20.0, 3)]):
        p, r = run(sched, 1e-5)
        rows.append([";".join(f"{q}:{s}:{n}" for q, s, n in sched), 1e-5, p, r])
    with open(OUT, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"# Opacus {opacus.__version__} PRVAccountant.get_epsilon (eps_error 0.01, delta_error delta/1000)"
                    " and RDPAccountant.get_epsilon; schedule q:sigma:steps[;...]"])
        w.writerow(["schedule", "delta", "epsilon_prv", "epsilon_rdp"])
        w.writerows(rows)
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()
