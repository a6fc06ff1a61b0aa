"""FAKES of the GPU-side pieces under epgen's low-latency, normal-mode (intranode) and
internode ops, so their host path (checks, spec lookup, allocation, argument packing, launches)
runs on CPU: CPU tests of what a call launches (tests/test_ll_host_path.py,
tests/test_host_path_cache.py, tests/test_internode_capture.py) and its Python-side cost
(bench/host_path_cpu.py). Everything here is a fake and named so; nothing here touches a GPU."""
from __future__ import annotations

import contextlib
import ctypes
from unittest import mock

import torch

from epgen.jit.layout_facts import LL_HINT_TOPK
from epgen.ops import low_latency as ll
from epgen.ops.context import OpsContext
from epgen.ops.internode import InternodeOps
from epgen.runtime.cuda import c_params
from epgen.ops.streams import no_hook
from epgen.runtime.events import EventOverlap
from epgen.runtime.topology import Topology


class FakeCudaTensor(torch.Tensor):
    """FAKE: a CPU tensor that says it is on a CUDA device (the checks read is_cuda only);
    torch-function dispatch disabled so every other attribute costs what a plain tensor's does."""
    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def is_cuda(self):
        return True


def fake_cuda(t):
    return t.as_subclass(FakeCudaTensor)


class FakeLaunchKernel:
    """FAKE: Kernel.launch's parameter packing without cuLaunchKernel; keeps what each
    launch was given (spec, a copy of the argument struct; its grid and block in `shapes`)
    when `record`."""
    def __init__(self, record=True):
        self.record, self.launches, self.shapes = record, [], []

    def bind(self, spec):
        return _BoundFakeKernel(self, spec)


class _BoundFakeKernel:
    def __init__(self, owner, spec):
        self.owner, self.spec = owner, spec
        self.handle, self.name = id(self), spec.kernel_name()   # what a Plan records

    def launch(self, grid, block, args, stream, smem=0):
        params, _keep = c_params(args)
        if self.owner.record:
            self.owner.launches.append((self.spec, type(args).from_buffer_copy(args)))
            self.owner.shapes.append((grid, block))


class FakeRegion:
    """FAKE: a symmetric region as host memory (address, size, peers, typed views)."""
    def __init__(self, nbytes, num_ranks):
        self.bytes = torch.zeros(nbytes, dtype=torch.uint8)
        self.nbytes, self.addr = nbytes, self.bytes.data_ptr()
        self.peer_addrs = [self.addr] * num_ranks

    def view(self, dtype, shape, offset=0):
        n = 1
        for s in shape:
            n *= s
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        return self.bytes[offset:offset + nbytes].view(dtype).view(*shape)


class FakeErrorWord:
    """FAKE: the mapped error word (nothing is ever reported here)."""
    device_ptr = 0
    code_address = 0         # a replayed call reads no error word

    def check(self):
        pass


class _FakeStream:
    cuda_stream = 0


class FakeStreams:
    """FAKE: StreamOrder.two_phase and scope without CUDA streams or events; the state a
    replayed call (runtime/fastcall.cpp) reads and sets, at StreamOrder's initial values, with
    a FakeEvent for sync_done."""
    def __init__(self):
        self.comm_busy = self.compute_pending = self._captured = False
        self.sync_stream = None
        self.sync_done = FakeEvent()

    @contextlib.contextmanager
    def scope(self, previous_event, async_finish, allocate_on_comm_stream, result):
        yield _FakeStream()
        result["event"] = EventOverlap(None)

    def two_phase(self, send, receive, async_finish, return_recv_hook, tensors):
        s = _FakeStream()
        send(s)
        if not return_recv_hook:
            receive(s)
        return EventOverlap(None), (lambda: receive(s)) if return_recv_hook else no_hook


class FakeEvent:
    """FAKE: a torch.cuda.Event's raw handle, never a real one."""
    cuda_event = 0x5e


