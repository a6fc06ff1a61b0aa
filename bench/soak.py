"""Soak: many low-latency and normal-mode dispatch + combine pairs on one Buffer, then Buffers
created and destroyed in a loop; prints a JSON summary (issue 14, item 7).

python bench/soak.py --ranks 2 --ll-pairs 1000000 --normal-pairs 100000 [--check-every 1000] [--out F]

Random token counts and routing over a few specs (compiled during warm-up, so nothing compiles
in the timed loop), low-latency calls mixed synchronous / async / hooked / graph-replayed and
normal calls synchronous / async; every --check-every-th pair is compared with epgen.reference
after reading the Buffer's error word; GPU memory (torch allocated / reserved, device free) and
host RSS (and torch's pinned-memory cache within it) are sampled, and growth after warm-up of
torch's allocated memory or of host RSS outside the pinned cache beyond --gpu-growth-mb /
--host-growth-mb fails the run (the pinned cache's own growth is reported), as does host RSS
growth beyond --late-growth-mb over the second half of either loop (a leak per call shows there
as a steady climb well under the total bound). Then --buffers Buffers are created, used once and destroyed, and the device's free
memory before and after must agree within the same bound. Exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

M = 128                                        # low-latency max tokens per rank
LOCAL_EXPERTS = 8
# (hidden, top-k, fp8): a few specs; the graph-replayed calls use the reliability test's
# captured bf16 H=2048 K=8 pair
LL_SPECS = [(7168, 8, True), (2048, 8, False), (4096, 6, True)]
NORMAL_SPECS = [(7168, 8), (2048, 8)]
NORMAL_TOKENS = 512
POOL = 4                                       # input sets per spec, cycled
# how the low-latency pairs are called, drawn per pair; EPGEN_SOAK_LL_MODES=sync,graph (say)
# draws from those alone (to find which mode a failure needs)
LL_MODES = tuple(m for m in os.environ.get("EPGEN_SOAK_LL_MODES", "").split(",") if m) or \
    ("sync", "sync", "hook", "async", "graph")


def _memory():
    import torch
    free, total = torch.cuda.mem_get_info()
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    # torch's pinned-memory cache (gloo stages the golden model's CUDA gathers through it)
    # keeps one block per power-of-two size it has served: each new size class of a gather
    # adds a step of RSS (+288 MB once at 8 ranks: nine 32 MiB blocks, bench/NOTES.md,
    # session 12) that torch bounds and reuses; it is sampled apart, and host growth is the
    # rest of RSS
    pinned = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    return dict(allocated_mb=torch.cuda.memory_allocated() / 2**20,
                reserved_mb=torch.cuda.memory_reserved() / 2**20,
                device_used_mb=(total - free) / 2**20, host_rss_mb=rss / 2**20,
                pinned_cache_mb=pinned / 2**20, host_unpinned_mb=(rss - pinned) / 2**20)


class _Pool:
    """Every rank's inputs of POOL sets per spec, generated once on the GPU (the same on every
    rank), so a call costs no input generation and a checked call has every rank's inputs."""

    ll_last = None       # (hidden, graph-replayed) of the previous low-latency pair

    def __init__(self, R, E):
        from tests import test_low_latency_gpu as llt
        from tests import test_normal_gpu as nt
        from tests import test_reliability_gpu as rel
        self.ll = {(spec, i): [tuple(t.cuda() for t in llt._inputs(
                       90000 + 97 * i + si, r, M, spec[0], spec[1], E, R)) for r in range(R)]
                   for si, spec in enumerate(LL_SPECS) for i in range(POOL)}
        self.normal = {(spec, i): [tuple(t.cuda() for t in nt._inputs(
                           80000 + 31 * i + si, r, NORMAL_TOKENS, spec[0], spec[1], E, R)[:3])
                           for r in range(R)]
                       for si, spec in enumerate(NORMAL_SPECS) for i in range(POOL)}
        # a fixed expert output per hidden (the graph's included), made before the baseline
        import torch
        self.expert_out = {H: torch.full((LOCAL_EXPERTS, R * M, H), 0.5, dtype=torch.bfloat16,
                                         device="cuda")
                           for H in {h for h, _, _ in LL_SPECS} | {rel.H}}


