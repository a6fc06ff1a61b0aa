"""Low-latency dispatch / combine, measured on every rank (`epgen bench --mode low_latency`).

epgen's kernel time from the profiler (DeepEP's bench_kineto method; host-inclusive event times
kept beside it), median of the runs after warm-up, L2 flushed and ranks aligned on the GPU before
each (timing.py): dispatch (--wire-format, DeepEP's FP8 by default), combine (--combine-format,
BF16 by default), both back to back, and the hooked send / receive halves. Each record's `dtype`
names the format it moves and `bytes_per_token` its payload bytes per token (record_formats).
num_max_dispatch_tokens_per_rank is the largest token count of the run, so a sweep over tokens is the cost of one serving Buffer against its load. Same run, where every rank
has its own GPU: NCCL all_to_all_single on the same bytes and the GPU-to-GPU copy bound.
"""
from __future__ import annotations

import os

from . import timing
from .progress import Progress

OPS = ("ll_dispatch", "ll_combine", "ll_dispatch_combine")
HOOKED = ("ll_dispatch_send", "ll_dispatch_recv", "ll_combine_send", "ll_combine_recv")


def record_formats(dispatch: str, combine: str, hidden: int, combine_rows=None) -> dict:
    """op -> (dtype, bytes_per_token) of the records of a run: a dispatch op names its wire format
    (formats.get(dispatch).bytes_per_token: data + scales), a combine op its combine format
    (BF16 2H; fp8_e4m3_f32_128 H + 4 ceil(H/128); logfmt10 varies with the data: the mean message
    of reference.combine_wire_encode over combine_rows, the expert outputs the run sends, else the
    largest, every chunk as BF16), dispatch + combine "<dispatch>+<combine>" (just the dispatch's
    name with the BF16 combine, as before combine formats) and the sum."""
    from .. import formats
    from .. import reference as ref
    d = formats.get(dispatch).bytes_per_token(hidden)
    if combine == formats.LOGFMT10:
        c = ref.logfmt_message_bytes(hidden) if combine_rows is None else \
            float(ref.combine_wire_encode(combine_rows, combine)[1].double().mean())
    elif combine == formats.FP8_E4M3_F32_128.name:
        c = formats.FP8_E4M3_F32_128.bytes_per_token(hidden)
    else:
        c = formats.BF16.bytes_per_token(hidden)
    both = dispatch if combine == formats.BF16.name else f"{dispatch}+{combine}"
    out = {"ll_dispatch": (dispatch, d), "ll_combine": (combine, c),
           "ll_dispatch_combine": (both, d + c)}
    out.update({op: out[op.rsplit("_", 1)[0]] for op in HOOKED})
    return out


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
    cfmt = cfg.get("combine_format", formats.BF16.name)
    M = max(cfg["tokens"])
    shared = launch.worker_shares_gpu()
    progress = Progress(steps(cfg, shared)) if rank == 0 else None

    def tick(label):
        if progress:
            progress.step(f"low latency {label}")
    dev = torch.device("cuda", torch.cuda.current_device())
    rdma = epgen.Buffer.get_low_latency_rdma_size_hint(M, H, world, E, num_topk=K)
    buf = epgen.Buffer(dist.group.WORLD, 0, rdma, low_latency_mode=True,
                       num_qps_per_rank=E // world)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    # expert outputs below 1 in magnitude, so LogFMT-10 encodes (it sends BF16 chunks otherwise)
    y = (torch.randn(E // world, world * M, H, device=dev) * 0.1).to(torch.bfloat16)
    kinds = record_formats(fmt.name, cfmt, H, y.view(-1, H)[:1024])
    per_token = dict(kinds.values())    # dtype -> bytes (NCCL's records: the formats moved)
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
            c_bytes = int(valid * per_token[cfmt])
            _, _, handle, _, _ = buf.low_latency_dispatch(x, idx, M, E, wire_format=fmt)
            buf.low_latency_combine(y, idx, w, handle, wire_format=cfmt)
            torch.cuda.synchronize()
            buf.check_errors()

            def disp():
                return buf.low_latency_dispatch(x, idx, M, E, wire_format=fmt)

            def comb():
                return buf.low_latency_combine(y, idx, w, handle, wire_format=cfmt)

            def both():
                r = disp()
                buf.low_latency_combine(y, idx, w, r[2], wire_format=cfmt)

            for op, fn, nb in zip(OPS, (disp, comb, both), (q_bytes, c_bytes, q_bytes + c_bytes)):
                records.append(_record(op, kinds[op][0], T, nb,
                                       timing.time_kernels(fn, runs, flush, warmup=warm),
                                       host_inclusive_us=timing.median(
                                           timing.time_events(fn, runs, flush, warm))))
                tick(f"{op}, {T} tokens")
            ds, dr = _time_split(lambda: buf.low_latency_dispatch(
                x, idx, M, E, wire_format=fmt, return_recv_hook=True)[4], runs, flush, warm)
            records += [_record("ll_dispatch_send", kinds["ll_dispatch_send"][0], T, q_bytes, ds),
                        _record("ll_dispatch_recv", kinds["ll_dispatch_recv"][0], T, q_bytes, dr)]
            tick(f"hooked dispatch, {T} tokens")
            cs, cr = _time_split(lambda: buf.low_latency_combine(
                y, idx, w, handle, return_recv_hook=True, wire_format=cfmt)[2], runs, flush, warm)
            records += [_record("ll_combine_send", kinds["ll_combine_send"][0], T, c_bytes, cs),
                        _record("ll_combine_recv", kinds["ll_combine_recv"][0], T, c_bytes, cr)]
            tick(f"hooked combine, {T} tokens")
            buf.check_errors()
            if not shared:       # NCCL on the same bytes (already packed: no layout)
                for dtype, nb in dict(((fmt.name, q_bytes), (cfmt, c_bytes))).items():
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
            if r["op"] != "copy":
                r["bytes_per_token"] = per_token[r["dtype"]]
        torch.cuda.synchronize()
        dist.barrier()
    finally:
        buf.destroy()
    for r in records:
        r["num_sms"] = num_sms if r["op"].startswith("ll_") else 0
    return {"device": torch.cuda.get_device_name(dev), "records": records}
