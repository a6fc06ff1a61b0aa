"""The internode benchmark's routing and its byte counts, pure functions of the routing (CPU).

Routing: DeepEP's tests/test_internode.py (567632d), node-limited: scores |N(0,1)| + 1 per
(token, expert); a token's node score is its best expert's on that node; it keeps its top
`num_topk_groups` nodes and picks its top-k experts among theirs only, so no token's experts
span more than num_topk_groups nodes.

Bytes, as that test counts them (its "For later tuning" block), per rank and per dtype:
  rdma_send_bytes = (token, destination node) pairs * bytes per token: one row per token and
      node it goes to, its own node included (DeepEP's num_rdma_token_sent; the GB/s it prints
      as "RDMA" divide this by the time);
  nvl_recv_bytes = tokens this rank receives (recv_x rows) * bytes per token (the NVLink
      forwarding's output; DeepEP's "NVL" GB/s);
  combine moves the same counts back in BF16 (combine_bf16_rdma_recv_bytes =
      dispatch_bf16_rdma_send_bytes, combine_bf16_nvl_send_bytes = dispatch_bf16_nvl_recv_bytes).
Beside them, what crosses a NIC (pairs whose node is not the sender's own) and what per-rank
sending would move over the network (one row per token and destination *rank* on another
node): the ratio of the two is what the two-level path saves. Payload only, as DeepEP: the
records' source meta, top-k and scales are not counted.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from .. import formats


def check_routing(num_experts: int, num_ranks: int, ranks_per_node: int, num_topk: int,
                  num_topk_groups: int) -> None:
    """ValueError naming the argument, the value and the rule (bench flag names)."""
    R, L = num_ranks, ranks_per_node
    if not isinstance(L, int) or L < 1 or R % L:
        raise ValueError(f"--ranks-per-node={L!r}: must be a positive int dividing --ranks={R}")
    if R // L < 2:
        raise ValueError(f"--ranks-per-node={L}: must leave at least 2 nodes of --ranks={R} "
                         "(the internode mode spans nodes)")
    if num_experts % R:
        raise ValueError(f"--experts={num_experts}: must be a positive multiple of --ranks={R}")
    nodes = R // L
    if not 1 <= num_topk_groups <= nodes:
        raise ValueError(f"--topk-groups={num_topk_groups}: must be in [1, nodes={nodes}]")
    per_node = num_experts // nodes
    if num_topk > num_topk_groups * per_node:
        raise ValueError(f"--topk={num_topk}: must be <= --topk-groups={num_topk_groups} x "
                         f"{per_node} experts per node")


def node_limited_topk(num_tokens: int, num_experts: int, num_nodes: int, num_topk_groups: int,
                      num_topk: int, seed: int) -> torch.Tensor:
    """[num_tokens, num_topk] int64 expert ids on CPU (deterministic in `seed`), DeepEP's
    node-limited routing (module docstring); experts of node n are [n * E / nodes, ...)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(num_tokens, num_experts, generator=g).abs() + 1
    group_scores = scores.view(num_tokens, num_nodes, -1).amax(dim=-1)
    group_idx = torch.topk(group_scores, k=num_topk_groups, dim=-1, sorted=False).indices
    keep = torch.zeros(num_tokens, num_nodes, dtype=torch.bool).scatter_(1, group_idx, True)
    # Scores are >= 1, so a masked 0 is never chosen while num_topk fits the kept nodes.
    masked = (scores.view(num_tokens, num_nodes, -1) * keep.unsqueeze(-1)).view(num_tokens, -1)
    return torch.topk(masked, num_topk, dim=-1, sorted=False).indices.to(torch.int64)


@dataclasses.dataclass(frozen=True)
class Traffic:
    """One rank's counts (module docstring); *_bytes = the pairs times bytes_per_token."""
    rank: int
    tokens: int
    bytes_per_token: int
    token_nodes: int            # (token, destination node) pairs, own node included
    token_nodes_remote: int     # ... on other nodes: the rows this rank's NIC sends
    token_ranks: int            # (token, destination rank) pairs, own node included
    token_ranks_remote: int     # ... on other nodes: what per-rank sending would put on the NIC
    rdma_recv_tokens: int       # rows it receives as its node's RDMA receiver, own node's too
    rdma_recv_tokens_remote: int   # ... from other nodes: the rows its NIC receives
    nvl_recv_tokens: int        # recv_x rows

    @property
    def rdma_send_bytes(self) -> int:
        return self.token_nodes * self.bytes_per_token

    @property
    def nvl_recv_bytes(self) -> int:
        return self.nvl_recv_tokens * self.bytes_per_token

    @property
    def network_send_bytes(self) -> int:
        return self.token_nodes_remote * self.bytes_per_token

    @property
    def network_recv_bytes(self) -> int:
        return self.rdma_recv_tokens_remote * self.bytes_per_token

    @property
    def per_rank_network_bytes(self) -> int:
        return self.token_ranks_remote * self.bytes_per_token

    @property
    def rdma_ratio(self) -> Optional[float]:
        """network_send_bytes / per_rank_network_bytes (None when nothing leaves the node)."""
        return (self.token_nodes_remote / self.token_ranks_remote
                if self.token_ranks_remote else None)

    def record(self) -> dict:
        """The fields a benchmark record carries."""
        out = dataclasses.asdict(self)
        del out["rank"], out["tokens"]
        for name in ("rdma_send_bytes", "nvl_recv_bytes", "network_send_bytes",
                     "network_recv_bytes", "per_rank_network_bytes", "rdma_ratio"):
            out[name] = getattr(self, name)
        return out


