"""The parts of a call's host path, as callables at the call's own arguments: shared by
bench/host_path_cpu.py (CPU, FAKE launches) and bench/host_overhead.py (one GPU, real ops), so
both print the same breakdown (issue 15 item 4: validation, spec lookup, allocation, launch;
"rest" = the whole call less its parts: argument packing, stream bookkeeping, glue).

Each function returns [(name, fn, times per call)]; `device` is where the allocation parts
allocate (CPU tensors in the CPU bench, whose allocator mmaps large ones; the CUDA caching
allocator on a GPU)."""
from __future__ import annotations

import torch

from epgen.ops import intranode
from epgen.ops import low_latency as ll
from epgen.ops.context import VECTOR_BYTES, check_tensor
from epgen.ops.outputs import carve


def ll_dispatch_parts(ops, x, idx, M, H, E, K, R, device):
    El = E // R
    fp8 = dict(use_fp8=True, round_scale=False, use_ue8m0=False)

    def alloc():   # what an FP8 dispatch allocates: rows + scales, metadata + counts
        rows, store = ll._recv_rows(x, None, None, False, None, "deepep", True, False, El, R * M, H)
        carve(device, [rows] + store)
        carve(device, [((El,), torch.int32), ((El, R * M), torch.int32), ((El, R), torch.int64)])
    return [("validation: x, topk_idx, shapes, Buffer size (_check_common)",
             lambda: (check_tensor("x", x, torch.bfloat16, align=VECTOR_BYTES),
                      ll.check_topk_idx(idx, num_tokens=M), ops._check_common(M, H, E, K)), 1),
            ("spec lookup + kernel lookup", lambda: ops.ctx.kernel(ll.spec_for_call(
                lambda *p: ll.ll_dispatch_spec(*p, **fp8), {}, H, K, E, R)), 1),
            ("output allocation (2 blocks, ops/outputs.carve)", alloc, 1)]


def ll_combine_parts(ops, y, idx, w, handle, M, H, E, K, R, per_rank, device):
    El = E // R
    return [("validation: handle, x, topk_idx, topk_weights (+ _check_common)",
             lambda: (ops._check_handle(handle, K),
                      check_tensor("x", y, torch.bfloat16, (El, R * M, H), align=VECTOR_BYTES),
                      ll.check_topk_idx(idx),
                      check_tensor("topk_weights", w, torch.float32, (M, K))), 1),
            ("variant + spec and kernel lookup (LowLatencyOps._specs)",
             lambda: ops._specs.get(("bf16", H, K, E, ll.combine_runs_per_rank(
                 M, H, R, E, K, False, False))), 1),
            ("output allocation (out [M, hidden])",
             lambda: torch.empty(M, H, dtype=torch.bfloat16, device=device), 1)]


def normal_dispatch_parts(ops, x, handle, config, T, H, device):
    rows = handle[3].size(0)
    record = intranode.dispatch_record_bytes(2 * H, 0, 0)
    layout = (*ops._check_config(config, "dispatch", record)[:2], record)   # (channels, cap, record)
    return [("validation: rows, handle, config, ring layout",
             lambda: (ops._check_rows(x), ops._unpack_handle(handle, num_tokens=T),
                      ops._check_config(config, "dispatch", record),
                      ops._rings.check("dispatch", layout, self_barriered=False)), 1),
            ("spec and 2 kernel lookups (IntranodeOps._specs)",
             lambda: ops._kernels(ops._specs.get(("dispatch", 2 * H, 0, 0, None)), "dispatch"), 1),
            (f"output allocation (recv_x [{rows}, {H}])",
             lambda: torch.empty(rows, H, dtype=torch.bfloat16, device=device), 1)]


def normal_combine_parts(ops, y, handle, config, T, H, device):
    rows = handle[3].size(0)
    record = intranode.combine_record_bytes(H, 0)
    layout = (*ops._check_config(config, "combine", record)[:2], record)
    return [("validation: handle, x, weights, biases, config, ring layout",
             lambda: (ops._unpack_handle(handle),
                      intranode.check_combine_inputs(ops.ctx.device, rows, T, y, None, None),
                      ops._check_config(config, "combine", record),
                      ops._rings.check("combine", layout, self_barriered=False)), 1),
            ("spec and 2 kernel lookups (IntranodeOps._specs)",
             lambda: ops._kernels(ops._specs.get(("combine", H, 0, 0)), None), 1),
            (f"output allocation (out [{T}, {H}])",
             lambda: torch.empty(T, H, dtype=torch.bfloat16, device=device), 1)]
