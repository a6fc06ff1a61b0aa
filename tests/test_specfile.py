"""Spec validation refuses, before NVRTC runs, every value the kernels cannot take; the spec-file
loader answers every file with a SpecFileError naming file, key, value and rule, or with a valid
kernel set, never with another exception (explicit cases, then random YAML from hypothesis)."""
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epgen import jit
from epgen.jit import toolchain
from epgen.cache import Cache
from epgen.specfile import ECHO_CHARS, SpecFile, SpecFileError, load_spec_file
from epgen.jit.specs import (MAX_HIDDEN, KernelSpec, LowLatencyCombineSpec, LowLatencyDispatchSpec,
                         NormalCombineSpec, NormalDispatchSpec, SpecError)


@pytest.mark.parametrize("make, field, rule", [
    (lambda: NormalDispatchSpec(hidden=7168, num_topk=8, num_experts=256, num_ranks=8,
                                threads=256), "threads", "must be >= 480 for num_ranks=8"),
    (lambda: NormalDispatchSpec(hidden=7168, num_topk=8, num_experts=384, num_ranks=6,
                                threads=320), "threads", "must be >= 352 for num_ranks=6"),
    (lambda: NormalDispatchSpec(hidden=MAX_HIDDEN + 16, num_topk=8, num_experts=256,
                                num_ranks=2), "hidden", f"must be in [1, {MAX_HIDDEN}]"),
    (lambda: NormalCombineSpec(hidden=2 * MAX_HIDDEN, num_topk=8, num_ranks=2), "hidden",
     f"[1, {MAX_HIDDEN}]"),
    (lambda: LowLatencyDispatchSpec(hidden=65536, num_topk=8, num_experts=256, num_ranks=2),
     "hidden", f"[1, {MAX_HIDDEN}]"),
    (lambda: LowLatencyCombineSpec(hidden=MAX_HIDDEN + 16, num_topk=8, num_experts=256,
                                   num_ranks=2), "hidden", f"[1, {MAX_HIDDEN}]"),
])
def test_specs_the_kernels_cannot_take_are_refused(make, field, rule):
    with pytest.raises(SpecError) as e:
        make()
    assert f".{field}=" in str(e.value) and rule in str(e.value), str(e.value)


def test_the_largest_accepted_values_compile(tmp_path):
    """The limits are the kernels' own: the edge of what validation accepts builds."""
    cache = Cache(str(tmp_path))
    jit._memo.clear()
    for spec in (NormalDispatchSpec(hidden=MAX_HIDDEN, num_topk=8, num_experts=256, num_ranks=8,
                                    threads=480),
                 LowLatencyDispatchSpec(hidden=MAX_HIDDEN, num_topk=8, num_experts=256,
                                        num_ranks=8, use_fp8=False)):
        entry = jit.build(spec, "sm_90", cache)
        assert all(r.get("spill_stores", 0) == 0 for r in entry.manifest["resources"].values())


@pytest.mark.parametrize("arch", ["sm_0", "sm_52", "sm_70", "sm_9999", "sm_90\n", "sm_90 ",
                                  " sm_90", "SM_90", "sm_90a"])
def test_archs_outside_the_supported_set_are_refused(arch, tmp_path, monkeypatch):
    assert toolchain.SUPPORTED_ARCHS == ("sm_90",)
    with pytest.raises(ValueError) as e:
        toolchain.resolve_arch(arch)
    assert "--arch=" in str(e.value) and "sm_90 only" in str(e.value)
    monkeypatch.setenv("EPGEN_ARCH", arch)
    with pytest.raises(ValueError, match="EPGEN_ARCH="):
        toolchain.resolve_arch()
    monkeypatch.delenv("EPGEN_ARCH")
    with pytest.raises(ValueError, match="sm_90 only"):
        jit.build(NormalCombineSpec(hidden=1024, num_topk=2, num_ranks=2), arch, Cache(str(tmp_path)))
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"arch": arch, "kernels": [
        {"family": "layout", "num_ranks": 2, "num_experts": 32, "num_topk": 4}]}))
    with pytest.raises(SpecFileError, match="arch"):
        load_spec_file(str(p))


