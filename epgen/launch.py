"""Start N ranks on this host's GPUs and run functions on them (tests, benchmarks, examples):
`run_ranks` one function on fresh processes, `RankPool` a series of functions on the same ones.

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
import gc
import os
import queue
import shutil
import signal
import sys
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
    def cpu_threads_per_rank(self) -> int:
        """torch's CPU threads for each rank process: OMP_NUM_THREADS where the parent sets it,
        else the host's cores shared out. By default every process takes them all, so 8 ranks
        on a 16-core host ran 128 threads, and the tests' golden-model work (torch on the
        CPU, OpenMP threads spinning for each other) slowed with the rank count, far beyond
        the kernels' share of the GPU (bench/NOTES.md, session 11)."""
        mine = os.environ.get("OMP_NUM_THREADS", "").strip()
        return int(mine) if mine.isdigit() else max(1, (os.cpu_count() or 1) // self.world)

    @property
    def slowdown(self) -> int:
        """How much longer waits may take than with a GPU per rank."""
        return self.ranks_per_gpu if self.shared_gpu else 1

    def describe(self) -> str:
        threads = self.cpu_threads_per_rank
        if not self.shared_gpu:
            return f"{self.world} ranks, one GPU each (NCCL), {threads} CPU threads a rank"
        how = (f"MPS, {self.mps_thread_percentage}% of the SMs per rank" if self.mode == "mps"
               else "time-sliced (no MPS)")
        return (f"{self.world} ranks sharing {self.gpus} GPU(s), {self.ranks_per_gpu} per GPU, "
                f"{how}, gloo, {threads} CPU threads a rank; shared-GPU: correctness only, "
                "no NVLink, no speed")

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


def mps_wanted() -> bool:
    """EPGEN_LAUNCH_MPS (default 1): whether ranks sharing a GPU may run under MPS."""
    from . import env
    return env.flag("EPGEN_LAUNCH_MPS", True)


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
    use_mps = (mps_wanted() and MpsDaemon.available()) if mps is None else mps
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

    # Seconds stop() gives the `quit` client, then the daemon, before it kills the daemon: every
    # stop took 20.1 s on the device, both when it waited for the pipe and when it waited for
    # the pid file's process (bench/NOTES.md, sessions 12-13), i.e. one of the two 20 s waits
    # it had ran out each time. Every client is gone when stop() runs, so a kill loses nothing.
    QUIT_WAIT_S = 3.0

    def stop(self) -> None:
        # The `quit` client is not waited for: on the device it never returned (every stop
        # took exactly QUIT_WAIT_S, session 15), so stop() waits for the daemon's process
        # instead and returns as soon as it is gone.
        try:
            client = subprocess.Popen([self.CONTROL], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env={**os.environ, **self.env}, text=True)
        except OSError:
            client = None
        try:
            if client is not None:
                try:
                    client.stdin.write("quit\n")
                    client.stdin.close()
                except OSError:
                    pass
            deadline = time.monotonic() + self.QUIT_WAIT_S
            if self._pid() is None and client is not None:
                # no pid file (a daemon of an older layout, or a killed run's folders): the
                # client's answer is all there is to wait for
                try:
                    client.wait(timeout=self.QUIT_WAIT_S)
                except subprocess.TimeoutExpired:
                    pass
            while time.monotonic() < deadline and self._pid() is not None and self._running():
                time.sleep(0.02)
            if self._running():
                self._kill()
        finally:
            if client is not None and client.poll() is None:
                client.kill()
                client.wait()
        self._cleanup()

    def _pid(self) -> int | None:
        try:
            with open(os.path.join(self.env["CUDA_MPS_PIPE_DIRECTORY"],
                                   "nvidia-cuda-mps-control.pid")) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _kill(self) -> None:
        """SIGKILL the daemon of the pid file and its children (the MPS server it started)."""
        pid = self._pid()
        if pid is None:
            return
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                pids = [int(p) for p in f.read().split()] + [pid]
        except OSError:
            pids = [pid]
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass

    def _running(self) -> bool:
        """Whether the daemon still runs: the process of its pid file
        (nvidia-cuda-mps-control.pid) is there and not a zombie (a container's init may never
        reap it), or, without a pid file, its control pipe is there. The pipe outlives the
        daemon: waiting for it alone cost 20 s at every stop (bench/NOTES.md, session 12)."""
        pid = self._pid()
        if pid is None:
            return os.path.exists(os.path.join(self.env["CUDA_MPS_PIPE_DIRECTORY"], "control"))
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]   # after "(comm)": comm may hold spaces
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X")

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


