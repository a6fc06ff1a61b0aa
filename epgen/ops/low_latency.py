"""DeepEP V1's low-latency API: dispatch / combine generated per configuration.

Symmetric region (ctx.rdma, zeroed at Buffer creation, owned by this module) layout (its
offsets and sizes are defined in epgen/jit/layout_facts.py, LL_* and ll_data_layout):
  [0, 32 KiB) control, at fixed offsets whatever the shapes:
     dispatch signals u64 [2][1024]   (epoch tag << 16 | count) per (local expert, source rank)
     combine signals  u64 [2][64]     (epoch tag << 16 | 1) per source rank
     local words      per op: u64 seq (its last epoch), int done, int recv_done (the
                      per-rank combine's receive count); dispatch's, then combine's
     slot counters    int  [1024]     per global expert, reset by the send phase itself
     verdicts         u64  [2 ops][2][64]  enable_shrink: (epoch tag << 16 | in/out) per peer
     barrier signals  u64  [2 barriers][2][64] (epoch tag << 16 | 1) per source rank:
                      clean_low_latency_buffer's, destroy()'s (enable_shrink)
     routes signals   u64  [2][64] (epoch tag << 16 | tokens) per owner rank: the per-rank
                      combine's (EPGEN_LL_COMBINE=per_rank) top-k exchange
  then data (offsets depend on M, hidden, ranks, experts, so every rank must pass the same):
     dispatch receive [2][R][M] messages, a slot per (source, token): header (token, epoch,
                      n, (local expert, slot) x n) + FP8 row + scales, or BF16 row
     dispatch staging [M] payloads + [M][min(K, R)] headers (sources of NVSHMEM puts)
     combine rows     int [2][M][32]: the combine receive's slot of each (token, top-k slot)
     combine send     [E*M] slots of combine_slot_bytes: bf16 [El][R*M][H] as the zero-copy
                      buffer; staging of NVSHMEM puts
     combine receive  [2][R][M * min(K, El)] slots of combine_slot_bytes, last, half stride
                      ll_combine_half_bytes (the rest of the region, the same for every format
                      and top-k; slot of (expert rank, local expert, the row's place in the
                      dispatch's chunk), which the owner finds from its topk_idx: a BF16 row, or
                      its message in the call's wire format); the per-rank combine uses each
                      half for its routes, partials and staging instead
                      (templates/ll_combine_rank.cuh, ll_per_rank_half_bytes)
Signals carry an epoch (tag: its low 48 bits; headers carry all 64) from a device-side 64-bit
sequence word (one per op), and the half used is the epoch's parity, so two calls may be in flight, CUDA graph replays stay correct and no clean
step is ever needed. Send phase = launch with phases=1, receive phase = phases=2 (the hook);
a call without a hook runs both in one launch (phases=3) unless ranks' kernels overlap on a
shared GPU (MPS).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .. import env, formats
from ..jit import layout_facts
from ..jit.kernel_args import (LowLatencyBarrierArgs, LowLatencyCombineArgs,
                           LowLatencyCombineRankArgs, LowLatencyDispatchArgs)
from ..jit.specs import ll_barrier_spec, ll_combine_spec, ll_dispatch_spec, num_scales
from ..variants import combine_variant
from .outputs import carve
from .plans import Plans
from .context import (VECTOR_BYTES, OpsContext, arg_error, check_tensor, set_addresses,
                      spec_for_call)
from .layout import check_topk_idx
from .streams import StreamOrder, capturing

# The region's layout is layout_facts' (LL_*): the kernels' units static_assert their side of it.
FUSE_ENV = "EPGEN_LL_FUSE"     # 0: send and receive as two launches wherever they could be one
MAX_TOKENS = layout_facts.LL_MAX_TOKENS        # num_max_dispatch_tokens_per_rank
MAX_SIG = layout_facts.LL_MAX_SIG              # dispatch signal words per half
MAX_RANK_SIG = layout_facts.LL_MAX_RANK_SIG    # combine signal / verdict words per half
DISP_SIG_OFF = layout_facts.LL_DISP_SIG_OFF
COMB_SIG_OFF = layout_facts.LL_COMB_SIG_OFF
WORDS_OFF = layout_facts.LL_WORDS_OFF          # per op: u64 seq, int done (16 bytes)
OP_WORDS = layout_facts.LL_OP_WORDS
CLEAN_SEQ_OFF = layout_facts.LL_CLEAN_SEQ_OFF  # then the barriers' u64 sequence words
DESTROY_SEQ_OFF = layout_facts.LL_DESTROY_SEQ_OFF
COUNTERS_OFF = layout_facts.LL_COUNTERS_OFF
VERDICTS_OFF = layout_facts.LL_VERDICTS_OFF    # dispatch [2][64] u64, then combine
CLEAN_SIG_OFF = layout_facts.LL_CLEAN_SIG_OFF
DESTROY_SIG_OFF = layout_facts.LL_DESTROY_SIG_OFF
ROUTES_SIG_OFF = layout_facts.LL_ROUTES_SIG_OFF
DATA_OFF = layout_facts.LL_DATA_OFF
SEND, RECV = layout_facts.LL_SEND, layout_facts.LL_RECV


@dataclass(frozen=True)
class _OpPlaces:
    """Where one operation's control words and data areas sit in the region."""
    sig_off: int        # its signals
    words_off: int      # its 64-bit sequence word, then its int done counter
    verdicts_off: int   # its enable_shrink verdicts, u64 [2][64]
    recv_area: str      # _data_layout keys
    send_area: str


