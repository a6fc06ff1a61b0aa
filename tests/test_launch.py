"""CPU: where epgen.launch places ranks, and the co-residency rule for ranks sharing a GPU."""
from __future__ import annotations

import time

import pytest

from epgen import launch
from epgen.runtime.sharing import GpuShare, check_co_residency, kernels_overlap_on_a_gpu


def test_plan_one_gpu_per_rank_when_enough():
    p = launch.plan(4, gpus=8, mps=True)
    assert (p.mode, p.gpus, p.backend, p.shared_gpu, p.slowdown) == ("per-gpu", 4, "nccl", False, 1)
    assert p.record()["shared_gpu"] is False


@pytest.mark.parametrize("world,pct", [(2, 50), (4, 25), (8, 12)])
def test_plan_shares_one_gpu_under_mps(world, pct):
    p = launch.plan(world, gpus=1, mps=True)
    assert (p.mode, p.backend, p.ranks_per_gpu, p.mps_thread_percentage) == ("mps", "gloo", world, pct)
    assert p.record() == {"shared_gpu": True, "placement": "mps", "ranks_per_gpu": world,
                          "gpus": 1, "mps_thread_percentage": pct}
    assert "sharing 1 GPU" in p.describe() and f"{pct}%" in p.describe()


def test_plan_time_sliced_without_mps_scales_deadlines(monkeypatch):
    p = launch.plan(8, gpus=2, mps=False)
    assert (p.mode, p.ranks_per_gpu, p.slowdown, p.mps_thread_percentage) == ("time-sliced", 4, 4, None)
    monkeypatch.setenv(launch.MODE_ENV, "time-sliced")
    monkeypatch.setenv(launch.RANKS_PER_GPU_ENV, "4")
    assert launch.scaled_deadline(20) == 80
    monkeypatch.setenv(launch.MODE_ENV, "mps")
    assert launch.scaled_deadline(20) == 20


def test_plan_refuses_bad_input(monkeypatch):
    with pytest.raises(ValueError, match="no CUDA GPU"):
        launch.plan(2, gpus=0)
    with pytest.raises(ValueError, match="world=0"):
        launch.plan(0, gpus=1)
    monkeypatch.setenv("EPGEN_LAUNCH_MPS", "maybe")
    with pytest.raises(ValueError, match="EPGEN_LAUNCH_MPS='maybe'"):
        launch.plan(2, gpus=1)


