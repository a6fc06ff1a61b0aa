"""The host path's fast lane: a call that passed epgen's Python path once is replayed from C++
(fastcall.cpp, its top comment says how) by later calls with the same flags and shapes.

`record(...)` turns what a Python-path call did (its arguments, the outputs it allocated, the
argument structs it launched, what it returned) into a Plan, or None where the call cannot be
replayed (a receive hook, async work, a capture, an argument of a kind a Plan does not compare).
A Plan called with a later call's arguments returns that call's result, or None: the caller then
takes the Python path, which checks, raises, or records a new Plan. Every rule stays in Python.

The module is compiled with the host C++ compiler (`c++`, or $CXX) against the installed torch's
headers and libraries into <cache>/.host/, beside a digest it is checked against before loading
(a broken one is rebuilt, never loaded): by `epgen precompile`, or at first use in the
background (~20 s, calls take the Python path meanwhile). No compiler, no torch headers, a failed build or EPGEN_FASTCALL=0: every call takes the
Python path (same results, ~25-50 us more host time a call).
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings

from .. import env, variants

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastcall.cpp")
HOST_DIR = ".host"           # in the kernel cache (cache/store.py OWN_DIRS)
MODULE = "epgen_fastcall"
# the tags fastcall.cpp reads
ARG_NONE, ARG_TENSOR, ARG_EQUAL, ARG_TUPLE = 0, 1, 2, 3
RES_SLOT, RES_CONST, RES_TUPLE = 0, 1, 2
MAX_SLOTS = 64
# The variables a call reads at each call (ops/context.timeout_ns, epgen/variants.py): a Plan
# records them and a changed one sends the call down the Python path.
PER_CALL_ENV = ("EPGEN_TIMEOUT_S", variants.COMBINE_ENV, variants.INTERNODE_WARPS_ENV)

_native = None
_state = "not loaded"        # or "building <path>", "loaded <path>", "off: <why>"
_builder = None              # a background build: (thread, [path or exception], set_driver)
_lock = threading.Lock()


class Unreplayable(Exception):
    """record() met something a Plan cannot compare or rebuild; the call stays on the Python
    path (never an error to the user)."""


def status() -> str:
    return _state


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or (sysconfig.get_config_var("CXX") or "c++").split()[0]
    return shutil.which(cxx) or shutil.which("c++") or shutil.which("g++")


def _torch_build():
    """(torch's version, its include folders, its library folder, its C++ ABI flag), from the
    installed package's files (torch is imported: the module links against the loaded one).
    Raises ImportError without torch (a compile-only install: no fast lane there)."""
    import torch
    root = os.path.dirname(torch.__file__)
    includes = [os.path.join(root, "include"),
                os.path.join(root, "include", "torch", "csrc", "api", "include")]
    if not os.path.exists(os.path.join(includes[0], "torch", "csrc", "autograd",
                                       "python_variable.h")):
        raise ImportError(f"torch {torch.__version__} at {root} has no C++ headers")
    return (torch.__version__, includes, os.path.join(root, "lib"),
            int(torch._C._GLIBCXX_USE_CXX11_ABI))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _build_key(source: bytes, torch_build) -> str:
    """Source, interpreter, torch and their ABIs: a new Python, a new torch or a changed
    fastcall.cpp builds anew."""
    parts = [source, sys.version.encode(), (sysconfig.get_config_var("EXT_SUFFIX") or "").encode(),
             sysconfig.get_paths()["include"].encode(), repr(torch_build).encode()]
    return _digest(b"\0".join(parts))[:16]


def library_path(cache_root: str) -> str:
    with open(SOURCE, "rb") as f:
        key = _build_key(f.read(), _torch_build())
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return os.path.join(cache_root, HOST_DIR, f"{MODULE}.{key}{suffix}")


def build(cache_root: str) -> str:
    """The compiled module's path in this cache, compiled (atomically) unless a verified one is
    there. Raises RuntimeError naming the compiler's output on failure."""
    path = library_path(cache_root)
    if _verified(path):
        return path
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++, or $CXX) to build the fast lane")
    _, includes, lib, cxx11_abi = _torch_build()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=MODULE, suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    # c++20: torch's headers use its bit-field initializers
    cmd = [cxx, "-O2", "-std=c++20", "-shared", "-fPIC", "-Wall", "-Werror",
           "-Wno-unused-parameter", f"-D_GLIBCXX_USE_CXX11_ABI={cxx11_abi}",
           "-I" + sysconfig.get_paths()["include"], *("-I" + d for d in includes), SOURCE,
           "-o", tmp, "-L" + lib, "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
           "-Wl,-rpath," + lib]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        _compiling[proc] = tmp
        try:
            output, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        finally:
            _compiling.pop(proc, None)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                               f"{output.strip()[-2000:]}")
        with open(tmp, "rb") as f:
            data = f.read()
        with open(path + ".sha256", "w") as f:       # the digest first: a .so without one is
            f.write(_digest(data))                   # never loaded
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# compiles under way (Popen -> its output file): a background build the interpreter's exit
# cuts short would leave its compiler writing into the cache
_compiling: dict = {}


