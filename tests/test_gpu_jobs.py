"""CPU: the GPU suites' job runner (tests/test_low_latency_gpu._run_jobs) on real gloo ranks:
every job's outcome per rank, a failure reported by name without stopping the others, and
rank 0 alone printing each job's seconds ("[job] ..."), which the quick tier's cases are
chosen from."""
from __future__ import annotations

from epgen import launch


def _worker(rank, world):
    import io
    import sys
    import time
    from tests.test_low_latency_gpu import _run_jobs

    def fails():
        raise ValueError("on purpose")

    results, err, saved = [], io.StringIO(), sys.stderr
    sys.stderr = err
    try:
        _run_jobs([("sleeps", lambda: time.sleep(0.2)), ("fails", fails),
                   ("after", lambda: None)], results)
    finally:
        sys.stderr = saved
    return [(name, status.splitlines()[0]) for name, status in results], err.getvalue()


def test_jobs_run_in_order_and_rank_0_prints_their_seconds():
    out = launch.run_ranks(2, _worker, timeout_s=120,
                           placement=launch.Placement(2, 1, "time-sliced"))
    for results, _ in out:
        assert results == [("sleeps", "ok"), ("fails", "ValueError: on purpose"),
                           ("after", "ok")], results
    lines = out[0][1].splitlines()
    assert [line.split(":")[1].strip() for line in lines] == ["sleeps", "fails", "after"], lines
    assert lines[0].startswith("[job] 2 ranks: sleeps: ") and lines[0].endswith(" s"), lines
    assert float(lines[0].split()[-2]) >= 0.2, lines
    assert out[1][1] == "", out[1][1]
