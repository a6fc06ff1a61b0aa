"""The serving and training frameworks' DeepEP call patterns, replayed against epgen.

Each case follows one framework's source (cited in its docstring: repository, commit, file,
function): how it sizes and constructs the Buffer (arguments as it passes them, keywords where
it uses keywords), the events, hooks and graphs around its calls, and what it reads back. The
simulated experts are fixed functions, so every output is checked against epgen.reference.

What none of them does, and so is not replayed here: get_next_low_latency_combine_buffer and
zero-copy combine (vLLM passes zero_copy=False, "TODO: enable zero copy mode"; SGLang and
Megatron never ask; test_low_latency_gpu covers both); an explicit destroy() (vLLM's DeepEP
managers' destroy() does nothing, SGLang and Megatron keep their Buffer until exit, where epgen
finalizes NVSHMEM). The replays destroy their Buffers only to make room for the next one.
"""
from __future__ import annotations

import os

import pytest

from tests import gpu_harness
from tests import test_low_latency_gpu as tl
from tests import test_normal_gpu as tn

pytestmark = pytest.mark.gpu

VLLM = "vllm-project/vllm"
SGLANG = "sgl-project/sglang"
MEGATRON = "NVIDIA/Megatron-LM"
M = tl.M                       # low-latency num_max_dispatch_tokens_per_rank (SGLang's default)
LOCAL_EXPERTS = 16


# -- shared checks ---------------------------------------------------------------------------
def _normal_case(cid, R, H, K, E, fp8):
    """Every rank's inputs (regenerated on each rank): (xs, scales, idxs, weights, in_ranks)."""
    from epgen import reference as ref
    ins = [tn._inputs(cid, r, 256 + 37 * r, H, K, E, R) for r in range(R)]
    xs = [i[0].cuda() for i in ins]
    idxs, ws = [i[1].cuda() for i in ins], [i[2].cuda() for i in ins]
    scales = None
    if fp8:
        q = [ref.per_token_cast_to_fp8(x) for x in xs]
        xs, scales = [a for a, _ in q], [s for _, s in q]
    return xs, scales, idxs, ws, [ref.get_dispatch_layout(i, E, R)[2] for i in idxs]


def _x_in(case, rank):
    xs, scales = case[0], case[1]
    return xs[rank] if scales is None else (xs[rank], scales[rank])


def _check_normal_dispatch(rank, case, E, recv, r_idx, r_w, counts, align=1):
    from epgen import reference as ref
    xs, scales, idxs, ws, in_ranks = case
    exp = ref.dispatch(xs, idxs, ws, E, rank, expert_alignment=align, x_scales=scales,
                       is_token_in_ranks=in_ranks)
    rx, rs = recv if scales is not None else (recv, None)
    tn._eq("recv_x", rx, exp.recv_x)
    if scales is not None:
        tn._eq("recv_x_scales", rs, exp.recv_x_scales)
    if r_idx is not None:
        tn._eq("recv_topk_idx", r_idx, exp.recv_topk_idx)
        tn._eq("recv_topk_weights", r_w, exp.recv_topk_weights)
        assert counts == exp.num_recv_tokens_per_expert_list, \
            f"num_recv_tokens_per_expert_list {counts} != {exp.num_recv_tokens_per_expert_list}"


def _expert_rows(cid, R, in_ranks, H, K=None):
    """Every rank's simulated expert outputs (and weights), in its receive order."""
    import torch
    g = torch.Generator().manual_seed(7 * cid + 3)
    rows = [sum(int(m[:, j].sum()) for m in in_ranks) for j in range(R)]
    ys = [torch.randn(rows[j], H, generator=g).to(torch.bfloat16).cuda() for j in range(R)]
    ws = None if K is None else [torch.randn(rows[j], K, generator=g).float().cuda()
                                 for j in range(R)]
    return ys, ws


def _check_normal_combine(rank, case, ys, got, got_w=None, cws=None):
    from epgen import reference as ref
    exp = ref.combine(ys, case[4], rank, topk_weights=cws)
    tn._eq("combined_x", got, exp.combined_x)
    if cws is not None:
        tn._eq("combined_topk_weights", got_w, exp.combined_topk_weights)


