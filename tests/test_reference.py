"""The golden model (epgen.reference) against small hand-computed cases. CPU only."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from epgen import reference as ref

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn
R, E, H = 2, 4, 8  # El = 2: experts 0, 1 on rank 0; 2, 3 on rank 1

# Rank 0: token 0 -> experts 0, 2 (ranks 0, 1); token 1 -> 1 (rank 0); token 2 -> 3, 2 (rank 1)
# Rank 1: token 0 -> nothing; token 1 -> 2, 3 (rank 1); token 2 -> 0, 3 (ranks 0, 1)
TOPK = [torch.tensor([[0, 2], [1, -1], [3, 2]]), torch.tensor([[-1, -1], [2, 3], [0, 3]])]
WEIGHTS = [torch.tensor([[0.5, 0.25], [0.75, 9.0], [0.125, 1.5]]),
           torch.tensor([[7.0, 8.0], [2.0, 0.5], [0.25, 4.0]])]


def tokens(rank, T=3, h=H):
    """Token t of rank r: every channel is 10 * r + t + 1 + channel / 8 (exact in bf16)."""
    base = torch.arange(T).unsqueeze(1) + 10 * rank + 1
    return (base + torch.arange(h) / 8).to(BF16)


XS = [tokens(0), tokens(1)]
INR = [ref.get_dispatch_layout(t, E, R)[2] for t in TOPK]


def i32(*v):
    return torch.tensor(v, dtype=torch.int32)


# -- layout ----------------------------------------------------------------------------------------
def test_layout():
    per_rank, per_expert, in_rank = ref.get_dispatch_layout(TOPK[0], E, R)
    assert torch.equal(per_rank, i32(2, 2))
    assert torch.equal(per_expert, i32(1, 1, 2, 1))
    assert in_rank.tolist() == [[True, True], [True, False], [False, True]]
    per_rank, per_expert, in_rank = ref.get_dispatch_layout(TOPK[1], E, R)
    assert torch.equal(per_rank, i32(1, 2))
    assert torch.equal(per_expert, i32(1, 0, 1, 2))
    assert in_rank.tolist() == [[False, False], [False, True], [True, True]]
    assert per_rank.dtype == per_expert.dtype == torch.int32 and in_rank.dtype == torch.bool


def test_layout_rejects_bad_ids():
    with pytest.raises(ValueError, match="topk_idx"):
        ref.get_dispatch_layout(torch.tensor([[0, 4]]), E, R)
    with pytest.raises(ValueError, match="multiple"):
        ref.get_dispatch_layout(torch.tensor([[0, 1]]), 5, R)


# -- normal dispatch -------------------------------------------------------------------------------
def test_dispatch_rank0():
    d = ref.dispatch(XS, TOPK, WEIGHTS, E, rank=0)
    assert d.num_recv_tokens == 3
    assert d.recv_src_idx.tolist() == [0, 1, 2] and d.recv_src_rank.tolist() == [0, 0, 1]
    assert torch.equal(d.recv_x, torch.stack([XS[0][0], XS[0][1], XS[1][2]]))
    assert d.recv_topk_idx.tolist() == [[0, -1], [1, -1], [0, -1]]
    assert d.recv_topk_weights.tolist() == [[0.5, 0], [0.75, 0], [0.25, 0]]  # 9.0 at -1 dropped
    assert d.num_recv_tokens_per_expert_list == [2, 1]
    assert d.rank_prefix_matrix.tolist() == [[2, 2], [3, 4]]
    assert d.rank_prefix_matrix.dtype == torch.int32 and d.recv_src_idx.dtype == torch.int32


def test_dispatch_rank1():
    d = ref.dispatch(XS, TOPK, WEIGHTS, E, rank=1)
    assert d.recv_src_idx.tolist() == [0, 2, 1, 2] and d.recv_src_rank.tolist() == [0, 0, 1, 1]
    assert torch.equal(d.recv_x, torch.stack([XS[0][0], XS[0][2], XS[1][1], XS[1][2]]))
    assert d.recv_topk_idx.tolist() == [[-1, 0], [1, 0], [0, 1], [-1, 1]]
    assert d.recv_topk_weights.tolist() == [[0, 0.25], [0.125, 1.5], [2.0, 0.5], [0, 4.0]]
    assert d.num_recv_tokens_per_expert_list == [3, 3]
    assert d.rank_prefix_matrix.tolist() == [[2, 2], [3, 4]]


@pytest.mark.parametrize("align, rank, expected", [(2, 0, [2, 2]), (4, 0, [4, 4]), (4, 1, [4, 4]),
                                                  (3, 1, [3, 3]), (128, 0, [128, 128])])
def test_dispatch_expert_alignment(align, rank, expected):
    d = ref.dispatch(XS, TOPK, WEIGHTS, E, rank, expert_alignment=align)
    assert d.num_recv_tokens_per_expert_list == expected


def test_dispatch_worst_tokens():
    d = ref.dispatch(XS, TOPK, WEIGHTS, E, rank=1, num_worst_tokens=6)
    full = ref.dispatch(XS, TOPK, WEIGHTS, E, rank=1)
    assert d.num_recv_tokens == 4 and d.recv_x.shape == (6, H)
    assert d.num_recv_tokens_per_expert_list == []
    assert torch.equal(d.recv_x[:4], full.recv_x)
    assert d.recv_topk_idx.tolist() == full.recv_topk_idx.tolist() + [[-1, -1]] * 2
    assert torch.equal(d.recv_topk_weights[:4], full.recv_topk_weights)
    assert d.recv_src_idx.shape == (6,) and d.recv_src_idx[:4].tolist() == [0, 2, 1, 2]
    with pytest.raises(ValueError, match="num_worst_tokens"):
        ref.dispatch(XS, TOPK, WEIGHTS, E, rank=1, num_worst_tokens=3)


def test_dispatch_rank_receiving_nothing():
    topk = [torch.tensor([[0, 1], [1, -1]]), torch.tensor([[1, 0], [-1, -1]])]
    xs = [tokens(0, 2), tokens(1, 2)]
    d = ref.dispatch(xs, topk, None, E, rank=1)
    assert d.num_recv_tokens == 0 and d.recv_x.shape == (0, H) and d.recv_topk_idx.shape == (0, 2)
    assert d.recv_topk_weights is None
    assert d.num_recv_tokens_per_expert_list == [0, 0]
    assert d.rank_prefix_matrix.tolist() == [[2, 0], [3, 0]]
    d = ref.dispatch(xs, topk, None, E, rank=1, num_worst_tokens=2)
    assert d.recv_topk_idx.tolist() == [[-1, -1]] * 2


NPE = [ref.get_dispatch_layout(t, E, R)[1] for t in TOPK]   # rank 0: 1 1 2 1; rank 1: 1 0 1 2


def test_dispatch_without_topk_and_fp8_rows():
    xq = [ref.per_token_cast_to_fp8(tokens(r, h=256)) for r in range(R)]
    d = ref.dispatch([q for q, _ in xq], None, None, E, rank=1, x_scales=[s for _, s in xq],
                     is_token_in_ranks=INR, num_tokens_per_experts=NPE)
    assert d.recv_topk_idx is None
    assert d.recv_x.dtype == FP8 and d.recv_x_scales.shape == (4, 2)
    assert torch.equal(d.recv_x.view(torch.uint8)[2], xq[1][0].view(torch.uint8)[1])
    assert torch.equal(d.recv_x_scales[3], xq[1][1][2])
    with pytest.raises(ValueError, match="is_token_in_ranks"):
        ref.dispatch(XS, None, None, E, rank=0)


@pytest.mark.parametrize("align, rank, expected", [(1, 0, [2, 1]), (1, 1, [3, 3]), (4, 1, [4, 4])])
def test_dispatch_counts_without_topk_come_from_num_tokens_per_expert(align, rank, expected):
    """DeepEP V1 returns the per-local-expert counts (summed over sources, aligned) in every
    uncached dispatch, with or without top-k: the same list as with top-k."""
    d = ref.dispatch(XS, None, None, E, rank, expert_alignment=align, is_token_in_ranks=INR,
                     num_tokens_per_experts=NPE)
    assert d.num_recv_tokens_per_expert_list == expected
    assert ref.dispatch(XS, TOPK, WEIGHTS, E, rank, expert_alignment=align) \
        .num_recv_tokens_per_expert_list == expected
    # the list is num_tokens_per_expert's, not a count of topk_idx (they agree from the layout)
    doubled = [2 * n for n in NPE]
    assert ref.dispatch(XS, TOPK, WEIGHTS, E, rank, num_tokens_per_experts=doubled) \
        .num_recv_tokens_per_expert_list == [2 * c for c in ref.dispatch(
            XS, TOPK, WEIGHTS, E, rank).num_recv_tokens_per_expert_list]
    with pytest.raises(ValueError, match="num_tokens_per_experts"):
        ref.dispatch(XS, None, None, E, rank, is_token_in_ranks=INR)


def test_dispatch_counts_empty_when_worst_sized_and_none_when_cached():
    worst = ref.dispatch(XS, None, None, E, 1, num_worst_tokens=6, is_token_in_ranks=INR,
                         num_tokens_per_experts=NPE)
    assert worst.num_recv_tokens_per_expert_list == [] and worst.recv_x.shape == (6, H)
    cached = ref.dispatch(XS, None, None, E, 1, is_token_in_ranks=INR, cached=True)
    assert cached.num_recv_tokens_per_expert_list is None and cached.num_recv_tokens == 4
    with pytest.raises(ValueError, match="cached"):
        ref.dispatch(XS, TOPK, None, E, 1, cached=True)


# -- normal combine --------------------------------------------------------------------------------
def test_combine_hand_case():
    # Received rows, rank 0: (0,t0) (0,t1) (1,t2); rank 1: (0,t0) (0,t2) (1,t1) (1,t2).
    ys = [torch.tensor([[1.0], [2.0], [4.0]]).expand(3, H).to(BF16),
          torch.tensor([[8.0], [16.0], [32.0], [64.0]]).expand(4, H).to(BF16)]
    ws = [torch.tensor([[1.0, 0], [2.0, 0], [4.0, 0]]),
          torch.tensor([[0, 8.0], [16.0, 32.0], [64.0, 0], [0, 128.0]])]
    c0 = ref.combine(ys, INR, 0, topk_weights=ws)
    assert c0.combined_x[:, 0].tolist() == [1 + 8, 2, 16] and c0.combined_x.dtype == BF16
    assert c0.combined_topk_weights.tolist() == [[1, 8], [2, 0], [16, 32]]
    c1 = ref.combine(ys, INR, 1, topk_weights=ws)
    assert c1.combined_x[:, 0].tolist() == [0, 32, 4 + 64]  # token 0 went nowhere
    assert c1.combined_topk_weights.tolist() == [[0, 0], [64, 0], [4, 128]]
    assert ref.combine(ys, INR, 1).combined_topk_weights is None
    # Biases: one tensor or a pair; token 0 of rank 1 gets only the biases.
    b0, b1 = torch.full((3, H), 0.5, dtype=BF16), torch.full((3, H), 2.0, dtype=BF16)
    assert ref.combine(ys, INR, 1, bias=b0).combined_x[:, 0].tolist() == [0.5, 32.5, 68.5]
    got = ref.combine(ys, INR, 1, bias=(b1, b1)).combined_x[:, 0].tolist()
    assert got == [4, 36, 72]
    assert ref.combine(ys, INR, 1, bias=(None, b1)).combined_x[:, 0].tolist() == [2, 34, 70]
    # 68 + 0.5 + 0.25 = 68.75 needs 9 bits: rounded once to bf16 (69, ties to even)
    b2 = torch.full((3, H), 0.25, dtype=BF16)
    assert ref.combine(ys, INR, 1, bias=(b0, b2)).combined_x[2, 0].item() == 69


def test_combine_order_biases_then_ranks():
    # Token 0 of rank 0 goes to ranks 0 and 1 (row 0 on both). float32: (1 + 2^24) + (-2^24) = 0,
    # whereas adding the ranks first would give 1.
    ys = [torch.zeros(3, H, dtype=BF16), torch.zeros(4, H, dtype=BF16)]
    ys[0][0], ys[1][0] = 2.0 ** 24, -(2.0 ** 24)
    b0 = torch.zeros(3, H, dtype=BF16)
    b0[0] = 1.0
    assert ref.combine(ys, INR, 0, bias=(b0, None)).combined_x[0, 0].item() == 0.0


def test_combine_ignores_padding_rows():
    d = [ref.dispatch(XS, TOPK, WEIGHTS, E, r, num_worst_tokens=7) for r in range(R)]
    for r in range(R):
        c = ref.combine([x.recv_x for x in d], INR, r, [x.recv_topk_weights for x in d])
        assert c.combined_x.shape == (3, H)


def test_dispatch_combine_roundtrip():
    g = torch.Generator().manual_seed(0)
    nr, ne, k, h = 3, 6, 3, 16
    T = [5, 0, 7]
    topk = [torch.randint(-1, ne, (t, k), generator=g) for t in T]
    w = [torch.rand(t, k, generator=g) for t in T]
    xs = [torch.randn(t, h, generator=g).to(BF16) for t in T]
    inr = [ref.get_dispatch_layout(t, ne, nr)[2] for t in topk]
    d = [ref.dispatch(xs, topk, w, ne, r) for r in range(nr)]
    for r in range(nr):
        c = ref.combine([x.recv_x for x in d], inr, r, [x.recv_topk_weights for x in d])
        times = inr[r].sum(dim=1, keepdim=True).float()
        assert torch.equal(c.combined_x, (xs[r].float() * times).to(BF16))
        assert torch.equal(c.combined_topk_weights, torch.where(topk[r] >= 0, w[r], 0.0))


# -- FP8 -------------------------------------------------------------------------------------------
def test_fp8_cast_known_values():
    x = torch.zeros(3, 144)
    x[0, 0], x[0, 1], x[0, 2], x[0, 3] = 448, 1.0625, -1.1875, 3  # scale_inv 1; ties to even
    x[0, 130] = -7.0                                               # partial group: 7/448 = 2^-6
    x[1, 5], x[1, 6] = 3.5, 0.5                                    # 3.5/448 = 2^-7
    # row 2 is all zero: amax clamps to 1e-4
    q, s = ref.per_token_cast_to_fp8(x.to(BF16))
    assert q.dtype == FP8 and q.shape == (3, 144) and s.dtype == torch.float32 and s.shape == (3, 2)
    zero_scale = (torch.tensor(1e-4) / torch.tensor(448.0)).item()
    assert s.tolist() == [[1.0, 2 ** -6], [2 ** -7, zero_scale], [zero_scale, zero_scale]]
    qf = q.float()
    assert qf[0, :4].tolist() == [448, 1.0, -1.25, 3]
    assert qf[0, 130].item() == -448 and qf[1, 5:7].tolist() == [448, 64]
    assert qf[2].abs().sum().item() == 0
    back = ref.per_token_cast_back(q, s)
    assert back[0, :4].tolist() == [448, 1.0, -1.25, 3] and back[1, 5:7].tolist() == [3.5, 0.5]
    assert ref.per_token_cast_back(q, s, BF16).dtype == BF16


def test_fp8_round_scale():
    x = torch.zeros(4, 128)
    x[0, 0], x[1, 0], x[2, 0], x[3, 0] = 3.0, 3.5, 448.0, 449.0
    _, s = ref.per_token_cast_to_fp8(x.to(BF16), round_scale=True)
    # 3/448 = 2^-7.22 -> 2^-7; 3.5/448 = 2^-7 stays; 448 -> 1; 449 (bf16: 448) -> 1
    assert s[:, 0].tolist() == [2 ** -7, 2 ** -7, 1.0, 1.0]
    x[3, 0] = 480.0  # 480/448 -> 2
    q, s = ref.per_token_cast_to_fp8(x.to(BF16), round_scale=True)
    assert s[3, 0].item() == 2.0 and q[3, 0].float().item() == 240.0
    assert q[0, 0].float().item() == 384.0  # 3 * 128
    g = torch.Generator().manual_seed(1)
    y = (torch.randn(8, 256, generator=g) * 10.0 ** torch.randint(-3, 3, (8, 1), generator=g))
    _, s = ref.per_token_cast_to_fp8(y.to(BF16), round_scale=True)
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # powers of two


def test_fp8_ue8m0_packing():
    amax = [3.5, 448.0, 896.0, 7.0, 224.0]  # scale_inv 2^-7, 1, 2, 2^-6, 2^-1
    x = torch.zeros(2, 5 * 128 - 16)         # H = 624: last group partial
    for g, a in enumerate(amax):
        x[0, 128 * g] = a
    x[1, 0] = 896.0
    q, packed = ref.per_token_cast_to_fp8(x.to(BF16), round_scale=True, use_ue8m0=True)
    _, s = ref.per_token_cast_to_fp8(x.to(BF16), round_scale=True)
    assert packed.dtype == torch.int32 and packed.shape == (2, 2)
    exps = [120, 127, 128, 121, 126]
    w0 = exps[0] | exps[1] << 8 | exps[2] << 16 | exps[3] << 24
    assert packed[0].tolist() == [w0, exps[4]]
    zero = 105  # empty groups: 1e-4 / 448 = 2^-22.09 -> 2^-22
    w1 = 128 | zero << 8 | zero << 16 | zero << 24
    assert packed[1].tolist() == [w1 - (1 << 32) if w1 >= 1 << 31 else w1, zero]
    assert torch.equal(ref.unpack_ue8m0(packed, 5), s)
    assert torch.equal(ref.per_token_cast_back(q, packed), ref.per_token_cast_back(q, s))
    with pytest.raises(ValueError, match="round_scale"):
        ref.per_token_cast_to_fp8(x.to(BF16), use_ue8m0=True)


def test_ue8m0_sign_byte():
    s = torch.tensor([[2.0 ** 1, 2.0 ** 1, 2.0 ** 1, 2.0 ** 1]])  # byte 128 in all four slots
    assert ref.pack_ue8m0(s).tolist() == [[0x80808080 - (1 << 32)]]


# -- low-latency -----------------------------------------------------------------------------------
M = 4


def ll(rank, **kw):
    return ref.low_latency_dispatch(XS, TOPK, E, rank, M, **kw)


def test_ll_dispatch_layout_bf16():
    d = ll(0, use_fp8=False)
    assert d.recv_x.shape == (2, R * M, H) and d.recv_x.dtype == BF16 and d.recv_x_scales is None
    assert d.recv_count.tolist() == [2, 1] and d.recv_count.dtype == torch.int32
    assert d.recv_sources == [[(0, 0), (1, 2)], [(0, 1)]]
    assert d.recv_layout_range.tolist() == [[0 << 32 | 1, 1 << 32 | 1], [0 << 32 | 1, 1 << 32 | 0]]
    assert d.recv_src_info[0, :2].tolist() == [0, 2] and d.recv_src_info[1, :1].tolist() == [1]
    assert torch.equal(d.recv_x[0, 1], XS[1][2]) and torch.equal(d.recv_x[1, 0], XS[0][1])
    d = ll(1, use_fp8=False)
    assert d.recv_count.tolist() == [3, 3]
    assert d.recv_sources == [[(0, 0), (0, 2), (1, 1)], [(0, 2), (1, 1), (1, 2)]]
    assert d.recv_layout_range.tolist() == [[0 << 32 | 2, 2 << 32 | 1], [0 << 32 | 1, 1 << 32 | 2]]
    assert [ref.decode_layout_range(v) for v in d.recv_layout_range[1].tolist()] == [(0, 1), (1, 2)]
    ref.check_low_latency_dispatch(XS, TOPK, E, 1, M, d.recv_x, d.recv_count, d.recv_src_info,
                                   d.recv_layout_range)


def test_ll_dispatch_fp8():
    xs = [tokens(r, h=144) for r in range(R)]
    for rs, ue in [(False, False), (True, False), (True, True)]:
        d = ref.low_latency_dispatch(xs, TOPK, E, 1, M, round_scale=rs, use_ue8m0=ue)
        q, s = ref.per_token_cast_to_fp8(xs[1][1], rs, ue)
        assert d.recv_x.dtype == FP8 and d.recv_x_scales.shape == (2, R * M, 1 if ue else 2)
        assert torch.equal(d.recv_x[0, 2].view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(d.recv_x_scales[0, 2], s)
        ref.check_low_latency_dispatch(xs, TOPK, E, 1, M, d.recv_x, d.recv_count, d.recv_src_info,
                                       d.recv_layout_range, d.recv_x_scales, rs, ue, exact_fp8=True)


def test_ll_dispatch_opaque_moves_bytes_unchanged():
    """Opaque rows (any dtype; NaN bit patterns included) and side rows arrive byte for byte,
    in the senders' dtypes, placed as BF16 rows are; the checker compares bytes."""
    g = torch.Generator().manual_seed(3)
    data = [torch.randint(0, 256, (3, 48), generator=g, dtype=torch.uint8).view(FP8)
            for _ in range(R)]
    side = [torch.randint(-2 ** 31, 2 ** 31 - 1, (3, 4), generator=g, dtype=torch.int32)
            for _ in range(R)]
    xs = list(zip(data, side))
    d = ref.low_latency_dispatch(xs, TOPK, E, 1, M, wire_format="opaque48+16")
    bf = ll(1, use_fp8=False)
    assert d.recv_x.dtype == FP8 and d.recv_x.shape == (2, R * M, 48)
    assert d.recv_x_scales.dtype == torch.int32 and d.recv_x_scales.shape == (2, R * M, 4)
    assert d.recv_sources == bf.recv_sources and torch.equal(d.recv_src_info, bf.recv_src_info)
    assert torch.equal(d.recv_x[0, 2].view(torch.uint8), data[1][1].view(torch.uint8))
    assert torch.equal(d.recv_x_scales[1, 0], side[0][2])
    moved = _kernel_like(d)
    sides = d.recv_x_scales.clone()
    sides[0, :3] = d.recv_x_scales[0, KERNEL_LIKE_ORDER]   # the side rows move with their rows
    _check(moved._replace(recv_x_scales=sides), xs=xs, wire_format="opaque48+16")
    with pytest.raises(AssertionError, match="opaque side bytes differ"):
        _check(moved, xs=xs, wire_format="opaque48+16")   # rows moved, side rows not
    bad = d.recv_x_scales.clone()
    bad[1, 0, 3] ^= 1
    with pytest.raises(AssertionError, match="opaque side bytes differ"):
        _check(d._replace(recv_x_scales=bad), xs=xs, wire_format="opaque48+16")
    bad = d.recv_x.view(torch.uint8).clone()
    bad[0, 1, 0] ^= 0x80
    with pytest.raises(AssertionError, match="opaque row bytes differ"):
        _check(d._replace(recv_x=bad.view(FP8)), xs=xs, wire_format="opaque48+16")
    rows = ref.low_latency_dispatch(data, TOPK, E, 1, M, wire_format="opaque48")   # no side
    assert rows.recv_x_scales is None and torch.equal(rows.recv_x.view(torch.uint8),
                                                      d.recv_x.view(torch.uint8))
    _check(rows, xs=data, wire_format="opaque48")


