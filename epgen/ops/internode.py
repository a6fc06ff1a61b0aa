"""Internode normal mode (RDMA between nodes, NVLink forwarding inside a node): the uncached
dispatch (notify: templates/internode_notify.cuh, with the handle's sender side from
ops/internode_handle.py; then the data kernel templates/internode_dispatch.cuh), returning
DeepEP V1's internode handle, the cached dispatch through that handle (the same kernel, its
counts from the handle), num_worst_tokens (outputs sized by it, no host wait), and the combine
(templates/internode_combine.cuh). Under CUDA graph capture, the intranode mode's rules
(ops/capture.py): an uncached dispatch needs num_worst_tokens > 0 (its notify's results then
stay on the device), a cached dispatch and the combine are capturable, and a ring layout that
would need the host-decided barrier is refused, as is any layout change after a capture.
"""
from __future__ import annotations

import torch

from ..jit.kernel_args import InternodeCombineArgs, InternodeDispatchArgs, InternodeNotifyArgs
from ..runtime.hostmem import MappedHostArray
from ..runtime.topology import Topology
from ..jit import layout_facts
from ..jit.specs import internode_combine_spec, internode_dispatch_spec, internode_notify_spec
from ..regions import internode as internode_layout
from .. import variants
from . import internode_handle
from .capture import RingLayouts, check_host_wait
from .context import OpsContext, arg_error, check_tensor, set_addresses, spec_for_call
from .intranode import (check_combine_inputs, check_rows, check_topk, dispatch_row_fields,
                        wait_host_counts)


