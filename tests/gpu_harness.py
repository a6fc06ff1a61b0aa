"""The GPU suites' view of epgen.launch: rank counts, tiers, placement, skips.

GPU test modules start their ranks once per rank count (a module-scoped fixture) and run their
whole case list in one group of workers. Ranks run one per GPU when there are enough GPUs,
otherwise several share a GPU (epgen.launch: MPS, else time-sliced); the placement is printed
with the results. Nothing is skipped for lack of GPUs as long as one is present.

EPGEN_TEST_RANKS: rank counts ("2,4,8" by default). EPGEN_TEST_TIER: "full" (default) or
"quick" (a few cases per suite, for a check within one device call). EPGEN_TEST_POOL=1: the
runs share rank processes while the rank count stays (launch.RankPool; tests/gpu_suites.py
--pool), so a pytest of several modules pays the ranks' start once per count.
"""
from __future__ import annotations

import atexit
import os
import subprocess

import pytest

from epgen import launch

if __name__ != "tests.gpu_harness":
    # Imported as plain `gpu_harness` (tests/ is on sys.path for other helpers) it would be a
    # second module with its own RankPool: two sets of rank processes and MPS daemons at once.
    raise ImportError("import the harness as `from tests import gpu_harness`")

NCCL_SAFE_ENV = launch.SAFE_ENV
gpu_count = launch.gpu_count


def rank_counts() -> list[int]:
    """Rank counts to test: EPGEN_TEST_RANKS (e.g. "2,4"), default 2 and 4 and 8."""
    raw = os.environ.get("EPGEN_TEST_RANKS", "2,4,8")
    try:
        counts = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"EPGEN_TEST_RANKS={raw!r}: must be comma-separated ints") from None
    if not counts or any(n < 1 for n in counts):
        raise ValueError(f"EPGEN_TEST_RANKS={raw!r}: must name rank counts >= 1")
    return counts


def tier() -> str:
    raw = os.environ.get("EPGEN_TEST_TIER", "full")
    if raw not in ("quick", "full"):
        raise ValueError(f"EPGEN_TEST_TIER={raw!r}: must be 'quick' or 'full'")
    return raw


def select(cases: list, quick: list[int], rotating: list[int] = (), world: int = 0) -> list:
    """The full case list, or in the quick tier the cases at the indices `quick`, plus this
    rank count's share of those at `rotating` (as select_rotating: for a few cases whose time
    grows with the rank count), in list order."""
    if tier() == "full":
        return cases
    # indices as Python's (-1: the last case; one out of range raises, as cases[i] would)
    positions = range(len(cases))
    keep = {positions[i] for i in [*quick, *_rotating_share(list(rotating), world)]}
    return [c for i, c in enumerate(cases) if i in keep]


def _rotating_share(quick: list[int], world: int) -> list[int]:
    counts = rank_counts()
    i, n = (counts.index(world), len(counts)) if world in counts else (0, 1)
    return quick[i::n]


def select_rotating(cases: list, quick: list[int], world: int) -> list:
    """The full case list, or in the quick tier this rank count's share of the quick cases: the
    i-th of n counts (EPGEN_TEST_RANKS) takes every n-th from the i-th, so that the counts
    together run each quick case once (for suites whose every case is slow by nature, such as
    a deadline that must fire)."""
    if tier() == "full":
        return cases
    return [cases[j] for j in _rotating_share(quick, world)]


def require_gpus(n: int) -> None:
    """Skip when no GPU is present; ranks beyond the GPUs present share them."""
    if gpu_count() < 1:
        pytest.skip(f"needs a GPU for {n} ranks (none present)")


POOL_ENV = "EPGEN_TEST_POOL"      # "1": the suites' runs share rank processes (launch.RankPool)
_pool: "launch.RankPool | None" = None


def run_ranks(world: int, fn, *args, timeout_s: float = 280.0, fresh: bool = False) -> list:
    """fn on `world` ranks: fresh processes for each run, or with EPGEN_TEST_POOL=1 one
    RankPool's, kept while the rank count stays (tests/gpu_suites.py --pool); either way the
    placement and where the time went are printed. `fresh`: always new processes, for a test
    of what a process starts with (who initialises NVSHMEM, an empty kernel cache)."""
    global _pool
    placement = launch.plan(world)
    print(f"[placement] {placement.describe()}")
    phases: dict = {}
    try:
        if fresh or os.environ.get(POOL_ENV, "0") != "1":
            return launch.run_ranks(world, fn, *args, timeout_s=timeout_s, placement=placement,
                                    phases=phases)
        if _pool is not None and _pool.world != world:
            _pool.close(phases)
            _pool = None
        if _pool is None:
            heap = os.environ.get("NVSHMEM_SYMMETRIC_SIZE") or str(pool_heap_bytes(placement))
            _pool = launch.RankPool(world, placement, env={"NVSHMEM_SYMMETRIC_SIZE": heap})
            atexit.register(_pool.close)
        return _pool.run(fn, *args, timeout_s=timeout_s, phases=phases)
    finally:
        print(f"[phases] {world} ranks: {launch.describe_phases(phases)}")


def pool_heap_bytes(placement, gpu_mib: int | None = None) -> int:
    """NVSHMEM's heap for pooled ranks, fixed at their first Buffer (a later, larger Buffer of
    another module cannot grow it): 40 % of the GPU's memory over the ranks sharing it, at most
    16 GiB, in NVSHMEM's 512 MiB granules (total memory from nvidia-smi: the parent never
    makes a CUDA context; 80 GiB where it cannot say)."""
    if gpu_mib is None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total",
                                  "--format=csv,noheader,nounits"], capture_output=True,
                                 text=True, timeout=30)
            gpu_mib = int(out.stdout.split()[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            gpu_mib = 80 << 10
    share = int(0.4 * (gpu_mib << 20)) // placement.ranks_per_gpu
    return max(1 << 30, min(16 << 30, share) // (512 << 20) * (512 << 20))


def usable_sms(requested: int) -> tuple[int, str]:
    """In a worker: `requested` channels, or this rank's even share of the SMs when it has
    fewer (ranks sharing a GPU under MPS), with a note saying so."""
    import torch
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    share = min(sms, 128) // 2 * 2
    if requested <= share:
        return requested, ""
    return share, f" (asked {requested} SMs, ran with the rank's share {share})"


def deadline_s(seconds: float = 20.0) -> str:
    """EPGEN_TIMEOUT_S for a worker: scaled where the GPU time-slices between ranks."""
    return str(launch.scaled_deadline(seconds))


def cached_runs(worker, timeout_s: float):
    """For a module-scoped fixture: get(n) runs `worker` on n ranks once per rank count and
    returns its per-rank results (the module's tests share one run per count)."""
    cache: dict[int, list] = {}

    def get(n: int) -> list:
        if n not in cache:
            require_gpus(n)
            cache[n] = run_ranks(n, worker, timeout_s=timeout_s)
        return cache[n]
    return get


def failures(per_rank) -> list[str]:
    """Every job's (name, status) printed (pytest -rA shows it); the failures returned."""
    for r, res in enumerate(per_rank):
        for name, status in res:
            print(f"rank {r}: {name}: {status.splitlines()[0] if status else status}")
    return [f"rank {r}: {name}: {status}" for r, res in enumerate(per_rank)
            for name, status in res if status != "ok"]
