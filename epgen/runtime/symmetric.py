"""A symmetric NVSHMEM allocation, viewed as torch tensors, with its peers' addresses."""
from __future__ import annotations

import torch

from .cuda import wrap_device_memory
from .nvshmem import NvshmemHost

_ALIGN = 256


class SymmetricRegion:
    def __init__(self, host: NvshmemHost, nbytes: int, device: torch.device, pes: list[int]):
        self.host = host
        self.nbytes = int(nbytes)
        self.device = device
        self.addr = host.malloc(self.nbytes) if self.nbytes > 0 else 0
        self.bytes = wrap_device_memory(self.addr, self.nbytes, device)
        # Address of this region on each group rank (0 where not reachable by load/store).
        self.peer_addrs = [host.peer_ptr(self.addr, pe) if self.addr else 0 for pe in pes]

    def view(self, dtype: torch.dtype, shape, offset: int = 0) -> torch.Tensor:
        """A typed view [offset, offset + prod(shape) * itemsize) of this rank's region."""
        n = 1
        for s in shape:
            n *= s
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        if offset % _ALIGN and offset % torch.empty((), dtype=dtype).element_size():
            raise ValueError(f"offset {offset} is not aligned for {dtype}")
        if offset + nbytes > self.nbytes:
            raise ValueError(f"view of {nbytes} bytes at offset {offset} exceeds the "
                             f"{self.nbytes}-byte symmetric region")
        return self.bytes[offset:offset + nbytes].view(dtype).view(*shape)

    def free(self) -> None:
        if self.addr:
            self.host.free(self.addr)
            self.addr = 0
            self.bytes = None
