#!/usr/bin/env python3
"""The WORKLOADS.md cases that have a JAX form (W1, W2, W4-W6, W8, W9), in
JAX's own idioms with jax.jit: the third column of bench/run.py. Same case
names, shapes and protocol as bench/workloads.py and torchfunc_bench.cpp
(float32, median of many calls after warm-up; every call waits for its
result with block_until_ready). The jit compilation is part of the warm-up,
not of the timings.

  python3 bench/jax_workloads.py --list
  python3 bench/jax_workloads.py --case W9/grad_sin --threads 1 --reps 50

Threads: XLA's CPU thread pool is sized when JAX starts, so --threads 1 sets
XLA_FLAGS (--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1)
before importing jax; other counts use XLA's default pool (every core).
"""
import argparse
import json
import os
import statistics
import sys
import time


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--min-time", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args()


A = parse()
if A.threads == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import grad, jacfwd, jacrev, jit, jvp, vjp, vmap, hessian  # noqa: E402

KEY = jax.random.PRNGKey(0)


def rand(shape, i):
    return jax.random.normal(jax.random.fold_in(KEY, i), shape, jnp.float32)


# ---- models as pure functions over parameter dicts --------------------------------
def linear_init(i, fan_in, fan_out):
    bound = 1.0 / fan_in ** 0.5
    k1, k2 = jax.random.split(jax.random.fold_in(KEY, 1000 + i))
    return {"w": jax.random.uniform(k1, (fan_out, fan_in), jnp.float32, -bound, bound),
            "b": jax.random.uniform(k2, (fan_out,), jnp.float32, -bound, bound)}


def conv_init(i, cin, cout, k):
    bound = 1.0 / (cin * k * k) ** 0.5
    k1, k2 = jax.random.split(jax.random.fold_in(KEY, 2000 + i))
    return {"w": jax.random.uniform(k1, (cout, cin, k, k), jnp.float32, -bound, bound),
            "b": jax.random.uniform(k2, (cout,), jnp.float32, -bound, bound)}


def conv(p, x):  # x: [N, C, H, W], no padding, stride 1 (nn.Conv2d(cin, cout, 3))
    y = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y + p["b"][None, :, None, None]


def dense(p, x):
    return x @ p["w"].T + p["b"]


def cnn_params():
    return {"conv1": conv_init(0, 1, 32, 3), "conv2": conv_init(1, 32, 64, 3),
            "fc1": linear_init(2, 9216, 128), "fc2": linear_init(3, 128, 10)}


def cnn(p, x):  # x: [N, 1, 28, 28]
    x = jax.nn.relu(conv(p["conv2"], jax.nn.relu(conv(p["conv1"], x))))
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
    x = x.reshape(x.shape[0], -1)
    return dense(p["fc2"], jax.nn.relu(dense(p["fc1"], x)))


def mlp_params(i, h, o):
    return {"0": linear_init(10, i, h), "2": linear_init(11, h, h), "4": linear_init(12, h, o)}


def mlp(p, x):
    return dense(p["4"], jax.nn.relu(dense(p["2"], jax.nn.relu(dense(p["0"], x)))))


