"""What a low-latency call launches, on CPU with the FAKE launch of tests/fake_launch.py (real
checks, specs, allocation and argument packing; no GPU)."""
import ctypes
from unittest import mock

import pytest
import torch

from epgen import formats
from epgen.jit import layout_facts
from epgen.jit.kernel_args import LowLatencyCombineArgs, LowLatencyCombineRankArgs
from epgen import variants
from epgen.ops import low_latency as ll
from epgen.jit.specs import (LowLatencyBarrierSpec, LowLatencyCombineRankSpec,
                              LowLatencyCombineSpec, LowLatencyDispatchSpec)
from tests.fake_launch import fake_cuda, fake_ll_ops, ll_combine_inputs, no_graph_capture

R, M, H, E, K = 2, 16, 256, 16, 4


@pytest.fixture
def call(request):
    """A combine on fake ops; indirect param: whether ranks' grids overlap on a GPU (MPS)."""
    ops, fake = fake_ll_ops(R, M, H, E, grids_overlap=getattr(request, "param", True))
    y, idx, w, handle = ll_combine_inputs(ops, fake, M, H, E, K)

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
    """Where ranks' grids overlap on a GPU (MPS): send, then receive, one struct."""
    monkeypatch.delenv(variants.COMBINE_ENV, raising=False)
    (s1, send), (s2, recv) = call()
    assert type(s1) is LowLatencyCombineSpec and s1 == s2
    assert type(send) is LowLatencyCombineArgs and (send.phases, recv.phases) == (1, 2)
    assert _without_phases(send) == _without_phases(recv)
    assert send.call_epoch != 0
    lay = ll._data_layout(M, H, R, E)
    assert send.half_bytes == layout_facts.ll_combine_half_bytes(
        ll.low_latency_rdma_size_hint(M, H, R, E), lay)
    assert send.rows_off == lay["comb_rows"] and send.recv_off == lay["comb_recv"]


def test_per_expert_and_dispatch_fused_on_a_gpu_of_their_own(monkeypatch):
    """A GPU per rank (or time-sliced between ranks): one launch with both phases, no epoch
    word; a hooked call keeps its receive for the hook, with an epoch word of its own."""
    monkeypatch.delenv(variants.COMBINE_ENV, raising=False)
    ops, fake = fake_ll_ops(R, M, H, E, grids_overlap=False)
    y, idx, w, handle = ll_combine_inputs(ops, fake, M, H, E, K)
    ops.low_latency_combine(y, idx, w, handle)
    [(spec, a)] = fake.launches
    assert type(spec) is LowLatencyCombineSpec and (a.phases, a.call_epoch) == (3, 0)
    fake.launches.clear()
    _, _, hook = ops.low_latency_combine(y, idx, w, handle, return_recv_hook=True)
    [(_, send)] = fake.launches
    assert send.phases == 1 and send.call_epoch != 0
    hook()
    assert [a.phases for _, a in fake.launches] == [1, 2]
    fake.launches.clear()
    x = fake_cuda(torch.zeros(M, H, dtype=torch.bfloat16))
    ops.low_latency_dispatch(x, idx, M, E, use_fp8=False)
    assert [(a.phases, a.call_epoch) for _, a in fake.launches] == [(3, 0)]


