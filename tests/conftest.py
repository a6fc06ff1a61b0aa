import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))   # gpu_harness for the tests and their workers

GPU_SUITES_SPEC = os.path.join(os.path.dirname(__file__), "data", "gpu-suites.yaml")


@pytest.fixture(scope="session", autouse=True)
def _precompile_gpu_suites(request):
    """Before the first GPU test: compile the suites' kernels in parallel (one process per
    core), so that ranks find them in the cache instead of compiling one at a time.
    EPGEN_TEST_PRECOMPILE=0 skips it (a kernel missing then compiles at first use)."""
    if os.environ.get("EPGEN_TEST_PRECOMPILE", "1") == "0":
        return
    if not any(item.get_closest_marker("gpu") for item in request.session.items):
        return
    import gpu_harness
    if gpu_harness.gpu_count() == 0:
        return
    jobs = str(min(os.cpu_count() or 1, 16))
    out = subprocess.run([sys.executable, "-m", "epgen", "precompile", "--spec", GPU_SUITES_SPEC,
                          "--jobs", jobs], capture_output=True, text=True, timeout=1800)
    print(f"\n[precompile] {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
    if out.returncode != 0:
        print(f"[precompile] exit {out.returncode}: kernels compile at first use instead\n"
              f"{out.stderr[-2000:]}")
