"""The host's read of the device error word (runtime/errors.py), CPU only. FAKE: the word is a
plain list standing in for the mapped pinned memory a kernel reports into."""
import threading
import time

import pytest

from epgen.jit import layout_facts as lf
from epgen.runtime.errors import OP_CODES, ErrorWord, EpgenDeviceError


def _word(values):
    w = ErrorWord.__new__(ErrorWord)           # no mapped memory: the FAKE list below
    w.words = values
    return w


def test_a_report_caught_between_its_code_and_its_fields_is_read_whole():
    """The kernel writes the code (its compare-and-swap), then op, rank, peer, detail: a check
    in between waits for the fields instead of naming op 0 (review R12)."""
    values = [0] * lf.ERROR_WORDS
    values[lf.ERR_FIELD_CODE] = lf.ERR_TIMEOUT
    word = _word(values)

    def fields_later():
        time.sleep(0.02)
        values[lf.ERR_FIELD_RANK], values[lf.ERR_FIELD_PEER], values[lf.ERR_FIELD_DETAIL] = 3, 7, 14
        values[lf.ERR_FIELD_OP] = OP_CODES["dispatch"]
    writer = threading.Thread(target=fields_later)
    writer.start()
    with pytest.raises(EpgenDeviceError) as e:
        word.check()
    writer.join()
    assert (e.value.op, e.value.rank, e.value.peer, e.value.detail) == (OP_CODES["dispatch"], 3, 7, 14)
    assert str(e.value).startswith("epgen: rank 3: dispatch timed out waiting for peer rank 7")


def test_fields_that_never_come_are_reported_after_the_wait():
    values = [0] * lf.ERROR_WORDS
    values[lf.ERR_FIELD_CODE] = lf.ERR_CAPACITY
    t0 = time.monotonic()
    with pytest.raises(EpgenDeviceError) as e:
        _word(values).check()
    assert ErrorWord.FIELDS_WAIT_S <= time.monotonic() - t0 < ErrorWord.FIELDS_WAIT_S + 1
    assert e.value.code == lf.ERR_CAPACITY and e.value.op == 0


def test_a_clear_word_raises_nothing_at_once():
    t0 = time.monotonic()
    _word([0] * lf.ERROR_WORDS).check()
    assert time.monotonic() - t0 < 0.05
