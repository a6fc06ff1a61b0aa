"""EventOverlap: DeepEP's handle on comm-stream work, over torch.cuda.Event."""
from __future__ import annotations

import torch


class EventHandle:
    """An event recorded on the current stream at creation (DeepEP's EventHandle)."""

    def __init__(self, event: torch.cuda.Event | None = None):
        if event is None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream())
        self.event = event

    def current_stream_wait(self) -> None:
        torch.cuda.current_stream().wait_event(self.event)


class EventOverlap:
    """Wraps an EventHandle and keeps tensors alive until the caller waits.

    `with event_overlap:` runs the body, then makes the current stream wait for the event.
    """

    def __init__(self, event: EventHandle | None = None, extra_tensors: tuple | None = None):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        assert self.event is not None, "EventOverlap has no event (async_finish was False)"
        self.event.current_stream_wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.event is not None:
            self.event.current_stream_wait()
        return False
