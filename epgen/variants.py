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


INTERNODE_WARPS_ENV = "EPGEN_INTERNODE_WARPS_PER_BLOCK"


def internode_warps_per_block() -> int:
    """EPGEN_INTERNODE_WARPS_PER_BLOCK (1-32, default 32): the warps a block of the internode
    dispatch / combine holds; a channel's roles (a warp each) spread over as many blocks as
    they need. Below 32 it is for tests: several blocks per channel on layouts that one GPU's
    ranks can form (the 40- and 80-role channels of EP32 / EP64 need them at 32). Every rank
    must use the same value."""
    v = os.environ.get(INTERNODE_WARPS_ENV, "").strip() or "32"
    if not (v.isdigit() and 1 <= int(v) <= 32):
        raise ValueError(f"{INTERNODE_WARPS_ENV}={v!r}: must be an integer in [1, 32] (default 32)")
    return int(v)
