"""The soak (bench/soak.py) in a short run: low-latency and normal pairs at random token counts
and routing over a few specs, sync / async / hooked / graph-replayed calls mixed, every 50th
pair checked against epgen.reference, memory bounded, then Buffers created and destroyed.
The full run (1,000,000 LL and 100,000 normal pairs) is `python bench/soak.py`."""
from __future__ import annotations

import os
import sys

import pytest

from tests import gpu_harness

pytestmark = pytest.mark.gpu

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
SHORT = dict(ll_pairs=2000, normal_pairs=300, check_every=50, buffers=10, seed=14,
             gpu_growth_mb=64.0, host_growth_mb=256.0, late_growth_mb=32.0)
# the quick tier: the same mix, a quarter of the pairs, three Buffer cycles
QUICK = dict(SHORT, ll_pairs=500, normal_pairs=100, buffers=3)


def _soak_worker(rank, world, cfg):
    sys.path.insert(0, BENCH)
    import soak
    return soak.soak(rank, world, cfg)


@pytest.mark.parametrize("num_ranks", gpu_harness.rank_counts())
def test_soak_short(num_ranks):
    gpu_harness.require_gpus(num_ranks)
    cfg = QUICK if gpu_harness.tier() == "quick" else SHORT
    per_rank = gpu_harness.run_ranks(num_ranks, _soak_worker, cfg, timeout_s=500)
    for s in per_rank:
        print(s)
        expect = cfg["ll_pairs"] // cfg["check_every"] + cfg["normal_pairs"] // cfg["check_every"]
        assert s["checked"] == expect, s
        assert s["errors"] == 0 and not s["deadline_fired"], s