def _ll_case(cid, R, H, K, E):
    tokens = [M] * R
    tokens[-1] = M - 3
    return tl._all_inputs(cid, R, tokens, H, K, E)


# -- vLLM ------------------------------------------------------------------------------------
def _vllm_ht(rank, R):
    """vLLM high-throughput (normal mode).
    Buffer: vllm-project/vllm e04bcc7fa012f96e9a51e2e1d7984351f5ef8d8f,
    vllm/distributed/device_communicators/all2all.py, DeepEPHTAll2AllManager._make_all2all_kwargs
    / get_handle (Buffer(**kwargs) on the gloo cpu_group, num_nvl_bytes = VLLM_DEEPEP_BUFFER_SIZE_MB
    (1024) MiB, num_rdma_bytes=0, num_qps_per_rank=1) and set_num_sms (only ever lowers 20).
    Calls: vllm-project/vllm 583ce6bcdd95d3f003c96f2d41d0fd0135db0aab,
    vllm/model_executor/layers/fused_moe/prepare_finalize/deepep_ht.py,
    DeepEPHTPrepareAndFinalize._do_dispatch / _receiver / _finalize: layout with keywords and
    no async, dispatch with async_finish=True (or, under dual-batch overlap, previous_event =
    Buffer.capture() and async_finish=False), `if event.event is not None: wait`, combine with
    topk_weights=None and the Buffer's configs, output.copy_(combined_x)."""
    import torch
    import torch.distributed as dist
    import epgen
    cpu_group = dist.new_group(backend="gloo")
    buf = epgen.Buffer(**dict(group=cpu_group, num_nvl_bytes=1024 * 1024 * 1024,
                              num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=1))
    H, K, E = 4096, 8, LOCAL_EXPERTS * R
    try:
        for cid, (fp8, dbo) in enumerate(((False, False), (True, False), (False, True))):
            case = _normal_case(600 + cid, R, H, K, E, fp8)
            idx, w = case[2][rank], case[3][rank]
            prev = buf.capture() if dbo else None
            per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(
                topk_idx=idx, num_experts=E, previous_event=prev, async_finish=False,
                allocate_on_comm_stream=False)
            recv, r_idx, r_w, counts, handle, event = buf.dispatch(
                x=_x_in(case, rank), handle=None, num_tokens_per_rank=per_rank,
                num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w,
                expert_alignment=1, config=epgen.Buffer.get_dispatch_config(R),
                previous_event=prev, async_finish=not dbo, allocate_on_comm_stream=False)
            if event.event is not None:
                event.current_stream_wait()
            _check_normal_dispatch(rank, case, E, recv, r_idx, r_w, counts)
            ys, _ = _expert_rows(600 + cid, R, case[4], H)
            prev = buf.capture() if dbo else None
            combined_x, _, event = buf.combine(
                x=ys[rank], handle=handle, topk_weights=None,
                config=epgen.Buffer.get_combine_config(R), previous_event=prev,
                async_finish=not dbo, allocate_on_comm_stream=False)
            if event.event is not None:
                event.current_stream_wait()
            output = torch.empty_like(combined_x)
            output.copy_(combined_x, non_blocking=True)
            torch.cuda.synchronize()
            buf.check_errors()
            _check_normal_combine(rank, case, ys, output)
    finally:
        torch.cuda.synchronize()
        buf.destroy()