def _check(d, rank=1, xs=XS, **kw):
    ref.check_low_latency_dispatch(xs, TOPK, E, rank, M, d.recv_x, d.recv_count, d.recv_src_info,
                                   d.recv_layout_range, d.recv_x_scales, **kw)


KERNEL_LIKE_ORDER = [2, 0, 1]  # rows: (1,t1), (0,t0), (0,t2)


def _kernel_like(d):
    """Rank 1, expert 0 as a kernel might place it: source 1's chunk first (the chunks' order
    is the layout ranges'), each chunk's tokens still ascending (what the combine relies on)."""
    x, info, lay = d.recv_x.clone(), d.recv_src_info.clone(), d.recv_layout_range.clone()
    order = KERNEL_LIKE_ORDER
    x[0, :3], info[0, :3] = d.recv_x[0, order], d.recv_src_info[0, order]
    lay[0] = torch.tensor([1 << 32 | 2, 0 << 32 | 1])
    return d._replace(recv_x=x, recv_src_info=info, recv_layout_range=lay)


def test_ll_checker_accepts_other_placements_and_rejects_errors():
    d = _kernel_like(ll(1, use_fp8=False))
    _check(d)
    bad = d.recv_count.clone()
    bad[0] = 2
    with pytest.raises(AssertionError, match="recv_count"):
        _check(d._replace(recv_count=bad))
    bad = d.recv_src_info.clone()
    bad[0, 1] = 1
    with pytest.raises(AssertionError, match="src_info"):
        _check(d._replace(recv_src_info=bad))
    swapped = d.recv_x.clone(), d.recv_src_info.clone()    # source 0's two rows swapped
    for t, src in zip(swapped, (d.recv_x, d.recv_src_info)):
        t[0, 1:3] = src[0, [2, 1]]
    with pytest.raises(AssertionError,
                       match=r"src_info \[2, 0\], expected tokens \[0, 2\] in this order"):
        _check(d._replace(recv_x=swapped[0], recv_src_info=swapped[1]))
    bad = d.recv_layout_range.clone()
    bad[0, 1] = 1 << 32 | 1  # source 1 at [1, 2) overlaps source 0 at [1, 3)
    with pytest.raises(AssertionError, match="overlap"):
        _check(d._replace(recv_layout_range=bad))
    bad[0, 1] = 3 << 32 | 1  # past recv_count
    with pytest.raises(AssertionError, match="outside"):
        _check(d._replace(recv_layout_range=bad))
    bad = d.recv_x.clone()
    bad[0, 1, 3] += 1
    with pytest.raises(AssertionError, match="BF16"):
        _check(d._replace(recv_x=bad))


