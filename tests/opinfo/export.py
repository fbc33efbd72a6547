"""Exports PyTorch's OpInfo database (torch 2.13) for torchfunc's op sweep.

For every OpInfo entry and its first samples (float64, and float32 for vmap
only) this writes, into OUT (default: build/opinfo):

  NNNNN.pt       the sample's call traced to TorchScript (the ATen ops it runs),
                 taking the sample's tensors as inputs
  NNNNN.data.pt  a dict torch::pickle_load reads: the inputs, batched inputs,
                 cotangents and tangents, and torch.func 2.13's own results
                 and statuses for the same transforms (the second oracle)
  skipped.tsv    entries that cannot be expressed this way, with the reason

The C++ sweep (tests/opinfo/sweep.cpp) runs torchfunc's transforms on the same
files; tests/opinfo/run.py drives both and writes REPORT.md.

Usage: python export.py [--out DIR] [--samples N] [--ops REGEX] [--max-ops N]
"""
import argparse
import os
import re
import sys
import warnings

import torch
import torch.func as tf
from torch.testing._internal.common_methods_invocations import op_db
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

warnings.filterwarnings("ignore")

BATCH = 3
# Ops that draw random numbers (each call differs; torch.func tests them apart).
RANDOM_OPS = re.compile(r"^(rand|randn|randint|randperm|rand_like|randn_like|randint_like|bernoulli|multinomial|"
                        r"normal|uniform|cauchy|exponential|geometric|log_normal|poisson|binomial|"
                        r"(native_|feature_|alpha_|feature_alpha_)?dropout|rrelu|rrelu_with_noise|"
                        r"fractional_max_pool[23]d)_?$")
# Ops whose output is uninitialised memory: two calls may return the same
# bytes by chance (a reused block), so the "two calls differ" check cannot
# be trusted to skip them.
UNINITIALISED_OPS = re.compile(r"^(empty|empty_like|empty_strided|empty_permuted|new_empty|new_empty_strided)$")
# Jacobians larger than this (out numel x in numel) are not computed.
MAX_JACOBIAN = 1 << 20


