"""Memory saved and weight-gradient error of WTA-CRS vs CRS on one BERT-base-size linear layer.

The layer is the FFN input projection (768 → 3072) with random weights; its input rows have
log-normal norms (as real hidden states do) and its output gradient is random. Output gradient
norms are given to the sampler, as the gradient-norm cache would after the first epoch.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from wtacrs.cli.bench import positive_int, ratio_arg
from wtacrs.functional import sampled_linear
from wtacrs.memory import SavedTensorBytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--seq", type=positive_int, default=128)
    p.add_argument("--ratios", type=ratio_arg, nargs="+", default=[0.1, 0.3, 0.5])
    p.add_argument("--draws", type=positive_int, default=20, help="independent estimates per ratio and estimator")
    p.add_argument("--seed", type=int, default=0)


def _weight_grad(x, w, dy, **kwargs) -> tuple[torch.Tensor, int]:
    w.grad = None
    with SavedTensorBytes(exclude=[w]) as saved:
        y = sampled_linear(x, w, **kwargs) if kwargs else F.linear(x, w)
    y.backward(dy)
    return w.grad, saved.total


def run(args: argparse.Namespace) -> int:
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, args.seq, 768, generator=g) * torch.exp(
        0.7 * torch.randn(args.batch, args.seq, 1, generator=g))
    w = (torch.randn(3072, 768, generator=g) / 768**0.5).requires_grad_()
    dy = torch.randn(args.batch, args.seq, 3072, generator=g)
    exact, exact_bytes = _weight_grad(x, w, dy)
    print(f"layer 768->3072, {args.batch}x{args.seq} tokens, fp32; exact op saves {exact_bytes / 2**20:.1f} MiB")
    print(f"{'estimator':>9} {'ratio':>5} {'saved MiB':>9} {'saved x':>7} {'rel. error of dW':>16} {'ms/step':>7}")
    for ratio in args.ratios:
        for estimator in ("wta-crs", "crs"):
            errors, start = [], time.perf_counter()
            for _ in range(args.draws):
                est, nbytes = _weight_grad(
                    x, w, dy, ratio=ratio, estimator=estimator, grad_norm=dy.norm(dim=-1), generator=g
                )
                errors.append(float((est - exact).norm() / exact.norm()))
            ms = 1000 * (time.perf_counter() - start) / args.draws
            mean_error = sum(errors) / len(errors)
            print(f"{estimator:>9} {ratio:>5.2f} {nbytes / 2**20:>9.1f} {exact_bytes / nbytes:>6.1f}x "
                  f"{mean_error:>16.3f} {ms:>7.1f}")
    return 0
