#!/usr/bin/env python3
"""Runs every WORKLOADS.md case side by side -- torchfunc (C++, build/bench/
torchfunc_bench, on the torch 2.13 wheel's libtorch), Python's torch.func on
the same wheel (bench/workloads.py) and JAX with jax.jit where the case has a
JAX form (bench/jax_workloads.py) -- each case in --procs fresh processes per
side, with the same thread count, and prints the median over processes of each
process's median, the spread over processes (min-max), the ratios torchfunc /
torch.func and torchfunc / JAX, the speed-up over the plain baseline and peak
RSS. A case whose process medians spread by more than --max-spread (10%) gets
as many processes again; still wider, its time is printed with a '!' and
results.json lists it under "noisy". Writes bench-out/results.json and bench-out/ratios.png.

  .venv/bin/python bench/run.py                      # threads 1 and 2, default malloc and the cache
  .venv/bin/python bench/run.py --threads 1 --malloc default --cases W9
"""
import argparse
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPP = os.environ.get("TORCHFUNC_BENCH", os.path.join(ROOT, "build", "bench", "torchfunc_bench"))
PY = [sys.executable, os.path.join(ROOT, "bench", "workloads.py")]
JAX = [sys.executable, os.path.join(ROOT, "bench", "jax_workloads.py")]
# The plain baseline of each workload (a loop of autograd calls or of models).
BASELINE = {"W1": "W1/loop", "W2": "W2/loop", "W3": "W3/loop", "W4": "W4/rows", "W5": "W5/loop",
            "W6": "W6/rows", "W8": "W8/loop", "W9": "W9/autograd_sin",
            "AOT": "AOT/cos_cos/eager"}
HEAVY = {"W1", "W2", "W7", "W10"}  # seconds per call: fewer repetitions


def blas():
    for link in ("/etc/alternatives/libblas.so.3-x86_64-linux-gnu", "/etc/alternatives/libblas.so.3"):
        if os.path.exists(link):
            return os.path.realpath(link)
    return "unknown"


def peak_rss_run(cmd, env):
    # os.wait4 gives the child's own rusage (ru_maxrss in KiB on Linux).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    rec = json.loads(out.strip().splitlines()[-1])
    rec["peak_rss_mib"] = usage.ru_maxrss / 1024.0
    return rec


