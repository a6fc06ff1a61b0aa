"""EPGEN_LL_COMBINE: which low-latency combine kernel a call runs (CPU: the choice and its
checks are made before anything is allocated or launched)."""
import os
import subprocess
import sys

import pytest

from epgen import variants
from epgen.jit import codegen
from epgen.ops import low_latency as ll
from epgen.jit.specs import LowLatencyCombineRankSpec, LowLatencyCombineSpec

DEEPEP = dict(M=128, hidden=7168, num_ranks=2, num_experts=288, num_topk=8)


def test_variant_default_and_choice(monkeypatch):
    monkeypatch.delenv(variants.COMBINE_ENV, raising=False)
    assert variants.combine_variant() == "per_expert"
    assert not ll.combine_runs_per_rank(**DEEPEP, return_recv_hook=False, enable_shrink=False)
    monkeypatch.setenv(variants.COMBINE_ENV, "per_rank")
    assert variants.combine_variant() == "per_rank"
    assert ll.combine_runs_per_rank(**DEEPEP, return_recv_hook=False, enable_shrink=False)


def test_variant_typo_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv(variants.COMBINE_ENV, "per-rank")
    with pytest.raises(ValueError, match="EPGEN_LL_COMBINE.*'per-rank'.*per_expert, per_rank"):
        variants.combine_variant()


@pytest.mark.parametrize("hook, shrink, experts, hidden", [
    (True, False, 288, 7168), (False, True, 288, 7168), (False, False, 2, 7168),
    (False, False, 4, 256)])
def test_per_rank_falls_back(monkeypatch, hook, shrink, experts, hidden):
    """Hooked sends must not wait on a peer, enable_shrink's masked peers send no routes, and
    one expert per rank (or two, where the routes outgrow a half's LogFMT metadata room) leaves
    no room in a receive half: the per-expert kernel runs."""
    monkeypatch.setenv(variants.COMBINE_ENV, "per_rank")
    shape = dict(DEEPEP, num_experts=experts, hidden=hidden)
    assert not ll.combine_runs_per_rank(**shape, return_recv_hook=hook, enable_shrink=shrink)


def test_per_rank_half_fits_at_two_experts_per_rank(monkeypatch):
    monkeypatch.setenv(variants.COMBINE_ENV, "per_rank")
    for R in (2, 4, 8):
        assert ll.combine_runs_per_rank(128, 7168, R, 2 * R, 8, False, False)
        assert ll.combine_runs_per_rank(128, 7168, R, 3 * R, 8, False, False)
        assert ll.per_rank_half_bytes(128, 7168, R, 8) <= 3 * R * 128 * 2 * 7168


def test_precompile_lists_the_per_rank_kernel_without_torch():
    """`epgen precompile` runs without torch (.ci/cu12-compile): asking which combine kernel
    a deployment runs must not import it."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import epgen.specfile as p\n"
            "print(sorted({s.family for s in p.low_latency_specs(2880, 128, 4, 4, ['fp8'])}))")
    env = dict(os.environ, EPGEN_LL_COMBINE="per_rank")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert "ll_combine_rank" in out.stdout


def test_per_rank_kernel_is_its_own_family():
    old = LowLatencyCombineSpec(hidden=7168, num_topk=8, num_experts=288, num_ranks=2)
    new = LowLatencyCombineRankSpec(hidden=7168, num_topk=8, num_experts=288, num_ranks=2)
    assert new.family == "ll_combine_rank" and new.name != old.name
    src_old, src_new = codegen.render(old), codegen.render(new)
    assert '#include "ll_combine.cuh"' in src_old and "ll_combine_rank" not in src_old
    assert '#include "ll_combine_rank.cuh"' in src_new and "LowLatencyCombineRankArgs" in src_new
