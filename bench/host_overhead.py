"""Where the host time of a cached normal dispatch / combine and of a low-latency dispatch /
combine (per_expert and per_rank, EPGEN_LL_COMBINE) goes (cProfile on rank 0). The CPU-only
counterpart with faked launches is bench/host_path_cpu.py.

    python bench/host_overhead.py --ranks 2
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _measure(cases, out):
    """Host time per call of each (name, fn) (100 calls after 10), then a cProfile of 100."""
    import cProfile
    import io
    import pstats
    import time

    import torch
    for name, fn in cases:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(100):
            fn()
        host = (time.perf_counter() - t0) / 100 * 1e6
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(100):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
        out.append(f"== {name}: {host:.1f} us host per call (100 calls, GPU-bound if larger)\n"
                   + s.getvalue()[-3500:])


def _worker(rank, world):
    import torch
    import torch.distributed as dist
    import epgen
    cfg = epgen.Config(24, 8, 256, 6, 128)
    buf = epgen.Buffer(dist.group.WORLD, cfg.get_nvl_buffer_size_hint(7168 * 2, world), 0)
    x = torch.randn(4096, 7168, device="cuda").to(torch.bfloat16)
    idx = torch.randn(4096, 256, device="cuda").topk(8, dim=-1).indices
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 256)
    recv, *_, handle, _ = buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                       num_tokens_per_expert=per_expert, topk_idx=idx,
                                       topk_weights=torch.rand(4096, 8, device="cuda"), config=cfg)
    out = []
    cases = (("cached dispatch", lambda: buf.dispatch(x, handle=handle, config=cfg)),
             ("combine", lambda: buf.combine(recv, handle, config=cfg)))
    _measure(cases, out)
    torch.cuda.synchronize()
    dist.barrier()
    buf.destroy()
    # Low latency at DeepEP's shape: 128 tokens, hidden 7168, top-8 of 288 experts, FP8.
    M, H, E = 128, 7168, 288
    buf = epgen.Buffer(dist.group.WORLD, 0,
                       epgen.Buffer.get_low_latency_rdma_size_hint(M, H, world, E),
                       low_latency_mode=True, num_qps_per_rank=E // world)
    x = torch.randn(M, H, device="cuda").to(torch.bfloat16)
    idx = torch.randn(M, E, device="cuda").topk(8, dim=-1).indices
    w = torch.rand(M, 8, device="cuda")
    _, _, ll_handle, _, _ = buf.low_latency_dispatch(x, idx, M, E)
    y = torch.zeros(E // world, world * M, H, dtype=torch.bfloat16, device="cuda")

    def combine(variant):
        os.environ["EPGEN_LL_COMBINE"] = variant      # read at each call, the same on every rank
        return lambda: buf.low_latency_combine(y, idx, w, ll_handle)
    _measure((("LL dispatch FP8", lambda: buf.low_latency_dispatch(x, idx, M, E)),), out)
    for variant in ("per_expert", "per_rank"):
        _measure(((f"LL combine {variant}", combine(variant)),), out)
    os.environ.pop("EPGEN_LL_COMBINE", None)
    dist.barrier()
    buf.destroy()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    from tests import gpu_harness
    res = gpu_harness.run_ranks(args.ranks, _worker, timeout_s=300)
    print("\n".join(res[0]))


if __name__ == "__main__":
    main()