def test_ll_checker_fp8_tolerance():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(3, 256, generator=g).to(BF16) for _ in range(R)]
    xs[0][0, :2] = torch.tensor([448.0, 1.0625])  # rank 1, expert 2, row 0: scale 1, a tie
    d = ref.low_latency_dispatch(xs, TOPK, E, 1, M)
    _check(d, xs=xs, exact_fp8=True)
    assert d.recv_x.view(torch.uint8)[0, 0, 1].item() == 0x38  # 1.0 (tie to even)
    bad = d.recv_x.view(torch.uint8).clone()
    bad[0, 0, 1] = 0x39  # 1.125: the tie rounded the other way is within tolerance, not exact
    _check(d._replace(recv_x=bad.view(FP8)), xs=xs)
    with pytest.raises(AssertionError, match="bytes"):
        _check(d._replace(recv_x=bad.view(FP8)), xs=xs, exact_fp8=True)
    bad[0, 0, 1] = 0x3A  # 1.25: too far
    with pytest.raises(AssertionError, match="FP8 element"):
        _check(d._replace(recv_x=bad.view(FP8)), xs=xs)
    s = d.recv_x_scales.clone()
    s[1, 2, 1] = s[1, 2, 1] * (1 + 2 ** -23)  # one float ulp: fine unless exact
    _check(d._replace(recv_x_scales=s), xs=xs)
    with pytest.raises(AssertionError, match="scales"):
        _check(d._replace(recv_x_scales=s), xs=xs, exact_fp8=True)
    s[1, 2, 1] *= 1.001
    with pytest.raises(AssertionError, match="scales"):
        _check(d._replace(recv_x_scales=s), xs=xs)


