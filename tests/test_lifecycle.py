"""explicitly_destroy (DeepEP V1): who frees a Buffer, and when. CPU only.

FakeBuffer stands in for epgen.Buffer (which needs GPUs): it has the three members the
lifecycle rules read and records the order of its destroy() calls. The GPU conformance test
checks the same rules on real Buffers.
"""
import warnings
import weakref

import pytest

from epgen import lifecycle


class FakeBuffer:
    def __init__(self, log, name, explicitly_destroy):
        self.log, self.name, self.rank = log, name, 0
        self.explicitly_destroy = explicitly_destroy
        self._destroyed = False

    def destroy(self):
        self.log.append(self.name)
        self._destroyed = True


@pytest.fixture
def fresh(monkeypatch):
    hooks = []
    monkeypatch.setattr(lifecycle, "_live", weakref.WeakKeyDictionary())
    monkeypatch.setattr(lifecycle, "_hook_registered", False)
    monkeypatch.setattr(lifecycle, "_exiting", False)
    monkeypatch.setattr(lifecycle.atexit, "register", hooks.append)
    return hooks


def test_without_explicitly_destroy_collection_frees(fresh):
    log = []
    buf = FakeBuffer(log, "a", explicitly_destroy=False)
    lifecycle.track(buf)
    lifecycle.collected(buf)
    assert log == ["a"]
    lifecycle.collected(buf)          # already freed: nothing more
    assert log == ["a"]


def test_with_explicitly_destroy_collection_reports_and_does_not_free(fresh):
    log = []
    buf = FakeBuffer(log, "a", explicitly_destroy=True)
    lifecycle.track(buf)
    with pytest.warns(ResourceWarning, match="explicitly_destroy=True.*without destroy"):
        lifecycle.collected(buf)
    assert log == []


def test_exit_frees_the_implicit_ones_in_creation_order_and_reports_the_rest(fresh):
    log = []
    bufs = [FakeBuffer(log, n, e) for n, e in (("a", False), ("b", True), ("c", False),
                                               ("d", False))]
    for b in bufs:
        lifecycle.track(b)
    bufs[3].destroy()                 # destroyed by hand: left alone at exit
    log.clear()
    assert fresh == [lifecycle.at_exit], "the exit hook is registered once, at the first Buffer"
    with pytest.warns(ResourceWarning, match="left at exit"):
        lifecycle.at_exit()
    assert log == ["a", "c"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lifecycle.collected(bufs[1])  # after exit, collection does nothing (no warning, no free)
    assert log == ["a", "c"]
