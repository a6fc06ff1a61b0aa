"""Mapped pinned host memory: the GPU writes it, the host reads it without a device sync."""
from __future__ import annotations

import ctypes

from .cuda import check, driver


class MappedHostArray:
    def __init__(self, count: int, ctype=ctypes.c_int32):
        d = driver()
        flags = d.CU_MEMHOSTALLOC_DEVICEMAP | d.CU_MEMHOSTALLOC_PORTABLE
        nbytes = max(1, count) * ctypes.sizeof(ctype)
        self.host_ptr = int(check(d.cuMemHostAlloc(nbytes, flags), "cuMemHostAlloc"))
        self.device_ptr = int(check(d.cuMemHostGetDevicePointer(self.host_ptr, 0),
                                    "cuMemHostGetDevicePointer"))
        self.values = (ctype * max(1, count)).from_address(self.host_ptr)
        self.count = count

    def fill(self, value) -> None:
        for i in range(self.count):
            self.values[i] = value

    def free(self) -> None:
        if self.host_ptr:
            driver().cuMemFreeHost(self.host_ptr)
            self.host_ptr = self.device_ptr = 0
