"""Reliability on N GPUs (issue 14): refusals before launch (misaligned tensors; property-based
argument checks), DeepEP's stream semantics in every order, counters across their wrap points
(two low-latency calls in flight across them too), the CUDA-graph rules of normal mode, a rank
5 s late, a stale payload that reads as a header after a shape change (the layout tag), a
combine on other SMs than its dispatch. Every result is compared with epgen.reference after
the Buffer's error word is read (buf.check_errors()).
Faults on purpose (deadlines, poisoned outputs, a killed rank): tests/test_faults_gpu.py.

One Buffer per worker holds both regions, so the layout, normal and low-latency families share
its stream bookkeeping, as a user's Buffer does.
"""
from __future__ import annotations

import itertools
import os

import pytest

from tests import gpu_harness
from tests import test_low_latency_gpu as llt
from tests import test_normal_gpu as nt

pytestmark = pytest.mark.gpu

M = llt.M                 # low-latency max tokens per rank
H = 2048                  # small rows: many calls, quickly
K = 8
LOCAL_EXPERTS = 8
NORMAL_TOKENS = 256


def _misaligned(t):
    """A contiguous copy of t starting 2 bytes past a 16-byte boundary (a view at an element
    offset, as x.view(-1)[1:] gives)."""
    import torch
    flat = torch.empty(t.numel() * t.element_size() + 64, dtype=torch.uint8, device=t.device)
    off = (16 - flat.data_ptr() % 16) % 16 + 2
    v = flat[off:off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
    v.copy_(t)
    assert v.is_contiguous() and v.data_ptr() % 16 == 2
    return v


def _refused(name, fn):
    try:
        fn()
    except ValueError as exc:
        msg = str(exc)
        assert msg.startswith(f"{name}.data_ptr()=") and "16-byte aligned" in msg, msg
    else:
        raise AssertionError(f"a misaligned {name} was accepted")


def _normal_inputs(cid, R, E, T=NORMAL_TOKENS, Hn=H):
    ins = [nt._inputs(cid, r, T + 5 * r, Hn, K, E, R) for r in range(R)]
    return [(x.cuda(), idx.cuda(), w.cuda()) for x, idx, w, _ in ins]


def _normal_dispatch(buf, rank, ins, E, **kw):
    x, idx, w = ins[rank]
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    return buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                        num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w, **kw)


def _check_normal_dispatch(rank, ins, E, out):
    from epgen import reference as ref
    recv, r_idx, r_w, counts, handle, _ = out
    exp = ref.dispatch([i[0] for i in ins], [i[1] for i in ins], [i[2] for i in ins], E, rank)
    nt._eq("recv_x", recv, exp.recv_x)
    nt._eq("recv_topk_idx", r_idx, exp.recv_topk_idx)
    nt._eq("recv_topk_weights", r_w, exp.recv_topk_weights)
    assert counts == exp.num_recv_tokens_per_expert_list, (counts, exp.num_recv_tokens_per_expert_list)


def _check_normal_combine(rank, ins, E, R, ys, combined):
    from epgen import reference as ref
    in_ranks = [ref.get_dispatch_layout(i[1], E, R)[2] for i in ins]
    nt._eq("combined_x", combined, ref.combine(ys, in_ranks, rank).combined_x)


