"""Normal-mode intranode dispatch and combine over NVLink (DeepEP V1's Buffer.dispatch/combine).

Region layout (ctx.nvl): epgen/regions/intranode.py. Counters are monotonic across calls, so
nothing is zeroed between calls; when a half's ring layout changes from the previous call, a
cross-rank barrier (the notify kernel in barrier mode) runs first so no peer writes the new layout
while a slow rank still reads the old one (the uncached dispatch's notify is itself a barrier).
"""
from __future__ import annotations

import time

import torch

from .. import formats
from ..jit.kernel_args import NormalCombineArgs, NormalDispatchArgs, NotifyArgs
from ..runtime.errors import CODE_TIMEOUT, OP_CODES, EpgenDeviceError
from ..regions.intranode import (CTRL_BYTES, DISP_CALL_OFF, MAX_CHANNELS, NOTIFY_SEQ_OFF,
                                 RING_COUNTERS, RING_COUNTERS_OFF, combine_record_bytes,
                                 dispatch_record_bytes, half_bytes, ring_bytes, ring_slots)
from ..runtime.hostmem import MappedHostArray
from ..jit.specs import MAX_SCALE_COLS, MAX_TOPK, normal_combine_spec, normal_dispatch_rows_spec
from .capture import RingLayouts, check_host_wait
from .plans import Plans
from .context import (VECTOR_BYTES, OpsContext, arg_error, check_tensor, set_addresses,
                      spec_for_call, timeout_ns)
from .streams import zeros_on

def wait_host_counts(ctx: OpsContext, counts: MappedHostArray, n: int) -> list[int]:
    """The notify's counts in mapped host memory (filled with -1 before the launch), once all n
    are written; a device error or the deadline raises (DeepEP's CPU sync)."""
    deadline = time.monotonic() + timeout_ns() / 1e9 + 5.0
    vals = counts.values
    while True:
        if all(vals[i] >= 0 for i in range(n)):
            return [int(vals[i]) for i in range(n)]
        ctx.check_errors()
        if time.monotonic() > deadline:
            raise EpgenDeviceError(CODE_TIMEOUT, OP_CODES["dispatch notify"], ctx.rank, -1, -1)
        time.sleep(0)


def check_rows(ctx, x, wire_format=None):
    """(x, scales or None, scale columns) of dispatch's x: rows of any element type that are
    a multiple of 16 bytes wide (the kernel moves bytes), or (x, scales) with 1-byte elements
    and float32 or int32 (packed UE8M0) scales [num_tokens, S], any strides (DeepEP's rules).
    With wire_format (epgen.formats), x must match that format (data width, scale dtype and
    shape); an opaque format's rows and side rows of other element types travel as bytes and
    4-byte words (x and scales returned as such views)."""
    dev = ctx.device
    scales, name = None, "x"
    if isinstance(x, tuple):
        if len(x) != 2:
            raise arg_error("x", f"tuple of {len(x)}", "must be x or (x, x_scales)")
        x, scales = x
        name = "x[0]"
    if wire_format is not None:
        formats.get(wire_format).check(x, scales)
    if not isinstance(x, torch.Tensor):
        raise arg_error(name, type(x).__name__, "must be a torch.Tensor")
    check_tensor(name, x, x.dtype, device=dev, align=VECTOR_BYTES)
    if wire_format is not None and scales is not None:
        if x.element_size() != 1:
            x = x.view(torch.uint8)
        if scales.dtype not in (torch.float32, torch.int32):
            check_tensor("x[1]", scales, scales.dtype, contiguous=False, device=dev)
            scales = scales.view(torch.int32)
    if x.dim() != 2:
        raise arg_error(f"{name}.shape", tuple(x.shape), "must be [num_tokens, hidden]")
    row_bytes = x.size(1) * x.element_size()
    if row_bytes == 0 or row_bytes % 16:
        raise arg_error(f"{name}.shape[1]", x.size(1),
                        f"rows of {x.dtype} must be a positive multiple of 16 bytes wide "
                        f"({row_bytes} bytes)")
    if scales is None:
        return x, None, 0
    if x.element_size() != 1:
        raise arg_error("x[0].dtype", x.dtype, "with scales, rows must have 1-byte elements "
                        "(e.g. torch.float8_e4m3fn)")
    if not isinstance(scales, torch.Tensor) or scales.dtype not in (torch.float32, torch.int32):
        raise arg_error("x[1].dtype", getattr(scales, "dtype", type(scales).__name__),
                        "must be torch.float32 or torch.int32 (packed UE8M0)")
    check_tensor("x[1]", scales, scales.dtype, contiguous=False, device=dev)
    if scales.dim() != 2 or scales.size(0) != x.size(0) or not 1 <= scales.size(1) <= MAX_SCALE_COLS:
        raise arg_error("x[1].shape", tuple(scales.shape),
                        f"must be [{x.size(0)}, S] with 1 <= S <= {MAX_SCALE_COLS}")
    return x, scales, scales.size(1)


