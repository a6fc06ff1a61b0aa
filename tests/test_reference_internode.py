"""CPU: the two-level (internode) golden model, epgen/reference_internode.py: the handle's values
on a hand-worked example (DeepEP V1's semantics), and dispatch / combine along the two-level
path against the one-level reference on the same inputs."""
from __future__ import annotations

import pytest
import torch

from epgen import reference as ref
from epgen import reference_internode as iref

B = torch.tensor


def _m(rows):
    return B(rows, dtype=torch.bool)


# 2 nodes x 2 ranks, 2 channels. Rank r's is_token_in_rank (tokens x ranks 0..3).
HAND = [
    _m([[1, 0, 0, 1], [0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0]]),  # rank 0, T=5
    _m([[1, 0, 0, 0], [0, 0, 0, 0]]),                                            # rank 1, T=2
    _m([[1, 1, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 1]]),                # rank 2, T=4
    _m([[1, 0, 1, 0]]),                                                          # rank 3, T=1
]


def _i32(v):
    return B(v, dtype=torch.int32)


def test_handle_of_a_hand_worked_example():
    h = iref.dispatch_handle(HAND, ranks_per_node=2, num_channels=2, rank=0)
    # Sender side (rank 0's tokens; channels [0, 3) and [3, 5)).
    assert torch.equal(h.rdma_channel_prefix_matrix, _i32([[1, 3], [2, 3]]))
    assert torch.equal(h.gbl_channel_prefix_matrix, _i32([[1, 2], [0, 2], [1, 2], [2, 2]]))
    assert torch.equal(h.send_rdma_head, _i32([[0, 0], [-1, 1], [-1, -1], [0, -1], [1, 0]]))
    # RDMA receiver of node 0's traffic from ranks (0, 0) = 0 and (1, 0) = 2.
    assert torch.equal(h.recv_rdma_rank_prefix_sum, _i32([3, 6]))
    assert torch.equal(h.recv_rdma_channel_prefix_matrix, _i32([[1, 3], [1, 3]]))
    assert torch.equal(h.send_nvl_head, _i32([[0, -1], [0, 0], [-1, 1], [0, 0], [-1, 0], [0, -1]]))
    # Final receiver: 2 + 1 + 2 + 1 tokens; per (source, channel) first rows.
    assert torch.equal(h.recv_gbl_rank_prefix_sum, _i32([2, 3, 5, 6]))
    assert torch.equal(h.recv_gbl_channel_prefix_matrix, _i32([[0, 1], [2, 3], [3, 4], [5, 6]]))
    assert h.recv_src_meta.dtype == torch.uint8 and h.recv_src_meta.shape == (6, 8)
    assert h.recv_src_meta.view(torch.int32).view(6, 2).tolist() == \
        [[0, 1], [0, 3], [0, 1], [1, 3], [1, 1], [1, 1]]
    node, goes = iref.decode_source_meta(h.recv_src_meta, 2)
    assert node.tolist() == [0, 0, 0, 1, 1, 1] and goes[1].tolist() == [True, True]
    assert h.is_token_in_rank is HAND[0]


def test_dispatch_layout_counts_tokens_once_per_node():
    topk = B([[0, 1, 6, -1], [7, 6, -1, -1], [-1, -1, -1, -1], [2, 3, 0, 1]])   # 8 experts, 4 ranks
    per_rank, per_node, per_expert, in_rank = iref.get_dispatch_layout(topk, 8, 4, 2)
    assert per_rank.tolist() == [2, 1, 0, 2] and per_node.tolist() == [2, 2]
    assert per_node.dtype == torch.int32
    ref_rank, ref_expert, ref_in = ref.get_dispatch_layout(topk, 8, 4)
    assert torch.equal(per_rank, ref_rank) and torch.equal(per_expert, ref_expert)
    assert torch.equal(in_rank, ref_in)


