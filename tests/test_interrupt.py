"""precompile under interruption, with real processes and signals: Ctrl-C stops it within
seconds with a summary, a worker killed (as the OOM killer does) fails only its own kernel,
workers die with their parent, and a kill during PCH creation leaves nothing gc keeps."""
import os
import select
import signal
import subprocess
import time

import pytest

from sandbox import env, epgen_argv, SRC

def spec_text(n: int) -> str:
    return "kernels:\n" + "".join(
        f"  - {{family: normal_combine, hidden: {1024 + 16 * i}, num_topk: 4, num_ranks: 2}}\n"
        for i in range(n))


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def workers_of(pid: int) -> list[int]:
    out = []
    for c in children(pid):
        try:
            if b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read():
                out.append(c)
        except OSError:
            pass
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def started(tmp_path):
    """start() runs `epgen precompile` of a few kernels; every process it made is killed at the
    end, whatever the test did."""
    spec = tmp_path / "spec.yaml"
    procs, seen = [], set()

    def start(jobs=2, kernels=8, **extra):
        spec.write_text(spec_text(kernels))
        p = subprocess.Popen(epgen_argv("--cache-dir", str(tmp_path / "cache"), "precompile",
                                        "--spec", str(spec), "--arch", "sm_90", "--jobs",
                                        str(jobs)), stderr=subprocess.PIPE, bufsize=0,
                             env=env(**extra), cwd=SRC, start_new_session=True)
        procs.append(p)
        return p

    def track(pids):
        seen.update(pids)
        return pids

    yield start, track, str(tmp_path / "cache")
    for pid in seen:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)


def read_until(p, needle: str, timeout_s: float = 120) -> str:
    """stderr up to `needle`; fails (never hangs) when it does not come in time."""
    out, deadline = b"", time.monotonic() + timeout_s
    while needle.encode() not in out:
        ready, _, _ = select.select([p.stderr], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(p.stderr.fileno(), 65536) if ready else b""
        assert chunk, f"no {needle!r} within {timeout_s}s in: {out.decode()}"
        out += chunk
    return out.decode()


def finish(p, timeout_s: float) -> str:
    """The rest of stderr once p exits; fails (never hangs) when it does not exit in time."""
    try:
        _, err = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout_s}s") from None
    return err.decode()


@pytest.mark.parametrize("jobs", [1, 2])
def test_ctrl_c_stops_within_seconds_with_a_summary(started, jobs):
    start, track, _ = started
    p = start(jobs, EPGEN_PCH="0")              # the slowest compiles: ~3 s each
    read_until(p, "1/8")
    workers = track(workers_of(p.pid))
    assert workers, "no worker processes"
    t0 = time.monotonic()
    os.killpg(p.pid, signal.SIGINT)             # what a terminal's Ctrl-C sends
    rest = finish(p, 20)
    took = time.monotonic() - t0
    assert took < 3.0, f"took {took:.1f}s to stop"
    assert p.returncode == 130 and "interrupted:" in rest and "not built" in rest, rest
    assert "Traceback" not in rest, rest
    assert not [w for w in workers if alive(w)], "workers outlived the interrupt"


def test_a_killed_worker_fails_only_its_kernel(started):
    start, track, _ = started
    p = start(kernels=4)
    victim = wait_for(lambda: workers_of(p.pid), 60, "a worker")[0]
    track([victim])
    os.kill(victim, signal.SIGKILL)            # what the OOM killer does
    err = finish(p, 300)
    assert p.returncode == 1, err
    assert "killed by SIGKILL" in err and "out of memory?" in err, err
    assert "3 compiled, 0 cached, 1 failed" in err, err
    assert "Traceback" not in err, err


def test_workers_die_with_their_parent(started):
    start, track, _ = started
    p = start()
    workers = track(wait_for(lambda: len(workers_of(p.pid)) == 2 and workers_of(p.pid), 60,
                             "two workers"))
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    wait_for(lambda: not [w for w in workers if alive(w)], 3.0,
             f"workers {workers} to die with their parent")


def test_a_kill_during_pch_creation_leaves_nothing_gc_keeps(started):
    start, _, cache = started
    p = start(jobs=1)
    pch_dir = os.path.join(cache, ".pch")
    wait_for(lambda: os.path.isdir(pch_dir) and any(n.endswith(".pch") for n in
                                                     os.listdir(pch_dir)), 60, "a PCH file")
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    assert os.listdir(pch_dir), "the kill left no file: nothing to check"
    r = subprocess.run(epgen_argv("--cache-dir", cache, "cache", "gc"), capture_output=True,
                       text=True, env=env(), cwd=SRC, timeout=120)
    assert r.returncode == 0 and "removed .pch/" in r.stdout, r.stdout + r.stderr
    assert os.listdir(pch_dir) == []
    for sub in (".tmp", ".trash"):
        d = os.path.join(cache, sub)
        assert not os.path.isdir(d) or os.listdir(d) == [], (sub, os.listdir(d))