def _worker(rank, placement, port, env, tasks, results):
    """A rank's process: set up once (device, process group), then run the tasks its queue
    brings, in order, until None. Each task runs with the environment as it was before it
    (a task's os.environ changes do not reach the next). The process ends after a task that
    failed, or that left NVSHMEM unusable (a collective given up): its pool starts afresh."""
    stamps = {"start": time.time()}      # wall clock: comparable with the parent's
    _die_with_parent()
    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(placement.world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(placement.world)})
    import torch
    import torch.distributed as dist
    stamps["imported"] = time.time()
    try:
        device = rank % placement.gpus
        if torch.cuda.is_available():       # (a CPU-only host runs gloo workers: the tests)
            torch.cuda.set_device(device)
        if placement.backend == "nccl":
            dist.init_process_group("nccl", rank=rank, world_size=placement.world,
                                    device_id=torch.device("cuda", device))
        else:
            dist.init_process_group("gloo", rank=rank, world_size=placement.world)
        stamps["group"] = time.time()
        while (task := tasks.get()) is not None:
            if task == ABANDON:
                _abandon_nvshmem()
                break
            task_id, fn, args = task
            saved_env, before = dict(os.environ), _runtime_clocks()
            stamps["began"] = time.time()
            try:
                out, status = fn(rank, placement.world, *args), "ok"
            except BaseException:  # noqa: BLE001 - every failure goes back to the parent
                out, status = traceback.format_exc(), "error"
            if status == "ok":
                gc.collect()   # Buffers the task dropped are freed (collectively) here, on every rank
            stamps["body"] = time.time()
            os.environ.clear()
            os.environ.update(saved_env)
            try:
                stamps.update(_runtime_spent(before))
            except Exception:  # noqa: BLE001 - timings are never worth a lost report
                pass
            ends = UNUSABLE if _nvshmem_unusable() else "failed" if status != "ok" else ""
            results.put((task_id, rank, status, out, stamps, ends))
            stamps = {}                     # set-up stamps go with the first task only
            if ends:
                break
    except BaseException:  # noqa: BLE001 - a set-up failure answers the first task
        results.put((0, rank, "error", traceback.format_exc(), stamps, True))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def _runtime_clocks() -> tuple[float, float]:
    """(NVSHMEM bootstrap seconds, module-load seconds) epgen's runtime has spent in this
    process so far; not imported here: a worker that never made a Buffer pays nothing."""
    nvshmem, module = (sys.modules.get(f"epgen.runtime.{m}") for m in ("nvshmem", "module"))
    host = nvshmem.current() if nvshmem is not None else None
    return (getattr(host, "init_seconds", 0.0), getattr(module, "load_seconds", 0.0))


def _runtime_spent(before: tuple[float, float]) -> dict:
    now = _runtime_clocks()
    return {key: now[i] - before[i] for i, key in enumerate(("nvshmem_init", "module_loads"))
            if now[i] > before[i]}


def _nvshmem_host():
    """This process's NVSHMEM host object, or None (not imported here: a worker that never
    made a Buffer has none)."""
    nvshmem = sys.modules.get("epgen.runtime.nvshmem")
    return nvshmem.current() if nvshmem is not None else None


def _nvshmem_unusable() -> bool:
    return getattr(_nvshmem_host(), "stuck", None) is not None


# A rank's result says why its process ends after the task: UNUSABLE when its NVSHMEM is
# stuck (a collective given up). The pool then sends the other ranks ABANDON instead of the
# end of their tasks: their NVSHMEM's finalize is collective with the stuck rank, which never
# joins, so each waited its 20 s out at exit (bench/NOTES.md, session 13); they skip it.
UNUSABLE = "nvshmem unusable"
ABANDON = "abandon"


def _abandon_nvshmem() -> None:
    """Mark this process's NVSHMEM as one no collective may be called on (its finalize is
    then skipped at exit): a peer's is stuck, so the world's is of no use."""
    host = _nvshmem_host()
    if host is not None and getattr(host, "stuck", None) is None:
        host.stuck = "a peer's NVSHMEM is unusable (the pool abandons this world)"


FAIL_FAST_GRACE_S = 45.0
EXIT_WAIT_S = 20.0       # for the ranks' processes to end after their last task