def test_ll_combine():
    # Expert e's output for a row = 2^e * its source token (exact in bf16).
    def outputs(d, rank):
        y = torch.zeros(2, R * M, H, dtype=BF16)
        for le in range(2):
            for i, (r, t) in enumerate(d.recv_sources[le]):
                y[le, i] = XS[r][t] * 2 ** (rank * 2 + le)
        return y
    ds = [ll(r, use_fp8=False) for r in range(R)]
    ys = [outputs(d, r) for r, d in enumerate(ds)]
    infos, lays = [d.recv_src_info for d in ds], [d.recv_layout_range for d in ds]
    out = ref.low_latency_combine(ys, TOPK[0], WEIGHTS[0], 0, infos, lays)
    x = XS[0].float()
    expected = torch.stack([0.5 * 1 * x[0] + 0.25 * 4 * x[0],  # experts 0, 2
                            0.75 * 2 * x[1],                   # expert 1; -1 (weight 9) skipped
                            0.125 * 8 * x[2] + 1.5 * 4 * x[2]])  # experts 3, 2
    assert out.dtype == BF16 and torch.equal(out, expected.to(BF16))
    out = ref.low_latency_combine(ys, TOPK[1], WEIGHTS[1], 1, infos, lays)
    x = XS[1].float()
    assert out[0].abs().sum().item() == 0  # no expert
    assert torch.equal(out[1], (2.0 * 4 * x[1] + 0.5 * 8 * x[1]).to(BF16))
    assert torch.equal(out[2], (0.25 * 1 * x[2] + 4.0 * 8 * x[2]).to(BF16))
    # Rank 1's rows placed as a kernel might: same result.
    k = _kernel_like(ds[1])
    ys_k = [ys[0], ys[1].clone()]
    ys_k[1][0, :3] = ys[1][0, [2, 1, 0]]
    assert torch.equal(ref.low_latency_combine(ys_k, TOPK[1], WEIGHTS[1], 1,
                                               [infos[0], k.recv_src_info],
                                               [lays[0], k.recv_layout_range]), out)


