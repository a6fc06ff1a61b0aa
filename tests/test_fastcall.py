"""The host fast lane (epgen/runtime/fastcall.py, .cpp) on CPU: the real C++ module, compiled here,
replaying real ops' calls against the FAKE driver and streams of tests/fake_launch.py. A
replayed call must launch exactly what the Python path launches for the same arguments, and
anything that differs from the recorded call must take the Python path."""
import ctypes
import os
import shutil

import pytest
import torch

from epgen.jit.kernel_args import LowLatencyCombineArgs, LowLatencyDispatchArgs
from epgen.ops import plans
from epgen.runtime import fastcall
from tests.fake_launch import (FakeDriver, FakeStreams, fake_cuda,
                               fake_intranode_ops, fake_ll_ops, ll_combine_inputs,
                               no_graph_capture)

R, M, H, E, K = 2, 16, 256, 16, 4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The module compiled once (~20 s against torch's headers) for every test here."""
    root = str(tmp_path_factory.mktemp("fastcall_cache"))
    return root, fastcall.build(root)


def _copy_built(built, root):
    """The module `built` compiled, as a verified entry of the cache at root."""
    src = built[1]
    dst = fastcall.library_path(str(root))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    for suffix in ("", ".sha256"):
        shutil.copyfile(src + suffix, dst + suffix)
    return dst


@pytest.fixture
def driver(built, tmp_path, monkeypatch):
    """The C++ module in a fresh cache (a copy of the one `built` compiled), its driver the
    FAKE one."""
    _copy_built(built, tmp_path)
    monkeypatch.setenv("EPGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("EPGEN_FASTCALL", raising=False)
    monkeypatch.delenv("EPGEN_TIMEOUT_S", raising=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)   # FAKE
    fastcall.reset_for_test()
    fake = FakeDriver()
    assert fastcall.native(set_driver=fake.install) is not None, fastcall.status()
    yield fake
    fastcall.reset_for_test()


def _lane(ops):
    """ops' context given the fake stream state the C module reads and a fake raw stream."""
    ctx = ops.ctx
    ctx.__dict__["streams"] = FakeStreams()
    ctx.__dict__["current_raw_stream"] = lambda: 0x77
    return ctx


def _fields(struct_type, data):
    s = struct_type.from_buffer_copy(data)
    return {name: getattr(s, name) for name, _ in struct_type._fields_}


def _python_launches(ops, fake, fn):
    """What the Python path launches for fn() (the fast lane's Plans set aside)."""
    saved, ops._plans._plans = ops._plans._plans, {}
    fake.launches.clear()
    try:
        result = fn()
    finally:
        ops._plans._plans = saved
    return result, [bytes(a) for _, a in fake.launches]


@pytest.mark.parametrize("grids_overlap", [True, False], ids=["mps-shared", "own-gpu"])
def test_ll_combine_replayed_exactly(driver, grids_overlap):
    """Send and receive apart (ranks' grids overlapping on a GPU) or one launch of both."""
    ops, fake = fake_ll_ops(R, M, H, E, grids_overlap=grids_overlap)
    _lane(ops)
    n = 2 if grids_overlap else 1
    y, idx, w, handle = ll_combine_inputs(ops, fake, M, H, E, K)
    ops.low_latency_combine(y, idx, w, handle)           # the Python path: records a Plan
    assert len(fake.launches) == n and not driver.launches
    # fresh inputs of the same shapes: replayed from C
    y2, idx2, w2 = (fake_cuda(t.clone()) for t in (y, idx, w))
    out, event, hook = ops.low_latency_combine(y2, idx2, w2, handle)
    assert len(fake.launches) == n and len(driver.launches) == n
    assert (ops._plans.replayed, ops._plans.missed) == (1, 0)
    assert [(st, smem) for _, _, _, smem, st, _ in driver.launches] == [(0x77, 0)] * n
    assert driver.records == [(FakeStreams().sync_done.cuda_event, 0x77)]
    assert ops.ctx.streams.compute_pending and ops.ctx.streams.sync_stream == 0x77
    assert out.shape == (M, H) and out.dtype == torch.bfloat16 and event.event is None
    assert hook() is None
    (py_out, _, _), want = _python_launches(ops, fake, lambda: ops.low_latency_combine(
        y2, idx2, w2, handle))
    assert len(want) == n
    for (_, _, _, _, _, got), exp in zip(driver.launches, want):
        g, e = _fields(LowLatencyCombineArgs, got), _fields(LowLatencyCombineArgs, exp)
        assert g.pop("out") == out.data_ptr() and e.pop("out") == py_out.data_ptr()
        assert g == e
        # apart: the receive reads the epoch from the Buffer's word; fused: from its own send
        assert (g["call_epoch"] != 0) == grids_overlap
        assert g["x"] == y2.data_ptr() and g["topk_idx"] == idx2.data_ptr()


def test_timed_replays_report_their_stages(driver):
    """Plan.timed(args, n): n real replays (each launches), nanoseconds per stage; None where
    the arguments do not match (nothing launched)."""
    ops, fake = fake_ll_ops(R, M, H, E, grids_overlap=False)
    _lane(ops)
    y, idx, w, handle = ll_combine_inputs(ops, fake, M, H, E, K)
    seen = []
    run = ops._plans.run
    ops._plans.run = lambda key, args: seen.append((key, args)) or run(key, args)
    ops.low_latency_combine(y, idx, w, handle)           # the Python path: records a Plan
    key, args = seen[-1]
    plan = ops._plans._plans[key]
    ns = plan.timed(args, 3)
    assert len(driver.launches) == 3 and len(driver.records) == 3
    assert len(ns) == 5 and all(type(v) is int and v >= 0 for v in ns) and sum(ns) > 0
    wrong = (fake_cuda(y[:, :M]),) + args[1:]
    assert plan.timed(wrong, 2) is None and len(driver.launches) == 3


def test_replayed_outputs_come_from_at_empty_where_torch_fills_them(driver):
    """A replay allocates its later outputs from the first one's allocator without the
    dispatcher, except where at::empty would do more: with torch's deterministic fill of
    uninitialized memory on, a replayed output is filled (NaN) as torch.empty's is."""
    ops, fake = fake_ll_ops(R, M, H, E, grids_overlap=False)
    _lane(ops)
    y, idx, w, handle = ll_combine_inputs(ops, fake, M, H, E, K)
    ops.low_latency_combine(y, idx, w, handle)           # the Python path: records a Plan
    for _ in range(2):                                   # at::empty, then the allocator's
        out, _, _ = ops.low_latency_combine(y, idx, w, handle)
        assert out.shape == (M, H) and out.dtype == torch.bfloat16 and out.is_contiguous()
        assert not out.requires_grad and out.untyped_storage().nbytes() == M * H * 2
    assert ops._plans.replayed == 2
    fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        out, _, _ = ops.low_latency_combine(y, idx, w, handle)
        assert ops._plans.replayed == 3 and out.isnan().all()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def test_ll_combine_anything_else_takes_the_python_path(driver):
    ops, fake = fake_ll_ops(R, M, H, E)
    _lane(ops)
    y, idx, w, handle = ll_combine_inputs(ops, fake, M, H, E, K)
    ops.low_latency_combine(y, idx, w, handle)
    fake.launches.clear()
    others = {
        "weights dtype": lambda: ops.low_latency_combine(y, idx, fake_cuda(w.double()), handle),
        "x not contiguous": lambda: ops.low_latency_combine(
            fake_cuda(y.transpose(1, 2).contiguous().transpose(1, 2)), idx, w, handle),
        "x misaligned": lambda: ops.low_latency_combine(
            fake_cuda(torch.empty(y.numel() + 1, dtype=y.dtype)[1:].view(y.shape)), idx, w,
            handle),
        "handle ints": lambda: ops.low_latency_combine(y, idx, w, (*handle[:2], M, H, E * 2)),
        "handle bool for int": lambda: ops.low_latency_combine(y, idx, w, (*handle[:4], True)),
        "a flag": lambda: ops.low_latency_combine(y, idx, w, handle, zero_copy=True),
    }
    for what, call in others.items():
        n = len(driver.launches)
        try:
            call()
        except (ValueError, TypeError):
            pass                         # the Python path's own error
        assert len(driver.launches) == n, what
    # the Python path's errors are the ones it always raised
    with pytest.raises(ValueError, match=r"topk_weights.dtype"):
        ops.low_latency_combine(y, idx, fake_cuda(w.double()), handle)
    # another token count: a Plan of its own
    ops.low_latency_combine(y, fake_cuda(idx[:5]), fake_cuda(w[:5]), handle)
    n = len(driver.launches)
    ops.low_latency_combine(y, fake_cuda(idx[:5].clone()), fake_cuda(w[:5].clone()), handle)
    assert len(driver.launches) == n + 2


def test_replay_refuses_the_states_scope_handles(driver, monkeypatch):
    """Stream state the synchronous branch does not cover, a capture, a reported error or a
    changed EPGEN_TIMEOUT_S: the Python path (which joins, resets, raises or re-reads). A GPU
    of its own: each combine is one launch with both phases."""
    ops, fake = fake_ll_ops(R, M, H, E, grids_overlap=False)
    ctx = _lane(ops)
    y, idx, w, handle = ll_combine_inputs(ops, fake, M, H, E, K)
    ops.low_latency_combine(y, idx, w, handle)
    order = ctx.streams

    def replays():
        n = len(driver.launches)
        ops.low_latency_combine(y, idx, w, handle)
        return len(driver.launches) > n

    assert replays()
    for attr, value in (("comm_busy", True), ("_captured", True), ("sync_stream", 0x78)):
        old = getattr(order, attr)
        setattr(order, attr, value)
        assert not replays(), attr
        setattr(order, attr, old)
    assert replays()
    driver.capturing = 1
    assert not replays()
    driver.capturing = 0
    order.sync_done.cuda_event = 0          # an event torch has not created yet
    assert not replays()
    order.sync_done.cuda_event = 0x5e
    monkeypatch.setenv("EPGEN_TIMEOUT_S", "7")
    assert not replays()                     # the Python path, which records the new deadline
    assert replays()
    assert _fields(LowLatencyCombineArgs, driver.launches[-1][-1])["timeout_ns"] == 7 * 10**9
    monkeypatch.setenv("EPGEN_LL_COMBINE", "per_rank")     # read at each call, as before
    assert not replays()
    n = len(driver.launches)
    assert replays() and len(driver.launches) == n + 1      # per_rank: one launch too


def test_replay_stops_at_a_reported_error(driver):
    ops, fake = fake_ll_ops(R, M, H, E)
    _lane(ops)
    word = (ctypes.c_int32 * 5)()

    class ReportingWord:
        """FAKE: an error word the test sets."""
        device_ptr = 0
        code_address = ctypes.addressof(word)

        def check(self):
            if word[0]:
                raise RuntimeError("reported")
    ops.ctx.errors = ReportingWord()
    y, idx, w, handle = ll_combine_inputs(ops, fake, M, H, E, K)
    ops.low_latency_combine(y, idx, w, handle)
    word[0] = 3
    with pytest.raises(RuntimeError, match="reported"):
        ops.low_latency_combine(y, idx, w, handle)


def test_failed_launch_raises_naming_the_kernel(driver):
    from epgen.runtime.cuda import CudaError
    ops, fake = fake_ll_ops(R, M, H, E)
    _lane(ops)
    y, idx, w, handle = ll_combine_inputs(ops, fake, M, H, E, K)
    ops.low_latency_combine(y, idx, w, handle)
    driver.launch_result = 719
    with pytest.raises(CudaError, match=r"launch ll_combine.*CUDA error 719"):
        ops.low_latency_combine(y, idx, w, handle)


def _storage(t):
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("grids_overlap", [True, False], ids=["mps-shared", "own-gpu"])
def test_ll_dispatch_fp8_replayed_with_its_scale_view(driver, grids_overlap):
    """Two allocations a call, Python path and replay alike: rows + scales, the handle's
    metadata + counts (ops/outputs.carve); the launches the Python path's."""
    ops, fake = fake_ll_ops(R, M, H, E, grids_overlap=grids_overlap)
    _lane(ops)
    g = torch.Generator().manual_seed(1)
    x = fake_cuda(torch.randn(M, H, generator=g).to(torch.bfloat16))
    idx = fake_cuda(torch.randn(M, E, generator=g).topk(K, dim=-1).indices)
    first = ops.low_latency_dispatch(x, idx, M, E)
    x2, idx2 = fake_cuda(x.clone()), fake_cuda(idx.clone())
    (rx, sc), count, handle, event, hook = ops.low_latency_dispatch(x2, idx2, M, E)
    assert len(driver.launches) == (2 if grids_overlap else 1)
    (frx, fsc), fcount, fhandle = first[0], first[1], first[2]
    for got, want in ((rx, frx), (sc, fsc), (count, fcount), (handle[0], fhandle[0]),
                      (handle[1], fhandle[1])):
        assert (got.shape, got.stride(), got.dtype) == (want.shape, want.stride(), want.dtype)
        assert got.data_ptr() != want.data_ptr()
        for t in (got, want):        # each part at a 256-byte offset of its block
            assert (t.data_ptr() - _storage(t)) % 256 == 0
    for r in (first, ((rx, sc), count, handle)):
        (a, b), c, (d, e, *_) = r[:3]
        assert _storage(a) == _storage(b) != _storage(c) == _storage(d) == _storage(e)
    assert rx.untyped_storage().nbytes() >= rx.numel() + sc.numel() * 4
    assert handle[2:] == fhandle[2:]
    _, want = _python_launches(ops, fake, lambda: ops.low_latency_dispatch(x2, idx2, M, E))
    skip = {"recv_x", "recv_scales", "recv_src_info", "recv_layout_range", "recv_count",
            "call_epoch"}
    assert len(want) == len(driver.launches)
    for (_, _, _, _, _, got), exp in zip(driver.launches, want):
        g, e = _fields(LowLatencyDispatchArgs, got), _fields(LowLatencyDispatchArgs, exp)
        assert g["recv_x"] == rx.data_ptr() and g["recv_scales"] == sc.data_ptr()
        assert g["recv_src_info"] == handle[0].data_ptr() and g["recv_count"] == count.data_ptr()
        assert g["recv_layout_range"] == handle[1].data_ptr()
        assert {k: v for k, v in g.items() if k not in skip} == \
            {k: v for k, v in e.items() if k not in skip}


@pytest.mark.parametrize("kw", [
    dict(use_fp8=False), dict(recv_scale_layout="deepgemm"),
    dict(round_scale=True, use_ue8m0=True),
    dict(wire_format="mxfp8", recv_scale_layout="cutlass_128x4"),
    dict(wire_format="nvfp4", recv_scale_layout="cutlass_128x4")],
    ids=["bf16", "deepgemm", "ue8m0", "mxfp8-cutlass", "nvfp4-cutlass"])
def test_ll_dispatch_formats_replayed_as_the_python_path_returns_them(driver, kw):
    """Every returned tensor (rows, scales views with their strides, NVFP4's global scales) made
    by the replay as the Python path made it, at the addresses the launch was given."""
    ops, fake = fake_ll_ops(R, M, H, E)
    _lane(ops)
    g = torch.Generator().manual_seed(2)
    x = fake_cuda(torch.randn(M, H, generator=g).to(torch.bfloat16))
    idx = fake_cuda(torch.randn(M, E, generator=g).topk(K, dim=-1).indices)
    first = ops.low_latency_dispatch(x, idx, M, E, **kw)
    again = ops.low_latency_dispatch(fake_cuda(x.clone()), fake_cuda(idx.clone()), M, E, **kw)
    assert (ops._plans.replayed, ops._plans.missed) == (1, 0)

    def tensors(r):
        out = r[0] if isinstance(r[0], tuple) else (r[0],)
        return [*out, r[1], r[2][0], r[2][1]]
    for got, want in zip(tensors(again), tensors(first), strict=True):
        assert (got.shape, got.stride(), got.dtype, got.storage_offset()) == \
            (want.shape, want.stride(), want.dtype, want.storage_offset())
        assert got.untyped_storage().nbytes() == want.untyped_storage().nbytes()
    fields = _fields(LowLatencyDispatchArgs, driver.launches[-1][-1])
    rows, *scales = tensors(again)[:-3]
    assert fields["recv_x"] == rows.data_ptr()
    assert fields["recv_scales"] == (scales[0].data_ptr() if scales else 0)


def test_no_replay_across_a_layout_change(driver):
    """A Plan recorded at one hidden size does not replay after a call of another: that call
    must take the Python path, which runs the layout barrier."""
    from epgen.jit.specs import LowLatencyBarrierSpec
    ops, fake = fake_ll_ops(R, M, H, E)
    _lane(ops)
    x = fake_cuda(torch.zeros(M, H, dtype=torch.bfloat16))
    x2 = fake_cuda(torch.zeros(M, H // 2, dtype=torch.bfloat16))
    idx = fake_cuda(torch.randn(M, E).topk(K, dim=-1).indices)
    for _ in range(2):
        ops.low_latency_dispatch(x, idx, M, E, use_fp8=False)
    assert ops._plans.replayed == 1
    ops.low_latency_dispatch(x2, idx, M, E, use_fp8=False)
    fake.launches.clear()
    ops.low_latency_dispatch(x, idx, M, E, use_fp8=False)      # H again: Python path + barrier
    assert ops._plans.replayed == 1
    assert type(fake.launches[0][0]) is LowLatencyBarrierSpec
    ops.low_latency_dispatch(x, idx, M, E, use_fp8=False)      # then replayed again
    assert ops._plans.replayed == 2


def test_a_part_outside_its_block_is_refused_when_the_plan_is_made(driver):
    """fastcall.cpp checks that each part's elements lie inside an earlier fresh uint8 block."""
    mod, dev = fastcall.native(), torch.device("cpu")
    block = ((64,), torch.uint8, dev)

    def plan(*outputs):
        return mod.Plan((), outputs, (), (), None, None, 0, (), (fastcall.RES_CONST, None),
                        len(outputs))
    plan(block, ((4, 4), torch.int32, dev, 0, 0, (4, 1)), ((4, 2), torch.float32, dev, 0, 32,
                                                          (1, 4)))
    for bad in (((4, 4), torch.int32, dev, 0, 4, (4, 1)),   # 4 + 64 bytes > 64
                ((4,), torch.int32, dev, 0, 2, (1,)),       # not a multiple of the element size
                ((4,), torch.int32, dev, 0, 0, (8,)),       # its last element at byte 96
                ((4,), torch.int32, dev, 0, 0, (1, 1)),     # strides for another rank
                ((4,), torch.int32, dev, 1, 0, (1,))):      # its own slot, not an earlier block
        with pytest.raises(ValueError, match="not a tensor inside an earlier block"):
            plan(block, bad)
    with pytest.raises(ValueError, match="not a tensor inside an earlier block"):
        plan(((16,), torch.int32, dev), ((4,), torch.int32, dev, 0, 0, (1,)))   # not uint8
    with pytest.raises(ValueError, match="result slot 1 outside the slots"):
        mod.Plan((), (block,), (), (), None, None, 0, (), (fastcall.RES_SLOT, 1), 1)


def test_normal_cached_dispatch_and_combine_replayed(driver):
    from epgen.config import Config
    from epgen.jit.kernel_args import NormalCombineArgs, NormalDispatchArgs
    T, cfg = 8, Config(20, 6, 256)
    with no_graph_capture():
        ops, fake, handle = fake_intranode_ops(R, T, H, cfg)
        _lane(ops)
        x = fake_cuda(torch.randn(T, H).to(torch.bfloat16))
        args = (None, None, None, None, None, None, 1, 0, cfg, None, False, False)
        ops.dispatch(x, handle, *args)
        x2 = fake_cuda(x.clone())
        recv = ops.dispatch(x2, handle, *args)
        assert len(driver.launches) == 1
        assert recv[0].shape == (R * T, H) and recv[1:5] == (None,) * 4
        _, [want] = _python_launches(ops, fake, lambda: ops.dispatch(x2, handle, *args))
        g, e = (_fields(NormalDispatchArgs, b) for b in (driver.launches[0][-1], want))
        assert g.pop("recv_x") == recv[0].data_ptr()
        e.pop("recv_x")
        assert g == e and g["x"] == x2.data_ptr()
        # another ring layout in between: the rings switched, the next call takes the
        # Python path (which runs the barrier) and records anew
        y = fake_cuda(torch.randn(R * T, H).to(torch.bfloat16))
        ops.combine(y, handle, None, None, cfg, None, False, False)
        ops.combine(fake_cuda(y.clone()), handle, None, None, cfg, None, False, False)
        assert len(driver.launches) == 2
        g = _fields(NormalCombineArgs, driver.launches[1][-1])
        assert g["is_token_in_rank"] == handle[4].data_ptr()
        other = Config(20, 6, 128)
        ops.dispatch(x2, handle, *args[:8], other, *args[9:])
        n = len(driver.launches)
        ops.dispatch(x2, handle, *args)      # the layout changed since its Plan: Python path
        assert len(driver.launches) == n
        ops.dispatch(x2, handle, *args)
        assert len(driver.launches) == n + 1


def test_no_plan_for_async_hooked_or_captured_calls(driver):
    ops, fake = fake_ll_ops(R, M, H, E)
    _lane(ops)
    y, idx, w, handle = ll_combine_inputs(ops, fake, M, H, E, K)
    ops.low_latency_combine(y, idx, w, handle, return_recv_hook=True)[2]()
    ops.low_latency_combine(y, idx, w, handle, async_finish=True)
    assert not [k for k in ops._plans._plans if k[0] == "combine"]
    ops.low_latency_combine(y, idx, w, handle, return_recv_hook=True)
    assert not driver.launches


def test_plans_are_bounded(driver, monkeypatch):
    """A token count per decode step is a Plan per count: at most Plans.LIMIT are kept."""
    monkeypatch.setattr(plans.Plans, "LIMIT", 4)
    ops, fake = fake_ll_ops(R, M, H, E)
    _lane(ops)
    y, idx, w, handle = ll_combine_inputs(ops, fake, M, H, E, K)
    for t in range(1, M + 1):
        ops.low_latency_combine(y, fake_cuda(idx[:t]), fake_cuda(w[:t]), handle)
        assert len(ops._plans._plans) <= 4
    n = len(driver.launches)
    ops.low_latency_combine(y, fake_cuda(idx[:M]), fake_cuda(w[:M]), handle)
    assert len(driver.launches) == n + 2          # the latest shape's Plan is kept


# -- the module's build ----------------------------------------------------------------------
def test_broken_library_is_rebuilt_not_loaded(built, tmp_path):
    path = _copy_built(built, tmp_path)
    assert fastcall.build(str(tmp_path)) == path        # a verified copy: not compiled again
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 16)
    assert not fastcall._verified(path)
    again = fastcall.build(str(tmp_path))
    assert again == path and fastcall._verified(path)
    assert fastcall._load(path).Plan


def test_off_switch_and_missing_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("EPGEN_CACHE_DIR", str(tmp_path))
    fastcall.reset_for_test()
    monkeypatch.setenv("EPGEN_FASTCALL", "0")
    assert fastcall.native(set_driver=FakeDriver().install) is None
    assert fastcall.status() == "off: EPGEN_FASTCALL=0"
    fastcall.reset_for_test()
    monkeypatch.setenv("EPGEN_FASTCALL", "maybe")
    with pytest.raises(ValueError, match="EPGEN_FASTCALL='maybe'"):
        fastcall.native(set_driver=FakeDriver().install)
    fastcall.reset_for_test()
    monkeypatch.delenv("EPGEN_FASTCALL")
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.warns(RuntimeWarning, match="no C[+][+] compiler"):
        assert fastcall.native(set_driver=FakeDriver().install) is None
    assert fastcall.status().startswith("off: no C++ compiler")
    fastcall.reset_for_test()
    assert not os.listdir(os.path.join(tmp_path, fastcall.HOST_DIR)) if os.path.isdir(
        os.path.join(tmp_path, fastcall.HOST_DIR)) else True


def test_precompile_builds_it_unless_turned_off(built, tmp_path, monkeypatch):
    from epgen.precompile import _build_fast_lane
    path = _copy_built(built, tmp_path)
    monkeypatch.delenv("EPGEN_FASTCALL", raising=False)
    assert _build_fast_lane(str(tmp_path)) == os.path.basename(path)
    monkeypatch.setenv("EPGEN_FASTCALL", "0")
    assert _build_fast_lane(str(tmp_path)).startswith("off (EPGEN_FASTCALL=0)")


def test_without_a_built_module_calls_take_the_python_path_while_it_builds(
        built, tmp_path, monkeypatch):
    """No verified module in the cache: native() starts the build in the background and
    answers None (the Python path) until it has ended, then loads it; a failed build turns the
    lane off with a warning. (build is replaced by a copy of the one `built` compiled, or a
    failure, each let go by the test: the threading is what is tested here.)"""
    import threading
    monkeypatch.setenv("EPGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("EPGEN_FASTCALL", raising=False)
    release = threading.Event()

    def slow_build(root):
        assert release.wait(30)
        return _copy_built(built, root)
    monkeypatch.setattr(fastcall, "build", slow_build)
    fastcall.reset_for_test()
    fake = FakeDriver()
    assert fastcall.native(set_driver=fake.install) is None
    assert fastcall.status().startswith("building ")
    assert fastcall.native(set_driver=fake.install) is None      # still building
    release.set()
    fastcall.wait_for_build_for_test()
    mod = fastcall.native(set_driver=fake.install)
    assert mod is not None and fastcall.status().startswith("loaded ")

    def failing_build(root):
        raise RuntimeError("c++ failed on purpose")
    monkeypatch.setattr(fastcall, "build", failing_build)
    monkeypatch.setenv("EPGEN_CACHE_DIR", str(tmp_path / "other"))
    fastcall.reset_for_test()
    assert fastcall.native(set_driver=fake.install) is None
    fastcall.wait_for_build_for_test()
    with pytest.warns(RuntimeWarning, match="c[+][+] failed on purpose"):
        assert fastcall.native(set_driver=fake.install) is None
    assert fastcall.status() == "off: c++ failed on purpose"
    fastcall.reset_for_test()


class _NoStorage(torch.Tensor):
    """A wrapper subclass: the shape, dtype and device of a tensor, no storage (as torch's
    fake and functional tensors have)."""
    @staticmethod
    def __new__(cls, like):
        return torch.Tensor._make_wrapper_subclass(cls, like.shape, dtype=like.dtype,
                                                   device=like.device, strides=like.stride())

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


def test_a_tensor_at_without_strides_or_storage_does_not_match(driver):
    """A sparse tensor (no strides), a wrapper subclass (a null data pointer) or a meta tensor
    where the Plan recorded a strided CUDA one: no match (ATen throws reading a sparse
    tensor's strides, and a C++ exception out of the module would end the process; a null
    address would reach the kernel)."""
    ops, fake = fake_ll_ops(R, M, H, E)
    _lane(ops)
    y, idx, w, handle = ll_combine_inputs(ops, fake, M, H, E, K)
    ops.low_latency_combine(y, idx, w, handle)
    plan = ops._plans._plans[("combine", idx.shape)]
    rest = (idx, w, handle, False, False, False, False, None, None, None)
    assert plan(y, *rest) is not None                    # the recorded shapes: replayed
    for other in (y.to_sparse(), _NoStorage(y), torch.empty(y.shape, dtype=y.dtype, device="meta")):
        assert plan(other, *rest) is None, other.layout