# ---------------------------------------------------------------------------------- item 3
def _run_alignment(buf, rank, R, E):
    """Every row tensor a kernel reads or writes with 16-byte vectors is refused, naming it,
    when its address is not 16-byte aligned; nothing is launched, the Buffer stays usable."""
    import torch
    from epgen import reference as ref
    ins = _normal_inputs(10, R, E)
    x, idx, w = ins[rank]
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w)
    _refused("x", lambda: buf.dispatch(_misaligned(x), **args))
    xq, xs = ref.per_token_cast_to_fp8(x)
    _refused("x[0]", lambda: buf.dispatch((_misaligned(xq), xs), **args))
    out = buf.dispatch(x, **args)
    handle = out[4]
    y = out[0].clone()               # this rank's received rows as its expert output
    _refused("x", lambda: buf.combine(_misaligned(y), handle))
    bias = torch.zeros_like(x)
    _refused("bias[0]", lambda: buf.combine(y, handle, bias=_misaligned(bias)))
    torch.cuda.synchronize()
    buf.check_errors()
    combined, _, _ = buf.combine(y, handle)
    torch.cuda.synchronize()
    buf.check_errors()
    _check_normal_dispatch(rank, ins, E, out)
    _check_normal_combine(rank, ins, E, R, _gather_var(y), combined)

    lins = llt._all_inputs(11, R, [M] * R, H, K, E)
    lx, lidx, lw = lins[rank]
    _refused("x", lambda: buf.low_latency_dispatch(_misaligned(lx), lidx, M, E))
    recv, count, lhandle, _, _ = buf.low_latency_dispatch(lx, lidx, M, E, use_fp8=False)
    torch.cuda.synchronize()
    buf.check_errors()
    llt._check_dispatch(rank, lins, E, (recv, count, lhandle), False, False, False)
    y = llt._expert_out(recv, False, H)
    _refused("x", lambda: buf.low_latency_combine(_misaligned(y), lidx, lw, lhandle))
    nan_out = torch.full((M, H), float("nan"), dtype=torch.bfloat16, device="cuda")
    _refused("out", lambda: buf.low_latency_combine(y, lidx, lw, lhandle, out=_misaligned(nan_out)))
    combined, _, _ = buf.low_latency_combine(y, lidx, lw, lhandle)
    torch.cuda.synchronize()
    buf.check_errors()
    llt._check_combine(rank, lins, y, lhandle, combined)


