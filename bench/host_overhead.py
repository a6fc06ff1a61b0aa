"""Where the host time of a cached normal dispatch / combine and of a low-latency dispatch /
combine (per_expert and per_rank, EPGEN_LL_COMBINE) goes (cProfile on rank 0). The CPU-only
counterpart with faked launches is bench/host_path_cpu.py. First, on rank 0, what one launch
costs by itself: an empty kernel taking a struct the size of the LL combine's, launched by
epgen's Kernel.launch, by cuda.bindings' cuLaunchKernel alone, and by libcuda's through ctypes
(the floor any Python launch path can reach); after each call, its breakdown: where the fast
lane replays it (runtime/fastcall.py), the replay's own stages (Plan.timed: matching the
arguments, the stream state, the outputs, the launches, the result) and the Python above it;
with EPGEN_FASTCALL=0, the Python path's parts from bench/host_parts.py (validation, spec
lookup, allocation, launches, rest).

    python bench/host_overhead.py --ranks 2
    EPGEN_LAUNCH_MPS=0 python bench/host_overhead.py --ranks 2   # ranks time-slicing one GPU:
                                           # the low-latency calls' one launch, as on a GPU each
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


# Cycles of the sleep kernel that holds the stream while the timed calls are issued (~40 ms
# at the H200's ~2 GHz; 100 calls take ~10 ms of host time): the calls only queue, so their
# host time is not bounded by the GPU (on 1x H200 with ranks sharing it, 798b932, the unheld
# LL times were near the shared GPU's kernel times).
HOLD_CYCLES = 80_000_000


# Held rounds of 100 calls a measurement: the host's other work only adds (the same code
# measured 7.8 and 11.2 us in single rounds an hour apart, 2a251bf), so the fastest round is
# the code's cost and the median says how noisy the host was.
ROUNDS = 5


def _measure(cases, out, plans) -> dict:
    """Host time per call of each (name, fn) (ROUNDS rounds of 100 calls after 10 with the
    stream held by a sleep kernel: the fastest and the median; 100 without), then a cProfile of
    100; returns name -> (fastest held us, the Plan that replayed its last call and that call's
    arguments, or None). plans: the ops family's fast-lane Plans (ops/plans.py), whose counts
    say how many calls it replayed."""
    import statistics

    import cProfile
    import io
    import pstats

    import torch
    helds = {}
    for name, fn in cases:
        for _ in range(10):
            fn()
        replay = _replayed_by(plans, fn)
        counts = plans.replayed, plans.missed
        rounds = [_wall_us(fn, 100, 0, hold=True) for _ in range(ROUNDS)]
        held = min(rounds)
        helds[name] = held, replay
        host = _wall_us(fn, 100, 0)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(100):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
        out.append(f"== {name}: {held:.1f} us host per call with the stream held (the calls "
                   f"only queue; fastest of {ROUNDS} rounds of 100, median "
                   f"{statistics.median(rounds):.1f}), {host:.1f} us unheld (100 calls; "
                   f"GPU-bound if larger); fast lane: {plans.replayed - counts[0]} of "
                   f"{100 * (ROUNDS + 2)} replayed, "
                   f"{plans.missed - counts[1]} had a Plan that did not match\n"
                   + s.getvalue()[-3500:])
    return helds


def _replayed_by(plans, fn):
    """(Plan, its arguments) of the Plan that replays fn's call, or None (the Python path)."""
    seen = []
    run = plans.run
    plans.run = lambda key, args: seen.append((key, args)) or run(key, args)
    try:
        fn()
    finally:
        del plans.run                  # the instance attribute: the method again
    plan = plans._plans.get(seen[-1][0]) if seen else None
    return (plan, seen[-1][1]) if plan is not None and plan(*seen[-1][1]) is not None else None


STAGES = ("match: arguments (dtype, shape, strides, alignment), guards, environment",
          "stream: the current stream, StreamOrder's state, cuStreamIsCapturing",
          "allocate: the outputs (at::empty, parts of a block, Python objects of returned ones)",
          "launch: copy each struct, patch its addresses, cuLaunchKernel",
          "finish: cuEventRecord, StreamOrder's update, the result")


def _stages(out, title, measured, launches):
    """The replay's own stages (Plan.timed, the fastest of ROUNDS rounds of 100 calls with the
    stream held), and the Python above it (the Buffer's method, the ops method, its Plan lookup,
    freeing the previous call's outputs): the fastest held time less them."""
    import torch
    whole_us, (plan, args) = measured
    rounds = []
    for _ in range(ROUNDS):
        torch.cuda.synchronize()
        torch.cuda._sleep(HOLD_CYCLES)
        rounds.append(plan.timed(args, 100))
    torch.cuda.synchronize()
    us = [n / 100 / 1e3 for n in min(rounds, key=sum)]
    rows = [f"| {name} | {v:.2f} |" for name, v in zip(STAGES, us)]
    out.append(f"\n{title}: {whole_us:.1f} us host per call (stream held), replayed: "
               f"{sum(us):.2f} us in the Plan ({launches} launch(es))\n| stage | us |\n|---|---|\n"
               + "\n".join(rows) + f"\n| Python: Buffer method, ops method, Plan lookup, the "
               f"previous outputs freed (the rest) | {whole_us - sum(us):.2f} |")


