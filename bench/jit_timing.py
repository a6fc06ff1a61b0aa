"""Compile and load costs (targets: cold compile <= 1.5 s per kernel, warm first call
<= 20 ms per kernel, precompile of the DeepSeek-V3 spec <= 60 s on 16 cores).

    python bench/jit_timing.py --out DIR [--commit SHA]

Cold: each spec compiled alone in a fresh cache whose prelude PCH was created first (a one-time
cost, reported apart). Warm: a fresh process finds the entry in the cache: read + checksum +
cuModuleLoadData + NVSHMEM module init + function lookup. Precompile: the CLI on a fresh cache.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _specs():
    from epgen.jit.specs import (LayoutSpec, LowLatencyCombineSpec, LowLatencyDispatchSpec,
                             NormalCombineSpec, normal_dispatch_spec)
    return [LayoutSpec(num_ranks=2, num_experts=256, num_topk=8),
            normal_dispatch_spec(7168, 8, 256, 2, "bf16"),
            normal_dispatch_spec(7168, 8, 256, 2, "fp8"),
            NormalCombineSpec(hidden=7168, num_topk=8, num_ranks=2),
            LowLatencyDispatchSpec(hidden=7168, num_topk=8, num_experts=288, num_ranks=2),
            LowLatencyCombineSpec(hidden=7168, num_topk=8, num_experts=288, num_ranks=2)]


def _warm(rank, world, root):
    """In a fresh process with NVSHMEM initialised: the cost of a cache hit, per kernel."""
    import torch
    from epgen import jit
    from epgen.cache import Cache
    from epgen.runtime import module, nvshmem
    host = nvshmem.host(heap_bytes=64 << 20)
    out = []
    for spec in _specs():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        entry = jit.build(spec, "sm_90", Cache(root))
        loaded = module.load(entry, torch.cuda.current_device(), host.module_init)
        loaded.function(spec.entry())
        out.append((spec.name, (time.perf_counter() - t0) * 1e3))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args()
    from epgen import jit
    from epgen.cache import Cache
    from epgen.jit.specs import LayoutSpec
    from epgen.bench import timing
    root = tempfile.mkdtemp(prefix="epgen-jit-")
    t0 = time.perf_counter()
    jit.build(LayoutSpec(num_ranks=2, num_experts=32, num_topk=2), "sm_90", Cache(root))
    pch_s = time.perf_counter() - t0          # PCH creation + one tiny kernel
    cold = []
    for spec in _specs():
        stats: dict = {}
        entry = jit.build(spec, "sm_90", Cache(root), stats)
        m = entry.manifest
        cold.append(dict(kernel=spec.name, seconds=stats["seconds"], nvrtc=m["nvrtc_seconds"],
                         link=m["link_seconds"], resources=m["resources"]))
    from tests import gpu_harness
    warm = gpu_harness.run_ranks(1, _warm, root, timeout_s=300)[0] \
        if gpu_harness.gpu_count() else [(s.name, float("nan")) for s in _specs()]
    pre_root = tempfile.mkdtemp(prefix="epgen-pre-")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "epgen", "--cache-dir", pre_root, "precompile",
                        "--spec", os.path.join(ROOT, "examples", "deepseek-v3.yaml"),
                        "--jobs", str(min(16, os.cpu_count() or 1))], capture_output=True, text=True)
    pre_s = time.perf_counter() - t0
    import torch
    card = timing.card(torch.cuda.get_device_name()) if gpu_harness.gpu_count() else "cpu"
    result = dict(card=card, commit=args.commit, cpus=os.cpu_count(), pch_create_s=pch_s,
                  cold=cold, warm_ms=warm, precompile_s=pre_s,
                  precompile_summary=r.stderr.strip().splitlines()[-1] if r.stderr else "",
                  versions=timing.versions())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "jit.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{card}, {os.cpu_count()} CPUs: PCH + first tiny kernel {pch_s:.2f} s; "
          f"precompile deepseek-v3 {pre_s:.1f} s ({result['precompile_summary']})")
    print(f"{'kernel':45s} {'cold s':>7s} {'nvrtc':>6s} {'link':>6s} {'warm ms':>8s}")
    for c, (_, w) in zip(cold, warm):
        print(f"{c['kernel']:45s} {c['seconds']:7.2f} {c['nvrtc']:6.2f} {c['link']:6.2f} {w:8.2f}")


if __name__ == "__main__":
    main()