def _gather_var(t):
    """all_gather of row tensors whose row counts differ by rank."""
    import torch
    import torch.distributed as dist
    n = torch.tensor([t.shape[0]], device=t.device)
    ns = [torch.empty_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(ns, n)
    top = int(max(v.item() for v in ns))
    pad = torch.zeros((top,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    pad[:t.shape[0]] = t
    out = [torch.empty_like(pad) for _ in ns]
    dist.all_gather(out, pad)
    return [o[:int(v.item())] for o, v in zip(out, ns)]


# ---------------------------------------------------------------------------------- item 2
LL_MODES = ("sync", "async", "hook", "graph")


class _LLGraphs:
    """One captured low-latency dispatch and one captured combine, replayed on new inputs
    copied into their static tensors (a graph replays fixed shapes: T = M)."""

    def __init__(self, buf, E):
        import torch
        self.buf, self.E = buf, E
        ins = llt._all_inputs(20, 1, [M], H, K, E)
        self.x, self.idx, self.w = (t.clone() for t in ins[0])
        El = E // buf.group_size
        R = buf.group_size
        # warm-up (compiles) outside the captures; also gives the combine's static inputs
        recv, _, handle, _, _ = buf.low_latency_dispatch(self.x, self.idx, M, E, use_fp8=False)
        self.y = llt._expert_out(recv, False, H)
        self.src = handle[0].clone()
        self.lay = handle[1].clone()
        self.handle = (self.src, self.lay, M, H, E)
        buf.low_latency_combine(self.y, self.idx, self.w, self.handle)
        torch.cuda.synchronize()
        buf.check_errors()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        self.gd, self.gc = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.stream(s):
            with torch.cuda.graph(self.gd, stream=s):
                self.recv, self.count, self.dhandle, _, _ = buf.low_latency_dispatch(
                    self.x, self.idx, M, E, use_fp8=False)
            with torch.cuda.graph(self.gc, stream=s):
                self.out, _, _ = buf.low_latency_combine(self.y, self.idx, self.w, self.handle)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        assert El * R == E

    def dispatch(self, x, idx):
        """Replay on the current stream; returns clones (stream-ordered, no host sync) so the
        next replay cannot overwrite what the test checks."""
        self.x.copy_(x)
        self.idx.copy_(idx)
        self.gd.replay()
        return (self.recv.clone(), self.count.clone(),
                (self.dhandle[0].clone(), self.dhandle[1].clone(), M, H, self.E))

    def combine(self, y, idx, w, handle):
        self.y.copy_(y)
        self.idx.copy_(idx)
        self.w.copy_(w)
        self.src.copy_(handle[0])
        self.lay.copy_(handle[1])
        self.gc.replay()
        return self.out.clone()


def _ll_call(buf, graphs, mode, op, *args):
    """One low-latency call in `mode`; returns (outputs, finish) where finish() completes it
    as a user would (hook, or wait for the event). Nothing is waited for before the next
    call is made."""
    if mode == "graph":
        out = graphs.dispatch(*args[:2]) if op == "dispatch" else graphs.combine(*args)
        return out, lambda: None
    kw = dict(async_finish=mode == "async", return_recv_hook=mode == "hook")
    if op == "dispatch":
        recv, count, handle, event, hook = buf.low_latency_dispatch(*args[:2], M, graphs.E,
                                                                    use_fp8=False, **kw)
        out = (recv, count, handle)
    else:
        combined, event, hook = buf.low_latency_combine(*args, **kw)
        out = combined

    def finish():
        if mode == "hook":
            hook()
        if mode == "async":
            event.current_stream_wait()
    return out, finish


def _run_ll_orders(buf, rank, R, E, graphs):
    """Every ordered pair of (sync, async, hook, graph) low-latency calls, back to back on
    one Buffer, for dispatch and for combine; both results checked. An async call followed
    by a graph replay is joined first: a replay is invisible to the Buffer (README)."""
    import torch
    for cid, (a, b) in enumerate(itertools.product(LL_MODES, repeat=2)):
        ins = [llt._all_inputs(1000 + 2 * cid + j, R, [M] * R, H, K, E) for j in range(2)]
        calls = []
        for j, mode in enumerate((a, b)):
            if j == 1 and a == "async" and mode == "graph":
                calls[0][1]()
            calls.append(_ll_call(buf, graphs, mode, "dispatch", ins[j][rank][0], ins[j][rank][1]))
        for _, finish in calls:
            finish()
        torch.cuda.synchronize()
        buf.check_errors()
        for j, (out, _) in enumerate(calls):
            try:
                llt._check_dispatch(rank, ins[j], E, out, False, False, False)
            except AssertionError as exc:
                raise AssertionError(f"dispatch {a} then {b}: call {j + 1}: {exc}") from exc
        ys = [llt._expert_out(out[0], False, H) for out, _ in calls]
        ccalls = []
        for j, mode in enumerate((a, b)):
            if j == 1 and a == "async" and mode == "graph":
                ccalls[0][1]()
            x, idx, w = ins[j][rank]
            ccalls.append(_ll_call(buf, graphs, mode, "combine", ys[j], idx, w, calls[j][0][2]))
        for _, finish in ccalls:
            finish()
        torch.cuda.synchronize()
        buf.check_errors()
        for j, (out, _) in enumerate(ccalls):
            try:
                llt._check_combine(rank, ins[j], ys[j], calls[j][0][2], out)
            except AssertionError as exc:
                raise AssertionError(f"combine {a} then {b}: call {j + 1}: {exc}") from exc


NORMAL_MODES = ("sync", "async", "previous_event", "allocate_on_comm_stream")


def _normal_kw(buf, mode):
    if mode == "sync":
        return {}
    if mode == "async":
        return dict(async_finish=True)
    kw = dict(async_finish=True, previous_event=buf.capture())
    if mode == "allocate_on_comm_stream":
        kw["allocate_on_comm_stream"] = True
    return kw


def _run_normal_orders(buf, rank, R, E):
    """Every ordered pair of normal-mode dispatch / combine modes back to back (the layout
    call in the same mode), both results checked."""
    import torch
    for cid, (a, b) in enumerate(itertools.product(NORMAL_MODES, repeat=2)):
        ins = [_normal_inputs(2000 + 2 * cid + j, R, E) for j in range(2)]
        outs = []
        for j, mode in enumerate((a, b)):
            x, idx, w = ins[j][rank]
            kw = _normal_kw(buf, mode)
            per_rank, _, per_expert, in_rank, ev = buf.get_dispatch_layout(idx, E, **kw)
            if kw:
                ev.current_stream_wait()
            outs.append(buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                     num_tokens_per_expert=per_expert, topk_idx=idx,
                                     topk_weights=w, **_normal_kw(buf, mode)))
        for j, mode in enumerate((a, b)):
            if mode != "sync":
                outs[j][5].current_stream_wait()
        torch.cuda.synchronize()
        buf.check_errors()
        for j in range(2):
            try:
                _check_normal_dispatch(rank, ins[j], E, outs[j])
            except AssertionError as exc:
                raise AssertionError(f"dispatch {a} then {b}: call {j + 1}: {exc}") from exc
        ys = [(o[0].float() * 0.5).to(torch.bfloat16) for o in outs]
        combs = []
        for j, mode in enumerate((a, b)):
            combs.append(buf.combine(ys[j], outs[j][4], **_normal_kw(buf, mode)))
        for j, mode in enumerate((a, b)):
            if mode != "sync":
                combs[j][2].current_stream_wait()
        torch.cuda.synchronize()
        buf.check_errors()
        for j in range(2):
            try:
                _check_normal_combine(rank, ins[j], E, R, _gather_var(ys[j]), combs[j][0])
            except AssertionError as exc:
                raise AssertionError(f"combine {a} then {b}: call {j + 1}: {exc}") from exc


def _run_hook_stream_binding(buf, rank, R, E):
    """The receive hook launches on the stream current at the dispatch call (DeepEP binds it
    there), not on the stream current when it is called: with a busy other stream current at
    the hook call, the dispatch's stream alone completes the receive."""
    import torch
    ins = llt._all_inputs(3000, R, [M] * R, H, K, E)
    x, idx, w = ins[rank]
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    s1.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s1):
        recv, count, handle, _, hook = buf.low_latency_dispatch(x, idx, M, E, use_fp8=False,
                                                                return_recv_hook=True)
        recv.fill_(float("nan"))     # in stream order before the receive writes it
    with torch.cuda.stream(s2):
        torch.cuda._sleep(2_000_000_000)   # ~1 s: a receive queued here would not have run
        hook()
    s1.synchronize()
    done = recv.clone()              # read before s2 finishes its sleep
    torch.cuda.synchronize()
    buf.check_errors()
    llt._check_dispatch(rank, ins, E, (done, count, handle), False, False, False)


# ---------------------------------------------------------------------------------- item 1
# (normal ring counters, normal sequence words (int32), low-latency epochs): just below the
# signed 32-bit wrap, the unsigned 32-bit wrap and the 48-bit tag wrap of the epochs.
WRAP_STARTS = [(2 ** 31 - 40, 2 ** 31 - 3, 2 ** 32 - 3),
               (2 ** 32 - 40, -3, 2 ** 48 - 4)]
WRAP_CALLS = 6
# 288 chunked receive tokens: 144-slot rings, not a power of two (DeepEP's EP16/32 tables)
WRAP_CONFIG = dict(num_sms=20, num_max_nvl_chunked_send_tokens=8,
                   num_max_nvl_chunked_recv_tokens=288)


def _wrap_config():
    """WRAP_CONFIG with at most this rank's share of the SMs (16 where 8 ranks share a GPU:
    dispatch refuses more channels than the SMs the process may use). Buffers are sized for
    WRAP_CONFIG itself, which needs at least as many bytes."""
    import epgen
    share = gpu_harness.usable_sms(WRAP_CONFIG["num_sms"])[0]
    return epgen.Config(**{**WRAP_CONFIG, "num_sms": share})


def _run_wrap(buf, rank, R, E, graphs):
    """Calls across every counter's wrap point (started there by the test-only hook), each
    result checked: ring slots stay FIFO, waits see the right side of the comparison, epochs
    keep alternating halves and never match a stale word."""
    import torch
    config = _wrap_config()
    for w, (ring, seq, epoch) in enumerate(WRAP_STARTS):
        buf._set_counters_for_test(ring=ring, seq=seq, ll_epoch=epoch)
        for i in range(WRAP_CALLS):
            cid = 4000 + 100 * w + i
            ins = _normal_inputs(cid, R, E)
            out = _normal_dispatch(buf, rank, ins, E, config=config)
            cached = buf.dispatch(ins[rank][0] * 2, handle=out[4], config=config)
            y = (out[0].float() * 0.5).to(torch.bfloat16)
            combined, _, _ = buf.combine(y, out[4], config=config)
            torch.cuda.synchronize()
            buf.check_errors()
            where = f"start {w}, call {i}"
            try:
                _check_normal_dispatch(rank, ins, E, out)
                nt._eq("cached recv_x", cached[0], (out[0].float() * 2).to(torch.bfloat16))
                _check_normal_combine(rank, ins, E, R, _gather_var(y), combined)
            except AssertionError as exc:
                raise AssertionError(f"normal, {where}: {exc}") from exc
            mode = LL_MODES[i % len(LL_MODES)]
            lins = llt._all_inputs(cid, R, [M] * R, H, K, E)
            x, idx, wts = lins[rank]
            d, finish = _ll_call(buf, graphs, mode, "dispatch", x, idx)
            finish()
            torch.cuda.synchronize()
            buf.check_errors()
            yl = llt._expert_out(d[0], False, H)
            c, finish = _ll_call(buf, graphs, mode, "combine", yl, idx, wts, d[2])
            finish()
            torch.cuda.synchronize()
            buf.check_errors()
            try:
                llt._check_dispatch(rank, lins, E, d, False, False, False)
                llt._check_combine(rank, lins, yl, d[2], c)
            except AssertionError as exc:
                raise AssertionError(f"low latency {mode}, {where}: {exc}") from exc


def _run_combine_channels_apart(buf, rank, R, E):
    """Review T8: a combine's channels are its own config's, not its dispatch's: combine with
    fewer and with more SMs than the dispatch (6 after 16, 16 after 6; at most this rank's
    share where ranks share a GPU), each result against the golden model (the ring-layout
    change between them runs its barrier first)."""
    import torch
    import epgen
    share = gpu_harness.usable_sms(16)[0]
    for cid, (d_sms, c_sms) in enumerate(((share, 6), (6, share))):
        ins = _normal_inputs(4800 + cid, R, E)
        out = _normal_dispatch(buf, rank, ins, E, config=epgen.Config(d_sms, 8, 256, 6, 128))
        y = (out[0].float() * 0.5).to(torch.bfloat16)
        combined, _, _ = buf.combine(y, out[4], config=epgen.Config(c_sms, 8, 256, 6, 128))
        torch.cuda.synchronize()
        buf.check_errors()
        try:
            _check_normal_dispatch(rank, ins, E, out)
            _check_normal_combine(rank, ins, E, R, _gather_var(y), combined)
        except AssertionError as exc:
            raise AssertionError(f"dispatch on {d_sms} SMs, combine on {c_sms}: {exc}") from exc


# The epoch whose header words (epoch low, epoch high: ll_dispatch.cuh's message header) are
# both STALE_WORD: every int32 word of the crafted payload below.
STALE_WORD = 5
STALE_EPOCH = (STALE_WORD << 32) | STALE_WORD
STALE_H, STALE_M, STALE_T = H // 2, 96, 40      # the smaller layout, and its tokens per rank


def _run_stale_layout(buf, rank, R, E):
    """Review T4 / R5: payload bytes that read as a header of the current epoch are not taken
    for one after a shape change (messages carry a layout tag). The dispatch epoch is set so
    that call 3 runs at STALE_EPOCH; call 1, two calls before it in the same half, sends rows
    whose every int32 word is STALE_WORD at (H, M); call 3, at (H / 2, 96) with 40 tokens a
    rank, scans slots where that payload lies at its header offsets: epoch low and high,
    token, entry count and entries (expert 0, slot 5) all look valid, only the tag is not.
    Every call against the golden model."""
    import torch
    from epgen import reference as ref
    buf._set_counters_for_test(ll_epoch=STALE_EPOCH - 3)
    crafted = torch.full((M, H // 2), STALE_WORD, dtype=torch.int32, device="cuda").view(
        torch.bfloat16)
    calls = [(H, M, M, crafted), (H, M, M, None), (STALE_H, STALE_M, STALE_T, None)]
    for i, (h, m, t, x) in enumerate(calls):
        ins = llt._all_inputs(4900 + i, R, [t] * R, h, K, E)
        xs = [x if x is not None else xr for xr, _, _ in ins]
        recv, count, handle, _, _ = buf.low_latency_dispatch(xs[rank], ins[rank][1], m, E,
                                                             use_fp8=False)
        torch.cuda.synchronize()
        buf.check_errors()
        try:
            ref.check_low_latency_dispatch(xs, [idx for _, idx, _ in ins], E, rank, m, recv,
                                           count, handle[0], handle[1])
        except AssertionError as exc:
            raise AssertionError(f"call {i + 1} (hidden {h}, max tokens {m}): {exc}") from exc


def _run_wrap_in_flight(buf, rank, R, E):
    """Review T15: two hooked low-latency calls in flight (the low-latency suite's double
    buffering: send 1, send 2, receive 1, receive 2, for dispatch and combine) across the
    epochs' 32-bit and 48-bit wrap points, three rounds from just below each: the two calls'
    halves and tags stay apart there too."""
    for w, (_, _, epoch) in enumerate(WRAP_STARTS):
        buf._set_counters_for_test(ll_epoch=epoch)
        for i in range(3):
            try:
                llt._run_double(buf, rank, R, E, H=H, case_id=5000 + 10 * w + 2 * i)
            except AssertionError as exc:
                raise AssertionError(f"start {w}, round {i}: {exc}") from exc


# ---------------------------------------------------------------------------------- item 6
def _capture_raises(fn, *needles):
    import torch
    g, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
            fn()
    except ValueError as exc:
        assert all(n in str(exc) for n in needles), str(exc)
    else:
        raise AssertionError(f"captured without the error naming {needles}")
    torch.cuda.synchronize()


def _run_graph_layout(buf, rank, R, E):
    """Normal mode under CUDA graphs (review R6): a capture whose ring layout would need the
    host-decided barrier is refused, as is a captured dispatch that would wait on the host;
    a capture with the warmed-up layout replays correctly, and afterwards a layout change is
    refused even eagerly (replays could not run its barrier). Runs last: it pins the layout."""
    import torch
    import epgen
    cfg = _wrap_config()
    other = epgen.Config(num_sms=10, num_max_nvl_chunked_send_tokens=8,
                         num_max_nvl_chunked_recv_tokens=288)
    ins = _normal_inputs(5000, R, E)
    x, idx, w = ins[rank]
    out = _normal_dispatch(buf, rank, ins, E, config=cfg)
    y = (out[0].float() * 0.5).to(torch.bfloat16)
    buf.combine(y, out[4], config=cfg)              # eager: the combine layout is cfg's
    torch.cuda.synchronize()
    buf.check_errors()
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    _capture_raises(lambda: buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                         num_tokens_per_expert=per_expert, topk_idx=idx,
                                         topk_weights=w, config=cfg),
                    "num_worst_tokens=0", "capture")
    _capture_raises(lambda: buf.combine(y, out[4], config=other), "config=", "during CUDA graph capture")
    sy = y.clone()
    g, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        gout, _, _ = buf.combine(sy, out[4], config=cfg)
    torch.cuda.current_stream().wait_stream(s)
    for rep in range(3):
        yr = (out[0].float() * (0.25 * (rep + 1))).to(torch.bfloat16)
        sy.copy_(yr)
        g.replay()
        torch.cuda.synchronize()
        buf.check_errors()
        _check_normal_combine(rank, ins, E, R, _gather_var(yr), gout)
    try:
        buf.combine(y, out[4], config=other)
    except ValueError as exc:
        assert "a CUDA graph captured" in str(exc), str(exc)
    else:
        raise AssertionError("a layout change after a capture was accepted")
    again, _, _ = buf.combine(y, out[4], config=cfg)
    torch.cuda.synchronize()
    buf.check_errors()
    _check_normal_combine(rank, ins, E, R, _gather_var(y), again)


def _run_two_current_streams(buf, rank, R, E):
    """Two synchronous low-latency dispatches made from two different current streams with
    nothing joining them: the Buffer still runs them in call order (DeepEP's comm stream is
    FIFO), so they take different epochs and both are right."""
    import torch
    ins = [llt._all_inputs(3100 + j, R, [M] * R, H, K, E) for j in range(2)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs = []
    for j, st in enumerate(streams):
        st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st):
            x, idx, _ = ins[j][rank]
            recv, count, handle, _, _ = buf.low_latency_dispatch(x, idx, M, E, use_fp8=False)
            outs.append((recv, count, handle))
    torch.cuda.synchronize()
    buf.check_errors()
    for j in range(2):
        llt._check_dispatch(rank, ins[j], E, outs[j], False, False, False)


# ---------------------------------------------------------------------------------- item 8
LATE_S = 5.0


def _run_late_rank(buf, rank, R, E):
    """A rank that arrives 5 s late (within the 20 s deadline) for a low-latency dispatch and
    for a normal combine: the others wait for it and every result is right."""
    import time

    import torch
    late = R - 1
    ins = llt._all_inputs(7000, R, [M] * R, H, K, E)
    x, idx, w = ins[rank]
    if rank == late:
        time.sleep(LATE_S)
    recv, count, handle, _, _ = buf.low_latency_dispatch(x, idx, M, E, use_fp8=False)
    torch.cuda.synchronize()
    buf.check_errors()
    llt._check_dispatch(rank, ins, E, (recv, count, handle), False, False, False)
    nins = _normal_inputs(7001, R, E)
    out = _normal_dispatch(buf, rank, nins, E)
    y = (out[0].float() * 0.5).to(torch.bfloat16)
    torch.cuda.synchronize()
    if rank == late:
        time.sleep(LATE_S)
    combined, _, _ = buf.combine(y, out[4])
    torch.cuda.synchronize()
    buf.check_errors()
    _check_normal_combine(rank, nins, E, R, _gather_var(y), combined)


# ---------------------------------------------------------------------------------- item 9
def _invalid_calls(buf, R, E):
    """(argument named in the error, call) pairs: each breaks one rule of a public call."""
    import torch
    import epgen
    dev = "cuda"
    x = torch.randn(M, H, device=dev).to(torch.bfloat16)
    idx = torch.randint(0, E, (M, K), device=dev)
    ll = buf.low_latency_dispatch
    nx = torch.randn(64, H, device=dev).to(torch.bfloat16)
    nidx = torch.randint(0, E, (64, K), device=dev)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(nidx, E)
    nargs = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                 num_tokens_per_expert=per_expert, topk_idx=nidx)
    return [
        ("num_max_dispatch_tokens_per_rank", lambda v: ll(x[:1], idx[:1], v, E),
         [0, -1, 1025, 4096]),
        ("num_experts", lambda v: ll(x, idx, M, v), [E + 1, E * 2048, 0]),
        ("x.dtype", lambda v: ll(x.to(v), idx, M, E), [torch.float32, torch.float16]),
        ("x.shape", lambda v: ll(x.view(-1)[:v], idx, M, E), [H, 2 * H]),
        ("topk_idx.dtype", lambda v: ll(x, idx.to(v), M, E), [torch.int32, torch.int16]),
        ("topk_idx.shape[0]", lambda v: ll(x, idx[:v], M, E), [1, M - 1]),
        ("x.shape[0]", lambda v: ll(torch.cat([x] * v), torch.cat([idx] * v), M, E), [2, 3]),
        ("hidden", lambda v: ll(x[:, :v].contiguous(), idx, M, E), [H - 8, 24]),
        ("round_scale", lambda v: ll(x, idx, M, E, use_fp8=False, round_scale=v), [True]),
        ("async_finish", lambda v: ll(x, idx, M, E, async_finish=v, return_recv_hook=True),
         [True]),
        ("x.data_ptr()", lambda v: ll(_misaligned(x)[:v], idx[:v], M, E), [M, 1]),
        ("config.num_sms", lambda v: buf.dispatch(nx, config=epgen.Config(num_sms=v), **nargs),
         [4096, 1 << 20]),
        ("expert_alignment", lambda v: buf.dispatch(nx, expert_alignment=v, **nargs), [0, -4]),
        ("num_worst_tokens", lambda v: buf.dispatch(nx, num_worst_tokens=v, **nargs), [-1]),
        ("num_tokens_per_rdma_rank",
         lambda v: buf.dispatch(nx, num_tokens_per_rdma_rank=per_rank, **nargs), [None]),
        ("num_experts", lambda v: buf.get_dispatch_layout(nidx, v), [E + 1, 0, -E]),
    ]


