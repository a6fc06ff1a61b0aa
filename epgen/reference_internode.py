"""Pure-torch golden model of the two-level (internode) normal mode: RDMA between nodes, NVLink
forwarding inside a node (DeepEP V1's internode_dispatch / internode_combine, commit 567632d).

Kept apart from reference.py (the one-level model it builds on, and compares against) for size.
Global view as there: lists indexed by group rank of every rank's inputs, plus the rank whose
outputs are wanted. Notation: R ranks, L ranks per node (any L), Nn = R // L nodes; rank r is
local rank r % L of node r // L (epgen/runtime/topology.py); C channels (Config.num_sms // 2);
T tokens of a rank. Channel c of a rank's tokens is [c * ceil(T/C), ...) clipped to T
(DeepEP's get_channel_task_range).

The path a token t of rank s = (m, j) takes to rank d = (n, l) (DeepEP's): one RDMA message to
rank (n, j) (same local index, "the RDMA receiver / forwarder") per destination *node* n, then
NVLink from (n, j) to every rank of node n the token goes to. Combine runs it backwards: each
forwarder (n, j) sums the rows of node n's ranks for the token (float32, local ranks ascending)
and rounds once to the row dtype (what crosses the network: one BF16 row per (token, node), as
DeepEP); the owner adds bias_0 + bias_1 and the node partials (float32, nodes ascending) and
rounds once more. So the combined row equals the one-level reference's wherever no node
partial rounds (a token on at most one rank per node, or exactly representable sums), and
otherwise differs by at most one rounding of each node partial.

The handle (DeepEP's 10-tuple, in its order; every value is deterministic given C: DeepEP's
per-channel ring positions are all counted per (channel, source node), never in the
interleaved order its warps happen to run in, so epgen returns the same numbers):
  0 is_token_in_rank [T, R] bool: the argument.
  1 rdma_channel_prefix_matrix [Nn, C] int32: [n][c] = this rank's tokens in channels 0..c that go
    to some rank of node n (inclusive prefix over channels).
  2 gbl_channel_prefix_matrix [R, C] int32: [r][c] = this rank's tokens in channels 0..c that go
    to rank r (inclusive).
  3 recv_rdma_channel_prefix_matrix [Nn, C] int32: as RDMA receiver (n, l) of node n's traffic from
    rank (m, l): [m][c] = that rank's rdma_channel_prefix_matrix[n][c].
  4 recv_rdma_rank_prefix_sum [Nn] int32: [m] = tokens this rank receives over RDMA from ranks
    (0..m, l) (inclusive); the last is num_rdma_recv_tokens.
  5 recv_gbl_channel_prefix_matrix [R, C] int32: [s][c] = the first recv_x row of rank s's
    channel-c tokens = recv_gbl_rank_prefix_sum[s - 1] + s's gbl_channel_prefix_matrix[me][c - 1]
    (terms of index -1 are 0): an exclusive prefix, unlike 1 and 2.
  6 recv_gbl_rank_prefix_sum [R] int32: [s] = tokens this rank receives from ranks 0..s
    (inclusive), i.e. column `rank` of the one-level rank_prefix_matrix.
  7 recv_src_meta [N, 4 + 4 * ceil(L / 32)] uint8: per recv_x row, little-endian int32 source node,
    then int32 words of bits: bit k = the token goes to local rank k of this rank's node. For
    L <= 32 this is DeepEP's 8-byte SourceMeta exactly.
  8 send_rdma_head [T, Nn] int32: [t][n] = t's position in the RDMA stream of (t's channel, node
    n) (its index among the channel's tokens going to node n), -1 when t does not go to node n.
  9 send_nvl_head [num_rdma_recv_tokens, L] int32 (DeepEP: [.., 8]): row i = the i-th token this
    rank received over RDMA (source nodes ascending, then source token), [i][k] = its position
    in the NVLink stream of (its channel, its source node) to local rank k (its index among
    that stream's tokens going to k), -1 when it does not go to local rank k. DeepEP's combine
    rewrites the -1 entries of 8 and 9 in place on its first use; epgen leaves the handle as
    dispatch returned it.
recv_x is ordered by source rank, then source token, exactly as the one-level dispatch.
num_worst_tokens > 0: recv_* and recv_src_meta have num_worst_tokens rows and send_nvl_head
too (DeepEP sizes both receive counts by it); rows past the valid ones are unspecified (here
zeros / -1, recv_topk_idx -1).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from . import reference as ref

Tensors = Sequence[torch.Tensor]


# ------------------------------------------------------------------------------------------------
# Layout and channels
# ------------------------------------------------------------------------------------------------
def channel_ranges(num_tokens: int, num_channels: int) -> list[tuple[int, int]]:
    """[(start, end)] of each channel's tokens (DeepEP's get_channel_task_range)."""
    per = -(-num_tokens // num_channels)
    out = []
    for c in range(num_channels):
        start = min(per * c, num_tokens)
        out.append((start, min(start + per, num_tokens)))
    return out


def node_mask(is_token_in_rank: torch.Tensor, ranks_per_node: int) -> torch.Tensor:
    """[T, Nn] bool: the token goes to some rank of node n."""
    T, R = is_token_in_rank.shape
    if R % ranks_per_node:
        raise ValueError(f"ranks_per_node={ranks_per_node} must divide num_ranks={R}")
    return is_token_in_rank.view(T, R // ranks_per_node, ranks_per_node).any(dim=2)


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int,
                        ranks_per_node: int):
    """DeepEP's get_dispatch_layout across nodes: (num_tokens_per_rank [R], num_tokens_per_rdma_rank
    [Nn], num_tokens_per_expert [E], is_token_in_rank [T, R]); num_tokens_per_rdma_rank[n] counts
    tokens once per node they touch."""
    per_rank, per_expert, in_rank = ref.get_dispatch_layout(topk_idx, num_experts, num_ranks)
    per_node = node_mask(in_rank, ranks_per_node).sum(dim=0).to(torch.int32)
    return per_rank, per_node, per_expert, in_rank


def _channel_prefix(mask: torch.Tensor, num_channels: int) -> torch.Tensor:
    """[X, C] int32: tokens with mask[:, x] in channels 0..c (inclusive)."""
    T, X = mask.shape
    counts = torch.zeros(X, num_channels, dtype=torch.int64, device=mask.device)
    for c, (s, e) in enumerate(channel_ranges(T, num_channels)):
        counts[:, c] = mask[s:e].sum(dim=0)
    return counts.cumsum(dim=1).to(torch.int32)


def _stream_index(mask: torch.Tensor, num_channels: int) -> torch.Tensor:
    """[T, X] int32: the token's index among its channel's tokens with mask[:, x], or -1."""
    T, X = mask.shape
    out = torch.full((T, X), -1, dtype=torch.int32, device=mask.device)
    for s, e in channel_ranges(T, num_channels):
        m = mask[s:e].to(torch.int64)
        idx = (m.cumsum(dim=0) - 1).to(torch.int32)
        out[s:e] = torch.where(m.bool(), idx, out[s:e])
    return out


def source_meta_bytes(ranks_per_node: int) -> int:
    return 4 + 4 * (-(-ranks_per_node // 32))


def _source_meta(src_node: int, in_my_node: torch.Tensor) -> torch.Tensor:
    """[T, meta bytes] uint8 for tokens of source node `src_node`; in_my_node [T, L] bool."""
    T, L = in_my_node.shape
    words = -(-L // 32)
    bits = torch.zeros(T, words, dtype=torch.int64, device=in_my_node.device)
    for k in range(L):
        bits[:, k // 32] |= in_my_node[:, k].to(torch.int64) << (k % 32)
    bits = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits)      # as int32 bit patterns
    meta = torch.cat([torch.full((T, 1), src_node, dtype=torch.int64, device=bits.device), bits],
                     dim=1).to(torch.int32)
    return meta.contiguous().view(torch.uint8).view(T, 4 * (1 + words))


def decode_source_meta(meta: torch.Tensor, ranks_per_node: int) -> tuple[torch.Tensor, torch.Tensor]:
    """recv_src_meta -> (source node [N] int32, goes-to-local-rank [N, L] bool)."""
    words = meta.contiguous().view(torch.int32).view(meta.shape[0], meta.shape[1] // 4)
    words = words.to(torch.int64) & 0xFFFFFFFF
    k = torch.arange(ranks_per_node, device=meta.device)
    bits = (words[:, 1 + k // 32] >> (k % 32)) & 1
    return words[:, 0].to(torch.int32), bits.bool()


# ------------------------------------------------------------------------------------------------
# The handle
# ------------------------------------------------------------------------------------------------
class InternodeHandle(NamedTuple):
    is_token_in_rank: torch.Tensor
    rdma_channel_prefix_matrix: torch.Tensor
    gbl_channel_prefix_matrix: torch.Tensor
    recv_rdma_channel_prefix_matrix: torch.Tensor
    recv_rdma_rank_prefix_sum: torch.Tensor
    recv_gbl_channel_prefix_matrix: torch.Tensor
    recv_gbl_rank_prefix_sum: torch.Tensor
    recv_src_meta: torch.Tensor
    send_rdma_head: torch.Tensor
    send_nvl_head: torch.Tensor


def _rdma_stream(is_token_in_ranks: Tensors, L: int, receiver: int) -> list[tuple[int, torch.Tensor]]:
    """What RDMA receiver `receiver` = (n, j) gets: for each source node m ascending, the
    ascending tokens of rank (m, j) that go to node n."""
    n, j = divmod(receiver, L)
    Nn = len(is_token_in_ranks) // L
    return [(m, torch.nonzero(node_mask(is_token_in_ranks[m * L + j], L)[:, n]).flatten())
            for m in range(Nn)]


def dispatch_handle(is_token_in_ranks: Tensors, ranks_per_node: int, num_channels: int,
                    rank: int, num_worst_tokens: int = 0) -> InternodeHandle:
    """The handle rank `rank`'s internode dispatch returns (see the module docstring)."""
    L, R, C = ranks_per_node, len(is_token_in_ranks), num_channels
    Nn = R // L
    n, l = divmod(rank, L)
    mine = is_token_in_ranks[rank]
    dev = mine.device
    mine_nodes = node_mask(mine, L)
    rdma_prefix = _channel_prefix(mine_nodes, C)
    gbl_prefix = _channel_prefix(mine, C)
    send_rdma_head = _stream_index(mine_nodes, C)

    # As RDMA receiver of node n's traffic from ranks (m, l).
    sources = [is_token_in_ranks[m * L + l] for m in range(Nn)]
    recv_rdma_prefix = torch.stack([_channel_prefix(node_mask(s, L), C)[n] for s in sources])
    recv_rdma_rank_prefix_sum = torch.tensor(
        [int(node_mask(s, L)[:, n].sum()) for s in sources], dtype=torch.int64,
        device=dev).cumsum(0).to(torch.int32)
    heads = []
    for m, toks in _rdma_stream(is_token_in_ranks, L, rank):
        in_node = sources[m][:, n * L:(n + 1) * L]          # [T_src, L]
        heads.append(_stream_index(in_node, C)[toks])
    send_nvl_head = torch.cat(heads) if heads else torch.zeros(0, L, dtype=torch.int32)

    # As final receiver: one-level order, offsets per (source rank, channel).
    counts = torch.tensor([int(m[:, rank].sum()) for m in is_token_in_ranks], dtype=torch.int64,
                          device=dev)
    recv_gbl_rank_prefix_sum = counts.cumsum(0).to(torch.int32)
    start = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), counts.cumsum(0)[:-1]])
    recv_gbl_prefix = torch.zeros(R, C, dtype=torch.int32, device=dev)
    metas = []
    for s, m in enumerate(is_token_in_ranks):
        to_me = _channel_prefix(m[:, rank:rank + 1], C)[0].to(torch.int64)    # inclusive
        exclusive = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), to_me[:-1]])
        recv_gbl_prefix[s] = (start[s] + exclusive).to(torch.int32)
        toks = torch.nonzero(m[:, rank]).flatten()
        metas.append(_source_meta(s // L, m[toks][:, n * L:(n + 1) * L]))
    recv_src_meta = torch.cat(metas)
    if num_worst_tokens:
        recv_src_meta = ref._pad_rows(recv_src_meta, num_worst_tokens)
        send_nvl_head = ref._pad_rows(send_nvl_head, num_worst_tokens, fill=-1)
    return InternodeHandle(mine, rdma_prefix, gbl_prefix, recv_rdma_prefix,
                           recv_rdma_rank_prefix_sum, recv_gbl_prefix, recv_gbl_rank_prefix_sum,
                           recv_src_meta, send_rdma_head, send_nvl_head)


# ------------------------------------------------------------------------------------------------
# Dispatch, along the two-level path
# ------------------------------------------------------------------------------------------------
class InternodeDispatchResult(NamedTuple):
    recv_x: torch.Tensor
    recv_x_scales: Optional[torch.Tensor]
    recv_topk_idx: Optional[torch.Tensor]
    recv_topk_weights: Optional[torch.Tensor]
    num_recv_tokens_per_expert_list: Optional[list]
    handle: InternodeHandle
    num_recv_tokens: int
    num_rdma_recv_tokens: int


def dispatch(xs: Tensors, topk_idxs: Optional[Tensors], topk_weights: Optional[Tensors],
             num_experts: int, rank: int, ranks_per_node: int, num_channels: int,
             expert_alignment: int = 1, x_scales: Optional[Tensors] = None,
             num_worst_tokens: int = 0, is_token_in_ranks: Optional[Tensors] = None,
             num_tokens_per_experts: Optional[Tensors] = None,
             cached: bool = False) -> InternodeDispatchResult:
    """What rank `rank` receives from an internode dispatch; arguments as reference.dispatch,
    plus ranks_per_node and num_channels. Rows travel the two-level path: each forwarder of
    this rank's node takes its RDMA stream (source nodes ascending, tokens ascending), keeps the
    records whose source meta names this rank, and each record is placed at its source rank's
    channel offset from the handle (recv_gbl_channel_prefix_matrix) plus its index in that
    channel: no sort, the offsets alone give the one-level order."""
    R, L, C = len(xs), ranks_per_node, num_channels
    if topk_idxs is not None:
        for t in topk_idxs:
            ref._check_topk(t, num_experts, R)
    if is_token_in_ranks is None:
        if topk_idxs is None:
            raise ValueError("dispatch without topk_idx needs is_token_in_ranks")
        is_token_in_ranks = [ref.get_dispatch_layout(t, num_experts, R)[2] for t in topk_idxs]
    if cached and topk_idxs is not None:
        raise ValueError("a cached dispatch has no topk_idxs")
    if num_tokens_per_experts is None and not cached:
        if topk_idxs is None:
            raise ValueError("dispatch without topk_idx needs num_tokens_per_experts")
        num_tokens_per_experts = [ref.get_dispatch_layout(t, num_experts, R)[1]
                                  for t in topk_idxs]
    handle = dispatch_handle(is_token_in_ranks, L, C, rank)
    N = int(handle.recv_gbl_rank_prefix_sum[-1])
    N_rdma = int(handle.recv_rdma_rank_prefix_sum[-1])
    if num_worst_tokens and N > num_worst_tokens:
        raise ValueError(f"rank {rank} receives {N} tokens > num_worst_tokens={num_worst_tokens}")
    n, l = divmod(rank, L)
    El = num_experts // R
    dev = xs[0].device
    H = xs[0].shape[1]
    rows = max(N, num_worst_tokens)
    recv_x = torch.zeros(rows, H, dtype=ref._as_bytes(xs[0]).dtype, device=dev)
    recv_scales = None if x_scales is None else \
        torch.zeros(rows, x_scales[0].shape[1], dtype=x_scales[0].dtype, device=dev)
    K = topk_idxs[0].shape[1] if topk_idxs is not None else 0
    idx = torch.full((rows, K), -1, dtype=torch.int64, device=dev)
    w = torch.zeros(rows, K, dtype=torch.float32, device=dev)
    placed = torch.zeros(rows, dtype=torch.bool, device=dev)
    for j in range(L):                                   # forwarder (n, j) of this node
        for m, toks in _rdma_stream(is_token_in_ranks, L, n * L + j):
            s = m * L + j                                # the records' source rank
            meta = _source_meta(m, is_token_in_ranks[s][toks][:, n * L:(n + 1) * L])
            _, goes = decode_source_meta(meta, L)
            toks = toks[goes[:, l]]                      # the NVLink stream to this rank
            # Row = the source's channel offset + the index inside that channel's stream to me.
            pos = _stream_index(is_token_in_ranks[s][:, rank:rank + 1], C)[toks, 0].long()
            chan = torch.tensor([_channel_of(int(t), is_token_in_ranks[s].shape[0], C)
                                 for t in toks.tolist()], dtype=torch.long, device=dev)
            dst = handle.recv_gbl_channel_prefix_matrix[s].long()[chan] + pos
            if bool(placed[dst].any()):
                raise AssertionError(f"rank {rank}: two records land on one recv_x row")
            placed[dst] = True
            recv_x[dst] = ref._as_bytes(xs[s])[toks]
            if recv_scales is not None:
                recv_scales[dst] = x_scales[s][toks]
            if topk_idxs is not None:
                g = topk_idxs[s][toks]
                local = (g >= rank * El) & (g < (rank + 1) * El)
                idx[dst] = torch.where(local, g - rank * El, torch.full_like(g, -1))
                if topk_weights is not None:
                    w[dst] = torch.where(local, topk_weights[s][toks].float(),
                                         torch.zeros_like(w[dst]))
    if int(placed.sum()) != N:
        raise AssertionError(f"rank {rank}: {int(placed.sum())} rows placed, {N} expected")
    counts = None
    if not cached:
        a = expert_alignment
        got = sum(t[rank * El:(rank + 1) * El].long() for t in num_tokens_per_experts)
        counts = [] if num_worst_tokens else [(int(c) + a - 1) // a * a for c in got]
    if num_worst_tokens:
        handle = dispatch_handle(is_token_in_ranks, L, C, rank, num_worst_tokens)
    recv_idx = idx if topk_idxs is not None else None
    recv_w = w if topk_weights is not None else None
    return InternodeDispatchResult(recv_x.view(xs[0].dtype), recv_scales, recv_idx, recv_w,
                                   counts, handle, N, N_rdma)


def _channel_of(token: int, num_tokens: int, num_channels: int) -> int:
    return token // -(-num_tokens // num_channels)


# ------------------------------------------------------------------------------------------------
# Combine, reducing inside each node first
# ------------------------------------------------------------------------------------------------
def combine(xs: Tensors, is_token_in_ranks: Tensors, rank: int, ranks_per_node: int,
            topk_weights: Optional[Tensors] = None,
            bias: Union[None, torch.Tensor, tuple] = None) -> ref.CombineResult:
    """What token owner `rank` = (m, l) gets back from an internode combine.

    xs[j] / topk_weights[j]: rank j's rows in dispatch's receive order, as reference.combine.
    For each node n the token went to, forwarder (n, l) forms the node partial: the float32 sum
    of the rows of node n's ranks the token went to, local ranks ascending, rounded to xs'
    dtype; weights likewise, kept float32. The owner: float32 bias_0 + bias_1, plus the node
    partials, nodes ascending, rounded once; weights: 0 plus the node partials, nodes ascending.
    Tokens that went nowhere get the biases (zeros without)."""
    R, L = len(xs), ranks_per_node
    Nn = R // L
    mine = is_token_in_ranks[rank]
    T, H = mine.shape[0], xs[0].shape[1]
    dev = xs[0].device
    acc = torch.zeros(T, H, dtype=torch.float32, device=dev)
    for b in bias if isinstance(bias, (tuple, list)) else (bias,):
        if b is not None:
            acc += b.float()
    wacc = None if topk_weights is None else \
        torch.zeros(T, topk_weights[0].shape[1], dtype=torch.float32, device=dev)
    goes_node = node_mask(mine, L)
    for n in range(Nn):
        part = torch.zeros(T, H, dtype=torch.float32, device=dev)
        wpart = None if wacc is None else torch.zeros_like(wacc)
        for k in range(L):
            j = n * L + k
            sent = mine[:, j]
            begin = sum(int(m[:, j].sum()) for m in is_token_in_ranks[:rank])
            rows = torch.arange(begin, begin + int(sent.sum()), device=dev)
            part[sent] = part[sent] + xs[j][rows].float()
            if wpart is not None:
                wpart[sent] = wpart[sent] + topk_weights[j][rows].float()
        sel = goes_node[:, n]
        acc[sel] = acc[sel] + part[sel].to(xs[0].dtype).float()     # the BF16 wire row
        if wacc is not None:
            wacc[sel] = wacc[sel] + wpart[sel]
    return ref.CombineResult(acc.to(xs[0].dtype), wacc)
