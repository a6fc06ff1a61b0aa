"""The per-rank low-latency combine (EPGEN_LL_COMBINE=per_rank, templates/ll_combine_rank.cuh)
on N GPUs, bit-exact against epgen.reference.low_latency_combine_per_rank; the calls it hands to
the per-expert kernel (return_recv_hook, enable_shrink) against the per-expert reference."""
from __future__ import annotations

import os

import pytest

from tests import gpu_harness
from tests.test_low_latency_gpu import (LOCAL_EXPERTS, M, MAX_K, _all_inputs,
                                        _check_combine, _check_dispatch, _expert_out, _finish,
                                        _combine_inputs, _run_jobs, _run_shrink)

pytestmark = pytest.mark.gpu


def _per_expert_out(recv, fp8, H, rank, El):
    """Expert outputs that differ per (expert, token): the received rows times 1 + (e % 8) / 8
    for global expert e, so a weight applied to the wrong expert's row changes the bits."""
    import torch
    y = _expert_out(recv, fp8, H).float()
    f = 1 + (torch.arange(El, device=y.device) + rank * El) % 8 / 8
    return (y * f.view(-1, 1, 1)).to(torch.bfloat16)


def _check_exact(rank, ins, y, handle, out):
    import torch
    from epgen import reference as ref
    ys, srcs, lays = _combine_inputs(y, handle)
    exp = ref.low_latency_combine_per_rank(ys, ins[rank][1], ins[rank][2], rank, srcs, lays)
    assert not bool(out.isnan().any()), "combine output has NaN (rows not written)"
    bad = out.view(torch.int16) != exp.view(torch.int16)
    if bool(bad.any()):
        t, c = bad.nonzero()[0].tolist()
        raise AssertionError(f"{int(bad.sum())} elements differ from the per-rank reference; "
                             f"first [{t}, {c}]: {out[t, c].item()} vs {exp[t, c].item()}")
    empty = (ins[rank][1] < 0).all(dim=1)
    assert bool((out[empty] == 0).all()), "a token without experts is not zero"


CASES = [
    # name, H, K, fp8, extra
    ("bf16 h7168 k8", 7168, 8, False, {}),
    ("fp8 h4096 k16 zero_copy out=NaN async", 4096, 16, True,
     {"zero_copy": True, "out": True, "async": True}),
    ("fp8 h2880 k16 stats, rank 0 few tokens", 2880, 16, True, {"stats": True, "few": True}),
    ("fp8 h7168 k8 hook: per-expert kernel", 7168, 8, True, {"hook": True}),
]


def _run_case(buf, rank, R, E, cid, name, H, K, fp8, extra):
    import torch
    tokens = [M] * R
    tokens[-1] = M - 3
    if extra.get("few"):
        tokens[0] = 5
    ins = _all_inputs(cid, R, tokens, H, K, E)
    for _, idx, _ in ins:
        idx[2] = -1                               # a token with no expert: zeros
    x, idx, w = ins[rank]
    El, hook, asy = E // R, extra.get("hook", False), extra.get("async", False)
    wst = torch.zeros(R, dtype=torch.int64, device="cuda") if extra.get("stats") else None
    recv, count, handle, ev, hk = buf.low_latency_dispatch(x, idx, M, E, use_fp8=fp8,
                                                           async_finish=asy, return_recv_hook=hook)
    _finish(buf, ev, hk, hook, asy)
    _check_dispatch(rank, ins, E, (recv, count, handle), fp8, False, False)
    y = _per_expert_out(recv, fp8, H, rank, El)
    out = None
    if extra.get("out"):
        out = torch.full((tokens[rank], H), float("nan"), dtype=torch.bfloat16, device="cuda")
    if extra.get("zero_copy"):
        buf.get_next_low_latency_combine_buffer(handle).copy_(y)
    results = []
    for _ in range(2):                            # same inputs twice: the same bits
        combined, ev, hk = buf.low_latency_combine(
            y, idx, w, handle, zero_copy=extra.get("zero_copy", False), async_finish=asy,
            return_recv_hook=hook, out=out, combine_wait_recv_cost_stats=wst)
        _finish(buf, ev, hk, hook, asy)
        results.append(combined.clone())
    if out is not None:
        assert combined.data_ptr() == out.data_ptr(), "out= not used"
    assert torch.equal(results[0].view(torch.int16), results[1].view(torch.int16)), \
        "two identical combines differ"
    if hook:
        _check_combine(rank, ins, y, handle, combined)
    else:
        _check_exact(rank, ins, y, handle, combined)


