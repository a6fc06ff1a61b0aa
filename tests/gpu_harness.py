"""Start N ranks (one process per GPU), run one function on all of them, collect results.

GPU test modules start their ranks once (a module-scoped fixture) and run their whole case
list in one group of workers, so the suite fits one device call. Nothing hangs: the parent
waits at most `timeout_s`, then kills the workers and reports which ranks did not finish.
"""
from __future__ import annotations

import os
import queue
import socket
import traceback

import pytest

NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1",
                 "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def rank_counts() -> list[int]:
    """Rank counts to test: EPGEN_TEST_RANKS (e.g. "2,4"), default 2 and 4 and 8."""
    raw = os.environ.get("EPGEN_TEST_RANKS", "2,4,8")
    return [int(x) for x in raw.split(",") if x.strip()]


def require_gpus(n: int) -> None:
    have = gpu_count()
    if have < n:
        pytest.skip(f"needs {n} GPUs, {have} present")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, results):
    os.environ.update(NCCL_SAFE_ENV)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world)})
    import torch
    import torch.distributed as dist
    try:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world,
                                device_id=torch.device("cuda", rank))
        out = fn(rank, world, *args)
        results.put((rank, "ok", out))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_ranks(world: int, fn, *args, timeout_s: float = 280.0) -> list:
    """fn(rank, world, *args) on `world` ranks; returns the list of per-rank results.
    Raises AssertionError with every failing rank's traceback, or naming the ranks that hung."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    import time
    deadline = time.monotonic() + timeout_s
    got: dict[int, tuple] = {}
    while len(got) < world and time.monotonic() < deadline:
        try:
            rank, status, out = results.get(timeout=1.0)
            got[rank] = (status, out)
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
    for p in procs:
        p.join(timeout=max(0.0, min(20.0, deadline - time.monotonic())))
        if p.is_alive():
            p.kill()
    missing = [r for r in range(world) if r not in got]
    errors = [f"rank {r}:\n{out}" for r, (s, out) in sorted(got.items()) if s != "ok"]
    if missing:
        errors.append(f"ranks {missing} did not finish within {timeout_s:.0f}s "
                      "(killed; a hang or a crash)")
    if errors:
        raise AssertionError("\n".join(errors))
    return [got[r][1] for r in range(world)]
