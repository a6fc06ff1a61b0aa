"""Worker processes for `epgen precompile`: one task at a time each, so that a worker that dies
(the OOM killer, a crash in NVRTC) fails exactly the kernel it was building and the others go on.

concurrent.futures' pool cannot do that (one dead worker breaks every pending future), and its
workers outlive a parent killed with SIGKILL; these ask the kernel to kill them with their parent
(PR_SET_PDEATHSIG) and leave Ctrl-C to the parent, which stops them at once.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection as mpc
import os
import signal
from typing import Callable

PR_SET_PDEATHSIG = 1


class WorkerDied(RuntimeError):
    """The worker process running a task ended without answering."""


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):    # not Linux: workers are still killed on Ctrl-C/exit
        pass
    if os.getppid() != parent_pid:        # the parent died before prctl took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle


def _worker_main(conn, fn, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        i, args = task
        conn.send((i, fn(*args)))


def describe_death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        sig = -exitcode
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" \
            if sig == signal.SIGKILL else ""
        return f"the worker process was killed by {name}{hint}"
    return f"the worker process exited with status {exitcode} without a result"


def run(fn: Callable, tasks: list[tuple], jobs: int, on_result: Callable[[int, object], None]):
    """Call fn(*tasks[i]) in `jobs` spawned processes; on_result(i, value) as each finishes,
    with a WorkerDied as the value where the worker died. Workers are killed on the way out
    (KeyboardInterrupt included: it propagates once they are gone)."""
    ctx = multiprocessing.get_context("spawn")
    queue = list(range(len(tasks)))
    queue.reverse()                                  # pop() from the end: submission order
    workers: dict = {}                               # conn -> [process, task index or None]

    def assign(conn) -> None:
        task = None
        if queue:
            i = queue.pop()
            workers[conn][1] = i
            task = (i, tasks[i])
        else:
            workers[conn][1] = None
        try:
            conn.send(task)
        except OSError:     # it died already: its sentinel reports that (with its task) below
            pass

    def start() -> None:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker_main, args=(child, fn, os.getpid()), daemon=True)
        p.start()
        child.close()
        workers[parent] = [p, None]
        assign(parent)

    try:
        for _ in range(min(jobs, len(tasks))):
            start()
        while any(t is not None for _, t in workers.values()):
            busy = [c for c, (_, t) in workers.items() if t is not None]
            ready = set(mpc.wait(busy + [workers[c][0].sentinel for c in busy]))
            for conn in busy:
                p, i = workers[conn]
                if conn not in ready and p.sentinel not in ready:
                    continue
                try:
                    got, value = conn.recv()
                except (EOFError, OSError):          # died mid-task
                    p.join()
                    del workers[conn]
                    conn.close()
                    on_result(i, WorkerDied(describe_death(p.exitcode)))
                    if queue:
                        start()
                    continue
                on_result(got, value)
                assign(conn)
    finally:
        for conn, (p, _) in workers.items():
            if p.is_alive():
                p.kill()
            p.join()
            conn.close()
