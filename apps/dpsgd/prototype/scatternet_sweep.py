#!/usr/bin/env python3
"""Hyper-parameter sweeps for `torchfunc-dpsgd --preset scatternet`, in Python.

The preset's model is linear on fixed features, so its per-sample gradients
have a closed form (softmax error outer the features): a DP-SGD run costs
seconds of matrix products, and many configurations share one run's Poisson
batches and noise draws (common random numbers: differences between them are
less noisy than between separate runs). Features: kymatio 0.3's Scattering2D
(J = 2, L = 8; what apps/dpsgd/scattering.cpp is tested against), group norm
without affine part. sigma: Opacus's PRV accountant for --eps.

  pip install torch==2.13.0 kymatio==0.3.0 "scipy<1.15" opacus
  python scatternet_sweep.py --seeds 0,1,2,3,4 \
      --grid "[dict(lr=16, mom=0.9), dict(lr=16, mom=0.8), dict(lr=8, mom=0.9)]"

A grid entry: lr, mom (SGD momentum), clip (C), sched (const, cos, lin,
step: x0.1 for the last 20%). Prints each entry's test accuracy of the last
iterate and of an EMA of the weights (mean +- std over seeds, then each seed).

Whitening of the group-normalised features (apps/dpsgd/whitening.h):
--kron R whitens by the channels' (81 x 81) and positions' (49 x 49) second
moments of the features scaled to norm 1, regularised by R times their mean
eigenvalue, with --wnoise S Gaussian noise on each (the preset: R 1, S 8);
--whiten R by the full 3969 x 3969 second moment, without noise (not
private: an upper bound). Each example is then rescaled to its former norm.
This script keeps sigma at --eps without the whitening's privacy cost (the
C++ demo counts it: sigma 5.07 instead of 4.92 at epsilon 3).
"""
import argparse, gzip, json, math, os, time
import numpy as np
import torch


def load(split, data_dir):
    with gzip.open(os.path.join(data_dir, f"{split}-images-idx3-ubyte.gz")) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(os.path.join(data_dir, f"{split}-labels-idx1-ubyte.gz")) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    return torch.tensor(x).float() / 255, torch.tensor(y).long()


def features(path, data_dir):
    if os.path.exists(path):
        return torch.load(path)
    from kymatio.torch import Scattering2D
    S = Scattering2D(J=2, shape=(28, 28), L=8)
    out = {}
    for split in ["train", "t10k"]:
        x, y = load(split, data_dir)
        with torch.no_grad():
            f = torch.cat([S(x[i:i + 2000]).reshape(-1, 81, 7, 7) for i in range(0, len(x), 2000)])
        out[split] = (f, y)
    torch.save(out, path)
    return out


def inv_sqrt(S, lam, noise, gen):
    if noise > 0:
        Z = torch.randn(S.shape, generator=gen, dtype=torch.float64).triu()
        S = S + noise * (Z + Z.triu(1).T)
    ev, V = torch.linalg.eigh(S)
    return ((V * (ev.clamp(min=0) + lam).rsqrt()) @ V.T).float()