def check_combine_inputs(dev, rows: int, T: int, x, topk_weights, bias):
    """A normal-mode combine's inputs (intranode and internode): x [rows, hidden] BF16, top-k
    weights [rows, K] or None, up to two [T, hidden] BF16 biases. Returns (H, K, biases)."""
    check_tensor("x", x, torch.bfloat16, device=dev, align=VECTOR_BYTES)
    if x.dim() != 2 or x.size(0) != rows:
        raise arg_error("x.shape", tuple(x.shape), f"must be [{rows}, hidden] (the dispatch's rows)")
    H = x.size(1)
    K = 0
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights, torch.float32, device=dev)
        if topk_weights.dim() != 2 or topk_weights.size(0) != rows or \
                not 1 <= topk_weights.size(1) <= MAX_TOPK:
            raise arg_error("topk_weights.shape", tuple(topk_weights.shape),
                            f"must be [{rows}, num_topk <= {MAX_TOPK}]")
        K = topk_weights.size(1)
    biases = bias if isinstance(bias, (tuple, list)) else (bias,)
    if len(biases) > 2:
        raise arg_error("bias", f"{len(biases)} tensors", "at most two")
    biases = [b for b in biases if b is not None]
    for i, b in enumerate(biases):
        check_tensor(f"bias[{i}]", b, torch.bfloat16, shape=(T, H), device=dev, align=VECTOR_BYTES)
    return H, K, biases


def dispatch_row_fields(T: int, K: int, rows: int, x, scales, topk_idx, topk_weights,
                        in_rank, recv_x, recv_scales, recv_idx, recv_w) -> dict:
    """The row fields a normal-mode dispatch struct (intranode or internode) takes from the
    call's tensors, for set_addresses: T tokens sent, `rows` received, K top-k (0: none); null
    for what is absent or empty."""
    return {
        "x": x if T else 0,
        "x_scales": scales if T else 0,
        "scale_stride_t": scales.stride(0) if scales is not None else 0,
        "scale_stride_s": scales.stride(1) if scales is not None else 0,
        "topk_idx": topk_idx if K and T else 0,
        "topk_weights": topk_weights if K and T else 0,
        "is_token_in_rank": in_rank if T else 0,
        "recv_x": recv_x if rows else 0,
        "recv_scales": recv_scales if rows else 0,
        "recv_topk_idx": recv_idx if rows else 0,
        "recv_topk_weights": recv_w if rows else 0}


def check_topk(dev, T: int, topk_idx, topk_weights) -> int:
    """K of an uncached dispatch's topk_idx [T, K] int64 (0 without), topk_weights [T, K]
    float32 or None (only with topk_idx)."""
    if topk_idx is None:
        if topk_weights is not None:
            raise arg_error("topk_weights", "a tensor", "needs topk_idx")
        return 0
    check_tensor("topk_idx", topk_idx, torch.int64, device=dev)
    if topk_idx.dim() != 2 or topk_idx.size(0) != T:
        raise arg_error("topk_idx.shape", tuple(topk_idx.shape), f"must be [{T}, num_topk]")
    K = topk_idx.size(1)
    if not 1 <= K <= MAX_TOPK:
        raise arg_error("topk_idx.shape[1]", K, f"must be in [1, {MAX_TOPK}]")
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights, torch.float32, shape=(T, K), device=dev)
    return K


def _config_key(config):
    """What of a Config a Plan is for (its fields and their types: a Config is mutable, and
    20 == 20.0 as a key)."""
    try:
        f = (config.num_sms, config.num_max_nvl_chunked_send_tokens,
             config.num_max_nvl_chunked_recv_tokens)
    except AttributeError:       # not a Config: the Python path names it
        return None
    return f + tuple(map(type, f))


