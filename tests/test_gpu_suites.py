"""tests/gpu_suites.py, the one-call GPU suite runner, on fake modules (no GPU): module names,
the budget, pytest's summary, a module killed at its limit with its process group, the rest
skipped once the budget is spent; and MpsDaemon.stop() of a daemon that is gone."""
from __future__ import annotations

import json
import os
import textwrap
import time

import pytest

import gpu_suites
from epgen import launch

SUMMARIES = """\
tests/test_ll_combine_rank_gpu.py::test_ll_combine_per_rank[2] [placement] 2 ranks
FAILED

=========================== short test summary info ============================
FAILED tests/test_ll_combine_rank_gpu.py::test_ll_combine_per_rank[2] - Asser...
ERROR tests/test_x_gpu.py::test_y[2] - RuntimeError
==== 1 failed, 2 passed, 3 skipped, 1 error, 40 deselected in 72.95s (0:01:12) ====
"""


def test_parse_pytest_counts_and_first_failure():
    got = gpu_suites.parse_pytest(SUMMARIES)
    assert got == {"passed": 2, "failed": 2, "skipped": 3,
                   "first_failure": "FAILED tests/test_ll_combine_rank_gpu.py::"
                                    "test_ll_combine_per_rank[2] - Asser..."}
    one = "============================== 1 passed in 32.24s =============================="
    assert gpu_suites.parse_pytest(one) == {"passed": 1, "failed": 0, "skipped": 0,
                                            "first_failure": ""}
    assert gpu_suites.parse_pytest("killed before any summary")["passed"] == 0


def test_next_limit_is_the_smaller_of_module_and_budget_left():
    assert gpu_suites.next_limit(500, 120) == 120
    assert gpu_suites.next_limit(50, 120) == 50
    assert gpu_suites.next_limit(19, 120) is None          # below MIN_LIMIT_S: not started
    assert gpu_suites.next_limit(5, 120, floor=3) == 5


def test_module_names_in_every_form_and_unknown_refused(tmp_path):
    for n in ("b", "a", "zz"):
        (tmp_path / f"test_{n}_gpu.py").write_text("")
    d = str(tmp_path)
    paths = gpu_suites.module_paths(["a", "test_b_gpu", "tests/test_zz_gpu.py"], d)
    assert [os.path.basename(p) for p in paths] == ["test_a_gpu.py", "test_b_gpu.py",
                                                    "test_zz_gpu.py"]
    with pytest.raises(ValueError, match=r"'nope'.*known: a, b, zz"):
        gpu_suites.module_paths(["nope"], d)
    real = [os.path.basename(p) for p in gpu_suites.module_paths([])]
    assert real[:2] == ["test_runtime_gpu.py", "test_normal_gpu.py"] and len(real) == len(set(real))
    assert "test_faults_gpu.py" in real


def test_kernels_compiled_at_first_use_are_the_new_unlisted_ones(tmp_path):
    from epgen.jit import specs
    listed = specs.ll_barrier_spec(2)
    (tmp_path / "list.yaml").write_text(
        f"arch: sm_90\nkernels:\n  - {json.dumps(listed.to_json())}\n")
    cache = tmp_path / "cache"
    entries = {"old": (specs.ll_barrier_spec(4), 100.0), "listed": (listed, 2000.0),
               "new": (specs.layout_spec(2, 16, 4), 2000.0)}
    for name, (spec, created) in entries.items():
        (cache / name).mkdir(parents=True)
        (cache / name / "manifest.json").write_text(
            json.dumps({"spec": spec.to_json(), "created": created}))
    (cache / "torn").mkdir()
    (cache / "torn" / "manifest.json").write_text("{")      # an entry being written
    got = gpu_suites.compiled_during(str(cache), 1000.0, str(tmp_path / "list.yaml"))
    assert got == [json.dumps(specs.layout_spec(2, 16, 4).to_json(), sort_keys=True)]


def test_own_limits_parsed_and_bad_ones_refused():
    assert gpu_suites.split_limits(["faults:240", "normal"]) == (["faults", "normal"],
                                                                {"faults": 240.0})
    for bad in ("faults:x", "faults:0"):
        with pytest.raises(ValueError, match=f"'{bad}'"):
            gpu_suites.split_limits([bad])


