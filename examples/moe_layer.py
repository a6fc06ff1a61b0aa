"""A DeepSeek-V3-style MoE block in plain torch whose expert parallelism runs on epgen.

Router (sigmoid scores, top-k, normalised and scaled weights), routed experts as a grouped
SwiGLU MLP (each rank holds num_experts / ranks of them), and a shared expert on every rank.
Prefill goes through normal-mode dispatch/combine; decode through low-latency dispatch/combine
with the receive hook, the shared expert running between a call's send and its receive, and
the whole decode step captured in a CUDA graph and replayed. Every output is checked against
the same layer computed densely on one rank (every expert's weights, no communication).

Tolerance: elementwise |out - dense| <= 2**-4 * (|dense| + rms(dense)). The EP path runs the
experts in bf16 matmuls, the dense layer in float32 on the same bf16 weights (decode's dense
routed input goes through the same FP8 quantization as the dispatch); bf16 rounding alone
measured 1.4-1.9 % on that scale, routed outputs off by 10 % give 18 %.

Run:   torchrun --nproc-per-node N examples/moe_layer.py [--hidden 2048 ...]
       (N ranks on fewer GPUs: ranks share GPUs through gloo; start an MPS daemon first and
       set CUDA_MPS_ACTIVE_THREAD_PERCENTAGE = 100 / ranks per GPU: README, "Several ranks on
       one GPU"), or
       python examples/moe_layer.py --ranks N   (epgen.launch places the ranks, MPS included)
Import: `run_layer(rank, world, MoEConfig(...))` on ranks whose process group is set up
       (tests/test_moe_layer_gpu.py runs it through the GPU test harness).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import epgen
from epgen import reference as ref

TOLERANCE = 2 ** -4
DEVICE = "cuda"        # where weights and inputs are generated (tests check the math on "cpu")


@dataclass(frozen=True)
class MoEConfig:
    hidden: int = 2048
    moe_inter: int = 512            # each routed expert's intermediate size
    shared_inter: int = 1024        # the shared expert's intermediate size
    experts_per_rank: int = 8
    topk: int = 8
    routed_scale: float = 2.5       # DeepSeek-V3's routed_scaling_factor
    prefill_tokens: int = 512       # per rank (rank r gets prefill_tokens - 17 * r: uneven)
    decode_tokens: int = 64         # per rank = num_max_dispatch_tokens_per_rank
    seed: int = 0
    iters: int = 5                  # timed repetitions per phase


# -- weights and inputs: regenerable on every rank from the seed ------------------------------
def _gen(cfg: MoEConfig, *key: int) -> torch.Generator:
    g = torch.Generator(device=DEVICE)
    g.manual_seed(hash((cfg.seed, *key)) & 0x7FFFFFFF)
    return g


def _randn(shape, g, scale):
    return (torch.randn(shape, generator=g, device=DEVICE) * scale).to(torch.bfloat16)


def expert_weights(cfg: MoEConfig, e: int, inter: int | None = None):
    """(w13 [H, 2I], w2 [I, H]) of routed expert e (e = -1: the shared expert)."""
    inter = inter or (cfg.shared_inter if e < 0 else cfg.moe_inter)
    g = _gen(cfg, 1, e)
    return (_randn((cfg.hidden, 2 * inter), g, cfg.hidden ** -0.5),
            _randn((inter, cfg.hidden), g, inter ** -0.5))


def router_weight(cfg: MoEConfig, num_experts: int) -> torch.Tensor:
    return _randn((cfg.hidden, num_experts), _gen(cfg, 2), cfg.hidden ** -0.5)


def layer_input(cfg: MoEConfig, phase: int, rank: int, tokens: int) -> torch.Tensor:
    return _randn((tokens, cfg.hidden), _gen(cfg, 3, phase, rank), 1.0)


def prefill_tokens(cfg: MoEConfig, rank: int) -> int:
    return max(1, cfg.prefill_tokens - 17 * rank)


# -- the layer's math (shared by the EP layer and the dense check) ---------------------------
def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [..., H]; batched when x, w13, w2 carry a leading expert dim."""
    h = torch.matmul(x, w13)
    g, u = h.chunk(2, dim=-1)
    return torch.matmul(F.silu(g) * u, w2)


