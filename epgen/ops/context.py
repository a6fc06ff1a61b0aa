"""What every operation family gets from its Buffer: ranks, memory, streams, kernels, errors."""
from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass, field

import torch

from .. import env, jit
from ..runtime import module as modules
from ..runtime.errors import OP_CODES, ErrorWord
from ..runtime.events import EventOverlap
from ..runtime.nvshmem import NvshmemHost
from ..runtime.symmetric import SymmetricRegion
from ..jit.specs import KernelSpec, SpecError
from .streams import StreamOrder, event_of  # noqa: F401 - event_of: part of the ops API

DEFAULT_TIMEOUT_S = 100.0


_TIMEOUTS: dict = {}     # raw EPGEN_TIMEOUT_S -> ns: parsed once per value, still read per call


def timeout_ns() -> int:
    """Device-side wait deadline (EPGEN_TIMEOUT_S, default 100 s); a launch argument."""
    raw = os.environ.get("EPGEN_TIMEOUT_S")
    t = _TIMEOUTS.get(raw)
    if t is None:           # a bad value raises here at every call (never stored)
        t = _TIMEOUTS[raw] = int(env.positive_seconds("EPGEN_TIMEOUT_S", DEFAULT_TIMEOUT_S) * 1e9)
    return t


def arg_error(name: str, value, rule: str) -> ValueError:
    return ValueError(f"{name}={value!r}: {rule}")


def spec_for_call(build, names: dict[str, str], *params):
    """build(*params) (a specs.py builder); a SpecError in a field the caller set is raised
    again in the caller's words: names maps the spec field to the argument as the caller
    writes it. The rules stay in the spec's validate; the ops do not repeat them."""
    try:
        return build(*params)
    except SpecError as e:
        if e.field in names:
            raise arg_error(names[e.field], e.value, e.rule) from None
        raise


# Kernels move rows with 16-byte vector loads and stores (templates/common.cuh ld_nc_v4 /
# st_v4): a row tensor whose address is not a multiple of this faults the GPU with a
# misaligned address, a sticky error that kills the process's CUDA context.
VECTOR_BYTES = 16


