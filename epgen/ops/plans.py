"""The fast lane's Plans of one operation family (runtime/fastcall.py records and replays
them): a call looks its Plan up by the flags and shapes it is for, a Python-path call that may be
replayed records one."""
from __future__ import annotations

from ..runtime import fastcall
from .streams import capturing


class Plans:
    """One operation family's Plans by key (the flags and shapes a Plan is for). At most LIMIT:
    a workload of more shapes starts over (the soak bounds host growth)."""
    LIMIT = 64

    def __init__(self, ctx):
        self.ctx = ctx
        self._plans: dict = {}
        self.replayed = 0       # calls a Plan answered
        self.missed = 0         # calls that had a Plan that did not match (Python path)

    def run(self, key, args: tuple):
        """The replayed call's result, or None (no Plan, or it did not match: Python path)."""
        plan = self._plans.get(key)
        if plan is None:
            return None
        result = plan(*args)
        if result is None:
            self.missed += 1
        else:
            self.replayed += 1
        return result

    def recorder(self, eligible: bool) -> fastcall.Launches | None:
        """A Launches for this Python-path call to fill, where its Plan could be replayed: a
        synchronous call (no async_finish, hook or previous_event) outside a capture, with the
        C++ module there."""
        if not eligible or fastcall.native() is None:
            return None
        return None if capturing() else fastcall.Launches()

    def keep(self, key, launches: fastcall.Launches | None, args: tuple, outputs: list, result, **kw):
        if launches is None or key is None:
            return
        plan = fastcall.record(fastcall.native(), args, outputs, launches, result,
                               order=self.ctx.streams, current_stream=self.ctx.current_raw_stream,
                               error_word_addr=self.ctx.errors.code_address, **kw)
        if plan is None:
            self._plans.pop(key, None)
            return
        if len(self._plans) >= self.LIMIT:
            self._plans.clear()
        self._plans[key] = plan
