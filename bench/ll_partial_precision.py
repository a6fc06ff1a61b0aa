"""CPU: how far a per-rank LL combine with BF16 (or float32) partial sums lands from the float64
truth, by DeepEP's own measure (calc_diff of tests/utils.py at 567632d; its low-latency test
asserts < 1e-5 for a BF16 dispatch + combine). Inputs as DeepEP's tests/test_low_latency.py
makes them: its three x kinds, |randn| weights, sorted top-k of |randn| + 1 scores, a few -1;
the simulated GEMM returns the dispatched row unchanged, so every expert's y is the token.

    python bench/ll_partial_precision.py [--tokens 128 --hidden 7168 --topk 8 --experts 288]
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from epgen import reference as ref  # noqa: E402


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepEP tests/utils.py calc_diff, verbatim."""
    x, y = x.double() + 1, y.double() + 1
    denominator = (x * x + y * y).sum()
    sim = 2 * (x * y).sum() / denominator
    return (1 - sim).item()


def deepep_routes(rank, T, K, E, seed, g=None):
    """DeepEP's top-k and weights for `rank` (test_low_latency.py's recipe: sorted top-k of
    |randn| + 1 scores, |randn| weights, 10 slots set to -1)."""
    random.seed(seed + rank)
    g = g or torch.Generator().manual_seed(seed + rank)
    scores = torch.randn(T, E, generator=g).abs() + 1
    idx = torch.topk(scores, K, dim=-1, largest=True, sorted=True)[1]
    w = torch.randn(T, K, generator=g).abs()
    for _ in range(10):
        idx[random.randint(0, T - 1), random.randint(0, K - 1)] = -1
    return idx, w


def deepep_inputs(rank, T, H, K, E, seed):
    """DeepEP's x list for `rank`, its top-k and weights (test_low_latency.py's recipe)."""
    random.seed(seed + rank)
    g = torch.Generator().manual_seed(seed + rank)
    x = torch.ones(T, H, dtype=torch.bfloat16) * (rank - 128)
    x[:, -128:] = torch.arange(T).to(torch.bfloat16).view(-1, 1)
    xs = [x, (torch.randn(T, H, generator=g) * 0.5 * random.random()).to(torch.bfloat16),
          (torch.randn(T, H, generator=g) * 0.1).to(torch.bfloat16)]
    idx, w = deepep_routes(rank, T, K, E, seed, g)
    return xs, idx, w


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=288)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    a = p.parse_args(argv)
    T, H, K, E = a.tokens, a.hidden, a.topk, a.experts
    print("| EP | x | per-expert (today) | per-rank, float32 partials | per-rank, BF16 partials |")
    print("|---|---|---|---|---|")
    for R in a.ranks:
        xs, idx, w = deepep_inputs(0, T, H, K, E, seed=R)
        for name, x in zip(("rank - 128, token id", "randn * 0.5 * rand", "randn * 0.1"), xs):
            y = x.float().unsqueeze(1).expand(T, K, H)
            wm = w.masked_fill(idx < 0, 0).double()
            truth = (x.double().unsqueeze(1) * wm.unsqueeze(2)).sum(dim=1)
            old = ref.sum_rows_per_expert(y, idx, w).to(torch.bfloat16)
            new = [ref.sum_rows_per_rank(y, idx, w, E // R, R, dt).to(torch.bfloat16)
                   for dt in (torch.float32, torch.bfloat16)]
            print(f"| {R} | {name} | {calc_diff(truth, old):.3g} | {calc_diff(truth, new[0]):.3g}"
                  f" | {calc_diff(truth, new[1]):.3g} |")


if __name__ == "__main__":
    main()