def route(x: torch.Tensor, gate: torch.Tensor, topk: int, scale: float):
    """DeepSeek-V3's router without group limits: sigmoid scores, top-k, weights normalised
    over the k and scaled. Returns (topk_idx int64, topk_weights float32)."""
    scores = torch.sigmoid(x.float() @ gate.float())
    w, idx = scores.topk(topk, dim=-1)
    return idx, (w / w.sum(dim=-1, keepdim=True) * scale).float()


def dense_layer(cfg: MoEConfig, x: torch.Tensor, num_experts: int, fp8_routed: bool = False):
    """The same layer on one rank in float32: every expert's weights, no communication."""
    idx, w = route(x, router_weight(cfg, num_experts), cfg.topk, cfg.routed_scale)
    xr = ref.per_token_cast_back(*ref.per_token_cast_to_fp8(x), torch.bfloat16) if fp8_routed else x
    w13, w2 = expert_weights(cfg, -1)
    out = swiglu(x.float(), w13.float(), w2.float())
    for e in idx.unique().tolist():
        tok, k = (idx == e).nonzero(as_tuple=True)
        w13, w2 = expert_weights(cfg, e)
        out.index_add_(0, tok, w[tok, k, None] * swiglu(xr[tok].float(), w13.float(), w2.float()))
    return out


def check(name: str, got: torch.Tensor, exp: torch.Tensor) -> float:
    """Max of |got - exp| / (|exp| + rms(exp)); raises past TOLERANCE."""
    got, exp = got.float(), exp.float()
    rms = exp.pow(2).mean().sqrt().clamp(min=1e-6)
    err = float(((got - exp).abs() / (exp.abs() + rms)).max()) if exp.numel() else 0.0
    if not err <= TOLERANCE:            # also catches NaN
        raise AssertionError(f"{name}: max |out - dense| / (|dense| + rms) = {err:.4g} "
                             f"> {TOLERANCE} (rms(dense) = {float(rms):.4g})")
    return err


