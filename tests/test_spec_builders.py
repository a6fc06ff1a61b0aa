"""The ops build their specs through specs.py's builders and word the specs' errors in the
caller's argument names (ops/context.spec_for_call): the rules live in one place."""
from __future__ import annotations

import pytest

from epgen.ops.context import spec_for_call
from epgen.jit.specs import SpecError, normal_combine_spec


def test_a_spec_rule_is_reported_with_the_callers_argument():
    with pytest.raises(ValueError, match=r"^x\.shape\[1\]=1001: must be a multiple of 8") as e:
        spec_for_call(normal_combine_spec, {"hidden": "x.shape[1]"}, 1001, 0, 2)
    assert not isinstance(e.value, SpecError)


def test_a_field_the_caller_did_not_set_keeps_the_specs_words():
    with pytest.raises(SpecError, match=r"NormalCombineSpec\.num_ranks=9"):
        spec_for_call(normal_combine_spec, {"hidden": "x.shape[1]"}, 1024, 0, 9)
