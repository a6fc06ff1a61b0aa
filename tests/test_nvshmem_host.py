"""CPU: NvshmemHost's bounded barrier (a fake library stands in for NVSHMEM: a peer that never
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


def test_barrier_within_returns_when_every_pe_arrives(monkeypatch):
    h = _host(monkeypatch)
    h.lib.arrive.set()
    assert h.barrier_all_within(5.0, "cuda:0") and h.stuck is None


def test_barrier_within_gives_up_and_blocks_later_collectives(monkeypatch):
    h = _host(monkeypatch)
    t0 = time.monotonic()
    assert not h.barrier_all_within(0.3, "cuda:0")
    assert 0.25 < time.monotonic() - t0 < 3.0
    assert "never arrived" in h.stuck
    assert not h.barrier_all_within(5.0, "cuda:0")      # refused at once, no second wait
    h.finalize()
    assert not h.lib.finalized                          # no finalize after a stuck barrier
    h.lib.arrive.set()                                  # lets the fake's thread end