class FakeDriver:
    """FAKE cuLaunchKernel, cuEventRecord and cuStreamIsCapturing for the fast lane's C
    module (runtime/fastcall.cpp) as C callbacks: each launch's function, grid, block, smem,
    stream and argument buffer (fastcall.cpp's whole MAX_ARGS_BYTES buffer: the struct is its
    start) in `launches`, each event record in `records`; `capturing` is what the stream query says and
    `launch_result` what a launch returns."""
    LAUNCH = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint,
                              ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                              ctypes.c_uint, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                              ctypes.c_void_p)
    RECORD = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    CAPTURING = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int))
    ARGS_BYTES = 4096

    def __init__(self):
        self.launches, self.records = [], []
        self.capturing, self.launch_result = 0, 0
        self._launch = self.LAUNCH(self._on_launch)      # kept alive with the fake
        self._record = self.RECORD(lambda e, st: self.records.append((e, st)) or 0)
        self._capturing = self.CAPTURING(self._on_capturing)

    def _on_launch(self, f, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        data = ctypes.string_at(params[0], self.ARGS_BYTES)
        self.launches.append((f, gx, bx, smem, stream or 0, data))
        return self.launch_result

    def _on_capturing(self, stream, status):
        status[0] = self.capturing
        return 0

    def install(self, mod):
        from epgen.runtime.cuda import CudaError
        addr = [ctypes.cast(c, ctypes.c_void_p).value
                for c in (self._launch, self._record, self._capturing)]
        mod.set_driver(*addr, CudaError)


class FakeLaunchContext(OpsContext):
    """OpsContext whose kernels are FakeLaunchKernel's and whose streams are FakeStreams."""
    fake: FakeLaunchKernel = None

    def kernel(self, spec, kind=None):
        k = self._kernels.get(spec)
        if k is None:
            k = self._kernels[spec] = self.fake.bind(spec)
        return k

    @contextlib.contextmanager
    def on_comm_stream(self, previous_event, async_finish, allocate_on_comm_stream, result):
        """FAKE StreamOrder.scope: the body launches on a stream that is not there."""
        yield _FakeStream()
        result["event"] = None


def fake_ll_ops(R, M, H, E, record=True, grids_overlap=True, num_topk=LL_HINT_TOPK):
    """LowLatencyOps on a FakeLaunchContext (rank 0 of R) and its FakeLaunchKernel, its region
    sized by the hint for top-k up to num_topk. grids_overlap: ranks sharing a GPU under MPS
    (each phase a launch of its own, the struct of both visible); False: both in one launch."""
    region = FakeRegion(ll.low_latency_rdma_size_hint(M, H, R, E, num_topk), R)
    ctx = FakeLaunchContext(rank=0, num_ranks=R, device=torch.device("cpu"),
                            pes=list(range(R)), nvshmem=None, nvl=None, rdma=region,
                            comm_stream=None, errors=FakeErrorWord(), arch="sm_90")
    ctx.fake = FakeLaunchKernel(record)
    ctx.__dict__["streams"] = FakeStreams()
    ctx.__dict__["device_sms"] = 132
    return ll.LowLatencyOps(ctx, grids_overlap=grids_overlap), ctx.fake


def ll_combine_inputs(ops, fake, M, H, E, K, seed=0):
    """A combine's inputs after a fake BF16 low-latency dispatch on fake_ll_ops' ops (M tokens
    of hidden H, top-K of E experts): (expert outputs y, topk_idx, topk_weights, handle), the
    dispatch's launches cleared."""
    g = torch.Generator().manual_seed(seed)
    x = fake_cuda(torch.randn(M, H, generator=g).to(torch.bfloat16))
    idx = fake_cuda(torch.randn(M, E, generator=g).topk(K, dim=-1).indices)
    w = fake_cuda(torch.rand(M, K, generator=g))
    _, _, handle, _, _ = ops.low_latency_dispatch(x, idx, M, E, use_fp8=False)
    handle = (fake_cuda(handle[0]), fake_cuda(handle[1]), *handle[2:])
    R = ops.ctx.num_ranks
    y = fake_cuda(torch.zeros(E // R, R * M, H, dtype=torch.bfloat16))
    fake.launches.clear()
    return y, idx, w, handle


def fake_internode_ops(num_ranks, ranks_per_node, nvl_bytes=8 << 20, rdma_bytes=8 << 20):
    """InternodeOps on a FakeLaunchContext (rank 0 of num_ranks, nodes of ranks_per_node) and
    its FakeLaunchKernel."""
    ctx = FakeLaunchContext(rank=0, num_ranks=num_ranks, device=torch.device("cpu"),
                            pes=list(range(num_ranks)), nvshmem=None,
                            nvl=FakeRegion(nvl_bytes, num_ranks),
                            rdma=FakeRegion(rdma_bytes, num_ranks), comm_stream=None,
                            errors=FakeErrorWord(), arch="sm_90")
    ctx.fake = FakeLaunchKernel()
    ctx.__dict__["streams"] = FakeStreams()
    ctx.__dict__["device_sms"] = 132
    topology = Topology(num_ranks, ranks_per_node, 1, "EPGEN_RANKS_PER_NODE")
    return InternodeOps(ctx, topology), ctx.fake


def no_graph_capture():
    """FAKE torch.cuda.is_current_stream_capturing (False) for the normal-mode ops, whose CPU
    torch build raises there; a context manager (unittest.mock.patch)."""
    return mock.patch.object(torch.cuda, "is_current_stream_capturing", lambda: False)


def fake_intranode_ops(R, T, H, config, record=True):
    """IntranodeOps on a FakeLaunchContext (rank 0 of R) with an NVL region sized for config
    and BF16 rows of hidden H; the FakeLaunchKernel; and a cached-dispatch handle of T tokens
    that every rank sends all of them to (rows = R * T). Call inside no_graph_capture()."""
    from epgen.ops import intranode
    from epgen.regions.intranode import nvl_buffer_size_hint
    region = FakeRegion(nvl_buffer_size_hint(config, 2 * H, R), R)
    ctx = FakeLaunchContext(rank=0, num_ranks=R, device=torch.device("cpu"),
                            pes=list(range(R)), nvshmem=None, nvl=region, rdma=None,
                            comm_stream=None, errors=FakeErrorWord(), arch="sm_90")
    ctx.fake = FakeLaunchKernel(record)
    ctx.__dict__["device_sms"] = 132
    return intranode.IntranodeOps(ctx), ctx.fake, cached_handle(R, T)


def cached_handle(R, T):
    """A normal-mode dispatch handle of T tokens that every rank sends all of to every rank
    (rows = R * T)."""
    i32 = torch.int32
    rpm = torch.arange(1, R + 1, dtype=i32).mul(T).repeat(R, 1)
    return (fake_cuda(rpm), fake_cuda(torch.full((R,), T, dtype=i32)), None,
            fake_cuda(torch.arange(R * T, dtype=i32) % T),
            fake_cuda(torch.ones(T, R, dtype=torch.bool)), None)
