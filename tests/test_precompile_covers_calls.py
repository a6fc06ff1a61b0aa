"""The kernels the ops look up for a model's calls are the ones `epgen precompile` lists for it
(a deploy with EPGEN_JIT=0 must not miss), checked on CPU: the real LowLatencyOps and
IntranodeOps run on the FAKE launch context of tests/fake_launch.py, which records each
launch's spec, and every spec recorded must be in the spec file's expansion. A builder that
drifts from the expansion (another threads, another canonical form) fails here in CI; the GPU
test tests/test_precompiled_gpu.py runs every family, internode included, for real."""
import pytest
import torch

from epgen import reference as ref
from epgen import variants
from epgen.config import Config
from epgen.specfile import load_spec_file
from tests.fake_launch import fake_cuda, fake_intranode_ops, fake_ll_ops, no_graph_capture

R, M, H, E, K, T = 2, 16, 1024, 16, 4, 8


def _listed(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(f"""models:
  - {{name: m, hidden: {H}, num_experts: {E}, num_topk: {K}, ep_sizes: [{R}],
     modes: {{normal: {{dtypes: [bf16, fp8]}},
             low_latency: {{dispatch_dtypes: [fp8, bf16], combine_dtypes: [bf16, logfmt10]}}}}}}
""")
    return set(load_spec_file(str(path)).specs)


@pytest.mark.parametrize("combine_variant", ["per_expert", "per_rank"])
def test_low_latency_calls_look_up_only_listed_kernels(tmp_path, monkeypatch, combine_variant):
    monkeypatch.setenv(variants.COMBINE_ENV, combine_variant)
    listed = _listed(tmp_path)
    ops, fake = fake_ll_ops(R, M, H, E)
    g = torch.Generator().manual_seed(3)
    x = fake_cuda(torch.randn(M, H, generator=g).to(torch.bfloat16))
    idx = fake_cuda(torch.randn(M, E, generator=g).topk(K, dim=-1).indices)
    w = fake_cuda(torch.rand(M, K, generator=g))
    y = fake_cuda(torch.zeros(E // R, R * M, H, dtype=torch.bfloat16))
    for fp8 in (True, False):
        _, _, handle, _, _ = ops.low_latency_dispatch(x, idx, M, E, use_fp8=fp8)
    handle = (fake_cuda(handle[0]), fake_cuda(handle[1]), *handle[2:])
    ops.low_latency_combine(y, idx, w, handle)
    ops.low_latency_combine(y, idx, w, handle, use_logfmt=True)
    # FAKE current stream: the barrier launches on it, and this torch has no CUDA
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: type("S", (), {"cuda_stream": 0}))
    ops.clean_low_latency_buffer(M, H, E)
    looked_up = {spec for spec, _ in fake.launches}
    families = {s.family for s in looked_up}
    assert families >= {"ll_dispatch", "ll_combine", "ll_barrier"}      # LogFMT: per expert
    assert ("ll_combine_rank" in families) == (combine_variant == "per_rank")
    assert looked_up <= listed, f"not precompiled: {sorted(map(repr, looked_up - listed))}"


def test_normal_calls_look_up_only_listed_kernels(tmp_path):
    """Cached dispatch (BF16 and FP8 rows) and combine with and without weights."""
    listed = _listed(tmp_path)
    with no_graph_capture():
        cfg = Config(4, 8, 256, 6, 128)
        ops, fake, handle = fake_intranode_ops(R, T, H, cfg)
        g = torch.Generator().manual_seed(4)
        x = torch.randn(T, H, generator=g).to(torch.bfloat16)
        q, scales = ref.per_token_cast_to_fp8(x)
        for rows in (fake_cuda(x), (fake_cuda(q), fake_cuda(scales))):
            ops.dispatch(rows, handle, None, None, None, None, None, None, 1, 0, cfg, None, False,
                         False)
        y = fake_cuda(torch.randn(R * T, H, generator=g).to(torch.bfloat16))
        weights = fake_cuda(torch.rand(R * T, K, generator=g))
        ops.combine(y, handle, None, None, cfg, None, False, False)
        ops.combine(y, handle, weights, None, cfg, None, False, False)
    looked_up = {spec for spec, _ in fake.launches}
    assert {s.family for s in looked_up} == {"normal_dispatch", "normal_combine"}
    assert looked_up <= listed, f"not precompiled: {sorted(map(repr, looked_up - listed))}"
