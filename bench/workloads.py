#!/usr/bin/env python3
"""The WORKLOADS.md cases (W1-W10; W10 on Opacus) on Python's torch.func (torch >= 2.0) or
functorch (Debian's python3-torch 1.13): the Python side of bench/run.py.
Same cases, shapes, data and protocol as bench/torchfunc_bench.cpp.

  python3 bench/workloads.py --list
  python3 bench/workloads.py --case W2/vmap --threads 1 --reps 50
"""
import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # torch >= 2.0
    from torch.func import grad, vmap, jvp, vjp, jacrev, jacfwd, hessian, functional_call, stack_module_state
    API = "torch.func"
except ImportError:  # functorch on torch 1.13
    from functorch import grad, vmap, jvp, vjp, jacrev, jacfwd, hessian, combine_state_for_ensemble
    from torch.nn.utils.stateless import functional_call
    stack_module_state = None
    API = "functorch"


class Cnn(nn.Module):  # W1
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3), nn.Conv2d(32, 64, 3)
        self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = F.max_pool2d(x, 2).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def mlp(i, h, o):
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, o))


class NtkCnn(nn.Module):  # W7
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 32, 3), nn.Conv2d(32, 32, 3), nn.Conv2d(32, 32, 3)
        self.fc = nn.Linear(32 * 26 * 26, 10)

    def forward(self, x):
        return self.fc(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))).flatten(1))


def predict(W, b, x):
    return torch.tanh(F.linear(x, W, b))


def nll(logits, y):
    return F.nll_loss(F.log_softmax(logits, 1), y)


def params_of(model):
    return {k: v.detach() for k, v in model.named_parameters()}


DEVICE = "cpu"  # --device: W1, W2 and W9 run there (scripts/gpu-check.sh uses cuda)


def per_sample(make, shape):
    def setup_vmap():
        model = make().to(DEVICE)
        x, y = torch.randn(shape, device=DEVICE), torch.randint(10, (shape[0],), device=DEVICE)
        params = params_of(model)

        def loss(p, xi, yi):
            return nll(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))
        f = vmap(grad(loss), in_dims=(None, 0, 0))
        return lambda: f(params, x, y)

    def setup_loop():
        model = make().to(DEVICE)
        x, y = torch.randn(shape, device=DEVICE), torch.randint(10, (shape[0],), device=DEVICE)
        ps = list(model.parameters())

        def run():
            per = [[] for _ in ps]
            for i in range(x.shape[0]):
                g = torch.autograd.grad(nll(model(x[i].unsqueeze(0)), y[i].unsqueeze(0)), ps)
                for k, gk in enumerate(g):
                    per[k].append(gk)
            [torch.stack(v) for v in per]
        return run
    return setup_vmap, setup_loop


def rows(W, b, x):
    xr = x.detach().requires_grad_(True)
    y = predict(W, b, xr)
    return torch.stack([torch.autograd.grad(y[i], xr, retain_graph=True)[0] for i in range(y.shape[0])])


def jac_inputs(din, dout):
    return torch.randn(dout, din), torch.randn(dout), torch.randn(din)


def batch_inputs():
    return torch.randn(33, 31), torch.randn(33), torch.randn(64, 31)


