#!/usr/bin/env python3
"""Writes tests/data/scattering_kymatio.json: kymatio's Scattering2D features
of a few seeded random images (the inputs are stored too), for three
settings. The C++ Scattering2D (apps/dpsgd/scattering.cpp) is tested against
this file (tests/test_scattering.cpp). Needs torch and kymatio:
pip install kymatio==0.3.0 (kymatio's 3-D part imports a function that new
scipy lacks, so the 2-D frontend is imported directly)."""
import json
import os

import numpy as np
import torch
import kymatio
from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scattering_kymatio.json")


def main():
    rng = np.random.default_rng(2021)
    cases = []
    for M, N, J, L in ((28, 28, 2, 8), (16, 20, 2, 8), (32, 32, 3, 4)):
        x = rng.random((2, M, N)).astype(np.float32)
        S = ScatteringTorch2D(J=J, shape=(M, N), L=L)
        y = S(torch.tensor(x, dtype=torch.float32))  # [2, K, M/2^J, N/2^J]; kymatio computes in float32
        cases.append({"M": M, "N": N, "J": J, "L": L, "input": [float(f"{v:.9g}") for v in x.ravel()],
                      "shape": list(y.shape), "output": [float(f"{v:.8g}") for v in y.numpy().ravel()]})
    with open(OUT, "w") as f:
        json.dump({"kymatio": kymatio.__version__, "torch": torch.__version__, "cases": cases}, f)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
