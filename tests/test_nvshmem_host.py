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


def _usable_everywhere(rank, world):
    """Rank 1's NVSHMEM is stuck (a fake host: a collective given up cannot be produced
    without GPUs; so are the CUDA calls a CPU host lacks). Creating a Buffer must raise on
    every rank, naming rank 1, with no device-wide synchronize on rank 1 (NVSHMEM's barrier
    kernel of the given-up collective would keep it waiting forever)."""
    import types

    import torch
    import torch.distributed as dist

    import epgen
    from epgen.runtime import sharing

    def synchronize(*a, **k):
        if rank == 1:
            raise AssertionError("torch.cuda.synchronize() with NVSHMEM stuck")
    torch.cuda.is_available, torch.cuda.current_device = (lambda: True), (lambda: 0)
    torch.cuda.init, torch.cuda.synchronize = (lambda: None), synchronize
    sharing.local_share = lambda r, device: sharing.GpuShare(r, "fake-gpu", False, 100, 132)
    nvshmem._host = types.SimpleNamespace(
        stuck="a collective was given up after 3 s (a peer never joined)" if rank == 1 else None)
    try:
        epgen.Buffer(dist.group.WORLD, 0, 1 << 20, low_latency_mode=True)
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def test_a_stuck_nvshmem_on_one_rank_makes_every_rank_raise():
    """Buffer creation checks over WORLD first: the healthy ranks raise too, instead of waiting
    in NVSHMEM's allocation for the stuck one (no deadline there)."""
    from epgen import launch
    out = launch.run_ranks(2, _usable_everywhere, timeout_s=120,
                           placement=launch.Placement(2, 1, "time-sliced"))
    for msg in out:
        assert "NVSHMEM is unusable in WORLD rank(s) [1]" in msg and "never joined" in msg, msg
        assert "start fresh processes" in msg, msg


def test_destroy_after_a_given_up_collective_does_not_synchronize_the_device(monkeypatch):
    """NVSHMEM's barrier kernel of a collective given up keeps spinning on the GPU, so a
    device-wide synchronize would never return: a later Buffer's destroy() (or the exit hook)
    leaks it at once, with a warning. A fake Buffer state: a stuck NVSHMEM needs GPUs."""
    import types

    import pytest
    import torch

    from epgen import Buffer

    def no_device_sync(*a, **k):
        raise AssertionError("torch.cuda.synchronize() called with NVSHMEM stuck")
    monkeypatch.setattr(torch.cuda, "synchronize", no_device_sync)
    buf = Buffer.__new__(Buffer)
    buf._destroyed, buf.rank, buf._ll = False, 0, None
    buf._ctx = types.SimpleNamespace(
        errors=types.SimpleNamespace(raised=lambda: False),
        nvshmem=types.SimpleNamespace(stuck="a collective was given up after 3 s"))
    with pytest.warns(UserWarning, match="became unusable.*given up.*leaked"):
        buf.destroy()
    assert buf._destroyed
