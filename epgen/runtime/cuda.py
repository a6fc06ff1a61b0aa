"""Thin, checked access to the CUDA driver through cuda.bindings."""
from __future__ import annotations

import ctypes


class CudaError(RuntimeError):
    pass


_driver = None


def driver():
    """cuda.bindings.driver, imported once (an import statement per launch costs ~1 us)."""
    global _driver
    if _driver is None:
        from cuda.bindings import driver as d
        _driver = d
    return _driver


def check(ret, what: str):
    """Unwrap a cuda.bindings driver result, raising CudaError on failure."""
    d = driver()
    err = ret[0] if isinstance(ret, tuple) else ret
    if err != d.CUresult.CUDA_SUCCESS:
        _, msg = d.cuGetErrorString(err)
        raise CudaError(f"{what}: {err.name if hasattr(err, 'name') else err} "
                        f"({msg.decode() if isinstance(msg, bytes) else msg})")
    if isinstance(ret, tuple):
        return ret[1] if len(ret) == 2 else ret[1:]
    return None


class ArrayInterface:
    """Exposes raw device memory to torch.as_tensor (zero copy, no ownership)."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (int(ptr), False),
            "version": 3, "strides": None, "stream": None}


def wrap_device_memory(ptr: int, nbytes: int, device):
    """A uint8 torch tensor viewing [ptr, ptr+nbytes); the caller owns the memory."""
    import torch
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    return torch.as_tensor(ArrayInterface(ptr, nbytes), device=device)


def c_params(struct_obj) -> tuple[ctypes.Array, object]:
    """kernelParams for one by-value struct argument: void*[1] pointing at the struct."""
    arr = (ctypes.c_void_p * 1)(ctypes.addressof(struct_obj))
    return arr, struct_obj
