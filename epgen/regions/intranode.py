"""Byte layout of a one-node Buffer's NVLink region (ctx.nvl) for the normal mode, and
Config.get_nvl_buffer_size_hint.

A fixed control area (CTRL_BYTES, templates/normal_ctrl.cuh), then the rest split in two
halves: dispatch rings, combine rings. Ring (c, src) of a half holds ring_slots(config)
records of one layout (channels, slots, record bytes); ops/intranode.py places a call's rings.
"""
from __future__ import annotations

from ..jit import layout_facts
from ..jit.layout_facts import align_up
from ..jit.specs import MAX_TOPK

# The control area and the control words the test-only counter hook writes: defined in
# layout_facts (every TU static_asserts normal_ctrl.cuh against them).
CTRL_BYTES = layout_facts.NORMAL_CTRL_BYTES
MAX_CHANNELS = layout_facts.NORMAL_MAX_CHANNELS
MAX_RANKS = layout_facts.NORMAL_MAX_RANKS
NOTIFY_SEQ_OFF = layout_facts.NORMAL_NOTIFY_SEQ_OFF
DISP_CALL_OFF = layout_facts.NORMAL_DISP_CALL_OFF
RING_COUNTERS_OFF = layout_facts.NORMAL_RING_COUNTERS_OFF
RING_COUNTERS = layout_facts.NORMAL_RING_COUNTERS
MIN_CAP = layout_facts.NORMAL_MIN_RING_SLOTS   # one combine reducer batch + one sender chunk

dispatch_record_bytes = layout_facts.normal_dispatch_record_bytes   # DispatchCfg::kRec
combine_record_bytes = layout_facts.normal_combine_record_bytes     # CombineCfg::kRec


def ring_slots(config) -> int:
    """Ring slots per (channel, peer). A channel is one SM here (DeepEP: two), so each ring
    holds half of DeepEP's per-channel count and the rings take the same memory."""
    return max(int(config.num_max_nvl_chunked_recv_tokens) // 2, MIN_CAP)


def ring_bytes(config, num_ranks: int, record: int) -> int:
    """One half's rings: a ring per (channel, source rank)."""
    return config.num_sms * num_ranks * ring_slots(config) * record


def half_bytes(nbytes: int) -> int:
    """Bytes of each half of a region of nbytes (dispatch first, then combine)."""
    return max(0, (nbytes - CTRL_BYTES) // 2 // 256 * 256)


def nvl_buffer_size_hint(config, hidden_bytes: int, num_ranks: int) -> int:
    """Bytes of num_nvl_bytes for calls with this config (BF16 rows of hidden_bytes, top-k <= 32)."""
    hidden = max(1, hidden_bytes // 2)
    rec = max(dispatch_record_bytes(2 * hidden, 0, MAX_TOPK), combine_record_bytes(hidden, MAX_TOPK))
    return align_up(CTRL_BYTES + 2 * align_up(ring_bytes(config, num_ranks, rec), 256) + 512,
                    1 << 20)
