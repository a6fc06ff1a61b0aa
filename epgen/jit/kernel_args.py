"""Kernel argument structs, defined once for both sides.

Each kernel takes one struct by value. It is declared here as (C type, name) pairs; the
ctypes class packs it on the host and `c_struct` renders the identical C++ declaration into
the generated source, with a static_assert on its size, so the two layouts cannot drift.
Pointers are typed on the C++ side and plain addresses (ints) on the host side.
"""
from __future__ import annotations

import ctypes

_SCALARS = {
    "int": ctypes.c_int32, "int32_t": ctypes.c_int32, "uint32_t": ctypes.c_uint32,
    "int64_t": ctypes.c_int64, "uint64_t": ctypes.c_uint64, "float": ctypes.c_float,
    "unsigned long long": ctypes.c_uint64,
}


def _ctype(c_type: str):
    if c_type.rstrip().endswith("*"):
        return ctypes.c_uint64      # device address; 8 bytes, 8-aligned like a pointer
    return _SCALARS[c_type]


def struct(name: str, *fields: tuple[str, str]) -> type[ctypes.Structure]:
    cls = type(name, (ctypes.Structure,), {
        "_fields_": [(fname, _ctype(ctype)) for ctype, fname in fields],
        "_c_fields_": tuple(fields),
    })
    return cls


def c_struct(cls: type[ctypes.Structure]) -> str:
    body = "\n".join(f"    {ctype} {fname};" for ctype, fname in cls._c_fields_)
    return (f"struct {cls.__name__} {{\n{body}\n}};\n"
            f"static_assert(sizeof({cls.__name__}) == {ctypes.sizeof(cls)}, "
            f"\"host/device layout of {cls.__name__} differs\");\n")


# Fields every communicating kernel shares: where to report errors and when to give up.
ERROR_FIELDS = (
    ("int*", "error_word"),           # mapped pinned host memory (runtime/errors.py)
    ("int*", "error_flag"),           # device int: set by every report, read at kernel end
    ("unsigned long long", "timeout_ns"),   # each wait gives up this long after kernel start
    ("int", "rank"),
    ("int", "op"),                    # operation code, for the error message
)

# ---------------------------------------------------------------------------- layout
LayoutArgs = struct(
    "LayoutArgs",
    ("const int64_t*", "topk_idx"),         # [T, K]
    ("int*", "num_tokens_per_rank"),        # [R]   zeroed by the host (torch.zeros)
    ("int*", "num_tokens_per_expert"),      # [E]   zeroed by the host
    ("bool*", "is_token_in_rank"),          # [T, R]
    ("int", "num_tokens"),
    ("int", "pad0"),
    *ERROR_FIELDS,
)

# The same, across nodes (LayoutSpec.ranks_per_node > 0): a struct of its own, so that the
# one-node layout kernels keep their source.
LayoutNodesArgs = struct(
    "LayoutNodesArgs",
    *LayoutArgs._c_fields_[:4],
    ("int*", "num_tokens_per_rdma_rank"),   # [R / ranks_per_node] zeroed by the host
    *LayoutArgs._c_fields_[4:],
)

