"""build(spec) -> verified cache entry: render, key, compile, publish. The one build path,
used by the runtime (first call of an operation) and by `epgen precompile` alike."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time

from .. import env
from . import codegen, compiler, toolchain
from ..cache import Cache, CacheEntry, cache_key, key_parts
from .specs import KernelSpec

LOCK_TIMEOUT_S = 900.0     # EPGEN_COMPILE_LOCK_TIMEOUT_S, read at each compile


class JitDisabledError(RuntimeError):
    """EPGEN_JIT=0 and the kernel is not in the cache."""


class CompileDuringCaptureError(RuntimeError):
    """A kernel would be compiled while a CUDA graph is being captured."""


_memo: dict[tuple, CacheEntry] = {}
_memo_lock = threading.Lock()


def jit_enabled() -> bool:
    return env.flag("EPGEN_JIT", True)


def _capturing() -> bool:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return False
    return bool(torch.cuda.is_current_stream_capturing())


def describe_key(spec: KernelSpec, arch: str) -> tuple[str, str, dict]:
    """(source, key, key parts) of a spec for an arch, without compiling."""
    tc = toolchain.discover()
    source = codegen.render(spec)
    parts = key_parts(source, compiler.recipe(arch), tc.signature(),
                      codegen.TEMPLATES_DIR, codegen.header_files())
    return source, cache_key(parts), parts


def build(spec: KernelSpec, arch: str | None = None, cache: Cache | None = None,
          stats: dict | None = None, pch: bool = True) -> CacheEntry:
    """The cache entry for `spec` on `arch`, compiling it if no valid entry exists.

    stats (optional) receives {"cached": bool, "seconds": float}. pch=False: this process will
    compile too few kernels for its prelude PCH (one plain compile's cost) to pay.
    """
    arch = toolchain.check_arch("arch", arch) if arch else toolchain.resolve_arch()
    cache = cache or Cache()
    memo_key = (spec, arch, cache.root)
    with _memo_lock:
        hit = _memo.get(memo_key)
    if hit is not None and os.path.isdir(hit.path):
        if stats is not None:
            stats.update(cached=True, seconds=0.0)
        return hit
    t0 = time.perf_counter()
    source, key, parts = describe_key(spec, arch)
    entry = cache.lookup(spec.name, key)
    if entry is None:
        if not jit_enabled():
            raise JitDisabledError(
                f"EPGEN_JIT=0 and no cache entry for {spec.describe()} on {arch} "
                f"(key {key} in {cache.root}); run `epgen precompile` with a spec file "
                "covering it, or unset EPGEN_JIT")
        if _capturing():
            raise CompileDuringCaptureError(
                f"{spec.describe()} on {arch} must be compiled, but a CUDA graph is being "
                "captured; run the operation once before capture (or precompile it)")
        with cache.lock(spec.name, key,
                        env.positive_seconds("EPGEN_COMPILE_LOCK_TIMEOUT_S", LOCK_TIMEOUT_S)):
            entry = cache.lookup(spec.name, key)   # another process may have built it meanwhile
            if entry is None:
                entry = _compile_and_publish(spec, arch, source, key, parts, cache, pch)
                if stats is not None:
                    stats.update(cached=False, seconds=time.perf_counter() - t0)
    if stats is not None and "cached" not in stats:
        stats.update(cached=True, seconds=time.perf_counter() - t0)
    with _memo_lock:
        _memo[memo_key] = entry
    return entry


def _pch(cache: Cache, parts: dict, wanted: bool) -> tuple[str, str] | None:
    """(folder, tag) of the prelude PCH for these key parts: tagged by all of them but the
    kernel's source, so a new toolchain, header or option makes a new one. EPGEN_PCH=0
    compiles without."""
    if not (wanted and env.flag("EPGEN_PCH", True)):
        return None
    return os.path.join(cache.root, ".pch"), cache_key(
        {k: v for k, v in parts.items() if k != "source_sha256"})


def _keep_failed_log(cache: Cache, base: str, source: str, e: Exception) -> str | None:
    """The whole compiler log of a failed compile, kept as <cache>/.failed/<entry>.log (with
    the source it came from); its path, or None where the cache is not writable."""
    try:
        path = os.path.join(cache.own_dir(".failed"), f"{base}.log")
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"# {e.stage} failed for {e.what}\n{e.log}\n# source\n{source}")
    except OSError:
        return None
    return path


def _compile_and_publish(spec, arch, source, key, parts, cache, pch) -> CacheEntry:
    tc = toolchain.discover()
    entries = [spec.entry(kind) for kind in spec.entry_kinds]
    what = f"{spec.describe()} on {arch}"
    try:
        result = compiler.compile_source(source, codegen.source_filename(spec), arch, tc,
                                         entries, what, _pch(cache, parts, pch))
    except compiler.CompileError as e:
        e.log_path = _keep_failed_log(cache, f"{spec.name}.{key}", source, e)
        raise
    manifest = {
        "name": spec.name,
        "key": key,
        "spec": spec.to_json(),
        "key_parts": parts,
        "entries": entries,
        "lowered_names": result.lowered_names,
        "cubin_sha256": hashlib.sha256(result.cubin).hexdigest(),
        "cubin_bytes": len(result.cubin),
        "source_bytes": len(source.encode()),
        "nvrtc_seconds": round(result.nvrtc_seconds, 4),
        "link_seconds": round(result.link_seconds, 4),
        "resources": result.resources,
        "created": time.time(),
    }
    files = {
        "source.cu": source.encode(),
        "build.log": result.log.encode(),
        "manifest.json": json.dumps(manifest, indent=1, sort_keys=True).encode(),
        "kernel.cubin": result.cubin,
    }
    return cache.publish(spec.name, key, files)
