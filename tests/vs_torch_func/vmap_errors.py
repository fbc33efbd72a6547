#!/usr/bin/env python3
"""torchfunc's vmap errors next to torch.func's, message by message.

For the misuses a vmap user meets most (.item(), a data-dependent shape, an
in-place op into an unbatched tensor, requires_grad_() inside f, a random op
under randomness='error'), runs the same function under torch.func.vmap and
compares its message with torchfunc's, as docs/ERRORS.md records it (the
Misuse test keeps that file equal to what torchfunc raises on libtorch 2.13).
Each torchfunc message must name vmap, and must contain torch.func's own
text wherever torch.func's message is libtorch's (torchfunc adds to it,
never replaces it). Prints the table; exits 1 on a difference.
Usage: python tests/vs_torch_func/vmap_errors.py docs/ERRORS.md"""
import re
import sys

import torch
from torch.func import vmap

xs = torch.randn(4, 3)
acc = torch.zeros(3)
CASES = {
    ".item() on a batched Tensor": lambda t: t * t.sum().item(),
    "a data-dependent output shape (nonzero)": lambda t: torch.nonzero(t),
    "an in-place op into an unbatched Tensor": lambda t: acc.add_(t),
    "requires_grad_() inside f": lambda t: (t * 2).requires_grad_(),
    "a random op with the default randomness='error'": lambda t: t + torch.rand_like(t),
}


def ours(errors_md):
    rows = {}
    for line in open(errors_md, encoding="utf-8"):
        m = re.match(r"\| `vmap` \| (.*?) \| \*\*.*?\*\*<br>`(.*)` \|$", line.rstrip("\n"))
        if m:
            rows[m.group(1)] = m.group(2).replace("\\|", "|")
    return rows


def main():
    rows = ours(sys.argv[1])
    failed = []
    print("| misuse | torch.func 2.13 | names vmap (torch.func / torchfunc) | torchfunc keeps torch.func's text |")
    print("|---|---|---|---|")
    for misuse, fn in CASES.items():
        try:
            vmap(fn)(xs)
            sys.exit(f"vmap_errors.py: torch.func accepted '{misuse}'")
        except RuntimeError as e:
            theirs = str(e).strip().split("\n")[0]
        mine = rows.get(misuse)
        if mine is None:
            failed.append(f"{misuse}: no vmap row in {sys.argv[1]}")
            continue
        tf_names, tc_names = "vmap" in theirs, "vmap" in mine
        # torch.func's text is libtorch's (it raised from C++): torchfunc must keep it.
        keeps = theirs in mine
        special = misuse == "requires_grad_() inside f"  # libtorch checks this only in its Python binding
        ok = tc_names and (keeps or (special and "requires_grad_()" in mine))
        if not ok:
            failed.append(f"{misuse}:\n  torch.func: {theirs}\n  torchfunc:  {mine}")
        short = theirs if len(theirs) < 90 else theirs[:87] + "..."
        print(f"| {misuse} | `{short}` | {'yes' if tf_names else 'no'} / {'yes' if tc_names else 'no'} | "
              f"{'yes' if keeps else 'no (own message)'} |")
    if failed:
        print("\n".join(["", "DIFFER:"] + failed))
        sys.exit(1)
    print("\nall torchfunc vmap messages name vmap and keep torch.func's text")


if __name__ == "__main__":
    main()