def write(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


MODEL = "{name: m, hidden: 1024, num_experts: 32, num_topk: 4, ep_sizes: [2], modes: %s}"


@pytest.mark.parametrize("text, needle", [
    ("{1: x, models: []}", "unknown key(s) ['1']"),
    ("models: [{name: m, 7: x, hidden: 1024}]", "models[0]: unknown key(s) ['7']"),
    ("models: [[1, 2]]", "models[0]: expected a mapping"),
    ("models: " + "[" + MODEL % "[normal]" + "]", "models[0].modes: expected a mapping"),
    ("models: " + "[" + MODEL % "{normal: [bf16]}" + "]", "models[0].modes.normal: expected a"),
    ("kernels: [layout]", "kernels[0]: expected a mapping with 'family'"),
    ("kernels: [{family: [layout]}]", "kernels[0].family: expected one of"),
    ("kernels: [{family: layout, num_ranks: 2}]", "needs ['num_experts', 'num_topk']"),
    ("kernels: [{family: layout, num_ranks: 2, num_experts: 32, num_topk: 4, colour: 1}]",
     "unknown key(s) ['colour']"),
    ("kernels: {family: layout}", "kernels: expected a list"),
    ("models: " + "[" + MODEL % "{low_latency: {num_max_dispatch_tokens_per_rank: [128]}}" + "]",
     "no kernel depends on it"),
    ("arch: [sm_90]\nkernels: []", "arch"),
    (b"kernels: []\n# caf\xe9 \xff\n", "not UTF-8 text (byte 0xe9 at offset 17)"),
    ("kernels: [" * 2000, "nested too deeply"),
])
def test_bad_spec_files_are_one_clear_error(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(SpecFileError) as e:
        load_spec_file(path)
    assert path in str(e.value) and needle in str(e.value), str(e.value)


def test_enum_errors_do_not_contradict_themselves(tmp_path):
    path = write(tmp_path, "models: [" + MODEL % "{normal: {dtypes: [bf16, fp16]}}" + "]")
    with pytest.raises(SpecFileError) as e:
        load_spec_file(path)
    msg = str(e.value)
    assert "dtypes: 'fp16' is not one of ['fp8', 'bf16'," in msg, msg


def test_long_values_are_cut(tmp_path):
    path = write(tmp_path, yaml.safe_dump({"models": [{"hidden": "x" * 100000}]}))
    with pytest.raises(SpecFileError) as e:
        load_spec_file(path)
    assert len(str(e.value)) < len(path) + 4 * ECHO_CHARS and "chars)" in str(e.value)


@pytest.mark.parametrize("value, expected", [(0, False), (1, True), ("false", False),
                                             ("true", True), ("no", False)])
def test_booleans_mean_what_they_say(tmp_path, value, expected):
    raw = value if isinstance(value, str) else str(value)
    path = write(tmp_path, "kernels: [{family: ll_dispatch, hidden: 1024, num_topk: 4, "
                           f"num_experts: 32, num_ranks: 2, use_fp8: {raw}}}]")
    (spec,) = load_spec_file(path).specs
    assert spec.use_fp8 is expected


def test_ep_sizes_above_ranks_per_node_expand_to_the_internode_kernels(tmp_path, monkeypatch):
    """A model whose ep_size spans nodes lists what ops/internode.py looks up (the same
    builders): the layout with per-node counts, the notify (and the barrier's), dispatch with top-k and cached,
    combine with and without weights, at the warps per block the calls read; ep_sizes within
    a node stay intranode."""
    from epgen.jit import specs as S
    monkeypatch.setenv("EPGEN_INTERNODE_WARPS_PER_BLOCK", "8")
    path = write(tmp_path, "models: [{name: m, hidden: 7168, num_experts: 64, num_topk: 8, "
                           "ep_sizes: [4, 8], ranks_per_node: 4, "
                           "modes: {normal: {dtypes: [fp8]}}}]")
    got = load_spec_file(path).specs
    intranode = [s for s in got if s.num_ranks == 4]
    assert {s.family for s in intranode} == {"layout", "normal_dispatch", "normal_combine"}
    assert all(getattr(s, "ranks_per_node", 0) == 0 for s in intranode)
    fp8_row, fp8_scales = 7168, 7168 // 128
    expected = [S.layout_spec(8, 64, 8, 4), S.internode_notify_spec(8, 4, 64),
                S.internode_notify_spec(8, 4, 8),          # ops/internode.py _barrier
                S.internode_dispatch_spec(fp8_row, fp8_scales, 8, 8, 4, 8),
                S.internode_dispatch_spec(fp8_row, fp8_scales, 0, 8, 4, 8),
                S.internode_combine_spec(7168, 8, 8, 4, warps_per_block=8),
                S.internode_combine_spec(7168, 0, 8, 4, warps_per_block=8)]
    assert [s for s in got if s.num_ranks == 8] == expected


@pytest.mark.parametrize("ranks_per_node, ep, needle", [
    (0, 4, "ranks_per_node: expected a positive int"),
    ("8", 4, "ranks_per_node: expected a positive int"),
    (3, 8, "(ep_size 8)"),                         # 8 ranks do not split into nodes of 3
])
def test_bad_ranks_per_node_is_one_clear_error(tmp_path, ranks_per_node, ep, needle):
    path = write(tmp_path, yaml.safe_dump({"models": [{
        "name": "m", "hidden": 1024, "num_experts": 64, "num_topk": 4, "ep_sizes": [ep],
        "ranks_per_node": ranks_per_node, "modes": {"normal": {"dtypes": ["bf16"]}}}]}))
    with pytest.raises(SpecFileError) as e:
        load_spec_file(path)
    assert path in str(e.value) and needle in str(e.value), str(e.value)


# ---------------------------------------------------------------- random YAML (hypothesis)
leaf = (st.none() | st.booleans() | st.integers(-3, 20000) | st.sampled_from([2, 4, 8, 16, 32,
        64, 128, 256, 1024, 7168, 2880]) | st.floats(allow_nan=True) |
        st.text(max_size=8) | st.sampled_from(["bf16", "fp8", "sm_90", "layout", "ll_dispatch",
                                              "normal_combine", "normal_dispatch", "ll_combine"]))
anything = st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(
    leaf.filter(lambda x: not (isinstance(x, float) and math.isnan(x))), c, max_size=4),
    max_leaves=12)


def maybe(keys_values: dict):
    """A mapping with some of these keys (each value from its strategy) and perhaps junk."""
    return st.fixed_dictionaries({}, optional=keys_values)


ints = st.sampled_from([0, 1, 2, 3, 4, 8, 16, 32, 64, 256, 1024, 2880, 7168, 16384, 16400, -1])
mode = maybe({"dtypes": st.lists(st.sampled_from(["bf16", "fp8", "fp16", 1]), max_size=3) | anything,
              "dispatch_dtypes": st.lists(st.sampled_from(["bf16", "fp8"]), max_size=2)})
model = maybe({"name": st.text(max_size=5) | anything, "hidden": ints | anything,
               "num_experts": ints, "num_topk": ints,
               "ep_sizes": st.lists(ints, max_size=3) | anything,
               "ranks_per_node": ints | anything,
               "modes": maybe({"normal": mode | st.none(), "low_latency": mode | st.none(),
                               "x": anything}) | anything})
kernel = maybe({"family": st.sampled_from(["layout", "normal_dispatch", "normal_combine",
                                           "ll_dispatch", "ll_combine", "warp"]) | anything,
                "hidden": ints, "num_topk": ints, "num_experts": ints, "num_ranks": ints,
                "threads": ints, "dtype": st.sampled_from(["bf16", "fp8", "x"]),
                "use_fp8": st.sampled_from([0, 1, True, False, 2, "no"]),
                "num_biases": ints, "round_scale": anything})
spec_file = (maybe({"arch": st.sampled_from(["sm_90", "sm_80", None]) | anything,
                    "models": st.lists(model | anything, max_size=2) | anything,
                    "kernels": st.lists(kernel | anything, max_size=3) | anything,
                    "extra": anything}) | anything)


@settings(max_examples=300, deadline=2000, database=None,  # nothing written to disk
          suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])
@given(data=spec_file, raw=st.none() | st.binary(max_size=64))
def test_random_spec_files_give_a_clear_error_or_a_valid_kernel_set(tmp_path, data, raw):
    if raw is not None:
        text = raw
    else:
        try:
            text = yaml.safe_dump(data, allow_unicode=True)
        except yaml.YAMLError:
            return
    path = write(tmp_path, text)
    try:
        sf = load_spec_file(path)
    except SpecFileError as e:
        assert path in str(e) and "Traceback" not in str(e)
        return
    assert isinstance(sf, SpecFile) and all(isinstance(s, KernelSpec) for s in sf.specs)
    assert sf.arch in (None, "sm_90")