FAKES = {
    "pass": "def test_ok():\n    print('ran ok')\n",
    "fail": "def test_bad():\n    assert 1 == 2, 'fails on purpose'\n\n\ndef test_ok():\n    pass\n",
    # a module that hangs, with a child process of its own (as the rank workers are)
    "hang": textwrap.dedent("""\
        import os, subprocess, time

        def test_hangs():
            child = subprocess.Popen(["sleep", "600"])
            with open(os.environ["HANG_PID_FILE"], "w") as f:
                f.write(str(child.pid))
            time.sleep(600)
        """),
    "later": "def test_never():\n    pass\n",
}


def _fakes(tmp_path):
    d = tmp_path / "fakes"
    d.mkdir()
    for name, body in FAKES.items():
        (d / f"test_{name}_gpu.py").write_text("import pytest\n\npytestmark = pytest.mark.gpu\n\n"
                                               + body)
    return str(d)


def _gone(pid, within_s=10.0):
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True                       # a zombie: killed, not yet reaped
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.1)
    return False


def test_runner_reports_each_module_and_keeps_to_the_budget(tmp_path, monkeypatch, capsys):
    fakes, out = _fakes(tmp_path), str(tmp_path / "out")
    common = ["--tier", "quick", "--ranks", "2", "--no-precompile", "--tests-dir", fakes,
              "--out", out]
    rc = gpu_suites.main(["--budget", "300", "--per-module", "60", "pass", "fail", *common])
    assert rc == 1
    table = capsys.readouterr().out.split("===== summary")[1]
    rows = {line.split()[0]: line.split(None, 6) for line in table.splitlines()[1:]
            if line.startswith("test_")}
    assert rows["test_pass_gpu.py"][1:2] + rows["test_pass_gpu.py"][3:6] == ["0", "1", "0", "0"]
    assert rows["test_fail_gpu.py"][1] == "1" and rows["test_fail_gpu.py"][3:5] == ["1", "1"]
    assert "test_bad" in rows["test_fail_gpu.py"][6]

    # the hanging module: SIGINT at its limit, then its whole group killed; no budget is left
    # for the next one, which is reported as not run
    pid_file = tmp_path / "hang.pid"
    monkeypatch.setenv("HANG_PID_FILE", str(pid_file))
    monkeypatch.setattr(gpu_suites, "MIN_LIMIT_S", 3.0)
    t0 = time.monotonic()
    # limit 10 s (pytest itself may take seconds to start on a loaded 2-core machine): killed
    # at 10, gone by 12 at most; then 15 - 10 - grace < MIN_LIMIT_S is left: not started
    rc = gpu_suites.main(["--budget", "15", "--per-module", "60", "--grace", "2",
                          "hang:10", "later", *common])
    took = time.monotonic() - t0
    assert rc == 1 and took < 16, f"took {took:.1f} s"
    assert pid_file.exists(), "the hanging test never started within its 10 s"
    assert _gone(int(pid_file.read_text())), "the hung module's child survived"
    summary = json.loads((tmp_path / "out" / "gpu_suites.json").read_text())
    hang, later = summary["modules"]
    assert hang["timed_out"] and hang["rc"] != 0 and hang["seconds"] < 13, hang
    assert later["rc"] is None, later
    text = capsys.readouterr().out
    assert "killed at its limit" in text and "not run: budget spent" in text
    log = (tmp_path / "out" / "gpu_suites.log").read_text()
    assert "ran ok" in log and "fails on purpose" in log          # both calls, appended


def test_mps_stop_of_a_daemon_that_is_gone_returns_at_once(tmp_path, monkeypatch):
    """A daemon a killed run left (its folders still there, no daemon answering): stop()
    removes the folders at once instead of waiting 20 s for the pipe to vanish."""
    monkeypatch.setattr(launch.MpsDaemon, "CONTROL", "false")   # a control that answers nothing
    root = tmp_path / "epgen-mps-left"
    (root / "pipe").mkdir(parents=True)
    (root / "pipe" / "control").write_text("")
    d = launch.MpsDaemon(str(root))
    assert d.root == str(root) and d.env["CUDA_MPS_PIPE_DIRECTORY"] == str(root / "pipe")
    t0 = time.monotonic()
    d.stop()
    assert time.monotonic() - t0 < 5 and not root.exists()


