"""What a low-latency call launches, on CPU with the FAKE launch of tests/fake_launch.py (real
checks, specs, allocation and argument packing; no GPU)."""
import ctypes

import pytest
import torch

from epgen.kernel_args import LowLatencyCombineArgs, LowLatencyCombineRankArgs
from epgen import variants
from epgen.ops import low_latency as ll
from epgen.specs import LowLatencyCombineRankSpec, LowLatencyCombineSpec
from tests.fake_launch import fake_cuda, fake_ll_ops

R, M, H, E, K = 2, 16, 256, 16, 4


@pytest.fixture(params=[False], ids=["own-gpu"])
def call(request):
    ops, fake = fake_ll_ops(R, M, H, E, gpu_shared=request.param)
    g = torch.Generator().manual_seed(0)
    x = fake_cuda(torch.randn(M, H, generator=g).to(torch.bfloat16))
    idx = fake_cuda(torch.randn(M, E, generator=g).topk(K, dim=-1).indices)
    w = fake_cuda(torch.rand(M, K, generator=g))
    _, _, handle, _, _ = ops.low_latency_dispatch(x, idx, M, E, use_fp8=False)
    handle = (fake_cuda(handle[0]), fake_cuda(handle[1]), *handle[2:])
    y = fake_cuda(torch.zeros(E // R, R * M, H, dtype=torch.bfloat16))
    fake.launches.clear()

    def combine(**kw):
        ops.low_latency_combine(y, idx, w, handle, **kw)
        got, fake.launches[:] = list(fake.launches), []
        return got
    combine.fake = fake
    return combine


def _without_phases(args):
    c = type(args).from_buffer_copy(args)
    c.phases = 0
    return bytes(c)


def test_per_expert_two_launches_one_struct(call, monkeypatch):
    monkeypatch.delenv(variants.COMBINE_ENV, raising=False)
    (s1, send), (s2, recv) = call()
    assert type(s1) is LowLatencyCombineSpec and s1 == s2
    assert type(send) is LowLatencyCombineArgs and (send.phases, recv.phases) == (1, 2)
    assert _without_phases(send) == _without_phases(recv)
    assert send.call_epoch != 0


def test_per_rank_one_fused_launch(call, monkeypatch):
    monkeypatch.setenv(variants.COMBINE_ENV, "per_rank")
    [(spec, a)] = call()
    assert type(spec) is LowLatencyCombineRankSpec and type(a) is LowLatencyCombineRankArgs
    assert a.phases == 3 and a.call_epoch == 0
    assert a.wsig_off == ll.ROUTES_SIG_OFF and a.half_bytes == E * M * 2 * H
    assert ctypes.sizeof(a) > ctypes.sizeof(LowLatencyCombineArgs)


@pytest.mark.parametrize("call", [True], ids=["shared-gpu"], indirect=True)
def test_per_rank_two_launches_where_ranks_share_a_gpu(call, monkeypatch):
    """Under MPS a grid is not kept resident, so the fused launch (whose early blocks wait for
    its late blocks' sends) is split: send then receive, the epoch passed through call_epoch."""
    monkeypatch.setenv(variants.COMBINE_ENV, "per_rank")
    (s1, send), (s2, recv) = call()
    assert type(s1) is LowLatencyCombineRankSpec and s1 == s2
    assert (send.phases, recv.phases) == (1, 2) and send.call_epoch != 0
    assert _without_phases(send) == _without_phases(recv)


def test_per_rank_hook_runs_per_expert(call, monkeypatch):
    monkeypatch.setenv(variants.COMBINE_ENV, "per_rank")
    launches = call(return_recv_hook=True)
    assert [type(s) for s, _ in launches] == [LowLatencyCombineSpec]   # the hook holds recv


def test_bad_variant_refused_before_any_launch(call, monkeypatch):
    monkeypatch.setenv(variants.COMBINE_ENV, "fast")
    with pytest.raises(ValueError, match="EPGEN_LL_COMBINE='fast'"):
        call()
    assert call.fake.launches == []
