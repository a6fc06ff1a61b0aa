import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))   # gpu_harness for the tests and their workers

GPU_SUITES_SPEC = os.path.join(os.path.dirname(__file__), "data", "gpu-suites.yaml")


@pytest.fixture(autouse=True)
def _fast_lane_built_only_where_tested(request, monkeypatch):
    """EPGEN_FASTCALL=0 for the CPU tests but test_fastcall's: every `epgen precompile` into a
    fresh cache would otherwise compile the fast lane's C++ module (~20 s against torch's
    headers) for tests that never replay a call (on a CPU machine nothing is replayed: no
    driver). GPU tests keep the lane on, as a user has it; test_fastcall tests it."""
    if request.node.get_closest_marker("gpu") or request.module.__name__.endswith("test_fastcall"):
        return
    monkeypatch.setenv("EPGEN_FASTCALL", "0")


@pytest.fixture(scope="session", autouse=True)
def _precompile_gpu_suites(request):
    """Before the first GPU test: compile the suites' kernels in parallel (one process per
    core), so that ranks find them in the cache instead of compiling one at a time.
    EPGEN_TEST_PRECOMPILE=0 skips it (a kernel missing then compiles at first use)."""
    if os.environ.get("EPGEN_TEST_PRECOMPILE", "1") == "0":
        return
    if not any(item.get_closest_marker("gpu") for item in request.session.items):
        return
    from tests import gpu_harness
    if gpu_harness.gpu_count() == 0:
        return
    jobs = str(min(os.cpu_count() or 1, 16))
    out = subprocess.run([sys.executable, "-m", "epgen", "precompile", "--spec", GPU_SUITES_SPEC,
                          "--jobs", jobs], capture_output=True, text=True, timeout=1800)
    print(f"\n[precompile] {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
    if out.returncode != 0:
        print(f"[precompile] exit {out.returncode}: kernels compile at first use instead\n"
              f"{out.stderr[-2000:]}")


def _rank_count(item) -> int:
    """The ranks a test item runs on (its num_ranks / world parameter, or a (nodes, ranks per
    node) layout's product); 0 for an item without one."""
    for value in getattr(getattr(item, "callspec", None), "params", {}).values():
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if (isinstance(value, tuple) and len(value) == 2
                and all(isinstance(v, int) for v in value)):
            return value[0] * value[1]
    return 0


def pytest_collection_modifyitems(config, items):
    """Pooled GPU runs (EPGEN_TEST_POOL=1, tests/gpu_suites.py --pool): every module's tests at
    2 ranks, then at 4, then at 8, instead of each module at 2, 4, 8 in turn. The pool keeps its
    rank processes while the rank count stays, so this order restarts them once per count, not
    once per test (each restart is ~9 s on the H200: exit, MPS stop, spawn, import, process
    group; 24 of them in the quick tier of bfc44e6). The sort is stable: within a count the
    modules and their tests keep their order, so a module's tests at one count stay together
    and share its run."""
    from tests import gpu_harness
    if os.environ.get(gpu_harness.POOL_ENV, "0") == "1":
        items.sort(key=_rank_count)