def test_ll_combine_per_rank_hand():
    # Same outputs as test_ll_combine (2^e * token): each rank's partial, then the ranks' sum.
    ds = [ll(r, use_fp8=False) for r in range(R)]
    ys = []
    for rank, d in enumerate(ds):
        y = torch.zeros(2, R * M, H, dtype=BF16)
        for le in range(2):
            for i, (r, t) in enumerate(d.recv_sources[le]):
                y[le, i] = XS[r][t] * 2 ** (rank * 2 + le)
        ys.append(y)
    infos, lays = [d.recv_src_info for d in ds], [d.recv_layout_range for d in ds]
    x = XS[0].float()
    expected = torch.stack([(0.5 * x[0]) + (0.25 * 4 * x[0]),   # rank 0's partial + rank 1's
                            0.75 * 2 * x[1],
                            0.125 * 8 * x[2] + 1.5 * 4 * x[2]]).to(BF16)
    for dt in (torch.float32, BF16):
        out = ref.low_latency_combine_per_rank(ys, TOPK[0], WEIGHTS[0], 0, infos, lays,
                                               partial_dtype=dt)
        assert out.dtype == BF16 and torch.equal(out, expected)
    with pytest.raises(ValueError, match="partial_dtype"):
        ref.low_latency_combine_per_rank(ys, TOPK[0], WEIGHTS[0], 0, infos, lays,
                                         partial_dtype=torch.float16)


