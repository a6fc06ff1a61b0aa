"""The normal-mode control area is laid out in templates/normal_ctrl.cuh and mirrored in
epgen/ops/intranode.py (its size, and the words the test-only counter hook writes). The header
static_asserts its offsets against literals (compiled by test_compile.py); this ties the Python
side to the same literals, so neither side can drift alone."""
import os
import re

from epgen.compiler import TEMPLATES_DIR
from epgen.ops import intranode


def test_python_mirrors_the_asserted_control_area_offsets():
    with open(os.path.join(TEMPLATES_DIR, "normal_ctrl.cuh")) as f:
        text = f.read()
    m = re.search(r"static_assert\(kDispCall == (\d+) && kDispSendTail == (\d+) && "
                  r"kCtrlBytes == (\d+)", text)
    assert m, "normal_ctrl.cuh no longer asserts the mirrored offsets"
    disp_call, ring_counters, ctrl = (int(v) for v in m.groups())
    assert intranode.DISP_CALL_OFF == disp_call
    assert intranode.RING_COUNTERS_OFF == ring_counters
    assert intranode.CTRL_BYTES == ctrl
    # six 64-bit counter arrays [kMaxC][kMaxR] from kDispSendTail on, inside the area
    assert intranode.RING_COUNTERS == 6 * intranode.MAX_CHANNELS * intranode.MAX_RANKS
    assert intranode.RING_COUNTERS_OFF + 8 * intranode.RING_COUNTERS <= ctrl
