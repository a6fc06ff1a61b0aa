"""The Buffer facade: DeepEP V1's deep_ep.Buffer surface, handing each call to its family.

Creating a Buffer is collective over the group (and, for NVSHMEM's symmetric heap, over
WORLD: every WORLD rank creates its Buffers with the same sizes in the same order).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from . import lifecycle
from .jit import toolchain
from .jit.layout_facts import LL_HINT_TOPK, MAX_TOPK
from .config import Config
from .ops.context import OpsContext, arg_error, timeout_ns
from .ops.internode import InternodeOps
from .ops.intranode import IntranodeOps
from .ops.layout import LayoutOps
from .ops.low_latency import LowLatencyOps, low_latency_rdma_size_hint
from .runtime import nvshmem, sharing, topology
from .runtime.errors import ErrorWord
from .runtime.events import EventHandle, EventOverlap
from .runtime.symmetric import SymmetricRegion


class Buffer:
    num_sms: int = 20

    def __init__(self, group=None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False,
                 enable_shrink: bool = False, comm=None):
        self._destroyed = True          # until construction succeeds
        group = group if group is not None else dist.group.WORLD
        if comm is not None:
            raise arg_error("comm", comm, "mpi4py communicators are not supported; pass a "
                            "torch.distributed group")
        for name, v in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if not isinstance(v, int) or v < 0:
                raise arg_error(name, v, "must be a non-negative int")
        # allow_mnnvl is a permission in DeepEP V1 (it only stops disabling NVSHMEM's multi-node
        # NVLink detection) and SGLang always passes it; epgen has no MNNVL path, so it is a
        # no-op. use_fabric asks for fabric-handle allocations, which epgen does not make.
        if use_fabric:
            raise arg_error("use_fabric", True,
                            "fabric-handle (multi-node NVLink) buffers are not supported")
        if not dist.is_initialized():
            raise RuntimeError("epgen.Buffer needs torch.distributed initialised (NCCL; gloo "
                               "where ranks share a GPU)")
        if not torch.cuda.is_available():
            raise RuntimeError("epgen.Buffer needs a CUDA GPU")

        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink
        self.device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.init()
        here = nvshmem.current()
        if here is None or not here.stuck:    # (stuck: its barrier kernel spins; raised below)
            torch.cuda.synchronize(self.device)   # makes the primary context current for NVSHMEM
        # Which ranks form a node (low-latency mode treats every peer alike: it needs none).
        self.topology = None if low_latency_mode else topology.resolve(group)
        spans_nodes = self.topology is not None and self.topology.spans_nodes
        # Ranks sharing a GPU must all be resident at once (refused before anything is allocated).
        self._gpu_shares = sharing.gather_shares(group, self.rank, self.device)
        sharing.check_co_residency(self._gpu_shares)

        # NVSHMEM is initialised over WORLD once: whether its ranks span hosts is WORLD's
        # question, asked (collectively, as every WORLD rank makes every Buffer) only then.
        spans_hosts = nvshmem.current() is None and topology.count_hosts(dist.group.WORLD) > 1
        nvshmem.check_usable_everywhere()     # every rank raises, none waits in the allocation
        host = nvshmem.host(heap_bytes=num_nvl_bytes + num_rdma_bytes, multi_node=spans_hosts)
        pes = [dist.get_global_rank(group, r) for r in range(self.group_size)]
        self._nvl = SymmetricRegion(host, num_nvl_bytes, self.device, pes)
        self._rdma = SymmetricRegion(host, num_rdma_bytes, self.device, pes)
        for region in (self._nvl, self._rdma):
            if region.nbytes:
                region.bytes.zero_()
        torch.cuda.synchronize(self.device)
        host.barrier_all()                    # every rank's regions are zeroed before use

        self._ctx = OpsContext(
            rank=self.rank, num_ranks=self.group_size, device=self.device, pes=pes,
            nvshmem=host, nvl=self._nvl, rdma=self._rdma,
            comm_stream=torch.cuda.Stream(self.device), errors=ErrorWord(),
            arch=toolchain.resolve_arch())
        self._layout = LayoutOps(self._ctx, self.topology.ranks_per_node if spans_nodes else 0)
        self._intranode = IntranodeOps(self._ctx)
        # Across nodes: the two-level dispatch and combine.
        self._internode = InternodeOps(self._ctx, self.topology) if spans_nodes else None
        self._ll = LowLatencyOps(self._ctx, enable_shrink=enable_shrink,
                                 allow_nvlink=allow_nvlink_for_low_latency_mode,
                                 grids_overlap=sharing.kernels_overlap_on_a_gpu(self._gpu_shares)) \
            if num_rdma_bytes > 0 else None
        self._destroyed = False
        lifecycle.track(self)

    def __del__(self):
        # explicitly_destroy=False: freed here (collective, like DeepEP's destructor); else a
        # Buffer never destroyed is reported (lifecycle.py).
        if not getattr(self, "_destroyed", True):
            lifecycle.collected(self)

    # -- class-level knobs ----------------------------------------------------------------
    @staticmethod
    def is_sm90_compiled() -> bool:
        return True     # kernels are generated for the GPU present (sm_90 paths included)

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        if not isinstance(new_num_sms, int) or new_num_sms <= 0 or new_num_sms % 2:
            raise arg_error("new_num_sms", new_num_sms, "must be a positive even int")
        Buffer.num_sms = new_num_sms     # DeepEP's: the class attribute, also for subclasses

    @staticmethod
    def capture() -> EventOverlap:
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int,
                                       num_ranks: int, num_experts: int, *,
                                       num_topk: int = LL_HINT_TOPK) -> int:
        """num_topk (epgen's): the largest top-k the low-latency calls will use; DeepEP's
        limit, 11, unless told (the combine's receive halves hold min(top-k, experts per
        rank) rows per token and rank)."""
        if not isinstance(num_topk, int) or isinstance(num_topk, bool) or \
                not 1 <= num_topk <= MAX_TOPK:
            raise arg_error("num_topk", num_topk, f"must be an int in [1, {MAX_TOPK}]")
        return low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks,
                                          num_experts, num_topk)

    # DeepEP's recommended (nvl send, nvl recv, rdma send, rdma recv) chunk sizes; epgen's
    # kernels size their rings from the receive count only. Other rank counts get the 8's.
    _DISPATCH_CHUNKS = {2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128)}
    _COMBINE_CHUNKS = {2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128)}

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return Config(Buffer.num_sms, *Buffer._DISPATCH_CHUNKS.get(num_ranks, Buffer._DISPATCH_CHUNKS[8]))

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return Config(Buffer.num_sms, *Buffer._COMBINE_CHUNKS.get(num_ranks, Buffer._COMBINE_CHUNKS[8]))

    # -- lifecycle ------------------------------------------------------------------------
    def _alive(self) -> OpsContext:
        if self._destroyed:
            raise RuntimeError("epgen.Buffer: used after destroy()")
        return self._ctx

    def check_errors(self) -> None:
        """Wait for this Buffer's streams, then raise any error a kernel reported."""
        ctx = self._alive()
        ctx.comm_stream.synchronize()
        torch.cuda.current_stream(self.device).synchronize()
        ctx.check_errors()

    def destroy(self) -> None:
        """Free the Buffer's symmetric memory (collective: every rank destroys its Buffers in
        the same order); later calls on the Buffer raise. Valid with or without
        explicitly_destroy, and a second call does nothing. Never hangs: after a device error,
        or with a peer masked out by enable_shrink (it may be gone), it skips the collective
        free; and a rank whose peers do not join the free within EPGEN_TIMEOUT_S (they failed,
        or were killed) gives it up. Either way the memory is leaked, with a warning."""
        if self._destroyed:
            return
        self._destroyed = True
        why = self._why_not_free()
        if why is not None:
            warnings.warn(f"epgen: rank {self.rank}: Buffer destroyed after {why}; its "
                          "symmetric memory is leaked (freeing it would need every rank)")
            return
        ctx = self._ctx

        def free():
            ctx.nvshmem.barrier_all()
            self._rdma.free()
            self._nvl.free()
        wait_s = timeout_ns() / 1e9
        if not ctx.nvshmem.collective_within(free, wait_s, self.device.index):
            warnings.warn(f"epgen: rank {self.rank}: the other ranks did not join "
                          f"Buffer.destroy() within EPGEN_TIMEOUT_S={wait_s:g} s; its symmetric "
                          "memory is leaked, no rank can create a new Buffer, and NVSHMEM's "
                          "barrier kernel keeps waiting on this GPU (a device-wide synchronize "
                          "would too): start fresh processes")
            return
        ctx.errors.free()

    def _why_not_free(self) -> str | None:
        """Why the collective free could hang (some rank may never come), or None."""
        if self._ctx.errors.raised():
            return "a device error"
        if self._ctx.nvshmem.stuck:
            # the kernel of the collective given up still spins on the GPU: the device-wide
            # synchronize below would wait for it forever (the next Buffer's destroy, at exit)
            return f"NVSHMEM became unusable in this process ({self._ctx.nvshmem.stuck})"
        shrink = self._ll is not None and self._ll.enable_shrink
        if shrink:
            try:
                self._ll.settle_peers_before_free()    # bounded by EPGEN_TIMEOUT_S
            except Exception as exc:  # noqa: BLE001 - e.g. EPGEN_JIT=0 and not precompiled
                return f"its enable_shrink barrier could not run ({exc})"
        torch.cuda.synchronize(self.device)
        if self._ctx.errors.raised():
            return "a device error"
        if shrink and bool(self._ll.mask.any()):
            return "a peer was masked out (enable_shrink)"
        return None

    def _set_counters_for_test(self, ring: int | None = None, seq: int | None = None,
                               ll_epoch: int | None = None) -> None:
        """TEST ONLY, not part of the API: start this Buffer's device counters elsewhere, so
        tests reach the wrap points a serving process reaches after millions of calls: the
        normal-mode ring counters (int64) at `ring`, the normal-mode sequence words (int32;
        across nodes the notify's, int64) at `seq`, the low-latency epochs (int64) at
        `ll_epoch`. Collective: every rank calls it with the same values, with no call of this
        Buffer in flight."""
        ctx = self._alive()
        torch.cuda.synchronize(self.device)
        if ll_epoch is not None:          # first: it zeroes the region the internode words share
            self._low_latency().set_epochs_for_test(ll_epoch)
        if self._internode is not None:
            if ring is not None:
                raise ValueError("ring: an internode Buffer's ring counters have no test hook")
            if seq is not None:
                self._internode.set_counters_for_test(seq)
        elif ring is not None or seq is not None:
            self._intranode.set_counters_for_test(ring, seq)
        torch.cuda.synchronize(self.device)
        ctx.nvshmem.barrier_all()

    def get_comm_stream(self) -> torch.cuda.Stream:
        return self._alive().comm_stream

    def get_local_buffer_tensor(self, dtype: torch.dtype, size=None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        self._alive()
        region = self._rdma if use_rdma_buffer else self._nvl
        elem = torch.empty((), dtype=dtype).element_size()
        if size is None:
            count = (region.nbytes - offset) // elem
            return region.view(dtype, (count,), offset)
        size = tuple(size) if not isinstance(size, torch.Size) else size
        return region.view(dtype, size, offset)

    # -- normal mode ----------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None,
                            async_finish=False, allocate_on_comm_stream=False):
        self._alive()
        return self._layout.get_dispatch_layout(topk_idx, num_experts, previous_event,
                                                async_finish, allocate_on_comm_stream)

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None,
                 topk_weights=None, expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config: Config | None = None, previous_event=None, async_finish=False,
                 allocate_on_comm_stream=False, *, wire_format=None):
        """DeepEP's dispatch. epgen's one addition: wire_format (an epgen.formats name or
        WireFormat, e.g. "nvfp4", "mxfp8", "opaque7168+64") checks x against that format before
        launch (data width, scale dtype and shape) and lets opaque rows of any element type
        carry a side tensor; rows still move as bytes."""
        self._alive()
        config = config or self.get_dispatch_config(self.group_size)
        ops = self._internode if self._internode is not None else self._intranode
        return ops.dispatch(
            x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
            num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens,
            config, previous_event, async_finish, allocate_on_comm_stream, wire_format)

    def combine(self, x, handle, topk_weights=None, bias=None, config: Config | None = None,
                previous_event=None, async_finish=False, allocate_on_comm_stream=False):
        self._alive()
        config = config or self.get_combine_config(self.group_size)
        ops = self._internode if self._internode is not None else self._intranode
        return ops.combine(x, handle, topk_weights, bias, config, previous_event,
                           async_finish, allocate_on_comm_stream)

    def internode_dispatch(self, x, handle=None, num_tokens_per_rank=None,
                           num_tokens_per_rdma_rank=None, is_token_in_rank=None,
                           num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                           expert_alignment: int = 1, num_worst_tokens: int = 0,
                           config: Config | None = None, previous_event=None, async_finish=False,
                           allocate_on_comm_stream=False):
        """DeepEP's internode_dispatch (which its dispatch calls across nodes): only for a
        Buffer whose group spans nodes."""
        self._alive()
        if self._internode is None:
            raise RuntimeError("epgen.Buffer.internode_dispatch: this Buffer's group is one node "
                               "(use dispatch); set EPGEN_RANKS_PER_NODE for virtual nodes")
        config = config or self.get_dispatch_config(self.group_size)
        return self._internode.dispatch(
            x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
            num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens,
            config, previous_event, async_finish, allocate_on_comm_stream)

    def internode_combine(self, x, handle, topk_weights=None, bias=None,
                          config: Config | None = None, previous_event=None, async_finish=False,
                          allocate_on_comm_stream=False):
        """DeepEP's internode_combine (which its combine calls across nodes): only for a
        Buffer whose group spans nodes."""
        self._alive()
        if self._internode is None:
            raise RuntimeError("epgen.Buffer.internode_combine: this Buffer's group is one node "
                               "(use combine); set EPGEN_RANKS_PER_NODE for virtual nodes")
        config = config or self.get_combine_config(self.group_size)
        return self._internode.combine(x, handle, topk_weights, bias, config, previous_event,
                                       async_finish, allocate_on_comm_stream)

    # -- low-latency mode -----------------------------------------------------------------
    def _low_latency(self) -> LowLatencyOps:
        self._alive()
        if self._ll is None:
            raise arg_error("num_rdma_bytes", self.num_rdma_bytes,
                            "low-latency calls need num_rdma_bytes > 0 "
                            "(Buffer.get_low_latency_rdma_size_hint)")
        return self._ll

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int,
                                 num_experts: int) -> None:
        self._low_latency().clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden,
                                                     num_experts)

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats=None,
                             dispatch_wait_recv_cost_stats=None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False, *,
                             wire_format=None, recv_scale_layout=None, hidden=None):
        """DeepEP's low_latency_dispatch. epgen's additions: wire_format (README "Wire
        formats") names what the kernel casts BF16 x to: "bf16", "fp8_e4m3_f32_128",
        "fp8_ue8m0_128" (what DeepEP's flags name) or "mxfp8", "nvfp4"; the flags must then be
        left at their defaults or name the same format. Or "opaque<R>[+<S>]": x is already in
        the caller's format, a tensor of R bytes a row (any dtype) or a (data, side) tuple with
        S side bytes a row, moved unchanged; `hidden` (only then) is the combine's hidden, the
        BF16 expert outputs' channels. recv_scale_layout: how recv_x_scales is laid out for
        the grouped GEMM that reads it, "deepep" (the default), "deepgemm" or "cutlass_128x4"
        (README "Received scale layouts")."""
        return self._low_latency().low_latency_dispatch(
            x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
            cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, use_fp8,
            round_scale, use_ue8m0, async_finish, return_recv_hook, wire_format,
            recv_scale_layout, hidden)

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt: bool = False,
                            zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out=None,
                            combine_wait_recv_cost_stats=None, *, wire_format=None):
        """DeepEP's low_latency_combine. use_logfmt=True sends DeepEP's LogFMT-10; epgen's one
        addition: wire_format (README "Wire formats") names what the rows cross the wire as:
        "bf16", "fp8_e4m3_f32_128" or "logfmt10" (use_logfmt must then be False or name the
        same). Formats other than bf16 refuse zero_copy. The receiver sums in float32."""
        return self._low_latency().low_latency_combine(
            x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, async_finish,
            return_recv_hook, out, combine_wait_recv_cost_stats, wire_format)

    def get_next_low_latency_combine_buffer(self, handle):
        return self._low_latency().get_next_low_latency_combine_buffer(handle)

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        self._low_latency().update_mask_buffer(rank_to_mask, mask)

    def low_latency_query_mask_buffer(self, mask_status) -> None:
        self._low_latency().query_mask_buffer(mask_status)

    def low_latency_clean_mask_buffer(self) -> None:
        self._low_latency().clean_mask_buffer()