def test_a_layout_change_starts_with_the_barrier():
    """Another (M, hidden, num_experts) places the data areas elsewhere: the first eager call of
    new shapes (either op) launches the cross-rank barrier on its stream before its send; calls
    of the previous call's shapes do not, nor does a call under capture (README)."""
    ops, fake = fake_ll_ops(R, M, H, E)
    y, idx, w, handle = ll_combine_inputs(ops, fake, M, H, E, K)   # dispatch + combine at H
    assert not any(type(s) is LowLatencyBarrierSpec for s, _ in fake.launches)
    fake.launches.clear()
    x2 = fake_cuda(torch.zeros(M, H // 2, dtype=torch.bfloat16))
    with no_graph_capture():
        ops.low_latency_dispatch(x2, idx, M, E, use_fp8=False)      # hidden H / 2: a barrier
    assert [type(s) for s, _ in fake.launches][:2] == [LowLatencyBarrierSpec,
                                                       LowLatencyDispatchSpec]
    fake.launches.clear()
    ops.low_latency_dispatch(x2, idx, M, E, use_fp8=False)          # the same shapes: none
    assert LowLatencyBarrierSpec not in [type(s) for s, _ in fake.launches]
    fake.launches.clear()
    with no_graph_capture():
        ops.low_latency_combine(y, idx, w, handle)                   # back to H: a barrier
    assert type(fake.launches[0][0]) is LowLatencyBarrierSpec
    assert fake.launches[0][1].sig_off == ll.CLEAN_SIG_OFF           # the clean barrier's words
    fake.launches.clear()
    with mock.patch.object(torch.cuda, "is_current_stream_capturing", lambda: True):   # FAKE
        ops.low_latency_dispatch(x2, idx, M, E, use_fp8=False)
    assert LowLatencyBarrierSpec not in [type(s) for s, _ in fake.launches]


def test_fuse_env_keeps_the_phases_apart_on_a_gpu_of_their_own(monkeypatch):
    monkeypatch.delenv(variants.COMBINE_ENV, raising=False)
    monkeypatch.setenv(ll.FUSE_ENV, "0")
    ops, fake = fake_ll_ops(R, M, H, E, grids_overlap=False)
    y, idx, w, handle = ll_combine_inputs(ops, fake, M, H, E, K)
    fake.launches.clear()
    ops.low_latency_combine(y, idx, w, handle)
    assert [a.phases for _, a in fake.launches] == [1, 2]
    monkeypatch.setenv(ll.FUSE_ENV, "maybe")
    with pytest.raises(ValueError, match="EPGEN_LL_FUSE='maybe'"):
        fake_ll_ops(R, M, H, E, grids_overlap=False)


@pytest.mark.parametrize("call", [False], ids=["own-gpu"], indirect=True)
def test_per_rank_one_fused_launch(call, monkeypatch):
    monkeypatch.setenv(variants.COMBINE_ENV, "per_rank")
    [(spec, a)] = call()
    assert type(spec) is LowLatencyCombineRankSpec and type(a) is LowLatencyCombineRankArgs
    assert a.phases == 3 and a.call_epoch == 0
    assert a.wsig_off == ll.ROUTES_SIG_OFF
    # every format's halves are spaced alike (LogFMT-10's slot, larger than a BF16 row): at
    # this shape (8 experts a rank, under the hint's top-k of 11) [E][M] of them
    assert a.half_bytes == E * M * layout_facts.ll_combine_slot_bytes(H) > E * M * 2 * H
    assert ctypes.sizeof(a) > ctypes.sizeof(LowLatencyCombineArgs)


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


# -- combine wire formats (use_logfmt / wire_format): the spec field, the refusals ---------------
@pytest.mark.parametrize("kw, want", [({}, ""), ({"use_logfmt": True}, "logfmt10"),
                                      ({"wire_format": "logfmt10"}, "logfmt10"),
                                      ({"wire_format": "fp8_e4m3_f32_128"}, "fp8_e4m3_f32_128"),
                                      ({"wire_format": "bf16"}, ""),
                                      ({"wire_format": formats.FP8_E4M3_F32_128},
                                       "fp8_e4m3_f32_128")])
def test_combine_format_is_the_spec_field(call, monkeypatch, kw, want):
    monkeypatch.delenv(variants.COMBINE_ENV, raising=False)
    (s1, _), (s2, _) = call(**kw)
    assert type(s1) is LowLatencyCombineSpec and s1.wire_format == want and s1 == s2


def test_combine_format_runs_the_per_expert_kernel_under_per_rank(call, monkeypatch):
    monkeypatch.setenv(variants.COMBINE_ENV, "per_rank")
    launches = call(wire_format="fp8_e4m3_f32_128")
    assert [type(s) for s, _ in launches] == [LowLatencyCombineSpec] * 2
    assert launches[0][0].wire_format == "fp8_e4m3_f32_128"


@pytest.mark.parametrize("kw, match", [
    ({"use_logfmt": True, "zero_copy": True}, r"zero_copy=True: needs the bf16 combine format"),
    ({"wire_format": "fp8_e4m3_f32_128", "zero_copy": True}, r"zero_copy=True"),
    ({"wire_format": "mxfp8"}, r"wire_format='mxfp8': a low-latency combine sends one of"),
    ({"wire_format": "fp8_e4m3_f32_128", "use_logfmt": True},
     r"wire_format='fp8_e4m3_f32_128': conflicts with use_logfmt=True"),
])
def test_combine_format_errors_before_any_launch(call, kw, match):
    with pytest.raises(ValueError, match=match):
        call(**kw)
    assert call.fake.launches == []


def test_combine_area_holds_the_largest_message():
    # LogFMT-10's BF16 fallback plus its metadata (templates/ll_combine_wire.cuh kLogfmtBytes),
    # per slot, in both halves of the receive area and in the staging area.
    for hidden in (2880, 4096, 7168):
        slot = ll.combine_slot_bytes(hidden)
        assert slot == (2 * hidden + 4 * ((hidden + 127) // 128) + 15) // 16 * 16
        lay = ll._data_layout(M, hidden, R, E)
        assert lay["comb_recv"] - lay["comb_send"] >= E * M * slot
        assert ll.low_latency_rdma_size_hint(M, hidden, R, E) - lay["comb_recv"] >= \
            2 * layout_facts.ll_combine_recv_rows(M, R, E, layout_facts.LL_HINT_TOPK) * slot


def test_combine_spec_format_rules():
    from epgen.jit.specs import SpecError
    base = dict(hidden=H, num_topk=K, num_experts=E, num_ranks=R)
    with pytest.raises(SpecError, match=r"wire_format='fp4': must be one of"):
        LowLatencyCombineSpec(**base, wire_format="fp4")
    with pytest.raises(SpecError, match="per-rank combine sends BF16 partial sums only"):
        LowLatencyCombineRankSpec(**base, wire_format="logfmt10")
    bf16, lf = LowLatencyCombineSpec(**base), LowLatencyCombineSpec(**base, wire_format="logfmt10")
    assert "wire_format" not in bf16.describe() and bf16.name != lf.name
    assert (bf16.wire_format_code, lf.wire_format_code) == (0, 2)


# -- received-scale layouts (recv_scale_layout): the spec field, the outputs, the refusals --------
def _dispatch(**kw):
    ops, fake = fake_ll_ops(R, M, H, E)
    g = torch.Generator().manual_seed(1)
    x = fake_cuda(torch.randn(M, H, generator=g).to(torch.bfloat16))
    idx = fake_cuda(torch.randn(M, E, generator=g).topk(K, dim=-1).indices)
    out, *_ = ops.low_latency_dispatch(x, idx, M, E, **kw)
    return out, fake.launches


RM, EL = R * M, E // R


@pytest.mark.parametrize("kw, layout, cols", [
    ({}, "", 2),                                                       # DeepEP's, unchanged
    ({"recv_scale_layout": "deepep"}, "", 2),
    ({"recv_scale_layout": "deepgemm"}, "deepgemm", 2),
    ({"round_scale": True, "use_ue8m0": True, "recv_scale_layout": "deepgemm"}, "deepgemm", 1),
    ({"wire_format": "mxfp8", "recv_scale_layout": "deepgemm"}, "deepgemm", 2),
])
def test_mn_major_scale_layouts(kw, layout, cols):
    (recv_x, scales), launches = _dispatch(**kw)
    spec, args = launches[0]
    assert spec.recv_scale_layout == layout and args.recv_scales == scales.data_ptr()
    rows = (RM + 3) // 4 * 4 if layout else RM       # RM = 32: the same strides either way here
    assert scales.shape == (EL, RM, cols) and scales.stride() == (cols * rows, 1, rows)


def test_deepgemm_layout_pads_the_rows_to_16_bytes():
    ops, fake = fake_ll_ops(R, M, H, E)
    x = fake_cuda(torch.zeros(7, H, dtype=torch.bfloat16))
    idx = fake_cuda(torch.arange(K).repeat(7, 1))
    for layout, rows in (("deepep", 14), ("deepgemm", 16)):     # M = 7 per rank: RM = 14
        (_, s), *_ = ops.low_latency_dispatch(x, idx, 7, E, recv_scale_layout=layout)
        assert s.shape == (EL, 14, 2) and s.stride() == (2 * rows, 1, rows), layout


@pytest.mark.parametrize("fmt, words", [("mxfp8", 2), ("nvfp4", 4)])
def test_cutlass_128x4_layout(fmt, words):
    out, launches = _dispatch(wire_format=fmt, recv_scale_layout="cutlass_128x4")
    spec, args = launches[0]
    assert spec.recv_scale_layout == "cutlass_128x4"
    tiles = out[1]
    assert tiles.dtype == torch.uint8 and tiles.shape == (EL, 128 * 4 * words)  # RM 32 -> 128
    assert args.recv_scales == tiles.data_ptr()
    if fmt == "nvfp4":                   # the global scales right after every expert's tiles
        g = out[2]
        assert g.dtype == torch.float32 and g.shape == (EL, RM)
        assert g.data_ptr() == tiles.data_ptr() + tiles.numel()
    else:
        assert len(out) == 2


@pytest.mark.parametrize("kw, match", [
    ({"recv_scale_layout": "tiled"}, r"recv_scale_layout='tiled': must be one of"),
    ({"recv_scale_layout": "cutlass_128x4"},
     r"recv_scale_layout='cutlass_128x4': is a layout of \('mxfp8', 'nvfp4'\), not of "
     r"fp8_e4m3_f32_128"),
    ({"wire_format": "nvfp4", "recv_scale_layout": "deepgemm"},
     r"recv_scale_layout='deepgemm': is a layout of .*, not of nvfp4"),
    ({"use_fp8": False, "recv_scale_layout": "deepep"}, r"recv_scale_layout='deepep': bf16"),
])
def test_scale_layout_errors_before_any_launch(kw, match):
    with pytest.raises(ValueError, match=match):
        _dispatch(**kw)


# -- opaque rows (wire_format "opaque<R>[+<S>]"): bytes moved as they are -----------------------
def _opaque_dispatch(x, wire_format, hidden=H, **kw):
    ops, fake = fake_ll_ops(R, M, H, E)
    g = torch.Generator().manual_seed(2)
    idx = fake_cuda(torch.randn(M, E, generator=g).topk(K, dim=-1).indices)
    out, _, handle, _, _ = ops.low_latency_dispatch(x, idx, M, E, wire_format=wire_format,
                                                    hidden=hidden, **kw)
    return out, handle, fake.launches


def test_opaque_rows_and_side_rows_launch_as_bytes():
    data = fake_cuda(torch.zeros(M, 48, dtype=torch.float8_e4m3fn))        # 48-byte rows...
    side = fake_cuda(torch.zeros(M, 8, dtype=torch.int32))                 # ...32 side bytes
    (recv_x, recv_side), handle, launches = _opaque_dispatch((data, side), "opaque48+32")
    (spec, send), (_, recv) = launches
    assert spec.wire_format == "opaque48+32" and not spec.use_fp8
    assert spec.constants()["wire_format_code"] == 3
    assert (spec.constants()["opaque_row_bytes"], spec.constants()["opaque_side_bytes"]) == (48, 32)
    assert spec.payload_bytes == 80 and spec.hidden == H and handle[3] == H   # combine's hidden
    assert send.x == data.data_ptr() and send.x_side == side.data_ptr() == recv.x_side
    assert recv_x.dtype == torch.float8_e4m3fn and recv_x.shape == (EL, RM, 48)
    assert recv_side.dtype == torch.int32 and recv_side.shape == (EL, RM, 8)
    assert send.recv_x == recv_x.data_ptr() and send.recv_scales == recv_side.data_ptr()


def test_opaque_rows_alone_keep_their_dtype():
    x = fake_cuda(torch.zeros(M, 2 * H, dtype=torch.uint8))                # a whole BF16 row's room
    recv_x, _, [(spec, send), _] = _opaque_dispatch(x, f"opaque{2 * H}")
    assert recv_x.dtype == torch.uint8 and recv_x.shape == (EL, RM, 2 * H)
    assert send.x_side == 0 and send.recv_scales == 0 and spec.payload_bytes == 2 * H


def test_opaque_kernel_names_differ_by_width():
    base = dict(hidden=H, num_topk=K, num_experts=E, num_ranks=R, use_fp8=False)
    from epgen.jit.specs import LowLatencyDispatchSpec
    a, b = (LowLatencyDispatchSpec(**base, wire_format=f) for f in ("opaque48", "opaque48+16"))
    assert a.name != b.name and a.name.startswith("ll_dispatch_opaque48_h")
    assert "opaque48s16" in b.name


_U8 = torch.uint8


@pytest.mark.parametrize("x, fmt, kw, match", [
    ((M, 40), "opaque40", {}, r"row_bytes=40: must be a positive multiple of 16"),
    (((M, 48), (M, 8)), "opaque48+8", {}, r"wire_format='opaque48\+8': low-latency dispatch "
                                          r"moves opaque rows and side rows of multiples of 16 "
                                          r"bytes \(its side has 8\)"),
    ((M, 48), "opaque48", {"hidden": None}, r"hidden=None: opaque48 needs the combine's hidden"),
    ((M, 48), "opaque48", {"hidden": 16}, r"wire_format='opaque48': rows of 48 bytes plus side "
                                          r"rows of 0 must fit 2 \* hidden = 32 bytes"),
    ((M, 48), "opaque48", {"hidden": 200}, r"hidden=200: must be a multiple of 16"),
    ((M, 32), "opaque48", {}, r"x.shape\[1\]=32: rows of 32 bytes; opaque48 has 48-byte rows"),
    ((M, 48), "opaque48+16", {}, r"x=.*opaque48\+16 needs \(x, x_scales\)"),
    ((M, 48), "opaque48", {"use_fp8": False}, r"wire_format='opaque48': conflicts with "
                                              r"use_fp8=False"),
    ((M, 48), "opaque48", {"round_scale": True}, r"conflicts with use_fp8=True, round_scale=True"),
    ((M, 48), "opaque48", {"recv_scale_layout": "deepgemm"}, r"recv_scale_layout='deepgemm': "
                                                             r"is a layout of"),
])
def test_opaque_errors_before_any_launch(x, fmt, kw, match):
    def make(shape):
        return fake_cuda(torch.zeros(*shape, dtype=_U8))
    x = tuple(make(s) for s in x) if isinstance(x[0], tuple) else make(x)
    kw = {"hidden": H, **kw}
    ops, fake = fake_ll_ops(R, M, H, E)
    idx = fake_cuda(torch.arange(K).repeat(M, 1))
    with pytest.raises(ValueError, match=match):
        ops.low_latency_dispatch(x, idx, M, E, wire_format=fmt, **kw)
    assert fake.launches == []


def test_opaque_misaligned_side_refused():
    ops, fake = fake_ll_ops(R, M, H, E)
    side = fake_cuda(torch.zeros(M * 16 + 4, dtype=_U8)[4:].view(M, 16))
    with pytest.raises(ValueError, match=r"x\[1\].data_ptr\(\)=.*must be 16-byte aligned"):
        ops.low_latency_dispatch((fake_cuda(torch.zeros(M, 48, dtype=_U8)), side),
                                 fake_cuda(torch.arange(K).repeat(M, 1)), M, E,
                                 wire_format="opaque48+16", hidden=H)
    assert fake.launches == []


def test_hidden_only_with_opaque():
    with pytest.raises(ValueError, match=r"hidden=256: is given for opaque wire formats only"):
        _dispatch(hidden=H)


def test_a_top_k_the_region_was_not_sized_for_is_refused_before_any_launch():
    """The combine's receive halves hold min(top-k, experts per rank) rows per token and rank,
    for top-k up to the hint's num_topk (11 unless told): a larger top-k is refused at the
    dispatch and at the combine, naming the bytes and the hint's argument, before any launch;
    a region sized with num_topk=16 takes it."""
    E16 = 32                                   # 16 experts a rank: top-16 needs 16 rows, not 11
    ops, fake = fake_ll_ops(R, M, H, E16)
    g = torch.Generator().manual_seed(5)
    x = fake_cuda(torch.randn(M, H, generator=g).to(torch.bfloat16))
    idx = fake_cuda(torch.randn(M, E16, generator=g).topk(16, dim=-1).indices)
    need = ll.low_latency_rdma_size_hint(M, H, R, E16, 16)
    with pytest.raises(ValueError, match=rf"num_rdma_bytes=\d+: too small .*num_topk=16: needs "
                                         rf"{need} bytes .*num_topk=K"):
        ops.low_latency_dispatch(x, idx, M, E16, use_fp8=False)
    assert fake.launches == []
    ops16, fake16 = fake_ll_ops(R, M, H, E16, num_topk=16)
    y, idx16, w, handle = ll_combine_inputs(ops16, fake16, M, H, E16, 16)
    ops16.low_latency_combine(y, idx16, w, handle)
    assert [a.phases for _, a in fake16.launches] == [1, 2]
    fake16.launches.clear()
    with pytest.raises(ValueError, match=r"num_topk=16: needs"):
        ops.low_latency_combine(y, idx16, w, handle)     # the default-sized region
    assert fake.launches == []