def test_mps_stop_returns_when_the_daemons_process_ends_though_its_pipe_stays(tmp_path,
                                                                             monkeypatch):
    """The real daemon leaves its control pipe behind when it quits, so stop() waits for the
    process its pid file names (a 20 s wait at every stop before). FAKES: a control that
    accepts `quit` (`true`) and, as the daemon, a `sleep 1` that this test never reaps (it
    ends a zombie, as under a container init that does not reap)."""
    import subprocess
    monkeypatch.setattr(launch.MpsDaemon, "CONTROL", "true")
    root = tmp_path / "epgen-mps-fake"
    (root / "pipe").mkdir(parents=True)
    (root / "pipe" / "control").write_text("")
    fake_daemon = subprocess.Popen(["sleep", "1"])
    (root / "pipe" / "nvidia-cuda-mps-control.pid").write_text(f"{fake_daemon.pid}\n")
    d = launch.MpsDaemon(str(root))
    assert d._running()
    t0 = time.monotonic()
    d.stop()
    took = time.monotonic() - t0
    assert 0.5 < took < 5, f"stop took {took:.1f} s"
    assert not root.exists()
    fake_daemon.wait()


def test_mps_stop_kills_a_daemon_that_does_not_quit(tmp_path, monkeypatch):
    """A daemon still running QUIT_WAIT_S after `quit` is killed (every stop took 20 s on the
    device, waiting). FAKES: a control that accepts `quit` (`true`) and, as the daemon, a
    `sleep 60` that never quits."""
    import subprocess
    monkeypatch.setattr(launch.MpsDaemon, "CONTROL", "true")
    monkeypatch.setattr(launch.MpsDaemon, "QUIT_WAIT_S", 0.5)
    root = tmp_path / "epgen-mps-stuck"
    (root / "pipe").mkdir(parents=True)
    fake_daemon = subprocess.Popen(["sleep", "60"])
    (root / "pipe" / "nvidia-cuda-mps-control.pid").write_text(f"{fake_daemon.pid}\n")
    t0 = time.monotonic()
    launch.MpsDaemon(str(root)).stop()
    took = time.monotonic() - t0
    assert took < 3, f"stop took {took:.1f} s"
    assert fake_daemon.wait(timeout=5) == -9 and not root.exists()


def test_pooled_modules_run_in_one_pytest_and_are_reported_each(tmp_path, capsys):
    """--pool: one pytest over the modules, with EPGEN_TEST_POOL=1 set for it (the fake
    module checks), and a row per module from the shared run's summary."""
    fakes, out = _fakes(tmp_path), str(tmp_path / "out")
    (tmp_path / "fakes" / "test_poolenv_gpu.py").write_text(
        "import os\n\nimport pytest\n\npytestmark = pytest.mark.gpu\n\n\n"
        "def test_pool_env():\n    assert os.environ['EPGEN_TEST_POOL'] == '1'\n")
    rc = gpu_suites.main(["--budget", "300", "--per-module", "60", "--pool", "--tier", "quick",
                          "--ranks", "2", "--no-precompile", "--tests-dir", fakes, "--out", out,
                          "pass", "fail", "poolenv"])
    assert rc == 1
    text = capsys.readouterr().out
    assert "3 modules in one pytest" in text, text
    rows = {m["module"]: m for m in json.loads((tmp_path / "out" / "gpu_suites.json")
                                                .read_text())["modules"]}
    assert (rows["test_pass_gpu.py"]["rc"], rows["test_pass_gpu.py"]["passed"]) == (0, 1)
    assert (rows["test_poolenv_gpu.py"]["rc"], rows["test_poolenv_gpu.py"]["passed"]) == (0, 1)
    fail = rows["test_fail_gpu.py"]
    assert (fail["passed"], fail["failed"]) == (1, 1) and fail["rc"] != 0, fail
    assert "test_bad" in fail["first_failure"], fail


