"""Where the host time of a cached normal dispatch / combine and of a low-latency dispatch /
combine (per_expert and per_rank, EPGEN_LL_COMBINE) goes (cProfile on rank 0). The CPU-only
counterpart with faked launches is bench/host_path_cpu.py. First, on rank 0, what one launch
costs by itself: an empty kernel taking a struct the size of the LL combine's, launched by
epgen's Kernel.launch, by cuda.bindings' cuLaunchKernel alone, and by libcuda's through ctypes
(the floor any Python launch path can reach).

    python bench/host_overhead.py --ranks 2
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


def _host_us(fn, calls: int, hold: bool) -> float:
    import time

    import torch
    torch.cuda.synchronize()
    if hold:
        torch.cuda._sleep(HOLD_CYCLES)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    us = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return us


def _measure(cases, out):
    """Host time per call of each (name, fn) (100 calls after 10: with the stream held by a
    sleep kernel, and without), then a cProfile of 100."""
    import cProfile
    import io
    import pstats

    import torch
    for name, fn in cases:
        for _ in range(10):
            fn()
        held = _host_us(fn, 100, hold=True)
        host = _host_us(fn, 100, hold=False)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(100):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
        out.append(f"== {name}: {held:.1f} us host per call with the stream held (the calls "
                   f"only queue), {host:.1f} us unheld (100 calls; GPU-bound if larger)\n"
                   + s.getvalue()[-3500:])


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
    import time

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
        for _ in range(100):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(2000):
            fn()
        us = (time.perf_counter() - t0) / 2000 * 1e6
        torch.cuda.synchronize()
        out.append(f"== bare launch, {name}: {us:.2f} us per launch ({nbytes}-byte struct)")


def _worker(rank, world):
    import torch
    import torch.distributed as dist
    import epgen
    out = []
    if rank == 0:
        _bare_launches(out)
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
    _measure(cases, out)
    torch.cuda.synchronize()
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
    _measure((("LL dispatch FP8", lambda: buf.low_latency_dispatch(x, idx, M, E)),), out)
    for variant in ("per_expert", "per_rank"):
        _measure(((f"LL combine {variant}", combine(variant)),), out)
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