def _progress(rank, mode, pairs, since, mem):
    """Rank 0, every twentieth of a loop: a line a run killed at its limit still leaves."""
    if rank == 0:
        print(f"[soak] {mode}: {pairs} pairs in {time.perf_counter() - since:.1f} s, "
              f"{json.dumps(mem)}", flush=True)


def _cut(sets, tokens):
    """Each rank's inputs cut to its token count (row slices stay contiguous and aligned)."""
    return [tuple(t[:n] for t in ts) for ts, n in zip(sets, tokens)]


def _ll_pair(buf, rank, R, E, rng, pool, graphs, check):
    """One low-latency dispatch + combine; checked against the reference when `check`."""
    import torch
    from tests import test_low_latency_gpu as llt
    from tests import test_reliability_gpu as rel
    mode = rng.choice(LL_MODES)
    spec = (rel.H, rel.K, False) if mode == "graph" else rng.choice(LL_SPECS)
    i = rng.randrange(POOL)
    tokens = [M if mode == "graph" else rng.randint(1, M) for _ in range(R)]   # same on all ranks
    ins = _cut(pool.ll[(spec, i)], tokens)
    x, idx, w = ins[rank]
    H, K, fp8 = spec
    # A graph replay runs no host code, so the Buffer cannot start it (or the eager call after
    # it) with the barrier a change of hidden needs: the user's part (README, CUDA graphs)
    last, pool.ll_last = pool.ll_last, (H, mode == "graph")
    if last is not None and last[0] != H and (last[1] or mode == "graph"):
        buf.clean_low_latency_buffer(M, H, E)
    if mode == "graph":
        d, finish = rel._ll_call(buf, graphs, "graph", "dispatch", x, idx)
    else:
        kw = dict(async_finish=mode == "async", return_recv_hook=mode == "hook")
        recv, count, handle, ev, hook = buf.low_latency_dispatch(x, idx, M, E, use_fp8=fp8, **kw)
        d = (recv, count, handle)
        if mode == "hook":
            hook()
        if mode == "async":
            ev.current_stream_wait()
    # the simulated expert (dequantize, scale) reads and writes the whole [experts, R * M, H]
    # receive buffer several times: ~600 MB of HBM traffic at H 7168, more GPU time than the
    # pair's own kernels; only a checked pair needs it, the others combine a fixed tensor
    y = llt._expert_out(d[0], fp8, H) if check else pool.expert_out[H]
    if mode == "graph":
        out = graphs.combine(y, idx, w, d[2])
    else:
        out, ev, hook = buf.low_latency_combine(y, idx, w, d[2], **kw)
        if mode == "hook":
            hook()
        if mode == "async":
            ev.current_stream_wait()
    if check:
        torch.cuda.synchronize()
        buf.check_errors()
        llt._check_dispatch(rank, ins, E, d, fp8, False, False)
        llt._check_combine(rank, ins, y, d[2], out)


def _normal_pair(buf, rank, R, E, rng, pool, check):
    import torch
    from epgen import reference as ref
    from tests import test_normal_gpu as nt
    from tests import test_reliability_gpu as rel
    spec = rng.choice(NORMAL_SPECS)
    i = rng.randrange(POOL)
    tokens = [rng.randint(1, NORMAL_TOKENS) for _ in range(R)]
    async_finish = rng.random() < 0.5
    ins = _cut(pool.normal[(spec, i)], tokens)
    out = rel._normal_dispatch(buf, rank, ins, E, async_finish=async_finish)
    if async_finish:
        out[5].current_stream_wait()
    y = (out[0].float() * 0.5).to(torch.bfloat16)
    combined, _, ev = buf.combine(y, out[4], async_finish=async_finish)
    if async_finish:
        ev.current_stream_wait()
    if check:
        torch.cuda.synchronize()
        buf.check_errors()
        rel._check_normal_dispatch(rank, ins, E, out)
        in_ranks = [ref.get_dispatch_layout(t[1], E, R)[2] for t in ins]
        nt._eq("combined_x", combined, ref.combine(rel._gather_var(y), in_ranks, rank).combined_x)