def _breakdown(out, rank, title, measured, parts, launches, launch_us):
    """The replay's stages where the fast lane replayed the call (on every rank: a replay
    launches the collective), else the Python path's parts (rank 0: they launch nothing)."""
    if measured[1] is not None:
        _stages(out, title, measured, launches)
    elif rank == 0:
        _parts(out, title, measured[0], parts, launches, launch_us)


def _wall_us(fn, calls: int, warmup: int, hold: bool = False) -> float:
    """us per call of fn, wall time, `calls` calls after `warmup`, the GPU idle before and
    after; `hold`: the stream held by a sleep kernel while the calls are issued."""
    import time

    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if hold:
        torch.cuda._sleep(HOLD_CYCLES)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    us = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return us


def _parts(out, title, whole_us, parts, launches, launch_us):
    """The breakdown of one call (bench/host_parts.py, at the call's arguments, real ops and
    tensors; each part 200 times after 20, wall time): the parts, the launches at the bare
    launch's cost, and the rest (argument packing, stream bookkeeping, glue)."""
    rows, rest = [], whole_us - launches * launch_us
    for name, fn, times in parts:
        us = _wall_us(fn, 200, 20)
        rest -= us * times
        rows.append(f"| {name}{f' (x{times})' if times != 1 else ''} | {us:.2f} |")
    out.append(f"\n{title}: {whole_us:.1f} us host per call (stream held)\n| part | us |\n|---|---|\n"
               + "\n".join(rows) + f"\n| {launches} launch(es) at the bare launch's "
               f"{launch_us:.2f} us | {launches * launch_us:.2f} |\n"
               f"| rest: argument packing, stream bookkeeping, glue | {rest:.1f} |")


EMPTY_KERNEL = ('struct Args { unsigned long long w[%d]; };\n'
                'extern "C" __global__ void epgen_empty(Args a) {}\n')