def test_meta_holds_more_than_32_local_ranks():
    L = 40
    goes = torch.zeros(3, L, dtype=torch.bool)
    goes[0, 39] = goes[1, 0] = goes[2, 31] = goes[2, 32] = True
    meta = iref._source_meta(5, goes)
    assert meta.shape == (3, iref.source_meta_bytes(L)) == (3, 12)
    node, back = iref.decode_source_meta(meta, L)
    assert node.tolist() == [5, 5, 5] and torch.equal(back, goes)


def _routing(R, L, T, K, E, gen, nodes=None):
    """topk_idx per rank: K distinct experts per token (a few -1), limited to `nodes` if given."""
    El = E // R
    allowed = torch.arange(E) if nodes is None else \
        torch.cat([torch.arange(n * L * El, (n + 1) * L * El) for n in nodes])
    out = []
    for _ in range(R):
        rows = []
        for _ in range(T):
            pick = allowed[torch.randperm(len(allowed), generator=gen)[:K]]
            row = torch.full((K,), -1, dtype=torch.int64)
            row[:len(pick)] = pick
            if torch.rand(1, generator=gen).item() < 0.2:
                row[-1] = -1
            rows.append(row)
        out.append(torch.stack(rows))
    return out


def _inputs(R, L, T, H, K, E, seed, fp8=False, nodes=None, integer=False):
    gen = torch.Generator().manual_seed(seed)
    topk = _routing(R, L, T, K, E, gen, nodes)
    if integer:
        xs = [torch.randint(-4, 5, (T, H), generator=gen).to(torch.bfloat16) for _ in range(R)]
    else:
        xs = [torch.randn(T, H, generator=gen).to(torch.bfloat16) for _ in range(R)]
    ws = [torch.rand(T, K, generator=gen) for _ in range(R)]
    scales = None
    if fp8:
        casts = [ref.per_token_cast_to_fp8(x) for x in xs]
        xs, scales = [c[0] for c in casts], [c[1] for c in casts]
    return xs, topk, ws, scales


LAYOUTS = [(2, 1), (2, 2), (2, 4), (4, 2)]     # (nodes, ranks per node)


@pytest.mark.parametrize("nodes, L", LAYOUTS)
@pytest.mark.parametrize("H, K, fp8", [(7168, 8, False), (4096, 16, True), (2880, 8, True),
                                       (2880, 16, False)])