def check_tensor(name, t, dtype, shape=None, contiguous=True, device=None, align=0) -> None:
    """A CUDA tensor of this dtype (and shape, device, contiguity, `align`-byte aligned
    address), else arg_error naming it. Every check reads host-side metadata only."""
    # The passing case in one expression (a call checks several tensors: the per-call cost
    # matters, issue 15); anything else runs the checks below, which name what is wrong.
    if (isinstance(t, torch.Tensor) and t.dtype is dtype and t.is_cuda
            and (device is None or t.device == device) and (shape is None or t.shape == shape)
            and (not contiguous or t.is_contiguous()) and (not align or not t.data_ptr() % align)):
        return
    if not isinstance(t, torch.Tensor):
        raise arg_error(name, type(t).__name__, "must be a torch.Tensor")
    if t.dtype != dtype:
        raise arg_error(f"{name}.dtype", t.dtype, f"must be {dtype}")
    if not t.is_cuda or (device is not None and t.device != device):
        raise arg_error(f"{name}.device", t.device, f"must be on {device or 'a CUDA device'}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise arg_error(f"{name}.shape", tuple(t.shape), f"must be {tuple(shape)}")
    if contiguous and not t.is_contiguous():
        raise arg_error(name, "non-contiguous", "must be contiguous")
    check_aligned(name, t, align)


def set_addresses(args: ctypes.Structure, fields: dict) -> ctypes.Structure:
    """Each field to its tensor's address, or to the int given (0 for None): the per-call
    fields of a struct, in the form a replayed call patches them (runtime/fastcall.record)."""
    for name, t in fields.items():
        setattr(args, name, t.data_ptr() if isinstance(t, torch.Tensor) else (t or 0))
    return args


def check_aligned(name, t: torch.Tensor, align: int) -> None:
    """t's first element sits at an `align`-byte aligned address (empty tensors are never
    read). A contiguous view at an element offset (x[1:], x.view(-1)[3:]...) is not."""
    if align and t.numel() and t.data_ptr() % align:
        raise arg_error(f"{name}.data_ptr()", hex(t.data_ptr()),
                        f"must be {align}-byte aligned (it is {t.data_ptr() % align} bytes "
                        f"past a {align}-byte boundary: the kernels read {align}-byte vectors; "
                        "pass a fresh tensor, e.g. .clone())")


@dataclass
class OpsContext:
    rank: int
    num_ranks: int
    device: torch.device
    pes: list[int]                       # NVSHMEM PE of each group rank
    nvshmem: NvshmemHost | None
    nvl: SymmetricRegion | None          # normal-mode buffer (num_nvl_bytes)
    rdma: SymmetricRegion | None         # low-latency buffer (num_rdma_bytes)
    comm_stream: torch.cuda.Stream
    errors: ErrorWord
    arch: str
    # Device table of peer addresses, per region name: int64 [num_ranks] on the GPU.
    peer_tables: dict = field(default_factory=dict)

    _kernels: dict = field(default_factory=dict)
    _arg_templates: dict = field(default_factory=dict)    # args_from's
    # Device mirror of "an error was reported": a kernel's last block reads it to poison the
    # call's outputs (common.cuh last_block_sees_error). Allocated with the Buffer.
    error_flag: torch.Tensor | None = None

    def __post_init__(self):
        if self.error_flag is None:
            self.error_flag = torch.zeros(1, dtype=torch.int32, device=self.device)

    @functools.cached_property
    def device_sms(self) -> int:
        return torch.cuda.get_device_properties(self.device).multi_processor_count

    # -- kernels --------------------------------------------------------------------------
    def kernel(self, spec: KernelSpec, kind: str | None = None) -> modules.Kernel:
        """Compile (or find in the cache) and load once; later calls are a dict lookup.
        `launch` never compiles."""
        k = self._kernels.get((spec, kind))
        if k is None:
            entry = jit.build(spec, self.arch)
            init = self.nvshmem.module_init if self.nvshmem is not None else None
            loaded = modules.load(entry, self.device.index, init)
            k = self._kernels[(spec, kind)] = loaded.function(spec.entry(kind))
        return k

    def fill_error_fields(self, args: ctypes.Structure, op: str) -> ctypes.Structure:
        args.error_word = self.errors.device_ptr
        args.error_flag = self.error_flag.data_ptr()
        args.timeout_ns = timeout_ns()
        args.rank = self.rank
        args.op = OP_CODES[op]
        return args

    def args_from(self, key, fill) -> ctypes.Structure:
        """A fresh argument struct: a copy of the one fill() returned for `key` the first time
        (the fields a call's shapes decide: error word, peers, offsets, counts), with this
        call's timeout_ns; the caller sets the per-call fields (its tensors' addresses). A
        fresh copy, not one struct reused: a receive hook launches its struct later, after
        other calls have filled theirs. `key` names everything fill() reads that the context
        does not fix (its first item the struct type, or the ops object that owns the fields)."""
        t = self._arg_templates.get(key)
        if t is None:
            t = self._arg_templates[key] = fill()
        a = type(t).from_buffer_copy(t)
        a.timeout_ns = timeout_ns()
        return a

    def check_errors(self) -> None:
        self.errors.check()

    @functools.cached_property
    def current_raw_stream(self):
        """() -> the current stream's raw handle on this device (what a replayed call launches
        on: runtime/fastcall.py)."""
        return functools.partial(torch._C._cuda_getCurrentRawStream, self.device.index)

    def peer_table(self, region: str) -> torch.Tensor:
        """int64 [num_ranks] device tensor of the region's address on each rank."""
        t = self.peer_tables.get(region)
        if t is None:
            reg = getattr(self, region)
            t = torch.tensor(reg.peer_addrs, dtype=torch.int64, device=self.device)
            self.peer_tables[region] = t
        return t

    # -- streams (DeepEP semantics: ops/streams.py) ------------------------------------------
    @functools.cached_property
    def streams(self) -> StreamOrder:
        return StreamOrder(self.device, self.comm_stream)

    def on_comm_stream(self, previous_event: EventOverlap | None, async_finish: bool,
                       allocate_on_comm_stream: bool, result: dict):
        """StreamOrder.scope of this Buffer (one operation under DeepEP's stream semantics)."""
        return self.streams.scope(previous_event, async_finish, allocate_on_comm_stream, result)
