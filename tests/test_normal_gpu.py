"""Normal-mode intranode dispatch / combine on N GPUs against epgen.reference.

Ranks start once per rank count; one group of workers runs the whole case list. Every rank
regenerates every rank's inputs from the case seed, so each computes its own expected result.
"""
from __future__ import annotations

import os
import traceback

import pytest

from tests import gpu_harness

pytestmark = pytest.mark.gpu

# (hidden, topk, dtype, with_topk, worst, alignment, async_finish, num_sms, zero_rank)
CASES = [
    (7168, 8, "bf16", True, False, 1, False, 20, None),
    (7168, 8, "fp8", True, False, 4, True, 20, None),
    (4096, 16, "bf16", True, True, 1, True, 20, None),
    (4096, 16, "fp8", True, False, 128, False, 20, None),
    (2880, 8, "bf16", True, False, 1, False, 24, None),
    (2880, 8, "fp8", True, True, 1, False, 24, None),
    (3584, 16, "bf16", True, False, 8, True, 8, None),
    (3584, 16, "fp8", True, False, 1, False, 8, 1),
    (7168, 8, "bf16", False, False, 1, False, 20, None),
    (2880, 8, "fp8", False, True, 1, True, 20, None),
    (7168, 8, "bf16", True, False, 1, False, 2, 0),
    (4096, 8, "bf16", True, True, 1, False, 20, 1),
    # rows of other element types (DeepEP moves any 16-byte-multiple row), int32 UE8M0 scales
    (2048, 8, "f32", True, False, 2, False, 20, None),
    (16, 8, "i8", True, False, 1, True, 20, None),
    (7168, 8, "i8", False, False, 4, False, 20, None),
    (7168, 8, "fp8_ue8m0", True, False, 1, False, 20, None),
    (2880, 16, "fp8_ue8m0", False, True, 1, True, 24, None),
    # named wire formats (epgen.formats, dispatch's wire_format=): checked, then moved as bytes
    (7168, 8, "mxfp8", True, False, 1, False, 20, None),
    (2880, 8, "nvfp4", True, True, 1, True, 24, None),
    (4096, 16, "nvfp4", False, False, 4, False, 20, None),
    (2880, 8, "fp8_e4m3_f32_128", True, False, 1, False, 20, None),
    (4096, 8, "opaque", True, False, 1, True, 20, None),
]
# dtype -> the wire_format dispatch is given (None: DeepEP's call, no wire_format)
WIRE = {"mxfp8": "mxfp8", "nvfp4": "nvfp4", "fp8_e4m3_f32_128": "fp8_e4m3_f32_128",
        "opaque": "opaque8192+12"}
TOKENS = 768
QUICK = [1, 5, 9, 13, 15]   # quick tier: FP8 async, worst FP8, no top-k, i8 rows, UE8M0


def _inputs(case_id, r, T, H, K, E, R):
    import torch
    g = torch.Generator().manual_seed(104729 * case_id + r)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    scores = torch.randn(T, E, generator=g)
    idx = scores.topk(K, dim=-1).indices
    idx = idx.masked_fill(torch.rand(T, K, generator=g) < 0.1, -1)
    if T > 8:
        idx[T // 3] = -1                               # a token routed nowhere
        idx[T // 2, :] = torch.arange(K)              # a token routed to rank 0's experts only
    w = torch.randn(T, K, generator=g).float()
    x2 = torch.randn(T, H, generator=g).to(torch.bfloat16)
    return x, idx.to(torch.int64), w, x2


def _bytes(t):
    import torch
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _eq(name, got, exp):
    import torch
    got, exp = _bytes(got).cpu(), _bytes(exp).cpu()
    assert got.shape == exp.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exp.shape)}"
    if not torch.equal(got, exp):
        bad = (got != exp).nonzero()
        raise AssertionError(f"{name}: {bad.shape[0]} mismatches, first at {bad[0].tolist()}: "
                             f"{got[tuple(bad[0])].item()} != {exp[tuple(bad[0])].item()}")


