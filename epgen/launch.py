"""Start N ranks on this host's GPUs and run one function on each (tests, benchmarks, examples).

Placement (`plan`):
- `per-gpu`: N GPUs or more: rank r on cuda:r, torch.distributed over NCCL.
- `mps`: fewer GPUs than ranks: rank r on cuda:(r % G), torch.distributed over gloo (NCCL
  refuses two ranks on one GPU), under a CUDA MPS daemon started for the run and stopped after
  it, each client limited to 100 // (ranks per GPU) percent of the SMs so that every rank's
  kernels are resident beside its peers' (a rank whose kernel fills the GPU would otherwise keep
  the peer it waits for from starting).
- `time-sliced`: ranks share GPUs as above but MPS could not start (or EPGEN_LAUNCH_MPS=0): the
  GPU time-slices between the ranks' processes. Correct, slower: device deadlines
  (`scaled_deadline`) and the run's own timeout are scaled by the ranks per GPU.

Ranks that share a GPU talk through its L2 and HBM, not NVLink: their times are kernel-overhead
floors for comparing epgen versions on one card, never NVLink figures (`Placement.shared_gpu`
goes into every benchmark record).

Nothing hangs: the parent waits at most the run's timeout, then kills the workers and reports
which ranks did not finish. Workers die with their parent.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import shutil
import socket
import subprocess
import tempfile
import time
import traceback

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1",
            "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
MODE_ENV = "EPGEN_LAUNCH_MODE"              # set in each worker: the placement's mode
RANKS_PER_GPU_ENV = "EPGEN_LAUNCH_RANKS_PER_GPU"


@dataclasses.dataclass(frozen=True)
class Placement:
    world: int
    gpus: int                 # GPUs used
    mode: str                 # "per-gpu" | "mps" | "time-sliced"

    @property
    def shared_gpu(self) -> bool:
        return self.mode != "per-gpu"

    @property
    def ranks_per_gpu(self) -> int:
        return -(-self.world // self.gpus)

    @property
    def backend(self) -> str:
        return "gloo" if self.shared_gpu else "nccl"

    @property
    def mps_thread_percentage(self) -> int | None:
        return 100 // self.ranks_per_gpu if self.mode == "mps" else None

    @property
    def slowdown(self) -> int:
        """How much longer waits may take than with a GPU per rank."""
        return self.ranks_per_gpu if self.shared_gpu else 1

    def describe(self) -> str:
        if not self.shared_gpu:
            return f"{self.world} ranks, one GPU each (NCCL)"
        how = (f"MPS, {self.mps_thread_percentage}% of the SMs per rank" if self.mode == "mps"
               else "time-sliced (no MPS)")
        return (f"{self.world} ranks sharing {self.gpus} GPU(s), {self.ranks_per_gpu} per GPU, "
                f"{how}, gloo; shared-GPU: correctness only, no NVLink, no speed")

    def record(self) -> dict:
        """The fields a benchmark record carries about where it ran."""
        return {"shared_gpu": self.shared_gpu, "placement": self.mode,
                "ranks_per_gpu": self.ranks_per_gpu, "gpus": self.gpus,
                "mps_thread_percentage": self.mps_thread_percentage}


def gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch or no driver: no GPUs
        return 0


def _mps_wanted() -> bool:
    raw = os.environ.get("EPGEN_LAUNCH_MPS", "1").strip().lower()
    if raw not in ("0", "1", "false", "true", "no", "yes"):
        raise ValueError(f"EPGEN_LAUNCH_MPS={raw!r}: must be 0 or 1")
    return raw in ("1", "true", "yes")


def plan(world: int, gpus: int | None = None, mps: bool | None = None) -> Placement:
    """Where `world` ranks run on this host. Raises ValueError naming the numbers when there is
    no GPU at all or `world` is not positive."""
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world={world!r}: must be a positive int")
    gpus = gpu_count() if gpus is None else gpus
    if gpus < 1:
        raise ValueError(f"world={world}: no CUDA GPU present")
    if gpus >= world:
        return Placement(world, world, "per-gpu")
    use_mps = (_mps_wanted() and MpsDaemon.available()) if mps is None else mps
    return Placement(world, gpus, "mps" if use_mps else "time-sliced")


def scaled_deadline(seconds: float) -> float:
    """A device-side deadline for a worker of this launch: `seconds` with a GPU per rank or
    under MPS (ranks run at once), times the ranks per GPU when the GPU time-slices."""
    if os.environ.get(MODE_ENV) == "time-sliced":
        return seconds * int(os.environ.get(RANKS_PER_GPU_ENV, "1"))
    return seconds


def worker_shares_gpu() -> bool:
    """In a worker started by run_ranks: whether its GPU is shared with other ranks."""
    return os.environ.get(MODE_ENV, "per-gpu") != "per-gpu"


class MpsDaemon:
    """An MPS control daemon of our own (private pipe and log folders), for one run."""

    CONTROL = "nvidia-cuda-mps-control"

    @classmethod
    def available(cls) -> bool:
        return shutil.which(cls.CONTROL) is not None

    PREFIX = "epgen-mps-"      # its folder in the temporary directory

    def __init__(self, root: str | None = None):
        """A new daemon's folders, or with `root` the folders of one a killed run left (to
        stop it: tests/gpu_suites.py)."""
        self.root = root or tempfile.mkdtemp(prefix=self.PREFIX)
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": os.path.join(self.root, "pipe"),
                    "CUDA_MPS_LOG_DIRECTORY": os.path.join(self.root, "log")}
        for d in self.env.values():
            os.makedirs(d, exist_ok=root is not None)

    def _control(self, *args, stdin=None, timeout=20.0) -> subprocess.CompletedProcess:
        return subprocess.run([self.CONTROL, *args], input=stdin, env={**os.environ, **self.env},
                              capture_output=True, text=True, timeout=timeout)

    def start(self) -> None:
        out = self._control("-d")
        if out.returncode != 0:
            self._cleanup()
            raise RuntimeError(f"{self.CONTROL} -d failed (exit {out.returncode}): "
                               f"{(out.stderr or out.stdout).strip()[:300]}")

    def stop(self) -> None:
        try:
            if self._control(stdin="quit\n").returncode != 0:
                raise OSError("no daemon answered")     # (gone already): nothing to wait for
            deadline = time.monotonic() + 20.0      # the daemon removes its pipe on exit
            while time.monotonic() < deadline and os.path.exists(
                    os.path.join(self.env["CUDA_MPS_PIPE_DIRECTORY"], "control")):
                time.sleep(0.1)
        except (OSError, subprocess.SubprocessError):
            pass
        self._cleanup()

    def log_tail(self, lines: int = 20) -> str:
        path = os.path.join(self.env["CUDA_MPS_LOG_DIRECTORY"], "control.log")
        try:
            with open(path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def _cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (kill -9 included)."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(rank, placement, port, env, fn, args, results):
    _die_with_parent()
    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(placement.world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(placement.world)})
    import torch
    import torch.distributed as dist
    try:
        device = rank % placement.gpus
        if torch.cuda.is_available():       # (a CPU-only host runs gloo workers: the tests)
            torch.cuda.set_device(device)
        if placement.backend == "nccl":
            dist.init_process_group("nccl", rank=rank, world_size=placement.world,
                                    device_id=torch.device("cuda", device))
        else:
            dist.init_process_group("gloo", rank=rank, world_size=placement.world)
        out = fn(rank, placement.world, *args)
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


FAIL_FAST_GRACE_S = 45.0


def run_ranks(world: int, fn, *args, timeout_s: float = 280.0,
              placement: Placement | None = None) -> list:
    """fn(rank, world, *args) on `world` ranks placed by `plan` (or `placement`); returns the
    per-rank results. Raises AssertionError with every failing rank's traceback, or naming the
    ranks that did not finish within timeout_s (scaled by the placement's slowdown), or within
    FAIL_FAST_GRACE_S of the first rank that failed."""
    import torch.multiprocessing as mp
    placement = placement or plan(world)
    timeout_s *= placement.slowdown
    env = {**SAFE_ENV, MODE_ENV: placement.mode, RANKS_PER_GPU_ENV: str(placement.ranks_per_gpu)}
    daemon = None
    if placement.mode == "mps":
        daemon = MpsDaemon()
        daemon.start()
        env.update(daemon.env)
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(placement.mps_thread_percentage)
    try:
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, placement, port, env, fn, args, results),
                             daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        got: dict[int, tuple] = {}
        failed = False
        while len(got) < world and time.monotonic() < deadline:
            try:
                rank, status, out = results.get(timeout=1.0)
                got[rank] = (status, out)
                failed = failed or status != "ok"
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
                failed = failed or any(p.exitcode not in (None, 0) for p in procs)
            if failed:
                # a rank raised or died: its peers get FAIL_FAST_GRACE_S to report (their
                # device waits end at EPGEN_TIMEOUT_S), not the whole timeout in a host wait
                # such as NVSHMEM's bootstrap, which has no deadline
                deadline = min(deadline, time.monotonic() + FAIL_FAST_GRACE_S * placement.slowdown)
        for p in procs:
            p.join(timeout=max(0.0, min(20.0, deadline - time.monotonic())))
            if p.is_alive():
                p.kill()
                p.join(timeout=10.0)
    finally:
        if daemon is not None:
            mps_log = daemon.log_tail()
            daemon.stop()
    missing = [r for r in range(world) if r not in got]
    errors = [f"rank {r}:\n{out}" for r, (s, out) in sorted(got.items()) if s != "ok"]
    if missing:
        why = (f"within {FAIL_FAST_GRACE_S * placement.slowdown:.0f}s of a rank's failure"
               if failed else f"within {timeout_s:.0f}s")
        errors.append(f"ranks {missing} did not finish {why} "
                      f"(killed; a hang or a crash) [{placement.describe()}]")
    if errors:
        if daemon is not None and mps_log:
            errors.append(f"MPS control log (last lines):\n{mps_log}")
        raise AssertionError(f"[{placement.describe()}]\n" + "\n".join(errors))
    return [got[r][1] for r in range(world)]
