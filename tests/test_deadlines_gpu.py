"""Deadlines fired on purpose, in every kernel family (the per-rank LL combine, the clean's
barrier, low latency over NVSHMEM puts without NVLink, and internode over two virtual nodes
included): the last rank sits one call out, the others' kernels wait for it until
EPGEN_TIMEOUT_S, and then each live rank gets the EpgenDeviceError naming itself, the
operation and the silent peer; nothing faults (the CUDA context stays usable), destroy()
returns, and fresh Buffers then give correct results.

Each family runs on a Buffer of its own (a Buffer is unusable after a device error). The silent
rank never frees the Buffer its peers gave up on (freeing symmetric memory is collective, and
they skip it after their error), so that memory is leaked on purpose: the NVSHMEM heap is sized
for it up front. The family Buffers are made with explicitly_destroy=True: with DeepEP's
default a Buffer dropped by the silent rank would be freed when collected, a collective free
its peers never join, which gives up after EPGEN_TIMEOUT_S and leaves NVSHMEM unusable in that
process (its next Buffer raises while its peers wait in NVSHMEM's allocation, with no deadline).
"""
from __future__ import annotations

import os
import traceback

import pytest

from tests import gpu_harness

pytestmark = pytest.mark.gpu

DEADLINE_S = 2.0
H, K, M = 2048, 8, 32


def _gives_up(call):
    """Run one call a peer never joins: it may raise the deadline itself (a host-side wait)."""
    from epgen.runtime.errors import EpgenDeviceError
    try:
        out = call()
        return out
    except EpgenDeviceError:
        return None


def _normal_inputs(rank, R):
    import torch
    E = 8 * R
    g = torch.Generator().manual_seed(11 + rank)
    x = torch.randn(64, H, generator=g).to(torch.bfloat16).cuda()
    idx = torch.randn(64, E, generator=g).topk(K, dim=-1).indices.cuda()
    w = torch.rand(64, K, generator=g).cuda()
    return x, idx, w, E


def _normal_buffer(R):
    import torch.distributed as dist
    import epgen
    cfg = epgen.Config(8, 8, 256, 6, 128)
    return epgen.Buffer(dist.group.WORLD, cfg.get_nvl_buffer_size_hint(H * 2, R), 0,
                        explicitly_destroy=True), cfg


def _dispatch(buf, cfg, x, idx, w, E):
    per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    return buf.dispatch(x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
                        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                        topk_idx=idx, topk_weights=w, config=cfg)


def _family_notify(rank, R, silent):
    buf, cfg = _normal_buffer(R)
    x, idx, w, E = _normal_inputs(rank, R)
    if not silent:
        _gives_up(lambda: _dispatch(buf, cfg, x, idx, w, E))   # the notify's host wait raises
    return buf


def _family_cached_dispatch(rank, R, silent, layout_already_cached=True):
    """The cached dispatch kernel waits for the silent rank. Without a cached call first, the
    ring layout changes (no top-k in the records) and the cross-rank barrier that runs before
    the kernel is what waits."""
    buf, cfg = _normal_buffer(R)
    x, idx, w, E = _normal_inputs(rank, R)
    handle = _dispatch(buf, cfg, x, idx, w, E)[4]
    if layout_already_cached:
        buf.dispatch(x, handle=handle, config=cfg)      # all ranks: the cached layout is set
    buf.check_errors()
    if not silent:
        _gives_up(lambda: buf.dispatch(x, handle=handle, config=cfg))
    return buf


def _family_combine(rank, R, silent):
    buf, cfg = _normal_buffer(R)
    x, idx, w, E = _normal_inputs(rank, R)
    recv, _, r_w, _, handle, _ = _dispatch(buf, cfg, x, idx, w, E)
    buf.check_errors()
    if not silent:
        _gives_up(lambda: buf.combine(recv, handle, topk_weights=r_w, config=cfg))
    return buf


def _ll_buffer(R, nvlink=True):
    """nvlink=False: allow_nvlink_for_low_latency_mode=False, every peer through NVSHMEM puts
    with signals (the path peers on other nodes take), whose waits are epgen's own too."""
    import torch.distributed as dist
    import epgen
    E = 4 * R
    return epgen.Buffer(dist.group.WORLD, 0, epgen.Buffer.get_low_latency_rdma_size_hint(M, H, R, E),
                        low_latency_mode=True, explicitly_destroy=True,
                        allow_nvlink_for_low_latency_mode=nvlink), E


def _ll_inputs(rank, E):
    import torch
    g = torch.Generator().manual_seed(23 + rank)
    x = torch.randn(M, H, generator=g).to(torch.bfloat16).cuda()
    idx = torch.randn(M, E, generator=g).topk(K if E >= K else E, dim=-1).indices.cuda()
    w = torch.rand(idx.shape, generator=g).cuda()
    return x, idx, w


