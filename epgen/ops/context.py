"""What every operation family gets from its Buffer: ranks, memory, streams, kernels, errors."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from dataclasses import dataclass, field

import torch

from .. import env, jit
from ..runtime import module as modules
from ..runtime.errors import OP_CODES, ErrorWord
from ..runtime.events import EventHandle, EventOverlap
from ..runtime.nvshmem import NvshmemHost
from ..runtime.symmetric import SymmetricRegion
from ..specs import KernelSpec

DEFAULT_TIMEOUT_S = 100.0


def timeout_ns() -> int:
    """Device-side wait deadline (EPGEN_TIMEOUT_S, default 100 s); a launch argument."""
    return int(env.positive_seconds("EPGEN_TIMEOUT_S", DEFAULT_TIMEOUT_S) * 1e9)


def arg_error(name: str, value, rule: str) -> ValueError:
    return ValueError(f"{name}={value!r}: {rule}")


def check_tensor(name, t, dtype, shape=None, contiguous=True, device=None) -> None:
    """A CUDA tensor of this dtype (and shape, device, contiguity), else arg_error naming it."""
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


@dataclass
class OpsContext:
    group: object
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
    comm_busy: bool = False          # async work of this Buffer on the comm stream not yet joined
    compute_pending: bool = False    # this Buffer's last work ran on the current stream ...
    sync_done: torch.cuda.Event = field(default_factory=torch.cuda.Event)   # ... and ended here

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
        args.timeout_ns = timeout_ns()
        args.rank = self.rank
        args.op = OP_CODES[op]
        return args

    def check_errors(self) -> None:
        self.errors.check()

    def peer_table(self, region: str) -> torch.Tensor:
        """int64 [num_ranks] device tensor of the region's address on each rank."""
        t = self.peer_tables.get(region)
        if t is None:
            reg = getattr(self, region)
            t = torch.tensor(reg.peer_addrs, dtype=torch.int64, device=self.device)
            self.peer_tables[region] = t
        return t

    # -- streams (DeepEP semantics) -------------------------------------------------------
    @contextlib.contextmanager
    def on_comm_stream(self, previous_event: EventOverlap | None, async_finish: bool,
                       allocate_on_comm_stream: bool, result: dict):
        """DeepEP's stream semantics around one operation; yields the stream to launch on.

        Synchronous calls without previous_event launch on the current stream (ordered as
        DeepEP's comm-stream round trip would order them). Otherwise the launches run on the
        comm stream after `previous_event` (else after the current stream's work), and then
        either result['event'] is an EventOverlap the caller waits on (async_finish) or the
        current stream waits for the comm stream. Tensors the body lists in result['tensors']
        are recorded on the stream that did not allocate them."""
        if allocate_on_comm_stream and (previous_event is None or not async_finish):
            raise arg_error("allocate_on_comm_stream", True,
                            "needs previous_event and async_finish=True")
        compute = torch.cuda.current_stream(self.device.index)
        if previous_event is None and not async_finish:
            # DeepEP's round trip (comm waits for compute, runs, compute waits for comm) orders
            # the work like launching on the current stream, which needs no events, once
            # earlier async work of this Buffer on the comm stream is joined.
            if self.comm_busy:
                compute.wait_stream(self.comm_stream)
                self.comm_busy = False
            yield compute
            self.sync_done.record(compute)
            self.compute_pending = True
            result["event"] = EventOverlap(None)
            return
        if previous_event is not None:
            self.comm_stream.wait_event(previous_event.event.event)
            if self.compute_pending:
                # also after this Buffer's last operation, run on the current stream: two of
                # its kernels must never run at once (they share ring counters)
                self.comm_stream.wait_event(self.sync_done)
        else:
            self.comm_stream.wait_stream(compute)
        self.compute_pending = False
        if allocate_on_comm_stream:
            with torch.cuda.stream(self.comm_stream):
                yield self.comm_stream
        else:
            yield self.comm_stream
        tensors = [t for t in result.get("tensors", ()) if isinstance(t, torch.Tensor)]
        if async_finish:
            event = torch.cuda.Event()
            event.record(self.comm_stream)
            for t in tensors:
                t.record_stream(self.comm_stream)
            result["event"] = EventOverlap(EventHandle(event), tuple(tensors))
            self.comm_busy = True
        else:
            compute.wait_stream(self.comm_stream)
            self.comm_busy = False
            result["event"] = EventOverlap(None)
        if allocate_on_comm_stream:
            for t in tensors:
                t.record_stream(compute)
