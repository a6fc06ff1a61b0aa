"""Layout facts are defined once (epgen/jit/layout_facts.py): every rendered unit carries them
before the family's headers, which read them from there; what a header defines or derives on
its own the unit static_asserts against them, so a drift fails the compile."""
from __future__ import annotations

import dataclasses
import os
import re

import pytest

from epgen import jit, reference
from epgen.jit import codegen, compiler, layout_facts, specs
from epgen.cache import Cache
from epgen.ops import low_latency
from epgen.regions import internode as internode_layout
from epgen.regions import intranode
from epgen.runtime import errors
from epgen.jit.specs import (FAMILIES, internode_combine_spec, internode_dispatch_spec,
                             internode_notify_spec, ll_barrier_spec, ll_combine_spec,
                             ll_dispatch_spec, normal_combine_spec, normal_dispatch_spec)
from tests.fake_launch import fake_ll_ops


@pytest.mark.parametrize("spec, fact", [
    (normal_combine_spec(1024, 0, 2), "kNormalRingCountersOff"),
    (normal_combine_spec(1024, 0, 2), "kNormalRingCounters"),
    (ll_barrier_spec(2), "kErrTimeout"),
    (ll_barrier_spec(2), "kErrFieldPeer"),
    (internode_combine_spec(1024, 0, 4, 2), "kInodeCtrlWords"),
])
def test_a_header_that_drifts_from_the_facts_does_not_compile(spec, fact, monkeypatch, tmp_path):
    drifted = tuple(dataclasses.replace(f, value=f.value + 8) if f.cpp == fact else f
                    for f in layout_facts.FACTS)
    monkeypatch.setattr(layout_facts, "FACTS", drifted)
    with pytest.raises(compiler.CompileError, match=f"epgen/jit/layout_facts.py {fact}"):
        jit.build(spec, "sm_90", Cache(str(tmp_path)), pch=False)


def test_each_unit_asserts_the_headers_it_includes():
    normal = codegen.render(normal_combine_spec(1024, 0, 2))
    ll = codegen.render(ll_barrier_spec(2))
    assert ("static_cast<long long>(::epgen::nctrl::kDispSendTail) == "
            "::epgen::facts::kNormalRingCountersOff") in normal
    assert "::epgen::nctrl::" not in ll           # ll units do not include normal_ctrl.cuh
    assert "static_cast<long long>(::epgen::kErrTimeout) == ::epgen::facts::kErrTimeout" in ll
    for src, header in ((normal, "normal_combine.cuh"), (ll, "ll_barrier.cuh")):
        # the facts come before the family's headers, which read them
        assert 0 < src.index("namespace epgen::facts {") < src.index(f'#include "{header}"')
        assert "kLLMaxSig = 1024," in src and "kInodeMaxChannels = 64," in src


# Constants the headers take from epgen::facts, never spelled again: (header, name, fact).
READ_FROM_FACTS = [
    ("normal_ctrl.cuh", "kMaxC", "kNormalMaxChannels"),
    ("normal_ctrl.cuh", "kMaxR", "kNormalMaxRanks"),
    ("normal_ctrl.cuh", "kRowInts", "kNormalNotifyRowInts"),
    ("normal_ctrl.cuh", "kNotifySeq", "kNormalNotifySeqOff"),
    ("normal_ctrl.cuh", "kNotifyTable", "kNormalNotifyTableOff"),
    ("normal_ctrl.cuh", "kCtrlBytes", "kNormalCtrlBytes"),
    ("normal_dispatch.cuh", "kBatch", "kNormalRingBatch"),
    ("normal_combine.cuh", "kChunk", "kNormalRingBatch"),
    ("normal_combine.cuh", "kReduceBatch", "kNormalRingBatch"),
    ("ll_common.cuh", "kMaxSig", "kLLMaxSig"),
    ("ll_common.cuh", "kMaxRankSig", "kLLMaxRankSig"),
    ("ll_common.cuh", "kMaxTokens", "kLLMaxTokens"),
    ("ll_common.cuh", "kMaxTopk", "kMaxTopk"),
    ("ll_common.cuh", "kHeaderFixed", "kLLHeaderFixed"),
    ("ll_common.cuh", "kSend", "kLLSend"),
    ("ll_common.cuh", "kRecv", "kLLRecv"),
    ("internode_common.cuh", "kMaxC", "kInodeMaxChannels"),
    ("internode_notify.cuh", "kMaxC", "kInodeNotifyMaxChannels"),
    ("internode_notify.cuh", "kSeqOff", "kInodeNotifySeqOff"),
    ("internode_notify.cuh", "kSigOff", "kInodeNotifySigOff"),
]


