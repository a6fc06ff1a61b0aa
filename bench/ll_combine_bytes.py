"""CPU: bytes a low-latency combine moves per rank, per-expert (today's kernel) vs per-rank
(EPGEN_LL_COMBINE=per_rank), counted from DeepEP-style routes; and the symmetric footprint
(get_low_latency_rdma_size_hint at its default top-k, 11, and at the shape's, beside DeepEP's
LowLatencyLayout at 567632d). Counted, not timed: a prediction for a GPU run.

    python bench/ll_combine_bytes.py [--tokens 128 --hidden 7168 --topk 8 --experts 288]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ll_partial_precision import deepep_routes  # noqa: E402

from epgen.ops import low_latency as ll  # noqa: E402

MB = 1e6


def combine_bytes(idxs, R, El, H, K):
    """Per sending rank: (remote, local) bytes of each variant's combine writes."""
    row = 2 * H
    out = {"per_expert": [[0, 0] for _ in range(R)], "per_rank": [[0, 0] for _ in range(R)]}
    for owner, idx in enumerate(idxs):
        home = torch.where(idx >= 0, idx // El, torch.full_like(idx, -1))
        for j in range(R):
            side = 1 if j == owner else 0
            rows = int((home == j).sum())                 # (token, expert) rows j sends owner
            tokens = int((home == j).any(dim=1).sum())    # (token, rank j) partial rows
            out["per_expert"][j][side] += rows * row
            out["per_rank"][j][side] += tokens * row
            # routes: owner -> j, its [T][K] (expert, weight) pairs
            out["per_rank"][owner][side] += idx.shape[0] * K * 8
    return out


def deepep_hint(M, H, R, E):
    """DeepEP's get_low_latency_rdma_size_hint (csrc/config.hpp LowLatencyLayout, 567632d)."""
    S = H // 128
    disp_msg = 16 + max(H * 2, H + S * 4)
    comb_msg = S * 4 + H * 2
    send = max(M * disp_msg, E * M * comb_msg)
    recv = max(E * M * disp_msg, E * M * comb_msg)
    sig = (E * 4 + 127) // 128 * 128
    total = 2 * send + 2 * recv + 2 * sig
    return (total + 128) // 128 * 128


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=288)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    a = p.parse_args(argv)
    T, H, K, E = a.tokens, a.hidden, a.topk, a.experts
    print("| EP | per-expert remote / local MB | per-rank remote / local MB (routes incl.) "
          "| remote ratio |")
    print("|---|---|---|---|")
    for R in a.ranks:
        idxs = [deepep_routes(r, T, K, E, seed=R)[0] for r in range(R)]
        b = combine_bytes(idxs, R, E // R, H, K)
        old = [sum(v[i] for v in b["per_expert"]) / R for i in (0, 1)]
        new = [sum(v[i] for v in b["per_rank"]) / R for i in (0, 1)]
        print(f"| {R} | {old[0] / MB:.2f} / {old[1] / MB:.2f} | {new[0] / MB:.2f} / "
              f"{new[1] / MB:.2f} | {old[0] / new[0]:.2f}x |")
    print()
    print(f"| EP | epgen hint MB (top-k <= 11) | epgen hint MB (num_topk={K}) | DeepEP hint MB "
          "| epgen / DeepEP |")
    print("|---|---|---|---|---|")
    for R in a.ranks:
        ours, at_k = ll.low_latency_rdma_size_hint(T, H, R, E), \
            ll.low_latency_rdma_size_hint(T, H, R, E, K)
        theirs = deepep_hint(T, H, R, E)
        print(f"| {R} | {ours / MB:.0f} | {at_k / MB:.0f} | {theirs / MB:.0f} | "
              f"{ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
