"""CPU: the Python side of a low-latency dispatch / combine and of a cached normal-mode dispatch /
combine, with the launch faked, and where it goes.

Runs epgen's real LowLatencyOps and IntranodeOps (argument checks, spec lookup, output
allocation, argument struct packing, the two-phase stream logic) on CPU tensors against the
FAKES of tests/fake_launch.py: host memory for the symmetric regions, no error word, no CUDA
streams (FakeStreams, FakeLaunchContext.on_comm_stream), CPU tensors that say they are CUDA
ones (FakeCudaTensor) and FakeLaunchKernel (packs the kernel parameters as the real launch does,
then returns instead of calling cuLaunchKernel; it counts the launches).
What it does not see: cuLaunchKernel itself (~5-8 us from Python on an H200 host, issue 15),
torch's CUDA caching allocator instead of the CPU one (the "allocation" rows are the CPU
allocator's: large ones are an mmap each here, a free-list hit on a GPU), stream/event calls.
The end-to-end number comes from bench/host_overhead.py on a GPU.

Each row is timed in `--batches` batches of `--calls` calls, in the thread's CPU time
(time.thread_time_ns: a shared host's other jobs take the CPU away, which wall time would
count); it prints the fastest batch (the code's cost: other jobs only add, through caches and
the sibling hyperthread) and the median batch, per call. The parts are the op's own pieces
called alone at the same arguments; "rest" is the whole call less the parts (argument packing,
glue), from the fastest batches. "calls" is how many Python and C functions one call runs
(cProfile's count): the number that does not move with the host's load.

    python bench/host_path_cpu.py [--calls 20] [--batches 200] [--only ll|normal]
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from epgen import variants  # noqa: E402
from epgen.config import Config  # noqa: E402
from epgen.jit import specs  # noqa: E402
from epgen.ops import intranode  # noqa: E402
from epgen.ops import low_latency as ll  # noqa: E402
from bench import host_parts  # noqa: E402
from tests.fake_launch import (fake_cuda, fake_intranode_ops, fake_ll_ops,  # noqa: E402
                               no_graph_capture)


def per_call_us(fn, calls, batches):
    """(fastest, median) batch of `batches` batches of `calls` calls, in us per call."""
    for _ in range(50):
        fn()
    times = []
    for _ in range(batches):
        t0 = time.thread_time_ns()
        for _ in range(calls):
            fn()
        times.append((time.thread_time_ns() - t0) / calls / 1e3)
    return min(times), statistics.median(times)


def functions_per_call(fn, calls=100):
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    return pstats.Stats(prof).total_calls / calls - 1     # less fn itself


def launches_per_call(fake, fn):
    fake.record, fake.launches[:] = True, []
    fn()
    n = len(fake.launches)
    fake.record, fake.launches[:] = False, []
    return n


def table(title, whole, parts, fake, a):
    """Rows: the whole call, its parts, the rest (whole - parts, fastest batches)."""
    name, fn = whole
    n = launches_per_call(fake, fn)
    lo, med = per_call_us(fn, a.calls, a.batches)
    print(f"\n{title}\n| part | fastest us | median us |\n|---|---|---|")
    print(f"| {name} ({n} fake launch{'es' if n != 1 else ''}, "
          f"{functions_per_call(fn):.0f} calls) | {lo:.1f} | {med:.1f} |")
    rest = lo
    for pname, pfn, times in parts:
        plo, pmed = per_call_us(pfn, a.calls, a.batches)
        rest -= plo * times
        print(f"| {pname}{f' (x{times})' if times != 1 else ''} | {plo:.2f} | {pmed:.2f} |")
    print(f"| rest: argument packing, glue (whole - parts) | {rest:.1f} | |")


def ll_rows(a):
    R, M, H, E, K = 2, 128, 7168, 288, 8
    ops, fake = fake_ll_ops(R, M, H, E, record=False)
    x = fake_cuda(torch.randn(M, H).to(torch.bfloat16))
    idx = fake_cuda(torch.randn(M, E).topk(K, dim=-1).indices)
    w = fake_cuda(torch.rand(M, K))
    (recv, _), _, handle, _, _ = ops.low_latency_dispatch(x, idx, M, E)
    handle = (fake_cuda(handle[0]), fake_cuda(handle[1]), *handle[2:])
    y = fake_cuda(torch.zeros(E // R, R * M, H, dtype=torch.bfloat16))
    fp8 = dict(use_fp8=True, round_scale=False, use_ue8m0=False)

    def fake_launch(args_type, spec):
        kernel = ops.ctx.kernel(spec)
        return lambda: kernel.launch(ops.sms, spec.threads, args_type(), 0)

    table(f"LL dispatch FP8, EP{R}: M={M}, hidden={H}, top-{K} of {E} experts",
          ("whole call", lambda: ops.low_latency_dispatch(x, idx, M, E)),
          host_parts.ll_dispatch_parts(ops, x, idx, M, H, E, K, R, "cpu") +
          [("one fake launch (parameter packing)",
            fake_launch(ll.LowLatencyDispatchArgs, ll.ll_dispatch_spec(H, K, E, R, **fp8)), 2)],
          fake, a)

    for variant in ("per_expert", "per_rank"):
        os.environ[variants.COMBINE_ENV] = variant
        per_rank = variant == "per_rank"
        spec = ll.ll_combine_spec(H, K, E, R, per_rank)
        table(f"LL combine {variant}, EP{R}",
              ("whole call", lambda: ops.low_latency_combine(y, idx, w, handle)),
              host_parts.ll_combine_parts(ops, y, idx, w, handle, M, H, E, K, R, per_rank, "cpu") +
              [("one fake launch (parameter packing)",
                fake_launch(ll.LowLatencyCombineRankArgs if per_rank else ll.LowLatencyCombineArgs,
                            spec), 1 if per_rank else 2)],
              fake, a)
    os.environ.pop(variants.COMBINE_ENV, None)


def normal_rows(a):
    # bench/host_overhead.py's shape: 4096 tokens, hidden 7168, top-8 of 256, Config(24, ...)
    R, T, H = 2, 4096, 7168
    cfg = Config(24, 8, 256, 6, 128)
    ops, fake, handle = fake_intranode_ops(R, T, H, cfg, record=False)
    rows = handle[3].size(0)
    x = fake_cuda(torch.randn(T, H).to(torch.bfloat16))
    y = fake_cuda(torch.randn(rows, H).to(torch.bfloat16))
    dspec = specs.normal_dispatch_rows_spec(2 * H, 0, 0, None, R)
    cspec = specs.normal_combine_spec(H, 0, R)

    def fake_launch(args_type, spec):
        kernel = ops.ctx.kernel(spec)
        return lambda: kernel.launch(cfg.num_sms, spec.threads, args_type(), 0)

    table(f"Normal cached dispatch, EP{R}: {T} tokens, hidden {H} BF16, {rows} rows received "
          "(CPU allocator: the 117 MB recv_x an mmap)",
          ("whole call", lambda: ops.dispatch(x, handle, None, None, None, None, None, None, 1, 0,
                                              cfg, None, False, False)),
          host_parts.normal_dispatch_parts(ops, x, handle, cfg, T, H, "cpu") +
          [("one fake launch (parameter packing)",
            fake_launch(intranode.NormalDispatchArgs, dspec), 1)],
          fake, a)
    table(f"Normal combine, EP{R}: {rows} rows -> {T} tokens, no top-k weights",
          ("whole call", lambda: ops.combine(y, handle, None, None, cfg, None, False, False)),
          host_parts.normal_combine_parts(ops, y, handle, cfg, T, H, "cpu") +
          [("one fake launch (parameter packing)",
            fake_launch(intranode.NormalCombineArgs, cspec), 1)],
          fake, a)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20, help="calls per batch")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--only", choices=("ll", "normal"))
    a = p.parse_args(argv)
    print(f"CPU Python-side thread time per call, FAKE launches (no cuLaunchKernel); torch "
          f"{torch.__version__}; {a.batches} batches of {a.calls} calls; "
          f"load {os.getloadavg()[0]:.2f}")
    if a.only != "normal":
        ll_rows(a)
    if a.only != "ll":
        with no_graph_capture():
            normal_rows(a)


if __name__ == "__main__":
    main()