def whiten(Xtr, Xte, a):
    n = len(Xtr)
    U = Xtr / Xtr.norm(dim=1, keepdim=True)
    gen = torch.Generator().manual_seed(1234)
    if a.kron > 0:
        U = U.reshape(n, 81, -1)
        A = inv_sqrt(torch.einsum("npk,nqk->pq", U, U).double(), a.kron * n / 81, a.wnoise, gen)
        hw = U.shape[2]
        B = inv_sqrt(torch.einsum("nkp,nkq->pq", U, U).double(), a.kron * n / hw, a.wnoise, gen)
        tf = lambda X: (A @ X.reshape(len(X), 81, -1) @ B).reshape(len(X), -1)
    else:
        M = inv_sqrt((U.T @ U).double(), a.whiten * n / U.shape[1], 0, gen)
        tf = lambda X: X @ M
    r = Xtr.norm(dim=1).mean()
    out = []
    for X in (Xtr, Xte):
        X = tf(X)
        out.append(X * (r / X.norm(dim=1, keepdim=True)))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eps", type=float, default=3)
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--seeds", default="0")
    p.add_argument("--grid", required=True, help="a Python list of dicts (lr, mom, clip, sched)")
    p.add_argument("--groups", type=int, default=27)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--kron", type=float, default=0, help="Kronecker-factored whitening, this regularisation")
    p.add_argument("--whiten", type=float, default=0, help="full whitening (no noise), this regularisation")
    p.add_argument("--wnoise", type=float, default=0, help="noise multiplier of --kron's second moments")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--features", default="scatternet_features.pt", help="cache of the raw scattering features")
    a = p.parse_args()
    from opacus.accountants.utils import get_noise_multiplier
    torch.set_num_threads(a.threads)
    d = features(a.features, a.data_dir)
    prep = lambda f: torch.nn.functional.group_norm(f, a.groups).reshape(len(f), -1)
    Xtr, ytr = prep(d["train"][0]), d["train"][1]
    Xte, yte = prep(d["t10k"][0]), d["t10k"][1]
    if a.kron > 0 or a.whiten > 0:
        Xtr, Xte = whiten(Xtr, Xte, a)
    n, D = Xtr.shape
    B = a.batch
    q = B / n
    T = (n + B - 1) // B * a.epochs  # steps, as the demo counts them
    sigma = get_noise_multiplier(target_epsilon=a.eps, target_delta=1e-5, sample_rate=q, steps=T,
                                 accountant="prv", epsilon_tolerance=0.001)
    grid = eval(a.grid)
    K = len(grid)
    clip = torch.tensor([c.get("clip", 0.1) for c in grid])
    lr0 = [c.get("lr", 16.0) for c in grid]
    mom = torch.tensor([c.get("mom", 0.9) for c in grid])
    x2 = (Xtr * Xtr).sum(1) + 1  # |features|^2 + 1 (the bias)

    def accuracy(W, b):
        return ((torch.einsum("nd,kcd->knc", Xte, W) + b[:, None, :]).argmax(2) == yte).float().mean(1) * 100

    def factor(s, f):
        return {"cos": 0.5 * (1 + math.cos(math.pi * f)), "lin": 1 - f, "step": 0.1 if f >= 0.8 else 1.0}.get(s, 1.0)

    last, ema = [], []
    for seed in [int(s) for s in a.seeds.split(",")]:
        g = torch.Generator().manual_seed(seed)
        W = torch.zeros(K, 10, D); b = torch.zeros(K, 10)
        mW = torch.zeros_like(W); mb = torch.zeros_like(b)
        aW = W.clone(); ab = b.clone()
        t0 = time.time()
        for t in range(T):
            idx = (torch.rand(n, generator=g) < q).nonzero().squeeze(1)  # Poisson sampling
            X, y = Xtr[idx], ytr[idx]
            P = torch.softmax(torch.einsum("nd,kcd->knc", X, W) + b[:, None, :], 2)
            P[:, torch.arange(len(y)), y] -= 1  # d loss / d logits
            norm = (P * P).sum(2).mul(x2[idx]).sqrt()  # per-sample gradient norms [K, m]
            E = P * (clip[:, None] / (norm + 1e-12)).clamp(max=1)[:, :, None]
            zW, zb = torch.randn(10, D, generator=g), torch.randn(10, generator=g)
            gW = (torch.einsum("knc,nd->kcd", E, X) + zW * (sigma * clip)[:, None, None]) / B
            gb = (E.sum(1) + zb * (sigma * clip)[:, None]) / B
            lr = torch.tensor([lr0[k] * factor(c.get("sched", "const"), t / T) for k, c in enumerate(grid)])
            mW.mul_(mom[:, None, None]).add_(gW); mb.mul_(mom[:, None]).add_(gb)
            W -= lr[:, None, None] * mW; b -= lr[:, None] * mb
            dd = min(a.ema, (1 + t) / (10 + t))
            aW.mul_(dd).add_(W, alpha=1 - dd); ab.mul_(dd).add_(b, alpha=1 - dd)
        last.append(accuracy(W, b)); ema.append(accuracy(aW, ab))
        print(f"seed {seed}: {time.time() - t0:.0f} s", flush=True)
    L, E_ = torch.stack(last), torch.stack(ema)
    sd = lambda v: v.std().item() if len(v) > 1 else 0.0
    print(f"epsilon {a.eps} (PRV), batch {B}, epochs {a.epochs}, sigma {sigma:.3f}, groups {a.groups}")
    for k, c in enumerate(grid):
        print(json.dumps(c), f"last {L[:, k].mean():.2f} +- {sd(L[:, k]):.2f}  EMA {a.ema} {E_[:, k].mean():.2f} +- "
              f"{sd(E_[:, k]):.2f}  seeds:", " ".join(f"{v:.2f}" for v in L[:, k]))


if __name__ == "__main__":
    main()
