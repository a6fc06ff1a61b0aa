"""Low-latency footprint (issue 15, item 3): the GPU memory a Buffer takes at DeepEP's shape,
created with get_low_latency_rdma_size_hint, after its first FP8 dispatch + BF16 combine.

python bench/ll_footprint.py --ranks 2 [--out F] [--commit SHA]

Per rank, from a process that has only touched CUDA: the hint (the symmetric region, from
NVSHMEM's heap), the device memory in use (torch.cuda.mem_get_info: this process's CUDA
context, NVSHMEM's heap and torch's pool; on a shared GPU the other ranks' too, so read the
per-rank deltas, which are this rank's own), torch's allocated bytes (the call's outputs: recv_x,
scales, the handle, the combined tokens), and the deltas after creating the Buffer and after
the pair. The outputs are checked against epgen.reference first (after the error word), so a
footprint is only reported for calls that worked. Prints a JSON record (shared_gpu marked).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

M, H, K, E = 128, 7168, 8, 288        # DeepEP's low-latency test shape (tests/test_low_latency.py)


def _sample():
    import torch
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return dict(device_used_mb=(total - free) / 2**20,
                torch_allocated_mb=torch.cuda.memory_allocated() / 2**20,
                torch_reserved_mb=torch.cuda.memory_reserved() / 2**20)


def footprint(rank, world):
    import torch
    import torch.distributed as dist
    import epgen
    from tests import test_low_latency_gpu as llt
    torch.ones(1, device="cuda")
    before = _sample()
    hint = epgen.Buffer.get_low_latency_rdma_size_hint(M, H, world, E)
    buf = epgen.Buffer(dist.group.WORLD, 0, hint, low_latency_mode=True)
    created = _sample()
    ins = llt._all_inputs(15, world, [M] * world, H, K, E)
    _, idx, w = ins[rank]
    recv, _, handle = llt._checked_dispatch(buf, rank, ins, E, fp8=True)
    y = llt._expert_out(recv, True, H)
    out, _, _ = buf.low_latency_combine(y, idx, w, handle)
    torch.cuda.synchronize()
    buf.check_errors()
    llt._check_combine(rank, ins, y, handle, out)
    after = _sample()
    dist.barrier()
    buf.destroy()
    delta = {k: round(after[k] - before[k], 1) for k in before}
    return dict(rank=rank, hint_mb=round(hint / 2**20, 1), before=before, after_create=created,
                after_pair=after, delta_after_pair=delta,
                buffer_create_device_mb=round(created["device_used_mb"]
                                              - before["device_used_mb"], 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default="")
    args = ap.parse_args()
    from epgen import launch
    from tests import gpu_harness
    where = launch.plan(args.ranks).record()
    per_rank = gpu_harness.run_ranks(args.ranks, footprint, timeout_s=300)
    out = dict(commit=args.commit, ranks=args.ranks, **where,
               shape=dict(max_tokens=M, hidden=H, topk=K, experts=E), per_rank=per_rank)
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
