"""examples/moe_layer.py (a DeepSeek-V3-style MoE block on epgen: normal-mode prefill,
low-latency decode with hooks overlapping the shared expert, the decode step as a CUDA graph)
on 2, 4 and 8 ranks with small shapes, each output checked against the dense layer."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from tests import gpu_harness

pytestmark = pytest.mark.gpu

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "examples", "moe_layer.py")
SMALL = dict(hidden=512, moe_inter=256, shared_inter=512, experts_per_rank=4, topk=4,
             prefill_tokens=128, decode_tokens=32, iters=2)


def load_example():
    """examples/moe_layer.py as a module (registered first: its dataclass needs that)."""
    name = "moe_layer_example"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def _worker(rank, world, shape):
    os.environ.setdefault("EPGEN_TIMEOUT_S", gpu_harness.deadline_s(20))
    mod = load_example()
    return mod.run_layer(rank, world, mod.MoEConfig(**shape))


@pytest.mark.parametrize("num_ranks", gpu_harness.rank_counts())
def test_moe_layer_example(num_ranks):
    gpu_harness.require_gpus(num_ranks)
    results = gpu_harness.run_ranks(num_ranks, _worker, SMALL, timeout_s=280)
    mod = load_example()
    print(mod.report(results, mod.MoEConfig(**SMALL)))
    for r in results:
        assert set(r["errors"]) == {"prefill", "decode", "decode (graph)"}, r["errors"]
        assert all(e <= mod.TOLERANCE for e in r["errors"].values()), r["errors"]