@pytest.mark.parametrize("header, name, fact", READ_FROM_FACTS)
def test_a_header_reads_the_fact_and_does_not_spell_it(header, name, fact):
    with open(os.path.join(codegen.TEMPLATES_DIR, header), encoding="utf-8") as f:
        text = f.read()
    definitions = re.findall(rf"\b{name}\s*=(?!=)\s*([^;,}}\s]+)", text)   # not ==
    # defined from the fact; other definitions only copy it (a kernel's local alias)
    assert f"facts::{fact}" in definitions, (header, name, definitions)
    assert not [d for d in definitions if d[0].isdigit()], (header, name, definitions)
    assert any(f.cpp == fact and f.device is None for f in layout_facts.FACTS)


def test_the_fp8_scale_group_is_read_not_spelled():
    """One definition of the scale group: the dispatch header reads it, the combine wire header
    (built for the host too, so it cannot) is asserted against it per spec."""
    with open(os.path.join(codegen.TEMPLATES_DIR, "ll_dispatch.cuh"), encoding="utf-8") as f:
        assert "(H + facts::kScaleGroup - 1) / facts::kScaleGroup" in f.read()
    src = codegen.render(ll_combine_spec(2880, 8, 64, 8, wire_format="fp8_e4m3_f32_128"))
    assert "static_assert((llw::Wire<LowLatencyCombineSpec::hidden>::kS) == 23" in src


def test_the_host_reads_the_same_definitions():
    assert intranode.CTRL_BYTES == layout_facts.NORMAL_CTRL_BYTES
    assert low_latency.MAX_SIG == layout_facts.LL_MAX_SIG
    assert (low_latency.SEND, low_latency.RECV) == (layout_facts.LL_SEND, layout_facts.LL_RECV)
    assert errors.CODE_TIMEOUT == layout_facts.ERR_TIMEOUT and errors.WORDS == layout_facts.ERROR_WORDS
    assert errors.FIELDS[3] == layout_facts.ERR_FIELD_PEER
    assert low_latency.ROUTES_SIG_OFF == layout_facts.LL_ROUTES_SIG_OFF
    assert low_latency.DATA_OFF == layout_facts.LL_DATA_OFF
    assert low_latency.per_rank_half_bytes is layout_facts.ll_per_rank_half_bytes
    assert low_latency._data_layout is layout_facts.ll_data_layout
    # the region's size for DeepSeek-V3 decode at 8 ranks (combine slots sized for LogFMT-10,
    # receive halves for top-k up to 11)
    assert low_latency.low_latency_rdma_size_hint(128, 7168, 8, 256) == 836812800
    assert intranode.MIN_CAP == layout_facts.NORMAL_MIN_RING_SLOTS
    assert intranode.dispatch_record_bytes is layout_facts.normal_dispatch_record_bytes
    assert specs.num_scales is layout_facts.num_scales
    assert reference.SCALE_GROUP == layout_facts.SCALE_GROUP
    assert internode_layout.CTRL_WORDS == layout_facts.INODE_CTRL_WORDS
    assert internode_layout.source_meta_bytes is layout_facts.inode_source_meta_bytes


@pytest.mark.parametrize("spec, fact, message", [
    (normal_dispatch_spec(1024, 4, 8, 2, "bf16"), "normal_dispatch_record_bytes", "ring record size"),
    (normal_combine_spec(1024, 4, 2), "normal_combine_record_bytes", "ring record size"),
    (ll_dispatch_spec(1024, 4, 8, 2, use_fp8=False), "ll_header_bytes", "message header size"),
    (ll_combine_spec(1024, 4, 8, 2, per_rank=True), "ll_per_rank_half_bytes", "area half for M=7"),
    (internode_notify_spec(4, 2, 8), "inode_notify_area_bytes", "notify area size"),
    (internode_notify_spec(4, 2, 8), "inode_notify_stage_off", "notify staging offset"),
    (internode_dispatch_spec(2048, 0, 8, 4, 2), "inode_source_meta_bytes", "source meta bytes"),
    (ll_combine_spec(2880, 8, 64, 8, wire_format="logfmt10"), "ll_combine_slot_bytes",
     "combine slot size"),
    (ll_combine_spec(2880, 8, 64, 8), "ll_combine_recv_rows", "combine receive rows for M=7"),
])
def test_a_spec_size_that_drifts_from_the_kernel_does_not_compile(spec, fact, message, monkeypatch,
                                                                   tmp_path):
    """The per-spec sizes the host allocates by (layout_facts functions) are static_asserted
    against the kernel's own (DispatchCfg::kRec, LLDispatch::kHdr, LLCombineRank::half_bytes)."""
    real = getattr(layout_facts, fact)
    monkeypatch.setattr(layout_facts, fact, lambda *a: real(*a) + 16)
    with pytest.raises(compiler.CompileError) as e:
        jit.build(spec, "sm_90", Cache(str(tmp_path)), pch=False)
    assert message in e.value.log


