"""CPU: the internode dispatch's host-side refusals (ops/internode.InternodeOps.dispatch), each
raised before anything is compiled, allocated or launched, naming the argument, value and rule.
The GPU pieces underneath are tests/fake_launch.py's FAKES (a launch here would fail the test:
FakeLaunchKernel records it)."""
from __future__ import annotations

import pytest
import torch

import epgen
from epgen.regions import internode as il
from tests.fake_launch import fake_cuda, fake_internode_ops, no_graph_capture

R, L, T, H, E, K = 4, 2, 8, 256, 16, 4
CFG = epgen.Config(4, 2, 8, 2, 4)          # 2 channels, 4 RDMA slots, NVLink rings of 4


def _ops(nvl_bytes=8 << 20, rdma_bytes=8 << 20, ranks=R, per_node=L):
    return fake_internode_ops(ranks, per_node, nvl_bytes, rdma_bytes)


def _args(ranks=R, per_node=L, **over):
    a = dict(x=fake_cuda(torch.zeros(T, H, dtype=torch.bfloat16)), handle=None,
             num_tokens_per_rank=fake_cuda(torch.zeros(ranks, dtype=torch.int32)),
             num_tokens_per_rdma_rank=fake_cuda(torch.zeros(ranks // per_node, dtype=torch.int32)),
             is_token_in_rank=fake_cuda(torch.zeros(T, ranks, dtype=torch.bool)),
             num_tokens_per_expert=fake_cuda(torch.zeros(E, dtype=torch.int32)),
             topk_idx=fake_cuda(torch.zeros(T, K, dtype=torch.int64)),
             topk_weights=fake_cuda(torch.zeros(T, K, dtype=torch.float32)),
             expert_alignment=1, num_worst_tokens=0, config=CFG, previous_event=None,
             async_finish=False, allocate_on_comm_stream=False)
    a.update(over)
    return a


@pytest.mark.parametrize("over, exc, words", [
    (dict(handle=(None,) * 10, topk_idx=None, topk_weights=None), ValueError,
     "handle[1]='NoneType': must be a torch.Tensor"),
    (dict(handle=(None,) * 6, topk_idx=None, topk_weights=None), ValueError,
     "handle='tuple': must be the 10-tuple an internode dispatch returned"),
    (dict(handle=(None,) * 10), ValueError,
     "topk_idx='a tensor': must be None with a handle (cached dispatch)"),
    (dict(num_worst_tokens=-1), ValueError, "num_worst_tokens=-1: must be an int >= 0"),
    (dict(expert_alignment=0), ValueError, "expert_alignment=0: must be an int >= 1"),
    (dict(num_tokens_per_rdma_rank=None), ValueError,
     "num_tokens_per_rdma_rank=None: required without a handle across nodes"),
    (dict(is_token_in_rank=fake_cuda(torch.zeros(T, 2, dtype=torch.bool))), ValueError,
     r"is_token_in_rank.shape=(8, 2): must be (8, 4)"),
    (dict(topk_weights=fake_cuda(torch.zeros(T, 3))), ValueError,
     "topk_weights.shape=(8, 3): must be (8, 4)"),
    (dict(config=epgen.Config(2 * 65, 2, 8, 2, 4)), ValueError,
     "config.num_sms=130: must be even and in [2, 128] across nodes"),
])
def test_refusals_name_the_argument(over, exc, words):
    ops, fake = _ops()
    with pytest.raises(exc) as e:
        ops.dispatch(**_args(**over))
    assert words in str(e.value)
    assert fake.launches == []


def test_buffers_too_small_name_the_size_they_need():
    rec = il.dispatch_record_bytes(2 * H, 0, K, L)
    need_rdma = il.rdma_need(CFG, R, 2, rec)
    ops, fake = _ops(rdma_bytes=need_rdma - 4096)
    with pytest.raises(ValueError, match=rf"num_rdma_bytes={need_rdma - 4096}: .* needs >= {need_rdma} B"):
        ops.dispatch(**_args())
    need_nvl = il.nvl_need(CFG, 2, L, rec)
    ops, fake = _ops(nvl_bytes=need_nvl - 4096)
    with pytest.raises(ValueError, match=rf"num_nvl_bytes={need_nvl - 4096}: .* needs >= {need_nvl} B"):
        ops.dispatch(**_args())
    assert fake.launches == []


@pytest.mark.parametrize("ranks, per_node, blocks, threads", [
    (16, 8, (1, 1), (640, 608)),      # EP16 as 2 x 8: 20 / 19 roles, one block per channel
    (32, 8, (2, 2), (640, 608)),      # EP32: 40 / 37 roles
    (64, 8, (3, 3), (864, 800)),      # EP64: 80 / 73 roles
])
def test_a_channels_roles_spread_over_as_few_blocks_as_hold_them(ranks, per_node, blocks, threads):
    """A warp per role (dispatch: a sender and a forwarder per node, a receiver per rank;
    combine: a sender per rank, a forwarder per node, a reducer), over blocks of at most 32
    warps, evenly: DeepEP's three published layouts all run."""
    from epgen.jit.specs import internode_combine_spec, internode_dispatch_spec
    d = internode_dispatch_spec(2 * H, 0, 8, ranks, per_node)
    c = internode_combine_spec(H, 8, ranks, per_node)
    assert (d.blocks_per_channel, c.blocks_per_channel) == blocks
    assert (d.threads, c.threads) == threads


def test_fewer_warps_per_block_launch_more_blocks_per_channel(monkeypatch):
    """EPGEN_INTERNODE_WARPS_PER_BLOCK=3 (tests: several blocks on a layout one GPU's ranks can
    form): 2 x 2 ranks' 8 dispatch roles and 7 combine roles take 3 blocks of 3 warps per
    channel; the grid is channels x blocks."""
    monkeypatch.setenv("EPGEN_INTERNODE_WARPS_PER_BLOCK", "3")
    ops, fake = _ops()
    with no_graph_capture():
        ops.dispatch(**_args(handle=_handle(2), topk_idx=None, topk_weights=None))
        ops.combine(fake_cuda(torch.zeros(5, H, dtype=torch.bfloat16)), _handle(2),
                    fake_cuda(torch.zeros(5, K)), None, CFG, None, False, False)
    assert [type(spec).__name__ for spec, _ in fake.launches] == [
        "InternodeDispatchSpec", "InternodeCombineSpec"]
    assert fake.shapes == [(2 * 3, 96), (2 * 3, 96)]


def test_blocks_beyond_the_processes_sms_are_refused(monkeypatch):
    monkeypatch.setenv("EPGEN_INTERNODE_WARPS_PER_BLOCK", "3")
    ops, fake = _ops()
    ops.ctx.__dict__["device_sms"] = 5
    with pytest.raises(ValueError, match=r"config.num_sms=4: gives 2 channels x 3 block\(s\) = 6 "
                                         r"blocks, more than the 5 SMs this process may use"):
        ops.dispatch(**_args(handle=_handle(2), topk_idx=None, topk_weights=None))
    assert fake.launches == []


def test_more_than_32_nodes_are_refused_by_both_kernels():
    from epgen.jit.specs import SpecError, internode_combine_spec, internode_dispatch_spec
    for build in (lambda: internode_dispatch_spec(2 * H, 0, 8, 64, 1),
                  lambda: internode_combine_spec(H, 8, 64, 1)):
        with pytest.raises(SpecError, match=r"num_ranks=64: with ranks_per_node=1 makes 64 "
                                            r"nodes: at most 32"):
            build()


@pytest.mark.parametrize("value", ["0", "33", "x"])
def test_a_bad_warps_per_block_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("EPGEN_INTERNODE_WARPS_PER_BLOCK", value)
    ops, fake = _ops()
    with pytest.raises(ValueError, match=rf"EPGEN_INTERNODE_WARPS_PER_BLOCK='{value}': must be "
                                         r"an integer in \[1, 32\]"):
        ops.dispatch(**_args(handle=_handle(2), topk_idx=None, topk_weights=None))
    assert fake.launches == []


def test_nvlink_rings_need_a_slot_per_source_node():
    ops, fake = _ops(per_node=1)                       # 4 nodes of 1
    with pytest.raises(ValueError, match=r"config.num_max_nvl_chunked_recv_tokens=3: must be >= "
                                         r"the number of nodes \(4\)"):
        ops.dispatch(**_args(per_node=1, config=epgen.Config(4, 1, 3, 1, 4)))
    assert fake.launches == []


def _handle(C, rows=5, rdma_rows=3):
    i32 = lambda *shape: fake_cuda(torch.zeros(*shape, dtype=torch.int32))
    n = R // L
    return (fake_cuda(torch.zeros(T, R, dtype=torch.bool)), i32(n, C), i32(R, C), i32(n, C), i32(n),
            i32(R, C), i32(R), fake_cuda(torch.zeros(rows, 8, dtype=torch.uint8)), i32(T, n),
            i32(rdma_rows, L))


def test_cached_dispatch_checks_the_handle_and_its_channels():
    ops, fake = _ops()
    kw = dict(topk_idx=None, topk_weights=None)
    with pytest.raises(ValueError, match=r"config.num_sms=4: must be 6 \(2 per channel of the "
                                         r"handle's 3 channels\)"):
        ops.dispatch(**_args(handle=_handle(3), **kw))
    bad = list(_handle(2))
    bad[9] = fake_cuda(torch.zeros(3, 4, dtype=torch.int32))          # L columns, not 4
    with pytest.raises(ValueError, match=r"handle\[9\].shape=\(3, 4\): must be \(3, 2\)"):
        ops.dispatch(**_args(handle=tuple(bad), **kw))
    bad = list(_handle(2))
    bad[0] = fake_cuda(torch.zeros(T + 1, R, dtype=torch.bool))       # not x's tokens
    with pytest.raises(ValueError, match=r"handle\[0\].shape=\(9, 4\): must be \(8, 4\)"):
        ops.dispatch(**_args(handle=tuple(bad), **kw))
    assert fake.launches == []


def _combine(ops, **over):
    a = dict(x=fake_cuda(torch.zeros(5, H, dtype=torch.bfloat16)), handle=_handle(2),
             topk_weights=fake_cuda(torch.zeros(5, K)), bias=None, config=CFG,
             previous_event=None, async_finish=False, allocate_on_comm_stream=False)
    a.update(over)
    return ops.combine(**a)


@pytest.mark.parametrize("over, words", [
    (dict(handle=(None,) * 6), "handle='tuple': must be the 10-tuple an internode dispatch returned"),
    (dict(config=epgen.Config(6, 2, 8, 2, 4)),
     "config.num_sms=6: must be 4 (2 per channel of the handle's 2 channels)"),
    (dict(x=fake_cuda(torch.zeros(4, H, dtype=torch.bfloat16))),
     "x.shape=(4, 256): must be [5, hidden] (the dispatch's rows)"),
    (dict(x=fake_cuda(torch.zeros(5, H))), "x.dtype=torch.float32: must be torch.bfloat16"),
    (dict(topk_weights=fake_cuda(torch.zeros(4, K))), "topk_weights.shape=(4, 4): must be [5, num_topk"),
    (dict(bias=(None, None, None)), "bias='3 tensors': at most two"),
    (dict(bias=fake_cuda(torch.zeros(T, H + 8, dtype=torch.bfloat16))),
     "bias[0].shape=(8, 264): must be (8, 256)"),
    (dict(x=fake_cuda(torch.zeros(5, 100, dtype=torch.bfloat16)), bias=None),
     "x.shape[1]=100: must be a multiple of 8"),
])
def test_combine_refusals_name_the_argument(over, words):
    ops, fake = _ops()
    with pytest.raises(ValueError) as e:
        _combine(ops, **over)
    assert words in str(e.value)
    assert fake.launches == []


def test_combine_buffers_too_small_name_the_size_they_need():
    rec = il.combine_record_bytes(H, K)
    need = il.rdma_need(CFG, R, 2, rec)
    ops, fake = _ops(rdma_bytes=need - 4096)
    with pytest.raises(ValueError, match=rf"num_rdma_bytes={need - 4096}: the internode combine .* needs >= {need} B"):
        _combine(ops)
    assert fake.launches == []
