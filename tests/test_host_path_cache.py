"""The per-call host path keeps what a call's shapes decide (checked shapes, specs, argument
struct templates: issue 15 item 4); these check that what it keeps never lets a bad call
through, never launches a stale pointer, and still reads EPGEN_TIMEOUT_S at each launch.
CPU only: the FAKE launch of tests/fake_launch.py."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epgen import variants
from epgen.config import Config
from epgen.env import EnvError
from epgen.ops.context import check_tensor
from tests.fake_launch import (cached_handle, fake_cuda, fake_intranode_ops, fake_ll_ops,
                               ll_combine_inputs, no_graph_capture)

R, M, H, E, K = 2, 16, 256, 16, 4


@pytest.fixture
def ll_call(monkeypatch):
    monkeypatch.delenv(variants.COMBINE_ENV, raising=False)
    ops, fake = fake_ll_ops(R, M, H, E)
    y, idx, w, handle = ll_combine_inputs(ops, fake, M, H, E, K)
    return ops, fake, dict(x=y, topk_idx=idx, topk_weights=w, handle=handle)


def _combine(ops, fake, **kw):
    ops.low_latency_combine(**kw)
    got, fake.launches[:] = list(fake.launches), []
    return got


def test_checked_shapes_are_keyed_by_type(ll_call):
    """True == 1 and 8.0 == 8 as dict keys: a shape that passed must not let its look-alike
    of another type through (DeepEP's ints only)."""
    ops, fake, kw = ll_call
    ops._check_common(1, H, E, K)
    with pytest.raises(ValueError, match=r"num_max_dispatch_tokens_per_rank=True: must be an int"):
        ops._check_common(True, H, E, K)
    bad = (*kw["handle"][:2], True, H, E)
    with pytest.raises(ValueError, match=r"num_max_dispatch_tokens_per_rank=True"):
        _combine(ops, fake, **{**kw, "handle": bad})
    assert fake.launches == []


@pytest.mark.parametrize("change, match", [
    (lambda kw: {"topk_weights": fake_cuda(kw["topk_weights"][:, :2].contiguous())},
     r"topk_weights.shape=\(16, 2\): must be \(16, 4\)"),
    (lambda kw: {"topk_weights": fake_cuda(kw["topk_weights"].double())}, r"topk_weights.dtype=torch.float64"),
    (lambda kw: {"x": fake_cuda(kw["x"].transpose(0, 1))}, r"x.shape="),
    (lambda kw: {"x": fake_cuda(torch.zeros(kw["x"].numel() + 8, dtype=torch.bfloat16)
                                [1:1 + kw["x"].numel()].view(kw["x"].shape))},
     r"x.data_ptr\(\)='0x[0-9a-f]+': must be 16-byte aligned"),
    (lambda kw: {"topk_idx": fake_cuda(torch.zeros(M, 64, dtype=torch.int64))},
     r"topk_idx.shape\[1\]=64"),
    (lambda kw: {"handle": (fake_cuda(kw["handle"][0][:, :-1]), *kw["handle"][1:])},
     r"handle\[0\] \(recv_src_info\).shape"),
])
def test_a_bad_call_after_a_good_one_gets_the_same_error(ll_call, change, match):
    ops, fake, kw = ll_call
    bad = {**kw, **change(kw)}
    cold = fake_ll_ops(R, M, H, E)[0]
    with pytest.raises(ValueError, match=match) as first:
        cold.low_latency_combine(**bad)          # never made a call: nothing kept
    assert len(_combine(ops, fake, **kw)) == 2   # warm: its shapes kept
    with pytest.raises(ValueError, match=match) as again:
        _combine(ops, fake, **bad)
    assert str(again.value) == str(first.value) and fake.launches == []


@pytest.mark.parametrize("kw, match", [
    (dict(use_fp8=False, round_scale=True), r"round_scale=True: needs use_fp8=True"),
    (dict(round_scale=False, use_ue8m0=True), r"use_ue8m0=True: needs round_scale=True"),
    (dict(use_fp8=1), None),                 # 1 == True as a key: still DeepEP's flags' rules
    (dict(wire_format="mxfp8", use_fp8=False, round_scale=True),
     r"round_scale=True: needs use_fp8=True"),
    (dict(wire_format=["mxfp8"]), r"wire_format"),           # unhashable: refused, not cached
    (dict(use_fp8=False, recv_scale_layout="deepgemm"), r"recv_scale_layout='deepgemm': bf16"),
])
def test_a_dispatch_format_that_passed_is_kept_and_a_bad_one_refused_each_time(kw, match):
    """The format arguments and shapes are resolved once per combination (LowLatencyOps.
    _dispatch_specs): a good call's entry serves the next; a bad combination raises at every
    call, with the same message, before any launch."""
    ops, fake = fake_ll_ops(R, M, H, E)
    x = fake_cuda(torch.randn(M, H).to(torch.bfloat16))
    idx = fake_cuda(torch.randn(M, E).topk(K, dim=-1).indices)
    ops.low_latency_dispatch(x, idx, M, E)
    kept = dict(ops._dispatch_specs)
    fake.launches.clear()
    if match is None:
        ops.low_latency_dispatch(x, idx, M, E, **kw)
        assert len(ops._dispatch_specs) == len(kept) + 1 and len(fake.launches) == 2
        return
    errors = []
    for _ in range(2):
        with pytest.raises((ValueError, TypeError), match=match) as e:
            ops.low_latency_dispatch(x, idx, M, E, **kw)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and fake.launches == [] and ops._dispatch_specs == kept
    ops.low_latency_dispatch(x, idx, M, E)                    # the kept entry still serves
    assert len(fake.launches) == 2 and ops._dispatch_specs == kept


def test_each_call_launches_its_own_pointers(ll_call):
    """The struct template holds the shapes' fields only: a call with other tensors launches
    their addresses, and the receive hook launches its own call's struct, however many
    calls were filled after it."""
    ops, fake, kw = ll_call
    outs = [fake_cuda(torch.empty(M, H, dtype=torch.bfloat16)) for _ in range(2)]
    hooks = []
    for out in outs:
        _, _, hook = ops.low_latency_combine(**kw, out=out, return_recv_hook=True)
        hooks.append(hook)
    sends, fake.launches[:] = list(fake.launches), []
    for hook in hooks:
        hook()
    recvs = list(fake.launches)
    assert [a.out for _, a in sends] == [a.out for _, a in recvs] == [o.data_ptr() for o in outs]
    assert [a.phases for _, a in sends + recvs] == [1, 1, 2, 2]
    assert sends[0][1].call_epoch != sends[1][1].call_epoch


def test_zero_copy_sends_the_combine_buffer(ll_call):
    ops, fake, kw = ll_call
    buf = ops.get_next_low_latency_combine_buffer(kw["handle"])
    (_, send), _ = _combine(ops, fake, **kw, zero_copy=True)
    (_, plain), _ = _combine(ops, fake, **kw)
    assert (send.x, send.zero_copy) == (buf.data_ptr(), 1)
    assert (plain.x, plain.zero_copy) == (kw["x"].data_ptr(), 0)


def test_timeout_read_at_each_launch(ll_call, monkeypatch):
    ops, fake, kw = ll_call
    for s in ("5", "7.5", "5"):
        monkeypatch.setenv("EPGEN_TIMEOUT_S", s)
        assert {a.timeout_ns for _, a in _combine(ops, fake, **kw)} == {int(float(s) * 1e9)}
    monkeypatch.setenv("EPGEN_TIMEOUT_S", "-1")
    for _ in range(2):                                   # refused every time, not once
        with pytest.raises(EnvError, match=r"EPGEN_TIMEOUT_S='-1'"):
            _combine(ops, fake, **kw)
    assert fake.launches == []


# -- normal mode: a cached dispatch and a combine ---------------------------------------------
T, NH = 8, 256


@pytest.fixture
def normal():
    with no_graph_capture():
        cfg = Config(4, 8, 256, 6, 128)
        ops, fake, handle = fake_intranode_ops(R, T, NH, cfg)
        x = fake_cuda(torch.randn(T, NH).to(torch.bfloat16))
        y = fake_cuda(torch.randn(R * T, NH).to(torch.bfloat16))
        yield ops, fake, handle, cfg, x, y


def _dispatch(ops, x, handle, cfg):
    return ops.dispatch(x, handle, None, None, None, None, None, None, 1, 0, cfg, None, False,
                        False)


def test_normal_calls_one_launch_each_with_their_own_pointers(normal):
    ops, fake, handle, cfg, x, y = normal
    for _ in range(2):
        recv = _dispatch(ops, x, handle, cfg)[0]
        out = ops.combine(y, handle, None, None, cfg, None, False, False)[0]
        (_, d), (_, c) = fake.launches
        fake.launches.clear()
        assert (d.x, d.recv_x, d.num_recv_rows, d.num_tokens, d.cap) == (
            x.data_ptr(), recv.data_ptr(), R * T, T, 128)
        assert (c.x, c.combined_x, c.num_tokens, c.ring_offset - d.ring_offset) == (
            y.data_ptr(), out.data_ptr(), T, ops._half()[0])
        assert d.peers == c.peers == ops.ctx.peer_table("nvl").data_ptr() != 0


def test_argument_templates_do_not_grow_with_token_counts(normal, ll_call):
    """The struct templates are kept per ring layout / region layout, never per token count:
    counts vary from call to call (a key per count grew the host's memory ~330 B a call in the
    session-14 soak's 100,000 normal pairs). Each launch still carries its own counts."""
    ops, fake, _, cfg, _, _ = normal
    kept = None
    for t in range(1, 25):
        handle = cached_handle(R, t)
        recv = _dispatch(ops, fake_cuda(torch.randn(t, NH).to(torch.bfloat16)), handle, cfg)[0]
        ops.combine(fake_cuda(torch.randn(R * t, NH).to(torch.bfloat16)), handle, None, None,
                    cfg, None, False, False)
        (_, d), (_, c) = fake.launches
        fake.launches.clear()
        assert (d.num_tokens, d.num_recv_rows, c.num_tokens) == (t, R * t, t)
        assert recv.shape[0] == R * t
        kept = kept or len(ops.ctx._arg_templates)
        assert len(ops.ctx._arg_templates) == kept == 2
    ll, ll_fake, kw = ll_call
    before = None
    for n in range(1, M + 1):
        launches = _combine(ll, ll_fake, **{**kw, "topk_idx": fake_cuda(kw["topk_idx"][:n]),
                                          "topk_weights": fake_cuda(kw["topk_weights"][:n])})
        assert {a.num_tokens for _, a in launches} == {n}
        before = before or len(ll.ctx._arg_templates)
        assert len(ll.ctx._arg_templates) == before


@pytest.mark.parametrize("mutate, match", [
    (lambda cfg: setattr(cfg, "num_sms", 200), r"config.num_sms=200: must be even"),
    (lambda cfg: setattr(cfg, "num_max_nvl_chunked_recv_tokens", 1 << 20),
     r"num_nvl_bytes=\d+: dispatch with 4 channels"),
])
def test_normal_config_checked_after_a_good_call(normal, mutate, match):
    """Config is a mutable dataclass: a checked configuration is kept by its fields' values,
    never by the object."""
    ops, fake, handle, cfg, x, y = normal
    _dispatch(ops, x, handle, cfg)
    mutate(cfg)
    fake.launches.clear()
    with pytest.raises(ValueError, match=match):
        _dispatch(ops, x, handle, cfg)
    assert fake.launches == []


def test_normal_combine_bad_inputs_after_a_good_call(normal):
    ops, fake, handle, cfg, x, y = normal
    ops.combine(y, handle, None, None, cfg, None, False, False)
    fake.launches.clear()
    with pytest.raises(ValueError, match=r"x.shape=\(8, 256\): must be \[16, hidden\]"):
        ops.combine(fake_cuda(y[:T]), handle, None, None, cfg, None, False, False)
    with pytest.raises(ValueError, match=r"x.shape\[1\]=100: must be a multiple of 8"):
        ops.combine(fake_cuda(torch.zeros(R * T, 100, dtype=torch.bfloat16)), handle, None, None,
                    cfg, None, False, False)
    with pytest.raises(ValueError, match=r"handle\[1\].shape=\(1,\)"):
        ops.combine(y, (handle[0], fake_cuda(handle[1][:1]), *handle[2:]), None, None, cfg, None, False,
                    False)
    assert fake.launches == []


# -- check_tensor: the passing case in one expression, the same verdicts ----------------------
@settings(max_examples=120, deadline=None)
@given(dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.int64]),
       want=st.sampled_from([torch.bfloat16, torch.float32]),
       rows=st.integers(0, 3), cols=st.integers(1, 16), offset=st.integers(0, 9),
       transpose=st.booleans(), shape_ok=st.booleans(), contiguous=st.booleans(),
       align=st.sampled_from([0, 16]), cuda=st.booleans())
