"""Facts the host and the kernels must agree on, defined once, here.

A drift between a Python size and a device one compiles and then corrupts memory across GPUs,
so each fact is rendered into every translation unit (codegen: `epgen::facts`, enumerators,
before the family's headers), and the headers read it from there: no header spells the number.
Where a header cannot (common.cuh sits in the precompiled prelude, parsed before any fact) or
derives a value of its own from the facts, a static_assert ties the two: a header that drifts
from this table no longer compiles. The Python side imports these names; no op module spells
the numbers.

Facts that depend on a spec (ring record sizes, message header and payload sizes, the
per-rank combine's areas) are functions here; each spec lists the device values they must
equal (specs.KernelSpec.device_checks) and its unit static_asserts them (codegen).
"""
from __future__ import annotations

import functools
import textwrap
from dataclasses import dataclass

# -- the error word (templates/common.cuh, runtime/errors.py) -------------------------------
ERROR_WORDS = 8                   # int words: [0] code, [1] op, [2] rank, [3] peer, [4] detail
ERR_TIMEOUT, ERR_BAD_INDEX, ERR_CAPACITY, ERR_BAD_ARG = 1, 2, 3, 4
# The fields of the word (the report fills them after winning the CAS on the code).
ERR_FIELD_CODE, ERR_FIELD_OP, ERR_FIELD_RANK, ERR_FIELD_PEER, ERR_FIELD_DETAIL = 0, 1, 2, 3, 4
assert ERR_FIELD_DETAIL < ERROR_WORDS

# -- shapes every mode shares (specs.py checks them; the low-latency region is sized by them)
MAX_EXPERTS = 1024                # experts of a spec; LL slot counters, one per global expert
MAX_TOPK = 32                     # top-k entries a token may carry
SCALE_GROUP = 128                 # FP8 channels per float32 scale (the last group partial)


def num_scales(hidden: int) -> int:
    """FP8 scale columns of a row: one per SCALE_GROUP channels, the last group partial."""
    return (hidden + SCALE_GROUP - 1) // SCALE_GROUP


# -- normal mode's control area at the start of the NVLink region (templates/normal_ctrl.cuh)
NORMAL_MAX_CHANNELS = 128
NORMAL_MAX_RANKS = 8              # one node of NVLink peers
NORMAL_NOTIFY_SEQ_OFF = 0         # int: notify / barrier calls so far
NORMAL_NOTIFY_TABLE_OFF = 4096    # [2 parity][kMaxR src][kRowInts] int
NORMAL_NOTIFY_ROW_INTS = 1024
NORMAL_DISP_CALL_OFF = (NORMAL_NOTIFY_TABLE_OFF
                        + 2 * NORMAL_MAX_RANKS * NORMAL_NOTIFY_ROW_INTS * 4)   # int [kMaxC]
NORMAL_DISP_META_OFF = NORMAL_DISP_CALL_OFF + NORMAL_MAX_CHANNELS * 4
NORMAL_RING_COUNTERS_OFF = NORMAL_DISP_META_OFF + 2 * NORMAL_MAX_CHANNELS * NORMAL_MAX_RANKS * 16
NORMAL_RING_COUNTERS = 6 * NORMAL_MAX_CHANNELS * NORMAL_MAX_RANKS   # int64, 3 per direction
NORMAL_CTRL_BYTES = 196608
assert NORMAL_RING_COUNTERS_OFF + NORMAL_RING_COUNTERS * 8 + 8 <= NORMAL_CTRL_BYTES

NORMAL_NOTIFY_THREADS = 256       # the notify kernel's block (one size for every spec)
# Rows a combine reducer takes per batch and a sender publishes per tail (normal_combine.cuh
# CombineCfg::kReduceBatch / kChunk; a dispatch sender's batch, DispatchCfg::kBatch): a ring
# needs room for one batch of each side, or the two deadlock.
NORMAL_RING_BATCH = 32
NORMAL_MIN_RING_SLOTS = 2 * NORMAL_RING_BATCH


