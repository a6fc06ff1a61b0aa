"""Byte layout of the internode normal mode's RDMA region (ctx.rdma), and its size hint.

Written down in docs/internals.md ("Internode normal mode"); the kernels that will use it do
not exist yet, so this module is the layout's one definition for them and for
Config.get_rdma_buffer_size_hint. Channels: C = num_sms // 2 (DeepEP's: a channel is an RDMA
sender SM and a forwarder SM; the internode handle's matrices have C columns). Nn nodes of L
ranks. Ring slots per (channel, node): S = Config.rdma_ring_slots (num_max_rdma_chunked_recv_tokens
rounded up to a multiple of num_max_rdma_chunked_send_tokens, so that one put of a chunk never
wraps around the ring's end; DeepEP rounds the same way).

Region, in order:
  notify   the counts exchange (templates/internode_notify.cuh; notify_area_bytes): a sequence
           word, uint64 signals [2][R], staging rows [2][R] and received rows [2][R]
  control  tails   uint64 [Nn][C]          receiver side: records delivered from source node m
                                           into ring (m, c), set by m's put-with-signal
           heads   uint64 [Nn][C]          sender side: records ring (n, c) on node n has
                                           consumed, added by n's forwarders (credits)
           meta    uint64 [2][Nn][C][2L+2] per call parity: source node m's channel-c prefix
                                           counts for this node, (epoch << 32) | count
  then two halves, dispatch then combine (a rank may start its combine while a peer still
  forwards its dispatch records: the two never share ring memory); each half:
           recv    [Nn][C][S] records      ring (m, c): what source node m's rank of this
                                           local index sends in channel c
           send    [Nn][C][S] records      staging of the records bound for node n (a put reads
                                           registered, i.e. symmetric, memory)
Counters are 64-bit and monotonic across calls (nothing is zeroed between calls, CUDA graph
replays stay valid), as the intranode rings'.
"""
from __future__ import annotations

import os

from .. import layout_facts
from ..specs import MAX_EXPERTS, MAX_TOPK

ALIGN = 4096
_MAX_RANKS_PER_NODE_DEFAULT = 8     # DeepEP's NUM_MAX_NVL_PEERS, when nothing says otherwise


def _align(v: int, a: int = ALIGN) -> int:
    return (v + a - 1) // a * a


def source_meta_bytes(ranks_per_node: int) -> int:
    """epgen's SourceMeta (reference_internode.source_meta_bytes): source node, then a bit per
    local rank of the receiving node; DeepEP's 8 bytes for L <= 32."""
    return 4 + 4 * (-(-ranks_per_node // 32))


def dispatch_record_bytes(row_bytes: int, num_scale_cols: int, num_topk: int,
                          ranks_per_node: int) -> int:
    """One RDMA (and NVLink forwarding) dispatch record: row, scales, source meta, top-k indices
    (int32), top-k weights, rounded up to 16 bytes."""
    return (row_bytes + 4 * num_scale_cols + source_meta_bytes(ranks_per_node)
            + 8 * num_topk + 15) // 16 * 16


def combine_record_bytes(hidden: int, num_topk: int) -> int:
    """One combine record: the node partial (BF16 row) and its float32 top-k weights."""
    return (hidden * 2 + 4 * num_topk + 15) // 16 * 16


# The notify area is layout_facts' (the notify kernel's unit static_asserts inotify's side).
NOTIFY_MAX_CHANNELS = layout_facts.INODE_NOTIFY_MAX_CHANNELS
notify_row_ints = layout_facts.inode_notify_row_ints
notify_area_bytes = layout_facts.inode_notify_area_bytes


def control_bytes(num_nodes: int, num_channels: int, ranks_per_node: int) -> int:
    words = 2 * num_nodes * num_channels + 2 * num_nodes * num_channels * (2 * ranks_per_node + 2)
    return _align(8 * words)


def half_bytes(config, num_nodes: int, record: int) -> int:
    rings = num_nodes * (config.num_sms // 2) * config.rdma_ring_slots * record
    return 2 * _align(rings)                        # recv + send


def region_bytes(config, num_nodes: int, ranks_per_node: int, record: int,
                 num_local_experts: int) -> int:
    return notify_area_bytes(num_nodes * ranks_per_node, num_local_experts) + \
        control_bytes(num_nodes, config.num_sms // 2, ranks_per_node) + \
        2 * half_bytes(config, num_nodes, record)


def default_ranks_per_node() -> int:
    """For the static size hint, which sees only a rank count: EPGEN_RANKS_PER_NODE, else
    LOCAL_WORLD_SIZE (torchrun's ranks per host), else DeepEP's 8."""
    for name in ("EPGEN_RANKS_PER_NODE", "LOCAL_WORLD_SIZE"):
        raw = os.environ.get(name, "").strip()
        if raw:
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r}: must be a positive integer") from None
            if value <= 0:
                raise ValueError(f"{name}={raw!r}: must be a positive integer")
            return value
    return _MAX_RANKS_PER_NODE_DEFAULT


def rdma_buffer_size_hint(config, hidden_bytes: int, num_ranks: int,
                          ranks_per_node: int | None = None) -> int:
    """num_rdma_bytes for internode normal-mode calls with this config: rows of at most
    hidden_bytes (BF16 rows: hidden * 2; an FP8 row of hidden bytes with its ceil(hidden / 128)
    scales fits too), top-k <= 32. 0 when the ranks form one node (DeepEP's legacy 0)."""
    L = ranks_per_node or default_ranks_per_node()
    if num_ranks <= L:
        return 0
    if num_ranks % L:
        raise ValueError(f"num_ranks={num_ranks}: must be a multiple of the ranks per node ({L})")
    scale_cols = -(-hidden_bytes // 128)
    record = max(dispatch_record_bytes(hidden_bytes, scale_cols, MAX_TOPK, L),
                 combine_record_bytes(max(1, hidden_bytes // 2), MAX_TOPK))
    return _align(region_bytes(config, num_ranks // L, L, record, MAX_EXPERTS // num_ranks),
                  1 << 20)
