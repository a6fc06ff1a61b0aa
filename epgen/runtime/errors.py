"""The device error word: mapped pinned host memory that kernels report into.

Kernels never trap. The first error (timeout, bad index, over capacity) wins a system-scope
compare-and-swap on word[0] and fills op/rank/peer/detail; every other wait then gives up. The
host reads the word at every Buffer call with no device sync, so CUDA graphs and the no-SM
receive hook stay intact.
"""
from __future__ import annotations

import ctypes
import time

from ..jit import layout_facts
from .hostmem import MappedHostArray

WORDS = layout_facts.ERROR_WORDS
CODE_TIMEOUT = layout_facts.ERR_TIMEOUT
# The word's fields, in EpgenDeviceError's argument order (code, op, rank, peer, detail).
FIELDS = (layout_facts.ERR_FIELD_CODE, layout_facts.ERR_FIELD_OP, layout_facts.ERR_FIELD_RANK,
          layout_facts.ERR_FIELD_PEER, layout_facts.ERR_FIELD_DETAIL)
CODES = {layout_facts.ERR_TIMEOUT: "timed out waiting",
         layout_facts.ERR_BAD_INDEX: "topk_idx value out of range",
         layout_facts.ERR_CAPACITY: "count over capacity", layout_facts.ERR_BAD_ARG: "bad argument"}
OPS = {1: "get_dispatch_layout", 2: "dispatch", 3: "combine", 4: "dispatch notify",
       5: "low_latency_dispatch", 6: "low_latency_combine", 7: "barrier",
       8: "clean_low_latency_buffer"}
OP_CODES = {v: k for k, v in OPS.items()}


class EpgenDeviceError(RuntimeError):
    """An error a kernel reported; after it only Buffer.destroy() is valid."""

    def __init__(self, code, op, rank, peer, detail):
        self.code, self.op, self.rank, self.peer, self.detail = code, op, rank, peer, detail
        what = CODES.get(code, f"error code {code}")
        peer_txt = f" for peer rank {peer}" if peer >= 0 else ""
        super().__init__(f"epgen: rank {rank}: {OPS.get(op, f'op {op}')} {what}{peer_txt} "
                         f"(detail {detail}); the Buffer is unusable, call destroy()")


class ErrorWord:
    def __init__(self):
        self._memory = MappedHostArray(WORDS)
        self.device_ptr = self._memory.device_ptr
        self.words = self._memory.values
        self.reset()

    def reset(self) -> None:
        self._memory.fill(0)

    @property
    def code_address(self) -> int:
        """Host address of the code field (int32): the fast lane reads it (runtime/fastcall.cpp)."""
        return ctypes.addressof(self.words) + layout_facts.ERR_FIELD_CODE * ctypes.sizeof(
            self.words._type_)

    def raised(self) -> bool:
        return self.words[layout_facts.ERR_FIELD_CODE] != 0

    # The kernel that wins the code's compare-and-swap writes the other fields after it
    # (templates/common.cuh report_error), so the host can see the code first: it waits this
    # long for the op field (op codes start at 1) before it reports what it has.
    FIELDS_WAIT_S = 0.1

    def check(self) -> None:
        w = self.words
        if w[layout_facts.ERR_FIELD_CODE] != 0:
            deadline = time.monotonic() + self.FIELDS_WAIT_S
            while w[layout_facts.ERR_FIELD_OP] == 0 and time.monotonic() < deadline:
                time.sleep(0)
            raise EpgenDeviceError(*(w[i] for i in FIELDS))

    def free(self) -> None:
        self._memory.free()