def _run_case(buf, rank, world, cid, case):
    import torch
    import epgen
    from epgen import reference as ref
    H, K, dtype, with_topk, worst, align, async_finish, num_sms, zero_rank = case
    # Poison: fill and free a large block so epgen's fresh outputs reuse memory full of junk.
    torch.full((96 << 20,), -1, dtype=torch.int32, device="cuda")
    R, E = world, 64 * world
    tokens = [0 if r == zero_rank else TOKENS + 37 * r for r in range(R)]
    ins = [_inputs(cid, r, tokens[r], H, K, E, R) for r in range(R)]
    xs, idxs, ws, x2s = ([i[j] for i in ins] for j in range(4))
    fp8 = dtype.startswith("fp8") or dtype in WIRE     # rows with scales (a side tensor)
    wire = WIRE.get(dtype)

    def make_x(xl):
        if dtype == "mxfp8":
            q = [ref.mxfp8_quantize(v.cuda()) for v in xl]
            return [a for a, _ in q], [ref.pack_scale_bytes(s).t().contiguous().t() for _, s in q]
        if dtype == "nvfp4":
            q = [ref.nvfp4_quantize(v.cuda()) for v in xl]
            return [d for d, _, _ in q], [ref.nvfp4_wire_scales(b, g).t().contiguous().t()
                                          for _, b, g in q]
        if dtype == "opaque":   # bf16 bits as int16 rows, a 12-byte int16 side row per token
            return ([v.cuda().view(torch.int16) for v in xl],
                    [v[:, :6].cuda().view(torch.int16).contiguous() for v in xl])
        if dtype == "f32":
            return [v.float().cuda() for v in xl], None
        if dtype == "i8":    # arbitrary bytes (every bit pattern) without scales
            return [(v.float() * 40).clamp(-128, 127).to(torch.int8).cuda() for v in xl], None
        if not fp8:
            return [v.cuda() for v in xl], None
        ue = dtype == "fp8_ue8m0"
        q = [ref.per_token_cast_to_fp8(v.cuda(), round_scale=ue, use_ue8m0=ue) for v in xl]
        # column-major scale views: the kernel must read the caller's strides
        return [a for a, _ in q], [s.t().contiguous().t() for _, s in q]

    dx, dsc = make_x(xs)
    idx, w = idxs[rank].cuda(), ws[rank].cuda()
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    buf.check_errors()
    e_rank, e_expert, e_in = ref.get_dispatch_layout(idx, E, R)
    _eq("layout.num_tokens_per_rank", per_rank, e_rank)
    _eq("layout.num_tokens_per_expert", per_expert, e_expert)
    _eq("layout.is_token_in_rank", in_rank, e_in)
    layouts = [ref.get_dispatch_layout(i.cuda(), E, R) for i in idxs]
    in_ranks, npes = [lay[2] for lay in layouts], [lay[1] for lay in layouts]

    config = epgen.Config(num_sms, 8, 256, 6, 128)
    x_in = (dx[rank], dsc[rank]) if fp8 else dx[rank]
    n_worst = (TOKENS + 37 * R) * R if worst else 0
    out = buf.dispatch(x_in, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                       num_tokens_per_expert=per_expert,
                       topk_idx=idx if with_topk else None, topk_weights=w if with_topk else None,
                       expert_alignment=align, num_worst_tokens=n_worst, config=config,
                       async_finish=async_finish, wire_format=wire)
    recv, r_idx, r_w, counts, handle, event = out
    if wire:   # another format's name: refused before launch, naming the mismatch
        other = "bf16" if wire != "bf16" else "mxfp8"
        try:
            buf.dispatch(x_in, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                         num_tokens_per_expert=per_expert, config=config, wire_format=other)
        except ValueError as e:
            assert str(e).startswith("x") and other in str(e), str(e)
        else:
            raise AssertionError(f"wire_format={other!r} accepted {dtype} rows")
    if async_finish:
        event.current_stream_wait()
    buf.check_errors()          # a deadline reads as a deadline, not as mismatches
    exp = ref.dispatch([v for v in dx], [i.cuda() for i in idxs] if with_topk else None,
                       [v.cuda() for v in ws] if with_topk else None, E, rank,
                       expert_alignment=align, x_scales=dsc, num_worst_tokens=n_worst,
                       is_token_in_ranks=in_ranks, num_tokens_per_experts=npes)
    N = exp.num_recv_tokens
    rx, rs = recv if fp8 else (recv, None)
    assert rx.shape[0] == (n_worst or N), f"recv_x rows {rx.shape[0]}"
    assert rx.dtype == dx[rank].dtype and (rs is None or rs.dtype == dsc[rank].dtype), "dtypes"
    _eq("recv_x", rx[:N], exp.recv_x[:N])
    if fp8:
        _eq("recv_x_scales", rs[:N], exp.recv_x_scales[:N])
    if with_topk:
        _eq("recv_topk_idx", r_idx, exp.recv_topk_idx)
        _eq("recv_topk_weights", r_w[:N], exp.recv_topk_weights[:N])
    else:
        assert r_idx is None and r_w is None
    assert counts == exp.num_recv_tokens_per_expert_list, f"counts {counts} != {exp.num_recv_tokens_per_expert_list}"
    _eq("handle[0] rank_prefix_matrix", handle[0], exp.rank_prefix_matrix)
    _eq("handle recv_src_idx", handle[3][:N], exp.recv_src_idx[:N])

    # cached dispatch: new data, same layout, no CPU sync
    cx, csc = make_x(x2s)
    c_in = (cx[rank], csc[rank]) if fp8 else cx[rank]
    crecv, *rest, cevent = buf.dispatch(c_in, handle=handle, config=config,
                                        async_finish=async_finish, wire_format=wire)
    assert all(v is None for v in rest), "cached dispatch returns Nones"
    if async_finish:
        cevent.current_stream_wait()
    buf.check_errors()
    cexp = ref.dispatch(cx, None, None, E, rank, x_scales=csc, num_worst_tokens=n_worst,
                        is_token_in_ranks=in_ranks, cached=True)
    crx, crs = crecv if fp8 else (crecv, None)
    _eq("cached recv_x", crx[:N], cexp.recv_x[:N])
    if fp8:
        _eq("cached recv_x_scales", crs[:N], cexp.recv_x_scales[:N])

    # combine: random bf16 expert outputs in receive order, optional weights and biases
    g = torch.Generator().manual_seed(7 * cid + 1)
    rows = [n_worst or sum(int(m[:, j].sum()) for m in in_ranks) for j in range(R)]
    ys = [torch.randn(rows[j], H, generator=g).to(torch.bfloat16).cuda() for j in range(R)]
    cws = [torch.randn(rows[j], K, generator=g).float().cuda() for j in range(R)] if with_topk else None
    nb = cid % 3
    b = [torch.randn(tokens[rank], H, generator=g).to(torch.bfloat16).cuda() for _ in range(nb)]
    bias = None if nb == 0 else (b[0] if nb == 1 else tuple(b))
    cx_, cw_, cev = buf.combine(ys[rank], handle, topk_weights=cws[rank] if cws else None,
                                bias=bias, config=config, async_finish=async_finish)
    if async_finish:
        cev.current_stream_wait()
    buf.check_errors()
    cexp = ref.combine(ys, in_ranks, rank, topk_weights=cws, bias=bias)
    _eq("combined_x", cx_, cexp.combined_x)
    if with_topk:
        _eq("combined_topk_weights", cw_, cexp.combined_topk_weights)
    torch.cuda.synchronize()
    buf.check_errors()


