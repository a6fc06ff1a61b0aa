"""Layout facts are defined once (epgen/layout_facts.py): every rendered unit carries them and
static_asserts the device headers' own constants against them, so a drift fails the compile."""
from __future__ import annotations

import dataclasses

import pytest

from epgen import codegen, compiler, jit, layout_facts
from epgen.cache import Cache
from epgen.ops import intranode, low_latency
from epgen.runtime import errors
from epgen.specs import ll_barrier_spec, normal_combine_spec


@pytest.mark.parametrize("spec, fact", [
    (normal_combine_spec(1024, 0, 2), "kNormalCtrlBytes"),
    (ll_barrier_spec(2), "kLLMaxRankSig"),
    (ll_barrier_spec(2), "kErrTimeout"),
])
def test_a_header_that_drifts_from_the_facts_does_not_compile(spec, fact, monkeypatch, tmp_path):
    drifted = tuple(dataclasses.replace(f, value=f.value + 8) if f.cpp == fact else f
                    for f in layout_facts.FACTS)
    monkeypatch.setattr(layout_facts, "FACTS", drifted)
    with pytest.raises(compiler.CompileError, match=f"epgen/layout_facts.py {fact}"):
        jit.build(spec, "sm_90", Cache(str(tmp_path)), pch=False)


def test_each_unit_asserts_the_headers_it_includes():
    normal = codegen.render(normal_combine_spec(1024, 0, 2))
    ll = codegen.render(ll_barrier_spec(2))
    assert "static_cast<long long>(::epgen::nctrl::kCtrlBytes) == ::epgen::facts::kNormalCtrlBytes" in normal
    assert "::epgen::ll::" not in normal          # normal units do not include ll_common.cuh
    assert "static_cast<long long>(::epgen::ll::kMaxSig) == ::epgen::facts::kLLMaxSig" in ll
    assert "static_cast<long long>(::epgen::kErrTimeout) == ::epgen::facts::kErrTimeout" in ll


def test_the_host_reads_the_same_definitions():
    assert intranode.CTRL_BYTES == layout_facts.NORMAL_CTRL_BYTES
    assert low_latency.MAX_SIG == layout_facts.LL_MAX_SIG
    assert (low_latency.SEND, low_latency.RECV) == (layout_facts.LL_SEND, layout_facts.LL_RECV)
    assert errors.CODE_TIMEOUT == layout_facts.ERR_TIMEOUT and errors.WORDS == layout_facts.ERROR_WORDS
