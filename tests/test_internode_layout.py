"""CPU: Config's RDMA chunk fields and the internode RDMA region's layout and size hint
(epgen/regions/internode.py, docs/internals.md "Internode normal mode")."""
from __future__ import annotations

import pytest

import epgen
from epgen.regions import internode as il


@pytest.fixture
def no_node_env(monkeypatch):
    monkeypatch.delenv("EPGEN_RANKS_PER_NODE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return monkeypatch


def test_rdma_ring_slots_round_up_to_whole_chunks():
    assert epgen.Config(20, 6, 256, 6, 128).rdma_ring_slots == 132
    assert epgen.Config(20, 6, 256, 20, 128).rdma_ring_slots == 140
    assert epgen.Config(20, 6, 256, 16, 128).rdma_ring_slots == 128
    assert epgen.Config(20, 6, 256, 6, 128).num_max_rdma_chunked_recv_tokens == 128   # kept


def test_rdma_chunk_rule_is_deepeps():
    epgen.Config(20, 6, 256, 100, 150)          # 150 -> 200 slots: 100 <= 100, as DeepEP accepts
    with pytest.raises(ValueError, match=r"num_max_rdma_chunked_send_tokens=100: .*\(100\)"):
        epgen.Config(20, 6, 256, 100, 100)
    for ranks in (2, 4, 8, 16):                 # the recommended configs pass
        epgen.Buffer.get_dispatch_config(ranks), epgen.Buffer.get_combine_config(ranks)


def test_region_of_a_small_config_by_hand():
    c = epgen.Config(4, 2, 8, 2, 8)              # 2 channels, 8 slots per ring
    rec = il.dispatch_record_bytes(256, 2, 32, 2)
    assert rec == 256 + 8 + 8 + 256                # row, 2 scales, meta, 32 x (int32 + float)
    assert il.control_bytes(2) == 8192             # 8 x 2 nodes x 64 channels x 8 bytes
    assert il.half_bytes(c, 2, rec) == 2 * 20480   # recv + send: 2 nodes x 2 channels x 8 x 528
    # notify: 256 B header + 2 x 4 signals -> staging at 512; 4 x 4 rows of (2 + 3 + 128 -> 136)
    # ints; 512 + 16 * 544 = 9216 -> 12288
    assert il.notify_row_ints(3) == 136 and il.notify_area_bytes(4, 3) == 12288
    assert il.region_bytes(c, 2, 2, rec, 3) == 12288 + 8192 + 2 * 40960


def test_hint_is_zero_on_one_node_and_grows_with_nodes(no_node_env):
    c = epgen.Buffer.get_dispatch_config(16)
    assert c.get_rdma_buffer_size_hint(7168 * 2, 8) == 0          # one node of DeepEP's 8
    two, four = c.get_rdma_buffer_size_hint(7168 * 2, 16), c.get_rdma_buffer_size_hint(7168 * 2, 32)
    assert 0 < two < four and two % (1 << 20) == 0
    no_node_env.setenv("EPGEN_RANKS_PER_NODE", "2")               # virtual nodes of 2
    assert c.get_rdma_buffer_size_hint(7168 * 2, 8) > 0
    assert c.get_rdma_buffer_size_hint(7168 * 2, 2) == 0
    with pytest.raises(ValueError, match="num_ranks=7"):
        c.get_rdma_buffer_size_hint(7168 * 2, 7)
    no_node_env.delenv("EPGEN_RANKS_PER_NODE")
    no_node_env.setenv("LOCAL_WORLD_SIZE", "4")                   # torchrun's ranks per host
    assert c.get_rdma_buffer_size_hint(7168 * 2, 8) > 0
    no_node_env.setenv("LOCAL_WORLD_SIZE", "x")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE='x'"):
        c.get_rdma_buffer_size_hint(7168 * 2, 8)


@pytest.mark.parametrize("hidden", [7168, 4096, 2880])
@pytest.mark.parametrize("nodes, L", [(2, 1), (2, 4), (4, 2), (2, 40)])
def test_hint_holds_every_call_it_promises(no_node_env, hidden, nodes, L):
    """BF16 rows of hidden, or FP8 rows with their (partial last) scale group, top-k up to 32."""
    for c in (epgen.Buffer.get_dispatch_config(nodes * L), epgen.Config(24, 6, 256, 20, 128)):
        hint = il.rdma_buffer_size_hint(c, hidden * 2, nodes * L, L)
        for row, scales in ((hidden * 2, 0), (hidden, -(-hidden // 128))):
            rec = max(il.dispatch_record_bytes(row, scales, 32, L), il.combine_record_bytes(hidden, 32))
            assert il.region_bytes(c, nodes, L, rec, 1024 // (nodes * L)) <= hint


@pytest.mark.parametrize("hidden", [7168, 4096, 2880])
@pytest.mark.parametrize("nodes, L", [(2, 1), (2, 4), (4, 2), (2, 8)])
def test_nvl_hint_holds_the_internode_dispatch(hidden, nodes, L):
    """DeepEP users size num_nvl_bytes with Config.get_nvl_buffer_size_hint: it holds the
    internode dispatch's forwarding rings too (BF16 or FP8 rows, top-k up to 32)."""
    R = nodes * L
    for c in (epgen.Buffer.get_dispatch_config(R), epgen.Config(24, 6, 256, 20, 128)):
        hint = c.get_nvl_buffer_size_hint(hidden * 2, R)
        for row, scales in ((hidden * 2, 0), (hidden, -(-hidden // 128))):
            rec = il.dispatch_record_bytes(row, scales, 32, L)
            assert il.nvl_need(c, nodes, L, rec) <= hint
