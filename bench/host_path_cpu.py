"""CPU: the Python side of a low-latency dispatch / combine call, with the launch faked.

Runs epgen's real LowLatencyOps (argument checks, spec lookup, output allocation, argument
struct packing, the two-phase stream logic) on CPU tensors against the FAKES of
tests/fake_launch.py: a host tensor for the symmetric region, no error word, no CUDA streams,
CPU tensors that say they are CUDA ones (FakeCudaTensor: ~0.3 us more per attribute read than
a plain tensor, so the checks read high), and FakeLaunchKernel (packs the kernel parameters as
the real launch does, then returns instead of calling cuLaunchKernel).
What it does not see: cuLaunchKernel itself (~8 us from Python on an H200 host, issue 15),
torch's CUDA caching allocator instead of the CPU one, stream/event calls. The real end-to-end
number comes from bench/host_overhead.py on a GPU.

    python bench/host_path_cpu.py [--calls 2000]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from epgen import variants  # noqa: E402
from epgen.ops import low_latency as ll  # noqa: E402
from tests.fake_launch import fake_cuda, fake_ll_ops  # noqa: E402


def per_call_us(fn, calls, batches=9):
    """The fastest of `batches` batches (the host is shared: the minimum is the code's cost)."""
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls // batches):
            fn()
        best = min(best, (time.perf_counter() - t0) / (calls // batches) * 1e6)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    a = p.parse_args(argv)
    R, M, H, E, K = 2, 128, 7168, 288, 8
    ops, fake = fake_ll_ops(R, M, H, E, record=False)
    x = fake_cuda(torch.randn(M, H).to(torch.bfloat16))
    idx = fake_cuda(torch.randn(M, E).topk(K, dim=-1).indices)
    w = fake_cuda(torch.rand(M, K))
    (recv, _), _, handle, _, _ = ops.low_latency_dispatch(x, idx, M, E)
    handle = (fake_cuda(handle[0]), fake_cuda(handle[1]), *handle[2:])
    y = fake_cuda(torch.zeros(E // R, R * M, H, dtype=torch.bfloat16))

    def combine(variant):
        def call():
            os.environ[variants.COMBINE_ENV] = variant
            return ops.low_latency_combine(y, idx, w, handle)
        return call
    kernel = ops.ctx.kernel(ll.ll_combine_spec(H, K, E, R))
    rows = [
        ("LL dispatch FP8 (whole call; CPU allocation of recv_x dominates)",
         lambda: ops.low_latency_dispatch(x, idx, M, E)),
        ("LL combine per_expert (whole call, 2 launches)", combine("per_expert")),
        ("LL combine per_rank (whole call, 1 launch)", combine("per_rank")),
        ("  of which: dispatch spec lookup", lambda: ll.ll_dispatch_spec(
            H, K, E, R, use_fp8=True, round_scale=False, use_ue8m0=False)),
        ("  of which: combine validation (checks + layout)", lambda: (
            ops._check_handle(handle), ll.check_tensor("x", y, torch.bfloat16, (E // R, R * M, H)),
            ll.check_topk_idx(idx), ll.check_tensor("topk_weights", w, torch.float32, (M, K)))),
        ("  of which: one combine argument struct", lambda: ops._fill_common(
            ll.LowLatencyCombineArgs(), "low_latency_combine", ll._data_layout(M, H, R, E),
            w, M, M, 1)),
        ("  of which: one FAKE launch (parameter packing)", lambda: kernel.launch(
            132, 1024, ll.LowLatencyCombineArgs(), 0)),
    ]
    print(f"CPU Python-side time per call (fastest of 9 batches of {a.calls // 9}), FAKE "
          f"launches (no cuLaunchKernel), EP{R} at DeepEP's shape; torch {torch.__version__}")
    for name, fn in rows:
        print(f"| {name} | {per_call_us(fn, a.calls):.1f} us |")
    os.environ.pop(variants.COMBINE_ENV, None)


if __name__ == "__main__":
    main()
