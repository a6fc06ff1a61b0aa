"""The EPGEN_* environment variables: read in one place, each checked, each error naming the
variable, its value and what it must be (never a bare float() traceback)."""
from __future__ import annotations

import math
import os

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class EnvError(ValueError):
    """An EPGEN_* variable with a value epgen cannot use."""


def _raw(name: str) -> str | None:
    v = os.environ.get(name)
    return None if v is None or v.strip() == "" else v.strip()


def positive_seconds(name: str, default: float) -> float:
    """A positive, finite number of seconds; unset or empty gives the default."""
    v = _raw(name)
    if v is None:
        return default
    try:
        x = float(v)
    except ValueError:
        x = math.nan
    if not (math.isfinite(x) and x > 0):
        raise EnvError(f"{name}={os.environ[name]!r}: must be a positive number of seconds "
                       f"(default {default:g})")
    return x


def flag(name: str, default: bool) -> bool:
    """1/true/yes/on or 0/false/no/off (any case); unset or empty gives the default."""
    v = _raw(name)
    if v is None:
        return default
    if v.lower() in _TRUE:
        return True
    if v.lower() in _FALSE:
        return False
    raise EnvError(f"{name}={os.environ[name]!r}: must be one of {'/'.join(_TRUE)} or "
                   f"{'/'.join(_FALSE)} (default {'1' if default else '0'})")
