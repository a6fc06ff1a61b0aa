"""DeepEP's stream semantics for one Buffer, used by every operation family (layout, normal
dispatch / combine, low-latency dispatch / combine and their receive hooks).

DeepEP (csrc/deep_ep.cpp): an operation runs on the Buffer's comm stream after
`previous_event` (else after the current "compute" stream's work); with `async_finish` it
returns an event recorded on the comm stream (and records the tensors it touched there),
otherwise the compute stream waits for the comm stream. `allocate_on_comm_stream` allocates the
outputs on the comm stream (needs previous_event and async_finish). A low-latency call with
`return_recv_hook` launches on the compute stream, and its hook launches the receive on that
same stream, whatever stream is current when the hook is called.

epgen runs a synchronous call without previous_event on the current stream: DeepEP's round
trip (comm waits for compute, runs, compute waits for comm) orders it the same way without two
events. What that shortcut must keep is DeepEP's FIFO between this Buffer's calls: two of its
kernels share device state (normal ring counters, low-latency sequence words, slot counters and
buffer halves) and must never run at once, so a call on the current stream first joins the
Buffer's unjoined async work on the comm stream and its last call if that ran on another
stream, and a comm-stream call also waits for the Buffer's last call on a current stream.

Under CUDA graph capture the bookkeeping is per mode: what was recorded eagerly is never waited
on from a capture (that would cross the capture boundary; torch.cuda.graph synchronizes the
device before capture begins) and what a capture recorded is never waited on eagerly (it runs
at replay, in the replaying stream's order).
"""
from __future__ import annotations

import contextlib

import torch

from ..runtime.events import EventHandle, EventOverlap


def capturing() -> bool:
    """The current stream is capturing a CUDA graph."""
    return bool(torch.cuda.is_current_stream_capturing())


def zeros_on(stream, *shape, dtype, device) -> torch.Tensor:
    """A zeroed output for a scope's body: allocated on the current stream (DeepEP's
    allocate_on_comm_stream=False), zeroed on the launch stream. The comm stream joined the
    current stream before the body ran, so a zero-fill left on the current stream could still
    be running, or not yet have run, when the kernel accumulates into it."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    with torch.cuda.stream(stream):
        t.zero_()
    return t


def event_of(previous_event) -> torch.cuda.Event | None:
    """The CUDA event a `previous_event` argument names. DeepEP reads
    `getattr(previous_event, 'event', None)`, so None and an EventOverlap without an event
    (what a synchronous call returns) both mean "no event to wait for"."""
    if previous_event is None:
        return None
    if not isinstance(previous_event, EventOverlap):
        from .context import arg_error
        raise arg_error("previous_event", type(previous_event).__name__,
                        "must be None or an EventOverlap (Buffer.capture(), or an async call's event)")
    handle = previous_event.event
    return None if handle is None else handle.event


def no_hook() -> None:
    """The hook a call without return_recv_hook returns (its receive already ran): one shared
    function, so a replayed call (runtime/fastcall.py) returns it too."""


no_hook.replay_safe = True


class StreamOrder:
    def __init__(self, device: torch.device, comm_stream: torch.cuda.Stream):
        self.device = device
        self.comm_stream = comm_stream
        self.comm_busy = False          # async work of this Buffer on the comm stream not joined
        self.compute_pending = False    # the Buffer's last call ran on the current stream ...
        self.sync_done = torch.cuda.Event()   # ... and ended here
        self.sync_stream = None         # ... which was this stream (cuda_stream handle)
        self._captured = False          # the state above was set under a capture

    def _enter_mode(self) -> bool:
        now = capturing()
        if now != self._captured:
            # eager work is complete when a capture begins, and captured work runs at replay:
            # nothing recorded in the other mode is waited on
            self.comm_busy = self.compute_pending = False
            self.sync_done = torch.cuda.Event()
            self._captured = now
        return now

    @contextlib.contextmanager
    def scope(self, previous_event: EventOverlap | None, async_finish: bool,
              allocate_on_comm_stream: bool, result: dict):
        """One operation; yields the stream to launch on. On exit result['event'] is the
        EventOverlap to return; tensors the body lists in result['tensors'] are recorded on
        the stream that did not allocate them. Arguments are checked by the caller."""
        from .context import arg_error
        previous_event = event_of(previous_event)
        if allocate_on_comm_stream and (previous_event is None or not async_finish):
            raise arg_error("allocate_on_comm_stream", True,
                            "needs previous_event and async_finish=True")
        self._enter_mode()
        compute = torch.cuda.current_stream(self.device.index)
        if previous_event is None and not async_finish:
            if self.comm_busy:
                compute.wait_stream(self.comm_stream)
                self.comm_busy = False
            elif self.compute_pending and self.sync_stream != compute.cuda_stream:
                compute.wait_event(self.sync_done)      # the last call ran on another stream
            yield compute
            self.sync_done.record(compute)
            self.compute_pending = True
            self.sync_stream = compute.cuda_stream
            result["event"] = EventOverlap(None)
            return
        if previous_event is not None:
            self.comm_stream.wait_event(previous_event)
        else:
            self.comm_stream.wait_stream(compute)
        if self.compute_pending and (previous_event is not None
                                     or self.sync_stream != compute.cuda_stream):
            self.comm_stream.wait_event(self.sync_done)
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

    @staticmethod
    def check_two_phase(async_finish: bool, return_recv_hook: bool) -> None:
        """two_phase's argument rule; the ops call it with their other checks, before they
        allocate anything."""
        if async_finish and return_recv_hook:
            from .context import arg_error      # here, not per call: the import costs ~1 us
            raise arg_error("async_finish", True, "cannot be combined with return_recv_hook=True")

    def two_phase(self, send, receive, async_finish: bool, return_recv_hook: bool, tensors):
        """A low-latency call: send(stream) now and receive(stream) now or in the returned
        hook, which launches on the stream the send ran on (DeepEP binds the hook to the
        stream current at the dispatch / combine call). Returns (EventOverlap, hook)."""
        result: dict = {"tensors": tensors}
        with self.scope(None, async_finish, False, result) as stream:
            send(stream)
            if not return_recv_hook:
                receive(stream)

        if not return_recv_hook:
            return result["event"], no_hook

        def hook():
            _keep = tensors    # noqa: F841  (inputs/outputs stay alive until the receive)
            receive(stream)
        return result["event"], hook