def empty_kernel_cubin(arch: str, nbytes: int) -> bytes:
    """An empty kernel taking a by-value struct of nbytes (a multiple of 8), compiled by NVRTC."""
    from cuda.bindings import nvrtc
    err, prog = nvrtc.nvrtcCreateProgram((EMPTY_KERNEL % (nbytes // 8)).encode(), b"empty.cu",
                                         0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, err
    opts = [f"-arch={arch}".encode()]
    (res,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    assert res == nvrtc.nvrtcResult.NVRTC_SUCCESS, res
    err, n = nvrtc.nvrtcGetCUBINSize(prog)
    buf = b" " * n
    (err,) = nvrtc.nvrtcGetCUBIN(prog, buf)
    nvrtc.nvrtcDestroyProgram(prog)
    return buf


def _bare_launches(out):
    """us per launch of an empty kernel, three ways, 2000 launches each after 100."""
    import ctypes

    import torch
    from epgen.jit import toolchain
    from epgen.jit.kernel_args import LowLatencyCombineArgs
    from epgen.runtime.cuda import check, driver
    from epgen.runtime.module import Kernel
    d = driver()
    stream = torch.cuda.current_stream().cuda_stream
    torch.cuda.synchronize()        # torch's context is current before the module is loaded
    nbytes = (ctypes.sizeof(LowLatencyCombineArgs) + 7) // 8 * 8
    module = check(d.cuModuleLoadData(empty_kernel_cubin(toolchain.gpu_arch(), nbytes)), "load")
    func = check(d.cuModuleGetFunction(module, b"epgen_empty"), "get function")
    args = (ctypes.c_ubyte * nbytes)()
    params = (ctypes.c_void_p * 1)(ctypes.addressof(args))
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernel.restype = ctypes.c_int
    lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    fptr, addr = int(func), ctypes.addressof(params)
    kernel = Kernel(func, "epgen_empty")
    ways = (("epgen Kernel.launch (cuda.bindings + params array + result check)",
             lambda: kernel.launch(1, 32, args, stream)),
            ("cuda.bindings cuLaunchKernel alone",
             lambda: d.cuLaunchKernel(func, 1, 1, 1, 32, 1, 1, 0, stream, addr, 0)),
            ("libcuda cuLaunchKernel through ctypes",
             lambda: lib.cuLaunchKernel(fptr, 1, 1, 1, 32, 1, 1, 0, stream, addr, None)))
    for name, fn in ways:
        us = _wall_us(fn, 2000, 100)
        out.append(f"== bare launch, {name}: {us:.2f} us per launch ({nbytes}-byte struct)")
        if name.startswith("epgen"):
            epgen_us = us
    return epgen_us


def _worker(rank, world):
    import torch
    import torch.distributed as dist
    import epgen
    from bench import host_parts
    from epgen import launch
    from epgen import env
    from epgen.cache.store import default_root
    from epgen.runtime import fastcall
    if rank == 0 and env.flag("EPGEN_FASTCALL", True):
        fastcall.build(default_root())   # as `epgen precompile` would: the lane is on from the
    dist.barrier()                       # first call (a fresh build runs in the background)
    out = []
    launch_us = _bare_launches(out) if rank == 0 else 0.0
    cfg = epgen.Config(24, 8, 256, 6, 128)
    buf = epgen.Buffer(dist.group.WORLD, cfg.get_nvl_buffer_size_hint(7168 * 2, world), 0)
    x = torch.randn(4096, 7168, device="cuda").to(torch.bfloat16)
    idx = torch.randn(4096, 256, device="cuda").topk(8, dim=-1).indices
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 256)
    recv, *_, handle, _ = buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                       num_tokens_per_expert=per_expert, topk_idx=idx,
                                       topk_weights=torch.rand(4096, 8, device="cuda"), config=cfg)
    cases = (("cached dispatch", lambda: buf.dispatch(x, handle=handle, config=cfg)),
             ("combine", lambda: buf.combine(recv, handle, config=cfg)))
    held = _measure(cases, out, buf._intranode._plans)
    torch.cuda.synchronize()
    out.append(f"== host fast lane (runtime/fastcall.py): {fastcall.status()}")
    dev, ops = torch.device("cuda", torch.cuda.current_device()), buf._intranode
    _breakdown(out, rank, "cached dispatch", held["cached dispatch"],
               host_parts.normal_dispatch_parts(ops, x, handle, cfg, 4096, 7168, dev), 1,
               launch_us)
    _breakdown(out, rank, "combine", held["combine"],
               host_parts.normal_combine_parts(ops, recv, handle, cfg, 4096, 7168, dev), 1,
               launch_us)
    dist.barrier()
    dist.barrier()
    buf.destroy()
    # Low latency at DeepEP's shape: 128 tokens, hidden 7168, top-8 of 288 experts, FP8.
    M, H, E = 128, 7168, 288
    buf = epgen.Buffer(dist.group.WORLD, 0,
                       epgen.Buffer.get_low_latency_rdma_size_hint(M, H, world, E),
                       low_latency_mode=True, num_qps_per_rank=E // world)
    x = torch.randn(M, H, device="cuda").to(torch.bfloat16)
    idx = torch.randn(M, E, device="cuda").topk(8, dim=-1).indices
    w = torch.rand(M, 8, device="cuda")
    _, _, ll_handle, _, _ = buf.low_latency_dispatch(x, idx, M, E)
    y = torch.zeros(E // world, world * M, H, dtype=torch.bfloat16, device="cuda")

    def combine(variant):
        os.environ["EPGEN_LL_COMBINE"] = variant      # read at each call, the same on every rank
        return lambda: buf.low_latency_combine(y, idx, w, ll_handle)
    dev, ops, K = torch.device("cuda", torch.cuda.current_device()), buf._ll, 8
    # one launch a call where both phases run in one (a GPU per rank, or time-sliced ranks)
    launches = 1 if ops.fuse_phases else 2
    out.append(f"== low latency: {launches} launch(es) a call without a hook "
               f"(fuse_phases={ops.fuse_phases}, placement {os.environ.get(launch.MODE_ENV)})")
    held = _measure((("LL dispatch FP8", lambda: buf.low_latency_dispatch(x, idx, M, E)),), out,
                    ops._plans)
    _breakdown(out, rank, "LL dispatch FP8", held["LL dispatch FP8"],
               host_parts.ll_dispatch_parts(ops, x, idx, M, H, E, K, world, dev), launches,
               launch_us)
    dist.barrier()
    for variant in ("per_expert", "per_rank"):
        name = f"LL combine {variant}"
        held = _measure(((name, combine(variant)),), out, ops._plans)
        _breakdown(out, rank, name, held[name], host_parts.ll_combine_parts(
            ops, y, idx, w, ll_handle, M, H, E, K, world, variant == "per_rank", dev),
            launches, launch_us)
        dist.barrier()
    os.environ.pop("EPGEN_LL_COMBINE", None)
    dist.barrier()
    buf.destroy()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    from tests import gpu_harness
    res = gpu_harness.run_ranks(args.ranks, _worker, timeout_s=300)
    print("\n".join(res[0]))


if __name__ == "__main__":
    main()