def cases():
    c = {}
    c["W1/vmap"], c["W1/loop"] = per_sample(Cnn, (64, 1, 28, 28))
    c["W2/vmap"], c["W2/loop"] = per_sample(lambda: mlp(784, 512, 10), (256, 784))
    # torchfunc's W*/compiled cases (torchfunc/compile.h) against torch.func's eager transforms.
    c["W1/compiled"], c["W2/compiled"] = c["W1/vmap"], c["W2/vmap"]

    def w3_vmap():
        models = [mlp(784, 128, 10) for _ in range(10)]
        x = torch.randn(64, 784)
        if stack_module_state is not None:
            p, b = stack_module_state(models)
            p = {k: v.detach() for k, v in p.items()}  # inference, as on functorch 1.13 (see the C++ side)
            base = models[0]

            def fmodel(pp, bb, xx):
                return functional_call(base, (pp, bb), (xx,))
            f = vmap(fmodel, in_dims=(0, 0, None))
            return lambda: f(p, b, x)
        fmodel, p, b = combine_state_for_ensemble(models)
        f = vmap(fmodel, in_dims=(0, 0, None))
        return lambda: f(p, b, x)

    def w3_loop():
        models = [mlp(784, 128, 10) for _ in range(10)]
        x = torch.randn(64, 784)
        return lambda: torch.stack([m(x) for m in models])
    c["W3/vmap"], c["W3/loop"] = w3_vmap, w3_loop

    def w4(kind):
        def setup():
            W, b, x = jac_inputs(256, 256)
            if kind == "rows":
                return lambda: rows(W, b, x)
            f = (jacrev if kind == "jacrev" else jacfwd)(predict, argnums=2)
            return lambda: f(W, b, x)
        return setup
    for k in ("jacrev", "jacfwd", "rows"):
        c["W4/" + k] = w4(k)

    def w5(kind):
        def setup():
            W, b, x = batch_inputs()
            if kind == "loop":
                return lambda: [rows(W, b, x[i]) for i in range(x.shape[0])]
            f = vmap((jacrev if kind == "vmap_jacrev" else jacfwd)(predict, argnums=2), in_dims=(None, None, 0))
            return lambda: f(W, b, x)
        return setup
    for k in ("vmap_jacrev", "vmap_jacfwd", "loop"):
        c["W5/" + k] = w5(k)

    def w6_hessian():
        W, b, x = jac_inputs(16, 16)
        f = hessian(predict, argnums=2)
        return lambda: f(W, b, x)

    def w6_revrev():
        W, b, x = jac_inputs(16, 16)
        f = jacrev(jacrev(predict, argnums=2), argnums=2)
        return lambda: f(W, b, x)

    def w6_vmap():
        W, b, x = batch_inputs()
        f = vmap(hessian(lambda W, b, xi: predict(W, b, xi).sum(), argnums=2), in_dims=(None, None, 0))
        return lambda: f(W, b, x)

    def w6_rows():
        W, b, x = jac_inputs(16, 16)

        def run():
            xr = x.detach().requires_grad_(True)
            y = predict(W, b, xr)
            out = []
            for i in range(16):
                g = torch.autograd.grad(y[i], xr, retain_graph=True, create_graph=True)[0]
                out.append(torch.stack([torch.autograd.grad(g[j], xr, retain_graph=True)[0] for j in range(16)]))
            torch.stack(out)
        return run
    c["W6/hessian"], c["W6/jacrev_jacrev"], c["W6/vmap_hessian"], c["W6/rows"] = w6_hessian, w6_revrev, w6_vmap, w6_rows

    def w7():
        net = NtkCnn()
        params = params_of(net)
        x1, x2 = torch.randn(20, 3, 32, 32), torch.randn(5, 3, 32, 32)

        def f_single(p, x):
            return functional_call(net, p, (x.unsqueeze(0),)).squeeze(0)
        jac = vmap(jacrev(f_single), (None, 0))

        def run():
            j1, j2 = jac(params, x1), jac(params, x2)
            sum(torch.einsum("Naf,Mbf->NMab", j1[k].flatten(2), j2[k].flatten(2)) for k in j1)
        return run
    c["W7/vmap_jacrev"] = w7

    def w8(transforms, mse=False):
        def setup():
            net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
            params = params_of(net)
            xs, ys, xq, yq = (torch.randn(8, 10, 1) for _ in range(4))

            def loss(p, x, y):
                pred = functional_call(net, p, (x,))
                return F.mse_loss(pred, y) if mse else (pred - y).pow(2).mean()
            if transforms:
                def task(p, a, b, c_, d):
                    g = grad(loss)(p, a, b)
                    return loss({k: p[k] - 0.1 * g[k] for k in p}, c_, d)
                meta = grad(lambda p, a, b, c_, d: vmap(task, in_dims=(None, 0, 0, 0, 0))(p, a, b, c_, d).mean())
                return lambda: meta(params, xs, ys, xq, yq)
            ps = list(net.parameters())
            names = [k for k, _ in net.named_parameters()]

            def run():
                total = 0
                for i in range(8):
                    g = torch.autograd.grad((net(xs[i]) - ys[i]).pow(2).mean(), ps, create_graph=True)
                    q = {n: p - 0.1 * gk for n, p, gk in zip(names, ps, g)}
                    total = total + (functional_call(net, q, (xq[i],)) - yq[i]).pow(2).mean()
                torch.autograd.grad(total / 8, ps)
            return run
        return setup
    c["W8/vmap_grad"], c["W8/vmap_grad_mse"], c["W8/loop"] = w8(True), w8(True, mse=True), w8(False)
    c["W8/compiled"] = c["W8/vmap_grad"]

    # functorch's aot_autograd tutorial case: cos(cos(a + b + c + d)), 16 blocks h = f(h, b, c, d),
    # forward and backward.
    # Python side: eager autograd, and functorch.compile.aot_function with the nop compiler
    # (default partition, or min-cut rematerialisation, which needs networkx).
    def aot_cos(mode):
        def setup():
            xs = [torch.randn(1 << 21, requires_grad=True) for _ in range(4)]

            def fn(a, b, c_, d):
                return (a + b + c_ + d).cos().cos()
            f = fn
            if mode != "eager":
                from functorch.compile import aot_function, nop, min_cut_rematerialization_partition, default_partition
                part = min_cut_rematerialization_partition if mode == "min_cut" else default_partition
                f = aot_function(fn, fw_compiler=nop, bw_compiler=nop, partition_fn=part)
            def run():
                h = xs[0]
                for _ in range(16):
                    h = f(h, xs[1], xs[2], xs[3])
                torch.autograd.grad(h.sum(), xs)
            return run
        return setup
    for mode in ("eager", "aot", "min_cut"):
        c["AOT/cos_cos/" + mode] = aot_cos(mode)

    def w9_grad():
        x, f = torch.randn((), device=DEVICE), grad(torch.sin)
        return lambda: f(x)

    def w9_vmap():
        x, f = torch.randn(64, device=DEVICE), vmap(torch.sin)
        return lambda: f(x)

    def w9_jvp():
        x, t = torch.randn(64, device=DEVICE), torch.randn(64, device=DEVICE)
        return lambda: jvp(torch.sin, (x,), (t,))

    def w9_vjp():
        x, ct = torch.randn(64, device=DEVICE), torch.randn(64, device=DEVICE)

        def run():
            out, fn = vjp(torch.sin, x)
            fn(ct)
        return run

    def w9_autograd():
        x = torch.randn((), device=DEVICE)

        def run():
            xr = x.detach().requires_grad_(True)
            torch.autograd.grad(torch.sin(xr), xr)
        return run
    c["W9/grad_sin"], c["W9/vmap_sin"], c["W9/jvp_sin"], c["W9/vjp_sin"], c["W9/autograd_sin"] = (
        w9_grad, w9_vmap, w9_jvp, w9_vjp, w9_autograd)
    for model in ("cnn", "mlp"):
        for batch in (256, 2048):
            tail = f"/{model}/{batch}"
            c["W10/nonprivate_step" + tail] = w10("plain", model, batch)
            c["W10/dp_step" + tail] = w10("ghost", model, batch)
            c["W10/dp_step_vmap" + tail] = w10("hooks", model, batch)
    return c


