"""Low-latency dispatch / combine benchmark (DeepEP's LL shape), per bench/NOTES.md "Method".

python bench/bench_low_latency.py --ranks 2 --commit SHA --out DIR
Times (bench/timing.py): epgen's kernel time from the profiler (DeepEP's bench_kineto method;
host-inclusive event times are kept beside it), median of --runs after warm-up, L2 flushed and
ranks aligned on the GPU before each run: dispatch (FP8), combine (BF16), both back to back,
and the hooked send / recv halves; plus NCCL all_to_all_single on the same bytes (events) and a
GPU->GPU copy, in the same run.
Writes DIR/low_latency.json (the record schema of bench/results/) and prints a short table last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timing  # noqa: E402


def _time_split(call_with_hook, runs, flush):
    """Hooked calls: the send launch and the hook's receive launch, timed apart (profiler);
    the data lands (sync + barrier) between the two, as a decode step would overlap it."""
    import torch
    import torch.distributed as dist

    def run():
        hook = call_with_hook()
        torch.cuda.synchronize()
        dist.barrier()
        hook()
    per_run = timing.kernel_durations(run, runs, flush)
    return [d[0] for d in per_run], [d[1] for d in per_run]


def _worker(rank, world, cfg):
    os.environ.setdefault("EPGEN_TIMEOUT_S", "30")
    import torch
    import torch.distributed as dist
    import epgen
    T, H, K, E, runs = cfg["tokens"], cfg["hidden"], cfg["topk"], cfg["experts"], cfg["runs"]
    M = T
    dev = torch.device("cuda", rank)
    torch.manual_seed(1234 + rank)
    nbytes = epgen.Buffer.get_low_latency_rdma_size_hint(M, H, world, E)
    buf = epgen.Buffer(dist.group.WORLD, 0, nbytes, low_latency_mode=True,
                       num_qps_per_rank=E // world)
    x = torch.randn(T, H, device=dev).to(torch.bfloat16)
    scores = torch.randn(T, E, device=dev).abs() + 1
    idx = scores.topk(K, dim=-1).indices.to(torch.int64)
    idx[torch.randint(0, T, (10,), device=dev), torch.randint(0, K, (10,), device=dev)] = -1
    w = torch.rand(T, K, device=dev)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    valid = int((idx != -1).sum())
    fp8_bytes = valid * (H + H // 128 * 4 + 16)
    bf16_bytes = valid * 2 * H

    (rx, rs), cnt, handle, _, _ = buf.low_latency_dispatch(x, idx, M, E, use_fp8=True)
    y = torch.randn(E // world, world * M, H, device=dev).to(torch.bfloat16)
    buf.low_latency_combine(y, idx, w, handle)
    torch.cuda.synchronize()
    buf.check_errors()

    def disp():
        return buf.low_latency_dispatch(x, idx, M, E, use_fp8=True)

    def comb():
        return buf.low_latency_combine(y, idx, w, handle)

    def both():
        r = disp()
        buf.low_latency_combine(y, idx, w, r[2])

    res, host = {}, {}
    for name, dtype, fn, nb in (("ll_dispatch", "fp8", disp, fp8_bytes),
                                ("ll_combine", "bf16", comb, bf16_bytes),
                                ("ll_dispatch_combine", "fp8", both, fp8_bytes + bf16_bytes)):
        res[name] = (dtype, timing.time_kernels(fn, runs, flush), nb)
        host[name] = timing.time_events(fn, runs, flush)
    ds, dr = _time_split(lambda: buf.low_latency_dispatch(x, idx, M, E, use_fp8=True,
                                                          return_recv_hook=True)[4],
                         runs, flush)
    res["ll_dispatch_send"], res["ll_dispatch_recv"] = ("fp8", ds, fp8_bytes), ("fp8", dr, fp8_bytes)
    cs, cr = _time_split(lambda: buf.low_latency_combine(y, idx, w, handle, return_recv_hook=True)[2],
                         runs, flush)
    res["ll_combine_send"], res["ll_combine_recv"] = ("bf16", cs, bf16_bytes), ("bf16", cr, bf16_bytes)
    buf.check_errors()

    # NCCL on the same bytes (already packed: no layout, no permutation).
    for name, nb in (("nccl_a2a", fp8_bytes), ("nccl_a2a", bf16_bytes)):
        n = (nb + world - 1) // world * world
        src, dst = torch.empty(n, dtype=torch.uint8, device=dev), torch.empty(n, dtype=torch.uint8, device=dev)
        res[f"{name}_{'fp8' if nb == fp8_bytes else 'bf16'}"] = (
            "fp8" if nb == fp8_bytes else "bf16",
            timing.time_events(lambda: dist.all_to_all_single(dst, src), runs, flush), nb)
    # GPU -> GPU copy bandwidth (1 GiB to the next rank's GPU), rank-local measurement.
    peer = torch.device("cuda", (rank + 1) % world)
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty(1 << 30, dtype=torch.uint8, device=peer)
    res["copy"] = ("bf16", timing.time_events(lambda: b.copy_(a), max(10, runs // 5), flush,
                                              warmup=2), 1 << 30)
    del a, b
    torch.cuda.synchronize()
    dist.barrier()
    buf.destroy()
    return {"device": torch.cuda.get_device_name(dev), "num_sms": buf._ll.sms if hasattr(buf, "_ll") and buf._ll else None,
            "results": {k: (d, s, nb) for k, (d, s, nb) in res.items()}, "host_inclusive": host}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", default="bench/results/run")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=288)
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    from tests import gpu_harness
    cfg = dict(tokens=args.tokens, hidden=args.hidden, topk=args.topk, experts=args.experts,
               runs=max(50, args.runs))
    per_rank = gpu_harness.run_ranks(args.ranks, _worker, cfg, timeout_s=560)
    card = timing.card(per_rank[0]["device"])
    versions = timing.versions()
    records = []
    for op in per_rank[0]["results"]:
        dtype, samples, nb = per_rank[0]["results"][op]
        meds = [statistics.median(r["results"][op][1]) for r in per_rank]
        t = statistics.median(samples)
        records.append(dict(
            op=op.split("_fp8")[0].split("_bf16")[0] if op.startswith("nccl") else op,
            dtype=dtype, card=card, device=per_rank[0]["device"], num_ranks=args.ranks,
            tokens=args.tokens, hidden=args.hidden, topk=args.topk, num_experts=args.experts,
            num_sms=per_rank[0]["num_sms"], time_us=round(t, 3),
            gbps=round(nb / (t * 1e-6) / 1e9, 2), bytes=nb,
            per_rank_median_us=[round(m, 3) for m in meds],
            mean_of_rank_medians_us=round(statistics.mean(meds), 3),
            samples=[round(s, 3) for s in samples], commit=args.commit, versions=versions,
            **({"host_inclusive_us": round(statistics.median(per_rank[0]["host_inclusive"][op]), 3)}
               if op in per_rank[0]["host_inclusive"] else {})))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "low_latency.json")
    with open(path, "w") as f:
        json.dump({"records": records}, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.barh([f"{r['op']} {r['dtype']}" for r in records], [r["time_us"] for r in records])
        ax.set_xlabel(f"median us ({card}, EP{args.ranks})")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "low_latency.png"))
    except Exception as exc:  # noqa: BLE001
        print(f"(no plot: {exc})")
    by = {(r["op"], r["dtype"]): r for r in records}
    print(f"\nwrote {path}")
    print(f"{'op':22s} {'dtype':5s} {'us':>9s} {'GB/s':>8s}   ranks' medians   ({card}, EP{args.ranks}, "
          f"{args.tokens} tok, H={args.hidden}, top-{args.topk}/{args.experts}, {per_rank[0]['num_sms']} SMs)")
    for r in records:
        print(f"{r['op']:22s} {r['dtype']:5s} {r['time_us']:9.2f} {r['gbps']:8.1f}   {r['per_rank_median_us']}")
    for op, dt in (("ll_dispatch", "fp8"), ("ll_combine", "bf16")):
        e, n, c = by[(op, dt)], by.get(("nccl_a2a", dt)), by.get(("copy", "bf16"))
        if n and c:
            print(f"{op}: epgen/NCCL time ratio {e['time_us'] / n['time_us']:.2f}, "
                  f"epgen/copy GB/s ratio {e['gbps'] / c['gbps']:.2f}")


if __name__ == "__main__":
    main()