def test_a_killed_pool_reports_the_modules_it_cut_off(tmp_path, monkeypatch, capsys):
    """A module whose first test passed but whose second the pool's kill cut off is not a
    pass: its row is timed out, nonzero, and says how many of its tests reported."""
    fakes, out = _fakes(tmp_path), str(tmp_path / "out")
    imports, hang = FAKES["hang"].split("\n\n", 1)      # test_hangs, after a test that passes
    (tmp_path / "fakes" / "test_cut_gpu.py").write_text(
        f"{imports}\nimport pytest\n\npytestmark = pytest.mark.gpu\n\n\n"
        f"def test_ok():\n    pass\n\n\n{hang}")
    monkeypatch.setenv("HANG_PID_FILE", str(tmp_path / "hang.pid"))
    monkeypatch.setattr(gpu_suites, "MIN_LIMIT_S", 3.0)
    rc = gpu_suites.main(["--budget", "60", "--per-module", "6", "--grace", "2", "--pool",
                          "--tier", "quick", "--ranks", "2", "--no-precompile", "--tests-dir",
                          fakes, "--out", out, "pass", "cut"])
    assert rc != 0
    rows = {m["module"]: m for m in json.loads((tmp_path / "out" / "gpu_suites.json")
                                                .read_text())["modules"]}
    assert (rows["test_pass_gpu.py"]["rc"], rows["test_pass_gpu.py"]["timed_out"]) == (0, False)
    cut = rows["test_cut_gpu.py"]
    assert cut["passed"] == 1 and cut["timed_out"] and cut["rc"] != 0, cut
    assert "1 of 2 tests reported" in cut["first_failure"], cut
    assert "killed at its limit; 1 of 2 tests reported" in capsys.readouterr().out


def test_parse_pooled_counts_and_seconds_per_module():
    text = "\n".join([
        "0.50s setup    tests/test_a_gpu.py::test_x[2]",
        "12.25s call     tests/test_a_gpu.py::test_x[2]",
        "3.00s call     tests/test_b_gpu.py::test_y[2]",
        "PASSED tests/test_a_gpu.py::test_x[2]",
        "FAILED tests/test_b_gpu.py::test_y[2] - AssertionError: rank 1 ...",
        "SKIPPED [1] tests/test_b_gpu.py:10: needs 2 GPUs"])
    got = gpu_suites.parse_pooled(text, ["test_a_gpu.py", "test_b_gpu.py", "test_c_gpu.py"])
    assert got["test_a_gpu.py"] == {"passed": 1, "failed": 0, "skipped": 0, "first_failure": "",
                                    "seconds": 12.75}
    b = got["test_b_gpu.py"]
    assert (b["passed"], b["failed"], b["skipped"], b["seconds"]) == (0, 1, 1, 3.0)
    assert b["first_failure"].startswith("FAILED tests/test_b_gpu.py::test_y[2]")
    assert got["test_c_gpu.py"]["passed"] == 0


def test_pooled_ranks_get_a_heap_for_every_module():
    """The pool's NVSHMEM heap is fixed by its first Buffer: sized from the GPU up front
    (40 % over the ranks sharing it, <= 16 GiB, 512 MiB granules)."""
    from tests import gpu_harness
    h200 = 143771                                             # MiB, as nvidia-smi reports it
    assert gpu_harness.pool_heap_bytes(launch.plan(2, gpus=1, mps=True), h200) == 16 << 30
    eight = gpu_harness.pool_heap_bytes(launch.plan(8, gpus=1, mps=True), h200)
    assert eight == 7 << 30 and eight % (512 << 20) == 0, eight
    assert gpu_harness.pool_heap_bytes(launch.plan(8, gpus=8, mps=True), h200) == 16 << 30


