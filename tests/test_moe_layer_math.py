"""examples/moe_layer.py's math on CPU: the dense layer it checks against, its tolerance
(bf16 expert matmuls pass with room, a 10 % error in the routed part does not), and its command
line. The expert-parallel run itself is tests/test_moe_layer_gpu.py."""
import os
import subprocess
import sys

import pytest
import torch

from tests.test_moe_layer_gpu import EXAMPLE, load_example

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mod():
    m = load_example()
    m.DEVICE = "cpu"
    yield m
    m.DEVICE = "cuda"


CFG = dict(hidden=256, moe_inter=128, shared_inter=256, experts_per_rank=16, topk=4,
           prefill_tokens=64, decode_tokens=16)


def _routed_bf16(mod, cfg, x, xr, E, scale=1.0):
    """The routed experts as the EP layer computes them (bf16 matmuls per expert, float
    accumulation of the weighted outputs, one bf16 rounding in the combine), on one rank."""
    idx, w = mod.route(x, mod.router_weight(cfg, E), cfg.topk, cfg.routed_scale)
    y = torch.zeros(x.shape[0], cfg.hidden)
    for e in range(E):
        tok, k = (idx == e).nonzero(as_tuple=True)
        if tok.numel():
            w13, w2 = mod.expert_weights(cfg, e)
            y.index_add_(0, tok, w[tok, k, None] * mod.swiglu(xr[tok], w13, w2).float())
    return (y * scale).to(torch.bfloat16).float() + mod.swiglu(x, *mod.expert_weights(cfg, -1)).float()


@pytest.mark.parametrize("fp8", [False, True])
def test_bf16_layer_is_within_tolerance_and_a_wrong_one_is_not(mod, fp8):
    from epgen import reference as ref
    cfg = mod.MoEConfig(**CFG)
    E = cfg.experts_per_rank
    x = mod.layer_input(cfg, 0, 0, cfg.prefill_tokens)
    xr = ref.per_token_cast_back(*ref.per_token_cast_to_fp8(x), torch.bfloat16) if fp8 else x
    dense = mod.dense_layer(cfg, x, E, fp8_routed=fp8)
    err = mod.check("ep", _routed_bf16(mod, cfg, x, xr, E), dense)
    assert err < mod.TOLERANCE / 2, err
    with pytest.raises(AssertionError, match="> 0.0625"):
        mod.check("wrong", _routed_bf16(mod, cfg, x, xr, E, scale=0.9), dense)
    if fp8:   # the dense check of decode must quantize like the dispatch: without, it differs
        assert not torch.equal(dense, mod.dense_layer(cfg, x, E))


def test_inputs_and_weights_are_regenerable(mod):
    cfg = mod.MoEConfig(**CFG)
    assert torch.equal(mod.expert_weights(cfg, 3)[0], mod.expert_weights(cfg, 3)[0])
    assert not torch.equal(mod.expert_weights(cfg, 3)[0], mod.expert_weights(cfg, 4)[0])
    assert not torch.equal(mod.layer_input(cfg, 0, 0, 8), mod.layer_input(cfg, 0, 1, 8))


def test_command_line():
    r = subprocess.run([sys.executable, EXAMPLE, "--help"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert r.returncode == 0 and "--experts-per-rank" in r.stdout and "--ranks" in r.stdout