class InternodeOps:
    def __init__(self, ctx: OpsContext, topology: Topology):
        self.ctx = ctx
        self.topology = topology
        self.pes = torch.tensor(ctx.pes, dtype=torch.int32, device=ctx.device)
        self._host_counts: MappedHostArray | None = None
        # Each direction's previous ring layout (a cached dispatch or a combine with another
        # one runs a barrier first) and the one a CUDA graph captured (ops/capture.py).
        self._rings = RingLayouts(
            "channels, RDMA slots, NVLink slots, record bytes",
            "channels = config.num_sms // 2, RDMA slots = config.rdma_ring_slots, NVLink slots "
            "= config.num_max_nvl_chunked_recv_tokens // nodes, record bytes from hidden, dtype "
            "and top-k")

    def set_counters_for_test(self, seq: int) -> None:
        """TEST ONLY (Buffer._set_counters_for_test): this rank's notify sequence (int64) to
        `seq`, so a test can run calls across the old int32 wrap point. The caller ensures
        that no kernel runs and that all ranks do the same."""
        self.ctx.rdma.view(torch.int64, (1,), layout_facts.INODE_NOTIFY_SEQ_OFF).fill_(seq)

    def notify(self, is_token_in_rank, num_tokens_per_rank, num_tokens_per_rdma_rank,
               num_tokens_per_expert, num_channels: int, expert_alignment: int = 1,
               num_worst_tokens: int = 0, stream=None) -> dict:
        """The counts exchange of an uncached internode dispatch (collective). Returns the
        handle's tensors it makes (rdma_channel_prefix_matrix, gbl_channel_prefix_matrix,
        send_rdma_head, recv_rdma_rank_prefix_sum, recv_rdma_channel_prefix_matrix,
        recv_gbl_rank_prefix_sum, recv_gbl_channel_prefix_matrix) and, unless num_worst_tokens,
        num_recv_tokens, num_rdma_recv_tokens and num_recv_tokens_per_expert_list (a host wait
        on mapped memory, as DeepEP's)."""
        ctx, t = self.ctx, self.topology
        ctx.check_errors()
        R, L, Nn, dev = ctx.num_ranks, t.ranks_per_node, t.num_nodes, ctx.device
        check_tensor("is_token_in_rank", is_token_in_rank, torch.bool, device=dev)
        T = is_token_in_rank.size(0)
        check_tensor("is_token_in_rank", is_token_in_rank, torch.bool, shape=(T, R), device=dev)
        check_tensor("num_tokens_per_rank", num_tokens_per_rank, torch.int32, shape=(R,), device=dev)
        check_tensor("num_tokens_per_rdma_rank", num_tokens_per_rdma_rank, torch.int32,
                     shape=(Nn,), device=dev)
        check_tensor("num_tokens_per_expert", num_tokens_per_expert, torch.int32, device=dev)
        E = num_tokens_per_expert.size(0)
        if E % R or E == 0:
            raise arg_error("num_tokens_per_expert.shape[0]", E,
                            f"must be a positive multiple of num_ranks={R}")
        C = num_channels
        if not 1 <= C <= internode_layout.NOTIFY_MAX_CHANNELS:
            raise arg_error("config.num_sms", 2 * C, "the internode mode takes at most "
                            f"{2 * internode_layout.NOTIFY_MAX_CHANNELS} SMs (2 per channel)")
        El = E // R
        need = internode_layout.notify_area_bytes(R, El)
        if ctx.rdma is None or ctx.rdma.nbytes < need:
            raise arg_error("num_rdma_bytes", 0 if ctx.rdma is None else ctx.rdma.nbytes,
                            f"the internode notify needs at least {need} bytes "
                            "(Config.get_rdma_buffer_size_hint)")
        spec = internode_notify_spec(R, L, E)
        kernel = ctx.kernel(spec, "notify")
        rdma_prefix, gbl_prefix, send_rdma_head = internode_handle.sender_side(
            is_token_in_rank, L, C)
        out = {
            "rdma_channel_prefix_matrix": rdma_prefix,
            "gbl_channel_prefix_matrix": gbl_prefix,
            "send_rdma_head": send_rdma_head,
            "recv_rdma_rank_prefix_sum": torch.empty(Nn, dtype=torch.int32, device=dev),
            "recv_rdma_channel_prefix_matrix": torch.empty(Nn, C, dtype=torch.int32, device=dev),
            "recv_gbl_rank_prefix_sum": torch.empty(R, dtype=torch.int32, device=dev),
            "recv_gbl_channel_prefix_matrix": torch.empty(R, C, dtype=torch.int32, device=dev),
        }
        a = ctx.fill_error_fields(InternodeNotifyArgs(), "dispatch notify")
        a.rdma = ctx.rdma.addr
        a.pes = self.pes.data_ptr()
        a.num_tokens_per_rank = num_tokens_per_rank.data_ptr()
        a.num_tokens_per_rdma_rank = num_tokens_per_rdma_rank.data_ptr()
        a.num_tokens_per_expert = num_tokens_per_expert.data_ptr()
        a.gbl_prefix = gbl_prefix.data_ptr()
        a.rdma_prefix = rdma_prefix.data_ptr()
        a.recv_rdma_rank_prefix_sum = out["recv_rdma_rank_prefix_sum"].data_ptr()
        a.recv_rdma_channel_prefix = out["recv_rdma_channel_prefix_matrix"].data_ptr()
        a.recv_gbl_rank_prefix_sum = out["recv_gbl_rank_prefix_sum"].data_ptr()
        a.recv_gbl_channel_prefix = out["recv_gbl_channel_prefix_matrix"].data_ptr()
        a.num_channels = C
        a.expert_alignment = expert_alignment
        counts = None
        if not num_worst_tokens:
            if self._host_counts is None or self._host_counts.count < 2 + El:
                self._host_counts = MappedHostArray(2 + El)
            counts = self._host_counts
            counts.fill(-1)
            a.host_counts = counts.device_ptr
        stream = stream if stream is not None else torch.cuda.current_stream(dev)
        kernel.launch(1, spec.threads, a, stream.cuda_stream)
        if counts is not None:
            vals = wait_host_counts(ctx, counts, 2 + El)
            out.update(num_recv_tokens=vals[0], num_rdma_recv_tokens=vals[1],
                       num_recv_tokens_per_expert_list=vals[2:])
        return out

    # -- dispatch -------------------------------------------------------------------------
    def dispatch(self, x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                 num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens,
                 config, previous_event, async_finish, allocate_on_comm_stream, wire_format=None):
        """DeepEP V1's internode_dispatch: uncached, returns (recv_x or (recv_x, scales),
        recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event), the
        handle DeepEP's 10-tuple (epgen/reference_internode.py defines each value); cached
        (handle given: the rows move as the handle's dispatch moved its tokens), returns
        (recv_x or (recv_x, scales), None, None, None, None, event), as DeepEP."""
        ctx, t = self.ctx, self.topology
        ctx.check_errors()
        R, L, dev = ctx.num_ranks, t.ranks_per_node, ctx.device
        cached = handle is not None
        if not isinstance(num_worst_tokens, int) or num_worst_tokens < 0:
            raise arg_error("num_worst_tokens", num_worst_tokens, "must be an int >= 0")
        if not isinstance(expert_alignment, int) or expert_alignment < 1:
            raise arg_error("expert_alignment", expert_alignment, "must be an int >= 1")
        given = x[0] if isinstance(x, tuple) and len(x) == 2 else x
        given_scales = x[1] if isinstance(x, tuple) and len(x) == 2 else None
        x, scales, S = check_rows(ctx, x, wire_format)
        T = x.size(0)
        if cached:
            for name, v in (("topk_idx", topk_idx), ("topk_weights", topk_weights)):
                if v is not None:
                    raise arg_error(name, "a tensor", "must be None with a handle (cached dispatch)")
            h = self._unpack_handle(handle, T)
            in_rank, K = h[0], 0
            if h[1].size(1) != config.num_sms // 2:
                raise arg_error("config.num_sms", config.num_sms,
                                f"must be {2 * h[1].size(1)} (2 per channel of the handle's "
                                f"{h[1].size(1)} channels)")
        else:
            for name, v in (("num_tokens_per_rank", num_tokens_per_rank),
                            ("num_tokens_per_rdma_rank", num_tokens_per_rdma_rank),
                            ("is_token_in_rank", is_token_in_rank),
                            ("num_tokens_per_expert", num_tokens_per_expert)):
                if v is None:
                    raise arg_error(name, None, "required without a handle across nodes "
                                    "(get_dispatch_layout's outputs)")
            check_tensor("is_token_in_rank", is_token_in_rank, torch.bool, shape=(T, R),
                         device=dev)
            in_rank = is_token_in_rank
            K = check_topk(dev, T, topk_idx, topk_weights)
        row_bytes = x.size(1) * x.element_size()
        spec = internode_dispatch_spec(row_bytes, S, K, R, L, variants.internode_warps_per_block())
        C = self._channels(config, spec.blocks_per_channel)
        record = spec.record_bytes
        rdma_ring_off, nvl_ring_off, cap = self._check_rings(config, "dispatch", record, 0)
        node = ctx.rank // L
        if not all(ctx.nvl.peer_addrs[node * L + k] for k in range(L)):
            raise RuntimeError(f"epgen: rank {ctx.rank}: a rank of this node ({node}) has no "
                               "NVLink (P2P) mapping of the NVLink region; the ranks of a node "
                               "must be NVLink peers (EPGEN_RANKS_PER_NODE)")
        layout = (C, config.rdma_ring_slots, cap, record)
        check_host_wait(cached, num_worst_tokens)
        self._rings.check("dispatch", layout, self_barriered=not cached)
        peers = ctx.peer_table("nvl")
        kernel = ctx.kernel(spec, "dispatch")
        result: dict = {}
        with ctx.on_comm_stream(previous_event, async_finish, allocate_on_comm_stream,
                                result) as stream:
            if cached:
                # Ring layout changed since the previous dispatch: a cross-rank barrier first
                # (the uncached dispatch's notify is one), so no rank writes the new layout
                # while a peer still reads the old one.
                if self._rings.switch("dispatch", layout):
                    self._barrier(in_rank, C, stream)
                n = dict(zip(("recv_rdma_channel_prefix_matrix", "recv_rdma_rank_prefix_sum",
                              "recv_gbl_channel_prefix_matrix", "recv_gbl_rank_prefix_sum"),
                             h[3:7]))
                rows, rdma_rows = h[7].size(0), h[9].size(0)
            else:
                n = self.notify(in_rank, num_tokens_per_rank, num_tokens_per_rdma_rank,
                                num_tokens_per_expert, C, expert_alignment, num_worst_tokens,
                                stream=stream)
                if num_worst_tokens:        # no host wait: both receive counts sized by it
                    rows = rdma_rows = num_worst_tokens
                    n["num_recv_tokens_per_expert_list"] = []
                else:
                    rows, rdma_rows = n["num_recv_tokens"], n["num_rdma_recv_tokens"]
                self._rings.switch("dispatch", layout)      # the notify was the barrier
            recv_x = torch.empty(rows, x.size(1), dtype=x.dtype, device=dev)
            recv_scales = torch.empty(rows, S, dtype=scales.dtype, device=dev) if S else None
            recv_idx = torch.empty(rows, K, dtype=torch.int64, device=dev) if K else None
            recv_w = torch.empty(rows, K, dtype=torch.float32, device=dev) \
                if K and topk_weights is not None else None
            recv_src_meta = send_nvl_head = None
            if not cached:
                recv_src_meta = torch.empty(rows, internode_layout.source_meta_bytes(L),
                                            dtype=torch.uint8, device=dev)
                send_nvl_head = torch.empty(rdma_rows, L, dtype=torch.int32, device=dev)
            a = ctx.fill_error_fields(InternodeDispatchArgs(), "dispatch")
            set_addresses(a, dispatch_row_fields(T, K, rows, x, scales, topk_idx, topk_weights,
                                                 in_rank, recv_x, recv_scales, recv_idx, recv_w))
            a.recv_rdma_channel_prefix = n["recv_rdma_channel_prefix_matrix"].data_ptr()
            a.recv_rdma_rank_prefix_sum = n["recv_rdma_rank_prefix_sum"].data_ptr()
            a.recv_gbl_channel_prefix = n["recv_gbl_channel_prefix_matrix"].data_ptr()
            a.recv_gbl_rank_prefix_sum = n["recv_gbl_rank_prefix_sum"].data_ptr()
            a.recv_src_meta = recv_src_meta.data_ptr() if recv_src_meta is not None and rows else 0
            a.send_nvl_head = send_nvl_head.data_ptr() if send_nvl_head is not None and rdma_rows else 0
            self._fill_regions(a, peers, rdma_ring_off, nvl_ring_off)
            a.done_off = internode_layout.nvl_done_offset(R)
            a.num_recv_rows = rows
            a.num_rdma_recv_rows = rdma_rows
            a.num_tokens = T
            a.num_local_experts = num_tokens_per_expert.numel() // R if K else 0
            a.rdma_slots = config.rdma_ring_slots
            a.rdma_chunk = config.num_max_rdma_chunked_send_tokens
            a.nvl_cap = cap
            a.num_worst_tokens = 0 if cached else num_worst_tokens
            kernel.launch(C * spec.blocks_per_channel, spec.threads, a, stream.cuda_stream)
            if not cached:
                handle = (in_rank, n["rdma_channel_prefix_matrix"], n["gbl_channel_prefix_matrix"],
                          n["recv_rdma_channel_prefix_matrix"], n["recv_rdma_rank_prefix_sum"],
                          n["recv_gbl_channel_prefix_matrix"], n["recv_gbl_rank_prefix_sum"],
                          recv_src_meta, n["send_rdma_head"], send_nvl_head)
            result["tensors"] = (x, scales, topk_idx, topk_weights, recv_x, recv_scales,
                                 recv_idx, recv_w, *handle, num_tokens_per_rank,
                                 num_tokens_per_rdma_rank, num_tokens_per_expert)
        if recv_x.dtype != given.dtype:            # an opaque format's rows, moved as bytes
            recv_x = recv_x.view(given.dtype)
        if recv_scales is not None and recv_scales.dtype != given_scales.dtype:
            recv_scales = recv_scales.view(given_scales.dtype)
        out_x = (recv_x, recv_scales) if scales is not None else recv_x
        if cached:      # DeepEP: no top-k, no counts list, no new handle
            return out_x, None, None, None, None, result["event"]
        return out_x, recv_idx, recv_w, n["num_recv_tokens_per_expert_list"], handle, \
            result["event"]

    # -- combine --------------------------------------------------------------------------
    def combine(self, x, handle, topk_weights, bias, config, previous_event, async_finish,
                allocate_on_comm_stream):
        """DeepEP V1's internode_combine: (combined_x [T, H] bf16, combined_topk_weights [T, K]
        or None, event); epgen/reference_internode.combine defines the values and rounding."""
        ctx, t = self.ctx, self.topology
        ctx.check_errors()
        R, L, dev = ctx.num_ranks, t.ranks_per_node, ctx.device
        if not isinstance(handle, tuple) or len(handle) != 10:
            raise arg_error("handle", type(handle).__name__,
                            "must be the 10-tuple an internode dispatch returned")
        check_tensor("handle[0]", handle[0], torch.bool, device=dev)
        T = handle[0].size(0)
        h = self._unpack_handle(handle, T)
        rows, C = h[7].size(0), h[1].size(1)
        if C != config.num_sms // 2:
            raise arg_error("config.num_sms", config.num_sms,
                            f"must be {2 * C} (2 per channel of the handle's {C} channels)")
        H, K, biases = check_combine_inputs(dev, rows, T, x, topk_weights, bias)
        spec = spec_for_call(internode_combine_spec, {"hidden": "x.shape[1]",
                                                      "num_topk": "topk_weights.shape[1]"},
                             H, K, R, L, len(biases), variants.internode_warps_per_block())
        self._channels(config, spec.blocks_per_channel)
        record = internode_layout.combine_record_bytes(H, K)
        rdma_ring_off, nvl_ring_off, cap = self._check_rings(config, "combine", record, 1)
        layout = (C, config.rdma_ring_slots, cap, record)
        self._rings.check("combine", layout, self_barriered=False)
        peers = ctx.peer_table("nvl")
        kernel = ctx.kernel(spec, "combine")
        result: dict = {}
        with ctx.on_comm_stream(previous_event, async_finish, allocate_on_comm_stream,
                                result) as stream:
            # As the cached dispatch: a new ring layout waits for every rank first.
            if self._rings.switch("combine", layout):
                self._barrier(h[0], C, stream)
            out = torch.empty(T, H, dtype=torch.bfloat16, device=dev)
            out_w = torch.empty(T, K, dtype=torch.float32, device=dev) if K else None
            a = ctx.fill_error_fields(InternodeCombineArgs(), "combine")
            a.x = x.data_ptr() if rows else 0
            a.topk_weights = topk_weights.data_ptr() if K and rows else 0
            a.bias0 = biases[0].data_ptr() if biases and T else 0
            a.bias1 = biases[1].data_ptr() if len(biases) > 1 and T else 0
            a.send_rdma_head = h[8].data_ptr() if T else 0
            a.send_nvl_head = h[9].data_ptr() if h[9].size(0) else 0
            a.recv_rdma_channel_prefix = h[3].data_ptr()
            a.recv_rdma_rank_prefix_sum = h[4].data_ptr()
            a.recv_gbl_channel_prefix = h[5].data_ptr()
            a.recv_gbl_rank_prefix_sum = h[6].data_ptr()
            a.combined_x = out.data_ptr() if T else 0
            a.combined_w = out_w.data_ptr() if out_w is not None and T else 0
            self._fill_regions(a, peers, rdma_ring_off, nvl_ring_off)
            a.done_off = internode_layout.nvl_done_offset(R) + 4
            a.num_rows = rows
            a.num_rdma_rows = h[9].size(0)
            a.num_tokens = T
            a.rdma_slots = config.rdma_ring_slots
            a.rdma_chunk = config.num_max_rdma_chunked_send_tokens
            a.nvl_cap = cap
            kernel.launch(C * spec.blocks_per_channel, spec.threads, a, stream.cuda_stream)
            result["tensors"] = (x, topk_weights, *biases, *h, out, out_w)
        return out, out_w, result["event"]

    def _fill_regions(self, a, peers, rdma_ring_off: int, nvl_ring_off: int) -> None:
        """The fields the dispatch's and the combine's arguments share: both regions, the peers,
        the control areas and this direction's rings."""
        a.rdma = self.ctx.rdma.addr
        a.nvl = self.ctx.nvl.addr
        a.nvl_peers = peers.data_ptr()
        a.pes = self.pes.data_ptr()
        a.rdma_ctrl_off = internode_layout.rdma_ctrl_offset(self.ctx.num_ranks)
        a.rdma_ring_off = rdma_ring_off
        a.nvl_ctrl_off = 0
        a.nvl_ring_off = nvl_ring_off

    def _check_rings(self, config, op: str, record: int, half: int) -> tuple[int, int, int]:
        """(RDMA ring offset, NVLink ring offset, NVLink ring slots) of direction `half` (0
        dispatch, 1 combine) for records of `record` bytes; a region too small for them is an
        error naming the bytes it needs."""
        ctx, t = self.ctx, self.topology
        R, L, Nn, C = ctx.num_ranks, t.ranks_per_node, t.num_nodes, config.num_sms // 2
        lay = internode_layout
        nbytes = 0 if ctx.rdma is None else ctx.rdma.nbytes
        if 2 * lay.rdma_rings_bytes(config, Nn, record) > lay.rdma_half(nbytes, R, Nn):
            raise arg_error("num_rdma_bytes", nbytes,
                            f"the internode {op} ({C} channels x {Nn} nodes x "
                            f"{config.rdma_ring_slots} slots x {record} B records, recv and "
                            f"send rings, in each direction's half) needs >= "
                            f"{lay.rdma_need(config, R, Nn, record)} B "
                            "(Config.get_rdma_buffer_size_hint)")
        cap = lay.nvl_cap(config, Nn)
        if cap < 1:
            raise arg_error("config.num_max_nvl_chunked_recv_tokens",
                            config.num_max_nvl_chunked_recv_tokens,
                            f"must be >= the number of nodes ({Nn}) across nodes")
        nbytes = 0 if ctx.nvl is None else ctx.nvl.nbytes
        if lay.nvl_rings_bytes(config, Nn, L, record) > lay.nvl_half(nbytes, R):
            raise arg_error("num_nvl_bytes", nbytes,
                            f"the internode {op} ({C} channels x {R} rings x {cap} slots x "
                            f"{record} B records in each direction's half) needs >= "
                            f"{lay.nvl_need(config, Nn, L, record)} B "
                            "(Config.get_nvl_buffer_size_hint)")
        return (lay.rdma_ring_offset(R, Nn) + half * lay.rdma_half(ctx.rdma.nbytes, R, Nn),
                lay.nvl_ring_offset(R) + half * lay.nvl_half(ctx.nvl.nbytes, R), cap)

    def _barrier(self, is_token_in_rank, num_channels: int, stream) -> None:
        """A cross-rank barrier: the notify kernel on dummy counts (one expert per rank, no host
        counts), whose outputs are dropped; every rank's previous kernels are done when it ends."""
        R, Nn, dev = self.ctx.num_ranks, self.topology.num_nodes, self.ctx.device
        zeros = [torch.zeros(k, dtype=torch.int32, device=dev) for k in (R, Nn, R)]
        self.notify(is_token_in_rank, *zeros, num_channels, 1, num_worst_tokens=1, stream=stream)

    def _unpack_handle(self, handle, num_tokens: int) -> tuple:
        """The internode handle (DeepEP's 10-tuple), each entry checked (dtype, shape, device)."""
        R, L, Nn, dev = self.ctx.num_ranks, self.topology.ranks_per_node, \
            self.topology.num_nodes, self.ctx.device
        if not isinstance(handle, tuple) or len(handle) != 10:
            raise arg_error("handle", type(handle).__name__,
                            "must be the 10-tuple an internode dispatch returned")
        check_tensor("handle[1]", handle[1], torch.int32, device=dev)
        if handle[1].dim() != 2 or handle[1].size(0) != Nn:
            raise arg_error("handle[1].shape", tuple(handle[1].shape), f"must be [{Nn}, channels]")
        C = handle[1].size(1)
        check_tensor("handle[7]", handle[7], torch.uint8, device=dev)
        check_tensor("handle[9]", handle[9], torch.int32, device=dev)
        meta = internode_layout.source_meta_bytes(L)
        shapes = [(num_tokens, R), (Nn, C), (R, C), (Nn, C), (Nn,), (R, C), (R,),
                  (handle[7].size(0), meta), (num_tokens, Nn), (handle[9].size(0), L)]
        for i, shape in enumerate(shapes):
            dtype = torch.bool if i == 0 else torch.uint8 if i == 7 else torch.int32
            check_tensor(f"handle[{i}]", handle[i], dtype, shape=shape, device=dev)
        return handle

    def _channels(self, config, blocks_per_channel: int) -> int:
        """Channels of an internode call: config.num_sms // 2 (DeepEP's: the handle's matrices
        have that many columns); `blocks_per_channel` blocks of this rank's grid each (the
        kernel spec's: its roles over blocks)."""
        sms, most = self.ctx.device_sms, 2 * internode_layout.MAX_CHANNELS
        if config.num_sms % 2 or not 2 <= config.num_sms <= most:
            raise arg_error("config.num_sms", config.num_sms,
                            f"must be even and in [2, {most}] across nodes (2 per channel)")
        C = config.num_sms // 2
        if C * blocks_per_channel > sms:
            raise arg_error("config.num_sms", config.num_sms,
                            f"gives {C} channels x {blocks_per_channel} block(s) = "
                            f"{C * blocks_per_channel} blocks, more than the {sms} SMs this "
                            "process may use (after any MPS limit)")
        return C