def test_pooled_runs_order_tests_by_rank_count():
    """EPGEN_TEST_POOL=1 (gpu_suites --pool): every module at 2 ranks, then 4, then 8 (the pool
    restarts once per rank count), modules and their tests in order within a count; unpooled,
    pytest's own order (each module at 2, 4, 8 in turn)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mods = ["tests/test_runtime_gpu.py", "tests/test_low_latency_gpu.py",
            "tests/test_internode_gpu.py"]

    def collected(pool):
        env = {**os.environ, "EPGEN_TEST_POOL": pool, "EPGEN_TEST_RANKS": "2,4,8",
               "EPGEN_TEST_TIER": "full"}
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                              "-p", "no:cacheprovider", *mods], capture_output=True, text=True,
                             env=env, cwd=root, timeout=120)
        return [line for line in out.stdout.splitlines() if "::" in line]

    def ranks(test_id):
        import math
        param = test_id.rsplit("[", 1)[1].rstrip("]")       # "4", or a layout "2x4"
        return math.prod(int(v) for v in param.split("x"))

    pooled = collected("1")
    assert [ranks(t) for t in pooled] == sorted(ranks(t) for t in pooled)
    assert pooled[:4] == ["tests/test_runtime_gpu.py::test_runtime[2]",
                          "tests/test_low_latency_gpu.py::test_low_latency[2]",
                          "tests/test_low_latency_gpu.py::test_low_latency_on_torch_nvshmem[2]",
                          "tests/test_internode_gpu.py::test_internode_layout_over_virtual_nodes[2x1]"]
    plain = collected("0")
    assert sorted(plain) == sorted(pooled) and plain != pooled
    assert [ranks(t) for t in plain[:3]] == [2, 4, 8]


def test_quick_cases_rotate_over_the_rank_counts(monkeypatch):
    """select_rotating: in the quick tier each count runs a share of the quick cases, the
    counts together each of them once; the full tier runs every case at every count."""
    from tests import gpu_harness
    cases, quick = list("abcdefghijklm"), [0, 1, 2, 3, 4, 6, 7, 8, 9, 12]
    monkeypatch.setenv("EPGEN_TEST_RANKS", "2,4,8")
    monkeypatch.setenv("EPGEN_TEST_TIER", "quick")
    shares = [gpu_harness.select_rotating(cases, quick, w) for w in (2, 4, 8)]
    assert all(shares) and sorted(sum(shares, [])) == [cases[i] for i in quick]
    assert gpu_harness.select_rotating(cases, quick, 16) == [cases[i] for i in quick]
    monkeypatch.setenv("EPGEN_TEST_TIER", "full")
    assert gpu_harness.select_rotating(cases, quick, 4) == cases


def test_quick_cases_every_count_and_rotating(monkeypatch):
    """select with `rotating`: every count runs the `quick` cases, and the rotating ones are
    shared out over the counts (each once), in list order; the full tier runs every case."""
    from tests import gpu_harness
    cases = list("abcdefgh")
    monkeypatch.setenv("EPGEN_TEST_RANKS", "2,4,8")
    monkeypatch.setenv("EPGEN_TEST_TIER", "quick")
    shares = {w: gpu_harness.select(cases, [0, 5], [6, 1, 3], w) for w in (2, 4, 8)}
    assert shares == {2: ["a", "f", "g"], 4: ["a", "b", "f"], 8: ["a", "d", "f"]}
    assert gpu_harness.select(cases, [0, 5]) == ["a", "f"]
    # a negative index counts from the end, as faults' "at the largest count" ([-1]) means:
    # 5b73a8d's select matched indices literally and left that test no case at all
    assert gpu_harness.select([2, 4, 8], [-1]) == [8]
    assert gpu_harness.select(cases, [-1], [-2], 2) == ["g", "h"]
    with pytest.raises(IndexError):
        gpu_harness.select([2, 4, 8], [3])
    monkeypatch.setenv("EPGEN_TEST_TIER", "full")
    assert gpu_harness.select(cases, [0, 5], [6, 1, 3], 4) == cases


@pytest.mark.parametrize("tier", ["quick", "full"])
def test_every_gpu_test_has_cases_in_each_tier(tier):
    """Collected at 2,4,8 ranks, no GPU test is left with an empty parameter set (pytest then
    skips it as NOTSET: a test no tier runs, which 5b73a8d's select did to one faults test)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "EPGEN_TEST_TIER": tier, "EPGEN_TEST_RANKS": "2,4,8", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--collect-only", "-m", "gpu", "tests"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    assert len(ids) > 20, out.stdout[-2000:]
    assert not [i for i in ids if "NOTSET" in i], [i for i in ids if "NOTSET" in i]


def test_the_harness_refuses_a_second_copy_of_itself():
    """Imported as plain `gpu_harness` it would hold a second RankPool (test_runtime_gpu did:
    its own rank processes and MPS daemon beside the suites' pool)."""
    import importlib
    import sys
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    assert tests_dir in sys.path          # conftest puts tests/ there for other helpers
    sys.modules.pop("gpu_harness", None)
    with pytest.raises(ImportError, match="from tests import gpu_harness"):
        importlib.import_module("gpu_harness")
