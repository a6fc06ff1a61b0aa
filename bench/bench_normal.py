"""Normal-mode intranode dispatch / combine benchmark (DeepEP's normal shape), per bench/NOTES.md "Method".

    python bench/bench_normal.py --ranks 2 --commit SHA --out DIR

Cached path (handle) timed with CUDA events, warm-up, median of >= 50 runs, L2 flushed between
runs, ranks aligned on the GPU (bench/timing.py) before each timed run. Same run: NCCL
all_to_all_single on the same bytes and a 1 GiB GPU0 -> GPU1 copy. Writes DIR/normal.json; prints a short table last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timing  # noqa: E402

TOKENS, HIDDEN, TOPK, EXPERTS = 4096, 7168, 8, 256
WARMUP, RUNS = 5, 60


def _copy_bw(torch):
    if torch.cuda.device_count() < 2:
        return None
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(n, dtype=torch.uint8, device="cuda:1")
    times = []
    for i in range(8):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src, non_blocking=True)
        e.record()
        torch.cuda.synchronize("cuda:0")
        torch.cuda.synchronize("cuda:1")
        if i >= 2:
            times.append(s.elapsed_time(e) * 1e3)
    t = timing.median(times)
    return t, n / t / 1e3


def _worker(rank, world, commit):
    os.environ.setdefault("EPGEN_TIMEOUT_S", "60")
    import torch
    import torch.distributed as dist
    import epgen
    from epgen import reference as ref

    torch.manual_seed(1 + rank)
    cfg24 = epgen.Config(24, 8, 256, 6, 128)
    cfg16 = epgen.Config(16, 8, 256, 6, 128)
    nbytes = cfg24.get_nvl_buffer_size_hint(HIDDEN * 2, world)
    buf = epgen.Buffer(dist.group.WORLD, nbytes, 0)
    x = torch.randn(TOKENS, HIDDEN, device="cuda").to(torch.bfloat16)
    x_fp8 = ref.per_token_cast_to_fp8(x)
    scores = torch.randn(TOKENS, EXPERTS, device="cuda")
    idx = scores.topk(TOPK, dim=-1).indices.to(torch.int64)
    w = torch.rand(TOKENS, TOPK, device="cuda")
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, EXPERTS)
    recv, _, recv_w, _, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w, config=cfg24)
    torch.cuda.synchronize()
    n_recv = recv.size(0)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    bf16_bytes = n_recv * HIDDEN * 2
    fp8_bytes = bf16_bytes * (1 + 4 / 128) / 2
    common = dict(card=timing.card(torch.cuda.get_device_name()), num_ranks=world, tokens=TOKENS,
                  hidden=HIDDEN, topk=TOPK, num_experts=EXPERTS, commit=commit,
                  versions=timing.versions(),
                  device=torch.cuda.get_device_name())
    records = []

    def add(op, dtype, sms, nbytes_, fn, kernels=True):
        samples = timing.time_events(fn, RUNS, flush, WARMUP)
        t = timing.median(samples)
        rec = dict(op=op, dtype=dtype, num_sms=sms, time_us=t, gbps=nbytes_ / t / 1e3,
                   samples=samples, **common)
        if kernels:   # kernel time alone (host overhead excluded), and the launch gap
            prof = timing.profile_runs(fn, RUNS, flush, warmup=0)
            ks = [sum(r["durations"]) for r in prof]
            rec.update(kernel_us=timing.median(ks), kernel_gbps=nbytes_ / timing.median(ks) / 1e3,
                       kernel_samples=ks,
                       launch_gap_us=timing.median([r["launch_gap"] for r in prof]))
        records.append(rec)

    add("normal_dispatch", "bf16", 24, bf16_bytes, lambda: buf.dispatch(x, handle=handle, config=cfg24))
    add("normal_dispatch", "fp8", 24, fp8_bytes, lambda: buf.dispatch(x_fp8, handle=handle, config=cfg24))
    add("normal_dispatch", "bf16", 16, bf16_bytes, lambda: buf.dispatch(x, handle=handle, config=cfg16))
    add("normal_combine", "bf16", 24, bf16_bytes, lambda: buf.combine(recv, handle, config=cfg24))

    # NCCL all_to_all_single moving the same rows (already packed: no layout, no permutation)
    in_splits = [int(v) * HIDDEN * 2 for v in per_rank.tolist()]
    rpm = handle[0].cpu()
    out_splits = [int(rpm[s, rank] - (rpm[s - 1, rank] if s else 0)) * HIDDEN * 2 for s in range(world)]
    send = torch.empty(sum(in_splits), dtype=torch.uint8, device="cuda").random_()
    rcv = torch.empty(sum(out_splits), dtype=torch.uint8, device="cuda")
    add("nccl_a2a", "bf16", 0, bf16_bytes,
        lambda: dist.all_to_all_single(rcv, send, out_splits, in_splits), kernels=False)
    buf.check_errors()
    torch.cuda.synchronize()
    dist.barrier()
    if rank == 0:
        cb = _copy_bw(torch)
        if cb is not None:
            records.append(dict(op="copy", dtype="bf16", num_sms=0, time_us=cb[0], gbps=cb[1],
                                samples=[], **common))
    dist.barrier()
    buf.destroy()
    return records


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    from tests import gpu_harness
    per_rank = gpu_harness.run_ranks(args.ranks, _worker, args.commit, timeout_s=560.0)
    os.makedirs(args.out, exist_ok=True)
    records = [dict(r, rank=i) for i, recs in enumerate(per_rank) for r in recs]
    with open(os.path.join(args.out, "normal.json"), "w") as f:
        json.dump({"records": records}, f, indent=1)
    for r in records:
        if "launch_gap_us" in r:
            print(f"rank {r['rank']} {r['op']} {r['dtype']} {r['num_sms']} SMs: events "
                  f"{r['time_us']:.1f} us, kernel {r['kernel_us']:.1f} us, launch gap "
                  f"{r['launch_gap_us']:.1f} us")
    r0 = [r for r in records if r["rank"] == 0]
    nccl = next((r for r in r0 if r["op"] == "nccl_a2a"), None)
    copy = next((r for r in r0 if r["op"] == "copy"), None)
    print(f"\ncard {r0[0]['card']}, {args.ranks} ranks, {TOKENS} tokens/rank, hidden {HIDDEN}, "
          f"top-{TOPK} of {EXPERTS}; rank 0 medians ({RUNS} runs)")
    print("time: CUDA events around the call (DeepEP's normal-mode method); kernel: profiler")
    print(f"{'op':<16}{'dtype':<6}{'SMs':>4}{'time us':>10}{'GB/s':>9}{'kernel us':>10}"
          f"{'GB/s':>9}{'/nccl':>7}{'/copy':>7}")
    for r in r0:
        rn = r["gbps"] / nccl["gbps"] if nccl else float("nan")
        rc = r["gbps"] / copy["gbps"] if copy else float("nan")
        print(f"{r['op']:<16}{r['dtype']:<6}{r['num_sms']:>4}{r['time_us']:>10.1f}{r['gbps']:>9.1f}"
              f"{r.get('kernel_us', float('nan')):>10.1f}{r.get('kernel_gbps', float('nan')):>9.1f}"
              f"{rn:>7.2f}{rc:>7.2f}")


if __name__ == "__main__":
    main()