def _per_rank_case(nr, seed, T=6, K=3, El=3, h=64):
    """Random routes and expert outputs that differ per (expert, token) row."""
    g = torch.Generator().manual_seed(seed)
    e = El * nr
    xs = [torch.randn(T, h, generator=g).to(BF16) for _ in range(nr)]
    idx = [torch.randn(T, e, generator=g).topk(K, dim=-1).indices for _ in range(nr)]
    for t in idx:
        t[0] = -1                                   # a token with no expert
        t[1, 1] = -1
    ws = [torch.rand(T, K, generator=g) + 0.1 for _ in range(nr)]
    ds = [ref.low_latency_dispatch(xs, idx, e, r, T, use_fp8=False) for r in range(nr)]
    ys = [torch.randn(El, nr * T, h, generator=g).to(BF16) * 4 for _ in range(nr)]
    return xs, idx, ws, ys, [d.recv_src_info for d in ds], [d.recv_layout_range for d in ds]


def _token_by_hand(ys, idx, w, rank, infos, lays, t, El, pdt):
    """One token of the per-rank combine, scalar by scalar in float32 (the documented order)."""
    nr = len(ys)
    acc = torch.zeros(ys[0].shape[2])
    for j in range(nr):
        part, any_k = torch.zeros(ys[0].shape[2]), False
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if e < 0 or e // El != j:
                continue
            le = e % El
            b, n = ref.decode_layout_range(int(lays[j][le, rank]))
            row = b + infos[j][le, b:b + n].tolist().index(t)
            part = part + torch.tensor(float(w[t, k])) * ys[j][le, row].float()
            any_k = True
        if any_k:
            acc = acc + part.to(pdt).float()
    return acc.to(BF16)


