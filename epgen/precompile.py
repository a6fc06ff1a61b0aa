"""A spec file's kernels -> parallel jit.build, with progress and a compiled / cached / failed
summary (the spec file itself: epgen/specfile.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

from . import env, jit
from .jit.specs import KernelSpec


@dataclass
class BuildOutcome:
    spec: KernelSpec
    status: str          # "compiled" | "cached" | "failed"
    seconds: float
    detail: str = ""     # failed: the error with the compiler's message
    log_path: str = ""   # failed compile: the whole log, kept in the cache's .failed/


FAILED_LOG_LINES = 12    # of the compiler's message, in the summary (the rest: log_path)


# A process makes its own prelude PCH (compiler.ensure_pch) at about the cost of one plain
# compile (~2.8 s here); each compile with it then takes ~0.4-0.8 s instead of ~2.7 s
# (bench/NOTES.md, "Precompiled header"): it pays from ~1.3 kernels per process on.
PCH_MIN_KERNELS = 1.5


def _build_one(spec: KernelSpec, arch: str, cache_root: str, pch: bool = True) -> BuildOutcome:
    from .cache import Cache
    stats: dict = {}
    t0 = time.perf_counter()
    try:
        jit.build(spec, arch, Cache(cache_root), stats, pch=pch)
    except Exception as e:   # reported per kernel; the summary counts it as failed
        from .cache.store import explain_os_error
        from .jit.compiler import CompileError
        if isinstance(e, CompileError):     # the log from its start: the first error first
            text = f"{e.stage} failed for {e.what}:\n{e.log}"
        else:
            text = explain_os_error(e) if isinstance(e, OSError) else str(e)
        return BuildOutcome(spec, "failed", time.perf_counter() - t0, f"{type(e).__name__}: {text}",
                            getattr(e, "log_path", None) or "")
    return BuildOutcome(spec, "cached" if stats.get("cached") else "compiled",
                        stats.get("seconds", time.perf_counter() - t0))


def failure_lines(o: BuildOutcome) -> list[str]:
    """What a failed kernel's summary shows: the error's first lines, where the rest is."""
    lines = [ln for ln in o.detail.splitlines() if ln.strip()]
    shown = lines[:FAILED_LOG_LINES]
    if len(lines) > len(shown):
        shown.append(f"... ({len(lines) - len(shown)} more lines)")
    if o.log_path:
        shown.append(f"whole log: {o.log_path}")
    return shown


def precompile(specs: list[KernelSpec], arch: str, cache_root: str, jobs: int,
               progress=None) -> list[BuildOutcome]:
    """Build every spec (in `jobs` processes); one progress line per kernel, then a summary.
    Ctrl-C stops at once (workers killed) and returns the outcomes so far, after the summary."""
    from .workers import WorkerDied, run
    progress = progress or sys.stderr
    outcomes: list[BuildOutcome] = []
    total = len(specs)
    start = time.perf_counter()

    def report(o: BuildOutcome) -> None:
        outcomes.append(o)
        done = len(outcomes)
        bar = "#" * int(20 * done / max(total, 1))
        print(f"\r[{bar:<20}] {done}/{total} {o.status:<8} {o.seconds:6.2f}s {o.spec.name}",
              file=progress, flush=True)
        for line in failure_lines(o) if o.status == "failed" else ():
            print(f"    {line}", file=progress)

    def on_result(i: int, value) -> None:
        if isinstance(value, WorkerDied):
            value = BuildOutcome(specs[i], "failed", 0.0,
                                 f"{value} while building {specs[i].describe()}")
        report(value)

    interrupted = False
    pch = total / max(1, min(jobs, total)) >= PCH_MIN_KERNELS
    try:
        if total <= 1:
            for s in specs:
                report(_build_one(s, arch, cache_root, pch))
        else:
            # Processes (even for one job), not threads: Python-side hashing and file I/O would
            # serialise, a crashing (or OOM-killed) compile takes only its own kernel down, and
            # Ctrl-C kills a compile at once instead of waiting for NVRTC to return.
            run(_build_one, [(s, arch, cache_root, pch) for s in specs], jobs, on_result)
    except KeyboardInterrupt:
        interrupted = True
    elapsed = time.perf_counter() - start
    counts = {k: sum(o.status == k for o in outcomes) for k in ("compiled", "cached", "failed")}
    compiled = [o.seconds for o in outcomes if o.status == "compiled"]
    mean = f", {sum(compiled) / len(compiled):.2f}s per compiled kernel" if compiled else ""
    stopped = f" (interrupted: {total - len(outcomes)} not built)" if interrupted else ""
    print(f"epgen precompile: {counts['compiled']} compiled, {counts['cached']} cached, "
          f"{counts['failed']} failed in {elapsed:.1f}s ({jobs} jobs{mean}){stopped} -> "
          f"{cache_root}", file=progress)
    for o in outcomes:
        if o.status == "failed":
            lines = failure_lines(o) or [""]
            first = next((ln for ln in lines[1:] if "error" in ln), lines[0])
            print(f"  failed: {o.spec.name}: {first.strip()}", file=progress)
    if not interrupted:
        print(f"epgen precompile: host fast lane: {_build_fast_lane(cache_root)}", file=progress)
    return outcomes


def _build_fast_lane(cache_root: str) -> str:
    """The fast lane's C++ module (runtime/fastcall.py) built into the cache beside the kernels,
    so a deploy with EPGEN_JIT=0 finds it too. Its failure fails nothing: calls then take the
    Python path. EPGEN_FASTCALL=0: not built (a deploy that turned it off needs none)."""
    if not env.flag("EPGEN_FASTCALL", True):
        return "off (EPGEN_FASTCALL=0), calls take the Python path"
    try:
        from .runtime import fastcall
        return os.path.basename(fastcall.build(cache_root))
    except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as e:
        return f"not built, calls take the Python path ({e})"


def default_jobs() -> int:
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else (os.cpu_count() or 1), 16))