class RankPool:
    """`world` rank processes placed by `plan` (or `placement`), started once and given one
    function after another (`run`, with run_ranks' results and errors), so that a series of
    runs pays the start (MPS daemon, spawn, torch import, process group, NVSHMEM bootstrap,
    module loads) once. A run that fails ends the processes (killed when a rank did not answer:
    it may sit in a collective; else each ends on its own, within EXIT_WAIT_S); so does a run
    after which a rank's process ends (it left NVSHMEM unusable): all of them, before the run
    returns, and the MPS daemon with them: the next run starts new ones under a new daemon
    (under the kept one, new clients were refused, bench/NOTES.md session 16; a daemon's stop
    and start take well under a second). `close()` (or `with`) ends them and the daemon."""

    def __init__(self, world: int, placement: Placement | None = None,
                 env: dict | None = None):
        """`env`: variables every rank process gets on top of the parent's environment."""
        self.world = world
        self.placement = placement or plan(world)
        self.env = dict(env or {})
        self.procs: list = []
        self.daemon: MpsDaemon | None = None
        self._task = 0
        self._start_times: dict | None = None     # set by _start, taken by the next run

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _start(self) -> None:
        import torch.multiprocessing as mp
        p = self.placement
        times = {"begin": time.time()}
        env = {"OMP_NUM_THREADS": str(p.cpu_threads_per_rank), **self.env, **SAFE_ENV, MODE_ENV: p.mode,
               RANKS_PER_GPU_ENV: str(p.ranks_per_gpu)}
        if p.mode == "mps":
            if self.daemon is None:
                self.daemon = MpsDaemon()
                self.daemon.start()
            env.update(self.daemon.env)
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(p.mps_thread_percentage)
        times["spawn"] = time.time()
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(self.world)]
        port = _free_port()
        self.procs = [ctx.Process(target=_worker, daemon=True,
                                  args=(r, p, port, env, self.tasks[r], self.results))
                      for r in range(self.world)]
        for proc in self.procs:
            proc.start()
        self._start_times = times

    def run(self, fn, *args, timeout_s: float = 280.0, phases: dict | None = None) -> list:
        """fn(rank, world, *args) on every rank; the per-rank results. Raises AssertionError
        with every failing rank's traceback, or naming the ranks that did not finish within
        timeout_s (scaled by the placement's slowdown), or within FAIL_FAST_GRACE_S of the
        first rank that failed. `phases`, if given, gets where the wall time went (seconds;
        `describe_phases` prints it; the start's parts only for the run that paid it)."""
        p = self.placement
        if self.procs and any(not proc.is_alive() for proc in self.procs):
            self.close()
        if not self.procs:
            self._start()
        start_times, self._start_times = self._start_times, None
        timeout_s *= p.slowdown
        self._task += 1
        for q in self.tasks:
            q.put((self._task, fn, args))
        deadline = time.monotonic() + timeout_s
        got: dict[int, tuple] = {}
        stamps: dict[int, dict] = {}
        ending: dict[int, str] = {}       # ranks whose process ends after this task: why
        failed = False
        while len(got) < self.world and time.monotonic() < deadline:
            try:
                task, rank, status, out, stamp, ends = self.results.get(timeout=1.0)
            except queue.Empty:
                # a rank whose process is gone with nothing left in the queue never answers:
                # waiting out the grace for it (45 s times the slowdown: 6 min at 8 ranks on
                # one GPU) ran a device call out (bench/NOTES.md, session 12)
                gone = all(self.procs[r].exitcode is not None
                           for r in range(self.world) if r not in got)
                if gone and self.results.empty():
                    break
                failed = failed or any(proc.exitcode not in (None, 0) for proc in self.procs)
            else:
                if task not in (self._task, 0):
                    continue                  # (0: a rank whose set-up failed)
                got[rank], stamps[rank] = (status, out), stamp
                failed = failed or status != "ok"
                if ends:
                    ending[rank] = ends
            if failed:
                # a rank raised or died: its peers get FAIL_FAST_GRACE_S to report (their
                # device waits end at EPGEN_TIMEOUT_S), not the whole timeout in a host wait
                # such as NVSHMEM's bootstrap, which has no deadline
                deadline = min(deadline, time.monotonic() + FAIL_FAST_GRACE_S * p.slowdown)
        if phases is not None:
            phases.update(_phases(start_times, stamps))
        abandon = UNUSABLE in ending.values()     # a rank's NVSHMEM is stuck: the world's too
        missing = [r for r in range(self.world) if r not in got]
        errors = [f"rank {r}:\n{out}" for r, (s, out) in sorted(got.items()) if s != "ok"]
        if missing:
            why = (f"within {FAIL_FAST_GRACE_S * p.slowdown:.0f}s of a rank's failure"
                   if failed else f"within {timeout_s:.0f}s")
            errors.append(f"ranks {missing} did not finish {why} "
                          f"(killed; a hang or a crash) [{p.describe()}]")
        if errors:
            mps_log = self.daemon.log_tail() if self.daemon is not None else ""
            # every rank answered: they end on their own (NVSHMEM's finalize is collective;
            # killing some while the others sat in its barrier made those report an illegal
            # memory access, bench/NOTES.md, session 12); a rank that did not answer may sit
            # in a collective: kill them all
            self.close(phases, kill=bool(missing), abandon=abandon)
            if mps_log:
                errors.append(f"MPS control log (last lines):\n{mps_log}")
            raise AssertionError(f"[{p.describe()}]\n" + "\n".join(errors))
        if ending:
            # A rank left NVSHMEM unusable (its peers' NVSHMEM is then of no use either: a
            # world is started together): end them all now. Waiting to see its process gone
            # at the next run would race its exit, handing the next task to a dying rank.
            # The MPS daemon goes too: the abandoned processes' exit leaves its server tearing
            # down their contexts, and the next processes' first CUDA call failed "device busy
            # or unavailable" under it (faults' killed-rank test after the poisoned-output
            # one, 5b73a8d, bench/NOTES.md session 16).
            self.close(phases, abandon=abandon)
        return [got[r][1] for r in range(self.world)]

    def close(self, phases: dict | None = None, kill: bool = False,
              abandon: bool = False) -> None:
        """End the processes (each finishes its task first; `kill`: at once; `abandon`: each
        skips its NVSHMEM finalize, a peer's being stuck) and the MPS daemon; `phases` gets
        the seconds each took. Nothing to do when none run."""
        if not self.procs and self.daemon is None:
            return
        t0 = time.time()
        deadline = time.monotonic() + (0.0 if kill else EXIT_WAIT_S)
        for q in self.tasks if not kill else ():
            q.put(ABANDON if abandon else None)
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10.0)
        self.procs = []
        t1 = time.time()
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None
        if phases is not None:
            phases.update(exit=round(t1 - t0, 2), mps_stop=round(time.time() - t1, 2))