# ---------------------------------------------------------------------------- low latency
# Region byte offsets (sig_off, recv_off, send_off) are computed in epgen/ops/low_latency.py;
# seq/done/counters are this rank's local control words inside the same region.
LowLatencyDispatchArgs = struct(
    "LowLatencyDispatchArgs",
    ("const void*", "x"),                   # [T, H] bf16
    ("const int64_t*", "topk_idx"),         # [T, K]
    ("void*", "recv_x"),                    # [El, R*M, H] fp8 / bf16
    ("void*", "recv_scales"),               # [El, S, R*M] float or [El, ceil(S/4), R*M] int32
                                            # (opaque: side rows [El, R*M, side bytes])
    ("int*", "recv_src_info"),              # [El, R*M]
    ("int64_t*", "recv_layout_range"),      # [El, R]
    ("int*", "recv_count"),                 # [El]
    ("int*", "cumulative_stats"),           # [El] or null
    ("int64_t*", "wait_stats"),             # [R] or null
    ("void*", "rdma_base"),                 # this rank's symmetric region
    ("const int64_t*", "peer_bases"),       # [R] region address on each rank (0: no P2P)
    ("const int*", "pes"),                  # [R] NVSHMEM PE of each rank
    ("int*", "mask"),                       # [R] masked ranks (enable_shrink) or null
    ("unsigned long long*", "verdicts"),    # [2][64] per-receive peer verdicts (enable_shrink)
    ("unsigned long long*", "seq"),         # 64-bit: the op's last epoch
    ("int*", "done"),
    ("int*", "counters"),                   # [E] slot counters
    ("unsigned long long*", "call_epoch"),  # [1] the epoch, set by the send for a receive launch
    ("unsigned long long", "sig_off"),
    ("unsigned long long", "recv_off"),
    ("unsigned long long", "send_off"),
    ("int", "num_tokens"),
    ("int", "max_tokens"),
    ("int", "phases"),                      # 1 send, 2 receive
    ("int", "any_remote"),
    *ERROR_FIELDS,
    # After the others, so that their offsets (and the kernels not reading it) stay as they were.
    ("const void*", "x_side"),              # opaque formats: [T, side bytes] side rows, or null
)

LowLatencyCombineArgs = struct(
    "LowLatencyCombineArgs",
    ("const void*", "x"),                   # [El, R*M, H] bf16
    ("const int64_t*", "topk_idx"),         # [T, K]
    ("const float*", "topk_weights"),       # [T, K]
    ("const int*", "src_info"),             # [El, R*M]
    ("const int64_t*", "layout_range"),     # [El, R]
    ("void*", "out"),                       # [T, H] bf16
    ("int64_t*", "wait_stats"),             # [R] or null
    ("void*", "rdma_base"),
    ("const int64_t*", "peer_bases"),
    ("const int*", "pes"),
    ("int*", "mask"),                       # [R] masked ranks (enable_shrink) or null
    ("unsigned long long*", "verdicts"),    # [2][64] per-receive peer verdicts (enable_shrink)
    ("unsigned long long*", "seq"),         # 64-bit: the op's last epoch
    ("int*", "done"),
    ("unsigned long long*", "call_epoch"),
    ("unsigned long long", "sig_off"),
    ("unsigned long long", "recv_off"),
    ("unsigned long long", "send_off"),
    ("unsigned long long", "half_bytes"),   # receive area: bytes from half 0 to half 1
    ("unsigned long long", "rows_off"),     # receive's row table, int [2][M][MAX_TOPK]
    ("int", "num_tokens"),
    ("int", "max_tokens"),
    ("int", "phases"),
    ("int", "any_remote"),
    ("int", "zero_copy"),
    ("int", "pad0"),
    *ERROR_FIELDS,
)

# The per-rank combine (templates/ll_combine_rank.cuh): the per-expert fields plus where the
# routes signals sit.
LowLatencyCombineRankArgs = struct(
    "LowLatencyCombineRankArgs",
    *[f for f in LowLatencyCombineArgs._c_fields_ if f not in ERROR_FIELDS],
    ("unsigned long long", "wsig_off"),     # routes signals u64 [2][64], per owner rank
    *ERROR_FIELDS,
)

LowLatencyBarrierArgs = struct(
    "LowLatencyBarrierArgs",
    ("void*", "rdma_base"),
    ("const int64_t*", "peer_bases"),
    ("const int*", "pes"),
    ("int*", "mask"),                       # [R] masked ranks (enable_shrink) or null
    ("unsigned long long*", "seq"),         # 64-bit: this barrier's last epoch
    ("unsigned long long", "sig_off"),      # its words: u64 [2][64], one per source rank
    ("int", "any_remote"),
    ("int", "pad0"),
    *ERROR_FIELDS,
)


# ---------------------------------------------------------------------------- normal mode (intranode)
NotifyArgs = struct(
    "NotifyArgs",
    ("void*", "nvl"),                       # this rank's NVLink region (control area at 0)
    ("const int64_t*", "peers"),            # [R] the region's address on each rank
    ("const int*", "num_tokens_per_rank"),  # [R]
    ("const int*", "num_tokens_per_expert"),  # [E] or null
    ("int*", "rank_prefix"),                # [R, R] out
    ("int*", "num_tokens_all"),             # [R] out: every rank's token count
    ("int*", "host_counts"),                # mapped host [1 + El]: N, aligned per-expert; or null
    ("int", "num_tokens"),
    ("int", "expert_alignment"),
    ("int", "barrier_only"),                # 1: only the cross-rank barrier
    ("int", "pad0"),
    *ERROR_FIELDS,
)