@atexit.register
def _stop_compiles() -> None:
    for proc, tmp in list(_compiling.items()):
        proc.kill()
        proc.wait()
        if os.path.exists(tmp):
            os.unlink(tmp)


def _verified(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            data = f.read()
        with open(path + ".sha256") as f:
            return f.read().strip() == _digest(data)
    except OSError:
        return False


def _load(path: str):
    import torch  # noqa: F401  (the module's torch symbols are the loaded torch's)
    spec = importlib.util.spec_from_file_location(MODULE, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def native(set_driver=None):
    """The loaded module with its driver entry points set (libcuda's, or those
    `set_driver(mod)` sets: the CPU tests' fakes), or None: EPGEN_FASTCALL=0, no CUDA driver,
    no compiler, a failed build (warned once), or a build still under way. A verified module
    in the cache (`epgen precompile`) loads at once; without one the build (~20 s) runs in the
    background and calls take the Python path meanwhile: compiling inside a call would hold
    this rank while its peers' kernels wait on it within EPGEN_TIMEOUT_S."""
    global _state, _builder
    with _lock:
        if _native is not None or _state.startswith("off"):
            return _native
        if _builder is not None:
            thread, result, pending_driver = _builder
            if thread.is_alive():
                return None
            _builder = None
            if isinstance(result[0], BaseException):
                return _off(result[0])
            return _loaded(result[0], pending_driver)
        if not env.flag("EPGEN_FASTCALL", True):
            _state = "off: EPGEN_FASTCALL=0"
            return None
        if set_driver is None:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError as e:     # no CUDA driver (a CPU machine): nothing to launch on
                _state = f"off: no CUDA driver ({e})"
                return None
            set_driver = functools.partial(_set_libcuda, lib)
        from ..cache.store import default_root
        root = default_root()
        try:
            path = library_path(root)
            if _verified(path):
                return _loaded(path, set_driver)
            if not env.flag("EPGEN_JIT", True):
                _state = "off: not precompiled, and EPGEN_JIT=0 refuses run-time compiles"
                warnings.warn(f"epgen: host fast lane {_state}; every call takes the Python "
                              "path (`epgen precompile` builds it)", RuntimeWarning, stacklevel=3)
                return None
            if _compiler() is None:
                raise RuntimeError("no C++ compiler (c++, or $CXX) to build the fast lane")
        except (OSError, RuntimeError, ImportError) as e:
            return _off(e)
        result: list = [None]

        def run():
            try:
                result[0] = build(root)
            except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as e:
                result[0] = e
        thread = threading.Thread(target=run, name="epgen-fastcall-build", daemon=True)
        _builder = (thread, result, set_driver)
        _state = f"building {path}"
        thread.start()
        return None


def _loaded(path: str, set_driver):
    """Load the module at path (under _lock); None and off where that fails."""
    global _native, _state
    try:
        mod = _load(path)
    except (OSError, ImportError) as e:
        return _off(e)
    set_driver(mod)
    _native, _state = mod, f"loaded {path}"
    return mod


def _off(why: BaseException):
    global _state
    _state = f"off: {why}"
    warnings.warn(f"epgen: host fast lane off, every call takes the Python path: {why}",
                  RuntimeWarning, stacklevel=4)
    return None


def wait_for_build_for_test() -> None:
    """TEST ONLY: until a background build has ended (its result is taken at the next
    native())."""
    builder = _builder
    if builder is not None:
        builder[0].join()


def reset_for_test() -> None:
    """TEST ONLY: forget the loaded module and its state (a test sets EPGEN_FASTCALL or fakes)."""
    global _native, _state, _builder
    wait_for_build_for_test()
    with _lock:
        _native, _state, _builder = None, "not loaded", None


def _set_libcuda(lib, mod) -> None:
    from .cuda import CudaError
    # the plain (legacy default stream) entry points, as cuda.bindings' and torch's streams use
    addr = [ctypes.cast(getattr(lib, n), ctypes.c_void_p).value
            for n in ("cuLaunchKernel", "cuEventRecord", "cuStreamIsCapturing")]
    mod.set_driver(*addr, CudaError)


# -- recording --------------------------------------------------------------------------------
class Launches:
    """What a Python-path call launched, for record(): each (kernel, grid, block, smem, struct,
    {field: tensor}), the struct as launched and the fields that hold a tensor's address."""

    def __init__(self):
        self.items: list = []

    def add(self, kernel, grid, block, smem, struct, tensor_fields: dict) -> None:
        self.items.append((kernel, grid, block, smem, bytes(struct), type(struct), tensor_fields))


def _arg_spec(a, slots: dict, order: list):
    import torch             # here, not at the top: a compile-only install (no torch) builds it
    if a is None:
        return None
    if type(a) in (int, bool, str):
        return (ARG_EQUAL, a)
    if type(a) is tuple:
        return (ARG_TUPLE, tuple(_arg_spec(x, slots, order) for x in a))
    if isinstance(a, torch.Tensor):
        if id(a) in slots:
            raise Unreplayable("a tensor passed twice")
        contiguous = a.is_contiguous()
        ptr = a.data_ptr()
        align = 16 if a.numel() and ptr % 16 == 0 else 0     # at least what the checks asked
        slots[id(a)] = len(order)
        order.append(a)
        return (ARG_TENSOR, a.dtype, tuple(a.shape), None if contiguous else tuple(a.stride()),
                align, a.device)
    raise Unreplayable(f"an argument of type {type(a).__name__}")


def _result_template(r, slots: dict):
    import torch

    from .events import EventOverlap
    if isinstance(r, torch.Tensor):
        if id(r) in slots:
            return (RES_SLOT, slots[id(r)])
        raise Unreplayable("a returned tensor that is neither an argument nor an output")
    if type(r) is tuple:
        return (RES_TUPLE, tuple(_result_template(x, slots) for x in r))
    if r is None or type(r) in (int, bool) or getattr(r, "replay_safe", False) or (
            isinstance(r, EventOverlap) and r.event is None and r.extra_tensors is None):
        return (RES_CONST, r)       # shared by every replayed call: immutable or stateless
    raise Unreplayable(f"a returned {type(r).__name__}")


def _output_spec(t, slots: dict, blocks: dict) -> tuple:
    """(shape, dtype, device) of a fresh torch.empty; (shape, dtype, device, block slot, byte
    offset, strides) of a tensor in an earlier output that is a uint8 block (ops/outputs.py:
    its parts, and views of them a call returns). blocks: storage address -> slot of the fresh
    uint8 outputs so far (found by storage: a dtype view has no _base)."""
    import torch
    if id(t) in slots:
        raise Unreplayable("an output listed twice")
    storage = t.untyped_storage()
    block = blocks.get(storage.data_ptr()) if storage.data_ptr() else None   # 0: nothing in it
    if block is not None:
        return (tuple(t.shape), t.dtype, t.device, block, t.data_ptr() - storage.data_ptr(),
                tuple(t.stride()))
    if not t.is_contiguous() or t.storage_offset() or \
            storage.nbytes() != t.numel() * t.element_size():
        raise Unreplayable("an output that is neither a fresh torch.empty nor in a block")
    if t.dtype == torch.uint8 and t.dim() == 1 and storage.data_ptr():
        blocks[storage.data_ptr()] = len(slots)
    return (tuple(t.shape), t.dtype, t.device)


def record(mod, args: tuple, outputs: list, launches: Launches, result, *, order,
           current_stream, guards=(), error_word_addr: int = 0):
    """A Plan replaying this call, or None. args: the fast entry's positional arguments (what
    the Plan compares: tensors by dtype / shape / strides / alignment / device, ints by type and
    value, tuples item by item, None); outputs: the tensors the call allocated with torch.empty,
    in order, or tensors in such a uint8 block listed before them (ops/outputs.carve's parts and
    the views of them it returns); guards: (dict, key, value) that must still hold (state the
    call's decisions read); order: the Buffer's StreamOrder; current_stream(): the current
    stream's raw handle."""
    if mod is None:
        return None
    try:
        slots: dict = {}
        order_list: list = []
        specs = tuple(_arg_spec(a, slots, order_list) for a in args)
        out_specs, blocks = [], {}
        for t in outputs:
            out_specs.append(_output_spec(t, slots, blocks))
            slots[id(t)] = len(order_list)
            order_list.append(t)
        if len(order_list) > MAX_SLOTS:
            raise Unreplayable(f"{len(order_list)} tensors")
        rows = []
        for kernel, grid, block, smem, data, struct_type, fields in launches.items:
            patches = []
            for name, t in fields.items():
                if t is None or isinstance(t, int):
                    continue                 # recorded in the struct as it is
                if id(t) not in slots:
                    raise Unreplayable(f"field {name}: a tensor neither argument nor output")
                patches.append((getattr(struct_type, name).offset, slots[id(t)]))
            rows.append((int(kernel.handle), grid, block, smem, data, tuple(patches), kernel.name))
        template = _result_template(result, slots)
    except Unreplayable:
        return None
    return mod.Plan(specs, tuple(out_specs), tuple(rows), tuple(guards), order, current_stream,
                    error_word_addr, tuple((n, os.environ.get(n)) for n in PER_CALL_ENV),
                    template, len(order_list))