def test_two_level_dispatch_and_combine_equal_the_one_level(nodes, L, H, K, fp8):
    R, T, C = nodes * L, 12, 3
    E = R * max(2, -(-2 * K // R))
    xs, topk, ws, scales = _inputs(R, L, T, H, K, E, seed=R * 1000 + H + K, fp8=fp8)
    ones = [ref.dispatch(xs, topk, ws, E, rank, expert_alignment=4, x_scales=scales)
            for rank in range(R)]
    for rank, one in enumerate(ones):
        two = iref.dispatch(xs, topk, ws, E, rank, L, C, expert_alignment=4, x_scales=scales)
        assert torch.equal(two.recv_x.view(torch.uint8), one.recv_x.view(torch.uint8))
        assert (two.recv_x_scales is None) == (scales is None)
        if scales is not None:
            assert torch.equal(two.recv_x_scales, one.recv_x_scales)
        assert torch.equal(two.recv_topk_idx, one.recv_topk_idx)
        assert torch.equal(two.recv_topk_weights, one.recv_topk_weights)
        assert two.num_recv_tokens_per_expert_list == one.num_recv_tokens_per_expert_list
        assert two.num_recv_tokens == one.num_recv_tokens
        h = two.handle
        assert torch.equal(h.recv_gbl_rank_prefix_sum, one.rank_prefix_matrix[:, rank])
        node, _ = iref.decode_source_meta(h.recv_src_meta, L)
        assert torch.equal(node, one.recv_src_rank // L)
        assert h.send_nvl_head.shape == (two.num_rdma_recv_tokens, L)
    # Combine back with integer-valued expert outputs: no partial rounds, so the two paths agree
    # exactly; the weights are disjoint per rank (dispatch zeroes the others') and sum exactly.
    ys = [torch.randint(-4, 5, (ones[j].num_recv_tokens, 256),
                        generator=torch.Generator().manual_seed(j)).to(torch.bfloat16)
          for j in range(R)]
    rw = [one.recv_topk_weights for one in ones]
    in_ranks = [ref.get_dispatch_layout(t, E, R)[2] for t in topk]
    bias = torch.ones(T, 256, dtype=torch.bfloat16)
    for rank in range(R):
        two = iref.combine(ys, in_ranks, rank, L, topk_weights=rw, bias=(bias, None))
        one = ref.combine(ys, in_ranks, rank, topk_weights=rw, bias=(bias, None))
        assert torch.equal(two.combined_x, one.combined_x)
        assert torch.equal(two.combined_topk_weights, one.combined_topk_weights)


def test_combine_rounds_each_node_partial_once():
    """Token 0 of rank 0 went to ranks 0, 1 (node 0) and 2 (node 1): node 0's partial 1 + 2^-8
    rounds to 1 in BF16 before crossing the network, so the result is 1, where the one-level
    sum (1 + 2^-8 + 2^-8 = 1 + 2^-7) is exact."""
    in_ranks = [_m([[1, 1, 1, 0]]), _m([[0, 0, 0, 0]]), _m([[0, 0, 0, 0]]), _m([[0, 0, 0, 0]])]
    v = [1.0, 2 ** -8, 2 ** -8]
    ys = [B([[v[j]]], dtype=torch.bfloat16) for j in range(3)] + \
        [torch.zeros(0, 1, dtype=torch.bfloat16)]
    assert iref.combine(ys, in_ranks, 0, 2).combined_x.item() == 1.0
    assert ref.combine(ys, in_ranks, 0).combined_x.item() == 1 + 2 ** -7


def test_a_node_that_receives_nothing():
    nodes, L, T, H, K = 2, 2, 10, 4096, 8
    R = nodes * L
    E = R * 8
    xs, topk, ws, _ = _inputs(R, L, T, H, K, E, seed=7, nodes=[0])
    for rank in range(R):
        two = iref.dispatch(xs, topk, ws, E, rank, L, 2)
        one = ref.dispatch(xs, topk, ws, E, rank)
        assert torch.equal(two.recv_x, one.recv_x)
        h = two.handle
        assert not bool(h.send_rdma_head[:, 1].ge(0).any())        # nothing to node 1
        assert h.rdma_channel_prefix_matrix[1].tolist() == [0, 0]
        if rank // L == 1:
            assert two.num_recv_tokens == 0 and two.num_rdma_recv_tokens == 0
            assert h.recv_src_meta.shape == (0, 8) and h.send_nvl_head.shape == (0, L)
            assert two.num_recv_tokens_per_expert_list == [0] * (E // R)
    in_ranks = [ref.get_dispatch_layout(t, E, R)[2] for t in topk]
    ys = [ref.dispatch(xs, topk, ws, E, j).recv_x for j in range(R)]
    for rank in range(R):
        assert torch.equal(iref.combine(ys, in_ranks, rank, L).combined_x,
                           ref.combine(ys, in_ranks, rank).combined_x)


@pytest.mark.parametrize("K", [8, 16])
def test_tokens_routed_to_one_node_only(K):
    nodes, L, T, H = 4, 2, 8, 2880
    R = nodes * L
    E = R * 8                # 16 experts per node: room for top-16 on one node
    gen = torch.Generator().manual_seed(K)
    topk = []
    for _ in range(R):     # each token's experts all on one node, the node drawn per token
        rows = []
        for _ in range(T):
            n = int(torch.randint(nodes, (1,), generator=gen))
            span = torch.arange(n * L * (E // R), (n + 1) * L * (E // R))
            rows.append(span[torch.randperm(len(span), generator=gen)[:K]])
        topk.append(torch.stack(rows))
    xs = [torch.randn(T, H, generator=gen).to(torch.bfloat16) for _ in range(R)]
    ws = [torch.rand(T, K, generator=gen) for _ in range(R)]
    for rank in range(R):
        per_rank, per_node, _, in_rank = iref.get_dispatch_layout(topk[rank], E, R, L)
        assert int(per_node.sum()) == T
        two = iref.dispatch(xs, topk, ws, E, rank, L, 4)
        assert (two.handle.send_rdma_head >= 0).sum(dim=1).tolist() == [1] * T
        one = ref.dispatch(xs, topk, ws, E, rank)
        assert torch.equal(two.recv_x, one.recv_x)
        assert torch.equal(two.recv_topk_weights, one.recv_topk_weights)
    # One node per token: the node partial is the whole sum, in one-level order: exact.
    in_ranks = [ref.get_dispatch_layout(t, E, R)[2] for t in topk]
    ys = [ref.dispatch(xs, topk, ws, E, j).recv_x for j in range(R)]
    for rank in range(R):
        assert torch.equal(iref.combine(ys, in_ranks, rank, L).combined_x,
                           ref.combine(ys, in_ranks, rank).combined_x)


def test_worst_case_sizes_and_cached():
    nodes, L, T, H, K = 2, 2, 6, 128, 8
    R = nodes * L
    E = R * 4
    xs, topk, ws, _ = _inputs(R, L, T, H, K, E, seed=3)
    two = iref.dispatch(xs, topk, ws, E, 1, L, 2, num_worst_tokens=R * T)
    N = two.num_recv_tokens
    assert two.recv_x.shape[0] == two.recv_topk_idx.shape[0] == R * T
    assert bool((two.recv_topk_idx[N:] == -1).all())
    assert two.num_recv_tokens_per_expert_list == []
    assert two.handle.send_nvl_head.shape == (R * T, L)
    assert two.handle.recv_src_meta.shape == (R * T, 8)
    in_ranks = [ref.get_dispatch_layout(t, E, R)[2] for t in topk]
    cached = iref.dispatch(xs, None, None, E, 1, L, 2, is_token_in_ranks=in_ranks, cached=True)
    assert torch.equal(cached.recv_x, two.recv_x[:N])
    assert cached.num_recv_tokens_per_expert_list is None and cached.recv_topk_idx is None
    with pytest.raises(ValueError, match="num_worst_tokens=1"):
        iref.dispatch(xs, topk, ws, E, 1, L, 2, num_worst_tokens=1)


@pytest.mark.parametrize("T, R, L, C", [(5, 4, 2, 2), (0, 4, 2, 3), (1, 8, 2, 10),
                                        (333, 8, 4, 10), (4096, 16, 8, 12), (7, 2, 1, 24)])
def test_device_side_sender_matrices_equal_the_reference(T, R, L, C):
    """epgen/ops/internode_handle.py (tensor ops the GPU runs before the notify) against the
    reference's per-channel loops, including T < C (empty channels) and T = 0."""
    from epgen.ops import internode_handle
    gen = torch.Generator().manual_seed(T + R + C)
    mask = torch.rand(T, R, generator=gen) < 0.3
    rdma, gbl, head = internode_handle.sender_side(mask, L, C)
    h = iref.dispatch_handle([mask] * R, L, C, rank=0)
    for name, got, exp in (("rdma_channel_prefix_matrix", rdma, h.rdma_channel_prefix_matrix),
                           ("gbl_channel_prefix_matrix", gbl, h.gbl_channel_prefix_matrix),
                           ("send_rdma_head", head, h.send_rdma_head)):
        assert got.dtype == torch.int32 and got.is_contiguous(), name
        assert torch.equal(got, exp), name
    assert torch.equal(internode_handle.sender_side(HAND[0], 2, 2)[2],
                       _i32([[0, 0], [-1, 1], [-1, -1], [0, -1], [1, 0]]))     # the hand example
