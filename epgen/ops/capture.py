"""What a normal-mode call (intranode or internode) may do under CUDA graph capture.

A replay runs the captured kernels with the captured arguments and no host code, so the two
decisions a normal-mode call makes on the host cannot be captured (review R6):
- an uncached dispatch without num_worst_tokens waits on the host for the received counts
  (DeepEP's CPU sync), which a capture never produces: refused (`check_host_wait`);
- the cross-rank barrier a ring-layout change needs is decided on the host from the previous
  call's layout, and a replay neither runs that decision nor updates it: a capture may not need
  the barrier (warm up eagerly with the same configuration first), and once a direction's
  layout is captured every later call in that direction keeps it (`RingLayouts`).
Everything else those calls need across replays is device state (64-bit ring counters,
sequence words, done counters) that a replay advances exactly as an eager call does.
"""
from __future__ import annotations

from .context import arg_error
from .streams import capturing

DIRECTIONS = ("dispatch", "combine")


def check_host_wait(cached: bool, num_worst_tokens: int) -> None:
    """An uncached dispatch under capture must be sized by num_worst_tokens."""
    if not cached and num_worst_tokens == 0 and capturing():
        raise arg_error("num_worst_tokens", 0, "must be > 0 for a dispatch without a handle "
                        "during CUDA graph capture (otherwise the host waits for the "
                        "received counts, which a capture never produces)")


class RingLayouts:
    """Per direction: the ring layout of the Buffer's previous call and the one a CUDA graph
    captured. `fields` names a layout key's entries and `rule` says how the configuration
    gives them (both for the error messages)."""

    def __init__(self, fields: str, rule: str):
        self.fields, self.rule = fields, rule
        self._last = dict.fromkeys(DIRECTIONS)
        self._pinned = dict.fromkeys(DIRECTIONS)

    def check(self, which: str, key, self_barriered: bool) -> None:
        """Refuses a call whose layout `key` breaks the capture rule, before anything is
        launched. `self_barriered`: the call starts with its own cross-rank barrier (the
        uncached dispatch's notify), so it may change the layout even during capture."""
        pinned = self._pinned[which]
        if pinned is not None and pinned != key:
            raise arg_error("config", f"{which} ring layout ({self.fields}) {key}",
                            f"must be {pinned}, the layout a CUDA graph captured on this Buffer "
                            f"uses ({self.rule}): graph replays cannot run the cross-rank "
                            "barrier a layout change needs")
        if not capturing():
            return
        prev = self._last[which]
        if not self_barriered and prev is not None and prev != key:
            raise arg_error("config", f"{which} ring layout {key} during CUDA graph capture",
                            f"must equal the previous {which}'s {prev} ({self.rule}): the "
                            "barrier a layout change needs is decided on the host and would "
                            "not run at replay; make one eager call with this configuration "
                            "before capture")
        self._pinned[which] = key

    def replay_guards(self, which: str) -> tuple:
        """What must still hold for a replayed call (runtime/fastcall.py) to skip this call's
        checks and barrier: the direction's layout is the one just used, none was pinned."""
        return ((self._last, which, self._last[which]), (self._pinned, which, None))

    def switch(self, which: str, key) -> bool:
        """Records `key` as the direction's layout; True when the previous call's differed (a
        call that is not itself a barrier then runs the cross-rank barrier first)."""
        prev, self._last[which] = self._last[which], key
        return prev is not None and prev != key
