"""Spec file -> the exact set of kernel specs those runs need -> parallel jit.build.

A spec file (YAML) lists models and/or explicit kernel configurations:

    arch: sm_90                      # optional; --arch and EPGEN_ARCH win over it
    models:
      - name: deepseek-v3
        hidden: 7168
        num_experts: 256
        num_topk: 8
        ep_sizes: [2, 4, 8]
        modes:
          normal: {dtypes: [bf16, fp8]}
          low_latency: {num_max_dispatch_tokens_per_rank: [128], dispatch_dtypes: [fp8, bf16]}
    kernels:                         # optional explicit specs

A dtype is "bf16", "fp8" (e4m3 with float32 per-128 scales) or a wire-format name (epgen.formats,
README "Wire formats"): normal mode any of them, "opaque<row bytes>[+<side bytes>]" included;
low latency the ones its dispatch sends (bf16, fp8_e4m3_f32_128, fp8_ue8m0_128, mxfp8, nvfp4).
      - {family: normal_combine, hidden: 2880, num_topk: 4, num_ranks: 4, num_biases: 1}
"""
from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass

import yaml

from . import formats, jit
from .specs import (FAMILIES, KernelSpec, LayoutSpec, LowLatencyBarrierSpec,
                    LowLatencyCombineRankSpec, LowLatencyCombineSpec, LowLatencyDispatchSpec,
                    NormalCombineSpec, SpecError, normal_dispatch_spec, normal_dispatch_wire,
                    spec_from_json)
from .variants import combine_variant

MAX_LL_TOKENS = 1024


class SpecFileError(ValueError):
    """A spec file that cannot be read: names the file, the key and what was expected."""


def _expect(cond: bool, path: str, where: str, expected: str, got=None) -> None:
    if not cond:
        got_txt = "" if got is None else f", got {got!r}"
        raise SpecFileError(f"{path}: {where}: expected {expected}{got_txt}")


def _check_keys(d: dict, allowed: set, path: str, where: str) -> None:
    unknown = sorted(set(d) - allowed)
    _expect(not unknown, path, where, f"only keys {sorted(allowed)}", f"unknown key(s) {unknown}")


def _int_list(v, path, where) -> list[int]:
    _expect(isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool)
                                              for x in v), path, where, "a non-empty list of ints", v)
    return v


def _format_of(dtype: str) -> formats.WireFormat:
    """"fp8" is DeepEP's FP8 (float32 per-128 scales); any other dtype a wire-format name."""
    return formats.get("fp8_e4m3_f32_128" if dtype == "fp8" else dtype)


def _dtype_list(v, path, where, low_latency=False) -> list[str]:
    allowed = ["fp8", *(formats.LOW_LATENCY if low_latency else formats.FORMATS),
               *([] if low_latency else ["opaque<row>[+<side>]"])]
    ok = isinstance(v, list) and bool(v)
    for x in v if ok else []:
        try:
            fmt = _format_of(x) if isinstance(x, str) else None
        except formats.FormatError:
            fmt = None
        ok = ok and fmt is not None and (not low_latency or fmt.name in formats.LOW_LATENCY)
    _expect(ok, path, where, f"a non-empty list of {allowed}", v)
    return v


# What each mode asks the JIT for at run time (the ops modules build the same specs).
def normal_mode_specs(hidden, num_experts, num_topk, num_ranks, dtypes) -> list[KernelSpec]:
    out: list[KernelSpec] = [LayoutSpec(num_ranks=num_ranks, num_experts=num_experts,
                                        num_topk=num_topk)]
    for dtype in dtypes:
        # The kernel a row of this format is keyed by (ops/intranode.py asks the same way).
        fmt = _format_of(dtype)
        cols = fmt.scale_cols(hidden)
        wire_hidden, wire_dtype = normal_dispatch_wire(fmt.data_bytes(hidden), cols)
        # with top-k, and cached (an uncached dispatch without top-k, rare in models, is
        # (hidden, 0, num_experts): list it as an explicit kernel where a run needs it)
        for k, e in ((num_topk, num_experts), (0, None)):
            out.append(normal_dispatch_spec(wire_hidden, k, e, num_ranks, wire_dtype,
                                            cols if cols else -1))
    for k in (num_topk, 0):
        out.append(NormalCombineSpec(hidden=hidden, num_topk=k, num_ranks=num_ranks))
    return out