def _worker(rank, world):
    os.environ.setdefault("EPGEN_TIMEOUT_S", gpu_harness.deadline_s(20))
    import torch.distributed as dist
    import epgen
    from epgen.runtime.errors import EpgenDeviceError
    nbytes = epgen.Config(24, 8, 256, 6, 128).get_nvl_buffer_size_hint(7168 * 2, world)
    buf = epgen.Buffer(dist.group.WORLD, nbytes, 0)
    results, broken = [], False
    for cid, case in enumerate(CASES):
        if case not in gpu_harness.select(CASES, QUICK):
            continue
        num_sms, note = gpu_harness.usable_sms(case[7])
        name = "h{}_k{}_{}_{}topk_{}worst_a{}_{}_sms{}_zero{}{}".format(
            case[0], case[1], case[2], "" if case[3] else "no", "" if case[4] else "no",
            case[5], "async" if case[6] else "sync", case[7], case[8], note)
        case = case[:7] + (num_sms,) + case[8:]
        if broken:
            results.append((name, "skipped after a device error"))
            continue
        try:
            _run_case(buf, rank, world, cid, case)
            results.append((name, "ok"))
        except EpgenDeviceError:
            results.append((name, traceback.format_exc()))
            broken = True
        except Exception:
            results.append((name, traceback.format_exc()))
            broken = buf._ctx.errors.raised()
    buf.destroy()
    return results


@pytest.fixture(scope="module", params=gpu_harness.rank_counts())
def normal_results(request):
    world = request.param
    gpu_harness.require_gpus(world)
    return world, gpu_harness.run_ranks(world, _worker, timeout_s=280.0)


def test_normal_dispatch_combine(normal_results):
    world, per_rank = normal_results
    failures = [f"rank {r} {name}:\n{status}" for r, res in enumerate(per_rank)
                for name, status in res if status != "ok"]
    assert not failures, f"{len(failures)} failing (ranks={world}):\n" + "\n".join(failures)
