"""epgen's public surface against DeepEP V1's (deepseek-ai/DeepEP at 567632d), CPU only.

The table below is DeepEP's, written out by hand from deep_ep/buffer.py, deep_ep/utils.py and
csrc/deep_ep.cpp's pybind module (not read from DeepEP at run time): every public name, each
parameter's name, order and default, which Buffer methods are static, and how many values each
call returns (RETURNS; the GPU conformance test checks those on real calls). Where epgen differs
on purpose, the difference is in DIFFERENCES here and in the README's "Differences from DeepEP
V1"; anything else that differs fails.
"""
import inspect

import pytest
import torch

import epgen

_ = inspect.Parameter.empty      # a parameter without a default

MODULE_NAMES = {"Buffer", "Config", "EventOverlap", "topk_idx_t"}

# name -> (static?, [(parameter, default)...]) ; `self` left out of instance methods
BUFFER = {
    "__init__": (False, [("group", _), ("num_nvl_bytes", 0), ("num_rdma_bytes", 0),
                         ("low_latency_mode", False), ("num_qps_per_rank", 24),
                         ("allow_nvlink_for_low_latency_mode", True), ("allow_mnnvl", False),
                         ("use_fabric", False), ("explicitly_destroy", False),
                         ("enable_shrink", False), ("comm", None)]),
    "destroy": (False, []),
    "is_sm90_compiled": (True, []),
    "set_num_sms": (True, [("new_num_sms", _)]),
    "capture": (True, []),
    "get_low_latency_rdma_size_hint": (True, [("num_max_dispatch_tokens_per_rank", _),
                                              ("hidden", _), ("num_ranks", _),
                                              ("num_experts", _)]),
    "get_comm_stream": (False, []),
    "get_local_buffer_tensor": (False, [("dtype", _), ("size", None), ("offset", 0),
                                        ("use_rdma_buffer", False)]),
    "get_dispatch_config": (True, [("num_ranks", _)]),
    "get_combine_config": (True, [("num_ranks", _)]),
    "get_dispatch_layout": (False, [("topk_idx", _), ("num_experts", _), ("previous_event", None),
                                    ("async_finish", False),
                                    ("allocate_on_comm_stream", False)]),
    "dispatch": (False, [("x", _), ("handle", None), ("num_tokens_per_rank", None),
                         ("num_tokens_per_rdma_rank", None), ("is_token_in_rank", None),
                         ("num_tokens_per_expert", None), ("topk_idx", None),
                         ("topk_weights", None), ("expert_alignment", 1),
                         ("num_worst_tokens", 0), ("config", None), ("previous_event", None),
                         ("async_finish", False), ("allocate_on_comm_stream", False)]),
    "combine": (False, [("x", _), ("handle", _), ("topk_weights", None), ("bias", None),
                        ("config", None), ("previous_event", None), ("async_finish", False),
                        ("allocate_on_comm_stream", False)]),
    "clean_low_latency_buffer": (False, [("num_max_dispatch_tokens_per_rank", _), ("hidden", _),
                                         ("num_experts", _)]),
    "low_latency_dispatch": (False, [("x", _), ("topk_idx", _),
                                     ("num_max_dispatch_tokens_per_rank", _), ("num_experts", _),
                                     ("cumulative_local_expert_recv_stats", None),
                                     ("dispatch_wait_recv_cost_stats", None), ("use_fp8", True),
                                     ("round_scale", False), ("use_ue8m0", False),
                                     ("async_finish", False), ("return_recv_hook", False)]),
    "low_latency_combine": (False, [("x", _), ("topk_idx", _), ("topk_weights", _), ("handle", _),
                                    ("use_logfmt", False), ("zero_copy", False),
                                    ("async_finish", False), ("return_recv_hook", False),
                                    ("out", None), ("combine_wait_recv_cost_stats", None)]),
    "low_latency_update_mask_buffer": (False, [("rank_to_mask", _), ("mask", False)]),
    "low_latency_query_mask_buffer": (False, [("mask_status", _)]),
    "low_latency_clean_mask_buffer": (False, []),
    "get_next_low_latency_combine_buffer": (False, [("handle", _)]),
}
# internode_dispatch / internode_combine take dispatch's / combine's parameters
BUFFER["internode_dispatch"] = BUFFER["dispatch"]
BUFFER["internode_combine"] = BUFFER["combine"]

