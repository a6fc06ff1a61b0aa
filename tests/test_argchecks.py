"""Host-side argument checks that run before any CUDA call (no GPU needed).

The ops check CUDA tensors (device first), so their alignment rule is exercised here through
the check itself on CPU views, and through the public calls on GPUs in
tests/test_reliability_gpu.py.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epgen.ops.context import VECTOR_BYTES, check_aligned

DTYPES = [torch.bfloat16, torch.float8_e4m3fn, torch.float32]


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(DTYPES), offset=st.integers(0, 64), rows=st.integers(1, 4))
def test_misaligned_view_is_refused_naming_argument_and_alignment(dtype, offset, rows):
    base = torch.zeros(rows * 64 + 64, dtype=dtype)
    assert base.data_ptr() % VECTOR_BYTES == 0        # torch's CPU allocator aligns to 64
    view = base[offset:offset + rows * 64]            # contiguous, at an element offset
    assert view.is_contiguous()
    misalign = offset * base.element_size() % VECTOR_BYTES
    if misalign == 0:
        check_aligned("x", view, VECTOR_BYTES)
        return
    with pytest.raises(ValueError) as e:
        check_aligned("x", view, VECTOR_BYTES)
    msg = str(e.value)
    assert msg.startswith("x.data_ptr()=") and hex(view.data_ptr()) in msg
    assert f"{VECTOR_BYTES}-byte aligned" in msg and f"{misalign} bytes past" in msg


def test_empty_and_unchecked_tensors_pass():
    t = torch.zeros(65, dtype=torch.bfloat16)
    check_aligned("x", t[1:1], VECTOR_BYTES)          # empty: never read
    check_aligned("x", t[1:], 0)                      # align=0: no rule for this argument
