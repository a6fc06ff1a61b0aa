"""GPU: NVSHMEM bootstrap over torch.distributed, symmetric memory + peer mappings, loading
and launching a generated kernel (get_dispatch_layout) against the golden model, the error word."""
from __future__ import annotations

import os

import pytest

from tests import gpu_harness

pytestmark = pytest.mark.gpu


def _context(world):
    import torch
    import torch.distributed as dist
    from epgen.jit import toolchain
    from epgen.ops.context import OpsContext
    from epgen.runtime import nvshmem
    from epgen.runtime.errors import ErrorWord
    from epgen.runtime.symmetric import SymmetricRegion
    device = torch.device("cuda", torch.cuda.current_device())
    host = nvshmem.host(heap_bytes=64 << 20)
    pes = [dist.get_global_rank(dist.group.WORLD, r) for r in range(world)]
    region = SymmetricRegion(host, 1 << 20, device, pes)
    return OpsContext(rank=dist.get_rank(), num_ranks=world,
                      device=device, pes=pes, nvshmem=host, nvl=region, rdma=None,
                      comm_stream=torch.cuda.Stream(device), errors=ErrorWord(),
                      arch=toolchain.resolve_arch())


def _worker(rank, world):
    import time

    import torch
    import torch.distributed as dist
    from epgen import reference
    from epgen.runtime.cuda import wrap_device_memory as wrap_peer
    from epgen.ops.layout import LayoutOps
    from epgen.runtime.errors import EpgenDeviceError
    os.environ.setdefault("EPGEN_TIMEOUT_S", gpu_harness.deadline_s(20))
    results = []
    ctx = _context(world)
    # Symmetric memory: my pattern, then every peer's pattern read through its NVLink mapping.
    ctx.nvl.bytes.view(torch.int32)[:1024] = rank * 1000 + torch.arange(1024, device=ctx.device,
                                                                          dtype=torch.int32)
    torch.cuda.synchronize()
    ctx.nvshmem.barrier_all()
    for peer in range(world):
        addr = ctx.nvl.peer_addrs[peer]
        assert addr, f"rank {rank}: no P2P mapping of peer {peer}'s symmetric heap"
        got = wrap_peer(addr, 4096, ctx.device).view(torch.int32).clone()
        expect = peer * 1000 + torch.arange(1024, device=ctx.device, dtype=torch.int32)
        assert torch.equal(got, expect), f"peer {peer} pattern mismatch"
    results.append(("symmetric memory + peer mappings", "ok"))

    ops = LayoutOps(ctx)
    g = torch.Generator(device="cpu").manual_seed(1234 + rank)
    for num_tokens, num_experts, k in ((4096, 256, 8), (0, 64, 8), (37, 32 * world, 16)):
        scores = torch.randn(num_tokens, num_experts, generator=g)
        topk = scores.topk(k, dim=1).indices
        topk[torch.rand(num_tokens, k, generator=g) < 0.1] = -1
        topk = topk.to(ctx.device)
        t0 = time.perf_counter()
        per_rank, _, per_expert, in_rank, _ = ops.get_dispatch_layout(topk, num_experts)
        torch.cuda.synchronize()
        ref = reference.get_dispatch_layout(topk, num_experts, world)
        assert torch.equal(per_rank.cpu(), ref[0].cpu().to(torch.int32)), "num_tokens_per_rank"
        assert torch.equal(per_expert.cpu(), ref[1].cpu().to(torch.int32)), "num_tokens_per_expert"
        assert torch.equal(in_rank.cpu(), ref[2].cpu()), "is_token_in_rank"
        results.append((f"layout T={num_tokens} E={num_experts} K={k} "
                        f"({(time.perf_counter() - t0) * 1e3:.1f} ms first call)", "ok"))
    # A bad expert index sets the error word (no trap) and the next call raises.
    bad = torch.full((4, 2), num_experts + 5, dtype=torch.int64, device=ctx.device)
    ops.get_dispatch_layout(bad, num_experts)
    torch.cuda.synchronize()
    try:
        ops.get_dispatch_layout(bad, num_experts)
        results.append(("error word", "no error raised"))
    except EpgenDeviceError as e:
        ok = f"rank {rank}" in str(e) and "get_dispatch_layout" in str(e)
        results.append(("error word", "ok" if ok else f"bad message: {e}"))
    dist.barrier()
    return results


@pytest.mark.parametrize("world", gpu_harness.rank_counts())
def test_runtime(world):
    gpu_harness.require_gpus(world)
    per_rank = gpu_harness.run_ranks(world, _worker, timeout_s=180)
    failures = [f"rank {r}: {name}: {status}" for r, res in enumerate(per_rank)
                for name, status in res if status != "ok"]
    for r, res in enumerate(per_rank):
        for name, status in res:
            print(f"rank {r}: {name}: {status}")
    assert not failures, "\n".join(failures)