def relative_spread(meds):
    """(max - min) / median of the process medians (sorted)."""
    return (meds[-1] - meds[0]) / meds[len(meds) // 2]


def spread_run(cmd, env, procs, max_spread):
    """The case in `procs` fresh processes: median of their medians, their
    min and max, and the largest peak RSS. A shared VM has noisy periods in
    which one case's process medians differ by tens of percent: when the
    spread exceeds `max_spread`, as many processes again are run (once), and
    a spread still above it marks the result noisy (printed with a '!')."""
    recs = [peak_rss_run(cmd, env) for _ in range(procs)]
    if relative_spread(sorted(r["median_us"] for r in recs)) > max_spread:
        recs += [peak_rss_run(cmd, env) for _ in range(procs)]
    meds = sorted(r["median_us"] for r in recs)
    out = dict(recs[0])
    out["median_us"] = meds[len(meds) // 2]
    out["min_median_us"], out["max_median_us"] = meds[0], meds[-1]
    out["noisy"] = relative_spread(meds) > max_spread
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in recs)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--malloc", default="default,cache",
                    help="default; thp (GLIBC_TUNABLES=glibc.malloc.hugetlb=1, both sides); mallopt (glibc keeps "
                         "freed memory: MALLOC_MMAP_THRESHOLD_=32MiB, MALLOC_TRIM_THRESHOLD_=256MiB, both sides); "
                         "cache (the C++ side uses torchfunc::use_caching_cpu_allocator(), Python keeps default "
                         "malloc)")
    ap.add_argument("--cases", default="", help="comma-separated prefixes, e.g. W1,W9/grad_sin")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--procs", type=int, default=3, help="fresh processes per case and side (the spread)")
    ap.add_argument("--max-spread", type=float, default=0.1,
                    help="a case whose process medians spread more than this fraction of their median runs --procs "
                         "more processes; still wider, it is marked noisy ('!' after the time)")
    ap.add_argument("--no-jax", action="store_true")
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-out"))
    a = ap.parse_args()
    if not os.path.exists(CPP):
        sys.exit(f"run.py: {CPP} not built (bash scripts/build.sh)")
    names = subprocess.run([CPP, "--list"], capture_output=True, text=True, check=True).stdout.split("\n")
    names = [n.split()[0] for n in names if n.strip()]
    # C++ only: torchfunc_bench --case MT/... directly; MEM/: bench/chunk_memory.py
    names = [n for n in names if not n.startswith(("MT/", "MEM/"))]
    if a.cases:
        names = [n for n in names if any(n.startswith(p) for p in a.cases.split(","))]
    import torch  # only for the version line
    jax_names = set()
    if not a.no_jax:
        try:
            jax_names = set(subprocess.run(JAX + ["--list"], capture_output=True, text=True,
                                           check=True).stdout.split())
        except (subprocess.CalledProcessError, FileNotFoundError):
            print("run.py: JAX not available (pip install jax jaxlib); no JAX column")
    wheel_blas = next((p.split("=", 1)[1] for p in torch.__config__.show().replace(",", " ").split()
                       if p.startswith("BLAS_INFO=")), "?")
    print(f"machine: {platform.node()}, {os.cpu_count()} cores; BLAS: the torch wheel's {wheel_blas} (torchfunc and "
          f"torch.func: one libtorch), JAX: XLA's own (Eigen); Debian's libblas.so.3: {blas()}")
    print(f"torch.func side: torch {torch.__version__}; C++ side: torchfunc on the libtorch in 'torch' of results; "
          f"{a.procs} processes per case and side")
    results = []
    for malloc in a.malloc.split(","):
        env = dict(os.environ)
        env.pop("GLIBC_TUNABLES", None)
        env.pop("TORCHFUNC_CACHING_ALLOCATOR", None)
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        env.pop("MALLOC_TRIM_THRESHOLD_", None)
        if malloc == "mallopt":
            env["MALLOC_MMAP_THRESHOLD_"] = str(32 << 20)
            env["MALLOC_TRIM_THRESHOLD_"] = str(256 << 20)
        if malloc == "cache":
            env["TORCHFUNC_CACHING_ALLOCATOR"] = "1"  # read by torchfunc (Python ignores it)
        if malloc == "thp":
            env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
        for threads in [int(t) for t in a.threads.split(",")]:
            env["OMP_NUM_THREADS"] = str(threads)
            print(f"\n== {threads} thread(s), malloc: {malloc} ==")
            print(f"{'case':<18} {'torchfunc':>11} {'spread':>15} {'torch.func':>11} {'JAX':>11} "
                  f"{'tf/func':>7} {'tf/JAX':>7} {'speed-up':>9}  {'RSS tf/func MiB':>15}")
            rows = {}
            for n in names:
                reps = max(3, a.reps // 6) if n.split("/")[0] in HEAVY else a.reps
                common = ["--case", n, "--threads", str(threads), "--reps", str(reps), "--min-time", str(a.min_time)]
                rows[n] = (spread_run([CPP] + common, env, a.procs, a.max_spread),
                           spread_run(PY + common, env, a.procs, a.max_spread),
                           spread_run(JAX + common, env, a.procs, a.max_spread) if n in jax_names else None)
            for n in names:
                tf, py, jx = rows[n]
                w = n.split("/")[0]
                # W10: a DP step's baseline is the non-private step of the same model and batch
                # (the "speed-up" column then reads non-private / DP time, below 1).
                base = (n.replace("/dp_step_vmap/", "/nonprivate_step/").replace("/dp_step/", "/nonprivate_step/")
                        if w == "W10" else BASELINE.get(w))
                is_base = base == n
                base_us = rows[base][0]["median_us"] if base in rows and not is_base else None
                rec = {"case": n, "threads": threads, "malloc": malloc, "torchfunc_us": tf["median_us"],
                       "torchfunc_spread_us": [tf["min_median_us"], tf["max_median_us"]],
                       "python_us": py["median_us"], "python_spread_us": [py["min_median_us"], py["max_median_us"]],
                       "ratio": tf["median_us"] / py["median_us"],
                       "jax_us": jx["median_us"] if jx else None,
                       "jax_spread_us": [jx["min_median_us"], jx["max_median_us"]] if jx else None,
                       "ratio_jax": tf["median_us"] / jx["median_us"] if jx else None,
                       "baseline_us": base_us, "speedup_over_baseline": base_us / tf["median_us"] if base_us else None,
                       "torchfunc_rss_mib": tf["peak_rss_mib"], "python_rss_mib": py["peak_rss_mib"],
                       "libtorch": tf.get("torch"), "python_torch": py.get("torch"), "python_api": py.get("api"),
                       "jax": jx.get("jax") if jx else None,
                       "noisy": [side for side, r in (("torchfunc", tf), ("python", py), ("jax", jx)) if r and r["noisy"]]}
                results.append(rec)
                def fmt(us, r=None):
                    mark = "!" if r is not None and r["noisy"] else ""
                    return (f"{us / 1000:.3f}ms" if us >= 1000 else f"{us:.1f}us") + mark
                spread = f"{fmt(tf['min_median_us'])}-{fmt(tf['max_median_us'])}"
                speedup = f"{rec['speedup_over_baseline']:8.2f}x" if base_us else ""
                rj = f"{rec['ratio_jax']:7.2f}" if jx else f"{'':>7}"
                print(f"{n:<18} {fmt(tf['median_us'], tf):>11} {spread:>15} {fmt(py['median_us'], py):>11} "
                      f"{fmt(jx['median_us'], jx) if jx else '':>11} {rec['ratio']:7.2f} {rj} {speedup:>9}  "
                      f"{tf['peak_rss_mib']:7.0f}/{py['peak_rss_mib']:<7.0f}", flush=True)
    os.makedirs(a.out, exist_ok=True)
    meta = {"blas": wheel_blas, "debian_blas": blas(), "cores": os.cpu_count(), "python_torch": torch.__version__,
            "procs": a.procs}
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        groups = sorted({(r["threads"], r["malloc"]) for r in results})
        cases = list(dict.fromkeys(r["case"] for r in results))
        fig, ax = plt.subplots(figsize=(max(8, len(cases) * 0.55), 4.5))
        width = 0.8 / len(groups)
        for gi, (t, m) in enumerate(groups):
            vals = [next((r["ratio"] for r in results if r["case"] == c and r["threads"] == t and r["malloc"] == m),
                         float("nan")) for c in cases]
            ax.bar([i + gi * width for i in range(len(cases))], vals, width, label=f"{t} thread(s), malloc {m}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels(cases, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("torchfunc / Python median (lower is better)")
        ax.set_title("torchfunc vs Python " + (results[0]["python_api"] if results else ""))
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "ratios.png"), dpi=110)
        print(f"\nwrote {a.out}/results.json and {a.out}/ratios.png")
    except ImportError:
        print(f"\nwrote {a.out}/results.json (install python3-matplotlib for the chart)")


if __name__ == "__main__":
    main()