def run_ranks(world: int, fn, *args, timeout_s: float = 280.0,
              placement: Placement | None = None, phases: dict | None = None) -> list:
    """fn(rank, world, *args) on `world` fresh rank processes (RankPool.run's results and
    errors), ended after it. `phases`, if given, is filled with where the wall time went: where
    a GPU suite's fixed cost per run is, so the quick tier can be made to fit a device call."""
    began = time.time()
    pool = RankPool(world, placement)
    try:
        return pool.run(fn, *args, timeout_s=timeout_s, phases=phases)
    finally:
        pool.close(phases)
        if phases is not None:
            phases["total"] = round(time.time() - began, 2)


def _phases(start: dict | None, stamps: dict[int, dict]) -> dict:
    """Seconds per phase of a run: the start's (MPS daemon; the slowest rank's spawn to Python,
    torch import, process group), when this run paid it, then the slowest rank's task (fn's
    body, of which NVSHMEM's bootstrap and module loads)."""
    def slowest(a, b, base=None):
        vals = [s[b] - (s[a] if base is None else base) for s in stamps.values()
                if b in s and (base is not None or a in s)]
        return round(max(vals), 2) if vals else None

    out = {}
    if start is not None:
        out.update({"mps_start": round(start["spawn"] - start["begin"], 2),
                    "spawn": slowest(None, "start", base=start["spawn"]),
                    "import": slowest("start", "imported"),
                    "group": slowest("imported", "group")})
    out.update({"body": slowest("began", "body"),
                "of which nvshmem_init": _most(stamps, "nvshmem_init"),
                "of which module_loads": _most(stamps, "module_loads")})
    return out


def _most(stamps: dict[int, dict], key: str) -> float | None:
    vals = [s[key] for s in stamps.values() if key in s]
    return round(max(vals), 2) if vals else None


def describe_phases(phases: dict) -> str:
    return " | ".join(f"{k.replace('_', ' ')} {v:.1f}s" for k, v in phases.items()
                      if v is not None)