def normal_dispatch_record_bytes(row_bytes: int, num_scale_cols: int, num_topk: int) -> int:
    """One dispatch ring record (normal_dispatch.cuh DispatchCfg::kRec): row, 4-byte scales,
    int32 top-k indices, float32 weights, int32 source index, 16-byte padded."""
    return (row_bytes + 4 * num_scale_cols + 8 * num_topk + 4 + 15) // 16 * 16


def normal_combine_record_bytes(hidden: int, num_topk: int) -> int:
    """One combine ring record (normal_combine.cuh CombineCfg::kRec): BF16 row, float32 weights."""
    return (hidden * 2 + 4 * num_topk + 15) // 16 * 16


# -- internode notify area at offset 0 of the RDMA region (templates/internode_notify.cuh) --
INODE_MAX_CHANNELS = 64           # internode channels (num_sms / 2): the control areas' room
INODE_NOTIFY_MAX_CHANNELS = INODE_MAX_CHANNELS    # channels a notify row has room for
INODE_NOTIFY_SEQ_OFF = 0          # int64: this rank's last notify sequence
INODE_NOTIFY_SIG_OFF = 256        # uint64 [2][R]: row of source s arrived
# uint64 word arrays of each internode control area (templates/internode_common.cuh idisp::kRdma*
# and kFwd* / kNvl*, then internode_combine.cuh icomb's): the dispatch's four, the combine's four.
INODE_CTRL_WORDS = 8


def inode_notify_row_ints(num_local_experts: int) -> int:
    """A notify row (inotify::row_ints): T, T_rdma, per-expert counts, 2 channel prefixes."""
    return (2 + num_local_experts + 2 * INODE_NOTIFY_MAX_CHANNELS + 3) // 4 * 4


def inode_notify_stage_off(num_ranks: int) -> int:
    """Where the staging rows start (inotify::stage_off): after the signals (uint64 [2][R]),
    256-aligned."""
    return (INODE_NOTIFY_SIG_OFF + 2 * 8 * num_ranks + 255) // 256 * 256


def inode_notify_area_bytes(num_ranks: int, num_local_experts: int) -> int:
    """Bytes of the notify area (inotify::area_bytes): signals, then staging and table rows
    [2 parities][R] each, 4096-aligned."""
    row = inode_notify_row_ints(num_local_experts) * 4
    return (inode_notify_stage_off(num_ranks) + 4 * num_ranks * row + 4095) // 4096 * 4096


# -- low-latency region (templates/ll_common.cuh, ops/low_latency.py) ----------------------
LL_MAX_SIG = 1024                 # dispatch signal words per half (local expert * R + source)
LL_MAX_RANK_SIG = 64              # per-rank words per half (combine signals, verdicts)
LL_MAX_TOKENS = 1024              # num_max_dispatch_tokens_per_rank (a signal's 16-bit count)
LL_SEND, LL_RECV = 1, 2           # phase bits of a launch (args.phases)
# The control area, at fixed offsets whatever the shapes (u64 words unless said).
LL_DISP_SIG_OFF = 0                                        # [2 halves][LL_MAX_SIG]
LL_COMB_SIG_OFF = LL_DISP_SIG_OFF + 2 * LL_MAX_SIG * 8     # [2][LL_MAX_RANK_SIG]
LL_WORDS_OFF = LL_COMB_SIG_OFF + 2 * LL_MAX_RANK_SIG * 8   # per op: u64 seq, int done, int
LL_OP_WORDS = 16                                           # (dispatch's, then combine's)
LL_CLEAN_SEQ_OFF = LL_WORDS_OFF + 2 * LL_OP_WORDS          # the barriers' u64 sequence words
LL_DESTROY_SEQ_OFF = LL_CLEAN_SEQ_OFF + 8
LL_COUNTERS_OFF = LL_WORDS_OFF + 1024                      # int [MAX_EXPERTS]
LL_VERDICTS_OFF = LL_COUNTERS_OFF + MAX_EXPERTS * 4        # [2 ops][2][LL_MAX_RANK_SIG]
LL_CLEAN_SIG_OFF = LL_VERDICTS_OFF + 2 * 2 * LL_MAX_RANK_SIG * 8   # [2][LL_MAX_RANK_SIG]
LL_DESTROY_SIG_OFF = LL_CLEAN_SIG_OFF + 2 * LL_MAX_RANK_SIG * 8   # [2][LL_MAX_RANK_SIG]
LL_ROUTES_SIG_OFF = LL_DESTROY_SIG_OFF + 2 * LL_MAX_RANK_SIG * 8  # [2][LL_MAX_RANK_SIG]
LL_DATA_OFF = 32768                                        # the data areas (_data_layout)
assert LL_DESTROY_SEQ_OFF + 8 <= LL_COUNTERS_OFF
assert LL_ROUTES_SIG_OFF + 2 * LL_MAX_RANK_SIG * 8 <= LL_DATA_OFF
LL_HEADER_FIXED = 16              # a message header's fixed part (token, epoch, n), then n entries