def _run_argument_properties(buf, rank, R, E):
    """Property-based (hypothesis, the same examples on every rank: derandomized, no
    shrinking): a public call with one argument broken raises ValueError naming it, before
    anything is launched; a valid low-latency pair with random token counts, dtype and
    dropped routes matches the reference."""
    import torch
    import torch.distributed as dist
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    calls = _invalid_calls(buf, R, E)
    common = dict(derandomize=True, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))

    @settings(max_examples=60, **common)
    @given(st.data())
    def invalid(data):
        name, call, values = data.draw(st.sampled_from(calls))
        v = data.draw(st.sampled_from(values))
        if name == "num_experts" and R == 1 and v == E + 1:
            return
        try:
            call(v)
        except ValueError as exc:
            assert str(exc).startswith(f"{name}="), f"{name}: {exc}"
        else:
            raise AssertionError(f"{name}={v!r} accepted")

    @settings(max_examples=12, **common)
    @given(tokens=st.lists(st.integers(0, M), min_size=R, max_size=R), fp8=st.booleans(),
           neg=st.sampled_from([0.0, 0.3, 1.0]), cid=st.integers(0, 10 ** 6))
    def valid(tokens, fp8, neg, cid):
        ins = llt._all_inputs(cid, R, tokens, H, K, E, neg_frac=neg)
        err = ""
        try:
            llt._checked_pair(buf, rank, ins, E, fp8)
        except AssertionError as exc:
            err = str(exc)
        ok = torch.tensor([0 if err else 1], device="cuda")
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)     # every rank stops at the same example
        assert int(ok.item()) == 1, err or "another rank's result differs from the reference"

    invalid()
    torch.cuda.synchronize()
    buf.check_errors()          # nothing was launched by a refused call
    valid()


