"""Cubin -> CUmodule (+ NVSHMEM module init) -> function; launches.

A module is loaded once per device and stays loaded for the process: it holds no Buffer
memory, so Buffers come and go without reloading (or re-initialising) their kernels.
"""
from __future__ import annotations

import ctypes
import threading
import time

from ..cache import CacheEntry
from .cuda import c_params, check, driver

# NVSHMEM keeps its device state in this symbol; modules without it need no module init.
NVSHMEM_STATE_SYMBOL = b"nvshmemi_device_state_d"

_modules: dict[tuple[str, int], "LoadedModule"] = {}
load_seconds = 0.0     # wall time of every module load (+ NVSHMEM module init) in this process
_lock = threading.Lock()


class LoadedModule:
    def __init__(self, entry: CacheEntry, device: int, nvshmem_init):
        global load_seconds
        began = time.monotonic()
        d = driver()
        self.entry = entry
        self.device = device
        self.module = check(d.cuModuleLoadData(entry.cubin), f"cuModuleLoadData({entry.name})")
        self.uses_nvshmem = NVSHMEM_STATE_SYMBOL in entry.cubin
        if self.uses_nvshmem and nvshmem_init is not None:
            nvshmem_init(self.module)
        self.functions: dict[str, Kernel] = {}
        load_seconds += time.monotonic() - began

    def function(self, entry_name: str) -> "Kernel":
        f = self.functions.get(entry_name)
        if f is None:
            d = driver()
            mangled = self.entry.lowered(entry_name)
            handle = check(d.cuModuleGetFunction(self.module, mangled.encode()),
                           f"cuModuleGetFunction({entry_name})")
            f = self.functions[entry_name] = Kernel(handle, entry_name)
        return f


class Kernel:
    def __init__(self, handle, name: str):
        self.handle, self.name = handle, name
        self._max_smem_set = 0

    def set_max_dynamic_smem(self, nbytes: int) -> None:
        if nbytes > 48 * 1024 and nbytes > self._max_smem_set:
            d = driver()
            attr = d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            check(d.cuFuncSetAttribute(self.handle, attr, nbytes), f"set smem of {self.name}")
            self._max_smem_set = nbytes

    def launch(self, grid: int, block: int, args: ctypes.Structure, stream: int,
               smem: int = 0) -> None:
        """Launch with one by-value struct argument on a raw stream handle (int)."""
        d = driver()
        if smem > 48 * 1024:
            self.set_max_dynamic_smem(smem)
        params, _keep = c_params(args)
        ret = d.cuLaunchKernel(self.handle, grid, 1, 1, block, 1, 1, smem, stream,
                               ctypes.addressof(params), 0)
        if ret[0] != d.CUresult.CUDA_SUCCESS:      # the message built only on failure
            check(ret, f"launch {self.name}")


def load(entry: CacheEntry, device: int, nvshmem_init=None) -> LoadedModule:
    """The module of a cache entry on a device, loaded (and NVSHMEM-initialised) once."""
    key = (entry.path, device)
    with _lock:
        m = _modules.get(key)
        if m is None:
            m = _modules[key] = LoadedModule(entry, device, nvshmem_init)
        return m
