"""Run-time choices between kernel variants, read from the environment at each call.

No torch here: `epgen precompile` (which runs without torch, .ci/cu12-compile) asks the same
question to know which kernels a deployment will launch.
"""
from __future__ import annotations

import os

COMBINE_ENV = "EPGEN_LL_COMBINE"
COMBINE_VARIANTS = ("per_expert", "per_rank")


def combine_variant() -> str:
    """EPGEN_LL_COMBINE: per_expert (default: one row per (token, expert) crosses the wire) or
    per_rank (each expert rank sums its experts' rows per token first; ll_combine_rank.cuh).
    Every rank must use the same one."""
    v = os.environ.get(COMBINE_ENV, "per_expert").strip() or "per_expert"
    if v not in COMBINE_VARIANTS:
        raise ValueError(f"{COMBINE_ENV}={v!r}: must be one of {', '.join(COMBINE_VARIANTS)}")
    return v
