"""CPU: NvshmemHost's bounded collectives (a fake library stands in for NVSHMEM: a peer that never
arrives cannot be produced without GPUs)."""
from __future__ import annotations

import threading
import time

from epgen.runtime import nvshmem


class FakeLib:
    """A fake NVSHMEM host library: its barrier returns once `arrive` is set."""

    def __init__(self):
        self.arrive = threading.Event()
        self.finalized = False

    def nvshmem_barrier_all(self):
        self.arrive.wait()

    def nvshmemx_hostlib_finalize(self):
        self.finalized = True


def _host(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    h = nvshmem.NvshmemHost.__new__(nvshmem.NvshmemHost)
    h.lib, h.owned, h.stuck = FakeLib(), True, None
    return h


def test_collective_within_returns_when_every_pe_arrives(monkeypatch):
    h = _host(monkeypatch)
    h.lib.arrive.set()
    assert h.collective_within(h.barrier_all, 5.0, 0) and h.stuck is None


def test_collective_within_raises_the_collectives_error(monkeypatch):
    import pytest
    h = _host(monkeypatch)

    def broken():
        raise RuntimeError("nvshmem_free failed")
    with pytest.raises(RuntimeError, match="nvshmem_free failed"):
        h.collective_within(broken, 5.0, 0)
    assert h.stuck is None


def test_collective_within_gives_up_and_blocks_later_collectives(monkeypatch):
    h = _host(monkeypatch)
    t0 = time.monotonic()
    assert not h.collective_within(h.barrier_all, 0.3, 0)
    assert 0.25 < time.monotonic() - t0 < 3.0
    assert "never joined" in h.stuck
    t0 = time.monotonic()
    assert not h.collective_within(h.barrier_all, 5.0, 0)   # refused at once, no second wait
    assert time.monotonic() - t0 < 1.0
    h.finalize()
    assert not h.lib.finalized                          # no finalize after a stuck barrier
    h.lib.arrive.set()                                  # lets the fake's thread end