def _family_ll_dispatch(rank, R, silent, hook=False, nvlink=True):
    buf, E = _ll_buffer(R, nvlink)
    x, idx, w = _ll_inputs(rank, E)
    if not silent:
        out = _gives_up(lambda: buf.low_latency_dispatch(x, idx, M, E, use_fp8=True,
                                                         return_recv_hook=hook))
        if hook and out is not None:
            out[4]()
    return buf


def _family_ll_combine(rank, R, silent, per_rank=False, nvlink=True):
    """per_rank: EPGEN_LL_COMBINE=per_rank (asserted to run that kernel at this shape), whose
    send half waits for every rank's routes before any partial goes out."""
    import torch
    from epgen.ops.low_latency import combine_runs_per_rank
    buf, E = _ll_buffer(R, nvlink)
    x, idx, w = _ll_inputs(rank, E)
    recv, _, handle, _, _ = buf.low_latency_dispatch(x, idx, M, E, use_fp8=False)
    torch.cuda.synchronize()
    buf.check_errors()
    if per_rank:
        os.environ["EPGEN_LL_COMBINE"] = "per_rank"
    try:
        assert not per_rank or combine_runs_per_rank(M, H, R, E, idx.size(1), False, False), \
            "the per-rank combine does not run at this shape"
        if not silent:
            _gives_up(lambda: buf.low_latency_combine(recv, idx, w, handle))
    finally:
        os.environ.pop("EPGEN_LL_COMBINE", None)
    return buf


def _family_ll_clean(rank, R, silent):
    """clean_low_latency_buffer without enable_shrink: a full barrier."""
    buf, E = _ll_buffer(R)
    if not silent:
        _gives_up(lambda: buf.clean_low_latency_buffer(M, H, E))
    return buf