def soak(rank, world, cfg):
    """The soak on one rank; returns its summary (raises on a wrong result or device error)."""
    os.environ.setdefault("EPGEN_TIMEOUT_S", "20")
    import torch
    import torch.distributed as dist
    import epgen
    from tests import test_reliability_gpu as rel
    rel.share_sms()           # normal mode's default channels within this rank's SMs (8 per GPU: 16)
    R, E = world, LOCAL_EXPERTS * world
    Hmax = max(h for h, _, _ in LL_SPECS)
    nvl = epgen.Config(20, 8, 256, 6, 128).get_nvl_buffer_size_hint(Hmax * 2, R)
    rdma = epgen.Buffer.get_low_latency_rdma_size_hint(M, Hmax, R, E)
    buf = epgen.Buffer(dist.group.WORLD, nvl, rdma, low_latency_mode=True)
    rng = random.Random(cfg["seed"])           # the same sequence on every rank
    summary = dict(rank=rank, world=world, ll_pairs=cfg["ll_pairs"],
                   normal_pairs=cfg["normal_pairs"], checked=0, errors=0)
    pool = _Pool(R, E)
    graphs = rel._LLGraphs(buf, E)
    for _ in range(len(LL_SPECS) * 8):         # warm-up: every spec compiles here
        _ll_pair(buf, rank, R, E, rng, pool, graphs, check=True)
    for _ in range(len(NORMAL_SPECS) * 4):
        _normal_pair(buf, rank, R, E, rng, pool, check=True)
    torch.cuda.synchronize()
    dist.barrier()
    mem = [_memory()]
    t0 = time.perf_counter()
    every, sample = cfg["check_every"], max(1, cfg["ll_pairs"] // 20)
    loops = {"low-latency": [], "normal": []}     # each loop's samples: its late growth
    for n in range(cfg["ll_pairs"]):
        check = (n + 1) % every == 0
        _ll_pair(buf, rank, R, E, rng, pool, graphs, check)
        summary["checked"] += check
        if (n + 1) % sample == 0:
            mem.append(_memory())
            loops["low-latency"].append(mem[-1])
            _progress(rank, "low-latency", n + 1, t0, mem[-1])
    summary["ll_seconds"] = round(time.perf_counter() - t0, 2)
    t1 = time.perf_counter()
    sample = max(1, cfg["normal_pairs"] // 20)
    for n in range(cfg["normal_pairs"]):
        check = (n + 1) % every == 0
        _normal_pair(buf, rank, R, E, rng, pool, check)
        summary["checked"] += check
        if (n + 1) % sample == 0:
            mem.append(_memory())
            loops["normal"].append(mem[-1])
            _progress(rank, "normal", n + 1, t1, mem[-1])
    torch.cuda.synchronize()
    buf.check_errors()
    summary["normal_seconds"] = round(time.perf_counter() - t1, 2)
    mem.append(_memory())
    del graphs
    buf.destroy()
    summary["memory_start"], summary["memory_end"] = mem[0], mem[-1]
    summary["memory_max"] = {k: max(m[k] for m in mem) for k in mem[0]}
    # a leak keeps tensors alive (allocated); the caching allocator's reserve may still grow
    # with the random shapes' fragmentation, so it is reported, not bounded
    growth_gpu = summary["memory_max"]["allocated_mb"] - mem[0]["allocated_mb"]
    growth_host = summary["memory_max"]["host_unpinned_mb"] - mem[0]["host_unpinned_mb"]
    summary["gpu_growth_mb"], summary["host_growth_mb"] = round(growth_gpu, 1), round(growth_host, 1)
    summary["pinned_cache_growth_mb"] = round(
        summary["memory_max"]["pinned_cache_mb"] - mem[0]["pinned_cache_mb"], 1)
    # a leak per call grows steadily: the second half of each loop (its caches warm by then)
    # must stay nearly flat (at bfc44e6 the normal loop's argument templates, one per token
    # count, grew 20 MB there, under the total bound)
    late = {}
    for name, samples in loops.items():
        if len(samples) >= 4:
            mid = samples[len(samples) // 2 - 1]
            late[name] = round(max(m["host_unpinned_mb"] for m in samples[len(samples) // 2:])
                               - mid["host_unpinned_mb"], 1)
    summary["host_late_growth_mb"] = late
    assert growth_gpu <= cfg["gpu_growth_mb"], f"GPU memory (torch allocated) grew {growth_gpu:.1f} MB"
    for name, grew in late.items():
        assert grew <= cfg["late_growth_mb"], \
            f"host RSS grew {grew} MB in the second half of the {name} loop (a leak per call?)"
    assert growth_host <= cfg["host_growth_mb"], \
        f"host RSS outside torch's pinned cache grew {growth_host:.1f} MB"

    # Buffers created, used and destroyed: no symmetric memory or module left behind
    torch.cuda.synchronize()
    before = _memory()["device_used_mb"]
    for b in range(cfg["buffers"]):
        bb = epgen.Buffer(dist.group.WORLD, 0, rdma, low_latency_mode=True)
        x, idx, _ = pool.ll[(LL_SPECS[1], 0)][rank]
        bb.low_latency_dispatch(x, idx, M, E, use_fp8=False)
        torch.cuda.synchronize()
        bb.check_errors()
        bb.destroy()
    torch.cuda.synchronize()
    after = _memory()["device_used_mb"]
    summary["buffers"], summary["buffer_cycle_device_growth_mb"] = cfg["buffers"], round(after - before, 1)
    assert after - before <= cfg["gpu_growth_mb"], \
        f"{cfg['buffers']} Buffer create/destroy cycles grew device memory {after - before:.1f} MB"
    summary["deadline_fired"] = False
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--ll-pairs", type=int, default=1_000_000)
    ap.add_argument("--normal-pairs", type=int, default=100_000)
    ap.add_argument("--check-every", type=int, default=1000)
    ap.add_argument("--buffers", type=int, default=100)
    ap.add_argument("--gpu-growth-mb", type=float, default=64.0)
    ap.add_argument("--host-growth-mb", type=float, default=256.0)
    ap.add_argument("--late-growth-mb", type=float, default=8.0,
                    help="bound on host RSS growth over each loop's second half")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--timeout-s", type=float, default=3600.0)
    ap.add_argument("--out", default=None, help="also write the JSON summary to this file")
    ap.add_argument("--commit", default="", help="the checkout's commit, for the record")
    args = ap.parse_args()
    from epgen import launch
    from tests import gpu_harness
    where = launch.plan(args.ranks).record()      # (shared_gpu, placement, ...)
    cfg = dict(ll_pairs=args.ll_pairs, normal_pairs=args.normal_pairs, seed=args.seed,
               check_every=args.check_every, buffers=args.buffers,
               gpu_growth_mb=args.gpu_growth_mb, host_growth_mb=args.host_growth_mb,
               late_growth_mb=args.late_growth_mb)
    t0 = time.perf_counter()
    try:
        per_rank = gpu_harness.run_ranks(args.ranks, soak, cfg, timeout_s=args.timeout_s)
        ok, err = True, None
    except AssertionError as exc:
        per_rank, ok, err = [], False, str(exc)
    out = dict(ok=ok, commit=args.commit, ranks=args.ranks, **where, config=cfg,
               wall_seconds=round(time.perf_counter() - t0, 1), per_rank=per_rank,
               errors=0 if ok else 1, error=err)
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
