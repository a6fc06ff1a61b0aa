"""A one-line progress bar on stderr (redrawn in place on a terminal, a line per step
otherwise, so logs stay readable)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, stream=None, width: int = 30):
        if not isinstance(total, int) or total < 1:
            raise ValueError(f"total={total!r}: must be a positive int")
        self.total, self.done, self.width = total, 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.monotonic()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self, label: str) -> str:
        filled = self.width * self.done // self.total
        elapsed = time.monotonic() - self.start
        return (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{elapsed:5.0f}s {label}")

    def step(self, label: str) -> None:
        self.done = min(self.total, self.done + 1)
        text = self.line(label)
        if self.tty:
            self.stream.write("\r" + text.ljust(100)[:100] + ("\n" if self.done == self.total else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
