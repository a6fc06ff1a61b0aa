"""NVSHMEM host library (ctypes on the wheel's libnvshmem_host.so.3, the copy torch loads).

Initialised once per process over torch.distributed's WORLD by unique-id broadcast; an
NVSHMEM that is already initialised in the process (torch's symmetric memory, say) is
detected and reused. Symmetric allocations are collective over WORLD: every rank allocates
the same sizes in the same order.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import socket
import struct
import threading
import time
import warnings

from ..jit import toolchain
from . import netif

# Must be in place before NVSHMEM (or NCCL) loads: multicast objects can take the shared GPUs
# down, so these are forced, not defaulted.
FORCED_ENV = {
    "NVSHMEM_DISABLE_NVLS": "1",
    "NVSHMEM_DISABLE_NVLS_SHARING": "1",
    "NVSHMEM_DISABLE_MNNVL": "1",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
}
DEFAULT_ENV = {
    "NVSHMEM_DISABLE_NCCL": "1",
}
BOOTSTRAP_IFNAME = "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME"
BOOTSTRAP_FAMILY = "NVSHMEM_BOOTSTRAP_UID_SOCK_FAMILY"

INIT_WITH_UNIQUEID = 1 << 3
STATUS_IS_INITIALIZED = 2
UID_BYTES, ATTR_BYTES, ARGS_BYTES, UID_ARGS_BYTES = 128, 144, 128, 24
_GRANULE = 512 << 20


def apply_environment(heap_bytes: int, multi_node: bool) -> None:
    for k, v in FORCED_ENV.items():
        os.environ[k] = v
    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    if BOOTSTRAP_IFNAME not in os.environ:
        ifname, family = bootstrap_interface(multi_node, os.environ.get("MASTER_ADDR"))
        if ifname is not None:
            os.environ[BOOTSTRAP_IFNAME] = ifname
            if family == socket.AF_INET6:
                os.environ.setdefault(BOOTSTRAP_FAMILY, "AF_INET6")
    if not multi_node:
        os.environ.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")   # NVLink P2P only
    if "NVSHMEM_SYMMETRIC_SIZE" not in os.environ:
        size = max(1 << 30, -(-int(heap_bytes * 1.05 + (256 << 20)) // _GRANULE) * _GRANULE)
        os.environ["NVSHMEM_SYMMETRIC_SIZE"] = str(size)


def bootstrap_interface(multi_node: bool, master_addr: str | None):
    """(interface, address family) for NVSHMEM's bootstrap socket, or (None, None) to leave
    NVSHMEM's own choice: loopback on one host (or when MASTER_ADDR is a loopback address),
    across hosts the interface that routes to MASTER_ADDR, where every rank's torch.distributed
    rendezvous already connects."""
    if not multi_node or (master_addr and netif.is_loopback(master_addr)):
        try:
            return netif.interface_to("127.0.0.1")[0], socket.AF_INET
        except OSError:
            return "lo", socket.AF_INET
    if not master_addr:
        return None, None
    try:
        return netif.interface_to(master_addr)
    except OSError as e:
        warnings.warn(f"epgen: no interface found that routes to MASTER_ADDR={master_addr!r} "
                      f"({e}); NVSHMEM picks its bootstrap interface itself (set "
                      f"{BOOTSTRAP_IFNAME} to choose)", RuntimeWarning, stacklevel=3)
        return None, None


class NvshmemError(RuntimeError):
    pass


class NvshmemHost:
    _SIGNATURES = {
        "nvshmemx_vendor_get_version_info": (None, [ctypes.POINTER(ctypes.c_int)] * 3),
        "nvshmemx_get_uniqueid": (ctypes.c_int, [ctypes.c_void_p]),
        "nvshmemx_set_attr_uniqueid_args": (ctypes.c_int, [ctypes.c_int, ctypes.c_int,
                                                           ctypes.c_void_p, ctypes.c_void_p]),
        "nvshmemx_hostlib_init_attr": (ctypes.c_int, [ctypes.c_uint, ctypes.c_void_p]),
        "nvshmemx_hostlib_finalize": (None, []),
        "nvshmemx_init_status": (ctypes.c_int, []),
        "nvshmem_my_pe": (ctypes.c_int, []),
        "nvshmem_n_pes": (ctypes.c_int, []),
        "nvshmem_malloc": (ctypes.c_void_p, [ctypes.c_size_t]),
        "nvshmem_free": (None, [ctypes.c_void_p]),
        "nvshmem_ptr": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int]),
        "nvshmemx_cumodule_init": (ctypes.c_int, [ctypes.c_void_p]),
        "nvshmem_barrier_all": (None, []),
    }

    def __init__(self):
        path = toolchain.nvshmem_host_library()
        self.path = path
        self.lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        for name, (res, argtypes) in self._SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.restype, fn.argtypes = res, argtypes
        self.owned = False        # True when epgen initialised NVSHMEM (and so finalises it)
        self.init_seconds = 0.0   # the bootstrap's wall time (launch.run_ranks reports it)
        self.stuck: str | None = None   # why no collective may be called any more
        self._uid = self._attr = None

    def version(self) -> tuple[int, int, int]:
        a, b, c = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        self.lib.nvshmemx_vendor_get_version_info(ctypes.byref(a), ctypes.byref(b), ctypes.byref(c))
        return a.value, b.value, c.value

    def initialized(self) -> bool:
        return self.lib.nvshmemx_init_status() >= STATUS_IS_INITIALIZED

    def init_over_world(self) -> None:
        """Unique-id bootstrap over torch.distributed WORLD (all ranks call this)."""
        import torch.distributed as dist
        rank, world = dist.get_rank(), dist.get_world_size()
        uid = [None]
        if rank == 0:
            buf = ctypes.create_string_buffer(UID_BYTES)
            struct.pack_into("<i", buf, 0, (1 << 16) + UID_BYTES)
            rc = self.lib.nvshmemx_get_uniqueid(buf)
            if rc != 0:
                raise NvshmemError(f"nvshmemx_get_uniqueid returned {rc}")
            uid = [buf.raw]
        dist.broadcast_object_list(uid, src=0)
        self._uid = ctypes.create_string_buffer(uid[0], UID_BYTES)   # must outlive init
        attr = ctypes.create_string_buffer(ATTR_BYTES)
        struct.pack_into("<i", attr, 0, (1 << 16) + ATTR_BYTES)
        struct.pack_into("<i", attr, 16, (1 << 16) + ARGS_BYTES)
        struct.pack_into("<i", attr, 24, (1 << 16) + UID_ARGS_BYTES)
        rc = self.lib.nvshmemx_set_attr_uniqueid_args(rank, world, self._uid, attr)
        if rc != 0:
            raise NvshmemError(f"nvshmemx_set_attr_uniqueid_args returned {rc}")
        self._attr = attr
        rc = self.lib.nvshmemx_hostlib_init_attr(INIT_WITH_UNIQUEID, attr)
        if rc != 0:
            raise NvshmemError(f"nvshmemx_hostlib_init_attr returned {rc} on rank {rank}")
        if self.lib.nvshmem_n_pes() != world:
            raise NvshmemError(f"NVSHMEM has {self.lib.nvshmem_n_pes()} PEs, WORLD has {world}")
        self.owned = True

    def check_world_mapping(self) -> None:
        """An NVSHMEM initialised by someone else must number PEs as WORLD ranks: epgen maps a
        group's ranks to PEs through their WORLD rank."""
        import torch.distributed as dist
        rank, world = dist.get_rank(), dist.get_world_size()
        if self.n_pes() != world or self.my_pe() != rank:
            raise NvshmemError(
                f"NVSHMEM was initialised before epgen as PE {self.my_pe()} of {self.n_pes()}, "
                f"but this process is rank {rank} of {world} in WORLD; epgen needs PE == WORLD "
                "rank (initialise NVSHMEM over all of WORLD in rank order, or let epgen do it)")

    def my_pe(self) -> int:
        return self.lib.nvshmem_my_pe()

    def n_pes(self) -> int:
        return self.lib.nvshmem_n_pes()

    def malloc(self, nbytes: int) -> int:
        p = self.lib.nvshmem_malloc(max(nbytes, 16))
        if not p:
            raise NvshmemError(
                f"nvshmem_malloc({nbytes}) failed: the symmetric heap is too small; set "
                f"NVSHMEM_SYMMETRIC_SIZE (now {os.environ.get('NVSHMEM_SYMMETRIC_SIZE')}) "
                "before the first Buffer is created")
        return int(p)

    def free(self, ptr: int) -> None:
        self.lib.nvshmem_free(ctypes.c_void_p(ptr))

    def peer_ptr(self, ptr: int, pe: int) -> int:
        return int(self.lib.nvshmem_ptr(ctypes.c_void_p(ptr), pe) or 0)

    def module_init(self, module) -> None:
        rc = self.lib.nvshmemx_cumodule_init(ctypes.c_void_p(int(module)))
        if rc != 0:
            raise NvshmemError(f"nvshmemx_cumodule_init returned {rc}")

    def barrier_all(self) -> None:
        self.lib.nvshmem_barrier_all()

    def collective_within(self, fn, timeout_s: float, device) -> bool:
        """Run fn (collective NVSHMEM host calls: barrier, frees) on a helper thread, waiting
        at most timeout_s: a peer that never joins (it stopped, or its own calls failed)
        cannot hang the caller. True when fn completed; its exception is raised here. After
        one timeout the helper thread is still inside NVSHMEM, so this process makes no
        NVSHMEM collective call again (`stuck` says why; False at once)."""
        if self.stuck:
            return False
        box: dict = {}

        def run():
            try:
                import torch
                torch.cuda.set_device(device)      # a new thread starts on device 0
                fn()
                box["ok"] = True
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                box["exc"] = exc
        t = threading.Thread(target=run, daemon=True, name="epgen-nvshmem-collective")
        t.start()
        t.join(timeout_s)
        if "exc" in box:
            raise box["exc"]
        if not box.get("ok", False):
            self.stuck = f"a collective was given up after {timeout_s:g} s (a peer never joined)"
            return False
        return True

    def finalize(self, timeout_s: float = 20.0) -> None:
        """Finalise if epgen owns NVSHMEM; never hangs (a stuck peer leaves it skipped)."""
        if not self.owned or self.stuck:
            return
        self.owned = False
        t = threading.Thread(target=self.lib.nvshmemx_hostlib_finalize, daemon=True)
        t.start()
        t.join(timeout_s)


