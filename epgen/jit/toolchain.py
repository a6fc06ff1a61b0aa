"""Where the compile toolchain lives and what version each part is.

One place finds NVRTC, nvJitLink, the CUDA runtime and CCCL headers and NVSHMEM (headers, device
library, host library): the pip wheels first (the `cu13`/`cu12` extras), then `CUDA_HOME` /
`NVSHMEM_HOME` / /usr/local/cuda. Everything that changes a binary is summarised in
`Toolchain.signature()`, which the cache key hashes.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os
import re
import sys
import sysconfig
from dataclasses import dataclass, field


class ToolchainError(RuntimeError):
    """A part of the toolchain is missing; the message says which and how to get it."""


INSTALL_HINT = "pip install 'epgen[cu13]' (or 'epgen[cu12]' for CUDA 12)"


def _site_dirs() -> list[str]:
    out = []
    paths = sysconfig.get_paths()
    for p in [*sys.path, paths.get("purelib", ""), paths.get("platlib", "")]:
        if p and os.path.isdir(p) and p not in out:
            out.append(p)
    return out


def _cuda_homes() -> list[str]:
    homes = [os.environ[k] for k in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(k)]
    homes += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    return [h for h in homes if os.path.isdir(h)]


def _first_with(candidates: list[str], relative: str) -> str | None:
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, relative)):
            return c
    return None


def _define(path: str, name: str) -> int | None:
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError:
        return None
    m = re.search(rf"#\s*define\s+{name}\s+(\d+)", text)
    return int(m.group(1)) if m else None


@functools.lru_cache(maxsize=None)
def _sha256_file(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str) -> str:
    st = os.stat(path)
    return _sha256_file(path, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Toolchain:
    nvrtc_version: tuple[int, int]
    nvjitlink_version: tuple[int, int]
    cuda_runtime_include: str
    cccl_include: str
    nvshmem_include: str
    nvshmem_lib: str
    nvshmem_version: tuple[int, int, int]
    cudart_header_version: int
    cccl_version: int
    notes: tuple[str, ...] = field(default=())

    @property
    def device_library(self) -> str:
        return os.path.join(self.nvshmem_lib, "libnvshmem_device.a")

    @property
    def host_library(self) -> str:
        return os.path.join(self.nvshmem_lib, "libnvshmem_host.so.3")

    @property
    def include_dirs(self) -> list[str]:
        return [self.nvshmem_include, self.cuda_runtime_include, self.cccl_include]

    def signature(self) -> dict:
        """Everything of the toolchain that changes a binary; no absolute paths (relocatable keys)."""
        return {
            "nvrtc": "%d.%d" % self.nvrtc_version,
            "nvjitlink": "%d.%d" % self.nvjitlink_version,
            "nvshmem": "%d.%d.%d" % self.nvshmem_version,
            "nvshmem_device_lib_sha256": sha256_file(self.device_library),
            "cudart_headers": self.cudart_header_version,
            "cccl": self.cccl_version,
        }


def _find_nvshmem() -> tuple[str, str]:
    candidates = []
    if os.environ.get("NVSHMEM_HOME"):
        candidates.append(os.environ["NVSHMEM_HOME"])
    candidates += [os.path.join(s, "nvidia", "nvshmem") for s in _site_dirs()]
    for c in candidates:
        inc, lib = os.path.join(c, "include"), os.path.join(c, "lib")
        if os.path.isfile(os.path.join(inc, "nvshmem.h")) and os.path.isfile(
                os.path.join(lib, "libnvshmem_device.a")):
            return inc, lib
    raise ToolchainError(
        f"NVSHMEM headers + libnvshmem_device.a not found (looked in {candidates}); "
        f"{INSTALL_HINT} or set NVSHMEM_HOME")


def _find_cuda_headers(cuda_major: int) -> tuple[str, str]:
    runtime, cccl = [], []
    for s in _site_dirs():
        if cuda_major >= 13:
            runtime.append(os.path.join(s, "nvidia", f"cu{cuda_major}", "include"))
            cccl.append(os.path.join(s, "nvidia", f"cu{cuda_major}", "include", "cccl"))
        runtime.append(os.path.join(s, "nvidia", "cuda_runtime", "include"))
        cccl.append(os.path.join(s, "nvidia", "cuda_cccl", "include"))
    for home in _cuda_homes():
        inc = os.path.join(home, "include")
        runtime.append(inc)
        cccl += [os.path.join(inc, "cccl"), inc]   # CUDA 13 layout, then CUDA 12 layout
    rt = _first_with(runtime, "cuda_fp16.h")
    cc = _first_with(cccl, os.path.join("cuda", "std", "cstdint"))
    if rt is None:
        raise ToolchainError(f"CUDA runtime headers (cuda_fp16.h) not found; {INSTALL_HINT} "
                             "or set CUDA_HOME")
    if cc is None:
        raise ToolchainError(f"CCCL headers (cuda/std/cstdint) not found; {INSTALL_HINT} "
                             "or set CUDA_HOME")
    return rt, cc


def _nvrtc_version() -> tuple[int, int]:
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise ToolchainError(f"cuda-bindings is not installed ({e}); {INSTALL_HINT}") from e
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as e:  # the bindings load libnvrtc lazily
        raise ToolchainError(f"NVRTC library not loadable ({e}); {INSTALL_HINT}") from e
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise ToolchainError(f"nvrtcVersion failed: {err}")
    return major, minor


def _nvjitlink_version() -> tuple[int, int]:
    try:
        from cuda.bindings import nvjitlink
        return tuple(nvjitlink.version())
    except Exception as e:
        raise ToolchainError(f"nvJitLink not loadable ({e}); {INSTALL_HINT}") from e


@functools.lru_cache(maxsize=1)
def discover() -> Toolchain:
    """Find every part once per process; raise ToolchainError naming what is missing."""
    nvrtc_v = _nvrtc_version()
    nvjitlink_v = _nvjitlink_version()
    runtime_inc, cccl_inc = _find_cuda_headers(nvrtc_v[0])
    nvshmem_inc, nvshmem_lib = _find_nvshmem()
    version_h = os.path.join(nvshmem_inc, "non_abi", "nvshmem_version.h")
    nvshmem_v = tuple(_define(version_h, f"NVSHMEM_VENDOR_{p}_VERSION") or 0
                      for p in ("MAJOR", "MINOR", "PATCH"))
    cudart_v = _define(os.path.join(runtime_inc, "cuda_runtime_api.h"), "CUDART_VERSION") or 0
    cccl_v = _define(os.path.join(cccl_inc, "cuda", "std", "__cccl", "version.h"), "CCCL_VERSION") or 0
    notes = []
    if nvjitlink_v[0] != nvrtc_v[0]:
        notes.append(f"nvJitLink {nvjitlink_v} and NVRTC {nvrtc_v} differ in major version")
    return Toolchain(nvrtc_v, nvjitlink_v, runtime_inc, cccl_inc, nvshmem_inc, nvshmem_lib,
                     nvshmem_v, cudart_v, cccl_v, tuple(notes))


def gpu_arch() -> str | None:
    """The arch of GPU 0 (`sm_90`), or None when no GPU is visible."""
    try:
        from cuda.bindings import driver
        (err,) = driver.cuInit(0)
        if err != driver.CUresult.CUDA_SUCCESS:
            return None
        err, count = driver.cuDeviceGetCount()
        if err != driver.CUresult.CUDA_SUCCESS or count == 0:
            return None
        attr = driver.CUdevice_attribute
        _, major = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, 0)
        _, minor = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, 0)
        return f"sm_{major}{minor}"
    except Exception:
        return None


# The targets epgen builds and tests for: the one place that names them.
SUPPORTED_ARCHS = ("sm_90",)


def check_arch(source: str, value) -> str:
    """`value` if it is a supported target, else ValueError naming where it came from."""
    if not isinstance(value, str) or value not in SUPPORTED_ARCHS:
        shown = repr(value)[:40]
        raise ValueError(f"{source}={shown}: epgen builds and tests for {', '.join(SUPPORTED_ARCHS)} "
                         "only (exactly that spelling)")
    return value


def resolve_arch(explicit: str | None = None, spec_file_arch: str | None = None) -> str:
    """--arch, else EPGEN_ARCH, else the spec file's arch, else the GPU present."""
    for source, value in (("--arch", explicit), ("EPGEN_ARCH", os.environ.get("EPGEN_ARCH")),
                          ("spec file 'arch'", spec_file_arch)):
        if value:
            return check_arch(source, value)
    arch = gpu_arch()
    if arch is None:
        raise ValueError("no target arch: no GPU is visible; pass --arch sm_90 or set EPGEN_ARCH")
    return check_arch("the GPU present", arch)


def nvshmem_host_library() -> str:
    """libnvshmem_host.so.3 beside the headers and device library in use (one version; torch
    loads this copy too)."""
    _, lib = _find_nvshmem()
    path = os.path.join(lib, "libnvshmem_host.so.3")
    if not os.path.isfile(path):
        raise ToolchainError(f"{path} not found; {INSTALL_HINT}")
    return path
