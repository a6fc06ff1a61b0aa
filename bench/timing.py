"""Shared measurement helpers for the benchmarks (../shared/docs/targets.md, Method).

Two clocks, both after warm-up, with L2 flushed and ranks aligned by a barrier before each run:
- `time_events`: CUDA events around the whole Python call (host overhead included), the way
  DeepEP's `bench()` times its normal mode;
- `time_kernels`: the profiler's kernel durations of epgen's work kernels in each call (names
  containing `epgen::dispatch` / `epgen::combine`, design.md), the way DeepEP's `bench_kineto`
  times its low-latency mode. A call of several launches (send + receive phase) sums them.
"""
from __future__ import annotations

import statistics


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


def _prepare(flush):
    import torch
    import torch.distributed as dist
    flush.zero_()                              # evict L2: a 256 MB write
    torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()


def time_events(fn, runs: int, flush, warmup: int = 5) -> list[float]:
    """Per-run microseconds between events recorded around fn(). The start event follows a
    one-element all_reduce on the stream, so both ranks' clocks start when their GPUs leave
    the same collective (a host barrier alone leaves tens to hundreds of microseconds of skew,
    which a kernel that waits for its peer would count)."""
    import torch
    import torch.distributed as dist
    for _ in range(warmup):
        fn()
    align = torch.ones(1, device="cuda")
    samples = []
    for _ in range(runs):
        _prepare(flush)
        if dist.is_initialized():
            dist.all_reduce(align)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    return samples


def kernel_durations(fn, runs: int, flush, names=("epgen::dispatch", "epgen::combine"),
                     warmup: int = 5) -> list[list[float]]:
    """Per run, the device durations (us) of the matching kernels fn() launched, in order."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            _prepare(flush)
            fn()
        torch.cuda.synchronize()
    kernels = sorted(((e.time_range.start, e.time_range.elapsed_us()) for e in prof.events()
                      if any(n in e.name for n in names) and e.time_range.elapsed_us() > 0),
                     key=lambda k: k[0])
    if not kernels or len(kernels) % runs:
        raise RuntimeError(f"profiler saw {len(kernels)} matching kernels for {runs} runs "
                           f"(names {names})")
    per_run = len(kernels) // runs
    return [[d for _, d in kernels[i * per_run:(i + 1) * per_run]] for i in range(runs)]


def time_kernels(fn, runs: int, flush, names=("epgen::dispatch", "epgen::combine"),
                 warmup: int = 5) -> list[float]:
    """Per-run microseconds of the matching kernels' device durations, summed per call."""
    return [sum(d) for d in kernel_durations(fn, runs, flush, names, warmup)]


def median(samples: list[float]) -> float:
    return statistics.median(samples)
