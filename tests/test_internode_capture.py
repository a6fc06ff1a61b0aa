"""CPU: the internode calls under CUDA graph capture (ops/capture.py, the intranode mode's rules):
what is captured (a worst-sized uncached dispatch with no host wait, a cached dispatch, the
combine) and what is refused before anything is launched, naming the rule (an uncached
dispatch without num_worst_tokens; a ring layout that needs the host-decided barrier; a layout
change after a capture). No GPU here: the capture probe is a FAKE (`capture` below) and the
launches are tests/fake_launch.py's FAKES, which record what each call launches."""
from __future__ import annotations

import pytest
import torch

import epgen
from epgen.ops import internode
from tests.fake_launch import fake_cuda, fake_internode_ops
from tests.test_internode_dispatch_args import CFG, H, K, R, L, _args, _handle

WORST = 16
OTHER = epgen.Config(4, 2, 8, 2, 8)        # CFG with 8 RDMA slots, not 4: another ring layout


@pytest.fixture
def capture(monkeypatch):
    """FAKE capture probe: torch.cuda.is_current_stream_capturing answers state["on"] (the
    CPU build's own raises)."""
    state = {"on": False}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["on"])
    return state


def _kinds(fake):
    return [type(spec).__name__.replace("Internode", "").replace("Spec", "")
            for spec, _ in fake.launches]


def _cached(**over):
    return _args(handle=_handle(2, rows=WORST, rdma_rows=WORST), topk_idx=None,
                 topk_weights=None, **over)


def _combine(ops, config=CFG):
    return ops.combine(fake_cuda(torch.zeros(WORST, H, dtype=torch.bfloat16)),
                       _handle(2, rows=WORST, rdma_rows=WORST),
                       fake_cuda(torch.zeros(WORST, K)), None, config, None, False, False)


def test_worst_sized_dispatch_and_combine_are_captured_without_a_host_wait(capture, monkeypatch):
    def no_host_wait(*a, **k):
        raise AssertionError("a host wait (mapped counts) in a captured call")
    monkeypatch.setattr(internode, "MappedHostArray", no_host_wait)
    monkeypatch.setattr(internode, "wait_host_counts", no_host_wait)
    ops, fake = fake_internode_ops(R, L)
    capture["on"] = True
    recv, idx, w, counts, handle, _ = ops.dispatch(**_args(num_worst_tokens=WORST))
    assert _kinds(fake) == ["Notify", "Dispatch"]
    notify, disp = fake.launches[0][1], fake.launches[1][1]
    assert notify.host_counts == 0                  # the notify's results stay on the device
    assert (disp.num_worst_tokens, disp.num_recv_rows, disp.num_rdma_recv_rows) == (WORST,) * 3
    assert counts == [] and recv.shape == (WORST, H) and handle[9].shape == (WORST, L)
    _combine(ops)
    assert _kinds(fake) == ["Notify", "Dispatch", "Combine"]     # no barrier in a capture


def test_cached_dispatch_is_captured_with_the_previous_layout(capture):
    ops, fake = fake_internode_ops(R, L)
    ops.dispatch(**_cached())                       # eager: sets the dispatch ring layout
    capture["on"] = True
    ops.dispatch(**_cached())
    assert _kinds(fake) == ["Dispatch", "Dispatch"]


def test_uncached_dispatch_without_worst_tokens_is_refused_during_capture(capture):
    ops, fake = fake_internode_ops(R, L)
    capture["on"] = True
    with pytest.raises(ValueError, match=r"num_worst_tokens=0: must be > 0 for a dispatch "
                                         r"without a handle during CUDA graph capture"):
        ops.dispatch(**_args())
    assert fake.launches == []


def test_a_layout_change_is_refused_during_capture(capture):
    """Cached dispatch and combine: another ring layout than the previous call's needs the
    barrier, decided on the host, which replays would not run."""
    ops, fake = fake_internode_ops(R, L)
    ops.dispatch(**_cached())
    _combine(ops)
    capture["on"] = True
    calls = {"dispatch": lambda: ops.dispatch(**_cached(config=OTHER)),
             "combine": lambda: _combine(ops, OTHER)}
    for which, call in calls.items():
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith(f"config='{which} ring layout (2, 8, 4, ") and \
            "during CUDA graph capture" in msg and f"must equal the previous {which}'s (2, 4, 4, " \
            in msg and "RDMA slots = config.rdma_ring_slots" in msg and \
            "make one eager call with this configuration before capture" in msg, msg
    assert _kinds(fake) == ["Dispatch", "Combine"]


def test_an_uncached_dispatch_may_change_the_layout_during_capture(capture):
    """Its notify is a cross-rank barrier of its own, in the graph."""
    ops, fake = fake_internode_ops(R, L)
    ops.dispatch(**_cached())
    capture["on"] = True
    ops.dispatch(**_args(num_worst_tokens=WORST, config=OTHER))
    assert _kinds(fake) == ["Dispatch", "Notify", "Dispatch"]


def test_a_captured_layout_is_pinned(capture):
    """After a capture, every call in that direction keeps the captured layout, eager ones too
    (a replay cannot run the barrier a change needs); the other direction is free."""
    ops, fake = fake_internode_ops(R, L)
    capture["on"] = True
    _combine(ops)
    capture["on"] = False
    with pytest.raises(ValueError) as e:
        _combine(ops, OTHER)
    msg = str(e.value)
    assert msg.startswith("config='combine ring layout (channels, RDMA slots, NVLink slots, "
                          "record bytes) (2, 8, 4, ") and \
        "must be (2, 4, 4, " in msg and "the layout a CUDA graph captured on this Buffer" in msg, msg
    _combine(ops)
    ops.dispatch(**_cached(config=OTHER))
    assert _kinds(fake) == ["Combine", "Combine", "Dispatch"]
