"""CPU: which ranks form a node (epgen/runtime/topology.py), from host keys and from a real gloo
group of processes on this host."""
from __future__ import annotations

import multiprocessing
import os

import pytest

from epgen.runtime import topology
from epgen.runtime.topology import RANKS_PER_NODE_ENV, from_gathered, from_host_keys


def _layout(t):
    return [(t.node_of(r), t.local_rank_of(r)) for r in range(t.num_ranks)]


def test_hosts_make_nodes_of_any_size():
    t = from_host_keys(["a"] * 3 + ["b"] * 3)
    assert (t.num_nodes, t.ranks_per_node, t.num_hosts, t.source) == (2, 3, 2, "hosts")
    assert _layout(t) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert t.spans_nodes and t.spans_hosts and t.rank_of(1, 2) == 5


def test_one_host_is_one_node():
    t = from_host_keys(["a"] * 4)
    assert (t.num_nodes, t.ranks_per_node, t.spans_nodes, t.spans_hosts) == (1, 4, False, False)


def test_override_splits_a_host_into_virtual_nodes():
    t = from_host_keys(["a"] * 8, "2")
    assert (t.num_nodes, t.ranks_per_node, t.num_hosts, t.source) == (4, 2, 1, RANKS_PER_NODE_ENV)
    assert _layout(t)[5] == (2, 1) and t.spans_nodes and not t.spans_hosts
    t = from_host_keys(["a"] * 4 + ["b"] * 4, "1")    # virtual nodes on two hosts
    assert (t.num_nodes, t.num_hosts) == (8, 2)
    assert from_host_keys(["a"] * 4, "").ranks_per_node == 4     # empty = unset


@pytest.mark.parametrize("value, rule", [
    ("3", "must divide the group's 8 ranks"),
    ("0", "must be a positive integer"),
    ("x", "must be a positive integer"),
    ("8", "a node cannot span hosts"),
])
def test_bad_override_names_variable_and_value(value, rule):
    with pytest.raises(ValueError) as e:
        from_host_keys(["a"] * 4 + ["b"] * 4, value)
    assert f"{RANKS_PER_NODE_ENV}={value!r}" in str(e.value) and rule in str(e.value)


def test_hosts_must_hold_consecutive_equal_blocks():
    with pytest.raises(ValueError, match="must be consecutive"):
        from_host_keys(["a", "b", "a", "b"])
    with pytest.raises(ValueError, match="same number"):
        from_host_keys(["a", "a", "a", "b"])


def test_ranks_must_agree_on_the_override():
    assert from_gathered([("a", "2"), ("a", "2")]).ranks_per_node == 2
    with pytest.raises(ValueError, match=f"{RANKS_PER_NODE_ENV} differs.*rank 1: None"):
        from_gathered([("a", "2"), ("a", None)])


def test_host_key_is_stable_and_names_the_host():
    import socket
    assert topology.host_key() == topology.host_key()
    assert topology.host_key().startswith(socket.gethostname() + "/")


OVERRIDES = [(None, 1), ("2", 2), ("1", 4)]     # (EPGEN_RANKS_PER_NODE, nodes of 4 ranks)


def _worker(rank, world, init, queue):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        sub = dist.new_group([0, 2])                   # a subgroup: its own ranks, its own nodes
        for override, _ in OVERRIDES:
            if override is None:
                os.environ.pop(RANKS_PER_NODE_ENV, None)
            else:
                os.environ[RANKS_PER_NODE_ENV] = override
            t = topology.resolve(dist.group.WORLD)
            queue.put(((override, rank), (t.num_nodes, t.ranks_per_node, t.node_of(rank),
                                          t.local_rank_of(rank))))
            if rank in (0, 2):
                s = topology.resolve(sub)
                queue.put(((override, "sub", rank), (s.num_ranks, s.num_nodes)))
    except Exception as e:              # reported to the test, which names it
        queue.put(((None, "error", rank), repr(e)))
    finally:
        dist.destroy_process_group()


def test_resolve_over_a_gloo_group_of_processes(tmp_path):
    world = 4
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    init = f"file://{tmp_path / 'store'}"
    procs = [ctx.Process(target=_worker, args=(r, world, init, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(len(OVERRIDES) * (world + 2)):
        key, value = queue.get(timeout=120)
        assert "error" not in key, value
        results[key] = value
    for p in procs:
        p.join(timeout=60)
    for override, nodes in OVERRIDES:
        L = world // nodes
        for r in range(world):
            assert results[(override, r)] == (nodes, L, r // L, r % L), (override, results)
        sub_nodes = 1 if override is None else 2 // int(override)
        assert results[(override, "sub", 0)] == results[(override, "sub", 2)] == (2, sub_nodes)
