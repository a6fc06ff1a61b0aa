"""Facts the host and the kernels must agree on, defined once, here.

A drift between a Python size and a device one compiles and then corrupts memory across GPUs,
so each fact is rendered into every translation unit (codegen: `epgen::facts`, enumerators) and,
where a device header defines its own constant for it, a static_assert ties the two: a header
that drifts from this table no longer compiles. The Python side imports these names; no op
module spells the numbers.

Not yet here (issue 11, item 1, later steps): the per-spec record and message sizes
(DispatchCfg::kRec, LLDispatch::kPayload), the LL data areas, and the device headers reading
their values from `epgen::facts` instead of declaring their own.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass

# -- the error word (templates/common.cuh, runtime/errors.py) -------------------------------
ERROR_WORDS = 8                   # int words: [0] code, [1] op, [2] rank, [3] peer, [4] detail
ERR_TIMEOUT, ERR_BAD_INDEX, ERR_CAPACITY, ERR_BAD_ARG = 1, 2, 3, 4

# -- normal mode's control area at the start of the NVLink region (templates/normal_ctrl.cuh)
NORMAL_MAX_CHANNELS = 128
NORMAL_MAX_RANKS = 8              # one node of NVLink peers
NORMAL_NOTIFY_SEQ_OFF = 0         # int: notify / barrier calls so far
NORMAL_NOTIFY_TABLE_OFF = 4096    # [2 parity][kMaxR src][kRowInts] int
NORMAL_NOTIFY_ROW_INTS = 1024
NORMAL_DISP_CALL_OFF = (NORMAL_NOTIFY_TABLE_OFF
                        + 2 * NORMAL_MAX_RANKS * NORMAL_NOTIFY_ROW_INTS * 4)   # int [kMaxC]
NORMAL_DISP_META_OFF = NORMAL_DISP_CALL_OFF + NORMAL_MAX_CHANNELS * 4
NORMAL_RING_COUNTERS_OFF = NORMAL_DISP_META_OFF + 2 * NORMAL_MAX_CHANNELS * NORMAL_MAX_RANKS * 16
NORMAL_RING_COUNTERS = 6 * NORMAL_MAX_CHANNELS * NORMAL_MAX_RANKS   # int64, 3 per direction
NORMAL_CTRL_BYTES = 196608
assert NORMAL_RING_COUNTERS_OFF + NORMAL_RING_COUNTERS * 8 + 8 <= NORMAL_CTRL_BYTES

# -- low-latency control area (templates/ll_common.cuh, ops/low_latency.py) ----------------
LL_MAX_SIG = 1024                 # dispatch signal words per half (local expert * R + source)
LL_MAX_RANK_SIG = 64              # per-rank words per half (combine signals, verdicts)
LL_SEND, LL_RECV = 1, 2           # phase bits of a launch (args.phases)


@dataclass(frozen=True)
class Fact:
    cpp: str                       # its name in epgen::facts
    value: int
    device: str | None = None      # the device header's own constant that must equal it
    header: str | None = None      # the header defining `device` (assert only where included)


FACTS = (
    Fact("kErrorWords", ERROR_WORDS),
    Fact("kErrTimeout", ERR_TIMEOUT, "::epgen::kErrTimeout", "common.cuh"),
    Fact("kErrBadIndex", ERR_BAD_INDEX, "::epgen::kErrBadIndex", "common.cuh"),
    Fact("kErrCapacity", ERR_CAPACITY, "::epgen::kErrCapacity", "common.cuh"),
    Fact("kErrBadArg", ERR_BAD_ARG, "::epgen::kErrBadArg", "common.cuh"),
    Fact("kNormalMaxChannels", NORMAL_MAX_CHANNELS, "::epgen::nctrl::kMaxC", "normal_ctrl.cuh"),
    Fact("kNormalMaxRanks", NORMAL_MAX_RANKS, "::epgen::nctrl::kMaxR", "normal_ctrl.cuh"),
    Fact("kNormalNotifySeqOff", NORMAL_NOTIFY_SEQ_OFF, "::epgen::nctrl::kNotifySeq",
         "normal_ctrl.cuh"),
    Fact("kNormalNotifyTableOff", NORMAL_NOTIFY_TABLE_OFF, "::epgen::nctrl::kNotifyTable",
         "normal_ctrl.cuh"),
    Fact("kNormalNotifyRowInts", NORMAL_NOTIFY_ROW_INTS, "::epgen::nctrl::kRowInts",
         "normal_ctrl.cuh"),
    Fact("kNormalDispCallOff", NORMAL_DISP_CALL_OFF, "::epgen::nctrl::kDispCall",
         "normal_ctrl.cuh"),
    Fact("kNormalRingCountersOff", NORMAL_RING_COUNTERS_OFF, "::epgen::nctrl::kDispSendTail",
         "normal_ctrl.cuh"),
    Fact("kNormalCtrlBytes", NORMAL_CTRL_BYTES, "::epgen::nctrl::kCtrlBytes", "normal_ctrl.cuh"),
    Fact("kLLMaxSig", LL_MAX_SIG, "::epgen::ll::kMaxSig", "ll_common.cuh"),
    Fact("kLLMaxRankSig", LL_MAX_RANK_SIG, "::epgen::ll::kMaxRankSig", "ll_common.cuh"),
    Fact("kLLSend", LL_SEND),
    Fact("kLLRecv", LL_RECV),
)


def render(included_headers: set[str]) -> str:
    """The C++ block for a TU that includes `included_headers` (transitively): every fact as a
    constexpr, and a static_assert for each device constant the TU can see. Emits no code."""
    # Enumerators, not constexpr variables: under -default-device NVRTC emits a namespace-scope
    # constexpr as a device global (.nv.global.init); an enumerator takes no storage.
    # Packed a few to a line: a unit stays a short page (test_specs_codegen).
    values = [v.replace("\0", " ") for v in textwrap.wrap(
        " ".join(f"{f.cpp}\0=\0{f.value}," for f in FACTS), 96,
        initial_indent="    ", subsequent_indent="    ")]   # \0: never break inside an entry
    lines = ["namespace epgen::facts {  // epgen/layout_facts.py", "enum : long long {",
             *values, "}; }  // namespace epgen::facts"]
    lines += [f"static_assert(static_cast<long long>({f.device}) == ::epgen::facts::{f.cpp}, "
              f'"{f.header} {f.device} != epgen/layout_facts.py {f.cpp}");'
              for f in FACTS if f.device and f.header in included_headers]
    return "\n".join(lines) + "\n"