def _internode_buffer(R):
    """A normal-mode Buffer over two virtual nodes of R // 2 ranks (EPGEN_RANKS_PER_NODE, read
    when the Buffer is made), so that its calls run the internode kernels (puts with signals
    between the nodes, NVLink forwarding inside each)."""
    import torch.distributed as dist
    import epgen
    saved = os.environ.get("EPGEN_RANKS_PER_NODE")
    os.environ["EPGEN_RANKS_PER_NODE"] = str(max(1, R // 2))
    try:
        cfg = epgen.Config(8, 8, 256, 6, 128)
        buf = epgen.Buffer(dist.group.WORLD, cfg.get_nvl_buffer_size_hint(H * 2, R),
                           cfg.get_rdma_buffer_size_hint(H * 2, R), explicitly_destroy=True)
    finally:
        if saved is None:
            os.environ.pop("EPGEN_RANKS_PER_NODE")
        else:
            os.environ["EPGEN_RANKS_PER_NODE"] = saved
    assert buf.topology.num_nodes == 2, buf.topology
    return buf, cfg


def _family_internode(rank, R, silent, stage):
    """`stage`: "notify" (the silent rank skips an uncached dispatch: its counts never come),
    "dispatch" (a cached dispatch, after one on every rank) or "combine"."""
    buf, cfg = _internode_buffer(R)
    x, idx, w, E = _normal_inputs(rank, R)
    if stage == "notify":
        if not silent:
            _gives_up(lambda: _dispatch(buf, cfg, x, idx, w, E))
        return buf
    recv, _, r_w, _, handle, _ = _dispatch(buf, cfg, x, idx, w, E)
    if stage == "dispatch":
        buf.dispatch(x, handle=handle, config=cfg)
    buf.check_errors()
    if not silent:
        if stage == "dispatch":
            _gives_up(lambda: buf.dispatch(x, handle=handle, config=cfg))
        else:
            _gives_up(lambda: buf.combine(recv, handle, topk_weights=r_w, config=cfg))
    return buf


# (name, family, the operation the error names, whether a live rank may name another live one:
# across nodes a forwarder waits for the silent rank, and a rank that waits for that forwarder
# names the forwarder; some live rank must still name the silent one)
FAMILIES = [
    ("dispatch notify (uncached dispatch)", _family_notify, "dispatch notify", False),
    ("ring layout change barrier",
     lambda r, R, s: _family_cached_dispatch(r, R, s, layout_already_cached=False), "barrier",
     False),
    ("cached dispatch", _family_cached_dispatch, "dispatch", False),
    ("combine", _family_combine, "combine", False),
    ("low_latency_dispatch", _family_ll_dispatch, "low_latency_dispatch", False),
    ("low_latency_dispatch through the receive hook",
     lambda r, R, s: _family_ll_dispatch(r, R, s, hook=True), "low_latency_dispatch", False),
    ("low_latency_combine", _family_ll_combine, "low_latency_combine", False),
    ("low_latency_combine, the per-rank kernel",
     lambda r, R, s: _family_ll_combine(r, R, s, per_rank=True), "low_latency_combine", True),
    ("clean_low_latency_buffer", _family_ll_clean, "clean_low_latency_buffer", False),
    ("low_latency_dispatch over NVSHMEM puts (no NVLink)",
     lambda r, R, s: _family_ll_dispatch(r, R, s, nvlink=False), "low_latency_dispatch", False),
    ("low_latency_combine over NVSHMEM puts (no NVLink)",
     lambda r, R, s: _family_ll_combine(r, R, s, nvlink=False), "low_latency_combine", False),
    ("internode dispatch notify (two virtual nodes)",
     lambda r, R, s: _family_internode(r, R, s, "notify"), "dispatch notify", True),
    ("internode cached dispatch (two virtual nodes)",
     lambda r, R, s: _family_internode(r, R, s, "dispatch"), "dispatch", True),
    ("internode combine (two virtual nodes)",
     lambda r, R, s: _family_internode(r, R, s, "combine"), "combine", True),
]


# the quick tier: one wait site per kernel family (the hooked receive is the dispatch kernel's
# receive phase, covered by low_latency_dispatch; the clean is the barrier kernel's only use),
# shared out over the rank counts (gpu_harness.select_rotating: each ~2 s, 10 of them ~21 s a count)
QUICK = [0, 1, 2, 3, 4, 6, 7, 8, 9, 12]


def _expect_deadline(buf, rank, R, op, cascade=False):
    """The live rank's view after its kernel gave up: the documented error, no fault; returns
    (message, the peer it names). `cascade`: the peer may be another live rank (see FAMILIES)."""
    import torch
    from epgen.runtime.errors import OPS, EpgenDeviceError
    try:
        buf.check_errors()
    except EpgenDeviceError as exc:
        err = exc
    else:
        raise AssertionError(f"{op}: no error although rank {R - 1} never called")
    msg = str(err)
    assert OPS.get(err.op) == op and "timed out" in msg and f"rank {rank}:" in msg, msg
    named = range(-1, R) if cascade else (R - 1, -1)
    assert err.peer in named and err.peer != rank, \
        f"{op}: names peer {err.peer}, the silent one is {R - 1}: {msg}"
    torch.cuda.synchronize()                 # the context is healthy: no fault after the deadline
    torch.ones(1, device="cuda").add_(1).item()
    buf.destroy()                            # returns (skips the collective free, warns)
    return msg, err.peer


def _worker(rank, world):
    os.environ["EPGEN_TIMEOUT_S"] = gpu_harness.deadline_s(DEADLINE_S)
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(3 << 30))   # room for the leaked Buffers
    import warnings

    import torch
    import torch.distributed as dist
    from epgen.runtime.errors import EpgenDeviceError
    from tests import test_low_latency_gpu as ll
    from tests import test_normal_gpu as normal
    results = []
    silent = rank == world - 1
    kept = []           # the silent rank's Buffers stay alive (leaked) to the process's end
    for name, family, op, cascade in gpu_harness.select_rotating(FAMILIES, QUICK, world):
        peer = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")     # "destroyed after a device error"
                buf = family(rank, world, silent)
                kept.append(buf)
                if silent:
                    results.append((name, "ok"))
                else:
                    msg, peer = _expect_deadline(buf, rank, world, op, cascade)
                    results.append((name, "ok: " + msg))
        except Exception as exc:  # noqa: BLE001 - reported per family
            results.append((name, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"))
        torch.cuda.synchronize()
        named = [None] * world
        dist.all_gather_object(named, peer)        # (also: every rank's kernels are over)
        if cascade and rank == 0 and world - 1 not in named:
            results.append((f"{name}: the silent rank named", f"AssertionError: no live rank "
                            f"names the silent rank {world - 1}: {named}"))
    # The same processes and GPU, fresh Buffers: correct results (nothing left corrupted).
    try:
        import epgen
        nb = epgen.Config(8, 8, 256, 6, 128).get_nvl_buffer_size_hint(7168 * 2, world)
        buf = epgen.Buffer(dist.group.WORLD, nb, 0)
        normal._run_case(buf, rank, world, 0, normal.CASES[1][:7] + (8,) + normal.CASES[1][8:])
        buf.destroy()
        E = ll.LOCAL_EXPERTS * world
        buf = epgen.Buffer(dist.group.WORLD, 0,
                           epgen.Buffer.get_low_latency_rdma_size_hint(ll.M, 4096, world, E),
                           low_latency_mode=True)
        ll._run_case(buf, rank, world, E, 0, *ll.CASES[4])
        buf.destroy()
        results.append(("fresh Buffers after the deadlines: normal + low latency correct", "ok"))
    except (Exception, EpgenDeviceError) as exc:  # noqa: BLE001
        results.append(("fresh Buffers after the deadlines",
                        f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"))
    return results


@pytest.mark.parametrize("world", gpu_harness.rank_counts())
def test_deadline_in_every_family(world):
    gpu_harness.require_gpus(world)
    per_rank = gpu_harness.run_ranks(world, _worker, timeout_s=300)
    for r, res in enumerate(per_rank):
        for name, status in res:
            print(f"rank {r}: {name}: {status.splitlines()[0]}")
    bad = [f"rank {r}: {name}: {status}" for r, res in enumerate(per_rank)
           for name, status in res if not status.startswith("ok")]
    assert not bad, "\n".join(bad)
