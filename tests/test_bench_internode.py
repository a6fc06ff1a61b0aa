"""`epgen bench --mode internode` on CPU: the node-limited routing, the byte counts (against a
hand count and against the two-level golden model), the dry run, and the argument checks."""
import argparse
import json

import pytest
import torch

from epgen import cli
from epgen import reference_internode as iref
from epgen.bench import cli as bench_cli
from epgen.bench import internode_traffic as traffic


@pytest.mark.parametrize("nodes, groups", [(2, 1), (4, 2), (8, 4), (4, 4)])
def test_no_token_spans_more_than_num_topk_groups_nodes(nodes, groups):
    E, K, T = 256, 8, 512
    idx = traffic.node_limited_topk(T, E, nodes, groups, K, seed=3)
    assert idx.shape == (T, K) and idx.dtype == torch.int64
    assert bool(((idx >= 0) & (idx < E)).all())
    assert all(len(set(row)) == K for row in idx.tolist())          # K distinct experts
    spans = [len({e // (E // nodes) for e in row}) for row in idx.tolist()]
    assert max(spans) <= groups
    if groups > 1:                # the limit binds: most tokens use every node they may
        assert sum(s == groups for s in spans) > T // 2, spans[:20]
    assert torch.equal(idx, traffic.node_limited_topk(T, E, nodes, groups, K, seed=3))
    assert not torch.equal(idx, traffic.node_limited_topk(T, E, nodes, groups, K, seed=4))


def test_the_chosen_nodes_hold_the_best_expert_scores():
    # DeepEP's rule: a node's score is its best expert's; the token keeps its top nodes. Rebuild
    # the scores from the same generator and check the kept nodes are those.
    T, E, nodes, G = 64, 32, 4, 2
    g = torch.Generator().manual_seed(9)
    scores = torch.randn(T, E, generator=g).abs() + 1
    best = scores.view(T, nodes, -1).amax(-1).topk(G, dim=-1).indices
    idx = traffic.node_limited_topk(T, E, nodes, G, 4, seed=9)
    for t in range(T):
        assert {e // (E // nodes) for e in idx[t].tolist()} <= set(best[t].tolist())
        # ... and the experts are the best ones of those nodes
        allowed = [e for e in range(E) if e // (E // nodes) in set(best[t].tolist())]
        top = sorted(allowed, key=lambda e: -float(scores[t, e]))[:4]
        assert sorted(idx[t].tolist()) == sorted(top)


def test_counts_of_a_hand_routed_case():
    # 4 ranks, 2 per node, 2 experts per rank; rank 0's tokens: t0 -> rank 0 only; t1 -> ranks
    # 1 and 2; t2 -> ranks 3 and 2 (one node, two ranks there).
    idxs = [torch.tensor([[0, 1], [2, 4], [6, 4]]), torch.tensor([[0, 2]]),
            torch.tensor([[1, 7]]), torch.tensor([[-1, -1]])]
    t = traffic.count(idxs, num_experts=8, ranks_per_node=2, hidden=16, dtype="bf16")
    r0 = t[0]
    assert (r0.token_nodes, r0.token_nodes_remote) == (4, 2)         # t0:{0} t1:{0,1} t2:{1}
    assert (r0.token_ranks, r0.token_ranks_remote) == (5, 3)
    assert r0.nvl_recv_tokens == 3                                    # rank 0 t0, rank 1, rank 2
    assert (r0.rdma_recv_tokens, r0.rdma_recv_tokens_remote) == (3, 1)   # from ranks 0 and 2
    assert r0.bytes_per_token == 32 and r0.rdma_send_bytes == 128 and r0.nvl_recv_bytes == 96
    assert r0.network_send_bytes == 64 and r0.per_rank_network_bytes == 96
    assert r0.rdma_ratio == pytest.approx(2 / 3)
    assert t[3].token_nodes == 0 and t[3].rdma_ratio is None          # routes nowhere
    assert t[3].nvl_recv_tokens == 2                                  # rank 0 t2, rank 2
    fp8 = traffic.count(idxs, 8, 2, 128, "fp8_e4m3_f32_128")[0]
    assert fp8.bytes_per_token == 128 + 4 and fp8.rdma_send_bytes == 4 * 132   # DeepEP's factor


@pytest.mark.parametrize("R, L, groups", [(4, 2, 1), (6, 2, 2), (8, 2, 4), (8, 4, 2)])
def test_counts_match_the_two_level_golden_model(R, L, groups):
    E, K, T, H = 48 if R == 6 else 64, 6, 40, 64
    idxs = traffic.routing(R, L, T, E, K, groups, seed=R * L)
    for i in idxs:                       # a few routes to nowhere, as DeepEP's tests have
        i[::7, 0] = -1
    got = traffic.count(idxs, E, L, H)
    layouts = [iref.get_dispatch_layout(i, E, R, L) for i in idxs]
    in_ranks = [lay[3] for lay in layouts]
    for r, tr in enumerate(got):
        n = r // L
        per_rank, per_node = layouts[r][0], layouts[r][1]
        h = iref.dispatch_handle(in_ranks, L, 3, r)
        rdma_from = torch.diff(h.recv_rdma_rank_prefix_sum, prepend=torch.zeros(1, dtype=torch.int32))
        assert tr.token_nodes == int(per_node.sum())
        assert tr.token_nodes_remote == int(per_node.sum() - per_node[n])
        assert tr.token_ranks == int(per_rank.sum())
        assert tr.token_ranks_remote == int(per_rank.sum() - per_rank[n * L:(n + 1) * L].sum())
        assert tr.nvl_recv_tokens == int(h.recv_gbl_rank_prefix_sum[-1])
        assert tr.rdma_recv_tokens == int(h.recv_rdma_rank_prefix_sum[-1])
        assert tr.rdma_recv_tokens_remote == tr.rdma_recv_tokens - int(rdma_from[n])
        assert tr.rdma_send_bytes == tr.token_nodes * 2 * H
    s = traffic.summary(got)
    assert s["rdma_ratio"] == pytest.approx(sum(t.token_nodes_remote for t in got)
                                            / sum(t.token_ranks_remote for t in got))
    assert s["rdma_ratio"] < 1       # nodes of more than one rank: the two-level path saves


def _args(*argv):
    p = argparse.ArgumentParser()
    bench_cli.add_arguments(p)
    return p.parse_args(list(argv))


def test_internode_configs_from_arguments(monkeypatch):
    monkeypatch.delenv("EPGEN_RANKS_PER_NODE", raising=False)
    (mode, cfg), = bench_cli.configs(_args("--mode", "internode", "--ranks", "4",
                                           "--ranks-per-node", "2"))
    assert mode == "internode"
    assert cfg == dict(tokens=[4096], hidden=7168, topk=8, experts=256, runs=50, warmup=5,
                       wire_format="fp8_e4m3_f32_128", ranks_per_node=2, topk_groups=2,
                       seed=0)
    monkeypatch.setenv("EPGEN_RANKS_PER_NODE", "1")     # the variable stands in for the flag
    (_, cfg), = bench_cli.configs(_args("--mode", "internode", "--tokens", "64"))
    assert (cfg["ranks_per_node"], cfg["topk_groups"], cfg["tokens"]) == (1, 2, [64])
    # all: the intranode modes only (the internode one needs nodes)
    assert [m for m, _ in bench_cli.configs(_args("--ranks", "4"))] == ["normal", "low_latency"]


@pytest.mark.parametrize("argv, needle", [
    (["--ranks", "4"], "--ranks-per-node: required for --mode internode"),
    (["--ranks", "4", "--ranks-per-node", "3"], "--ranks-per-node=3: must be a positive int dividing --ranks=4"),
    (["--ranks", "4", "--ranks-per-node", "4"], "--ranks-per-node=4: must leave at least 2 nodes"),
    (["--ranks", "4", "--ranks-per-node", "2", "--topk-groups", "3"],
     "--topk-groups=3: must be in [1, nodes=2]"),
    (["--ranks", "4", "--ranks-per-node", "2", "--topk-groups", "1", "--experts", "8",
      "--topk", "5"], "--topk=5: must be <= --topk-groups=1 x 4 experts per node"),
    (["--ranks", "66", "--ranks-per-node", "33", "--experts", "264"],
     "the internode kernels refuse it (InternodeDispatchSpec.num_ranks=66: must be in [2, 64])"),
    (["--ranks", "4", "--ranks-per-node", "2", "--wire-format", "nvfp4"],
     "--wire-format=nvfp4: the internode benchmark moves bf16 and fp8_e4m3_f32_128"),
])
def test_bad_internode_arguments_are_refused_before_anything_starts(argv, needle, capsys,
                                                                    monkeypatch):
    monkeypatch.delenv("EPGEN_RANKS_PER_NODE", raising=False)
    argv = ["--mode", "internode", *argv]
    with pytest.raises(ValueError) as e:
        bench_cli.configs(_args(*argv))
    assert needle in str(e.value), str(e.value)
    assert cli.main(["bench", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_dry_run_counts_without_a_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EPGEN_RANKS_PER_NODE", raising=False)
    # EP32 is past the kernels' warp limit, but counting needs no kernel.
    argv = ["bench", "--mode", "internode", "--dry-run", "--ranks", "32", "--ranks-per-node",
            "8", "--tokens", "256", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "internode_counts.json").read_text())
    (rec_bf16, rec_fp8) = data["counts"]
    idxs = traffic.routing(32, 8, 256, 256, 8, 4)
    expect = traffic.summary(traffic.count(idxs, 256, 8, 7168, "bf16"))
    assert rec_bf16["dtype"] == "bf16" and rec_bf16["num_nodes"] == 4
    assert rec_bf16["rdma_send_bytes"] == expect["rdma_send_bytes"]
    assert rec_bf16["rdma_ratio"] == pytest.approx(expect["rdma_ratio"])
    assert rec_fp8["bytes_per_token"] == 7168 + 4 * 56
    assert "EP32 (4 nodes x 8)" in out and "ratio = NIC out / per-rank" in out


def test_the_gpu_worker_imports_and_sizes_its_steps():
    from epgen.bench import internode
    cfg = dict(tokens=[64, 128])
    assert internode.steps(cfg) == len(internode.OPS) * 2
    assert callable(internode.worker)


def test_records_carry_the_counts_and_say_the_nodes_are_virtual(tmp_path):
    # The worker's record function on CPU (samples in us as the timers give them), merged and
    # printed as `epgen bench` does after a GPU run.
    from epgen.bench import internode, report
    idxs = traffic.routing(4, 2, 64, 256, 8, 2)
    per_dtype = {d: traffic.count(idxs, 256, 2, 7168, d) for d in ("bf16", "fp8_e4m3_f32_128")}
    where = dict(virtual_nodes=True, num_hosts=1)

    def per_rank(rank):
        recs = [internode.record(op, d, 24, 64, [100.0 + rank, 90.0, 110.0], [80.0, 70.0, 90.0],
                                 [0.5, 0.4, 0.6], per_dtype[d], rank, where)
                for op, d in (("internode_dispatch", "bf16"),
                              ("internode_dispatch", "fp8_e4m3_f32_128"),
                              ("internode_combine", "bf16"))]
        return {"device": "NVIDIA H200", "records": recs}
    run = dict(card="H200", num_ranks=4, hidden=7168, topk=8, num_experts=256, commit="abc",
               ranks_per_node=2, topk_groups=2, num_nodes=2, shared_gpu=True, ranks_per_gpu=4,
               placement="mps", gpus=1, mps_thread_percentage=25)
    recs = report.merge([per_rank(r) for r in range(4)], run)
    r0 = recs[0]
    mine = per_dtype["bf16"][0]
    assert r0["virtual_nodes"] is True and r0["shared_gpu"] is True
    assert r0["rdma_bytes"] == r0["bytes"] == mine.token_nodes * 14336
    assert r0["nvl_bytes"] == mine.nvl_recv_tokens * 14336
    assert r0["time_us"] == 100.0 and r0["kernel_us"] == 80.0
    assert r0["rdma_gbps"] == pytest.approx(r0["rdma_bytes"] / 100.0 / 1e3)
    assert r0["rdma_ratio"] == pytest.approx(mine.token_nodes_remote / mine.token_ranks_remote)
    assert r0["per_rank_median_us"] == [100.0, 101.0, 102.0, 103.0]
    assert recs[1]["bytes_per_token"] == 7392
    path = tmp_path / "internode.json"
    report.write_json(recs, str(path))
    text = report.table(report.load(str(path)))
    assert "EP4 (4 ranks per GPU) = 2 nodes x 2 (virtual, one host), top-2 nodes" in text
    assert "the times are not RDMA times" in text
    line = next(ln for ln in text.splitlines()
                if ln.startswith("internode_combine bf16 24 SMs") and "RDMA" not in ln
                and len(ln.split()) == 9)
    assert line.split()[4] == f"{r0['rdma_bytes'] / 1e6:.1f}", line