def _destinations(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """[T, R] bool: the token has an expert on rank r (-1 entries go nowhere)."""
    T = topk_idx.shape[0]
    dest = torch.where(topk_idx >= 0, topk_idx // (num_experts // num_ranks),
                       torch.full_like(topk_idx, num_ranks))
    hits = torch.zeros(T, num_ranks + 1, dtype=torch.int64)
    hits.scatter_add_(1, dest.cpu(), torch.ones_like(dest.cpu()))
    return hits[:, :num_ranks] > 0


def count(topk_idxs: Sequence[torch.Tensor], num_experts: int, ranks_per_node: int, hidden: int,
          dtype: str = "bf16") -> list[Traffic]:
    """Every rank's Traffic for the routing topk_idxs[r] ([T_r, K] expert ids, -1 = none) of
    each rank r, nodes of ranks_per_node consecutive ranks, rows of `hidden` in wire format
    `dtype` (a formats name)."""
    R, L = len(topk_idxs), ranks_per_node
    if R % L:
        raise ValueError(f"ranks_per_node={L}: must divide the ranks ({R})")
    Nn = R // L
    bpt = formats.get(dtype, "dtype").bytes_per_token(hidden)
    to_rank = [_destinations(t, num_experts, R) for t in topk_idxs]
    to_node = [m.view(m.shape[0], Nn, L).any(dim=2) for m in to_rank]
    # recv[s, d]: tokens of rank s that go to rank d; node_recv[s, n]: ... to node n.
    recv = torch.stack([m.sum(dim=0) for m in to_rank])
    node_recv = torch.stack([m.sum(dim=0) for m in to_node])
    out = []
    for r in range(R):
        n, j = divmod(r, L)
        remote = [m for m in range(Nn) if m != n]
        # As RDMA receiver (n, j): rank (m, j)'s tokens for node n, every source node m.
        from_nodes = node_recv[[m * L + j for m in range(Nn)], n]
        out.append(Traffic(
            rank=r, tokens=int(topk_idxs[r].shape[0]), bytes_per_token=bpt,
            token_nodes=int(to_node[r].sum()),
            token_nodes_remote=int(to_node[r][:, remote].sum()),
            token_ranks=int(to_rank[r].sum()),
            token_ranks_remote=int(sum(to_rank[r][:, m * L:(m + 1) * L].sum() for m in remote)),
            rdma_recv_tokens=int(from_nodes.sum()),
            rdma_recv_tokens_remote=int(from_nodes.sum() - from_nodes[n]),
            nvl_recv_tokens=int(recv[:, r].sum())))
    return out


def routing(num_ranks: int, ranks_per_node: int, tokens: int, experts: int, topk: int,
            topk_groups: int, seed: int = 0) -> list[torch.Tensor]:
    """Every rank's topk_idx for the benchmark (rank r's from seed + r), so each rank can
    regenerate them all and the records' counts are of the routing that ran."""
    check_routing(experts, num_ranks, ranks_per_node, topk, topk_groups)
    return [node_limited_topk(tokens, experts, num_ranks // ranks_per_node, topk_groups, topk,
                              seed + r) for r in range(num_ranks)]


def summary(traffic: Sequence[Traffic]) -> dict:
    """Mean and max over ranks of each byte count, and the ratio of the sums."""
    out: dict = {}
    for name in ("rdma_send_bytes", "nvl_recv_bytes", "network_send_bytes", "network_recv_bytes",
                 "per_rank_network_bytes"):
        vals = [getattr(t, name) for t in traffic]
        out[name] = dict(mean=sum(vals) / len(vals), max=max(vals))
    sent = sum(t.token_nodes_remote for t in traffic)
    per_rank = sum(t.token_ranks_remote for t in traffic)
    out["rdma_ratio"] = sent / per_rank if per_rank else None
    out["bytes_per_token"] = traffic[0].bytes_per_token
    return out
