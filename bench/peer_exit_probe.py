"""Probe (issue 9 item 3): does a peer process that exits make a live rank fault?

    python bench/peer_exit_probe.py mps time-sliced

Two ranks share one GPU (the mode per argument). Both run a normal-mode dispatch; then rank 1
exits (os._exit) and rank 0, 3 s later, runs a cached dispatch that writes into rank 1's rings
and waits for it. Expected: rank 0 gets the deadline error (EPGEN_TIMEOUT_S=5) naming peer 1 and
its CUDA context stays usable. The run itself reports rank 1 missing (it exited on purpose).
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from epgen import launch  # noqa: E402


def worker(rank, world, mode):
    os.environ["EPGEN_TIMEOUT_S"] = "5"
    import torch
    import torch.distributed as dist
    import epgen
    cfg = epgen.Config(8, 8, 256, 6, 128)
    buf = epgen.Buffer(dist.group.WORLD, cfg.get_nvl_buffer_size_hint(4096 * 2, world), 0)
    x = torch.randn(256, 4096, device="cuda").to(torch.bfloat16)
    idx = torch.randn(256, 8 * world, device="cuda").topk(4, dim=-1).indices
    w = torch.rand(256, 4, device="cuda")
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 8 * world)
    handle = buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                          num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w,
                          config=cfg)[4]
    buf.dispatch(x, handle=handle, config=cfg)
    buf.check_errors()
    dist.barrier()
    if rank == world - 1:
        print(f"[{mode}] rank {rank} exits now", flush=True)
        os._exit(0)
    time.sleep(3)
    out = []
    try:
        buf.dispatch(x, handle=handle, config=cfg)
        torch.cuda.synchronize()
        buf.check_errors()
        out.append("no error")
    except Exception as exc:  # noqa: BLE001 - the outcome is the report
        out.append(f"{type(exc).__name__}: {str(exc)[:160]}")
        try:
            torch.cuda.synchronize()
            torch.ones(1, device="cuda").add_(1).item()
            out.append("context ok")
        except Exception as exc2:  # noqa: BLE001
            out.append(f"context broken: {type(exc2).__name__}: {str(exc2)[:120]}")
    print(f"[{mode}] rank {rank}: {out}", flush=True)
    return out


if __name__ == "__main__":
    for mode in sys.argv[1:] or ["mps", "time-sliced"]:
        try:
            launch.run_ranks(2, worker, mode, timeout_s=60, placement=launch.Placement(2, 1, mode))
        except AssertionError as exc:
            print(mode, "run ended:", str(exc).splitlines()[-1][:300])