_host: NvshmemHost | None = None
_host_lock = threading.Lock()


def host(heap_bytes: int = 0, multi_node: bool = False) -> NvshmemHost:
    """The process's NVSHMEM, initialised over WORLD on first use (collective then)."""
    global _host
    with _host_lock:
        if _host is None:
            apply_environment(heap_bytes, multi_node)
            h = NvshmemHost()
            if not h.initialized():
                began = time.monotonic()
                h.init_over_world()
                h.init_seconds = time.monotonic() - began
                atexit.register(h.finalize)
            else:
                h.check_world_mapping()      # reused, and left to its owner to finalise
            _host = h
        return _host


def current() -> NvshmemHost | None:
    return _host


def check_usable_everywhere() -> None:
    """Collective over WORLD, before a Buffer's first NVSHMEM call: raise on every rank when
    NVSHMEM is unusable on any (a collective given up there leaves a thread inside NVSHMEM).
    Each rank only checking its own would leave its peers waiting for it in NVSHMEM's
    allocation, which has no deadline."""
    import torch.distributed as dist
    mine = _host.stuck if _host is not None else None
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    stuck = [(r, why) for r, why in enumerate(every) if why]
    if stuck:
        raise RuntimeError(
            "epgen.Buffer: NVSHMEM is unusable in WORLD rank(s) "
            f"{[r for r, _ in stuck]} ({stuck[0][1]}); no Buffer can be created on any rank: "
            "start fresh processes")
