"""A call's outputs carved from one allocation: each `torch.empty` costs the host ~1.5-5 us
(bench/NOTES.md, "Host fast lane"), so outputs that live and die together come from one block,
as views (a view keeps its whole block alive: group only what a caller uses together)."""
from __future__ import annotations

import torch

ALIGN = 256        # each part's byte offset in the block: any vector or TMA access stays aligned


def carve(device, parts) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the uint8 block, one contiguous view per (shape, dtype) of `parts`, in order); one part
    is allocated as itself (block and view the same tensor: no view where none is needed)."""
    if len(parts) == 1:
        t = torch.empty(parts[0][0], dtype=parts[0][1], device=device)
        return t, [t]
    offsets, end = [], 0
    for shape, dtype in parts:
        begin = -(-end // ALIGN) * ALIGN
        offsets.append(begin)
        end = begin + _nbytes(shape, dtype)
    block = torch.empty(end, dtype=torch.uint8, device=device)
    return block, [block[o:o + _nbytes(shape, dtype)].view(dtype).view(shape)
                   for o, (shape, dtype) in zip(offsets, parts)]


def _nbytes(shape, dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n