# Instance attributes of a constructed DeepEP Buffer (checked by the GPU conformance test).
BUFFER_ATTRIBUTES = ("rank", "group", "group_size", "num_nvl_bytes", "num_rdma_bytes",
                     "low_latency_mode", "explicitly_destroy", "enable_shrink")

CONFIG_INIT = [("num_sms", 20), ("num_max_nvl_chunked_send_tokens", 6),
               ("num_max_nvl_chunked_recv_tokens", 256), ("num_max_rdma_chunked_send_tokens", 6),
               ("num_max_rdma_chunked_recv_tokens", 256)]
CONFIG_METHODS = {"get_nvl_buffer_size_hint": 2, "get_rdma_buffer_size_hint": 2}   # positional

EVENT_OVERLAP = {"__init__": [("event", None), ("extra_tensors", None)],
                 "current_stream_wait": [], "__enter__": [], "__exit__": None}

# DeepEP's recommended configs: (num_sms, nvl send, nvl recv, rdma send, rdma recv) per rank count
DISPATCH_CONFIGS = {2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128)}
COMBINE_CONFIGS = {2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128)}

# How many values each call returns (a bare value where it is not a tuple: 0).
RETURNS = {"get_dispatch_layout": 5, "dispatch": 6, "combine": 3, "low_latency_dispatch": 5,
           "low_latency_combine": 3, "capture": 0, "get_comm_stream": 0,
           "get_local_buffer_tensor": 0, "get_next_low_latency_combine_buffer": 0}

# What epgen does differently on purpose (README, "Differences from DeepEP V1").
DIFFERENCES = {
    # DeepEP's group has no default (None raises unless comm is given); epgen's is WORLD.
    ("Buffer.__init__", "group"): None,
}
# Public Buffer methods DeepEP does not have.
EXTENSIONS = {"check_errors"}
# epgen's keyword-only additions to DeepEP methods (after all of DeepEP's parameters, so no
# positional call changes meaning): the wire format (epgen.formats, README "Wire formats"),
# low-latency dispatch's received-scale layout and, for opaque rows, the combine's hidden, and
# the low-latency size hint's top-k.
EXTRA_KEYWORDS = {"dispatch": {"wire_format": None}, "low_latency_dispatch": {"wire_format": None,
                                                                          "recv_scale_layout": None,
                                                                          "hidden": None},
                  "low_latency_combine": {"wire_format": None},
                  # the top-k the low-latency region is sized for (DeepEP's limit by default)
                  "get_low_latency_rdma_size_hint": {"num_topk": 11}}


def _params(fn, drop_self):
    ps = list(inspect.signature(fn).parameters.values())
    extra = EXTRA_KEYWORDS.get(fn.__name__, {})
    got_extra = {p.name: p.default for p in ps if p.kind == p.KEYWORD_ONLY}
    assert got_extra == extra, f"{fn.__qualname__}: keyword-only {got_extra}, expected {extra}"
    ps = [p for p in ps if p.kind != p.KEYWORD_ONLY]
    if drop_self:
        assert ps and ps[0].name == "self", f"{fn.__qualname__}: first parameter is not self"
        ps = ps[1:]
    for p in ps:
        assert p.kind in (p.POSITIONAL_OR_KEYWORD,), \
            f"{fn.__qualname__}({p.name}): {p.kind.description}, DeepEP's is positional-or-keyword"
    return [(p.name, p.default) for p in ps]


def _expected(where, table):
    return [(n, DIFFERENCES.get((where, n), d)) for n, d in table]


def test_module_level_names():
    assert set(epgen.__all__) == MODULE_NAMES
    for name in MODULE_NAMES:
        assert getattr(epgen, name) is not None
    assert epgen.topk_idx_t is torch.int64


