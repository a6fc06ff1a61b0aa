"""Ranks that share a GPU: can every rank's kernels be resident at once?

epgen's kernels wait for their peers' kernels (a receiver spins until a sender's data lands),
so the ranks on one GPU must run at the same time. Time-slicing (no MPS) guarantees that: the
GPU switches between the processes. Under MPS the clients' kernels share the SMs, and only the
clients' active-thread percentages summing to at most 100 keeps one rank's full-GPU kernel from
leaving no SM for the peer it waits for (NVSHMEM, too, supports several PEs on one GPU under
MPS only within that sum). Such a setting is refused at Buffer creation with the numbers,
instead of running into the deadline.
"""
from __future__ import annotations

import dataclasses
import os

MPS_PERCENT_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"


@dataclasses.dataclass(frozen=True)
class GpuShare:
    """What one rank sees of its GPU."""
    rank: int
    uuid: str
    mps: bool                 # the context is an MPS client
    thread_percentage: int    # its MPS active-thread limit (100 when none is set)
    sms: int                  # SMs its kernels may use (the MPS limit applied)


def _mps_enabled(device_index: int) -> bool:
    from cuda.bindings import driver
    attr = getattr(driver.CUdevice_attribute, "CU_DEVICE_ATTRIBUTE_MPS_ENABLED", None)
    if attr is None:          # a driver binding older than CUDA 12.4: look for a client pipe
        return bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")) or os.path.exists(
            "/tmp/nvidia-mps/control")
    err, value = driver.cuDeviceGetAttribute(attr, device_index)
    return err == driver.CUresult.CUDA_SUCCESS and bool(value)


def _thread_percentage() -> int:
    raw = os.environ.get(MPS_PERCENT_ENV, "").strip()
    if not raw:
        return 100
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{MPS_PERCENT_ENV}={raw!r}: must be a number in (0, 100]") from None
    if not 0 < value <= 100:
        raise ValueError(f"{MPS_PERCENT_ENV}={raw!r}: must be a number in (0, 100]")
    return int(value)


def local_share(rank: int, device) -> GpuShare:
    import torch
    props = torch.cuda.get_device_properties(device)
    return GpuShare(rank=rank, uuid=str(props.uuid), mps=_mps_enabled(device.index),
                    thread_percentage=_thread_percentage(), sms=props.multi_processor_count)


def check_co_residency(shares: list[GpuShare]) -> None:
    """Raise ValueError naming the numbers when ranks share a GPU under MPS with thread
    percentages summing above 100 (their kernels cannot all be resident at once)."""
    for uuid, group in _by_gpu(shares).items():
        if len(group) < 2 or not any(s.mps for s in group):
            continue
        total = sum(s.thread_percentage for s in group)
        if total > 100:
            ranks = [s.rank for s in group]
            pct = [s.thread_percentage for s in group]
            raise ValueError(
                f"ranks {ranks} share GPU {uuid} under MPS with active-thread percentages "
                f"{pct} (sum {total} > 100): their kernels cannot all be resident at once, and a "
                f"kernel waiting for a peer that cannot start would run into the deadline; set "
                f"{MPS_PERCENT_ENV}={100 // len(group)} (or less) for each of these ranks, or run "
                f"without MPS (time-sliced)")


def gather_shares(group, rank: int, device) -> list[GpuShare]:
    """Every rank's GpuShare (collective over `group`)."""
    import torch.distributed as dist
    mine = local_share(rank, device)
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, dataclasses.asdict(mine), group=group)
    return [GpuShare(**d) for d in out]


def kernels_overlap_on_a_gpu(shares: list[GpuShare]) -> bool:
    """Whether two ranks' kernels may run on one GPU at the same time (ranks sharing it under
    MPS). Then a grid is not kept resident: a peer's waiting blocks can hold the SMs of this
    rank's late blocks. One rank per GPU, or ranks time-slicing one, always run a grid whole."""
    return any(len(g) > 1 and any(s.mps for s in g) for g in _by_gpu(shares).values())


def _by_gpu(shares: list[GpuShare]) -> dict[str, list[GpuShare]]:
    by_gpu: dict[str, list[GpuShare]] = {}
    for s in shares:
        by_gpu.setdefault(s.uuid, []).append(s)
    return by_gpu


def doctor_report(gpus: int) -> tuple[bool, str]:
    """(ok, text) for `epgen doctor`: whether the local ranks (LOCAL_WORLD_SIZE) will share
    GPUs, and under what (MPS and its limit, or time-slicing)."""
    raw = os.environ.get("LOCAL_WORLD_SIZE", "")
    local = int(raw) if raw.isdigit() and int(raw) > 0 else None
    if gpus < 1:
        return True, "no GPU visible"
    if local is None or local <= gpus:
        return True, (f"{local} local ranks on {gpus} GPU(s): one GPU per rank" if local else
                      f"one rank per GPU unless LOCAL_WORLD_SIZE exceeds {gpus}")
    per_gpu = -(-local // gpus)
    mps = _mps_enabled(0)
    try:
        pct = _thread_percentage()
    except ValueError as exc:
        return False, str(exc)
    if not mps:
        return True, (f"{local} local ranks share {gpus} GPU(s), {per_gpu} per GPU, time-sliced "
                      "(no MPS daemon for this process): correct, slower")
    ok = pct * per_gpu <= 100
    text = (f"{local} local ranks share {gpus} GPU(s), {per_gpu} per GPU, under MPS with "
            f"{MPS_PERCENT_ENV}={pct}")
    return ok, text + ("" if ok else f": {per_gpu} x {pct} > 100, set {MPS_PERCENT_ENV}="
                       f"{100 // per_gpu} for each rank (Buffer creation refuses this setting)")
