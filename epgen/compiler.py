"""NVRTC (to LTO-IR) + nvJitLink (with libnvshmem_device.a) of one translation unit.

The recipe is ../shared/docs/nvshmem-nvrtc.md's recipe A: `-rdc -dlto` with every NVSHMEM
transfer function inlined from the headers (NVRTC's `uint64_t` mangles differently from the
nvcc-built archive, so non-inline calls would not resolve), the archive linked only for the
device-state symbols that `nvshmemx_cumodule_init` fills.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass

from .toolchain import Toolchain

TEMPLATES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")

# Options that change the binary. Include paths are added separately and never hashed.
BASE_OPTIONS = (
    "-std=c++17",
    "-rdc=true",
    "-dlto",
    "-default-device",                       # NVSHMEM 3.4 headers: an unannotated ctor
    "-DNVSHMEM_ENABLE_ALL_DEVICE_INLINING",  # see module docstring
)


class CompileError(RuntimeError):
    """NVRTC or nvJitLink refused a kernel; carries the log and the spec that asked for it."""

    def __init__(self, stage: str, log: str, what: str):
        self.stage, self.log, self.what = stage, log, what
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


def options_for(arch: str) -> list[str]:
    return [f"-arch={arch}", *BASE_OPTIONS]


def include_options(toolchain: Toolchain) -> list[str]:
    return [f"-I{d}" for d in (TEMPLATES_DIR, *toolchain.include_dirs)]


def _nvrtc_log(nvrtc, prog) -> str:
    _, n = nvrtc.nvrtcGetProgramLogSize(prog)
    buf = b" " * n
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return buf.decode(errors="replace").rstrip("\x00 \n")


def ensure_pch(path: str, arch: str, toolchain: Toolchain) -> str | None:
    """Create the prelude PCH at `path` once (across threads and processes); None if NVRTC
    can't. The caller names the file after everything that keys a kernel but its source."""
    from cuda.bindings import nvrtc
    if os.path.isfile(path):
        return path
    pch_dir = os.path.dirname(path)
    os.makedirs(pch_dir, exist_ok=True)
    with _pch_lock, open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(path):
            return path
        fd, tmp = tempfile.mkstemp(dir=pch_dir, suffix=".pch.tmp")
        os.close(fd)
        nvrtc.nvrtcSetPCHHeapSize(PCH_HEAP_BYTES)
        src = f'#include "{PRELUDE}"\n'
        err, prog = nvrtc.nvrtcCreateProgram(src.encode(), b"epgen_prelude.cu", 0, [], [])
        try:
            opts = [o.encode() for o in options_for(arch) + include_options(toolchain)
                    + [f"--create-pch={tmp}"]]
            (res,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
            (status,) = nvrtc.nvrtcGetPCHCreateStatus(prog)
        finally:
            nvrtc.nvrtcDestroyProgram(prog)
        if res != nvrtc.nvrtcResult.NVRTC_SUCCESS or status != nvrtc.nvrtcResult.NVRTC_SUCCESS \
                or os.path.getsize(tmp) == 0:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return None
        os.replace(tmp, path)
        return path


def nvrtc_to_ltoir(source: str, filename: str, arch: str, toolchain: Toolchain,
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
        opts = [o.encode() for o in options_for(arch) + include_options(toolchain) + extra]
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


def link(ltoir: bytes, arch: str, toolchain: Toolchain, what: str) -> tuple[bytes, str]:
    from cuda.bindings import nvjitlink
    opts = [f"-arch={arch}", "-lto", "-verbose"]
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
                   pch_path: str | None = None) -> CompileResult:
    """pch_path: the prelude PCH to use (created on first use); None compiles without."""
    pch = None
    if pch_path and f'#include "{PRELUDE}"' in source.splitlines()[:3]:
        pch = ensure_pch(pch_path, arch, toolchain)
    t0 = time.perf_counter()
    ltoir, lowered, nvrtc_log = nvrtc_to_ltoir(source, filename, arch, toolchain,
                                               name_expressions, what, pch)
    t1 = time.perf_counter()
    cubin, link_log = link(ltoir, arch, toolchain, what)
    t2 = time.perf_counter()
    log = f"# NVRTC {' '.join(options_for(arch))}\n{nvrtc_log}\n# nvJitLink -lto\n{link_log}\n"
    return CompileResult(cubin, lowered, log, t1 - t0, t2 - t1, parse_resources(link_log))