def dpsgd_cnn():  # apps/dpsgd/model.h: the CNN of Papernot et al.
    return nn.Sequential(nn.Conv2d(1, 16, 8, stride=2, padding=2), nn.Tanh(), nn.MaxPool2d(2, 1),
                         nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1), nn.Flatten(),
                         nn.Linear(32 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, 10))


OPACUS = None  # "opacus <version> <mode>" for the W10 cases' Python side


def w10(kind, model_name, batch):
    """W10: one step on a batch of exactly B examples, SGD with momentum 0.9.
    plain: PyTorch's non-private step. ghost: Opacus's fast gradient clipping
    (its fastest mode: ghost norms for Linear, per-sample gradients for the
    rest, two backward passes). hooks: Opacus's default (per-sample gradients
    of every layer from hooks). Both: clip C = 1, noise sigma = 1."""
    def setup():
        global OPACUS
        model = dpsgd_cnn() if model_name == "cnn" else mlp(784, 512, 10)
        x = torch.randn((batch, 1, 28, 28) if model_name == "cnn" else (batch, 784))
        y = torch.randint(10, (batch,))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()
        if kind != "plain":
            import warnings
            import opacus
            from torch.utils.data import DataLoader, TensorDataset
            warnings.filterwarnings("ignore", module="opacus")  # its per-call warnings would be timed too
            warnings.filterwarnings("ignore", message="Full backward hook")
            OPACUS = f"opacus {opacus.__version__} {kind}"
            loader = DataLoader(TensorDataset(x, y), batch_size=batch)  # expected batch size B
            private = opacus.PrivacyEngine().make_private(
                module=model, optimizer=opt, data_loader=loader, criterion=loss_fn, noise_multiplier=1.0,
                max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=kind)
            model, opt = private[0], private[1]
            if kind == "ghost":
                loss_fn = private[2]  # its loss runs both backward passes

        def run():
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        return run
    return setup


def run_case(name, setup, reps, min_time):
    torch.manual_seed(0)
    inner = setup()
    if DEVICE != "cpu":
        def call():  # time whole calls: wait for the GPU after each
            inner()
            torch.cuda.synchronize()
    else:
        call = inner
    for _ in range(max(1, min(5, reps // 10))):
        call()
    us = []
    start = time.perf_counter()
    while len(us) < reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        call()
        us.append((time.perf_counter() - t0) * 1e6)
        if len(us) >= reps * 20:
            break
    return {"case": name, "side": "python", "median_us": statistics.median(us), "min_us": min(us), "reps": len(us),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "api": OPACUS or API, "device": DEVICE}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case")
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--min-time", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (W1, W2, W9 only)")
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    if DEVICE != "cpu" and a.case and a.case.split("/")[0] not in ("W1", "W2", "W9"):
        print(f"workloads.py: case {a.case} runs on the CPU only", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    cs = cases()
    if a.list:
        print("\n".join(cs))
        return 0
    names = list(cs) if a.all else [a.case]
    for n in names:
        if n not in cs:
            print(f"workloads.py: no case {n!r}", file=sys.stderr)
            return 2
        print(json.dumps(run_case(n, cs[n], a.reps, a.min_time)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