def share_sms():
    """For a worker: DeepEP's default 20 channels lowered to this rank's share of the SMs where
    ranks share a GPU (16 at 8 ranks; the default configs' normal-mode calls refuse more), as
    the serving-pattern suite does. Returns the undo."""
    import epgen
    epgen.Buffer.set_num_sms(gpu_harness.usable_sms(20)[0])
    return lambda: epgen.Buffer.set_num_sms(20)


# the quick tier: every job but the 5 s late rank (10 s of sleeps; the deadline suites cover
# waits on a peer), the three whose time grows with the rank count (normal orders 1.5 / 4.8 /
# 10.8 s at 2 / 4 / 8 ranks, the wraps 0.9 / 2.0 / 4.9, LL orders 0.8 / 1.5 / 3.5; 9068351 on
# 1x H200) each at one count: normal orders at the first, the wraps at the second, LL orders at
# the third
QUICK = [0, 3, 4, 5, 8, 9, 10, 11]
QUICK_ROTATING = [2, 7, 1]


def _worker(rank, world):
    os.environ.setdefault("EPGEN_TIMEOUT_S", "20")
    undo = share_sms()
    try:
        return _jobs(rank, world)
    finally:
        undo()


def _jobs(rank, world):
    import torch
    import torch.distributed as dist
    import epgen
    E = LOCAL_EXPERTS * world
    nvl = epgen.Config(**WRAP_CONFIG).get_nvl_buffer_size_hint(H * 2, world)
    rdma = epgen.Buffer.get_low_latency_rdma_size_hint(M, H, world, E)
    buf = epgen.Buffer(dist.group.WORLD, nvl, rdma, low_latency_mode=True)
    results = []
    state = {}

    def graphs():
        if "g" not in state:
            state["g"] = _LLGraphs(buf, E)
        return state["g"]
    jobs = [
        ("misaligned tensors refused before launch", lambda: _run_alignment(buf, rank, world, E)),
        ("low-latency sync/async/hook/graph in every order",
         lambda: _run_ll_orders(buf, rank, world, E, graphs())),
        ("normal sync/async/previous_event/allocate_on_comm_stream in every order",
         lambda: _run_normal_orders(buf, rank, world, E)),
        ("receive hook bound to its dispatch's stream",
         lambda: _run_hook_stream_binding(buf, rank, world, E)),
        ("sync calls from two current streams run in call order",
         lambda: _run_two_current_streams(buf, rank, world, E)),
        ("argument checks and valid calls, property-based",
         lambda: _run_argument_properties(buf, rank, world, E)),
        ("a rank 5 s late (within the deadline)", lambda: _run_late_rank(buf, rank, world, E)),
        ("counters and epochs across their wrap points",
         lambda: _run_wrap(buf, rank, world, E, graphs())),
        ("two low-latency calls in flight across the epoch wraps",
         lambda: _run_wrap_in_flight(buf, rank, world, E)),
        ("a stale payload that reads as a header after a shape change is not taken",
         lambda: _run_stale_layout(buf, rank, world, E)),
        ("a combine on other SMs than its dispatch",
         lambda: _run_combine_channels_apart(buf, rank, world, E)),
    ]
    jobs.append(("normal mode under CUDA graphs: layout rules (runs last: pins the layout)",
                 lambda: _run_graph_layout(buf, rank, world, E)))
    llt._run_jobs(gpu_harness.select(jobs, QUICK, QUICK_ROTATING, world), results)
    torch.cuda.synchronize()
    buf.destroy()
    return results


@pytest.fixture(scope="module")
def reliability_results():
    return gpu_harness.cached_runs(_worker, timeout_s=400)


@pytest.mark.parametrize("num_ranks", gpu_harness.rank_counts())
def test_reliability(reliability_results, num_ranks):
    bad = gpu_harness.failures(reliability_results(num_ranks))
    assert not bad, "\n".join(bad)
