"""Byte layout of the internode normal mode's RDMA region (ctx.rdma), and its size hint.

Written down in docs/internals.md ("Internode normal mode"); the one definition of it for the
ops and Config.get_rdma_buffer_size_hint, the kernels' constants rendered from layout_facts
(templates/internode_*.cuh). Channels: C = num_sms // 2 (DeepEP's: a channel is an RDMA
sender SM and a forwarder SM; the internode handle's matrices have C columns). Nn nodes of L
ranks. Ring slots per (channel, node): S = Config.rdma_ring_slots (num_max_rdma_chunked_recv_tokens
rounded up to a multiple of num_max_rdma_chunked_send_tokens, so that one put of a chunk never
wraps around the ring's end; DeepEP rounds the same way).

Region, in order (offsets fixed for a group: they never depend on a call's channels or experts,
so the 64-bit counters keep their places across calls):
  notify   the counts exchange (templates/internode_notify.cuh; notify_area_bytes), sized for
           the most experts a call may have (MAX_EXPERTS)
  control  uint64 [CTRL_WORDS][Nn][MAX_CHANNELS] (templates/internode_dispatch.cuh
           idisp::kRdma*; the combine's four follow, templates/internode_combine.cuh):
           tails       receiver side: records source node m put into ring (m, c), set by m's
                       put-with-signal
           heads       sender side: records node n's forwarder consumed (credit), set by n's
                       signal op
           send tails  sender, local: records put to node n in channel c
           recv heads  receiver, local: records consumed of ring (m, c)
  then two halves of the rest (rdma_half), dispatch then combine (a rank may start its combine
  while a peer still forwards its dispatch records: the two never share ring memory); each:
           recv    [Nn][C][S] records      ring (m, c): what source node m's rank of this
                                           local index sends in channel c
           send    [Nn][C][S] records      staging of the records bound for node n (a put reads
                                           registered, i.e. symmetric, memory)
NVLink region (ctx.nvl) of an internode Buffer (the intranode kernels never run on it):
  control  uint64 [CTRL_WORDS][MAX_CHANNELS][L][Nn] (idisp::kFwd*, kNvl*, then the combine's
           four), then the dispatch's and the combine's done counters (ints)
  then two halves of the rest (nvl_half), dispatch then combine:
  rings    [C][L forwarder][Nn source node][cap] dispatch records on each receiver, cap =
           nvl_cap(config); combine: [C][L sender][Nn source node][cap] on each forwarder
Counters are 64-bit and monotonic across calls (nothing is zeroed between calls, CUDA graph
replays stay valid), as the intranode rings'.
"""
from __future__ import annotations

import os

from ..jit import layout_facts
from ..jit.layout_facts import align_up
from ..jit.specs import MAX_EXPERTS, MAX_TOPK

ALIGN = 4096
_MAX_RANKS_PER_NODE_DEFAULT = 8     # DeepEP's NUM_MAX_NVL_PEERS, when nothing says otherwise


# Record sizes are layout_facts' (the internode dispatch's unit static_asserts its side).
source_meta_bytes = layout_facts.inode_source_meta_bytes
dispatch_record_bytes = layout_facts.inode_dispatch_record_bytes
combine_record_bytes = layout_facts.inode_combine_record_bytes

# The notify area is layout_facts' (the notify kernel's unit static_asserts inotify's side).
NOTIFY_MAX_CHANNELS = layout_facts.INODE_NOTIFY_MAX_CHANNELS
notify_row_ints = layout_facts.inode_notify_row_ints
notify_area_bytes = layout_facts.inode_notify_area_bytes


MAX_CHANNELS = layout_facts.INODE_MAX_CHANNELS   # idisp::kMaxC (the headers read the fact)
CTRL_WORDS = layout_facts.INODE_CTRL_WORDS       # word arrays of each control area
WORD = 8                                         # bytes of a control word (uint64)


