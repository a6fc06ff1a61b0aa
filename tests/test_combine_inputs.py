"""CPU: the GPU suites' exchange of expert outputs for the combine's golden model
(tests/test_low_latency_gpu._combine_inputs: only the rows in the checking rank's source ranges
travel, point to point) gives the golden model exactly what the all_gather of whole outputs did,
on real gloo ranks with CPU tensors."""
from __future__ import annotations

from epgen import launch


def _worker(rank, world):
    import torch
    from epgen import reference as ref
    from tests.test_low_latency_gpu import _combine_inputs, _gather
    El, M, H = 2, 3, 8
    g = torch.Generator().manual_seed(100 + rank)
    y = torch.randn(El, world * M, H, generator=g).to(torch.bfloat16)
    src_info = torch.randint(0, 50, (El, world * M), generator=g, dtype=torch.int32)
    lay = torch.zeros(El, world, dtype=torch.int64)
    for le in range(El):
        begin = 0
        for s in range(world):
            n = int(torch.randint(0, M + 1, (1,), generator=g))
            lay[le, s] = (begin << 32) | n
            begin += n
    ys, srcs, lays = _combine_inputs(y, (src_info, lay))
    full, fsrcs, flays = _gather(y), _gather(src_info), _gather(lay)
    assert all(torch.equal(a, b) for a, b in zip(srcs, fsrcs))
    assert all(torch.equal(a, b) for a, b in zip(lays, flays))
    for p in range(world):
        want = torch.zeros_like(y)
        for le in range(El):
            b, n = ref.decode_layout_range(int(flays[p][le, rank]))
            want[le, b:b + n] = full[p][le, b:b + n]
        assert torch.equal(ys[p], full[p] if p == rank else want), (rank, p)
    return "ok"


def test_only_the_rows_a_rank_checks_travel_and_they_arrive_in_place():
    assert launch.run_ranks(4, _worker, timeout_s=120,
                            placement=launch.Placement(4, 1, "time-sliced")) == ["ok"] * 4