@pytest.mark.parametrize("nr", [2, 4])
def test_ll_combine_per_rank_random(nr):
    xs, idx, ws, ys, infos, lays = _per_rank_case(nr, seed=nr)
    El = ys[0].shape[0]
    for rank in range(nr):
        old = ref.low_latency_combine(ys, idx[rank], ws[rank], rank, infos, lays)
        # |sum| bound of the terms: each order's roundings stay within 2^-8 of it
        mag = ref.low_latency_combine([y.abs() for y in ys], idx[rank], ws[rank], rank, infos,
                                      lays).float()
        for dt in (torch.float32, BF16):
            new = ref.low_latency_combine_per_rank(ys, idx[rank], ws[rank], rank, infos, lays, dt)
            again = ref.low_latency_combine_per_rank(ys, idx[rank], ws[rank], rank, infos, lays, dt)
            assert torch.equal(new.view(torch.int16), again.view(torch.int16))   # same bits
            for t in range(idx[rank].shape[0]):
                assert torch.equal(new[t].view(torch.int16), _token_by_hand(
                    ys, idx[rank], ws[rank], rank, infos, lays, t, El, dt).view(torch.int16))
            assert new[0].abs().sum().item() == 0                               # no expert
            tol = mag * 2 ** -7 + 1e-6
            assert bool(((new.float() - old.float()).abs() <= tol).all())
    # The order is really a different one: some bits differ from the per-expert order.
    diffs = sum(int((ref.low_latency_combine_per_rank(ys, idx[r], ws[r], r, infos, lays)
                     != ref.low_latency_combine(ys, idx[r], ws[r], r, infos, lays)).sum())
                for r in range(nr))
    assert diffs > 0