def control_bytes(num_nodes: int) -> int:
    """uint64 [CTRL_WORDS][Nn][MAX_CHANNELS]: four words per (node, channel) for each direction."""
    return align_up(CTRL_WORDS * WORD * num_nodes * MAX_CHANNELS, ALIGN)


def notify_max_bytes(num_ranks: int) -> int:
    """The notify area for any expert count (where the control area starts)."""
    return notify_area_bytes(num_ranks, MAX_EXPERTS // num_ranks)


def rdma_ctrl_offset(num_ranks: int) -> int:
    return notify_max_bytes(num_ranks)


def rdma_ring_offset(num_ranks: int, num_nodes: int) -> int:
    """Start of the dispatch half."""
    return rdma_ctrl_offset(num_ranks) + control_bytes(num_nodes)


def rdma_half(nbytes: int, num_ranks: int, num_nodes: int) -> int:
    """Bytes of each direction's half after the control area (dispatch first, then combine)."""
    return max(0, (nbytes - rdma_ring_offset(num_ranks, num_nodes)) // 2 // ALIGN * ALIGN)


def rdma_need(config, num_ranks: int, num_nodes: int, record: int) -> int:
    """num_rdma_bytes a call with this config and record needs: both halves hold its rings."""
    return (rdma_ring_offset(num_ranks, num_nodes)
            + 2 * align_up(2 * rdma_rings_bytes(config, num_nodes, record), ALIGN))


def rdma_rings_bytes(config, num_nodes: int, record: int) -> int:
    """One direction's recv rings (its send staging rings follow them directly)."""
    return num_nodes * (config.num_sms // 2) * config.rdma_ring_slots * record


def nvl_cap(config, num_nodes: int) -> int:
    """NVLink ring slots per (channel, forwarder, source node): DeepEP's per-(channel,
    forwarder) count split over the source nodes, so the rings take DeepEP's memory."""
    return config.num_max_nvl_chunked_recv_tokens // num_nodes


def nvl_done_offset(num_ranks: int) -> int:
    """The dispatch's done counter (an int; the combine's follows it)."""
    return CTRL_WORDS * WORD * MAX_CHANNELS * num_ranks


def nvl_ring_offset(num_ranks: int) -> int:
    return align_up(nvl_done_offset(num_ranks) + 16, ALIGN)


def nvl_half(nbytes: int, num_ranks: int) -> int:
    return max(0, (nbytes - nvl_ring_offset(num_ranks)) // 2 // ALIGN * ALIGN)


def nvl_need(config, num_nodes: int, ranks_per_node: int, record: int) -> int:
    return nvl_ring_offset(num_nodes * ranks_per_node) + \
        2 * align_up(nvl_rings_bytes(config, num_nodes, ranks_per_node, record), ALIGN)


def nvl_rings_bytes(config, num_nodes: int, ranks_per_node: int, record: int) -> int:
    return (config.num_sms // 2) * ranks_per_node * num_nodes * nvl_cap(config, num_nodes) * record


def half_bytes(config, num_nodes: int, record: int) -> int:
    rings = num_nodes * (config.num_sms // 2) * config.rdma_ring_slots * record
    return 2 * align_up(rings, ALIGN)                     # recv + send


def region_bytes(config, num_nodes: int, ranks_per_node: int, record: int,
                 num_local_experts: int) -> int:
    return notify_area_bytes(num_nodes * ranks_per_node, num_local_experts) + \
        control_bytes(num_nodes) + 2 * half_bytes(config, num_nodes, record)


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
    scale_cols = layout_facts.num_scales(hidden_bytes)
    record = max(dispatch_record_bytes(hidden_bytes, scale_cols, MAX_TOPK, L),
                 combine_record_bytes(max(1, hidden_bytes // 2), MAX_TOPK))
    return align_up(region_bytes(config, num_ranks // L, L, record, MAX_EXPERTS // num_ranks),
                    1 << 20)
