"""NVRTC (to LTO-IR) + nvJitLink (with libnvshmem_device.a) of one translation unit.

The recipe: `-rdc -dlto` with every NVSHMEM transfer function inlined from the headers (NVRTC's `uint64_t` mangles differently from the
nvcc-built archive, so non-inline calls would not resolve), the archive linked only for the
device-state symbols that `nvshmemx_cumodule_init` fills.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from dataclasses import dataclass

from .codegen import TEMPLATES_DIR
from .toolchain import Toolchain


# NVRTC options that change the binary. Include paths are added separately and never hashed.
BASE_OPTIONS = (
    "-std=c++17",
    "-rdc=true",
    "-dlto",
    "-default-device",                       # NVSHMEM 3.4 headers: an unannotated ctor
    "-DNVSHMEM_ENABLE_ALL_DEVICE_INLINING",  # see module docstring
)
LINK_OPTIONS = ("-lto", "-verbose")          # nvJitLink; -verbose: the ptxas resource lines


@dataclass(frozen=True)
class Recipe:
    """Every option of one build, NVRTC's and nvJitLink's: hashed whole into the cache key
    (cache/key.py), so no option can change the binary without changing the key. Include paths
    are not in it: they are where the headers are, and the headers are hashed by content."""
    arch: str
    nvrtc_options: tuple[str, ...]
    nvjitlink_options: tuple[str, ...]

    def to_json(self) -> dict:
        return {"arch": self.arch, "nvrtc_options": list(self.nvrtc_options),
                "nvjitlink_options": list(self.nvjitlink_options)}


def recipe(arch: str) -> Recipe:
    return Recipe(arch, (f"-arch={arch}", *BASE_OPTIONS), (f"-arch={arch}", *LINK_OPTIONS))


class CompileError(RuntimeError):
    """NVRTC or nvJitLink refused a kernel; carries the log and the spec that asked for it."""

    def __init__(self, stage: str, log: str, what: str):
        self.stage, self.log, self.what = stage, log, what
        self.log_path: str | None = None     # where jit kept the whole log, if it could
        super().__init__(f"{stage} failed for {what}:\n{log[-12000:]}")


@dataclass
class CompileResult:
    cubin: bytes
    lowered_names: dict[str, str]   # name expression -> mangled symbol in the cubin
    log: str
    nvrtc_seconds: float
    link_seconds: float
    resources: dict[str, dict]      # mangled kernel -> {"registers": n, "spill_stores": n, ...}


PRELUDE = "prelude.cuh"
PCH_HEAP_BYTES = 1 << 30          # NVSHMEM's headers need ~190 MB of PCH heap
_pch_lock = threading.Lock()


def include_options(toolchain: Toolchain) -> list[str]:
    return [f"-I{d}" for d in (TEMPLATES_DIR, *toolchain.include_dirs)]


def _nvrtc_log(nvrtc, prog) -> str:
    _, n = nvrtc.nvrtcGetProgramLogSize(prog)
    buf = b" " * n
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return buf.decode(errors="replace").rstrip("\x00 \n")


# NVRTC accepts a PCH only in the process (the "dynamic instance" of libnvrtc) that created it:
# in any other it warns "incompatible PCH heap allocation address" and parses everything again,
# slower than with no PCH at all (bench/NOTES.md, "Precompiled header"). So each process makes
# its own, once per arch and toolchain, and keeps it only as an open file: created under
# <cache>/.pch/ with this host and pid in its name, unlinked at once, read through
# /proc/self/fd. It vanishes with the process; a kill during its creation leaves a named file
# that `epgen cache gc` removes (its pid is gone).
_pch_open: dict[str, str | None] = {}
_pch_heap_set = False


def pch_file_name(tag: str) -> str:
    return f"prelude.{socket.gethostname()}.{os.getpid()}.{tag}.pch"


def ensure_pch(pch_dir: str, tag: str, arch: str, toolchain: Toolchain) -> str | None:
    """This process's prelude PCH for `tag` (everything that keys a kernel but its source),
    created on first use; None if NVRTC can't make one (the compile goes on without)."""
    global _pch_heap_set
    from cuda.bindings import nvrtc
    with _pch_lock:
        if tag in _pch_open:
            return _pch_open[tag]
        if not os.path.isdir("/proc/self/fd"):
            _pch_open[tag] = None
            return None
        path = os.path.join(pch_dir, pch_file_name(tag))
        try:
            os.makedirs(pch_dir, exist_ok=True)
        except OSError:          # a read-only cache: no PCH (and no publish: that will say so)
            _pch_open[tag] = None
            return None
        if not _pch_heap_set:    # resizing the heap later would invalidate every PCH made
            nvrtc.nvrtcSetPCHHeapSize(PCH_HEAP_BYTES)
            _pch_heap_set = True
        src = f'#include "{PRELUDE}"\n'
        err, prog = nvrtc.nvrtcCreateProgram(src.encode(), b"epgen_prelude.cu", 0, [], [])
        try:
            opts = [o.encode() for o in (*recipe(arch).nvrtc_options,
                                         *include_options(toolchain), f"--create-pch={path}")]
            (res,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
            (status,) = nvrtc.nvrtcGetPCHCreateStatus(prog)
        finally:
            nvrtc.nvrtcDestroyProgram(prog)
        fd_path = None
        try:
            if res == status == nvrtc.nvrtcResult.NVRTC_SUCCESS and os.path.getsize(path) > 0:
                fd = os.open(path, os.O_RDONLY)
                fd_path = f"/proc/self/fd/{fd}"
        except OSError:
            fd_path = None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        _pch_open[tag] = fd_path
        return fd_path


def nvrtc_to_ltoir(source: str, filename: str, rec: Recipe, toolchain: Toolchain,
                   name_expressions: list[str], what: str,
                   pch: str | None = None) -> tuple[bytes, dict[str, str], str]:
    from cuda.bindings import nvrtc
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), filename.encode(), 0, [], [])
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CompileError("nvrtcCreateProgram", str(err), what)
    try:
        for expr in name_expressions:
            (err,) = nvrtc.nvrtcAddNameExpression(prog, expr.encode())
            if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
                raise CompileError("nvrtcAddNameExpression", f"{expr}: {err}", what)
        # A PCH only saves parsing: it never changes the binary (tests check), so it is not
        # part of the key.
        extra = [f"--use-pch={pch}"] if pch else []
        opts = [o.encode() for o in (*rec.nvrtc_options, *include_options(toolchain), *extra)]
        (res,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        log = _nvrtc_log(nvrtc, prog)
        if res != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError("NVRTC", log or str(res), what)
        lowered = {}
        for expr in name_expressions:
            err, name = nvrtc.nvrtcGetLoweredName(prog, expr.encode())
            if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
                raise CompileError("nvrtcGetLoweredName", f"{expr}: {err}", what)
            lowered[expr] = name.decode()
        _, n = nvrtc.nvrtcGetLTOIRSize(prog)
        ltoir = b" " * n
        nvrtc.nvrtcGetLTOIR(prog, ltoir)
        return bytes(ltoir), lowered, log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def parse_resources(info_log: str) -> dict[str, dict]:
    """Registers and spills per kernel from nvJitLink's verbose (ptxas) log."""
    out: dict[str, dict] = {}
    current = None
    for line in info_log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?", line)
        if m:
            current = m.group(1)
            out.setdefault(current, {})
            continue
        if current is None:
            continue
        for key, pattern in (("registers", r"Used (\d+) registers"),
                             ("spill_stores", r"(\d+) bytes spill stores"),
                             ("spill_loads", r"(\d+) bytes spill loads"),
                             ("stack_frame", r"(\d+) bytes stack frame")):
            m = re.search(pattern, line)
            if m:
                out[current][key] = int(m.group(1))
    return {k: v for k, v in out.items() if v}


def link(ltoir: bytes, rec: Recipe, toolchain: Toolchain, what: str) -> tuple[bytes, str]:
    from cuda.bindings import nvjitlink
    opts = list(rec.nvjitlink_options)
    handle = nvjitlink.create(len(opts), opts)
    try:
        try:
            nvjitlink.add_data(handle, nvjitlink.InputType.LTOIR, ltoir, len(ltoir), "epgen")
            nvjitlink.add_file(handle, nvjitlink.InputType.LIBRARY, toolchain.device_library)
            nvjitlink.complete(handle)
        except Exception as e:
            n = nvjitlink.get_error_log_size(handle)
            buf = bytearray(n)
            if n > 1:
                nvjitlink.get_error_log(handle, buf)
            raise CompileError("nvJitLink", f"{e}\n{buf.decode(errors='replace')}", what) from None
        n = nvjitlink.get_info_log_size(handle)
        info = bytearray(n)
        if n > 1:
            nvjitlink.get_info_log(handle, info)
        n = nvjitlink.get_linked_cubin_size(handle)
        cubin = bytearray(n)
        nvjitlink.get_linked_cubin(handle, cubin)
        return bytes(cubin), info.decode(errors="replace").rstrip("\x00")
    finally:
        nvjitlink.destroy(handle)


def compile_source(source: str, filename: str, arch: str, toolchain: Toolchain,
                   name_expressions: list[str], what: str,
                   pch: tuple[str, str] | None = None) -> CompileResult:
    """pch: (folder, tag) of the prelude PCH to use (this process's, made on first use); None
    compiles without."""
    if pch and f'#include "{PRELUDE}"' in source.splitlines()[:3]:
        pch = ensure_pch(pch[0], pch[1], arch, toolchain)
    else:
        pch = None
    rec = recipe(arch)
    t0 = time.perf_counter()
    ltoir, lowered, nvrtc_log = nvrtc_to_ltoir(source, filename, rec, toolchain,
                                               name_expressions, what, pch)
    t1 = time.perf_counter()
    cubin, link_log = link(ltoir, rec, toolchain, what)
    t2 = time.perf_counter()
    log = (f"# NVRTC {' '.join(rec.nvrtc_options)}\n{nvrtc_log}\n"
           f"# nvJitLink {' '.join(rec.nvjitlink_options)}\n{link_log}\n")
    return CompileResult(cubin, lowered, log, t1 - t0, t2 - t1, parse_resources(link_log))