NormalDispatchArgs = struct(
    "NormalDispatchArgs",
    ("const char*", "x"),                   # [T, H] bf16 or fp8 rows
    ("const float*", "x_scales"),           # [T, S] any strides, or null
    ("int64_t", "scale_stride_t"),
    ("int64_t", "scale_stride_s"),
    ("const int64_t*", "topk_idx"),         # [T, K] or null
    ("const float*", "topk_weights"),       # [T, K] or null
    ("const bool*", "is_token_in_rank"),    # [T, R]
    ("const int*", "rank_prefix"),          # [R, R]
    ("char*", "recv_x"),                    # [rows, H]
    ("float*", "recv_scales"),              # [rows, S] or null
    ("int64_t*", "recv_topk_idx"),          # [rows, K] or null
    ("float*", "recv_topk_weights"),        # [rows, K] or null
    ("int*", "recv_src_idx"),               # [rows] or null (cached)
    ("void*", "nvl"),
    ("const int64_t*", "peers"),
    ("int64_t", "ring_offset"),             # byte offset of the dispatch rings in the region
    ("int64_t", "num_recv_rows"),           # rows of recv_x (bounds every write)
    ("int", "num_tokens"),
    ("int", "num_worst_tokens"),
    ("int", "cap"),                         # ring slots per (channel, source)
    ("int", "pad0"),
    *ERROR_FIELDS,
)

NormalCombineArgs = struct(
    "NormalCombineArgs",
    ("const char*", "x"),                   # [rows, H] bf16, dispatch receive order
    ("const float*", "topk_weights"),       # [rows, K] or null
    ("const char*", "bias0"),               # [T, H] bf16 or null
    ("const char*", "bias1"),
    ("const bool*", "is_token_in_rank"),    # [T, R] of this rank's tokens (the handle's)
    ("const int*", "rank_prefix"),          # [R, R]
    ("const int*", "num_tokens_all"),       # [R]
    ("const int*", "recv_src_idx"),         # [rows]
    ("char*", "combined_x"),                # [T, H] bf16
    ("float*", "combined_weights"),         # [T, K] or null
    ("void*", "nvl"),
    ("const int64_t*", "peers"),
    ("int64_t", "ring_offset"),
    ("int", "num_tokens"),
    ("int", "cap"),
    *ERROR_FIELDS,
)


# ---------------------------------------------------------------------------- internode
InternodeNotifyArgs = struct(
    "InternodeNotifyArgs",
    ("void*", "rdma"),                      # this rank's RDMA region (notify area at offset 0)
    ("const int*", "pes"),                  # [R] the PE of each group rank
    ("const int*", "num_tokens_per_rank"),  # [R]
    ("const int*", "num_tokens_per_rdma_rank"),  # [Nn]
    ("const int*", "num_tokens_per_expert"),     # [E]
    ("const int*", "gbl_prefix"),           # [R, C] this rank's gbl_channel_prefix_matrix
    ("const int*", "rdma_prefix"),          # [Nn, C] this rank's rdma_channel_prefix_matrix
    ("int*", "recv_rdma_rank_prefix_sum"),  # [Nn] out
    ("int*", "recv_rdma_channel_prefix"),   # [Nn, C] out
    ("int*", "recv_gbl_rank_prefix_sum"),   # [R] out
    ("int*", "recv_gbl_channel_prefix"),    # [R, C] out
    ("int*", "host_counts"),                # mapped host [2 + El]: N, N_rdma, aligned per expert; or null
    ("int", "num_channels"),
    ("int", "expert_alignment"),
    *ERROR_FIELDS,
)


