"""Faults on purpose on N GPUs (issue 14, items 5 and 8): a rank that skips a call or is killed
mid-call. The live ranks' waits hit the deadline, they raise the documented error, every
output of the failed call is poisoned on the device, destroy() returns on every rank, and a
fresh set of processes then runs correctly on the same GPUs. (A rank 5 s late, within the
deadline, is a job of tests/test_reliability_gpu.py.)
"""
from __future__ import annotations

import os
import traceback

import pytest

from tests import gpu_harness
from tests import test_low_latency_gpu as llt
from tests.test_reliability_gpu import (H, K, LOCAL_EXPERTS, M, WRAP_CONFIG, _check_normal_dispatch,
                                        _normal_dispatch, _normal_inputs, share_sms)

pytestmark = pytest.mark.gpu

FAULT_TIMEOUT_S = 3.0


def _all_equal(name, t, value):
    bad = ~(t.isnan() if value != value else t == value)
    assert not bool(bad.any()), (f"{name}: {int(bad.sum())} of {t.numel()} elements not poisoned "
                                 f"({value}); first at {bad.nonzero()[0].tolist()}")


def _expect_deadline(buf, op):
    from epgen.runtime.errors import EpgenDeviceError
    try:
        buf.check_errors()
    except EpgenDeviceError as exc:
        assert op in str(exc) and "timed out" in str(exc), str(exc)
    else:
        raise AssertionError(f"{op}: no deadline error reported")


