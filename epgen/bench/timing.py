"""Measurement helpers of `epgen bench` (bench/NOTES.md, Method).

Two clocks, both after warm-up, with L2 flushed and ranks aligned on the GPU before each run:
- `time_events`: CUDA events around the whole Python call (host overhead included), the way
  DeepEP's `bench()` times its normal mode;
- `time_kernels`: the profiler's kernel durations of epgen's work kernels in each call (names
  in WORK_KERNELS), the way DeepEP's `bench_kineto`
  times its low-latency mode. A call of several launches (send + receive phase) sums them.
"""
from __future__ import annotations

import statistics

# The work kernels' qualified-name prefixes (specs.KernelSpec.entry): normal, then low latency.
WORK_KERNELS = ("epgen::dispatch_", "epgen::combine_", "epgen::ll_dispatch_", "epgen::ll_combine_")


def card(device_name: str) -> str:
    return "H200" if "H200" in device_name else "H100" if "H100" in device_name else device_name


def versions() -> dict:
    from importlib import metadata
    import torch
    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("nvidia-nvshmem-cu13", "nvidia-cuda-nvrtc", "nvidia-nvjitlink", "cuda-bindings"):
        try:
            out[pkg] = metadata.version(pkg)
        except Exception:  # noqa: BLE001 - a package missing from the report is not an error
            pass
    return out


HEADSTART_CYCLES = 1_000_000   # ~0.5 ms of GPU clock: longer than the host needs to launch fn


def _prepare(flush, align):
    """Evict L2, then line the ranks up on the GPU: host barrier, one-element all_reduce, a
    GPU-side sleep during which the host enqueues a second all_reduce and the timed call, then
    that second all_reduce, which every GPU leaves at the same moment with the timed kernels
    already queued behind it. So the ranks' first timed kernels start together and neither
    clock counts the host's launch latency (a host barrier alone leaves tens of microseconds
    to milliseconds of skew, which a kernel waiting for its peer would count; one all_reduce
    then a sleep is not enough either: the sleep counts clock cycles, and the GPUs' clocks
    differ). DeepEP's bench gets the same from its host running ahead during the L2 flush,
    and its bench_kineto aligns with an all_reduce (barrier_comm_profiling)."""
    import torch
    import torch.distributed as dist
    flush.zero_()                              # a 256 MB write
    torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()
        dist.all_reduce(align)
        torch.cuda._sleep(HEADSTART_CYCLES)
        dist.all_reduce(align)


def time_events(fn, runs: int, flush, warmup: int = 5) -> list[float]:
    """Per-run microseconds between events recorded around fn(), the start event right after
    the aligning collective."""
    import torch
    for _ in range(warmup):
        fn()
    align = torch.ones(1, device="cuda")
    samples = []
    for _ in range(runs):
        _prepare(flush, align)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    return samples


def profile_runs(fn, runs: int, flush, names=WORK_KERNELS,
                 warmup: int = 5) -> list[dict]:
    """Per run: `durations`, the device durations (us) of the matching kernels fn() launched,
    in order; `launch_gap`, the device time (us) from the end of the previous kernel (the
    aligning all_reduce) to the first of them: near 0 when the host kept ahead of the GPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    align = torch.ones(1, device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            _prepare(flush, align)
            fn()
        torch.cuda.synchronize()
    ours, others = [], []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        span = (e.time_range.start, e.time_range.end, e.time_range.elapsed_us())
        if any(n in e.name for n in names):
            if span[2] > 0:
                ours.append(span)
        else:
            others.append(span)
    ours.sort()
    if not ours or len(ours) % runs:
        raise RuntimeError(f"profiler saw {len(ours)} matching kernels for {runs} runs "
                           f"(names {names})")
    per_run = len(ours) // runs
    out = []
    for i in range(runs):
        mine = ours[i * per_run:(i + 1) * per_run]
        ends = [o[1] for o in others if o[1] <= mine[0][0]]
        gap = mine[0][0] - max(ends) if ends else float("nan")
        out.append({"durations": [d for _, _, d in mine], "launch_gap": gap})
    return out


def kernel_durations(fn, runs: int, flush, names=WORK_KERNELS,
                     warmup: int = 5) -> list[list[float]]:
    """Per run, the device durations (us) of the matching kernels fn() launched, in order."""
    return [r["durations"] for r in profile_runs(fn, runs, flush, names, warmup)]


def time_kernels(fn, runs: int, flush, names=WORK_KERNELS,
                 warmup: int = 5) -> list[float]:
    """Per-run microseconds of the matching kernels' device durations, summed per call."""
    return [sum(d) for d in kernel_durations(fn, runs, flush, names, warmup)]


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def copy_time(rank: int, world: int, flush, runs: int = 10):
    """A 1 GiB copy from this rank's GPU to the next rank's (the copy bound): (time us, bytes),
    or None where there is no second GPU to copy to."""
    import torch
    n_gpus = torch.cuda.device_count()
    if n_gpus < 2 or world < 2:
        return None
    dev = torch.device("cuda", torch.cuda.current_device())
    peer = torch.device("cuda", (dev.index + 1) % n_gpus)
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty(1 << 30, dtype=torch.uint8, device=peer)
    return median(time_events(lambda: b.copy_(a), runs, flush, warmup=2)), 1 << 30