class RecordAten(TorchDispatchMode):
    """The ATen overloads a call runs (after CompositeImplicit decomposition)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name not in self.ops:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


class Call(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *ts):
        return self.fn(*ts)


def as_list(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        return list(out)
    return None


def last_message(text):
    """The line that says what failed (TorchScript wraps it in a traceback)."""
    lines = [l.strip() for l in text.strip().split("\n") if l.strip()]
    if not lines:
        return ""
    if "failed in the TorchScript interpreter" in lines[0]:
        for l in reversed(lines):
            if "Error:" in l:
                return l.split("Error:", 1)[1].strip()
        return lines[-1]
    return lines[0]


def status(fn):
    """('ok', value) or ('error: <first line>', None)."""
    try:
        return "ok", fn()
    except Exception as e:  # torch.func's own verdict, recorded as is
        msg = last_message(str(e))[:200]
        return "error: " + type(e).__name__ + ": " + msg, None


def is_float(t):
    return t.is_floating_point()


def make_batched(t, gen):
    """[BATCH, *t.shape]: sample 0 is t, the others nearby (floats) or equal."""
    if is_float(t):
        noise = torch.randn((BATCH - 1,) + tuple(t.shape), generator=gen, dtype=t.dtype) * 0.01
        return torch.cat([t.unsqueeze(0), t.unsqueeze(0) + noise])
    return t.unsqueeze(0).expand((BATCH,) + tuple(t.shape)).clone()


def plain(v):
    """Tensors torch.save can write (torch.func may return ZeroTensors)."""
    if isinstance(v, list):
        return [plain(x) for x in v]
    if isinstance(v, torch.Tensor):
        if v._is_zerotensor():
            return torch.zeros(v.shape, dtype=v.dtype)
        return v.detach().resolve_conj().resolve_neg().clone()
    return v


def entry_name(op):
    return op.name + ("." + op.variant_test_name if op.variant_test_name else "")


def export_sample(op, variant_fn, sample, dtype, gen, full):
    leaves, spec = tree_flatten((sample.input, sample.args, sample.kwargs))
    tidx = [i for i, l in enumerate(leaves) if isinstance(l, torch.Tensor)]
    ts = [leaves[i].detach().clone() for i in tidx]
    if not ts:
        return None, "no tensor inputs (a factory)"
    if any(t.is_complex() for t in ts):
        return None, "complex inputs"
    if any(t.layout != torch.strided for t in ts):
        return None, "sparse or other non-strided inputs"

    def call(*args):
        ls = list(leaves)
        for i, t in zip(tidx, args):
            ls[i] = t
        inp, a, kw = tree_unflatten(ls, spec)
        return variant_fn(inp, *a, **kw)

    try:
        copies = [t.clone() for t in ts]
        with RecordAten() as rec:
            out = call(*copies)
    except Exception as e:
        return None, "sample fails in eager: " + str(e).split("\n")[0][:100]
    outs = as_list(out)
    if outs is None:
        return None, "non-tensor output"
    if not outs:
        return None, "no outputs"
    if any(o.layout != torch.strided for o in outs):
        return None, "sparse or other non-strided outputs"
    again = as_list(call(*[t.clone() for t in ts]))
    for a, b in zip(outs, again):
        if a.shape != b.shape or not torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)):
            return None, "random (two calls differ)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(Call(call), tuple(t.clone() for t in ts), check_trace=False)
    except Exception as e:
        return None, "cannot trace: " + str(e).split("\n")[0][:100]
    graph_ops = sorted({n.kind() for n in traced.graph.nodes() if n.kind().startswith("aten::")})
    random_ops = [g for g in graph_ops if RANDOM_OPS.match(g[len("aten::"):])]
    if random_ops:
        return None, "random (" + " ".join(random_ops) + ")"
    # (the sample's own top-level ATen calls, not what they decompose into)
    top = [o.replace("::", ".").split(".")[1] for o in rec.ops]
    if top and all(UNINITIALISED_OPS.match(o) for o in top):
        return None, "uninitialised output (" + " ".join(rec.ops) + ")"

    def run(*args):
        return tuple(as_list(traced(*args)))

    diff = [is_float(t) for t in ts]
    data = {
        "name": entry_name(op) + ("" if variant_fn is op.op else " (in-place)"),
        "aten": " ".join(rec.ops),
        "graph": " ".join(graph_ops),
        "dtype": str(dtype).replace("torch.", ""),
        "inplace": variant_fn is not op.op,
        "leaves": ts,
        "diff": diff,
        "batched": [make_batched(t, gen) for t in ts],
    }
    st = {}
    # vmap over every tensor input at once, and over each alone.
    s, v = status(lambda: tf.vmap(run)(*[t.clone() for t in data["batched"]]))
    st["vmap"] = s
    data["tf_vmap"] = list(v) if v is not None else []
    if not full:
        data["status"] = st
        return (traced, data), None
    real_out = all(o.is_floating_point() for o in outs)
    data["differentiable"] = bool(any(diff) and real_out and not data["inplace"])
    if data["differentiable"]:
        di = [i for i, d in enumerate(diff) if d]

        def on_diff(*d):
            args = list(ts)
            for i, x in zip(di, d):
                args[i] = x
            return run(*args)

        cts = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
        tans = [torch.randn(ts[i].shape, generator=gen, dtype=ts[i].dtype) for i in di]
        data["cotangents"] = cts
        data["tangents"] = tans

        def do_vjp():
            _, fn = tf.vjp(on_diff, *[ts[i] for i in di])
            return list(fn(tuple(cts)))

        s, v = status(do_vjp)
        st["vjp"] = s
        data["tf_vjp"] = v if v is not None else []
        s, v = status(lambda: list(tf.jvp(on_diff, tuple(ts[i] for i in di), tuple(tans))[1]))
        st["jvp"] = s
        data["tf_jvp"] = v if v is not None else []
        argn = tuple(range(len(di)))
        size = sum(o.numel() for o in outs) * sum(ts[i].numel() for i in di)
        data["jacobian_size"] = size
        if size <= MAX_JACOBIAN:
            def flat(*d):
                return torch.cat([o.reshape(-1) for o in on_diff(*d)])

            for name, jac in (("jacrev", tf.jacrev), ("jacfwd", tf.jacfwd)):
                s, v = status(lambda: list(jac(flat, argnums=argn)(*[ts[i] for i in di])))
                st[name] = s
                data["tf_" + name] = v if v is not None else []

        def scalar(*d):
            return sum((o * w).sum() for o, w in zip(on_diff(*d), cts))

        def per_sample():
            return list(tf.vmap(tf.grad(scalar, argnums=argn))(*[data["batched"][i] for i in di]))

        s, v = status(per_sample)
        st["vmap_grad"] = s
        data["tf_vmap_grad"] = v if v is not None else []
    data["status"] = st
    return (traced, data), None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "build", "opinfo"))
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--ops", default="")
    ap.add_argument("--max-ops", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for f in os.listdir(args.out):
        if f.endswith(".pt") or f == "skipped.tsv":
            os.remove(os.path.join(args.out, f))
    pattern = re.compile(args.ops) if args.ops else None
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n = 0
    skipped = []
    entries = [op for op in op_db if not pattern or pattern.search(entry_name(op))]
    if args.max_ops:
        entries = entries[: args.max_ops]
    for op in entries:
        variants = [(op.op, torch.float64, True), (op.op, torch.float32, False)]
        if op.inplace_variant is not None:
            variants.append((op.inplace_variant, torch.float64, False))
        for fn, dtype, full in variants:
            if dtype not in op.supported_dtypes("cpu"):
                if full:
                    skipped.append((entry_name(op), "float64 not supported on CPU"))
                continue
            try:
                samples = list(op.sample_inputs("cpu", dtype, requires_grad=False))[: args.samples]
            except Exception as e:
                skipped.append((entry_name(op), "no samples: " + str(e).split("\n")[0][:80]))
                continue
            for k, sample in enumerate(samples):
                try:
                    res, why = export_sample(op, fn, sample, dtype, gen, full)
                except Exception as e:  # the exporter's own limits, reported as such
                    res, why = None, "exporter: " + type(e).__name__ + ": " + last_message(str(e))[:100]
                if res is None:
                    if full or fn is not op.op:
                        skipped.append((entry_name(op) + ("" if fn is op.op else " (in-place)") + f" #{k}", why))
                    continue
                traced, data = res
                data = {k: plain(v) for k, v in data.items()}
                data["sample"] = k
                base = os.path.join(args.out, f"{n:05d}")
                traced.save(base + ".pt")
                torch.save(data, base + ".data.pt")
                n += 1
    with open(os.path.join(args.out, "skipped.tsv"), "w") as f:
        for name, why in skipped:
            f.write(f"{name}\t{why}\n")
    print(f"export: {n} cases from {len(entries)} OpInfo entries ({len(skipped)} samples skipped) in {args.out}")


if __name__ == "__main__":
    sys.exit(main())