def low_latency_specs(hidden, num_experts, num_topk, num_ranks, dtypes) -> list[KernelSpec]:
    out: list[KernelSpec] = []
    for dtype in dtypes:
        out.append(LowLatencyDispatchSpec(hidden=hidden, num_topk=num_topk,
                                          num_experts=num_experts, num_ranks=num_ranks,
                                          **formats.low_latency_fields(_format_of(dtype))))
    out.append(LowLatencyCombineSpec(hidden=hidden, num_topk=num_topk, num_experts=num_experts,
                                     num_ranks=num_ranks))
    if combine_variant() == "per_rank":              # the per-rank kernel, where it is selected
        out.append(LowLatencyCombineRankSpec(hidden=hidden, num_topk=num_topk,
                                             num_experts=num_experts, num_ranks=num_ranks))
    out.append(LowLatencyBarrierSpec(num_ranks=num_ranks))     # clean_low_latency_buffer
    return out


@dataclass
class SpecFile:
    path: str
    arch: str | None
    specs: list[KernelSpec]


def load_spec_file(path: str) -> SpecFile:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise SpecFileError(f"{path}: cannot read ({e.strerror})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise SpecFileError(f"{path}: {line}invalid YAML ({getattr(e, 'problem', e)})") from e
    _expect(isinstance(data, dict), path, "top level", "a mapping with 'models' and/or 'kernels'",
            type(data).__name__)
    _check_keys(data, {"arch", "models", "kernels"}, path, "top level")
    _expect("models" in data or "kernels" in data, path, "top level",
            "at least one of 'models' or 'kernels'")
    arch = data.get("arch")
    _expect(arch is None or isinstance(arch, str), path, "arch", "a string like 'sm_90'", arch)
    specs: list[KernelSpec] = []
    models = data.get("models", [])
    _expect(isinstance(models, list), path, "models", "a list", type(models).__name__)
    for i, m in enumerate(models):
        where = f"models[{i}]"
        _expect(isinstance(m, dict), path, where, "a mapping", type(m).__name__)
        _check_keys(m, {"name", "hidden", "num_experts", "num_topk", "ep_sizes", "modes"}, path, where)
        for key in ("hidden", "num_experts", "num_topk"):
            _expect(isinstance(m.get(key), int) and not isinstance(m.get(key), bool), path,
                    f"{where}.{key}", "an int", m.get(key))
        ep_sizes = _int_list(m.get("ep_sizes"), path, f"{where}.ep_sizes")
        modes = m.get("modes")
        _expect(isinstance(modes, dict) and modes, path, f"{where}.modes",
                "a mapping with 'normal' and/or 'low_latency'", modes)
        _check_keys(modes, {"normal", "low_latency"}, path, f"{where}.modes")
        for ep in ep_sizes:
            try:
                if "normal" in modes:
                    mode = modes["normal"] or {}
                    _expect(isinstance(mode, dict), path, f"{where}.modes.normal", "a mapping", mode)
                    _check_keys(mode, {"dtypes"}, path, f"{where}.modes.normal")
                    dtypes = _dtype_list(mode.get("dtypes", ["bf16"]), path,
                                         f"{where}.modes.normal.dtypes")
                    specs += normal_mode_specs(m["hidden"], m["num_experts"], m["num_topk"], ep, dtypes)
                if "low_latency" in modes:
                    mode = modes["low_latency"] or {}
                    w = f"{where}.modes.low_latency"
                    _expect(isinstance(mode, dict), path, w, "a mapping", mode)
                    _check_keys(mode, {"num_max_dispatch_tokens_per_rank", "dispatch_dtypes"}, path, w)
                    tokens = _int_list(mode.get("num_max_dispatch_tokens_per_rank", [128]), path,
                                       f"{w}.num_max_dispatch_tokens_per_rank")
                    _expect(all(0 < t <= MAX_LL_TOKENS for t in tokens), path,
                            f"{w}.num_max_dispatch_tokens_per_rank",
                            f"values in [1, {MAX_LL_TOKENS}]", tokens)
                    dtypes = _dtype_list(mode.get("dispatch_dtypes", ["fp8"]), path,
                                         f"{w}.dispatch_dtypes", low_latency=True)
                    # Max tokens per rank is a run-time argument: no spec per value.
                    specs += low_latency_specs(m["hidden"], m["num_experts"], m["num_topk"], ep, dtypes)
            except SpecError as e:
                raise SpecFileError(f"{path}: {where} (ep_size {ep}): {e}") from e
    kernels = data.get("kernels", [])
    _expect(isinstance(kernels, list), path, "kernels", "a list", type(kernels).__name__)
    for i, k in enumerate(kernels):
        where = f"kernels[{i}]"
        _expect(isinstance(k, dict) and k.get("family") in FAMILIES, path, f"{where}.family",
                f"one of {sorted(FAMILIES)}", k.get("family") if isinstance(k, dict) else k)
        try:
            specs.append(spec_from_json(k))
        except TypeError as e:
            raise SpecFileError(f"{path}: {where}: {e}") from e
        except SpecError as e:
            raise SpecFileError(f"{path}: {where}: {e}") from e
    unique = list(dict.fromkeys(specs))       # keep order, drop duplicates
    return SpecFile(path, arch, unique)


@dataclass
class BuildOutcome:
    spec: KernelSpec
    status: str          # "compiled" | "cached" | "failed"
    seconds: float
    detail: str = ""


def _build_one(spec: KernelSpec, arch: str, cache_root: str) -> BuildOutcome:
    from .cache import Cache
    stats: dict = {}
    t0 = time.perf_counter()
    try:
        jit.build(spec, arch, Cache(cache_root), stats)
    except Exception as e:   # reported per kernel; the summary counts it as failed
        return BuildOutcome(spec, "failed", time.perf_counter() - t0, f"{type(e).__name__}: {e}")
    return BuildOutcome(spec, "cached" if stats.get("cached") else "compiled",
                        stats.get("seconds", time.perf_counter() - t0))


def precompile(specs: list[KernelSpec], arch: str, cache_root: str, jobs: int,
               progress=None) -> list[BuildOutcome]:
    """Build every spec (in `jobs` processes); prints one progress line per kernel."""
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
        if o.status == "failed":
            print(f"    {o.detail.splitlines()[0] if o.detail else ''}", file=progress)

    if jobs <= 1 or total <= 1:
        for s in specs:
            report(_build_one(s, arch, cache_root))
    else:
        # Processes, not threads: NVRTC/nvJitLink hold the GIL-free C work but Python-side
        # hashing and file I/O would serialise; a spawn pool also isolates a crashing compile.
        ctx = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            pending = [pool.submit(_build_one, s, arch, cache_root) for s in specs]
            for f in futures.as_completed(pending):
                report(f.result())
    elapsed = time.perf_counter() - start
    counts = {k: sum(o.status == k for o in outcomes) for k in ("compiled", "cached", "failed")}
    compiled = [o.seconds for o in outcomes if o.status == "compiled"]
    mean = f", {sum(compiled) / len(compiled):.2f}s per compiled kernel" if compiled else ""
    print(f"epgen precompile: {counts['compiled']} compiled, {counts['cached']} cached, "
          f"{counts['failed']} failed in {elapsed:.1f}s ({jobs} jobs{mean}) -> {cache_root}",
          file=progress)
    return outcomes


def default_jobs() -> int:
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else (os.cpu_count() or 1), 16))