# -- the expert-parallel layer ---------------------------------------------------------------
class MoELayer:
    """Rank `rank`'s share of the layer: its experts, the router, the shared expert, and one
    epgen.Buffer sized for both modes (SGLang's "auto" mode does the same)."""

    def __init__(self, cfg: MoEConfig, group=None):
        self.cfg, self.group = cfg, group or dist.group.WORLD
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        R, El = self.world, cfg.experts_per_rank
        self.num_experts = E = El * R
        if not 1 <= cfg.topk <= E:
            raise ValueError(f"topk={cfg.topk}: must be in [1, num_experts={E}]")
        self.gate = router_weight(cfg, E)
        self.shared = expert_weights(cfg, -1)
        local = [expert_weights(cfg, self.rank * El + i) for i in range(El)]
        self.w13 = torch.stack([a for a, _ in local])           # [El, H, 2I]
        self.w2 = torch.stack([b for _, b in local])            # [El, I, H]
        # Normal-mode SMs: the Config's, capped at what this process may use (ranks sharing a
        # GPU under MPS get a share of its SMs; a grid larger than the share would wait on
        # blocks that never become resident).
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        def cap(c):
            return epgen.Config(min(c.num_sms, sms - sms % 2), c.num_max_nvl_chunked_send_tokens,
                                c.num_max_nvl_chunked_recv_tokens,
                                c.num_max_rdma_chunked_send_tokens,
                                c.num_max_rdma_chunked_recv_tokens)
        self.dispatch_config = cap(epgen.Buffer.get_dispatch_config(R))
        self.combine_config = cap(epgen.Buffer.get_combine_config(R))
        nvl = max(c.get_nvl_buffer_size_hint(cfg.hidden * 2, R)
                  for c in (self.dispatch_config, self.combine_config))
        rdma = epgen.Buffer.get_low_latency_rdma_size_hint(cfg.decode_tokens, cfg.hidden, R, E,
                                                           num_topk=cfg.topk)
        self.buffer = epgen.Buffer(self.group, nvl, rdma, low_latency_mode=True,
                                   num_qps_per_rank=El)

    def _router(self, x):
        return route(x, self.gate, self.cfg.topk, self.cfg.routed_scale)

    def _shared(self, x):
        return swiglu(x, *self.shared)

    # prefill: normal mode ------------------------------------------------------------------
    def prefill(self, x: torch.Tensor, marks: list | None = None) -> torch.Tensor:
        mark = (lambda name: marks.append((name, _event()))) if marks is not None else (lambda n: None)
        mark("start")
        idx, w = self._router(x)
        mark("router")
        per_rank, _, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(idx, self.num_experts)
        recv_x, recv_idx, recv_w, _, handle, _ = self.buffer.dispatch(
            x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            config=self.dispatch_config)
        mark("dispatch")
        y = torch.zeros(recv_x.shape[0], self.cfg.hidden, dtype=torch.float32, device=x.device)
        for e in range(self.cfg.experts_per_rank):
            tok, k = (recv_idx == e).nonzero(as_tuple=True)
            if tok.numel():
                out = swiglu(recv_x[tok], self.w13[e], self.w2[e])
                y.index_add_(0, tok, recv_w[tok, k, None] * out.float())
        mark("experts")
        combined, _, _ = self.buffer.combine(y.to(torch.bfloat16), handle,
                                             config=self.combine_config)
        mark("combine")
        out = combined.float() + self._shared(x).float()
        mark("shared expert")
        return out

    # decode: low-latency mode, hooks overlapping the shared expert --------------------------
    def decode(self, x: torch.Tensor, marks: list | None = None) -> torch.Tensor:
        mark = (lambda name: marks.append((name, _event()))) if marks is not None else (lambda n: None)
        M, E = self.cfg.decode_tokens, self.num_experts
        mark("start")
        idx, w = self._router(x)
        mark("router")
        (recv_x, scales), _, handle, _, hook = self.buffer.low_latency_dispatch(
            x, idx, M, E, use_fp8=True, return_recv_hook=True)
        mark("dispatch send")
        shared = self._shared(x)                      # runs while the tokens travel
        mark("shared expert (overlapped)")
        hook()
        mark("dispatch receive")
        xe = ref.per_token_cast_back(recv_x, scales, torch.bfloat16)   # [El, R*M, H]
        # Rows past recv_count[e] hold no token; their results are never read by the combine.
        y = swiglu(xe, self.w13, self.w2)
        mark("experts")
        combined, _, hook = self.buffer.low_latency_combine(y, idx, w, handle,
                                                            return_recv_hook=True)
        mark("combine send")
        hook()
        mark("combine receive")
        out = combined.float() + shared.float()
        mark("add")
        return out

    def capture_decode(self, x_static: torch.Tensor):
        """The decode step as a CUDA graph over x_static (compiles outside the capture first).
        Returns (graph, output tensor the replays write)."""
        self.decode(x_static)
        torch.cuda.synchronize()
        self.buffer.check_errors()
        g, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
            out = self.decode(x_static)
        torch.cuda.current_stream().wait_stream(s)
        return g, out

    def destroy(self):
        torch.cuda.synchronize()
        self.buffer.destroy()


