"""Internode normal mode (RDMA between nodes, NVLink forwarding inside a node): what exists so
far is the notify step of an uncached dispatch (ops/internode_handle.py for the handle's sender
side, templates/internode_notify.cuh for the counts exchange). The dispatch and combine data
kernels are not written: Buffer.internode_dispatch / internode_combine raise NotImplementedError.
"""
from __future__ import annotations

import torch

from ..kernel_args import InternodeNotifyArgs
from ..runtime.hostmem import MappedHostArray
from ..runtime.topology import Topology
from ..specs import internode_notify_spec
from . import internode_handle, internode_layout
from .context import OpsContext, arg_error, check_tensor
from .intranode import wait_host_counts



class InternodeOps:
    def __init__(self, ctx: OpsContext, topology: Topology):
        self.ctx = ctx
        self.topology = topology
        self.pes = torch.tensor(ctx.pes, dtype=torch.int32, device=ctx.device)
        self._host_counts: MappedHostArray | None = None

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