class IntranodeOps:
    def __init__(self, ctx: OpsContext):
        self.ctx = ctx
        self._host_counts: MappedHostArray | None = None
        # Each direction's previous ring layout (a change runs the cross-rank barrier) and the
        # one a CUDA graph captured (ops/capture.py: the rule under capture).
        self._rings = RingLayouts(
            "channels, slots, record bytes",
            "channels = config.num_sms, slots = config.num_max_nvl_chunked_recv_tokens // 2, "
            "record bytes from hidden, dtype and top-k")
        self._configs = {}      # _check_config's passing (op, config fields, record) -> result
        self._specs = {}        # (op, spec builder's arguments) -> [spec, record, kernel, notify]
        self._plans = Plans(ctx)    # the fast lane: cached dispatches and combines replayed from C

    def set_counters_for_test(self, ring: int | None, seq: int | None) -> None:
        """TEST ONLY (Buffer._set_counters_for_test): every ring counter of this rank to
        `ring` (int64) and every sequence word to `seq` (int32, as a signed value), so a
        test can run calls across a wrap point. The caller ensures that no kernel runs and
        that all ranks do the same."""
        nvl = self.ctx.nvl
        if ring is not None:
            nvl.view(torch.int64, (RING_COUNTERS,), RING_COUNTERS_OFF).fill_(ring)
        if seq is not None:
            nvl.view(torch.int32, (MAX_CHANNELS,), DISP_CALL_OFF).fill_(seq)
            nvl.view(torch.int32, (1,), NOTIFY_SEQ_OFF).fill_(seq)

    # -- helpers --------------------------------------------------------------------------
    def _half(self) -> tuple[int, int]:
        nbytes = self.ctx.nvl.nbytes if self.ctx.nvl is not None else 0
        return half_bytes(nbytes), nbytes

    def _check_config(self, config, op: str, record: int) -> tuple[int, int, int]:
        """(channels, cap, ring offset); a configuration that passed once passes again (the
        region and the SMs are fixed): a dict lookup, keyed by the fields' types too."""
        n, recv = config.num_sms, config.num_max_nvl_chunked_recv_tokens
        key = (op, n, recv, record, type(n), type(recv))
        found = self._configs.get(key)
        if found is None:
            found = self._configs[key] = self._check_config_once(config, op, record)
        return found

    def _check_config_once(self, config, op: str, record: int) -> tuple[int, int, int]:
        ctx = self.ctx
        sms = ctx.device_sms
        if config.num_sms % 2 or config.num_sms <= 0 or config.num_sms > min(sms, MAX_CHANNELS):
            raise arg_error("config.num_sms", config.num_sms,
                            f"must be even, positive and <= {min(sms, MAX_CHANNELS)} (the SMs "
                            f"this process may use: {sms}, after any MPS limit, and at most "
                            f"{MAX_CHANNELS} channels)")
        channels, cap = config.num_sms, ring_slots(config)     # one block (channel) per SM given
        need = ring_bytes(config, ctx.num_ranks, record)
        half, nbytes = self._half()
        if need > half:
            total = CTRL_BYTES + 2 * need
            raise arg_error("num_nvl_bytes", nbytes,
                            f"{op} with {channels} channels x {ctx.num_ranks} ranks x {cap} slots x "
                            f"{record} B needs {need} B of rings per direction; the Buffer needs "
                            f">= {total} B (Config.get_nvl_buffer_size_hint)")
        return channels, cap, CTRL_BYTES + (0 if op == "dispatch" else half)

    def _notify_args(self, op: str = "dispatch notify", **kw) -> NotifyArgs:
        """The notify kernel's arguments; `op` the name its errors carry (the barrier form:
        "barrier")."""
        ctx = self.ctx
        a = ctx.fill_error_fields(NotifyArgs(), op)
        a.nvl = ctx.nvl.addr
        a.peers = ctx.peer_table("nvl").data_ptr()
        for k, v in kw.items():
            setattr(a, k, v)
        return a

    def _kernels(self, found: list, kind) -> tuple:
        """The (main, notify) kernels of a _specs entry, looked up once its call's checks
        have passed (a bad call compiles and loads nothing)."""
        if found[2] is None:
            found[2:] = self.ctx.kernel(found[0], kind), self.ctx.kernel(found[0], "notify")
        return found[2], found[3]

    def _fill_shared(self, a, op: str, ring_off: int, cap: int):
        """The fields of a dispatch's / combine's struct that its ring layout decides (the
        template OpsContext.args_from copies per call; the call sets its own counts)."""
        ctx = self.ctx
        ctx.fill_error_fields(a, op)
        a.nvl = ctx.nvl.addr
        a.peers = ctx.peer_table("nvl").data_ptr()
        a.ring_offset = ring_off
        a.cap = cap
        return a

    def _barrier_if_needed(self, which: str, key, spec, notify, stream) -> None:
        if self._rings.switch(which, key):
            a = self._notify_args("barrier", barrier_only=1, expert_alignment=1)
            notify.launch(1, spec.notify_threads, a, stream.cuda_stream)

    def _unpack_handle(self, handle, num_tokens: int | None = None):
        """(rank_prefix_matrix, num_tokens_all, recv_src_idx, is_token_in_rank) of a dispatch
        handle, checked."""
        R, dev = self.ctx.num_ranks, self.ctx.device
        if not isinstance(handle, tuple) or len(handle) != 6:
            raise arg_error("handle", type(handle).__name__, "must be the 6-tuple from dispatch")
        rpm, ntall, _, src_idx, in_rank, _ = handle
        check_tensor("handle[0]", rpm, torch.int32, shape=(R, R), device=dev)
        check_tensor("handle[1]", ntall, torch.int32, shape=(R,), device=dev)
        check_tensor("handle[3]", src_idx, torch.int32, device=dev)
        check_tensor("handle[4]", in_rank, torch.bool, device=dev,
                      shape=None if num_tokens is None else (num_tokens, R))
        return rpm, ntall, src_idx, in_rank

    def _wait_host(self, counts: MappedHostArray, n: int) -> list[int]:
        return wait_host_counts(self.ctx, counts, n)

    def _check_rows(self, x, wire_format=None):
        return check_rows(self.ctx, x, wire_format)

    # -- dispatch -------------------------------------------------------------------------
    def dispatch(self, x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                 num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens,
                 config, previous_event, async_finish, allocate_on_comm_stream, wire_format=None):
        call = plan_key = None
        if handle is not None:     # a cached dispatch: no host wait, so a Plan can replay it
            call = (x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                    num_tokens_per_expert, topk_idx, topk_weights, expert_alignment,
                    num_worst_tokens, previous_event, async_finish, allocate_on_comm_stream,
                    wire_format)
            plan_key = ("dispatch", getattr(x, "shape", None), _config_key(config))
            replayed = self._plans.run(plan_key, call)
            if replayed is not None:
                return replayed
        ctx = self.ctx
        ctx.check_errors()
        R, dev = ctx.num_ranks, ctx.device
        given = x[0] if isinstance(x, tuple) and len(x) == 2 else x
        given_scales = x[1] if isinstance(x, tuple) and len(x) == 2 else None
        x, scales, S = self._check_rows(x, wire_format)
        T, H = x.shape
        if num_tokens_per_rdma_rank is not None:
            raise arg_error("num_tokens_per_rdma_rank", "a tensor", "must be None intranode")
        if not isinstance(expert_alignment, int) or expert_alignment < 1:
            raise arg_error("expert_alignment", expert_alignment, "must be an int >= 1")
        if not isinstance(num_worst_tokens, int) or num_worst_tokens < 0:
            raise arg_error("num_worst_tokens", num_worst_tokens, "must be an int >= 0")
        cached = handle is not None
        if cached:
            if topk_idx is not None or topk_weights is not None:
                raise arg_error("topk_idx" if topk_idx is not None else "topk_weights", "a tensor",
                                "must be None with a handle (cached dispatch)")
            rpm, ntall, hsrc, in_rank = self._unpack_handle(handle, num_tokens=T)
            K, E = 0, None
        else:
            check_tensor("is_token_in_rank", is_token_in_rank, torch.bool, shape=(T, R), device=dev)
            check_tensor("num_tokens_per_rank", num_tokens_per_rank, torch.int32, shape=(R,),
                          device=dev)
            in_rank = is_token_in_rank
            K = 0
            # DeepEP requires the per-expert counts in every uncached dispatch: they give
            # num_recv_tokens_per_expert_list, with or without top-k.
            if num_tokens_per_expert is None:
                raise arg_error("num_tokens_per_expert", None,
                                "required without a handle (get_dispatch_layout's third output)")
            check_tensor("num_tokens_per_expert", num_tokens_per_expert, torch.int32, device=dev)
            E = num_tokens_per_expert.numel()
            if num_tokens_per_expert.dim() != 1 or E == 0 or E % R:
                raise arg_error("num_tokens_per_expert.shape", tuple(num_tokens_per_expert.shape),
                                f"must be [num_experts], num_experts a positive multiple of "
                                f"num_ranks={R}")
            K = check_topk(dev, T, topk_idx, topk_weights)
        row_bytes = H * x.element_size()
        found = self._specs.get(("dispatch", row_bytes, S, K, E))
        if found is None:
            found = self._specs[("dispatch", row_bytes, S, K, E)] = [
                normal_dispatch_rows_spec(row_bytes, S, K, E, R),
                dispatch_record_bytes(row_bytes, S, K), None, None]
        spec, record = found[0], found[1]
        channels, cap, ring_off = self._check_config(config, "dispatch", record)
        check_host_wait(cached, num_worst_tokens)
        self._rings.check("dispatch", (channels, cap, record), self_barriered=not cached)
        kernel, notify = self._kernels(found, "dispatch")
        El = spec.num_experts // R
        launches = self._plans.recorder(cached and previous_event is None and not async_finish)
        result: dict = {}
        with ctx.on_comm_stream(previous_event, async_finish, allocate_on_comm_stream,
                                result) as stream:
            counts = []
            if cached:
                rows = hsrc.size(0)
                self._barrier_if_needed("dispatch", (channels, cap, record), spec, notify, stream)
            else:
                rpm = torch.empty(R, R, dtype=torch.int32, device=dev)
                ntall = torch.empty(R, dtype=torch.int32, device=dev)
                host = None
                if num_worst_tokens == 0:
                    if self._host_counts is None or self._host_counts.count < 1 + El:
                        if self._host_counts is not None:
                            self._host_counts.free()
                        self._host_counts = MappedHostArray(max(1 + El, 64))
                    self._host_counts.fill(-1)
                    host = self._host_counts
                a = self._notify_args(
                    num_tokens_per_rank=num_tokens_per_rank.data_ptr(),
                    num_tokens_per_expert=num_tokens_per_expert.data_ptr(),
                    rank_prefix=rpm.data_ptr(), num_tokens_all=ntall.data_ptr(),
                    host_counts=host.device_ptr if host is not None else 0,
                    num_tokens=T, expert_alignment=expert_alignment, barrier_only=0)
                notify.launch(1, spec.notify_threads, a, stream.cuda_stream)
                self._rings.switch("dispatch", (channels, cap, record))   # notify: a barrier
                if host is not None:
                    vals = self._wait_host(host, 1 + El)
                    rows, counts = vals[0], vals[1:]
                else:
                    rows = num_worst_tokens
            recv_x = torch.empty(rows, H, dtype=x.dtype, device=dev)
            recv_scales = torch.empty(rows, S, dtype=scales.dtype, device=dev) if S else None
            recv_idx = recv_w = None
            if K:
                recv_idx = torch.empty(rows, K, dtype=torch.int64, device=dev)
                if topk_weights is not None:
                    recv_w = zeros_on(stream, rows, K, dtype=torch.float32, device=dev)
            recv_src = None if cached else torch.empty(rows, dtype=torch.int32, device=dev)
            worst = num_worst_tokens if not cached else 0
            # the template's key holds no token count: counts vary per call, and a key per
            # count grew the templates without bound (soak, session 14: ~330 B a call)
            a = ctx.args_from((NormalDispatchArgs, ring_off, cap),
                              lambda: self._fill_shared(NormalDispatchArgs(), "dispatch", ring_off,
                                                        cap))
            a.num_tokens, a.num_recv_rows, a.num_worst_tokens = T, rows, worst
            fields = dispatch_row_fields(T, K, rows, x, scales, topk_idx, topk_weights, in_rank,
                                         recv_x, recv_scales, recv_idx, recv_w)
            fields["rank_prefix"] = rpm
            fields["recv_src_idx"] = recv_src if rows else 0
            kernel.launch(channels, spec.threads, set_addresses(a, fields), stream.cuda_stream)
            if launches is not None:
                launches.add(kernel, channels, spec.threads, 0, a, fields)
            if not cached:
                handle = (rpm, ntall, None, recv_src, in_rank, None)
            result["tensors"] = (x, scales, topk_idx, topk_weights, in_rank, recv_x, recv_scales,
                                 recv_idx, recv_w, rpm, ntall, recv_src, num_tokens_per_rank,
                                 num_tokens_per_expert)
        if recv_x.dtype != given.dtype:            # an opaque format's rows, moved as bytes
            recv_x = recv_x.view(given.dtype)
        if recv_scales is not None and recv_scales.dtype != given_scales.dtype:
            recv_scales = recv_scales.view(given_scales.dtype)
        out_x = (recv_x, recv_scales) if scales is not None else recv_x
        if cached:      # DeepEP: no top-k, no counts list, no new handle
            out = out_x, None, None, None, None, result["event"]
            self._plans.keep(plan_key, launches, call,
                             [t for t in (recv_x, recv_scales) if t is not None], out,
                             guards=self._rings.replay_guards("dispatch"))
            return out
        return out_x, recv_idx, recv_w, counts, handle, result["event"]

    # -- combine --------------------------------------------------------------------------
    def combine(self, x, handle, topk_weights, bias, config, previous_event, async_finish,
                allocate_on_comm_stream):
        call = (x, handle, topk_weights, bias, previous_event, async_finish,
                allocate_on_comm_stream)
        plan_key = ("combine", getattr(x, "shape", None), _config_key(config))
        replayed = self._plans.run(plan_key, call)
        if replayed is not None:
            return replayed
        ctx = self.ctx
        ctx.check_errors()
        R, dev = ctx.num_ranks, ctx.device
        rpm, ntall, src_idx, in_rank = self._unpack_handle(handle)
        rows, T = src_idx.size(0), in_rank.size(0)
        H, K, biases = check_combine_inputs(dev, rows, T, x, topk_weights, bias)
        found = self._specs.get(("combine", H, K, len(biases)))
        if found is None:
            found = self._specs[("combine", H, K, len(biases))] = [
                spec_for_call(normal_combine_spec, {"hidden": "x.shape[1]",
                                                    "num_topk": "topk_weights.shape[1]"},
                              H, K, R, len(biases)), combine_record_bytes(H, K), None, None]
        spec, record = found[0], found[1]
        channels, cap, ring_off = self._check_config(config, "combine", record)
        self._rings.check("combine", (channels, cap, record), self_barriered=False)
        kernel, notify = self._kernels(found, None)
        launches = self._plans.recorder(previous_event is None and not async_finish)
        result: dict = {}
        with ctx.on_comm_stream(previous_event, async_finish, allocate_on_comm_stream,
                                result) as stream:
            self._barrier_if_needed("combine", (channels, cap, record), spec, notify, stream)
            out = torch.empty(T, H, dtype=torch.bfloat16, device=dev)
            out_w = torch.empty(T, K, dtype=torch.float32, device=dev) if K else None
            a = ctx.args_from((NormalCombineArgs, ring_off, cap),
                              lambda: self._fill_shared(NormalCombineArgs(), "combine", ring_off,
                                                        cap))
            a.num_tokens = T
            fields = {"x": x if rows else 0, "topk_weights": topk_weights if K and rows else 0,
                      "bias0": biases[0] if biases and T else 0,
                      "bias1": biases[1] if len(biases) > 1 and T else 0,
                      "is_token_in_rank": in_rank if T else 0, "rank_prefix": rpm,
                      "num_tokens_all": ntall, "recv_src_idx": src_idx if rows else 0,
                      "combined_x": out if T else 0, "combined_weights": out_w if T else 0}
            kernel.launch(channels, spec.threads, set_addresses(a, fields), stream.cuda_stream)
            if launches is not None:
                launches.add(kernel, channels, spec.threads, 0, a, fields)
            result["tensors"] = (x, topk_weights, *biases, rpm, ntall, src_idx, in_rank, out, out_w)
        returned = out, out_w, result["event"]
        self._plans.keep(plan_key, launches, call, [t for t in (out, out_w) if t is not None],
                         returned, guards=self._rings.replay_guards("combine"))
        return returned