_PLACES = {
    "low_latency_dispatch": _OpPlaces(DISP_SIG_OFF, WORDS_OFF, VERDICTS_OFF,
                                      "disp_recv", "disp_send"),
    "low_latency_combine": _OpPlaces(COMB_SIG_OFF, WORDS_OFF + OP_WORDS,
                                     VERDICTS_OFF + 2 * MAX_RANK_SIG * 8, "comb_recv", "comb_send"),
}


HEADER_MAX = layout_facts.LL_HEADER_MAX       # a dispatch header with room for MAX_TOPK entries
payload_bytes = layout_facts.ll_payload_bytes  # a dispatch message's payload
_data_layout = layout_facts.ll_data_layout     # the data areas' offsets (_OpPlaces' area keys)
per_rank_half_bytes = layout_facts.ll_per_rank_half_bytes   # the per-rank combine's half
combine_slot_bytes = layout_facts.ll_combine_slot_bytes  # a combine message slot


def combine_runs_per_rank(M: int, hidden: int, num_ranks: int, num_experts: int, num_topk: int,
                          return_recv_hook: bool, enable_shrink: bool,
                          half_bytes: int | None = None) -> bool:
    """Whether a combine runs the per-rank kernel: EPGEN_LL_COMBINE=per_rank, except where its
    send half would wait on a peer that must not be waited on (return_recv_hook: the send half
    must never block; enable_shrink: a masked peer's routes never come) or its areas do not fit
    a half of the combine receive area (one expert per rank; two where the routes outgrow the
    LogFMT metadata room, at small hidden sizes): those calls run
    the per-expert kernel, which gives the same result within BF16 rounding. half_bytes: the
    Buffer's combine half stride (default: a Buffer of the size hint for this top-k)."""
    if combine_variant() != "per_rank" or return_recv_hook or enable_shrink:
        return False
    if half_bytes is None:
        nbytes = low_latency_rdma_size_hint(M, hidden, num_ranks, num_experts,
                                            max(num_topk, layout_facts.LL_HINT_TOPK))
        half_bytes = layout_facts.ll_combine_half_bytes(
            nbytes, _data_layout(M, hidden, num_ranks, num_experts))
    return per_rank_half_bytes(M, hidden, num_ranks, num_topk) <= half_bytes


def low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int,
                               num_ranks: int, num_experts: int,
                               num_topk: int = layout_facts.LL_HINT_TOPK) -> int:
    """Bytes of num_rdma_bytes a Buffer needs for these low-latency shapes, top-k up to
    num_topk (DeepEP's limit, 11, unless told: its hint takes no top-k)."""
    return layout_facts.ll_region_bytes(num_max_dispatch_tokens_per_rank, hidden, num_ranks,
                                        num_experts, num_topk)