def _fault_worker(rank, world):
    """The last rank skips one call on each of three Buffers (as a crashed or stuck rank
    would); the others' waits hit the deadline, the error is reported, and every output of the
    failed call is poisoned on the device: NaN floats, -1 indices, 0 counts. Then destroy()
    returns on every rank."""
    import torch
    import torch.distributed as dist
    import epgen
    os.environ["EPGEN_TIMEOUT_S"] = "20"
    share_sms()                 # the default config's channels within this rank's SMs
    R, E, skip = world, LOCAL_EXPERTS * world, world - 1
    nvl = epgen.Config(**WRAP_CONFIG).get_nvl_buffer_size_hint(H * 2, world)
    rdma = epgen.Buffer.get_low_latency_rdma_size_hint(M, H, world, E)
    normal = epgen.Buffer(dist.group.WORLD, nvl, 0)
    lld = epgen.Buffer(dist.group.WORLD, 0, rdma, low_latency_mode=True)
    llc = epgen.Buffer(dist.group.WORLD, 0, rdma, low_latency_mode=True)
    results = []

    def job(name, fn):
        try:
            fn()
            results.append((name, "ok"))
        except Exception as exc:  # noqa: BLE001 - reported per job
            results.append((name, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"))
        torch.cuda.synchronize()
        dist.barrier()

    def normal_combine():
        ins = _normal_inputs(6000, R, E)
        out = _normal_dispatch(normal, rank, ins, E)
        torch.cuda.synchronize()
        normal.check_errors()
        _check_normal_dispatch(rank, ins, E, out)
        if rank == skip:
            return
        y = (out[0].float() * 0.5).to(torch.bfloat16)
        w = torch.ones(out[0].shape[0], K, dtype=torch.float32, device="cuda")
        os.environ["EPGEN_TIMEOUT_S"] = str(FAULT_TIMEOUT_S)
        try:
            combined, cw, _ = normal.combine(y, out[4], topk_weights=w)
            torch.cuda.synchronize()
        finally:
            os.environ["EPGEN_TIMEOUT_S"] = "20"
        _expect_deadline(normal, "combine")
        _all_equal("combined_x", combined, float("nan"))
        _all_equal("combined_topk_weights", cw, float("nan"))

    def ll_dispatch():
        if rank == skip:
            return
        x, idx, _ = llt._all_inputs(6100, R, [M] * R, H, K, E)[rank]
        os.environ["EPGEN_TIMEOUT_S"] = str(FAULT_TIMEOUT_S)
        try:
            recv, count, handle, _, _ = lld.low_latency_dispatch(x, idx, M, E, use_fp8=True)
            torch.cuda.synchronize()
        finally:
            os.environ["EPGEN_TIMEOUT_S"] = "20"
        _expect_deadline(lld, "low_latency_dispatch")
        _all_equal("recv_count", count, 0)
        _all_equal("recv_x", recv[0].float(), float("nan"))
        _all_equal("recv_x_scales", recv[1], float("nan"))
        _all_equal("recv_src_info", handle[0], -1)
        _all_equal("recv_layout_range", handle[1], 0)

    def ll_combine():
        ins = llt._all_inputs(6200, R, [M] * R, H, K, E)
        x, idx, w = ins[rank]
        recv, count, handle, _, _ = llc.low_latency_dispatch(x, idx, M, E, use_fp8=False)
        torch.cuda.synchronize()
        llc.check_errors()
        llt._check_dispatch(rank, ins, E, (recv, count, handle), False, False, False)
        if rank == skip:
            return
        os.environ["EPGEN_TIMEOUT_S"] = str(FAULT_TIMEOUT_S)
        try:
            out, _, _ = llc.low_latency_combine(llt._expert_out(recv, False, H), idx, w, handle)
            torch.cuda.synchronize()
        finally:
            os.environ["EPGEN_TIMEOUT_S"] = "20"
        _expect_deadline(llc, "low_latency_combine")
        _all_equal("combined", out, float("nan"))

    job("normal combine with a rank absent: deadline, outputs NaN", normal_combine)
    job("low-latency dispatch with a rank absent: deadline, outputs poisoned", ll_dispatch)
    job("low-latency combine with a rank absent: deadline, outputs NaN", ll_combine)
    # destroy() never hangs: the failed ranks skip the collective free, the rank that skipped
    # the calls gives up on its peers after EPGEN_TIMEOUT_S; every Buffer leaks, with a warning
    import time
    import warnings
    os.environ["EPGEN_TIMEOUT_S"] = str(FAULT_TIMEOUT_S)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in (normal, lld, llc):
            b.destroy()
    took = time.perf_counter() - t0
    leaked = sum("leaked" in str(w.message) for w in caught)
    ok = took < FAULT_TIMEOUT_S + 10 and leaked == 3
    results.append(("destroy() returns on every rank, leaking with a warning",
                    "ok" if ok else f"took {took:.1f} s, {leaked} leak warnings"))
    return results


# The quick tier runs each fault test at one rank count (this one at the largest, the killed
# rank at the smallest): a deadline fired on purpose, then fresh rank processes, costs 15-20 s
# a count on the H200, the quick tier's largest share; the full tier runs every count.
@pytest.mark.parametrize("num_ranks", gpu_harness.select(gpu_harness.rank_counts(), [-1]))
def test_outputs_poisoned_after_deadline(num_ranks):
    gpu_harness.require_gpus(num_ranks)
    bad = gpu_harness.failures(gpu_harness.run_ranks(num_ranks, _fault_worker, timeout_s=240))
    assert not bad, "\n".join(bad)


def _killed_worker(rank, world, outdir):
    """The last rank is killed (SIGKILL) between its low-latency dispatch and its combine; the
    live ranks' combine hits the deadline, raises the documented error, poisons its output,
    and destroy() returns at once. The live ranks write their outcome to `outdir` (the
    harness reports the killed rank as missing and returns nothing)."""
    import json
    import signal
    import time

    import torch
    import torch.distributed as dist
    import epgen
    os.environ["EPGEN_TIMEOUT_S"] = "20"
    E, dead = LOCAL_EXPERTS * world, world - 1
    buf = epgen.Buffer(dist.group.WORLD, 0, epgen.Buffer.get_low_latency_rdma_size_hint(M, H, world, E),
                       low_latency_mode=True)
    ins = llt._all_inputs(8000, world, [M] * world, H, K, E)
    x, idx, w = ins[rank]
    recv, count, handle = llt._checked_dispatch(buf, rank, ins, E)
    dist.barrier()
    if rank == dead:
        os.kill(os.getpid(), signal.SIGKILL)
    outcome = {}
    os.environ["EPGEN_TIMEOUT_S"] = str(FAULT_TIMEOUT_S)
    try:
        out, _, _ = buf.low_latency_combine(llt._expert_out(recv, False, H), idx, w, handle)
        torch.cuda.synchronize()
    finally:
        os.environ["EPGEN_TIMEOUT_S"] = "20"
    try:
        _expect_deadline(buf, "low_latency_combine")
        _all_equal("combined", out, float("nan"))
        outcome["error"] = "ok"
    except AssertionError as exc:
        outcome["error"] = str(exc)
    t0 = time.perf_counter()
    buf.destroy()
    outcome["destroy_s"] = time.perf_counter() - t0
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)
    return outcome


def _fresh_worker(rank, world):
    """A fresh set of processes on the same GPUs after a rank was killed: a correct pair."""
    import torch.distributed as dist
    import epgen
    os.environ.setdefault("EPGEN_TIMEOUT_S", "20")
    E = LOCAL_EXPERTS * world
    buf = epgen.Buffer(dist.group.WORLD, 0, epgen.Buffer.get_low_latency_rdma_size_hint(M, H, world, E),
                       low_latency_mode=True)
    llt._checked_pair(buf, rank, llt._all_inputs(8100, world, [M] * world, H, K, E), E)
    buf.destroy()
    return [("fresh processes after a killed rank", "ok")]


@pytest.mark.parametrize("num_ranks", gpu_harness.select(gpu_harness.rank_counts(), [0]))
def test_rank_killed_mid_call(num_ranks, tmp_path):
    import json
    gpu_harness.require_gpus(num_ranks)
    dead = num_ranks - 1
    with pytest.raises(AssertionError) as e:
        gpu_harness.run_ranks(num_ranks, _killed_worker, str(tmp_path), timeout_s=90)
    msg = str(e.value)
    assert f"ranks [{dead}] did not finish" in msg, msg
    assert "Traceback" not in msg, msg          # the live ranks returned normally
    for r in range(dead):
        outcome = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert outcome["error"] == "ok", f"rank {r}: {outcome}"
        assert outcome["destroy_s"] < 5.0, f"rank {r}: destroy() took {outcome['destroy_s']:.1f} s"
    bad = gpu_harness.failures(gpu_harness.run_ranks(num_ranks, _fresh_worker, timeout_s=120))
    assert not bad, "\n".join(bad)
