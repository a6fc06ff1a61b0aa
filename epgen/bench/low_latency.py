"""Low-latency dispatch / combine, measured on every rank (`epgen bench --mode low_latency`).

epgen's kernel time from the profiler (DeepEP's bench_kineto method; host-inclusive event times
kept beside it), median of the runs after warm-up, L2 flushed and ranks aligned on the GPU before
each (timing.py): dispatch (--wire-format, DeepEP's FP8 by default), combine (BF16), both back to back, and the hooked send /
receive halves. num_max_dispatch_tokens_per_rank is the largest token count of the run, so a
sweep over tokens is the cost of one serving Buffer against its load. Same run, where every rank
has its own GPU: NCCL all_to_all_single on the same bytes and the GPU-to-GPU copy bound.
"""
from __future__ import annotations

import os

from . import timing
from .progress import Progress

# dtype None: the run's wire format (cfg["wire_format"], DeepEP's FP8 by default)
OPS = (("ll_dispatch", None), ("ll_combine", "bf16"), ("ll_dispatch_combine", None))


def steps(cfg: dict, shared_gpu: bool) -> int:
    per_point = len(OPS) + 2 + (0 if shared_gpu else 2)
    return per_point * len(cfg["tokens"]) + (0 if shared_gpu else 1)


def _record(op, dtype, tokens, nbytes, samples, **extra):
    t = timing.median(samples)
    return dict(op=op, dtype=dtype, tokens=tokens, bytes=nbytes, time_us=t,
                gbps=nbytes / t / 1e3, samples=samples, **extra)


def _time_split(call_with_hook, runs, flush, warmup):
    """Hooked calls: the send launch and the hook's receive launch, timed apart (profiler);
    the data lands (sync + barrier) between the two, as a decode step would overlap it."""
    import torch
    import torch.distributed as dist

    def run():
        hook = call_with_hook()
        torch.cuda.synchronize()
        dist.barrier()
        hook()
    per_run = timing.kernel_durations(run, runs, flush, warmup=warmup)
    return [d[0] for d in per_run], [d[1] for d in per_run]


def worker(rank, world, cfg):
    os.environ.setdefault("EPGEN_TIMEOUT_S", "30")
    import torch
    import torch.distributed as dist
    import epgen
    from epgen import formats, launch
    H, K, E, runs, warm = cfg["hidden"], cfg["topk"], cfg["experts"], cfg["runs"], cfg["warmup"]
    fmt = formats.get(cfg.get("wire_format", "fp8_e4m3_f32_128"))
    per_token = {fmt.name: fmt.bytes_per_token(H), "bf16": formats.BF16.bytes_per_token(H)}
    M = max(cfg["tokens"])
    shared = launch.worker_shares_gpu()
    progress = Progress(steps(cfg, shared)) if rank == 0 else None

    def tick(label):
        if progress:
            progress.step(f"low latency {label}")
    dev = torch.device("cuda", torch.cuda.current_device())
    buf = epgen.Buffer(dist.group.WORLD, 0, epgen.Buffer.get_low_latency_rdma_size_hint(M, H, world, E),
                       low_latency_mode=True, num_qps_per_rank=E // world)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    y = torch.randn(E // world, world * M, H, device=dev).to(torch.bfloat16)
    records = []
    try:
        for T in cfg["tokens"]:
            torch.manual_seed(1234 + rank)
            x = torch.randn(T, H, device=dev).to(torch.bfloat16)
            idx = (torch.randn(T, E, device=dev).abs() + 1).topk(K, dim=-1).indices.to(torch.int64)
            idx[torch.randint(0, T, (10,), device=dev), torch.randint(0, K, (10,), device=dev)] = -1
            w = torch.rand(T, K, device=dev)
            valid = int((idx != -1).sum())
            q_bytes = valid * (per_token[fmt.name] + 16)       # + a message header
            bf16_bytes = valid * 2 * H
            _, _, handle, _, _ = buf.low_latency_dispatch(x, idx, M, E, wire_format=fmt)
            buf.low_latency_combine(y, idx, w, handle)
            torch.cuda.synchronize()
            buf.check_errors()

            def disp():
                return buf.low_latency_dispatch(x, idx, M, E, wire_format=fmt)

            def comb():
                return buf.low_latency_combine(y, idx, w, handle)

            def both():
                r = disp()
                buf.low_latency_combine(y, idx, w, r[2])

            for (op, dtype), fn, nb in zip(OPS, (disp, comb, both),
                                           (q_bytes, bf16_bytes, q_bytes + bf16_bytes)):
                records.append(_record(op, dtype or fmt.name, T, nb,
                                       timing.time_kernels(fn, runs, flush, warmup=warm),
                                       host_inclusive_us=timing.median(
                                           timing.time_events(fn, runs, flush, warm))))
                tick(f"{op}, {T} tokens")
            ds, dr = _time_split(lambda: buf.low_latency_dispatch(
                x, idx, M, E, wire_format=fmt, return_recv_hook=True)[4], runs, flush, warm)
            records += [_record("ll_dispatch_send", fmt.name, T, q_bytes, ds),
                        _record("ll_dispatch_recv", fmt.name, T, q_bytes, dr)]
            tick(f"hooked dispatch, {T} tokens")
            cs, cr = _time_split(lambda: buf.low_latency_combine(
                y, idx, w, handle, return_recv_hook=True)[2], runs, flush, warm)
            records += [_record("ll_combine_send", "bf16", T, bf16_bytes, cs),
                        _record("ll_combine_recv", "bf16", T, bf16_bytes, cr)]
            tick(f"hooked combine, {T} tokens")
            buf.check_errors()
            if not shared:       # NCCL on the same bytes (already packed: no layout)
                for dtype, nb in ((fmt.name, q_bytes), ("bf16", bf16_bytes)):
                    n = (nb + world - 1) // world * world
                    src = torch.empty(n, dtype=torch.uint8, device=dev)
                    dst = torch.empty(n, dtype=torch.uint8, device=dev)
                    records.append(_record("nccl_a2a", dtype, T, nb, timing.time_events(
                        lambda: dist.all_to_all_single(dst, src), runs, flush, warm)))
                    tick(f"NCCL all_to_all {dtype}, {T} tokens")
        if not shared:
            cb = timing.copy_time(rank, world, flush, max(10, runs // 5))
            if cb is not None:
                records.append(_record("copy", "bf16", 0, cb[1], [cb[0]]))
            tick("GPU-to-GPU copy")
        num_sms = buf._ll.sms
        for r in records:     # payload bytes of one token in the record's format
            if r["op"] != "copy" and r["dtype"] in per_token:
                r["bytes_per_token"] = per_token[r["dtype"]]
        torch.cuda.synchronize()
        dist.barrier()
    finally:
        buf.destroy()
    for r in records:
        r["num_sms"] = num_sms if r["op"].startswith("ll_") else 0
    return {"device": torch.cuda.get_device_name(dev), "records": records}