def _run_graph(buf, rank, R, E):
    """Dispatch + per-rank combine captured once, replayed with new inputs: bit-exact."""
    import torch
    H, K, El = 7168, 8, E // R
    ins0 = _all_inputs(210, R, [M] * R, H, K, E)
    sx, sidx, sw = (t.clone() for t in ins0[rank])
    recv, _, handle, _, _ = buf.low_latency_dispatch(sx, sidx, M, E, use_fp8=True)
    buf.low_latency_combine(_per_expert_out(recv, True, H, rank, El), sidx, sw, handle)
    torch.cuda.synchronize()
    g, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        recv, count, handle, _, _ = buf.low_latency_dispatch(sx, sidx, M, E, use_fp8=True)
        y = _per_expert_out(recv, True, H, rank, El)
        combined, _, _ = buf.low_latency_combine(y, sidx, sw, handle)
    torch.cuda.current_stream().wait_stream(s)
    for rep in range(3):
        ins = _all_inputs(211 + rep, R, [M] * R, H, K, E)
        sx.copy_(ins[rank][0]); sidx.copy_(ins[rank][1]); sw.copy_(ins[rank][2])
        g.replay()
        torch.cuda.synchronize()
        buf.check_errors()
        _check_dispatch(rank, ins, E, (recv, count, handle), True, False, False)
        _check_exact(rank, ins, y, handle, combined)


def _run_without_nvlink(rank, R, E):
    """Every peer through NVSHMEM puts (routes and partials from symmetric staging)."""
    import torch
    import torch.distributed as dist
    import epgen
    buf = epgen.Buffer(dist.group.WORLD, 0,
                       epgen.Buffer.get_low_latency_rdma_size_hint(M, 7168, R, E,
                                                                   num_topk=MAX_K),
                       low_latency_mode=True, allow_nvlink_for_low_latency_mode=False)
    try:
        for cid, case in ((320, CASES[0]), (321, CASES[1])):
            _run_case(buf, rank, R, E, cid, *case)
    finally:
        torch.cuda.synchronize()
        buf.destroy()


def _worker(rank, world):
    os.environ.setdefault("EPGEN_TIMEOUT_S", gpu_harness.deadline_s(20))
    os.environ["EPGEN_LL_COMBINE"] = "per_rank"
    import torch
    import torch.distributed as dist
    import epgen
    E = LOCAL_EXPERTS * world
    buf = epgen.Buffer(dist.group.WORLD, 0,
                       epgen.Buffer.get_low_latency_rdma_size_hint(M, 7168, world, E,
                                                                   num_topk=MAX_K),
                       low_latency_mode=True, num_qps_per_rank=LOCAL_EXPERTS)
    results = []
    jobs = [(c[0], lambda c=c, i=i: _run_case(buf, rank, world, E, 600 + i, *c))
            for i, c in enumerate(CASES)]
    jobs.append(("cuda graph fp8 replays, per-rank combine", lambda: _run_graph(buf, rank, world, E)))
    _run_jobs(gpu_harness.select(jobs, QUICK), results)
    torch.cuda.synchronize()
    buf.destroy()
    _run_jobs(gpu_harness.select(
        [("allow_nvlink_for_low_latency_mode=False: routes and partials by NVSHMEM puts",
          lambda: _run_without_nvlink(rank, world, E)),
         ("enable_shrink under per_rank: the per-expert kernel, a rank masked out",
          lambda: _run_shrink(rank, world, E))], QUICK_AFTER), results)
    return results


# the quick tier: BF16 and FP8 (zero-copy, out=, async) bit-exact, the hooked hand-off to the
# per-expert kernel, graph replays, the NVSHMEM-put path (the shrink hand-off is the hook's)
QUICK = [0, 1, 3, 4]
QUICK_AFTER = [0]


@pytest.mark.parametrize("num_ranks", gpu_harness.rank_counts())
def test_ll_combine_per_rank(num_ranks):
    gpu_harness.require_gpus(num_ranks)
    bad = gpu_harness.failures(gpu_harness.run_ranks(num_ranks, _worker, timeout_s=280))
    assert not bad, "\n".join(bad)
