"""Where the host time of a cached normal dispatch / LL dispatch goes (cProfile on rank 0).

    python bench/host_overhead.py --ranks 2
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _worker(rank, world):
    import cProfile
    import io
    import pstats
    import time

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
    for name, fn in (("cached dispatch", lambda: buf.dispatch(x, handle=handle, config=cfg)),
                     ("combine", lambda: buf.combine(recv, handle, config=cfg))):
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
