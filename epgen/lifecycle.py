"""When a Buffer's resources are freed: DeepEP V1's `explicitly_destroy` rule.

explicitly_destroy=False: the Buffer is freed when it is garbage collected, or at interpreter
exit if it is still alive then. explicitly_destroy=True: only `destroy()` frees it; a Buffer
collected or still alive at exit without it is reported (a warning) and its memory left to the
process's end. Freeing is collective (every rank frees its part of the symmetric heap), so the
exit hook runs before NVSHMEM's finalize: it is registered after it (atexit runs hooks last in,
first out), when the first Buffer is tracked, which is after that Buffer initialised NVSHMEM.
"""
from __future__ import annotations

import atexit
import itertools
import warnings
import weakref

# Buffer -> creation serial: every rank creates its Buffers in the same order, so freeing them
# in that order at exit keeps the ranks' collective frees matched.
_live: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_serial = itertools.count()
_hook_registered = False
_exiting = False


def track(buf) -> None:
    """Follow `buf` (a Buffer: .explicitly_destroy, ._destroyed, .destroy()) until it is freed."""
    global _hook_registered
    if not _hook_registered:
        atexit.register(at_exit)
        _hook_registered = True
    _live[buf] = next(_serial)


def report_leak(buf, when: str) -> None:
    warnings.warn(f"epgen: rank {getattr(buf, 'rank', '?')}: a Buffer with explicitly_destroy=True "
                  f"was {when} without destroy(); its memory is released only when the process "
                  "ends", ResourceWarning, stacklevel=3)


def collected(buf) -> None:
    """`buf.__del__`: free it (explicitly_destroy=False) or report it."""
    if _exiting or buf._destroyed:
        return           # at exit the hook has settled every Buffer already
    if buf.explicitly_destroy:
        report_leak(buf, "garbage collected")
    else:
        buf.destroy()


def at_exit() -> None:
    """Every Buffer still alive: freed (explicitly_destroy=False) or reported; oldest first."""
    global _exiting
    for buf, _ in sorted(list(_live.items()), key=lambda item: item[1]):
        if buf._destroyed:
            continue
        if buf.explicitly_destroy:
            report_leak(buf, "left at exit")
        else:
            try:
                buf.destroy()
            except Exception as exc:  # noqa: BLE001 - exiting: report, never raise
                warnings.warn(f"epgen: freeing a Buffer at exit failed: {exc}")
    _exiting = True