def _vllm_ll(rank, R):
    """vLLM low latency.
    Buffer: vllm-project/vllm e04bcc7fa012f96e9a51e2e1d7984351f5ef8d8f,
    vllm/distributed/device_communicators/all2all.py, DeepEPLLAll2AllManager._make_all2all_kwargs
    (gloo cpu_group, num_nvl_bytes 1024 MiB, num_rdma_bytes from get_low_latency_rdma_size_hint
    called with keywords, num_qps_per_rank = local experts, allow_nvlink_for_low_latency_mode=True,
    allow_mnnvl=False).
    Calls: vllm-project/vllm bf1a7d179021b038646caea0483d53ab58fe32ff,
    vllm/model_executor/layers/fused_moe/prepare_finalize/deepep_ll.py,
    DeepEPLLPrepareAndFinalize.prepare_async (dispatch with return_recv_hook=True, the hook run
    before the experts; use_fp8 with round_scale = use_ue8m0 when the experts take packed UE8M0
    scales) and _finalize (combine into out=output, zero_copy=False, return_recv_hook only under
    dual-batch overlap, whose two micro-batches keep a handle each: handles[a2a_idx]); the
    decode forward runs inside vLLM's full CUDA graph."""
    import torch
    import torch.distributed as dist
    import epgen
    H, K, E = 4096, 8, LOCAL_EXPERTS * R
    cpu_group = dist.new_group(backend="gloo")
    buf = epgen.Buffer(**dict(
        group=cpu_group, num_nvl_bytes=1024 * 1024 * 1024,
        num_rdma_bytes=epgen.Buffer.get_low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank=M, hidden=H, num_ranks=R, num_experts=E),
        low_latency_mode=True, num_qps_per_rank=LOCAL_EXPERTS,
        allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False))

    def prepare(ins, fp8, ue8m0):
        x, idx, _ = ins[rank]
        expert_x, expert_num_tokens, handle, _, hook = buf.low_latency_dispatch(
            x, idx, M, E, use_fp8=fp8, round_scale=ue8m0, use_ue8m0=ue8m0,
            async_finish=False, return_recv_hook=True)
        return expert_x, expert_num_tokens, handle, hook

    def finalize(ins, y, handle, do_recv_hook, output):
        _, idx, w = ins[rank]
        _, _, recv_hook = buf.low_latency_combine(y, idx, w, handle, async_finish=False,
                                                  zero_copy=False,
                                                  return_recv_hook=do_recv_hook, out=output)
        return recv_hook

    def out_like(ins):
        return torch.empty(ins[rank][0].shape, dtype=torch.bfloat16, device="cuda")

    try:
        for cid, (fp8, ue8m0) in enumerate(((True, False), (False, False), (True, True))):
            ins = _ll_case(700 + cid, R, H, K, E)
            expert_x, count, handle, hook = prepare(ins, fp8, ue8m0)
            hook()
            torch.cuda.synchronize()
            buf.check_errors()
            tl._check_dispatch(rank, ins, E, (expert_x, count, handle), fp8, ue8m0, ue8m0)
            y = tl._expert_out(expert_x, fp8, H)
            output = out_like(ins)
            finalize(ins, y, handle, False, output)   # its hook is returned unused
            torch.cuda.synchronize()
            buf.check_errors()
            tl._check_combine(rank, ins, y, handle, output)

        # Dual-batch overlap: micro-batch 1's dispatch receive comes after micro-batch 0's
        # combine send; each keeps its own handle.
        u = [_ll_case(710 + i, R, H, K, E) for i in range(2)]
        d0, d1 = prepare(u[0], True, False), prepare(u[1], True, False)
        d0[3]()
        y0 = tl._expert_out(d0[0], True, H)
        out0 = out_like(u[0])
        c0 = finalize(u[0], y0, d0[2], True, out0)
        d1[3]()
        y1 = tl._expert_out(d1[0], True, H)
        out1 = out_like(u[1])
        c1 = finalize(u[1], y1, d1[2], True, out1)
        c0()
        c1()
        torch.cuda.synchronize()
        buf.check_errors()
        for ins, d, y, out in ((u[0], d0, y0, out0), (u[1], d1, y1, out1)):
            tl._check_dispatch(rank, ins, E, d[:3], True, False, False)
            tl._check_combine(rank, ins, y, d[2], out)

        # The decode step inside a CUDA graph (hook called inside the capture), replayed.
        sx, sidx, sw = (t.clone() for t in tl._all_inputs(720, R, [M] * R, H, K, E)[rank])
        sout = torch.empty(M, H, dtype=torch.bfloat16, device="cuda")

        def step():
            expert_x, count, handle, hook = prepare([(sx, sidx, sw)] * R, True, False)
            hook()
            y = tl._expert_out(expert_x, True, H)
            finalize([(sx, sidx, sw)] * R, y, handle, False, sout)
            return expert_x, count, handle, y
        step()                                          # compiles outside the capture
        torch.cuda.synchronize()
        g, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
            expert_x, count, handle, y = step()
        torch.cuda.current_stream().wait_stream(s)
        for rep in range(3):
            full = tl._all_inputs(721 + rep, R, [M] * R, H, K, E)
            for dst, src in zip((sx, sidx, sw), full[rank]):
                dst.copy_(src)
            g.replay()
            torch.cuda.synchronize()
            buf.check_errors()
            tl._check_dispatch(rank, full, E, (expert_x, count, handle), True, False, False)
            tl._check_combine(rank, full, y, handle, sout)
    finally:
        torch.cuda.synchronize()
        buf.destroy()