def _shares(pcts, mps=True, uuid="GPU-0"):
    return [GpuShare(rank=r, uuid=uuid, mps=mps, thread_percentage=p, sms=132 * p // 100)
            for r, p in enumerate(pcts)]


def test_co_residency_accepts_limits_within_100_and_time_slicing():
    check_co_residency(_shares([12] * 8))
    check_co_residency(_shares([50, 50]))
    check_co_residency(_shares([100] * 8, mps=False))        # time-sliced: always progresses
    check_co_residency(_shares([100]))                        # alone on its GPU
    two_gpus = _shares([100, 100], uuid="A")[:1] + _shares([100, 100], uuid="B")[1:]
    check_co_residency(two_gpus)
    assert kernels_overlap_on_a_gpu(_shares([12] * 8))
    assert not kernels_overlap_on_a_gpu(two_gpus)                 # a GPU each
    assert not kernels_overlap_on_a_gpu(_shares([100] * 8, mps=False))   # time-sliced
    assert not kernels_overlap_on_a_gpu(_shares([100]))


def test_co_residency_refuses_mps_without_limits_naming_the_numbers():
    with pytest.raises(ValueError) as exc:
        check_co_residency(_shares([100] * 8))
    msg = str(exc.value)
    assert "ranks [0, 1, 2, 3, 4, 5, 6, 7]" in msg and "sum 800 > 100" in msg
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=12" in msg


def test_thread_percentage_env_checked(monkeypatch):
    from epgen.runtime import sharing
    monkeypatch.setenv(sharing.MPS_PERCENT_ENV, "25")
    assert sharing._thread_percentage() == 25
    monkeypatch.delenv(sharing.MPS_PERCENT_ENV)
    assert sharing._thread_percentage() == 100
    for bad in ("0", "150", "half"):
        monkeypatch.setenv(sharing.MPS_PERCENT_ENV, bad)
        with pytest.raises(ValueError, match="CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"):
            sharing._thread_percentage()


def test_doctor_report_says_when_local_ranks_share_a_gpu(monkeypatch):
    from epgen.runtime import sharing
    monkeypatch.setattr(sharing, "_mps_enabled", lambda index: False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    ok, text = sharing.doctor_report(1)
    assert ok and "4 local ranks share 1 GPU(s), 4 per GPU, time-sliced" in text
    monkeypatch.setattr(sharing, "_mps_enabled", lambda index: True)     # a fake MPS client
    monkeypatch.setenv(sharing.MPS_PERCENT_ENV, "50")
    ok, text = sharing.doctor_report(1)
    assert not ok and "4 x 50 > 100" in text and f"{sharing.MPS_PERCENT_ENV}=25" in text
    monkeypatch.setenv(sharing.MPS_PERCENT_ENV, "25")
    assert sharing.doctor_report(1)[0]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert sharing.doctor_report(2) == (True, "2 local ranks on 2 GPU(s): one GPU per rank")


def _fail_or_hang(rank, world):
    import time
    if rank == 0:
        raise RuntimeError("rank 0 fails on purpose")
    time.sleep(600)          # as a peer stuck in a host wait with no deadline would


def test_run_ranks_fails_fast_when_a_rank_fails(monkeypatch):
    """One rank raising ends the run FAIL_FAST_GRACE_S later, with its traceback, instead of
    waiting the whole timeout for a peer stuck in a host wait (NVSHMEM's bootstrap)."""
    import time
    monkeypatch.setattr(launch, "FAIL_FAST_GRACE_S", 2.0)
    t0 = time.monotonic()
    with pytest.raises(AssertionError) as err:
        launch.run_ranks(2, _fail_or_hang, timeout_s=300,
                         placement=launch.Placement(2, 1, "time-sliced"))
    took = time.monotonic() - t0
    msg = str(err.value)
    assert "rank 0 fails on purpose" in msg and "ranks [1] did not finish" in msg, msg
    assert "of a rank's failure" in msg, msg
    assert took < 120, f"took {took:.0f} s"


def _last_rank_killed(rank, world):
    import os
    import signal
    if rank == world - 1:
        os.kill(os.getpid(), signal.SIGKILL)     # as test_faults_gpu's killed rank
    return rank


def test_a_pool_stops_waiting_for_a_rank_whose_process_is_gone(monkeypatch):
    """The live ranks answer; the killed one never will: the run ends as soon as the queue is
    drained, not FAIL_FAST_GRACE_S (times the slowdown) later. At 8 ranks on one GPU that wait
    was 6 minutes and ran a device call out (bench/NOTES.md, session 12)."""
    import time
    monkeypatch.setattr(launch, "FAIL_FAST_GRACE_S", 300.0)
    t0 = time.monotonic()
    with launch.RankPool(3, launch.Placement(3, 1, "time-sliced")) as pool:
        with pytest.raises(AssertionError) as err:
            pool.run(_last_rank_killed, timeout_s=600)
    took = time.monotonic() - t0
    assert "ranks [2] did not finish" in str(err.value), err.value
    assert "Traceback" not in str(err.value), err.value
    assert took < 120, f"took {took:.0f} s"


def _sleep_then_answer(rank, world, seconds):
    import time
    time.sleep(seconds * (rank + 1))
    return rank * 10


def test_run_ranks_reports_where_the_time_went():
    """phases: the slowest rank's body (rank 1 sleeps 2 x 0.5 s) and the parent's spans, each
    a part of the total; what the GPU suites print as `[phases]` to find their fixed cost."""
    phases: dict = {}
    out = launch.run_ranks(2, _sleep_then_answer, 0.5, timeout_s=120,
                           placement=launch.Placement(2, 1, "time-sliced"), phases=phases)
    assert out == [0, 10]
    assert 1.0 <= phases["body"] < 30, phases
    assert phases["mps_start"] is not None and phases["mps_stop"] is not None
    for key in ("spawn", "import", "group", "exit"):
        assert 0 <= phases[key] <= phases["total"], (key, phases)
    assert phases["of which nvshmem_init"] is None      # no Buffer made: nothing timed
    text = launch.describe_phases(phases)
    assert text.startswith("mps start ") and "| body 1." in text and "nvshmem" not in text, text


def _pid_and_env(rank, world, set_env):
    import os
    seen = os.environ.get("EPGEN_POOL_PROBE")
    if set_env:
        os.environ["EPGEN_POOL_PROBE"] = "left by a task"
    return os.getpid(), seen


def _fail_on_rank_1(rank, world):
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    return "ok"


def test_a_pool_reuses_its_processes_and_starts_afresh_after_a_failure():
    """RankPool: a second run uses the same processes (no start phases), sees none of the
    first's environment changes; a failed run ends them (not killed: every rank answered, so
    each ends on its own, NVSHMEM's collective finalize included), and the next run starts new
    ones."""
    place = launch.Placement(2, 1, "time-sliced")
    with launch.RankPool(2, place) as pool:
        first_phases, second_phases = {}, {}
        first = pool.run(_pid_and_env, True, timeout_s=120, phases=first_phases)
        second = pool.run(_pid_and_env, False, timeout_s=120, phases=second_phases)
        assert [pid for pid, _ in first] == [pid for pid, _ in second]
        assert [seen for _, seen in second] == [None, None]
        assert "import" in first_phases and "import" not in second_phases, second_phases
        assert second_phases["body"] is not None
        procs = list(pool.procs)
        with pytest.raises(AssertionError, match="rank 1 fails on purpose"):
            pool.run(_fail_on_rank_1, timeout_s=120)
        assert pool.procs == []                     # ended after the failure,
        assert [p.exitcode for p in procs] == [0, 0]    # each on its own: every rank answered
        third = pool.run(_pid_and_env, False, timeout_s=120)
        assert {pid for pid, _ in third}.isdisjoint(pid for pid, _ in first)
    assert pool.procs == [] and pool.daemon is None


def _nvshmem_given_up_on_rank_1(rank, world):
    """A fake of what a collective given up leaves (`stuck` on the NVSHMEM host object): it
    cannot be produced without GPUs. The task itself succeeds, as test_faults_gpu's does."""
    import os
    import types
    from epgen.runtime import nvshmem
    if rank == 1:
        nvshmem._host = types.SimpleNamespace(stuck="a collective was given up (fake)")
    return os.getpid()


def test_a_pool_ends_every_rank_right_after_a_run_that_left_nvshmem_unusable():
    """The run succeeds, but rank 1's process ends after it: the pool ends rank 0's too before
    returning (the next task must not go to a rank that is exiting, nor to a rank whose peer
    world is gone), and the next run starts a whole new world."""
    with launch.RankPool(2, launch.Placement(2, 1, "time-sliced")) as pool:
        first = pool.run(_nvshmem_given_up_on_rank_1, timeout_s=120)
        assert pool.procs == []
        second = pool.run(_pid_and_env, False, timeout_s=120)
        assert {pid for pid, _ in second}.isdisjoint(first)


class _FakeMps:
    """FAKE of launch.MpsDaemon (the MPS control daemon needs a GPU): counts starts and stops."""
    started = stopped = 0
    env: dict = {}

    def start(self):
        type(self).started += 1

    def stop(self):
        type(self).stopped += 1

    def log_tail(self):
        return ""


def test_a_pool_restarts_its_mps_daemon_with_a_world_that_ended(monkeypatch):
    """Runs in one world share the MPS daemon; a run that succeeds but ends its world (a
    deadline fired on purpose: NVSHMEM given up) ends the daemon too, as a failed run does:
    under the kept daemon the next processes' first CUDA call failed "device busy or
    unavailable" (bench/NOTES.md, session 16)."""
    monkeypatch.setattr(launch, "MpsDaemon", _FakeMps)
    monkeypatch.setattr(_FakeMps, "started", 0)
    monkeypatch.setattr(_FakeMps, "stopped", 0)
    with launch.RankPool(2, launch.Placement(2, 1, "mps")) as pool:
        pool.run(_pid_and_env, False, timeout_s=120)
        pool.run(_pid_and_env, False, timeout_s=120)
        assert (_FakeMps.started, _FakeMps.stopped) == (1, 0)
        pool.run(_nvshmem_given_up_on_rank_1, timeout_s=120)
        assert pool.procs == [] and pool.daemon is None
        assert (_FakeMps.started, _FakeMps.stopped) == (1, 1)
        pool.run(_pid_and_env, False, timeout_s=120)
        assert (_FakeMps.started, _FakeMps.stopped) == (2, 1)
        with pytest.raises(AssertionError, match="rank 1 fails on purpose"):
            pool.run(_fail_on_rank_1, timeout_s=120)
        assert (_FakeMps.started, _FakeMps.stopped) == (2, 2) and pool.daemon is None
        pool.run(_pid_and_env, False, timeout_s=120)
        assert _FakeMps.started == 3
    assert _FakeMps.stopped == 3


def _collective_finalize_at_exit_and_rank_1_stuck(rank, world):
    """FAKES of a world whose rank 1 gave a collective up: rank 1's NVSHMEM host is `stuck`;
    rank 0's is healthy, and its exit runs a stand-in for NVSHMEM's collective finalize,
    which waits 60 s for the stuck peer unless the process was told to skip it (`stuck`)."""
    import atexit
    import os
    import time
    import types
    from epgen.runtime import nvshmem
    host = types.SimpleNamespace(stuck="a collective was given up (fake)" if rank == 1 else None)
    nvshmem._host = host

    def finalize():
        if host.stuck is None:
            time.sleep(60)
    atexit.register(finalize)
    return os.getpid()


def test_a_world_with_a_stuck_nvshmem_ends_without_waiting_in_finalize():
    """After a run that left rank 1's NVSHMEM stuck, the pool tells the other ranks to skip
    their (collective) finalize: every process ends at once, on its own, not after
    EXIT_WAIT_S and a kill (20 s at every such run on the device, bench/NOTES.md session 13)."""
    with launch.RankPool(2, launch.Placement(2, 1, "time-sliced")) as pool:
        pool.run(_pid_and_env, False, timeout_s=120)           # started
        procs = list(pool.procs)
        t0 = time.monotonic()
        pool.run(_collective_finalize_at_exit_and_rank_1_stuck, timeout_s=120)
        took = time.monotonic() - t0
        assert pool.procs == []
        assert [p.exitcode for p in procs] == [0, 0], [p.exitcode for p in procs]
        assert took < launch.EXIT_WAIT_S / 2, f"the run and its close took {took:.1f} s"


def _torch_threads(rank, world):
    import torch
    return torch.get_num_threads()


def test_rank_processes_share_the_hosts_cores_out(monkeypatch):
    """Each rank's torch gets cores // ranks CPU threads (not every core: 8 ranks on 16 cores
    ran 128 threads), unless OMP_NUM_THREADS is set, which then stands."""
    import os
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    place = launch.Placement(2, 1, "time-sliced")
    assert place.cpu_threads_per_rank == max(1, (os.cpu_count() or 1) // 2)
    assert launch.run_ranks(2, _torch_threads, timeout_s=120, placement=place) == \
        [place.cpu_threads_per_rank] * 2
    assert f"{place.cpu_threads_per_rank} CPU threads a rank" in place.describe()
    mine = str(place.cpu_threads_per_rank + 1)        # (torch takes at most the host's cores)
    monkeypatch.setenv("OMP_NUM_THREADS", mine)
    assert launch.run_ranks(2, _torch_threads, timeout_s=120, placement=place) == [int(mine)] * 2


def _env_of(rank, world, name):
    import os
    return os.environ.get(name)


def test_a_pool_gives_its_processes_its_env_and_leaves_the_parents_alone(monkeypatch):
    monkeypatch.delenv("EPGEN_POOL_PROBE", raising=False)
    with launch.RankPool(2, launch.Placement(2, 1, "time-sliced"),
                         env={"EPGEN_POOL_PROBE": "7 GiB"}) as pool:
        assert pool.run(_env_of, "EPGEN_POOL_PROBE", timeout_s=120) == ["7 GiB", "7 GiB"]
    import os
    assert "EPGEN_POOL_PROBE" not in os.environ