def align_up(v: int, a: int) -> int:
    """v rounded up to a multiple of a (the one rounding rule of every layout here and in
    epgen/regions)."""
    return (v + a - 1) // a * a


def ll_header_bytes(num_topk: int) -> int:
    """A dispatch message header with room for num_topk entries (ll_dispatch.cuh kHdr)."""
    return align_up(LL_HEADER_FIXED + 4 * num_topk, 16)


LL_HEADER_MAX = ll_header_bytes(MAX_TOPK)


def ll_payload_bytes(hidden: int, use_fp8: bool, wire_format: str = "") -> int:
    """A dispatch message's payload (ll_dispatch.cuh kPayload): FP8 row + float scale_inv per
    128 channels, 16-byte padded; MXFP8: e4m3 row + a float 2^X per 32; NVFP4: packed row + its
    wire scale words (block-scale bytes four per word, then the global scale); or the BF16 row."""
    if wire_format == "mxfp8":
        return align_up(hidden + 4 * (hidden // 32), 16)
    if wire_format == "nvfp4":
        return align_up(hidden // 2 + 4 * ((hidden // 16 + 3) // 4 + 1), 16)
    if use_fp8:
        return align_up(hidden + 4 * num_scales(hidden), 16)
    return 2 * hidden


def ll_opaque_payload_bytes(row_bytes: int, side_bytes: int) -> int:
    """An opaque format's payload (ll_dispatch.cuh kPayload, FMT 3): the row, then the side row
    (both multiples of 16 bytes)."""
    return row_bytes + side_bytes


def ll_opaque_fits(hidden: int, row_bytes: int, side_bytes: int) -> bool:
    """Whether opaque rows fit the region sized for `hidden` (the combine's hidden, what
    Buffer.get_low_latency_rdma_size_hint takes): row + side at most a BF16 row, 2 * hidden."""
    return ll_opaque_payload_bytes(row_bytes, side_bytes) <= ll_payload_bytes(hidden, False)


def ll_message_slot_bytes(hidden: int) -> int:
    """A receive slot: sized for the largest message (BF16 payload, MAX_TOPK header), so the
    data areas do not depend on dtype or top-k."""
    return LL_HEADER_MAX + ll_payload_bytes(hidden, False)


def ll_staging_bytes(hidden: int, num_ranks: int) -> int:
    """A token's send staging (ll_dispatch.cuh: payload, then a header per destination rank),
    for the largest message."""
    return ll_payload_bytes(hidden, False) + min(MAX_TOPK, num_ranks) * LL_HEADER_MAX


def ll_combine_slot_bytes(hidden: int) -> int:
    """A combine slot (receive area and send staging): room for the largest message of any
    combine format, LogFMT-10's (its metadata and every chunk as BF16;
    templates/ll_combine_wire.cuh kLogfmtBytes: a bf16x2 (amax, amin) per group of as many
    channels as an FP8 scale's). BF16 rows use 2 * hidden of it."""
    return (4 * num_scales(hidden) + 2 * hidden + 15) // 16 * 16


# The top-k the low-latency size hint covers unless told: DeepEP V1's low-latency limit
# (csrc/kernels/internode_ll.cu kNumMaxTopK = 11 at 567632d); larger top-k (epgen takes up to
# MAX_TOPK) needs the hint's num_topk.
LL_HINT_TOPK = 11


def ll_combine_recv_rows(M: int, num_ranks: int, num_experts: int, num_topk: int) -> int:
    """Rows of one combine receive half (templates/ll_combine.cuh LLCombine::recv_rows; where
    a row goes: ll_common.cuh "Where a (token, top-k slot) row lives"): expert rank r's
    rows for this owner at [r * M * min(K, El), ...), by its local expert, then by the row's
    place in the dispatch's (expert, source) chunk, which the dispatch makes the token order.
    A token has at most min(K, El) experts on one rank, and a chunk at most M rows."""
    El = num_experts // num_ranks
    return num_ranks * M * min(num_topk, El)


def ll_combine_half_need(M: int, hidden: int, num_ranks: int, num_experts: int,
                         num_topk: int) -> int:
    """Bytes of one combine receive half that a call with top-k num_topk needs."""
    return align_up(ll_combine_recv_rows(M, num_ranks, num_experts, num_topk)
                    * ll_combine_slot_bytes(hidden), 256)


def ll_combine_half_bytes(nbytes: int, layout: dict) -> int:
    """The combine receive area's half stride in a region of nbytes laid out as `layout`
    (ll_data_layout's): half of what follows the area's start (it is the last area), at most
    [E][M] slots (what the largest top-k needs: the span of comb_send), 256-aligned. The same
    for every format, top-k and both combine kernels, so a hooked combine still unread in one
    half never meets the next call's in the other, whatever their formats and top-k."""
    room = (nbytes - layout["comb_recv"]) // 2 // 256 * 256
    return max(0, min(room, layout["comb_recv"] - layout["comb_send"]))


@functools.lru_cache(maxsize=256)     # every call asks for it; callers only read the dict
def ll_data_layout(M: int, hidden: int, num_ranks: int, num_experts: int) -> dict:
    """Byte offsets of the data areas after the control area (every rank passes the same
    shapes). Sized for the largest message (BF16 payload, MAX_TOPK header): offsets do not
    depend on the dtype or top-k, so every configuration of these shapes fits one Buffer.
      disp_recv  messages [2 halves][R][M] of ll_message_slot_bytes
      disp_send  staging: payloads [M], then headers [M][min(MAX_TOPK, R)]
      comb_rows  int32 [2 halves][M][MAX_TOPK]: where the combine's receive reads each
                 (token, top-k slot) (send block b writes its tokens', receive block b reads)
      comb_send  [E * M] of ll_combine_slot_bytes: bf16 [El][R * M][H] as the zero-copy
                 buffer; staging of NVSHMEM puts
      comb_recv  [2 halves] of ll_combine_recv_rows slots of ll_combine_slot_bytes (half
                 stride ll_combine_half_bytes: the rest of the region; a format packs its own
                 message size in a slot), last: its size is ll_region_bytes'."""
    disp_recv = LL_DATA_OFF
    disp_send = align_up(disp_recv + 2 * num_ranks * M * ll_message_slot_bytes(hidden), 256)
    comb_rows = align_up(disp_send + M * ll_staging_bytes(hidden, num_ranks), 256)
    comb_send = align_up(comb_rows + 2 * M * MAX_TOPK * 4, 256)
    comb_recv = align_up(comb_send + num_experts * M * ll_combine_slot_bytes(hidden), 256)
    return dict(disp_recv=disp_recv, disp_send=disp_send, comb_rows=comb_rows,
                comb_send=comb_send, comb_recv=comb_recv)


def ll_region_bytes(M: int, hidden: int, num_ranks: int, num_experts: int,
                    num_topk: int = LL_HINT_TOPK) -> int:
    """num_rdma_bytes a Buffer needs for low-latency calls of these shapes and top-k up to
    num_topk (Buffer.get_low_latency_rdma_size_hint)."""
    start = ll_data_layout(M, hidden, num_ranks, num_experts)["comb_recv"]
    return start + 2 * ll_combine_half_need(M, hidden, num_ranks, num_experts, num_topk)


LL_ROUTE_BYTES = 8                # ll_combine_rank.cuh LLRoute: int expert, float weight


def ll_per_rank_half_bytes(M: int, hidden: int, num_ranks: int, num_topk: int) -> int:
    """One half of the per-rank combine's receive area (ll_combine_rank.cuh LLCombineRank::
    half_bytes): routes [R][M][K], partials [R][M][H] bf16, route staging [M][K], partial
    staging [R][M][H]."""
    rows = num_ranks * M * 2 * hidden
    return (align_up(num_ranks * M * num_topk * LL_ROUTE_BYTES, 256) + rows
            + align_up(M * num_topk * LL_ROUTE_BYTES, 256) + rows)


@dataclass(frozen=True)
class Fact:
    cpp: str                       # its name in epgen::facts
    value: int
    device: str | None = None      # what a device header derives that must equal it
    header: str | None = None      # the header defining `device` (assert only where included)


# Headers after the prelude read these values as `::epgen::facts::k...` (the unit renders them
# before it includes them); `device` is given only where a header cannot (common.cuh is in the
# precompiled prelude) or derives a value of its own from them.
FACTS = (
    Fact("kErrorWords", ERROR_WORDS),
    Fact("kErrTimeout", ERR_TIMEOUT, "::epgen::kErrTimeout", "common.cuh"),
    Fact("kErrBadIndex", ERR_BAD_INDEX, "::epgen::kErrBadIndex", "common.cuh"),
    Fact("kErrCapacity", ERR_CAPACITY, "::epgen::kErrCapacity", "common.cuh"),
    Fact("kErrBadArg", ERR_BAD_ARG, "::epgen::kErrBadArg", "common.cuh"),
    *(Fact(f"kErrField{n}", v, f"::epgen::kErrField{n}", "common.cuh") for n, v in (
        ("Code", ERR_FIELD_CODE), ("Op", ERR_FIELD_OP), ("Rank", ERR_FIELD_RANK),
        ("Peer", ERR_FIELD_PEER), ("Detail", ERR_FIELD_DETAIL))),
    Fact("kScaleGroup", SCALE_GROUP),
    Fact("kNormalMaxChannels", NORMAL_MAX_CHANNELS),
    Fact("kNormalMaxRanks", NORMAL_MAX_RANKS),
    Fact("kNormalNotifySeqOff", NORMAL_NOTIFY_SEQ_OFF),
    Fact("kNormalNotifyTableOff", NORMAL_NOTIFY_TABLE_OFF),
    Fact("kNormalNotifyRowInts", NORMAL_NOTIFY_ROW_INTS),
    Fact("kNormalDispCallOff", NORMAL_DISP_CALL_OFF, "::epgen::nctrl::kDispCall",
         "normal_ctrl.cuh"),
    Fact("kNormalRingCountersOff", NORMAL_RING_COUNTERS_OFF, "::epgen::nctrl::kDispSendTail",
         "normal_ctrl.cuh"),
    Fact("kNormalRingCounters", NORMAL_RING_COUNTERS,
         "(::epgen::nctrl::kDispDone - ::epgen::nctrl::kDispSendTail) / 8", "normal_ctrl.cuh"),
    Fact("kNormalCtrlBytes", NORMAL_CTRL_BYTES),
    Fact("kNormalRingBatch", NORMAL_RING_BATCH),
    Fact("kNormalNotifyThreads", NORMAL_NOTIFY_THREADS),
    Fact("kInodeMaxChannels", INODE_MAX_CHANNELS),
    Fact("kInodeNotifyMaxChannels", INODE_NOTIFY_MAX_CHANNELS),
    Fact("kInodeNotifySeqOff", INODE_NOTIFY_SEQ_OFF),
    Fact("kInodeNotifySigOff", INODE_NOTIFY_SIG_OFF),
    Fact("kInodeCtrlWords", INODE_CTRL_WORDS),
    Fact("kLLMaxSig", LL_MAX_SIG),
    Fact("kLLMaxRankSig", LL_MAX_RANK_SIG),
    Fact("kLLMaxTokens", LL_MAX_TOKENS),
    Fact("kMaxTopk", MAX_TOPK),
    Fact("kLLHeaderFixed", LL_HEADER_FIXED),
    Fact("kLLRouteBytes", LL_ROUTE_BYTES, "sizeof(::epgen::LLRoute)", "ll_combine_rank.cuh"),
    Fact("kMaxExperts", MAX_EXPERTS),
    Fact("kLLDispSigOff", LL_DISP_SIG_OFF), Fact("kLLCombSigOff", LL_COMB_SIG_OFF),
    Fact("kLLWordsOff", LL_WORDS_OFF), Fact("kLLOpWords", LL_OP_WORDS),
    Fact("kLLCountersOff", LL_COUNTERS_OFF), Fact("kLLVerdictsOff", LL_VERDICTS_OFF),
    Fact("kLLRoutesSigOff", LL_ROUTES_SIG_OFF), Fact("kLLDataOff", LL_DATA_OFF),
    Fact("kLLSend", LL_SEND),
    Fact("kLLRecv", LL_RECV),
)


def render_values() -> str:
    """The C++ block every unit renders before it includes the family's headers: every fact as
    an enumerator of epgen::facts. Emits no code."""
    # Enumerators, not constexpr variables: under -default-device NVRTC emits a namespace-scope
    # constexpr as a device global (.nv.global.init); an enumerator takes no storage.
    # Packed a few to a line: a unit stays a short page (test_specs_codegen).
    values = [v.replace("\0", " ") for v in textwrap.wrap(
        " ".join(f"{f.cpp}\0=\0{f.value}," for f in FACTS), 96,
        initial_indent="    ", subsequent_indent="    ")]   # \0: never break inside an entry
    lines = ["namespace epgen::facts {  // epgen/jit/layout_facts.py", "enum : long long {",
             *values, "}; }  // namespace epgen::facts"]
    return "\n".join(lines) + "\n"


def render_checks(included_headers: set[str]) -> str:
    """The static_asserts of a unit that includes `included_headers` (transitively): each value
    a header it can see defines or derives on its own against the fact."""
    return "".join(f"static_assert(static_cast<long long>({f.device}) == ::epgen::facts::{f.cpp}, "
                   f'"{f.header} {f.device} != epgen/jit/layout_facts.py {f.cpp}");\n'
                   for f in FACTS if f.device and f.header in included_headers)


# -- internode normal mode: records (regions/internode.py; templates/internode_*.cuh) --------
def inode_source_meta_bytes(ranks_per_node: int) -> int:
    """epgen's SourceMeta (reference_internode.source_meta_bytes): source node, then a bit per
    local rank of the receiving node; DeepEP's 8 bytes for L <= 32."""
    return 4 + 4 * (-(-ranks_per_node // 32))


def inode_dispatch_record_bytes(row_bytes: int, num_scale_cols: int, num_topk: int,
                                ranks_per_node: int) -> int:
    """One RDMA (and NVLink forwarding) dispatch record: row, scales, source meta, top-k indices
    (int32), top-k weights, rounded up to 16 bytes."""
    return (row_bytes + 4 * num_scale_cols + inode_source_meta_bytes(ranks_per_node)
            + 8 * num_topk + 15) // 16 * 16


def inode_combine_record_bytes(hidden: int, num_topk: int) -> int:
    """One combine record: the node partial (BF16 row) and its float32 top-k weights."""
    return (hidden * 2 + 4 * num_topk + 15) // 16 * 16
