"""Probe (issue 9 item 3, not yet run): the setting that faulted at 82360e9, normal mode at 8
ranks under MPS with no per-client SM limit. Buffer creation now refuses it
(runtime/sharing.py); this probe fakes that check off to see what a deadline does there.

    python bench/mps_no_limit_probe.py

At 82360e9: one rank reported a deadline (dispatch waiting for peer 4), the other seven an
illegal memory access. What to look for: which rank faults first (MPS reports one client's
fault in every client), and whether it happens before or after the timed-out rank's process
ended.
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from epgen import launch  # noqa: E402


@dataclasses.dataclass(frozen=True)
class NoLimit(launch.Placement):
    @property
    def mps_thread_percentage(self):
        return 100


def worker(rank, world):
    os.environ["EPGEN_TIMEOUT_S"] = "10"
    from epgen.runtime import sharing
    sharing.check_co_residency = lambda shares: None      # a fake: lets the refused setting run
    from tests import test_normal_gpu as normal
    normal.CASES = normal.CASES[:3]
    res = normal._worker(rank, world)
    print(f"rank {rank}: " + " | ".join(f"{n}: {s.strip().splitlines()[-1][:200]}"
                                        for n, s in res), flush=True)
    return res


if __name__ == "__main__":
    try:
        launch.run_ranks(8, worker, timeout_s=150, placement=NoLimit(8, 1, "mps"))
        print("no-limit run: all ranks returned")
    except AssertionError as exc:
        print("no-limit run failed:", str(exc)[:3000])
