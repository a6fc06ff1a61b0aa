"""The sender-side half of the internode handle, computed on the device from is_token_in_rank.

DeepEP's notify_dispatch computes rdma_channel_prefix_matrix and gbl_channel_prefix_matrix in
its blocks 1.. (one per destination node) and its dispatch kernel writes send_rdma_head; all
three depend only on this rank's is_token_in_rank and the channel count, so epgen computes them
here with a few tensor ops (no host sync, capturable in a CUDA graph) ahead of the internode
notify, which then only exchanges counts. Definitions: epgen/reference_internode.py (its loop
version is what the CPU tests compare these with).
"""
from __future__ import annotations

import torch


def _by_channel(mask: torch.Tensor, num_channels: int) -> torch.Tensor:
    """[T, X] -> [C, ceil(T/C), X] (zero rows past T): channel c holds tokens
    [c * ceil(T/C), ...), DeepEP's get_channel_task_range."""
    T, X = mask.shape
    per = -(-T // num_channels)
    padded = mask.new_zeros(num_channels * per, X)
    padded[:T] = mask
    return padded.view(num_channels, per, X)


def channel_prefix(mask: torch.Tensor, num_channels: int) -> torch.Tensor:
    """[X, C] int32: tokens with mask[:, x] in channels 0..c (inclusive)."""
    counts = _by_channel(mask, num_channels).sum(dim=1, dtype=torch.int32)     # [C, X]
    return counts.cumsum(dim=0, dtype=torch.int32).t().contiguous()


def stream_index(mask: torch.Tensor, num_channels: int) -> torch.Tensor:
    """[T, X] int32: the token's index among its channel's tokens with mask[:, x], else -1."""
    T, X = mask.shape
    chans = _by_channel(mask, num_channels)
    idx = chans.cumsum(dim=1, dtype=torch.int32) - 1
    idx = torch.where(chans, idx, torch.full_like(idx, -1))
    return idx.view(-1, X)[:T].contiguous()


def sender_side(is_token_in_rank: torch.Tensor, ranks_per_node: int, num_channels: int):
    """(rdma_channel_prefix_matrix [Nn, C], gbl_channel_prefix_matrix [R, C], send_rdma_head
    [T, Nn]), all int32 on is_token_in_rank's device."""
    T, R = is_token_in_rank.shape
    nodes = is_token_in_rank.view(T, R // ranks_per_node, ranks_per_node).any(dim=2)
    return (channel_prefix(nodes, num_channels), channel_prefix(is_token_in_rank, num_channels),
            stream_index(nodes, num_channels))
