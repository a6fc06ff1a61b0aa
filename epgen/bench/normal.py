"""Normal-mode intranode dispatch / combine, measured on every rank (`epgen bench --mode normal`).

Cached path (handle) timed with CUDA events around the call (DeepEP's normal-mode method) and
with the profiler's kernel durations; median of the runs after warm-up, L2 flushed and ranks
aligned on the GPU before each (timing.py). Same run, where every rank has its own GPU: NCCL
all_to_all_single moving the same rows, and the GPU-to-GPU copy bound.
"""
from __future__ import annotations

import os

from . import timing
from .progress import Progress


def steps(cfg: dict, shared_gpu: bool) -> int:
    """Progress steps of one run: per token count, the epgen ops (+ NCCL), then the copy."""
    per_point = 4 + (0 if shared_gpu else 1)
    return per_point * len(cfg["tokens"]) + (0 if shared_gpu else 1)


def _record(op, dtype, sms, tokens, nbytes, samples, **extra):
    t = timing.median(samples)
    return dict(op=op, dtype=dtype, num_sms=sms, tokens=tokens, bytes=nbytes, time_us=t,
                gbps=nbytes / t / 1e3, samples=samples, **extra)


def worker(rank, world, cfg):
    os.environ.setdefault("EPGEN_TIMEOUT_S", "60")
    import torch
    import torch.distributed as dist
    import epgen
    from epgen import launch
    from epgen import formats
    from epgen import reference as ref
    H, K, E, runs = cfg["hidden"], cfg["topk"], cfg["experts"], cfg["runs"]
    fmt = formats.get(cfg.get("wire_format", "fp8_e4m3_f32_128"))
    shared = launch.worker_shares_gpu()
    progress = Progress(steps(cfg, shared)) if rank == 0 else None

    def tick(label):
        if progress:
            progress.step(f"normal {label}")
    share = min(torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count,
                128) // 2 * 2              # ranks sharing a GPU under MPS get fewer SMs
    sms24, sms16 = min(24, share), min(16, share)
    cfg24 = epgen.Config(sms24, 8, 256, 6, 128)
    cfg16 = epgen.Config(sms16, 8, 256, 6, 128)
    buf = epgen.Buffer(dist.group.WORLD, cfg24.get_nvl_buffer_size_hint(H * 2, world), 0)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    records = []
    try:
        for T in cfg["tokens"]:
            torch.manual_seed(1 + rank)
            x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
            x_q = ref.wire_cast(x, fmt.name)
            idx = torch.randn(T, E, device="cuda").topk(K, dim=-1).indices.to(torch.int64)
            w = torch.rand(T, K, device="cuda")
            per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
            recv, _, _, _, handle, _ = buf.dispatch(
                x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w, config=cfg24)
            torch.cuda.synchronize()
            bf16_bytes = recv.size(0) * formats.BF16.bytes_per_token(H)
            q_bytes = recv.size(0) * fmt.bytes_per_token(H)

            def add(op, dtype, sms, nbytes, fn, kernels=True):
                samples = timing.time_events(fn, runs, flush, cfg["warmup"])
                extra = {}
                if kernels:   # kernel time alone (host overhead excluded), and the launch gap
                    prof = timing.profile_runs(fn, runs, flush, warmup=0)
                    ks = [sum(r["durations"]) for r in prof]
                    extra = dict(kernel_us=timing.median(ks),
                                 kernel_gbps=nbytes / timing.median(ks) / 1e3, kernel_samples=ks,
                                 launch_gap_us=timing.median([r["launch_gap"] for r in prof]))
                extra["bytes_per_token"] = formats.get(dtype).bytes_per_token(H)
                records.append(_record(op, dtype, sms, T, nbytes, samples, **extra))
                tick(f"{op} {dtype} {sms} SMs, {T} tokens")

            add("normal_dispatch", "bf16", sms24, bf16_bytes,
                lambda: buf.dispatch(x, handle=handle, config=cfg24))
            add("normal_dispatch", fmt.name, sms24, q_bytes,
                lambda: buf.dispatch(x_q, handle=handle, config=cfg24, wire_format=fmt))
            add("normal_dispatch", "bf16", sms16, bf16_bytes,
                lambda: buf.dispatch(x, handle=handle, config=cfg16))
            add("normal_combine", "bf16", sms24, bf16_bytes,
                lambda: buf.combine(recv, handle, config=cfg24))
            if not shared:          # gloo has no fast all-to-all; ranks sharing a GPU, no NVLink
                # NCCL moving the same rows (already packed: no layout, no permutation)
                in_splits = [int(v) * H * 2 for v in per_rank.tolist()]
                rpm = handle[0].cpu()
                out_splits = [int(rpm[s, rank] - (rpm[s - 1, rank] if s else 0)) * H * 2
                              for s in range(world)]
                send = torch.empty(sum(in_splits), dtype=torch.uint8, device="cuda").random_()
                rcv = torch.empty(sum(out_splits), dtype=torch.uint8, device="cuda")
                add("nccl_a2a", "bf16", 0, bf16_bytes,
                    lambda: dist.all_to_all_single(rcv, send, out_splits, in_splits),
                    kernels=False)
            buf.check_errors()
        if not shared:
            cb = timing.copy_time(rank, world, flush)
            if cb is not None:
                records.append(_record("copy", "bf16", 0, 0, cb[1], [cb[0]]))
            tick("GPU-to-GPU copy")
        torch.cuda.synchronize()
        dist.barrier()
    finally:
        buf.destroy()
    return {"device": torch.cuda.get_device_name(), "records": records}
