"""Internode normal-mode dispatch / combine, measured on each rank (`epgen bench --mode internode`).

DeepEP's internode shape and routing (tests/test_internode.py, 567632d: 4096 tokens, hidden
7168, top-8 of 256 experts, each token's experts on at most num_topk_groups nodes; routing and
byte counts in internode_traffic.py). Nodes are EPGEN_RANKS_PER_NODE ranks; `epgen bench` starts
every rank on this host, so they are virtual nodes and the puts between them ride NVSHMEM's P2P
transport: the times are not RDMA times (the records say `virtual_nodes`). Timed as the normal
benchmark (timing.py): CUDA events around the call and the profiler's kernel durations, median
of the runs after warm-up, L2 flushed and ranks aligned before each. Ops: the cached dispatch
(handle) in BF16 and DeepEP's FP8, the uncached BF16 dispatch with top-k (its counts exchange
and host wait included), and the BF16 combine. `bytes` is the RDMA bytes as DeepEP counts them
(its "RDMA" GB/s), `nvl_bytes` the NVLink ones (its "NVL" GB/s).
"""
from __future__ import annotations

import os

from . import internode_traffic, timing
from .progress import Progress

# (op, dtype, cached); combine moves BF16 (DeepEP's combine has no FP8).
OPS = (("internode_dispatch", "bf16", True), ("internode_dispatch", "fp8", True),
       ("internode_dispatch_uncached", "bf16", False), ("internode_combine", "bf16", True))
# DeepEP's internode test Config: 8 / 512 NVLink chunk / buffer tokens, 16 / 128 RDMA.
CHUNKS = (8, 512, 16, 128)
SMS = 24                     # DeepEP's internode test and its published numbers


def steps(cfg: dict) -> int:
    return len(OPS) * len(cfg["tokens"])


def worker(rank, world, cfg):
    os.environ["EPGEN_RANKS_PER_NODE"] = str(cfg["ranks_per_node"])
    os.environ.setdefault("EPGEN_TIMEOUT_S", "60")
    import torch
    import torch.distributed as dist
    import epgen
    from epgen import formats
    from epgen import reference as ref
    H, K, E, runs = cfg["hidden"], cfg["topk"], cfg["experts"], cfg["runs"]
    L, G = cfg["ranks_per_node"], cfg["topk_groups"]
    fp8 = formats.get(cfg.get("wire_format", "fp8_e4m3_f32_128"))
    progress = Progress(steps(cfg)) if rank == 0 else None
    dev = torch.device("cuda", torch.cuda.current_device())
    share = min(torch.cuda.get_device_properties(dev).multi_processor_count, 128) // 2 * 2
    sms = min(SMS, share)
    config = epgen.Config(sms, *CHUNKS)
    buf = epgen.Buffer(dist.group.WORLD, config.get_nvl_buffer_size_hint(H * 2, world),
                       config.get_rdma_buffer_size_hint(H * 2, world))
    t = buf.topology
    if (t.num_nodes, t.ranks_per_node) != (world // L, L):
        raise RuntimeError(f"rank {rank}: the Buffer's topology is {t}, not {world // L} nodes "
                           f"of {L}")
    where = dict(virtual_nodes=not t.spans_hosts, num_hosts=t.num_hosts)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    records = []
    try:
        for T in cfg["tokens"]:
            # Every rank's routing from the seeds: the counts are of the routing that runs.
            idxs = internode_traffic.routing(world, L, T, E, K, G, cfg["seed"])
            traffic = {d: internode_traffic.count(idxs, E, L, H, d) for d in ("bf16", fp8.name)}
            torch.manual_seed(1 + rank)
            x = torch.randn(T, H, device=dev).to(torch.bfloat16)
            x_q = ref.wire_cast(x, fp8.name)
            idx = idxs[rank].to(dev)
            w = torch.rand(T, K, device=dev)
            per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
            layout = dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
                          is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
            recv, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w,
                                                    config=config, **layout)
            torch.cuda.synchronize()
            buf.check_errors()
            mine = traffic["bf16"][rank]
            if recv.size(0) != mine.nvl_recv_tokens:
                raise RuntimeError(f"rank {rank}: dispatch received {recv.size(0)} tokens, the "
                                   f"count of its routing says {mine.nvl_recv_tokens}")
            calls = {
                ("internode_dispatch", "bf16"):
                    lambda: buf.dispatch(x, handle=handle, config=config),
                ("internode_dispatch", "fp8"):
                    lambda: buf.dispatch(x_q, handle=handle, config=config, wire_format=fp8),
                ("internode_dispatch_uncached", "bf16"):
                    lambda: buf.dispatch(x, topk_idx=idx, topk_weights=w, config=config,
                                         **layout),
                ("internode_combine", "bf16"): lambda: buf.combine(recv, handle, config=config),
            }
            for op, dtype, _ in OPS:
                name = fp8.name if dtype == "fp8" else dtype
                records.append(_measure(op, name, sms, T, calls[(op, dtype)], traffic[name],
                                        rank, runs, cfg["warmup"], flush, where))
                if progress:
                    progress.step(f"internode {op} {name}, {T} tokens")
            buf.check_errors()
        torch.cuda.synchronize()
        dist.barrier()
    finally:
        buf.destroy()
    return {"device": torch.cuda.get_device_name(dev), "records": records}


def _measure(op, dtype, sms, tokens, fn, traffic, rank, runs, warmup, flush, where) -> dict:
    """Time fn (events, then the profiler) and make its record."""
    samples = timing.time_events(fn, runs, flush, warmup)
    prof = timing.profile_runs(fn, runs, flush, warmup=0)
    return record(op, dtype, sms, tokens, samples, [sum(r["durations"]) for r in prof],
                  [r["launch_gap"] for r in prof], traffic, rank, where)


def record(op, dtype, sms, tokens, samples, kernel_samples, launch_gaps, traffic, rank,
           where) -> dict:
    """One record from the samples (us): median times, the bytes as DeepEP counts them (this
    rank's Traffic, and the ranks' summary), their GB/s."""
    t, k = timing.median(samples), timing.median(kernel_samples)
    mine = traffic[rank]
    rdma, nvl = mine.rdma_send_bytes, mine.nvl_recv_bytes
    return dict(op=op, dtype=dtype, num_sms=sms, tokens=tokens, bytes=rdma, time_us=t,
                gbps=rdma / t / 1e3, samples=samples, kernel_us=k, kernel_samples=kernel_samples,
                launch_gap_us=timing.median(launch_gaps),
                rdma_bytes=rdma, nvl_bytes=nvl, rdma_gbps=rdma / t / 1e3,
                nvl_gbps=nvl / t / 1e3, rdma_kernel_gbps=rdma / k / 1e3,
                nvl_kernel_gbps=nvl / k / 1e3, **mine.record(),
                ranks_traffic=internode_traffic.summary(traffic), **where)