def test_ll_combine_per_rank_pairing_matters():
    """A weight applied to another of the token's experts on the same rank changes the bits."""
    xs, idx, ws, ys, infos, lays = _per_rank_case(2, seed=11, K=4, El=4)
    good = ref.low_latency_combine_per_rank(ys, idx[0], ws[0], 0, infos, lays)
    El = 4
    for t in range(idx[0].shape[0]):
        ks = [k for k in range(4) if idx[0][t, k] >= 0]
        same = [(a, b) for a in ks for b in ks if a < b and idx[0][t, a] // El == idx[0][t, b] // El]
        if same:
            a, b = same[0]
            w = ws[0].clone()
            w[t, a], w[t, b] = ws[0][t, b], ws[0][t, a]
            bad = ref.low_latency_combine_per_rank(ys, idx[0], w, 0, infos, lays)
            assert not torch.equal(bad[t], good[t])
            return
    raise AssertionError("the case has no token with two experts on one rank")


def test_ll_combine_per_rank_masked_and_empty():
    nr = 4
    xs, idx, ws, ys, infos, lays = _per_rank_case(nr, seed=5)
    El, dead = ys[0].shape[0], nr - 1
    junk = [y.clone() for y in ys]
    junk[dead].fill_(float("nan"))                  # a masked rank's rows are never read
    for rank in range(nr - 1):
        live = torch.where(idx[rank] // El == dead, torch.full_like(idx[rank], -1), idx[rank])
        masked = ref.low_latency_combine_per_rank(junk, idx[rank], ws[rank], rank, infos, lays,
                                                  masked_ranks=[dead])
        assert torch.equal(masked.view(torch.int16), ref.low_latency_combine_per_rank(
            ys, live, ws[rank], rank, infos, lays).view(torch.int16))
    none = ref.low_latency_combine_per_rank(ys, idx[0][:0], ws[0][:0], 0, infos, lays)
    assert none.shape == (0, ys[0].shape[2]) and none.dtype == BF16


def test_ll_rejects():
    with pytest.raises(ValueError, match="M="):
        ref.low_latency_dispatch(XS, TOPK, E, 0, 2)
    with pytest.raises(ValueError, match="distinct"):
        ref.low_latency_dispatch(XS, [torch.tensor([[1, 1]] * 3), TOPK[1]], E, 0, M)


# -- properties ------------------------------------------------------------------------------------
@settings(derandomize=True, deadline=None, max_examples=60)
@given(st.integers(1, 4), st.sampled_from([16, 128, 144, 400]), st.integers(-20, 20),
       st.booleans(), st.integers(0, 2 ** 31 - 1))
def test_fp8_cast_error_bound(T, h, log_mag, round_scale, seed):
    """The checker's bound holds for the model itself, and rounded scales are the next power of
    two at or above amax / 448."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, h, generator=g) * 2.0 ** log_mag).to(BF16)
    x[:, ::7] = 0
    q, s = ref.per_token_cast_to_fp8(x, round_scale)
    err = (ref.per_token_cast_back(q, s) - x.float()).abs()
    assert bool((err <= x.float().abs() * 2 ** -4 + ref._expand_groups(s, h) * 2 ** -9).all())
    amax = torch.nn.functional.pad(x.float().abs(), (0, s.shape[1] * 128 - h))
    amax = amax.view(T, -1, 128).amax(-1).clamp(min=1e-4) / 448
    if round_scale:
        assert bool((s >= amax).all() and (s < 2 * amax).all())
    else:
        assert torch.allclose(s, amax, rtol=2 ** -23, atol=0)


def test_ll_row_places_and_combine_slots_match_the_dispatch_placement():
    """ll_row_places is each row's index in low_latency_dispatch's chunk (its src_info there is
    the token), and ll_combine_slot_index gives every valid (token, slot) its own slot, expert
    rank r's in [r * M * min(K, El), (r + 1) * M * min(K, El)), ordered by (expert, token)."""
    g = torch.Generator().manual_seed(7)
    Rr, Mm, Ee, Kk = 2, 6, 8, 3
    idxs = [torch.randn(Mm, Ee, generator=g).topk(Kk, dim=-1).indices for _ in range(Rr)]
    idxs[0][1, 2] = -1
    xs = [torch.randn(Mm, 16, generator=g).to(BF16) for _ in range(Rr)]
    El, seg = Ee // Rr, Mm * min(Kk, Ee // Rr)
    for owner in range(Rr):
        places = ref.ll_row_places(idxs[owner])
        slots = ref.ll_combine_slot_index(idxs[owner], Rr, Ee, Mm)
        valid = idxs[owner] >= 0
        assert bool((places[~valid] == -1).all()) and bool((slots[~valid] == -1).all())
        for dst in range(Rr):
            d = ref.low_latency_dispatch(xs, idxs, Ee, dst, Mm, use_fp8=False)
            for le in range(El):
                begin, n = ref.decode_layout_range(int(d.recv_layout_range[le, owner]))
                toks = d.recv_src_info[le, begin:begin + n].tolist()
                for t, k in zip(*torch.nonzero(idxs[owner] == dst * El + le, as_tuple=True)):
                    assert toks[int(places[t, k])] == int(t)
        got = slots[valid].tolist()
        assert len(set(got)) == len(got)
        keyed = sorted((int(e), int(t), int(s)) for (t, k), e, s in
                       zip(valid.nonzero().tolist(), idxs[owner][valid], slots[valid]))
        for r in range(Rr):
            mine = [s for e, _, s in keyed if e // El == r]
            assert mine == list(range(r * seg, r * seg + len(mine)))