def _event():
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def _phase_times(runs: list[list]) -> dict:
    """Per phase, the median over runs of the time from the previous mark (microseconds)."""
    torch.cuda.synchronize()
    names = [n for n, _ in runs[0][1:]]
    out = {}
    for i, name in enumerate(names):
        ts = sorted(r[i][1].elapsed_time(r[i + 1][1]) * 1e3 for r in runs)
        out[name] = ts[len(ts) // 2]
    return out


def run_layer(rank: int, world: int, cfg: MoEConfig = MoEConfig()) -> dict:
    """Prefill, eager decode and graph-replayed decode on this rank, each checked against the
    dense layer; returns errors and per-phase times (microseconds)."""
    layer = MoELayer(cfg)
    E, M = layer.num_experts, cfg.decode_tokens
    result = {"rank": rank, "world": world, "errors": {}, "times_us": {}}
    try:
        x = layer_input(cfg, 0, rank, prefill_tokens(cfg, rank))
        out = layer.prefill(x)
        torch.cuda.synchronize()
        layer.buffer.check_errors()
        result["errors"]["prefill"] = check("prefill", out, dense_layer(cfg, x, E))
        marks = []
        for _ in range(cfg.iters):
            marks.append([])
            layer.prefill(x, marks[-1])
        result["times_us"]["prefill"] = _phase_times(marks)

        x = layer_input(cfg, 1, rank, M)
        out = layer.decode(x)
        torch.cuda.synchronize()
        layer.buffer.check_errors()
        result["errors"]["decode"] = check("decode", out, dense_layer(cfg, x, E, fp8_routed=True))
        marks = []
        for _ in range(cfg.iters):
            marks.append([])
            layer.decode(x, marks[-1])
        result["times_us"]["decode (eager)"] = _phase_times(marks)

        x_static = torch.zeros(M, cfg.hidden, dtype=torch.bfloat16, device="cuda")
        x_static.copy_(x)
        graph, g_out = layer.capture_decode(x_static)
        for step in range(2, 2 + cfg.iters):         # new tokens each step, same graph
            x = layer_input(cfg, step, rank, M)
            x_static.copy_(x)
            start = _event()
            graph.replay()
            end = _event()
            torch.cuda.synchronize()
            layer.buffer.check_errors()
            err = check(f"decode graph replay {step - 2}", g_out,
                        dense_layer(cfg, x, E, fp8_routed=True))
            result["errors"]["decode (graph)"] = max(err, result["errors"].get("decode (graph)", 0))
            result["times_us"].setdefault("decode (graph)", {}).setdefault("replay", []).append(
                start.elapsed_time(end) * 1e3)
        reps = sorted(result["times_us"]["decode (graph)"]["replay"])
        result["times_us"]["decode (graph)"]["replay"] = reps[len(reps) // 2]
    finally:
        layer.destroy()
    return result


def report(results: list[dict], cfg: MoEConfig) -> str:
    """Rank 0's summary: errors (max over ranks) and phase times (max over ranks)."""
    world = results[0]["world"]
    shared = torch.cuda.device_count() < world
    lines = [f"MoE layer on epgen: {world} ranks{' sharing ' + str(torch.cuda.device_count()) + ' GPU(s)' if shared else ''}, "
             f"hidden {cfg.hidden}, {cfg.experts_per_rank * world} experts (top-{cfg.topk}), "
             f"prefill {cfg.prefill_tokens} tokens/rank, decode {cfg.decode_tokens} tokens/rank",
             f"check against the dense layer (tolerance {TOLERANCE}):"]
    for name in results[0]["errors"]:
        lines.append(f"  {name:<16} max error {max(r['errors'][name] for r in results):.4f}  ok")
    lines.append("per-phase times (us, median over iterations, max over ranks):")
    for mode, phases in results[0]["times_us"].items():
        lines.append(f"  {mode}:")
        for name in phases:
            lines.append(f"    {name:<28} {max(r['times_us'][mode][name] for r in results):9.1f}")
    if shared:
        lines.append("(ranks share GPUs: times are a kernel-overhead floor, not NVLink figures)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f, v in asdict(MoEConfig()).items():
        p.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    p.add_argument("--ranks", type=int, default=None,
                   help="without torchrun: start this many ranks on the GPUs present "
                        "(epgen.launch: one per GPU, else sharing them under MPS)")
    args = vars(p.parse_args(argv))
    ranks = args.pop("ranks")
    cfg = MoEConfig(**args)
    if "RANK" not in os.environ:                 # not under torchrun: start the ranks here
        from epgen import launch
        placement = launch.plan(ranks or max(1, torch.cuda.device_count()))
        print(f"[placement] {placement.describe()}", flush=True)
        results = launch.run_ranks(placement.world, run_layer, cfg, placement=placement)
        print(report(results, cfg), flush=True)
        return 0
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    n = torch.cuda.device_count()
    torch.cuda.set_device(rank % n)
    # NCCL refuses two ranks on one GPU: ranks that share GPUs talk through gloo (epgen needs
    # the process group only for its NVSHMEM bootstrap).
    if n >= world:
        dist.init_process_group("nccl", device_id=torch.device("cuda", rank % n))
    else:
        dist.init_process_group("gloo")
    try:
        result = run_layer(rank, world, cfg)
        results = [None] * world
        dist.all_gather_object(results, result)
        if rank == 0:
            print(report(results, cfg), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