# -- SGLang ----------------------------------------------------------------------------------
def _sglang_auto(rank, R):
    """SGLang's DeepEP dispatcher in "auto" mode: one Buffer for prefill (normal) and decode
    (low latency). sgl-project/sglang 454e84dab2724394593c1e166acebe656b503ba7,
    python/sglang/srt/layers/moe/token_dispatcher/deepep.py:
    DeepEPBuffer.get_deepep_buffer (num_nvl_bytes / num_rdma_bytes = the max of both Configs'
    hints and the low-latency hint, num_qps_per_rank = max(num_sms, experts / ranks),
    low_latency_mode=True, allow_mnnvl=True), DeepEPBuffer.clean_buffer (on the switch from
    normal to low latency), _DeepEPDispatcherImplNormal._dispatch_core / _combine_core
    (async_finish with previous_event = Buffer.capture() and allocate_on_comm_stream, FP8
    tokens with per-128 scales, expert_alignment=128 for DeepGEMM, config=None) and
    _DeepEPDispatcherImplLowLatency._dispatch_core / _combine_core (async_finish = not
    return_recv_hook; the hook under two-batch overlap; expected_m from buffer.group_size)."""
    import torch
    import torch.distributed as dist
    from epgen import Buffer
    H, K, E = 7168, 8, LOCAL_EXPERTS * R
    group = dist.group.WORLD
    num_nvl, num_rdma = 0, 0
    for config in (Buffer.get_dispatch_config(group.size()), Buffer.get_combine_config(group.size())):
        num_nvl = max(config.get_nvl_buffer_size_hint(H * 2, group.size()), num_nvl)
        num_rdma = max(config.get_rdma_buffer_size_hint(H * 2, group.size()), num_rdma)
    num_rdma = max(Buffer.get_low_latency_rdma_size_hint(M, H, group.size(), E), num_rdma)
    buf = Buffer(group, num_nvl, num_rdma, low_latency_mode=True,
                 num_qps_per_rank=max(Buffer.num_sms, E // group.size()), allow_mnnvl=True)
    try:
        for rnd in range(2):                       # prefill, decode, prefill again, decode
            case = _normal_case(800 + rnd, R, H, K, E, fp8=True)
            idx, w = case[2][rank], case[3][rank]
            prev = Buffer.capture()
            per_rank, per_rdma, per_expert, in_rank, prev = buf.get_dispatch_layout(
                idx, E, previous_event=prev, async_finish=True, allocate_on_comm_stream=True)
            recv, r_idx, r_w, counts, handle, event = buf.dispatch(
                _x_in(case, rank), topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank,
                num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert, previous_event=prev, async_finish=True,
                allocate_on_comm_stream=True, expert_alignment=128, config=None)
            event.current_stream_wait()
            _check_normal_dispatch(rank, case, E, recv, r_idx, r_w, counts, align=128)
            ys, _ = _expert_rows(800 + rnd, R, case[4], H)
            prev = Buffer.capture()
            combined_x, _, event = buf.combine(ys[rank], handle, async_finish=True,
                                               previous_event=prev,
                                               allocate_on_comm_stream=True, config=None)
            event.current_stream_wait()
            torch.cuda.synchronize()
            buf.check_errors()
            _check_normal_combine(rank, case, ys, combined_x)

            if buf.low_latency_mode:               # DeepEPBuffer.clean_buffer
                buf.clean_low_latency_buffer(M, H, E)
            for hooked in (False, True):
                ins = _ll_case(810 + 2 * rnd + hooked, R, H, K, E)
                x, idx, w = ins[rank]
                expected_m = (x.shape[0] * buf.group_size * K + E) // E
                assert expected_m >= 1
                recv, masked_m, handle, event, hook = buf.low_latency_dispatch(
                    x, idx, M, E, use_fp8=True, async_finish=not hooked,
                    return_recv_hook=hooked, round_scale=False, use_ue8m0=False)
                hook() if hooked else event.current_stream_wait()
                torch.cuda.synchronize()
                buf.check_errors()
                tl._check_dispatch(rank, ins, E, (recv, masked_m, handle), True, False, False)
                y = tl._expert_out(recv, True, H)
                combined, event, hook = buf.low_latency_combine(
                    x=y, topk_idx=idx, topk_weights=w, handle=handle, async_finish=not hooked,
                    return_recv_hook=hooked)
                hook() if hooked else event.current_stream_wait()
                torch.cuda.synchronize()
                buf.check_errors()
                tl._check_combine(rank, ins, y, handle, combined)
    finally:
        torch.cuda.synchronize()
        buf.destroy()


# -- Megatron --------------------------------------------------------------------------------
def _megatron(rank, R):
    """Megatron's fused all-to-all (training: forward and backward). NVIDIA/Megatron-LM
    7afe031974dad95b4063977e92850f7bf2575851 (last change of the file, HEAD d98e8a64dd),
    megatron/core/transformer/moe/fused_a2a.py: get_buffer (Buffer(group, nvl, rdma) from both
    Configs' hints for hidden_bytes = hidden * max(element size, 2), reused while group and
    sizes still fit), FusedDispatch.forward (previous_event = EventOverlap(EventHandle()),
    layout and dispatch with async_finish and allocate_on_comm_stream, the layout's event as
    the dispatch's previous_event, float32 probs), FusedCombine.forward (combine with a fresh
    previous event), FusedCombine.backward (cached dispatch of the gradient with the handle)
    and FusedDispatch.backward (combine of the gradient with topk_weights = grad probs)."""
    import torch
    import torch.distributed as dist
    from epgen import Buffer
    from epgen.runtime.events import EventHandle, EventOverlap   # deep_ep.utils's names
    H, K, E = 4096, 8, LOCAL_EXPERTS * R
    group = dist.new_group(list(range(R)))          # the expert-parallel group

    def get_buffer(current, hidden_bytes):
        num_nvl, num_rdma = 0, 0
        for config in (Buffer.get_dispatch_config(group.size()),
                       Buffer.get_combine_config(group.size())):
            num_nvl = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl)
            num_rdma = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma)
        if (current is None or current.group != group or current.num_nvl_bytes < num_nvl
                or current.num_rdma_bytes < num_rdma):
            return Buffer(group, num_nvl, num_rdma)
        return current

    case = _normal_case(900, R, H, K, E, fp8=False)
    x, idx, probs = case[0][rank], case[2][rank], case[3][rank]
    hidden_bytes = x.size(1) * max(x.element_size(), 2)
    buf = get_buffer(None, hidden_bytes)
    try:
        assert get_buffer(buf, hidden_bytes) is buf, "Megatron's get_buffer would reallocate"
        # FusedDispatch.forward
        previous_event = EventOverlap(EventHandle())
        per_rank, per_rdma, per_expert, in_rank, event = buf.get_dispatch_layout(
            idx, E, previous_event=previous_event, async_finish=True,
            allocate_on_comm_stream=True)
        recv_x, recv_idx, recv_probs, counts, handle, after = buf.dispatch(
            x, topk_idx=idx, topk_weights=probs, num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, previous_event=event, async_finish=True,
            allocate_on_comm_stream=True)
        after.current_stream_wait()
        tokens_per_expert = torch.tensor(counts)
        assert tokens_per_expert.shape == (LOCAL_EXPERTS,)
        _check_normal_dispatch(rank, case, E, recv_x, recv_idx, recv_probs, counts)
        # FusedCombine.forward
        ys, cws = _expert_rows(900, R, case[4], H, K)
        combined_x, _, after = buf.combine(ys[rank], handle=handle, async_finish=True,
                                           previous_event=EventOverlap(EventHandle()),
                                           allocate_on_comm_stream=True)
        after.current_stream_wait()
        _check_normal_combine(rank, case, ys, combined_x)
        # FusedCombine.backward: the gradient goes out along the same layout (cached dispatch)
        from epgen import reference as ref
        grads = [torch.randn(t.shape, generator=torch.Generator().manual_seed(950 + r))
                 .to(torch.bfloat16).cuda() for r, t in enumerate(case[0])]
        grad_x, *rest, after = buf.dispatch(grads[rank].contiguous(), handle=handle,
                                            previous_event=EventOverlap(EventHandle()),
                                            async_finish=True, allocate_on_comm_stream=True)
        after.current_stream_wait()
        assert all(v is None for v in rest[:3]), "cached dispatch returns Nones"
        exp = ref.dispatch(grads, None, None, E, rank, is_token_in_ranks=case[4], cached=True)
        tn._eq("cached dispatch of the gradient", grad_x, exp.recv_x)
        # FusedDispatch.backward: the gradient comes back with its probs' gradient
        grad_in, grad_probs, after = buf.combine(ys[rank], handle, topk_weights=cws[rank].float(),
                                                 previous_event=EventOverlap(EventHandle()),
                                                 async_finish=True, allocate_on_comm_stream=True)
        after.current_stream_wait()
        torch.cuda.synchronize()
        buf.check_errors()
        _check_normal_combine(rank, case, ys, grad_in, grad_probs, cws)
    finally:
        torch.cuda.synchronize()
        buf.destroy()