def test_the_spec_reaches_every_kernel_by_name():
    """No template argument list in a generated unit: each entry is instantiated with the spec
    struct, whose members carry the fields' names, so an order cannot swap two of them."""
    from tests.test_compile import SPECS
    assert {type(s) for s in SPECS} == set(FAMILIES.values())
    for spec in SPECS:
        src = codegen.render(spec)
        for e in spec.entries:
            assert f"{e.device}<{spec.struct_name}>(args);" in src
        for name, value in spec.constants().items():
            rendered = codegen.cpp_bool(value) if isinstance(value, bool) else value
            assert f"{{ {name} = {rendered} }};" in src
        assert not re.search(r"_kernel<\d", src)


def test_ll_ops_check_shapes_with_the_spec_rules_in_the_callers_words():
    ops, fake = fake_ll_ops(2, 16, 256, 16)
    with pytest.raises(ValueError, match=r"^hidden=100: must be a multiple of 16 in low-latency mode"):
        ops.clean_low_latency_buffer(16, 100, 16)
    with pytest.raises(ValueError, match=r"^num_experts=15: must be divisible by num_ranks=2"):
        ops.clean_low_latency_buffer(16, 256, 15)
    assert fake.launches == []


def test_a_family_registers_itself_once():
    """Adding a family is its spec class (FAMILIES fills itself); a second class claiming a
    name already taken is refused at definition."""
    import dataclasses
    from typing import ClassVar

    from epgen.jit import specs
    assert FAMILIES["ll_barrier"] is specs.LowLatencyBarrierSpec
    with pytest.raises(TypeError, match="'ll_barrier': defined by LowLatencyBarrierSpec"):
        @dataclasses.dataclass(frozen=True)
        class Clash(specs.KernelSpec):
            family: ClassVar[str] = "ll_barrier"
    assert FAMILIES["ll_barrier"] is specs.LowLatencyBarrierSpec


def _deepep_hint():
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                        "ll_combine_bytes.py")
    spec = importlib.util.spec_from_file_location("ll_combine_bytes", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.deepep_hint


@pytest.mark.parametrize("R", [2, 4, 8])
def test_low_latency_footprint_is_at_most_half_of_deepeps(R):
    """Issue 15 item 3 at DeepEP's shape (128 tokens, hidden 7168, 288 experts): the hint, for
    any top-k DeepEP takes (<= 11), zero-copy buffer included, is at most half of DeepEP's; the
    receive halves hold R * M * min(K, El) slots, not E * M."""
    hint = low_latency.low_latency_rdma_size_hint(128, 7168, R, 288)
    assert hint <= _deepep_hint()(128, 7168, R, 288) / 2
    lay = layout_facts.ll_data_layout(128, 7168, R, 288)
    slot = layout_facts.ll_combine_slot_bytes(7168)
    assert lay["comb_recv"] - lay["comb_send"] >= 288 * 128 * slot       # zero-copy [El][RM][H]
    assert layout_facts.ll_combine_half_bytes(hint, lay) == \
        layout_facts.align_up(R * 128 * min(11, 288 // R) * slot, 256)


def test_combine_half_stride_is_the_buffers_and_covers_every_top_k():
    """The half stride comes from the Buffer's size (the same for every call, format and
    top-k), never more than [E][M] slots; a larger top-k needs a larger hint."""
    M, H, R, E = 64, 2048, 4, 32
    lay = layout_facts.ll_data_layout(M, H, R, E)
    slot = layout_facts.ll_combine_slot_bytes(H)
    for K in (1, 4, 8, 11, 16, 32):
        nbytes = low_latency.low_latency_rdma_size_hint(M, H, R, E, K)
        half = layout_facts.ll_combine_half_bytes(nbytes, lay)
        assert half >= layout_facts.ll_combine_recv_rows(M, R, E, K) * slot
        assert lay["comb_recv"] + 2 * half <= nbytes
    huge = layout_facts.ll_combine_half_bytes(10 ** 12, lay)
    assert huge == layout_facts.align_up(E * M * slot, 256)
    assert low_latency.low_latency_rdma_size_hint(M, H, R, E, 4) < \
        low_latency.low_latency_rdma_size_hint(M, H, R, E)