def nll(logits, y):  # log_softmax + nll_loss (mean)
    logp = jax.nn.log_softmax(logits, axis=1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def predict(W, b, x):
    return jnp.tanh(x @ W.T + b)


def cases():
    c = {}

    def per_sample(model, params, shape):
        def setup():
            x = rand(shape, 1)
            y = jax.random.randint(jax.random.fold_in(KEY, 2), (shape[0],), 0, 10)

            def loss(p, xi, yi):
                return nll(model(p, xi[None]), yi[None])
            f = jit(vmap(grad(loss), in_axes=(None, 0, 0)))
            return lambda: f(params, x, y)
        return setup
    c["W1/vmap"] = per_sample(cnn, cnn_params(), (64, 1, 28, 28))
    c["W2/vmap"] = per_sample(mlp, mlp_params(784, 512, 10), (256, 784))
    c["W1/compiled"], c["W2/compiled"] = c["W1/vmap"], c["W2/vmap"]

    def jac_inputs(din, dout):
        return rand((dout, din), 3), rand((dout,), 4), rand((din,), 5)

    def batch_inputs():
        return rand((33, 31), 3), rand((33,), 4), rand((64, 31), 5)

    for kind, tr in (("jacrev", jacrev), ("jacfwd", jacfwd)):
        def w4(tr=tr):
            W, b, x = jac_inputs(256, 256)
            f = jit(tr(predict, argnums=2))
            return lambda: f(W, b, x)
        c["W4/" + kind] = w4

        def w5(tr=tr):
            W, b, x = batch_inputs()
            f = jit(vmap(tr(predict, argnums=2), in_axes=(None, None, 0)))
            return lambda: f(W, b, x)
        c["W5/vmap_" + kind] = w5

    def w6_hessian():
        W, b, x = jac_inputs(16, 16)
        f = jit(hessian(predict, argnums=2))
        return lambda: f(W, b, x)

    def w6_revrev():
        W, b, x = jac_inputs(16, 16)
        f = jit(jacrev(jacrev(predict, argnums=2), argnums=2))
        return lambda: f(W, b, x)

    def w6_vmap():
        W, b, x = batch_inputs()
        f = jit(vmap(hessian(lambda W, b, xi: predict(W, b, xi).sum(), argnums=2), in_axes=(None, None, 0)))
        return lambda: f(W, b, x)
    c["W6/hessian"], c["W6/jacrev_jacrev"], c["W6/vmap_hessian"] = w6_hessian, w6_revrev, w6_vmap

    def w8():
        params = {"0": linear_init(20, 1, 40), "2": linear_init(21, 40, 40), "4": linear_init(22, 40, 1)}
        xs, ys, xq, yq = (rand((8, 10, 1), 30 + i) for i in range(4))

        def loss(p, x, y):
            return jnp.mean((mlp(p, x) - y) ** 2)

        def task(p, a, b, c_, d):
            g = grad(loss)(p, a, b)
            return loss(jax.tree_util.tree_map(lambda w, gw: w - 0.1 * gw, p, g), c_, d)
        meta = jit(grad(lambda p, a, b, c_, d: vmap(task, in_axes=(None, 0, 0, 0, 0))(p, a, b, c_, d).mean()))
        return lambda: meta(params, xs, ys, xq, yq)
    c["W8/vmap_grad"] = c["W8/compiled"] = w8

    def w9_grad():
        x, f = rand((), 6), jit(grad(jnp.sin))
        return lambda: f(x)

    def w9_vmap():
        x, f = rand((64,), 6), jit(vmap(jnp.sin))
        return lambda: f(x)

    def w9_jvp():
        x, t = rand((64,), 6), rand((64,), 7)
        f = jit(lambda x, t: jvp(jnp.sin, (x,), (t,)))
        return lambda: f(x, t)

    def w9_vjp():
        x, ct = rand((64,), 6), rand((64,), 7)

        def both(x, ct):
            out, fn = vjp(jnp.sin, x)
            return out, fn(ct)
        f = jit(both)
        return lambda: f(x, ct)
    c["W9/grad_sin"], c["W9/vmap_sin"], c["W9/jvp_sin"], c["W9/vjp_sin"] = w9_grad, w9_vmap, w9_jvp, w9_vjp
    return c


def run_case(name, setup, reps, min_time):
    call = setup()

    def once():
        jax.block_until_ready(call())
    for _ in range(max(2, min(5, reps // 10))):  # includes the jit compilation
        once()
    us = []
    start = time.perf_counter()
    while len(us) < reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        once()
        us.append((time.perf_counter() - t0) * 1e6)
        if len(us) >= reps * 20:
            break
    return {"case": name, "side": "jax", "median_us": statistics.median(us), "min_us": min(us), "reps": len(us),
            "threads": A.threads, "jax": jax.__version__, "api": "jax.jit"}


def main():
    cs = cases()
    if A.list:
        print("\n".join(cs))
        return 0
    if A.case not in cs:
        print(f"jax_workloads.py: no case {A.case!r}", file=sys.stderr)
        return 2
    print(json.dumps(run_case(A.case, cs[A.case], A.reps, A.min_time)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