# -- the run ---------------------------------------------------------------------------------
PATTERNS = [
    ("vLLM high-throughput (DeepEPHTPrepareAndFinalize)", _vllm_ht),
    ("vLLM low-latency (DeepEPLLPrepareAndFinalize, dual-batch overlap, CUDA graph)", _vllm_ll),
    ("SGLang auto mode (normal prefill + low-latency decode on one Buffer)", _sglang_auto),
    ("Megatron fused all-to-all (forward and backward)", _megatron),
]

QUICK = [1, 2]              # the quick tier: vLLM low latency, SGLang auto mode


def _worker(rank, world):
    os.environ.setdefault("EPGEN_TIMEOUT_S", gpu_harness.deadline_s(20))
    # Each pattern creates and destroys its own Buffer(s); the heap (sized once, at the first
    # Buffer) must hold the largest: vLLM's 1 GiB NVLink buffer beside its low-latency one.
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(4 << 30))
    import epgen
    # vLLM's DeepEPHTAll2AllManager.set_num_sms (it only lowers DeepEP's 20): here to this
    # process's share of the GPU, which every later normal-mode call (Config or default) uses.
    epgen.Buffer.set_num_sms(gpu_harness.usable_sms(20)[0])
    results = []
    try:
        tl._run_jobs(gpu_harness.select(
            [(name, lambda fn=fn: fn(rank, world)) for name, fn in PATTERNS], QUICK), results)
    finally:
        epgen.Buffer.set_num_sms(20)
    return results


@pytest.mark.parametrize("num_ranks", gpu_harness.rank_counts())
def test_serving_patterns(num_ranks):
    gpu_harness.require_gpus(num_ranks)
    bad = gpu_harness.failures(gpu_harness.run_ranks(num_ranks, _worker, timeout_s=280))
    assert not bad, "\n".join(bad)
