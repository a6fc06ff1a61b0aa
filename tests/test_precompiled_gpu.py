"""A spec file precompiled into an empty cache serves every operation family with EPGEN_JIT=0.

`epgen precompile` expands a model (specfile.normal_mode_specs / low_latency_specs) with the
same spec builders the operations call (specs.py); this runs the operations at the file's
shapes against a cache holding only what the precompile built, with compiling forbidden: a
builder that drifted from the expansion (another threads, another canonical form) fails here
with JitDisabledError, naming the kernel it missed. The results are checked against
epgen.reference too (the serving-pattern suite's checks), so a kernel that was found is also
the right one. The families: normal mode in a node and across two virtual nodes
(EPGEN_RANKS_PER_NODE: the model's ranks_per_node), low latency with the per-expert combine
and the per-rank one (EPGEN_LL_COMBINE=per_rank, in the precompile and the calls alike).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import gpu_harness
from tests import test_internode_gpu as ti
from tests import test_low_latency_gpu as tl
from tests import test_serving_patterns_gpu as sp

pytestmark = pytest.mark.gpu

H, K, LOCAL_EXPERTS = 2048, 8, 4
M = tl.M                      # low-latency num_max_dispatch_tokens_per_rank


def _spec_file(path, R: int) -> None:
    with open(path, "w") as f:
        f.write(f"""models:
  - name: precompiled-test
    hidden: {H}
    num_experts: {LOCAL_EXPERTS * R}
    num_topk: {K}
    ep_sizes: [{R}]
    modes:
      normal: {{dtypes: [bf16, fp8]}}
      low_latency: {{dispatch_dtypes: [fp8, bf16]}}
  - name: precompiled-test-two-nodes
    hidden: {H}
    num_experts: {LOCAL_EXPERTS * R}
    num_topk: {K}
    ep_sizes: [{R}]
    ranks_per_node: {R // 2}
    modes:
      normal: {{dtypes: [bf16, fp8]}}
""")


def _entries(cache: str) -> list[str]:
    return sorted(n for n in os.listdir(cache) if not n.startswith("."))


def _normal(buf, rank, R, fp8, cid):
    """Layout, uncached dispatch with top-k, combine with and without weights (the K and 0
    combine kernels), cached dispatch (the no-top-k kernel) and its combine."""
    import torch
    E = LOCAL_EXPERTS * R
    case = sp._normal_case(cid, R, H, K, E, fp8)
    idx, w = case[2][rank], case[3][rank]
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    recv, r_idx, r_w, counts, handle, _ = buf.dispatch(
        sp._x_in(case, rank), num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx,
        topk_weights=w)
    sp._check_normal_dispatch(rank, case, E, recv, r_idx, r_w, counts)
    ys, yws = sp._expert_rows(cid, R, case[4], H, K)
    combined, combined_w, _ = buf.combine(ys[rank], handle, topk_weights=yws[rank])
    sp._check_normal_combine(rank, case, ys, combined, combined_w, yws)
    combined, _, _ = buf.combine(ys[rank], handle)
    sp._check_normal_combine(rank, case, ys, combined)
    again, _, _, _, _, _ = buf.dispatch(sp._x_in(case, rank), handle=handle)
    rx = again[0] if fp8 else again
    first = recv[0] if fp8 else recv
    assert torch.equal(rx.view(torch.uint8), first.view(torch.uint8)), \
        "cached dispatch received other rows than the dispatch it reuses"
    torch.cuda.synchronize()
    buf.check_errors()


def _low_latency(buf, rank, R, fp8, cid):
    """clean_low_latency_buffer (the barrier kernel), dispatch in the format, combine."""
    import torch
    E = LOCAL_EXPERTS * R
    buf.clean_low_latency_buffer(M, H, E)
    ins = sp._ll_case(cid, R, H, K, E)
    x, idx, w = ins[rank]
    recv, count, handle, _, _ = buf.low_latency_dispatch(x, idx, M, E, use_fp8=fp8)
    torch.cuda.synchronize()
    buf.check_errors()
    tl._check_dispatch(rank, ins, E, (recv, count, handle), fp8, False, False)
    y = tl._expert_out(recv, fp8, H)
    combined, _, _ = buf.low_latency_combine(y, idx, w, handle)
    torch.cuda.synchronize()
    buf.check_errors()
    tl._check_combine(rank, ins, y, handle, combined)


def _internode(buf, rank, R, fp8):
    """Across two virtual nodes: layout, uncached dispatch with top-k, combine with and without
    weights, cached dispatch (the no-top-k kernel), against reference_internode."""
    import torch
    import epgen
    from epgen import reference_internode as iref
    E, L, T = LOCAL_EXPERTS * R, R // 2, 96
    config = epgen.Config(*ti.ROOMY)
    C = config.num_sms // 2
    cpu = [ti._inputs(r, R, L, E, K, T, "any", H, fp8, salt=5) for r in range(R)]
    in_ranks = [iref.get_dispatch_layout(c[0], E, R, L)[3] for c in cpu]
    received = [sum(int(m[:, j].sum()) for m in in_ranks) for j in range(R)]
    ys = [torch.randn(n, H, generator=torch.Generator().manual_seed(11 * j)).to(torch.bfloat16)
          for j, n in enumerate(received)]
    yws = [torch.rand(n, K, generator=torch.Generator().manual_seed(17 * j))
           for j, n in enumerate(received)]
    idx, w, x, scales = (None if v is None else v.cuda() for v in cpu[rank])
    rows = (x, scales) if fp8 else x
    per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    recv, _, _, _, handle, _ = buf.dispatch(
        rows, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx,
        topk_weights=w, config=config)
    weighted, weights, _ = buf.combine(ys[rank].cuda(), handle, topk_weights=yws[rank].cuda(),
                                       config=config)
    plain, _, _ = buf.combine(ys[rank].cuda(), handle, config=config)
    again = buf.dispatch(rows, handle=handle, config=config)[0]
    torch.cuda.synchronize()
    buf.check_errors()
    exp = iref.dispatch([c[2] for c in cpu], [c[0] for c in cpu], [c[1] for c in cpu], E, rank,
                        L, C, x_scales=[c[3] for c in cpu] if fp8 else None,
                        is_token_in_ranks=in_ranks)
    for what, got in (("dispatch", recv), ("cached dispatch", again)):
        got_x = got[0] if fp8 else got
        assert torch.equal(ti._bits(got_x.cpu()), ti._bits(exp.recv_x)), f"{what}: recv_x differs"
    ec = iref.combine(ys, in_ranks, rank, L, topk_weights=yws)
    assert torch.equal(ti._bits(weighted.cpu()), ti._bits(ec.combined_x)), "combine differs"
    assert torch.equal(weights.cpu(), ec.combined_topk_weights), "combined weights differ"
    assert torch.equal(ti._bits(plain.cpu()), ti._bits(iref.combine(ys, in_ranks, rank, L).combined_x)), \
        "combine without weights differs"


def _worker(rank, world, cache):
    os.environ.setdefault("EPGEN_TIMEOUT_S", gpu_harness.deadline_s(20))
    os.environ["EPGEN_CACHE_DIR"] = cache
    os.environ["EPGEN_JIT"] = "0"              # a miss raises JitDisabledError
    import torch.distributed as dist
    from epgen import Buffer
    E = LOCAL_EXPERTS * world
    group = dist.group.WORLD
    num_nvl = max(c.get_nvl_buffer_size_hint(H * 2, world)
                  for c in (Buffer.get_dispatch_config(world), Buffer.get_combine_config(world)))
    num_rdma = Buffer.get_low_latency_rdma_size_hint(M, H, world, E)
    # Normal mode runs one block per channel, all resident: at most this rank's share of SMs
    # where ranks share a GPU (as the serving-pattern suite does).
    Buffer.set_num_sms(gpu_harness.usable_sms(20)[0])
    buf = Buffer(group, num_nvl, num_rdma, low_latency_mode=True,
                 num_qps_per_rank=max(Buffer.num_sms, E // world))
    results = []
    try:
        jobs = [(f"normal {'fp8' if fp8 else 'bf16'}",
                 lambda fp8=fp8, c=c: _normal(buf, rank, world, fp8, 900 + c))
                for c, fp8 in enumerate((False, True))]
        jobs += [(f"low latency {'fp8' if fp8 else 'bf16'}",
                  lambda fp8=fp8, c=c: _low_latency(buf, rank, world, fp8, 910 + c))
                 for c, fp8 in enumerate((True, False))]
        jobs.append(("low latency, the per-rank combine", lambda: _per_rank(buf, rank, world)))
        tl._run_jobs(jobs, results)
    finally:
        buf.destroy()
        Buffer.set_num_sms(20)
    os.environ["EPGEN_RANKS_PER_NODE"] = str(world // 2)
    buf = Buffer(group, 64 << 20, 32 << 20)
    try:
        tl._run_jobs([(f"two nodes {'fp8' if fp8 else 'bf16'}",
                       lambda fp8=fp8: _internode(buf, rank, world, fp8)) for fp8 in (False, True)],
                     results)
    finally:
        buf.destroy()
        os.environ.pop("EPGEN_RANKS_PER_NODE")
    return results


def _per_rank(buf, rank, R):
    """The low-latency BF16 round with EPGEN_LL_COMBINE=per_rank: its combine is the per-rank
    kernel at this shape (asserted, so the case cannot pass on the per-expert one)."""
    from epgen.ops.low_latency import combine_runs_per_rank
    os.environ["EPGEN_LL_COMBINE"] = "per_rank"
    try:
        assert combine_runs_per_rank(M, H, R, LOCAL_EXPERTS * R, K, False, False), \
            "the per-rank combine does not run at this shape: the case would test nothing"
        _low_latency(buf, rank, R, False, 920)
    finally:
        os.environ.pop("EPGEN_LL_COMBINE")


# The quick tier at the first rank count only: each count is a fresh compile of the model's
# kernels into an empty cache plus fresh rank processes (33-54 s a count on the H200, the
# quick tier's largest module); the full tier runs every count.
@pytest.mark.parametrize("num_ranks", gpu_harness.select(gpu_harness.rank_counts(), [0]))
def test_precompiled_cache_serves_every_family(num_ranks, tmp_path, monkeypatch):
    from epgen.jit.specs import FAMILIES
    from epgen.specfile import load_spec_file
    gpu_harness.require_gpus(num_ranks)
    spec, cache = str(tmp_path / "model.yaml"), str(tmp_path / "cache")
    _spec_file(spec, num_ranks)
    with monkeypatch.context() as m:
        m.setenv("EPGEN_LL_COMBINE", "per_rank")
        families = {s.family for s in load_spec_file(spec).specs}
    assert families == set(FAMILIES), f"the spec file misses {set(FAMILIES) - families}"
    env = {k: v for k, v in os.environ.items() if k not in ("EPGEN_CACHE_DIR", "EPGEN_JIT")}
    env["EPGEN_LL_COMBINE"] = "per_rank"      # the per-rank kernel too (specfile.low_latency_specs)
    out = subprocess.run([sys.executable, "-m", "epgen", "precompile", "--cache-dir", cache,
                          "--spec", spec, "--jobs", str(min(8, os.cpu_count() or 1))],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    built = _entries(cache)
    assert built, f"precompile built nothing into {cache}: {out.stderr[-2000:]}"
    # fresh: no kernel loaded before, so every family's lookup goes to the cache
    bad = gpu_harness.failures(gpu_harness.run_ranks(num_ranks, _worker, cache, timeout_s=280,
                                                     fresh=True))
    assert not bad, "\n".join(bad)
    assert _entries(cache) == built, "a kernel was compiled after the precompile"