InternodeDispatchArgs = struct(
    "InternodeDispatchArgs",
    ("const char*", "x"),                   # [T, row bytes]
    ("const float*", "x_scales"),           # [T, S] any strides (float32 or int32 bits), or null
    ("int64_t", "scale_stride_t"),
    ("int64_t", "scale_stride_s"),
    ("const int64_t*", "topk_idx"),         # [T, K] or null
    ("const float*", "topk_weights"),       # [T, K] or null
    ("const bool*", "is_token_in_rank"),    # [T, R]
    ("const int*", "recv_rdma_channel_prefix"),   # [Nn, C] (the notify's, or the handle's)
    ("const int*", "recv_rdma_rank_prefix_sum"),  # [Nn]
    ("const int*", "recv_gbl_channel_prefix"),    # [R, C]
    ("const int*", "recv_gbl_rank_prefix_sum"),   # [R]
    ("char*", "recv_x"),                    # [rows, row bytes]
    ("float*", "recv_scales"),              # [rows, S] or null
    ("int64_t*", "recv_topk_idx"),          # [rows, K] or null
    ("float*", "recv_topk_weights"),        # [rows, K] or null
    ("char*", "recv_src_meta"),             # [rows, 8], or null (cached)
    ("int*", "send_nvl_head"),              # [rdma rows, L], or null (cached)
    ("void*", "rdma"),                      # this rank's RDMA region (symmetric)
    ("void*", "nvl"),                       # this rank's NVLink region
    ("const int64_t*", "nvl_peers"),        # [R] NVLink region address of each rank (this node's)
    ("const int*", "pes"),                  # [R] the PE of each group rank
    ("int64_t", "rdma_ctrl_off"),           # regions/internode.py: byte offsets
    ("int64_t", "rdma_ring_off"),
    ("int64_t", "nvl_ctrl_off"),
    ("int64_t", "nvl_ring_off"),
    ("int64_t", "done_off"),                # int in the NVLink region: blocks done (poisoning)
    ("int64_t", "num_recv_rows"),           # rows of recv_x (bounds every write)
    ("int64_t", "num_rdma_recv_rows"),      # rows of send_nvl_head
    ("int", "num_tokens"),
    ("int", "num_local_experts"),
    ("int", "rdma_slots"),                  # Config.rdma_ring_slots
    ("int", "rdma_chunk"),                  # Config.num_max_rdma_chunked_send_tokens
    ("int", "nvl_cap"),                     # NVLink ring slots per (channel, forwarder, node)
    ("int", "num_worst_tokens"),            # > 0: outputs sized by it (no host counts)
    *ERROR_FIELDS,
)


InternodeCombineArgs = struct(
    "InternodeCombineArgs",
    ("const char*", "x"),                   # [rows, H] bf16, the dispatch's receive order
    ("const float*", "topk_weights"),       # [rows, K] or null
    ("const char*", "bias0"),               # [T, H] bf16 or null
    ("const char*", "bias1"),
    ("const int*", "send_rdma_head"),       # [T, Nn]   the handle's
    ("const int*", "send_nvl_head"),        # [rdma rows, L]
    ("const int*", "recv_rdma_channel_prefix"),   # [Nn, C]
    ("const int*", "recv_rdma_rank_prefix_sum"),  # [Nn]
    ("const int*", "recv_gbl_channel_prefix"),    # [R, C]
    ("const int*", "recv_gbl_rank_prefix_sum"),   # [R]
    ("char*", "combined_x"),                # [T, H] bf16
    ("float*", "combined_w"),               # [T, K] or null
    ("void*", "rdma"),
    ("void*", "nvl"),
    ("const int64_t*", "nvl_peers"),
    ("const int*", "pes"),
    ("int64_t", "rdma_ctrl_off"),
    ("int64_t", "rdma_ring_off"),           # the combine half
    ("int64_t", "nvl_ctrl_off"),
    ("int64_t", "nvl_ring_off"),            # the combine half
    ("int64_t", "done_off"),
    ("int64_t", "num_rows"),                # rows of x
    ("int64_t", "num_rdma_rows"),           # rows of send_nvl_head
    ("int", "num_tokens"),
    ("int", "rdma_slots"),
    ("int", "rdma_chunk"),
    ("int", "nvl_cap"),
    *ERROR_FIELDS,
)