def _scale_store(layout: str, fmt: formats.WireFormat, El: int, RM: int, cols: int, dtype):
    """(shape, dtype) of the allocation a dispatch's kernel writes its received scales into, in
    a received-scale layout (formats.RECV_SCALE_LAYOUTS; templates/ll_scale_layout.cuh is the
    kernel's map, cols 4-byte words a row). deepep / deepgemm: [El, cols, rows] (rows: RM, or RM
    rounded up to 4); cutlass_128x4: int32 words of [El, ceil(RM/128) * 128 * 4 * W] uint8 tiles
    (W = the block-scale words), then NVFP4's float32 [El, RM] global scales."""
    if layout in ("deepep", "deepgemm"):
        return (El, cols, RM if layout == "deepep" else (RM + 3) // 4 * 4), dtype
    W = cols - 1 if fmt is formats.NVFP4 else cols
    tile_words = El * ((RM + 127) // 128) * 128 * W
    return (tile_words + (El * RM if fmt is formats.NVFP4 else 0),), torch.int32


def _scales_of(store, layout: str, fmt: formats.WireFormat, El: int, RM: int):
    """recv_x_scales as returned, views of `store`: deepep / deepgemm MN-major [El, RM, cols];
    cutlass_128x4 the tiles as uint8 [El, -1], NVFP4's with its float32 [El, RM] global scales."""
    if layout in ("deepep", "deepgemm"):
        return store.transpose(1, 2)[:, :RM]
    tile_words = store.numel() - (El * RM if fmt is formats.NVFP4 else 0)
    tiles = store[:tile_words].view(torch.uint8).view(El, -1)
    if fmt is formats.NVFP4:
        return tiles, store[tile_words:].view(torch.float32).view(El, RM)
    return tiles


def _recv_rows(x, x_side, opaque, cast, fmt, layout, use_fp8, use_ue8m0, El, RM, H):
    """((shape, dtype) of recv_x, [(shape, dtype) of its scales' store] or []) of a dispatch:
    an opaque format's rows and side rows in the caller's dtypes, a cast format's row and scale
    columns, DeepEP's FP8 (float32 or UE8M0-packed int32 scales) or BF16 rows."""
    if opaque is not None:
        side = [((El, RM, x_side.size(1)), x_side.dtype)] if x_side is not None else []
        return ((El, RM, x.size(1)), x.dtype), side
    if cast:
        return ((El, RM, fmt.data_width(H)), fmt.data_torch_dtype()), \
            [_scale_store(layout, fmt, El, RM, fmt.scale_cols(H), torch.int32)]
    if not use_fp8:
        return ((El, RM, H), torch.bfloat16), []
    S = num_scales(H)
    cols = (S + 3) // 4 if use_ue8m0 else S
    return ((El, RM, H), torch.float8_e4m3fn), \
        [_scale_store(layout, fmt, El, RM, cols, torch.int32 if use_ue8m0 else torch.float32)]


def _ll_format(wire_format, use_fp8, round_scale, use_ue8m0) -> formats.WireFormat:
    """The format a low-latency dispatch sends: DeepEP's flags name it, or wire_format does; then
    the flags must be DeepEP's defaults or name the same format (no silent override)."""
    by_flags = formats.of_low_latency_flags(use_fp8, round_scale, use_ue8m0)
    if wire_format is None:
        return formats.get(by_flags)
    fmt = formats.get(wire_format)
    formats.low_latency_fields(fmt)          # one low-latency dispatch can send, else the error
    defaults = (use_fp8, round_scale, use_ue8m0) == (True, False, False)
    if not defaults and by_flags != fmt.name:
        raise arg_error("wire_format", fmt.name,
                        f"conflicts with use_fp8={use_fp8}, round_scale={round_scale}, "
                        f"use_ue8m0={use_ue8m0} (which name {by_flags})")
    return fmt


def _opaque_format(wire_format):
    """The opaque WireFormat wire_format names, None for any other (or None)."""
    if wire_format is None:
        return None
    fmt = formats.get(wire_format)
    return fmt if fmt.packing == "bytes" else None


def _check_opaque_x(x, fmt: formats.WireFormat, hidden):
    """(data, side or None, hidden) of an opaque dispatch's x: a tensor of fmt.row_bytes a row,
    or a (data, side) tuple with fmt.side_bytes a side row, any dtypes, contiguous and 16-byte
    aligned (moved 16 bytes at a time); hidden, the combine's (its BF16 expert outputs'), sizes
    the region, so the rows plus side rows must fit a BF16 row (layout_facts.ll_opaque_fits)."""
    formats.low_latency_fields(fmt)          # 16-byte rows and side rows, else the error
    data, side = (x[0], x[1]) if isinstance(x, (tuple, list)) and len(x) == 2 else (x, None)
    fmt.check(data, side)
    for name, t in (("x[0]" if side is not None else "x", data), ("x[1]", side)):
        if t is not None:
            check_tensor(name, t, t.dtype, align=VECTOR_BYTES)
    if hidden is None:
        raise arg_error("hidden", None, f"{fmt.name} needs the combine's hidden (the BF16 "
                                        "expert outputs' channels): it sizes the region")
    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden <= 0:
        raise arg_error("hidden", hidden, "must be a positive int")
    if not layout_facts.ll_opaque_fits(hidden, fmt.row_bytes, fmt.side_bytes):
        raise arg_error("wire_format", fmt.name,
                        f"rows of {fmt.row_bytes} bytes plus side rows of {fmt.side_bytes} must "
                        f"fit 2 * hidden = {2 * hidden} bytes (a BF16 row's room in the region)")
    return data, side, hidden


class LowLatencyOps:
    def __init__(self, ctx: OpsContext, enable_shrink: bool = False, allow_nvlink: bool = True,
                 grids_overlap: bool = False):
        self.ctx = ctx
        self.enable_shrink = enable_shrink
        # A kernel running both phases in one launch needs its whole grid resident: its early
        # blocks wait (receive) for what its late blocks send. A GPU of its own, or one
        # time-sliced between ranks, runs one rank's grid at a time; ranks whose kernels
        # overlap on a GPU (MPS) do not get that: a peer's spinning blocks can hold SMs of
        # this rank's share, so the late blocks start only when the peer's deadline frees them
        # (seen on 1x H200, 2 ranks, per-rank combine). There the phases run as two launches,
        # as everywhere with EPGEN_LL_FUSE=0 (read when the Buffer is made).
        self.fuse_phases = not grids_overlap and env.flag(FUSE_ENV, True)
        R = ctx.num_ranks
        self.mask = torch.zeros(R, dtype=torch.int32, device=ctx.device)
        self.pes = torch.tensor(ctx.pes, dtype=torch.int32, device=ctx.device)
        # A peer with address 0 is reached through NVSHMEM puts and signal ops (its RDMA
        # transports across nodes); allow_nvlink_for_low_latency_mode=False sends every peer
        # that way, as DeepEP does, also those NVLink could reach.
        if allow_nvlink:
            self.peer_bases = ctx.peer_table("rdma")
        else:
            self.peer_bases = torch.zeros(R, dtype=torch.int64, device=ctx.device)
        self.any_remote = int(not allow_nvlink or any(a == 0 for a in ctx.rdma.peer_addrs))
        # The data areas' places depend on (M, hidden, num_experts) (layout_facts.
        # ll_data_layout): after a call of other shapes, a peer may still be reading its
        # receive areas where this call's sends would land, so the first call of new shapes
        # starts with a barrier (_run). Graph replays, which run no host code, are not seen.
        self._layout = {"last": None}
        # Where a receive launched on its own reads the epoch its send stored: a call without a
        # hook launches its receive right after its send, and this Buffer's calls never overlap
        # (StreamOrder), so it uses the op's word here; a call with a hook allocates its own
        # (other calls may run before its receive).
        self._epoch_words = torch.zeros(2, dtype=torch.int64, device=ctx.device)
        self._epoch_addr = {"dispatch": self._epoch_words.data_ptr(),
                            "combine": self._epoch_words.data_ptr() + 8}
        self.sms = ctx.device_sms
        self.base = ctx.rdma.addr
        self.counters_addr = self.base + COUNTERS_OFF
        self._checked = {}      # _check_common's passing shapes -> their data layout
        self._specs = {}        # a combine's (format, shapes, variant) -> its spec and kernel
        self._dispatch_specs = {}   # a dispatch's format arguments, shapes -> format, spec, kernel
        self._plans = Plans(ctx)    # the fast lane: calls replayed from C

    # -- helpers ------------------------------------------------------------------------
    def _check_common(self, M, hidden, num_experts, num_topk):
        """The shapes every low-latency call shares. hidden, num_experts and the top-k are the
        spec's rules (those of the combine, which every one of these shapes runs), re-worded
        with the caller's names; M is the Buffer's (no kernel is keyed by it). Shapes that
        passed once pass again (the region's size is fixed): a dict lookup, keyed by the types
        too (True == 1, 128.0 == 128 as keys)."""
        key = (M, hidden, num_experts, num_topk, type(M), type(hidden), type(num_experts))
        lay = self._checked.get(key)
        if lay is not None:
            return lay
        R = self.ctx.num_ranks
        if not isinstance(M, int) or isinstance(M, bool) or not 1 <= M <= MAX_TOKENS:
            raise arg_error("num_max_dispatch_tokens_per_rank", M, f"must be an int in [1, {MAX_TOKENS}]")
        K = 1 if num_topk is None else num_topk
        spec_for_call(ll_combine_spec, {"hidden": "hidden", "num_experts": "num_experts",
                                        "num_topk": "topk_idx.shape[1]"},
                      hidden, K, num_experts, R)
        need = low_latency_rdma_size_hint(M, hidden, R, num_experts, K)
        if need > self.ctx.rdma.nbytes:
            topk = "" if num_topk is None else f", num_topk={K}"
            raise arg_error("num_rdma_bytes", self.ctx.rdma.nbytes,
                            f"too small for M={M}, hidden={hidden}, num_ranks={R}, "
                            f"num_experts={num_experts}{topk}: needs {need} bytes "
                            f"(Buffer.get_low_latency_rdma_size_hint(..., num_topk=K) covers "
                            f"top-k up to K, {layout_facts.LL_HINT_TOPK} unless told)")
        lay = self._checked[key] = _data_layout(M, hidden, R, num_experts)
        return lay

    @staticmethod
    def _check_stats(name, t, dtype, n):
        if t is not None:
            check_tensor(name, t, dtype, (n,))

    def _fill_common(self, args_type, op, lay, num_tokens, max_tokens, phases):
        """A struct of args_type with the fields both operations' launches share: error word,
        peers, control words (filled once per shape: OpsContext.args_from)."""
        places = _PLACES[op]
        a = self.ctx.args_from(
            (self, args_type, op, lay[places.recv_area], lay[places.send_area], max_tokens,
             phases),     # self: its peers, enable_shrink; no token count (one key per shape)
            lambda: self._fill_shared(args_type(), places, lay, max_tokens, phases, op))
        a.num_tokens = num_tokens
        return a

    def _fill_shared(self, args, places, lay, max_tokens, phases, op):
        self.ctx.fill_error_fields(args, op)
        args.rdma_base = self.base
        args.peer_bases = self.peer_bases.data_ptr()
        args.pes = self.pes.data_ptr()
        if self.enable_shrink:
            args.mask = self.mask.data_ptr()
            args.verdicts = self.base + places.verdicts_off
        args.any_remote = self.any_remote
        args.seq = self.base + places.words_off
        args.done = self.base + places.words_off + 8
        args.sig_off = places.sig_off
        args.recv_off = lay[places.recv_area]
        args.send_off = lay[places.send_area]
        args.max_tokens = max_tokens
        args.phases = phases
        if op == "low_latency_combine":
            args.half_bytes = self.combine_half_bytes(lay)
            args.rows_off = lay["comb_rows"]
        return args

    def combine_half_bytes(self, lay) -> int:
        """The combine receive area's half stride in this Buffer (layout_facts)."""
        return layout_facts.ll_combine_half_bytes(self.ctx.rdma.nbytes, lay)

    def _call_epoch(self, op, fused, return_recv_hook):
        """The call_epoch field: None where the receive takes the epoch from its own send (one
        launch), this call's own word where a hook may let other calls run before its receive,
        else the op's word in this Buffer (an address: nothing allocated per call)."""
        if fused:
            return None
        if return_recv_hook:
            return torch.empty(1, dtype=torch.int64, device=self.ctx.device)
        return self._epoch_addr[op]

    def _run(self, spec, kernel, make_args, fields, smem, async_finish, return_recv_hook,
             tensors, layout, fused=False, launches=None):
        """Send phase now, receive phase now or in the returned hook, under the Buffer's
        stream semantics (ops/streams.py: the hook launches on the send's stream). fused: one
        launch running both phases (kernels whose receive takes the epoch from its own send).
        make_args(phases): the struct without its per-call addresses, `fields` (set_addresses).
        The receive's arguments are the send's with another phase (one struct filled).
        launches: a fastcall.Launches that records each launch (the call's Plan).
        layout: (the op's name, its (M, hidden, num_experts)); the send of a call whose shapes
        differ from the previous call's first runs the cross-rank barrier on its stream (a
        peer that misses its deadline there is reported under the op's name)."""
        op, layout_key = layout

        def launch(args, first=False):
            def go(stream):
                if first and self._layout["last"] != layout_key:
                    # not under capture: a replay runs wherever the user puts it, so a captured
                    # barrier would not protect it (README, "CUDA graphs"), and loading the
                    # barrier's module there could break the capture
                    if self._layout["last"] is not None and not capturing():
                        self._barrier(op, CLEAN_SIG_OFF, CLEAN_SEQ_OFF, self.enable_shrink,
                                      stream)
                    self._layout["last"] = layout_key
                kernel.launch(self.sms, spec.threads, args, stream.cuda_stream, smem=smem)
                if launches is not None:
                    launches.add(kernel, self.sms, spec.threads, smem, args, fields)
            return go
        if fused:
            return self.ctx.streams.two_phase(
                launch(set_addresses(make_args(SEND | RECV), fields), first=True),
                lambda stream: None, async_finish, False, tensors)
        send_args = set_addresses(make_args(SEND), fields)
        recv_args = type(send_args).from_buffer_copy(send_args)
        recv_args.phases = RECV
        return self.ctx.streams.two_phase(launch(send_args, first=True), launch(recv_args),
                                          async_finish, return_recv_hook, tensors)

    def _layout_guards(self, layout_key) -> tuple:
        """What a replayed call (runtime/fastcall.py) needs to skip the layout barrier: the
        previous call had its shapes."""
        return ((self._layout, "last", layout_key),)

    # -- API ------------------------------------------------------------------------------
    def _barrier(self, op, sig_off, seq_off, use_mask, stream=None):
        """One launch of the per-peer barrier (templates/ll_barrier.cuh) on `stream` (default:
        the current one). Every rank runs the same sequence of barriers on a pair of words."""
        ctx = self.ctx
        spec = ll_barrier_spec(ctx.num_ranks)
        kernel = ctx.kernel(spec)
        a = ctx.fill_error_fields(LowLatencyBarrierArgs(), op)
        a.rdma_base = self.base
        a.peer_bases = self.peer_bases.data_ptr()
        a.pes = self.pes.data_ptr()
        a.mask = self.mask.data_ptr() if use_mask else 0
        a.seq = self.base + seq_off
        a.sig_off = sig_off
        a.any_remote = self.any_remote
        stream = stream or torch.cuda.current_stream(ctx.device.index)
        kernel.launch(1, spec.threads, a, stream.cuda_stream)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts):
        """DeepEP's barrier across the ranks; nothing needs zeroing (signals are epoch-tagged).
        Without enable_shrink a peer missing EPGEN_TIMEOUT_S is an error naming it; with it,
        each peer has its own deadline and one that misses it is masked out."""
        self.ctx.check_errors()
        self._check_common(num_max_dispatch_tokens_per_rank, hidden, num_experts, None)
        self._barrier("clean_low_latency_buffer", CLEAN_SIG_OFF, CLEAN_SEQ_OFF, self.enable_shrink)

    def settle_peers_before_free(self) -> None:
        """enable_shrink, at destroy(): a barrier of its own (so a peer behind in the cleans
        cannot take an earlier clean's words for it) that masks every peer not there by the
        deadline. A rank that finds every peer present may free collectively; any other finds
        one masked and leaks, and so does every rank that masked it before."""
        self._barrier("barrier", DESTROY_SIG_OFF, DESTROY_SEQ_OFF, True)

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                             cumulative_local_expert_recv_stats=None,
                             dispatch_wait_recv_cost_stats=None, use_fp8=True, round_scale=False,
                             use_ue8m0=False, async_finish=False, return_recv_hook=False,
                             wire_format=None, recv_scale_layout=None, hidden=None):
        call = (x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, use_fp8,
                round_scale, use_ue8m0, async_finish, return_recv_hook, wire_format,
                recv_scale_layout, hidden)
        plan_key = ("dispatch", getattr(x, "shape", None), getattr(topk_idx, "shape", None))
        replayed = self._plans.run(plan_key, call)
        if replayed is not None:
            return replayed
        ctx = self.ctx
        ctx.check_errors()
        R, M = ctx.num_ranks, num_max_dispatch_tokens_per_rank
        opaque = _opaque_format(wire_format)
        x_side = None
        if opaque is not None:
            x, x_side, H = _check_opaque_x(x, opaque, hidden)
            T = x.size(0)
        else:
            if hidden is not None:
                raise arg_error("hidden", hidden, "is given for opaque wire formats only (the "
                                                  "others take it from x.shape[1])")
            check_tensor("x", x, torch.bfloat16, align=VECTOR_BYTES)
            if x.dim() != 2:
                raise arg_error("x.shape", tuple(x.shape), "must be [num_tokens, hidden]")
            T, H = x.shape
        check_topk_idx(topk_idx, num_tokens=T)
        K = topk_idx.shape[1]
        lay = self._check_common(M, H, num_experts, K)
        if T > M:
            raise arg_error("x.shape[0]", T, f"must be <= num_max_dispatch_tokens_per_rank={M}")
        StreamOrder.check_two_phase(async_finish, return_recv_hook)
        # what the format arguments and shapes decide, resolved once per combination (its rules
        # raise the first time, and a combination that passed passes again)
        key = (wire_format, use_fp8, round_scale, use_ue8m0, recv_scale_layout, H, K,
               num_experts, type(use_fp8), type(round_scale), type(use_ue8m0))
        try:
            found = self._dispatch_specs.get(key)
        except TypeError:            # an unhashable argument: resolved (and refused) below
            found, key = None, None
        if found is None:
            found = [*self._dispatch_format(wire_format, use_fp8, round_scale, use_ue8m0,
                                            recv_scale_layout, H, K, num_experts,
                                            opaque is not None), None]
            if key is not None:
                self._dispatch_specs[key] = found
        fmt, layout, use_fp8, use_ue8m0, cast, spec, kernel = found
        El = num_experts // R
        self._check_stats("cumulative_local_expert_recv_stats",
                          cumulative_local_expert_recv_stats, torch.int32, El)
        self._check_stats("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats,
                          torch.int64, R)
        if kernel is None:           # looked up once the call's checks passed
            kernel = found[-1] = ctx.kernel(spec)

        # Two allocations a call: the rows and their scales (the expert GEMM's inputs, freed
        # together), and the handle's metadata with the counts (kept until the combine; apart,
        # so that a caller keeping the handle does not keep the rows).
        dev, RM = ctx.device, R * M
        rows, store = _recv_rows(x, x_side, opaque, cast, fmt, layout, use_fp8, use_ue8m0, El,
                                 RM, H)
        data_block, (recv_x, *scale_store) = carve(dev, [rows] + store)
        scale_store = scale_store[0] if scale_store else None
        scales = scale_store
        if scale_store is not None and opaque is None:
            scales = _scales_of(scale_store, layout, fmt, El, RM)
        meta_block, (recv_count, src_info, layout_range) = carve(
            dev, [((El,), torch.int32), ((El, RM), torch.int32), ((El, R), torch.int64)])
        fused = self.fuse_phases and not return_recv_hook
        call_epoch = self._call_epoch("dispatch", fused, return_recv_hook)

        def make_args(phases):
            a = self._fill_common(LowLatencyDispatchArgs, "low_latency_dispatch", lay, T, M,
                                  phases)
            a.counters = self.counters_addr
            return a

        fields = {"x": x, "x_side": x_side, "topk_idx": topk_idx, "recv_x": recv_x,
                  "recv_scales": scale_store, "recv_src_info": src_info,
                  "recv_layout_range": layout_range, "recv_count": recv_count,
                  "cumulative_stats": cumulative_local_expert_recv_stats,
                  "wait_stats": dispatch_wait_recv_cost_stats, "call_epoch": call_epoch}
        tensors = (x, x_side, topk_idx, recv_x, scale_store, recv_count, src_info, layout_range,
                   call_epoch if return_recv_hook else None, cumulative_local_expert_recv_stats,
                   dispatch_wait_recv_cost_stats)
        launches = self._plans.recorder(not async_finish and not return_recv_hook)
        event, hook = self._run(spec, kernel, make_args, fields, spec.payload_bytes,
                                async_finish, return_recv_hook, tensors,
                                ("low_latency_dispatch", (M, H, num_experts)),
                                fused=fused, launches=launches)
        handle = (src_info, layout_range, M, H, num_experts)
        out = recv_x if scales is None else \
            (recv_x, *scales) if isinstance(scales, tuple) else (recv_x, scales)
        result = (out, recv_count, handle, event, hook)
        # what a replay makes, in order: each block, then what lies in it (the returned
        # scales too: views of the store)
        carved = (data_block, recv_x, scale_store,
                  *(scales if isinstance(scales, tuple) else (scales,)),
                  meta_block, recv_count, src_info, layout_range)
        allocated = list({id(t): t for t in carved if t is not None}.values())
        self._plans.keep(plan_key, launches, call, allocated, result,
                         guards=self._layout_guards((M, H, num_experts)))
        return result

    def _dispatch_format(self, wire_format, use_fp8, round_scale, use_ue8m0, recv_scale_layout,
                         H, K, num_experts, opaque):
        """(format, received-scale layout, use_fp8, use_ue8m0, the cast's wire_format field,
        spec) of a low-latency dispatch: the flags' rules, the format's, the spec's."""
        if round_scale and not use_fp8:
            raise arg_error("round_scale", True, "needs use_fp8=True")
        if use_ue8m0 and not round_scale:
            raise arg_error("use_ue8m0", True, "needs round_scale=True")
        fmt = _ll_format(wire_format, use_fp8, round_scale, use_ue8m0)
        fmt.check_hidden(H, "x.shape[1]")
        fields = formats.low_latency_fields(fmt, bool(round_scale))
        if recv_scale_layout is not None and fmt is formats.BF16:
            raise arg_error("recv_scale_layout", recv_scale_layout,
                            "bf16 dispatch returns no scales (pass it with a format that has them)")
        fields.update(formats.recv_scale_layout_field(fmt, recv_scale_layout))
        spec = spec_for_call(functools.partial(ll_dispatch_spec, **fields),
                             {"hidden": "hidden" if opaque else "x.shape[1]",
                              "num_topk": "topk_idx.shape[1]",
                              "num_experts": "num_experts"}, H, K, num_experts, self.ctx.num_ranks)
        return (fmt, fields["recv_scale_layout"] or "deepep", fields["use_fp8"],
                fields["use_ue8m0"], fields["wire_format"], spec)

    def _check_handle(self, handle, num_topk=None):
        """The handle's parts and its shapes' data layout; num_topk: the combine's (the
        receive halves' room is checked for it)."""
        R = self.ctx.num_ranks
        if not isinstance(handle, (tuple, list)) or len(handle) != 5:
            raise arg_error("handle", type(handle).__name__,
                            "must be the 5-tuple returned by low_latency_dispatch")
        src_info, layout_range, M, H, E = handle
        lay = self._check_common(M, H, E, num_topk)
        El = E // R
        check_tensor("handle[0] (recv_src_info)", src_info, torch.int32, (El, R * M))
        check_tensor("handle[1] (recv_layout_range)", layout_range, torch.int64, (El, R))
        return src_info, layout_range, M, H, E, El, lay

    def _combine_send_buffer(self, M, H, El, lay):
        return self.ctx.rdma.view(torch.bfloat16, (El, self.ctx.num_ranks * M, H), lay["comb_send"])

    def get_next_low_latency_combine_buffer(self, handle):
        _, _, M, H, _, El, lay = self._check_handle(handle)
        return self._combine_send_buffer(M, H, El, lay)

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt=False,
                            zero_copy=False, async_finish=False, return_recv_hook=False, out=None,
                            combine_wait_recv_cost_stats=None, wire_format=None):
        # use_logfmt / wire_format: the rows' format on the wire (formats.combine_format; README
        # "Wire formats"); the per-rank kernel sends BF16 partials only, so a call naming another
        # format runs the per-expert kernel.
        call = (x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, async_finish,
                return_recv_hook, out, combine_wait_recv_cost_stats, wire_format)
        plan_key = ("combine", getattr(topk_idx, "shape", None))
        replayed = self._plans.run(plan_key, call)
        if replayed is not None:
            return replayed
        ctx = self.ctx
        fmt = formats.combine_format(wire_format, bool(use_logfmt), bool(zero_copy))
        ctx.check_errors()
        R = ctx.num_ranks
        check_topk_idx(topk_idx)
        T, K = topk_idx.shape
        src_info, layout_range, M, H, E, El, lay = self._check_handle(handle, K)
        # zero_copy sends the Buffer's own (aligned) combine buffer, not x
        check_tensor("x", x, torch.bfloat16, (El, R * M, H),
                     align=0 if zero_copy else VECTOR_BYTES)
        if T > M:
            raise arg_error("topk_idx.shape[0]", T, f"must be <= num_max_dispatch_tokens_per_rank={M}")
        per_rank = fmt == formats.BF16.name and combine_runs_per_rank(
            M, H, R, E, K, return_recv_hook, self.enable_shrink, self.combine_half_bytes(lay))
        spec_key = (fmt, H, K, E, per_rank)       # H, E passed _check_common; K: topk_idx's
        found = self._specs.get(spec_key)
        if found is None:
            spec = spec_for_call(functools.partial(ll_combine_spec, **formats.combine_fields(fmt)),
                                 {"num_topk": "topk_idx.shape[1]"}, H, K, E, R, per_rank)
            found = self._specs[spec_key] = (spec, None)   # its kernel once the checks pass
        spec, kernel = found
        check_tensor("topk_weights", topk_weights, torch.float32, (T, K))
        StreamOrder.check_two_phase(async_finish, return_recv_hook)
        if out is not None:
            check_tensor("out", out, torch.bfloat16, (T, H), align=VECTOR_BYTES)
        self._check_stats("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats,
                          torch.int64, R)
        outputs = []
        if out is None:
            out = torch.empty(T, H, dtype=torch.bfloat16, device=ctx.device)
            outputs.append(out)
        if kernel is None:
            kernel = ctx.kernel(spec)
            self._specs[spec_key] = (spec, kernel)
        fused = self.fuse_phases and not return_recv_hook
        call_epoch = self._call_epoch("combine", fused, return_recv_hook)

        def make_args(phases):
            a = self._fill_common(LowLatencyCombineRankArgs if per_rank
                                  else LowLatencyCombineArgs, "low_latency_combine", lay, T, M,
                                  phases)
            a.zero_copy = int(bool(zero_copy))
            if per_rank:
                a.wsig_off = ROUTES_SIG_OFF
            return a

        # zero_copy: the rows are in the Buffer's combine send buffer (_combine_send_buffer's
        # address; no view built per call)
        fields = {"x": self.base + lay["comb_send"] if zero_copy else x, "topk_idx": topk_idx,
                  "topk_weights": topk_weights, "src_info": src_info,
                  "layout_range": layout_range, "out": out,
                  "wait_stats": combine_wait_recv_cost_stats, "call_epoch": call_epoch}
        tensors = (x, topk_idx, topk_weights, src_info, layout_range, out,
                   call_epoch if return_recv_hook else None, combine_wait_recv_cost_stats)
        launches = self._plans.recorder(not async_finish and not return_recv_hook)
        event, hook = self._run(spec, kernel, make_args, fields, 0, async_finish,
                                return_recv_hook, tensors, ("low_latency_combine", (M, H, E)),
                                fused=fused, launches=launches)
        result = (out, event, hook)
        self._plans.keep(plan_key, launches, call, outputs, result,
                         guards=self._layout_guards((M, H, E)))
        return result

    def set_epochs_for_test(self, epoch: int) -> None:
        """TEST ONLY (Buffer._set_counters_for_test): both operations' last epoch to `epoch`,
        so a test can run calls across the 32-bit and 48-bit tag wraps. The region is zeroed
        first, as at Buffer creation: a rewound epoch may be one this Buffer already ran, and
        the signals and message headers that call left would then read as the new call's
        (at 4 and 8 ranks a slot of a token not sent this time kept such a header; in a
        serving process epochs only grow, so no message's epoch ever repeats)."""
        rdma = self.ctx.rdma
        rdma.view(torch.uint8, (rdma.nbytes,), 0).zero_()
        for places in _PLACES.values():
            rdma.view(torch.int64, (1,), places.words_off).fill_(epoch)

    # -- enable_shrink masks ---------------------------------------------------------------
    def _need_shrink(self, what):
        if not self.enable_shrink:
            raise arg_error("enable_shrink", False, f"{what} needs Buffer(enable_shrink=True)")

    def update_mask_buffer(self, rank_to_mask, mask=False):
        self._need_shrink("low_latency_update_mask_buffer")
        R = self.ctx.num_ranks
        if not isinstance(rank_to_mask, int) or not 0 <= rank_to_mask < R:
            raise arg_error("rank_to_mask", rank_to_mask, f"must be an int in [0, {R})")
        self.mask[rank_to_mask].fill_(1 if mask else 0)

    def query_mask_buffer(self, mask_status):
        self._need_shrink("low_latency_query_mask_buffer")
        check_tensor("mask_status", mask_status, torch.int32, (self.ctx.num_ranks,))
        mask_status.copy_(self.mask)

    def clean_mask_buffer(self):
        self._need_shrink("low_latency_clean_mask_buffer")
        self.mask.zero_()
