"""What a replayed call's host primitives cost on this machine (issue 15 item 4): the driver
calls from C (bench/host_primitives.c, built here with cc; it opens libcuda.so.1 itself), and the torch calls a Plan
makes through the Python C API (torch.empty of an output, a tensor's metadata reads), timed from
Python (an upper bound: the interpreter's call adds ~0.05 us to each). Run with and without an
MPS daemon (ranks sharing one GPU run under one), one process, the stream held:

    python bench/host_primitives.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import timeit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
HERE = os.path.dirname(os.path.abspath(__file__))


def _c_numbers(exe: str, env: dict) -> str:
    r = subprocess.run([exe], capture_output=True, text=True, timeout=120, env=env)
    return (r.stdout + r.stderr).strip()


def _torch_numbers() -> list[str]:
    import torch
    torch.cuda.init()
    dev = torch.device("cuda", 0)
    x = torch.empty(128, 7168, dtype=torch.bfloat16, device=dev)
    g = {"torch": torch, "dev": dev, "x": x, "i": 0}
    for s in ("torch.empty((2, 256, 7168), dtype=torch.float8_e4m3fn, device=dev)",
              "torch.empty((2, 256, 7168), dtype=torch.float8_e4m3fn, device=dev)",):
        exec(s, g)          # the caching allocator holds a block for the timed loop
    out = []
    torch.cuda._sleep(400_000_000)
    for stmt in ("torch.empty((2, 256, 7168), dtype=torch.float8_e4m3fn, device=dev)",
                 "torch.empty((2,), dtype=torch.int32, device=dev)",
                 "x.new_empty((2, 256, 7168))",
                 "torch.empty(1 << 20, dtype=torch.uint8, device=dev)[4096:8192]",
                 "x.dtype", "x.is_cuda", "x.device", "x.get_device()", "x.shape", "x.stride()",
                 "x.is_contiguous()", "x.data_ptr()",
                 "torch._C._cuda_getCurrentRawStream(0)",
                 "torch.cuda.is_current_stream_capturing()"):
        n = 5000
        us = min(timeit.repeat(stmt, globals=g, number=n, repeat=3)) / n * 1e6
        out.append(f"py: {us:6.2f} us  {stmt}")
    torch.cuda.synchronize()
    return out


def main():
    from epgen.launch import MpsDaemon
    with tempfile.TemporaryDirectory() as d:
        exe = os.path.join(d, "host_primitives")
        subprocess.run(["cc", "-O2", os.path.join(HERE, "host_primitives.c"), "-o", exe, "-ldl"],
                       check=True)
        print("== no MPS")
        print(_c_numbers(exe, dict(os.environ)))
        print("\n".join(_torch_numbers()))
        if MpsDaemon.available():
            mps = MpsDaemon()
            mps.start()
            try:
                env = {**os.environ, **mps.env}
                print("== under an MPS daemon (one client)")
                print(_c_numbers(exe, env))
                r = subprocess.run([sys.executable, __file__, "--torch-only"], env=env,
                                   capture_output=True, text=True, timeout=180)
                print((r.stdout + r.stderr).strip())
            finally:
                mps.stop()


if __name__ == "__main__":
    if "--torch-only" in sys.argv:
        print("\n".join(_torch_numbers()))
    else:
        main()