@pytest.mark.parametrize("name", sorted(BUFFER))
def test_buffer_method_signature(name):
    static, table = BUFFER[name]
    raw = inspect.getattr_static(epgen.Buffer, name)
    assert isinstance(raw, staticmethod) == static, \
        f"Buffer.{name}: {'a staticmethod' if static else 'an instance method'} in DeepEP, " \
        f"{type(raw).__name__} in epgen"
    got = _params(getattr(epgen.Buffer, name), drop_self=not static)
    assert got == _expected(f"Buffer.{name}", table), f"Buffer.{name}"


def test_buffer_has_no_unlisted_public_methods():
    public = {n for n, v in vars(epgen.Buffer).items()
              if not n.startswith("_") and callable(getattr(epgen.Buffer, n))}
    assert public - set(BUFFER) == EXTENSIONS
    assert epgen.Buffer.num_sms == 20 and isinstance(vars(epgen.Buffer)["num_sms"], int)


def test_set_num_sms_sets_the_class_attribute_like_deepep():
    before = epgen.Buffer.num_sms
    try:
        epgen.Buffer.set_num_sms(24)
        assert epgen.Buffer.num_sms == 24
        assert epgen.Buffer.get_dispatch_config(2).num_sms == 24
        with pytest.raises(ValueError, match="new_num_sms=7"):
            epgen.Buffer.set_num_sms(7)
    finally:
        epgen.Buffer.num_sms = before


def test_config_signature_and_defaults():
    assert _params(epgen.Config, drop_self=False) == CONFIG_INIT
    c = epgen.Config()
    for name, default in CONFIG_INIT:
        assert getattr(c, name) == default
    positional = epgen.Config(20, 6, 256, 6, 128)
    assert positional.num_max_rdma_chunked_recv_tokens == 128
    for name, n in CONFIG_METHODS.items():
        assert len(_params(getattr(epgen.Config, name), drop_self=True)) == n
        assert isinstance(getattr(c, name)(7168 * 2, 8), int)
    assert c.get_rdma_buffer_size_hint(7168 * 2, 8) == 0       # intranode: DeepEP's legacy 0


def test_config_rules_match_deepep():
    # DeepEP: send tokens must be strictly fewer than receive tokens (csrc/config.hpp)
    with pytest.raises(ValueError, match="num_max_nvl_chunked_send_tokens=256"):
        epgen.Config(20, 256, 256)


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_recommended_configs_are_deepeps(ranks):
    for fn, table in ((epgen.Buffer.get_dispatch_config, DISPATCH_CONFIGS),
                      (epgen.Buffer.get_combine_config, COMBINE_CONFIGS)):
        c = fn(ranks)
        assert isinstance(c, epgen.Config)
        got = (c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens,
               c.num_max_rdma_chunked_send_tokens, c.num_max_rdma_chunked_recv_tokens)
        assert (c.num_sms, got) == (epgen.Buffer.num_sms, table[ranks]), fn.__name__


def test_static_helpers_return_deepeps_types():
    assert epgen.Buffer.is_sm90_compiled() is True
    hint = epgen.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
    assert isinstance(hint, int) and hint > 0


def test_event_overlap_surface():
    EO = epgen.EventOverlap
    for name, table in EVENT_OVERLAP.items():
        assert callable(getattr(EO, name)), name
        if table is not None:
            assert _params(getattr(EO, name), drop_self=True) == table, f"EventOverlap.{name}"
    e = EO()
    assert e.event is None and e.extra_tensors is None
    with e as inner:                   # no event: entering and leaving waits for nothing
        assert inner is e
    with pytest.raises(AssertionError):
        e.current_stream_wait()        # DeepEP asserts an event is there


def test_previous_event_forms_deepep_accepts():
    """DeepEP passes getattr(previous_event, 'event', None) on: None and EventOverlap(None)
    (a synchronous call's event) both mean no wait; anything else that is not an
    EventOverlap is refused by name."""
    from epgen.ops.context import event_of
    from epgen.runtime.events import EventHandle
    assert event_of(None) is None
    assert event_of(epgen.EventOverlap(None)) is None
    marker = object()          # stands for a torch.cuda.Event (none can be recorded on CPU)
    assert event_of(epgen.EventOverlap(EventHandle(marker))) is marker
    with pytest.raises(ValueError, match="previous_event='int'"):
        event_of(3)