def test_check_tensor_verdicts(dtype, want, rows, cols, offset, transpose, shape_ok, contiguous,
                               align, cuda):
    base = torch.zeros(rows * cols + offset + 16, dtype=dtype)
    t = base[offset:offset + rows * cols].view(rows, cols)
    if transpose:
        t = t.t()
    if cuda:
        t = fake_cuda(t)
    shape = tuple(t.shape) if shape_ok else (rows + 1, cols)
    rule = (None if dtype == want else "dtype") or (None if cuda else "device") or \
        (None if shape_ok else "shape") or \
        (None if not contiguous or t.is_contiguous() else "non-contiguous") or \
        (None if not align or not t.numel() or t.data_ptr() % align == 0 else "aligned")
    if rule is None:
        check_tensor("t", t, want, shape, contiguous=contiguous, align=align)
        return
    with pytest.raises(ValueError, match=rf"^t.*{rule}"):
        check_tensor("t", t, want, shape, contiguous=contiguous, align=align)


def test_kernel_launch_checks_its_result(monkeypatch):
    """Kernel.launch builds its error message only on failure; a failure still raises naming
    the kernel and the driver's error (FAKE driver: no GPU here)."""
    import enum

    from epgen.jit.kernel_args import LowLatencyBarrierArgs
    from epgen.runtime import cuda, module

    class FakeResult(enum.Enum):
        CUDA_SUCCESS = 0
        CUDA_ERROR_LAUNCH_FAILED = 719

    class FakeDriver:
        CUresult = FakeResult
        ret = (FakeResult.CUDA_SUCCESS,)

        def __init__(self):
            self.calls = []

        def cuLaunchKernel(self, *a):
            self.calls.append(a)
            return self.ret

        def cuGetErrorString(self, err):
            return FakeResult.CUDA_SUCCESS, b"unspecified launch failure"

    fake = FakeDriver()
    monkeypatch.setattr(module, "driver", lambda: fake)
    monkeypatch.setattr(cuda, "driver", lambda: fake)
    k = module.Kernel(7, "epgen_k")
    k.launch(3, 128, LowLatencyBarrierArgs(), 5)
    assert fake.calls[0][:9] == (7, 3, 1, 1, 128, 1, 1, 0, 5)
    fake.ret = (FakeResult.CUDA_ERROR_LAUNCH_FAILED,)
    with pytest.raises(cuda.CudaError, match=r"launch epgen_k: CUDA_ERROR_LAUNCH_FAILED "
                                             r"\(unspecified launch failure\)"):
        k.launch(3, 128, LowLatencyBarrierArgs(), 5)


def test_the_cpu_host_path_bench_runs(capsys):
    """bench/host_path_cpu.py drives the ops' internals by name (its parts tables); a rename
    there broke it unnoticed once (`_check_graph_layout`), so it runs here, briefly."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "host_path_cpu.py")
    spec = importlib.util.spec_from_file_location("host_path_cpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--calls", "1", "--batches", "2"])
    out = capsys.readouterr().out
    for title in ("LL dispatch", "LL combine per_expert", "LL combine per_rank",
                  "Normal cached dispatch", "Normal combine"):
        assert title in out, out
