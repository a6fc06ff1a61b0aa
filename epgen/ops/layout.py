"""get_dispatch_layout: counts per rank / expert and the token-in-rank mask, one kernel."""
from __future__ import annotations

import torch

from ..jit.kernel_args import LayoutArgs, LayoutNodesArgs
from ..jit.specs import layout_spec
from .context import OpsContext, arg_error
from .streams import zeros_on


def check_topk_idx(topk_idx, name: str = "topk_idx", num_tokens: int | None = None) -> None:
    if not isinstance(topk_idx, torch.Tensor):
        raise arg_error(name, type(topk_idx).__name__, "must be a torch.Tensor")
    if topk_idx.dim() != 2:
        raise arg_error(f"{name}.shape", tuple(topk_idx.shape), "must be [num_tokens, num_topk]")
    if topk_idx.dtype != torch.int64:
        raise arg_error(f"{name}.dtype", topk_idx.dtype, "must be torch.int64 (epgen.topk_idx_t)")
    if not topk_idx.is_cuda:
        raise arg_error(f"{name}.device", topk_idx.device, "must be a CUDA tensor")
    if not topk_idx.is_contiguous():
        raise arg_error(name, "non-contiguous", "must be contiguous")
    if num_tokens is not None and topk_idx.size(0) != num_tokens:
        raise arg_error(f"{name}.shape[0]", topk_idx.size(0), f"must equal num_tokens={num_tokens}")


class LayoutOps:
    def __init__(self, ctx: OpsContext, ranks_per_node: int = 0):
        """ranks_per_node > 0: the group spans nodes of that many ranks, and the layout also
        counts tokens per node (num_tokens_per_rdma_rank); 0: one node (None returned)."""
        self.ctx = ctx
        self.ranks_per_node = ranks_per_node

    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        ctx = self.ctx
        ctx.check_errors()
        check_topk_idx(topk_idx)
        if not isinstance(num_experts, int) or num_experts <= 0 or num_experts % ctx.num_ranks:
            raise arg_error("num_experts", num_experts,
                            f"must be a positive multiple of num_ranks={ctx.num_ranks}")
        num_tokens, num_topk = topk_idx.shape
        L = self.ranks_per_node
        spec = layout_spec(ctx.num_ranks, num_experts, num_topk, L)
        kernel = ctx.kernel(spec)
        result: dict = {}
        with ctx.on_comm_stream(previous_event, async_finish, allocate_on_comm_stream,
                                result) as stream:
            # counts the kernel accumulates into, zeroed on its stream
            per_rank = zeros_on(stream, ctx.num_ranks, dtype=torch.int32, device=ctx.device)
            per_expert = zeros_on(stream, num_experts, dtype=torch.int32, device=ctx.device)
            per_node = zeros_on(stream, ctx.num_ranks // L, dtype=torch.int32,
                                device=ctx.device) if L else None
            in_rank = torch.empty(num_tokens, ctx.num_ranks, dtype=torch.bool, device=ctx.device)
            if num_tokens > 0 and num_topk > 0:
                args = ctx.fill_error_fields(LayoutNodesArgs() if L else LayoutArgs(),
                                             "get_dispatch_layout")
                if L:
                    args.num_tokens_per_rdma_rank = per_node.data_ptr()
                args.topk_idx = topk_idx.data_ptr()
                args.num_tokens_per_rank = per_rank.data_ptr()
                args.num_tokens_per_expert = per_expert.data_ptr()
                args.is_token_in_rank = in_rank.data_ptr()
                args.num_tokens = num_tokens
                grid = max(1, min(ctx.device_sms, -(-num_tokens // spec.threads)))
                kernel.launch(grid, spec.threads, args, stream.cuda_stream)
            elif num_tokens > 0:
                with torch.cuda.stream(stream):
                    in_rank.zero_()
            result["tensors"] = (topk_idx, per_rank, per_expert, in_rank) + \
                ((per_node,) if L else ())
        return per_rank, per_node, per_expert, in_rank, result["event"]
