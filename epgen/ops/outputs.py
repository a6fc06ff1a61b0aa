"""A call's outputs carved from one allocation: each `torch.empty` costs the host ~1.5-5 us
(bench/NOTES.md, "Host fast lane"), so outputs that live and die together come from one block.
The parts share the block's storage (a part keeps its whole block alive: group only what a
caller uses and frees together), made as the fast lane's replay makes them (fastcall.cpp
`part_of`): tensors set on the storage, not view chains (no `_base`)."""
from __future__ import annotations

import torch

ALIGN = 256        # each part's byte offset in the block: any vector or TMA access stays aligned


def carve(device, parts) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the uint8 block, one contiguous tensor per (shape, dtype) of `parts`, in order); one
    part is allocated as itself (block and part the same tensor)."""
    if len(parts) == 1:
        t = torch.empty(parts[0][0], dtype=parts[0][1], device=device)
        return t, [t]
    offsets, end = [], 0
    for shape, dtype in parts:
        begin = -(-end // ALIGN) * ALIGN
        offsets.append(begin)
        end = begin + dtype.itemsize * _numel(shape)
    block = torch.empty(end, dtype=torch.uint8, device=device)
    storage = block.untyped_storage()
    return block, [torch.empty(0, dtype=dtype, device=device).set_(
        storage, offset // dtype.itemsize, shape) for offset, (shape, dtype) in zip(offsets, parts)]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
