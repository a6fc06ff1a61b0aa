"""Pure-torch golden model of every epgen operation (the semantics of DeepEP V1, commit 567632d).

Functions take a *global view*: lists indexed by rank of each rank's inputs, plus the rank whose
outputs are wanted. A multi-rank test all_gathers its inputs, calls the function for its own rank
and compares with what the kernel returned. Everything runs on the inputs' device (CPU or GPU);
nothing here is fast, everything here is meant to be obviously right.

Notation: R ranks (= len of the lists), E experts, El = E // R local experts (expert e lives on rank
e // El), K top-k, T tokens of a rank, H hidden, N tokens received, M max dispatch tokens per rank,
S = ceil(H / 128) FP8 scale groups.

Orderings a kernel is free to change (everything else here is exact):
  * low-latency dispatch: the order of rows inside one (local expert, source rank) chunk, and the
    order of the chunks (layout ranges) inside an expert. Use `check_low_latency_dispatch`.
  * padded / unused rows (num_worst_tokens padding, LL rows past recv_count) hold unspecified data,
    except that padded rows of recv_topk_idx are -1.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch

from .jit import layout_facts

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_GROUP = layout_facts.SCALE_GROUP   # channels per FP8 scale: the host's and kernels' fact
AMAX_MIN = 1e-4

Tensors = Sequence[torch.Tensor]


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------
def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    """float8 tensors (any 1-byte float) as uint8 (indexing, cat and padding of float8 are not
    supported everywhere)."""
    return x.view(torch.uint8) if x.dtype.is_floating_point and x.element_size() == 1 else x


def _pad_rows(x: torch.Tensor, n: int, fill=0) -> torch.Tensor:
    """x (not float8) padded with `fill` rows up to n rows."""
    out = x.new_full((n, *x.shape[1:]), fill)
    out[: x.shape[0]] = x
    return out


def _check_topk(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> None:
    if num_experts % num_ranks != 0:
        raise ValueError(f"num_experts={num_experts} must be a multiple of num_ranks={num_ranks}")
    if topk_idx.dim() != 2 or topk_idx.dtype != torch.int64:
        raise ValueError(f"topk_idx must be int64 [T, K], got {topk_idx.dtype} "
                         f"{list(topk_idx.shape)}")
    bad = (topk_idx < -1) | (topk_idx >= num_experts)
    if bool(bad.any()):
        raise ValueError(f"topk_idx holds {topk_idx[bad][0].item()}: values must be -1 or in "
                         f"[0, {num_experts})")


def _check_no_duplicates(topk_idx: torch.Tensor) -> None:
    s = topk_idx.sort(dim=1).values
    if bool(((s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)).any()):
        raise ValueError("low-latency mode needs distinct experts in each topk_idx row")


# ------------------------------------------------------------------------------------------------
# 1. get_dispatch_layout
# ------------------------------------------------------------------------------------------------
def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    """Layout of one rank's tokens: (num_tokens_per_rank [R] int32, num_tokens_per_expert [E]
    int32, is_token_in_rank [T, R] bool).

    num_tokens_per_expert[e] counts (token, slot) pairs with topk_idx == e (-1 slots are skipped);
    is_token_in_rank[t][r] is True when token t selects at least one expert of rank r;
    num_tokens_per_rank[r] counts tokens once per rank they touch.
    """
    _check_topk(topk_idx, num_experts, num_ranks)
    num_local = num_experts // num_ranks
    valid = topk_idx >= 0
    per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).to(torch.int32)
    T = topk_idx.shape[0]
    in_rank = torch.zeros(T, num_ranks, dtype=torch.bool, device=topk_idx.device)
    rows = torch.arange(T, device=topk_idx.device).unsqueeze(1).expand_as(topk_idx)
    in_rank[rows[valid], topk_idx[valid] // num_local] = True
    per_rank = in_rank.sum(dim=0).to(torch.int32)
    return per_rank, per_expert, in_rank


# ------------------------------------------------------------------------------------------------
# 2. Normal-mode dispatch
# ------------------------------------------------------------------------------------------------
class DispatchResult(NamedTuple):
    recv_x: torch.Tensor                    # [N or num_worst_tokens, H], x's dtype
    recv_x_scales: Optional[torch.Tensor]   # [N or num_worst_tokens, S] float32, or None
    recv_topk_idx: Optional[torch.Tensor]   # [N', K] int64, local expert ids, -1 elsewhere/padding
    recv_topk_weights: Optional[torch.Tensor]  # [N', K] float32, 0 where recv_topk_idx == -1
    num_recv_tokens_per_expert_list: Optional[list]  # El ints (aligned); [] if worst; None cached
    recv_src_idx: torch.Tensor              # [N'] int32, token index on the source rank
    recv_src_rank: torch.Tensor             # [N'] int32, the source rank (not a DeepEP output)
    rank_prefix_matrix: torch.Tensor        # [R, R] int32, [i][j] = tokens j gets from ranks 0..i
    num_recv_tokens: int                    # N, the valid rows (the rest is padding)


def _sent_tokens(is_token_in_ranks: Tensors, dst: int) -> list[torch.Tensor]:
    """For each source rank r, the ascending indices of r's tokens that go to rank dst."""
    return [torch.nonzero(m[:, dst]).flatten() for m in is_token_in_ranks]


def _rank_prefix_matrix(is_token_in_ranks: Tensors) -> torch.Tensor:
    counts = torch.stack([m.sum(dim=0) for m in is_token_in_ranks])  # [src, dst]
    return counts.cumsum(dim=0).to(torch.int32)


def dispatch(xs: Tensors, topk_idxs: Optional[Tensors], topk_weights: Optional[Tensors],
             num_experts: int, rank: int, expert_alignment: int = 1,
             x_scales: Optional[Tensors] = None, num_worst_tokens: int = 0,
             is_token_in_ranks: Optional[Tensors] = None,
             num_tokens_per_experts: Optional[Tensors] = None,
             cached: bool = False) -> DispatchResult:
    """What rank `rank` receives from a normal-mode dispatch.

    xs[r]: rank r's [T_r, H] rows, of any dtype (the kernel moves bytes), e.g. bf16, or 1-byte
    rows (float8_e4m3fn) with x_scales[r] [T_r, S] float32 or int32 (S any, moved as they are).
    topk_idxs[r]: [T_r, K] int64 (-1 = unused); topk_weights[r]: [T_r, K] float32 or None.
    is_token_in_ranks[r]: [T_r, R] bool; computed from topk_idxs when None (required without top-k).
    num_tokens_per_experts[r]: rank r's [E] int32 num_tokens_per_expert argument; computed from
    topk_idxs when None (get_dispatch_layout's); required without top-k unless cached.

    recv rows are ordered by source rank, then source token index: source r contributes the tokens
    t with is_token_in_ranks[r][t][rank]. recv_topk_idx = idx - rank * El for experts of `rank`,
    else -1 (weight 0). num_recv_tokens_per_expert_list (DeepEP V1, csrc/deep_ep.cpp): for each
    local expert e of `rank`, the sum over source ranks r of num_tokens_per_experts[r][rank * El +
    e], rounded up to a multiple of expert_alignment, with or without top-k; [] when worst-sized
    (num_worst_tokens > 0); None for a cached dispatch (cached=True: a handle, no top-k).
    num_worst_tokens > 0: outputs padded to that many rows (padded recv_topk_idx rows are -1,
    other padded content is unspecified; here zeros, and -1 in recv_src_idx / recv_src_rank).
    """
    R = len(xs)
    El = num_experts // R
    if topk_idxs is not None:
        for t in topk_idxs:
            _check_topk(t, num_experts, R)
    if is_token_in_ranks is None:
        if topk_idxs is None:
            raise ValueError("dispatch without topk_idx needs is_token_in_ranks")
        is_token_in_ranks = [get_dispatch_layout(t, num_experts, R)[2] for t in topk_idxs]
    if cached and topk_idxs is not None:
        raise ValueError("a cached dispatch has no topk_idxs")
    if num_tokens_per_experts is None and not cached:
        if topk_idxs is None:
            raise ValueError("dispatch without topk_idx needs num_tokens_per_experts "
                             "(DeepEP requires num_tokens_per_expert in every uncached dispatch)")
        num_tokens_per_experts = [get_dispatch_layout(t, num_experts, R)[1] for t in topk_idxs]
    sent = _sent_tokens(is_token_in_ranks, rank)
    N = sum(len(s) for s in sent)
    if num_worst_tokens and N > num_worst_tokens:
        raise ValueError(f"rank {rank} receives {N} tokens > num_worst_tokens={num_worst_tokens}")

    recv_x = torch.cat([_as_bytes(x)[s] for x, s in zip(xs, sent)])  # bytes for FP8
    recv_scales = None
    if x_scales is not None:
        recv_scales = torch.cat([sc[s] for sc, s in zip(x_scales, sent)])
    recv_src_idx = torch.cat(sent).to(torch.int32)
    recv_src_rank = torch.cat([torch.full_like(s, r) for r, s in enumerate(sent)]).to(torch.int32)

    recv_idx = recv_w = None
    counts = None
    if not cached:
        a = expert_alignment
        mine = sum(n[rank * El:(rank + 1) * El].long() for n in num_tokens_per_experts)
        counts = [(int(c) + a - 1) // a * a for c in mine]
    if topk_idxs is not None:
        idx = torch.cat([t[s] for t, s in zip(topk_idxs, sent)])
        local = (idx >= rank * El) & (idx < (rank + 1) * El)
        recv_idx = torch.where(local, idx - rank * El, torch.full_like(idx, -1))
        if topk_weights is not None:
            w = torch.cat([tw[s] for tw, s in zip(topk_weights, sent)]).float()
            recv_w = torch.where(local, w, torch.zeros_like(w))

    if num_worst_tokens:
        n = num_worst_tokens
        recv_x = _pad_rows(recv_x, n)
        recv_scales = None if recv_scales is None else _pad_rows(recv_scales, n)
        recv_idx = None if recv_idx is None else _pad_rows(recv_idx, n, fill=-1)
        recv_w = None if recv_w is None else _pad_rows(recv_w, n)
        recv_src_idx = _pad_rows(recv_src_idx, n, fill=-1)
        recv_src_rank = _pad_rows(recv_src_rank, n, fill=-1)
        counts = None if cached else []
    recv_x = recv_x.view(xs[0].dtype)
    return DispatchResult(recv_x, recv_scales, recv_idx, recv_w, counts, recv_src_idx,
                          recv_src_rank, _rank_prefix_matrix(is_token_in_ranks), N)


# ------------------------------------------------------------------------------------------------
# 3. Normal-mode combine
# ------------------------------------------------------------------------------------------------
class CombineResult(NamedTuple):
    combined_x: torch.Tensor                         # [T, H], xs' dtype
    combined_topk_weights: Optional[torch.Tensor]    # [T, K] float32, or None


def combine(xs: Tensors, is_token_in_ranks: Tensors, rank: int,
            topk_weights: Optional[Tensors] = None,
            bias: Union[None, torch.Tensor, tuple] = None) -> CombineResult:
    """What token owner `rank` gets back from a normal-mode combine.

    xs[j]: rank j's [N_j, H] rows in dispatch's receive order (padding rows past N_j are ignored);
    topk_weights[j]: [N_j, K] float32 or None; is_token_in_ranks[r]: the dispatch routing of rank
    r's tokens, [T_r, R] bool; bias: None, a [T, H] tensor or a (bias_0, bias_1) tuple (either may
    be None). combined_x[t] = bias_0[t] + bias_1[t] + sum over ranks j (ascending) that token t
    went to of xs[j][row of (rank, t)], added in float32 in exactly that order, rounded once to
    xs' dtype.
    combined_topk_weights[t] = the same sum (from 0, ranks ascending) of the topk_weights rows.
    Tokens that went to no rank get the biases (zeros without).
    """
    R = len(xs)
    mine = is_token_in_ranks[rank]
    T, H = mine.shape[0], xs[0].shape[1]
    dev = xs[0].device
    acc = torch.zeros(T, H, dtype=torch.float32, device=dev)
    biases = bias if isinstance(bias, (tuple, list)) else (bias,)
    for b in biases:
        if b is not None:
            acc += b.float()
    wacc = None
    if topk_weights is not None:
        wacc = torch.zeros(T, topk_weights[0].shape[1], dtype=torch.float32, device=dev)
    for j in range(R):
        sent = mine[:, j]
        begin = sum(int(m[:, j].sum()) for m in is_token_in_ranks[:rank])
        rows = torch.arange(begin, begin + int(sent.sum()), device=dev)
        acc[sent] = acc[sent] + xs[j][rows].float()
        if wacc is not None:
            wacc[sent] = wacc[sent] + topk_weights[j][rows].float()
    return CombineResult(acc.to(xs[0].dtype), wacc)


# ------------------------------------------------------------------------------------------------
# 4. FP8 per-128-channel quantization
# ------------------------------------------------------------------------------------------------
def num_scales(hidden: int) -> int:
    return (hidden + SCALE_GROUP - 1) // SCALE_GROUP


def _expand_groups(s: torch.Tensor, hidden: int) -> torch.Tensor:
    """[..., S] per-group values -> [..., H] per-channel values."""
    return s.repeat_interleave(SCALE_GROUP, dim=-1)[..., :hidden]


def _pow2_ceil(v: torch.Tensor) -> torch.Tensor:
    """2 ** ceil(log2(v)) for positive normal float32 v, exactly, from the bits."""
    bits = v.view(torch.int32)
    exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exp << 23).view(torch.float32)


def pack_ue8m0(scale_inv: torch.Tensor) -> torch.Tensor:
    """[..., S] power-of-two float32 scales -> [..., ceil(S/4)] int32: byte i of int j is the
    biased exponent of group 4j + i (little-endian), the last int zero-padded."""
    exp = ((scale_inv.contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
    pad = (-exp.shape[-1]) % 4
    exp = torch.nn.functional.pad(exp, (0, pad))
    return exp.contiguous().view(torch.int32)


def unpack_ue8m0(packed: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Inverse of pack_ue8m0: [..., ceil(S/4)] int32 -> [..., S] float32 (2 ** (byte - 127))."""
    exp = packed.contiguous().view(torch.uint8)[..., :num_groups].to(torch.int32)
    return (exp << 23).view(torch.float32)


def per_token_cast_to_fp8(x: torch.Tensor, round_scale: bool = False, use_ue8m0: bool = False):
    """Quantize [..., H] (bf16) to (x_fp8 [..., H] float8_e4m3fn, scales).

    Per token and per group of 128 channels (the last group covers H % 128 channels when partial):
      amax = max(|x|) in float32, clamped below by 1e-4; scale_inv = amax / 448 (IEEE division);
      round_scale: scale_inv = 2 ** ceil(log2(scale_inv)) (exact, from the float bits);
      x_fp8 = e4m3(clamp(float32(x) * (1 / scale_inv), -448, 448)), round to nearest even.
    scales: float32 [..., S] holding scale_inv, or with use_ue8m0 (needs round_scale) the exponent
    bytes packed four per int32, [..., ceil(S/4)] (see pack_ue8m0).
    """
    if use_ue8m0 and not round_scale:
        raise ValueError("use_ue8m0 needs round_scale=True")
    H = x.shape[-1]
    S = num_scales(H)
    xf = x.float()
    padded = torch.nn.functional.pad(xf, (0, S * SCALE_GROUP - H))
    amax = padded.view(*x.shape[:-1], S, SCALE_GROUP).abs().amax(dim=-1).clamp(min=AMAX_MIN)
    # Tensor / tensor: torch's CUDA division by a Python scalar multiplies by its reciprocal.
    scale_inv = amax / torch.full_like(amax, FP8_MAX)
    if round_scale:
        scale_inv = _pow2_ceil(scale_inv)
    scale = torch.ones_like(scale_inv) / scale_inv
    x_fp8 = (xf * _expand_groups(scale, H)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x_fp8, (pack_ue8m0(scale_inv) if use_ue8m0 else scale_inv)


def per_token_cast_back(x_fp8: torch.Tensor, scales: torch.Tensor,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize: float32(x_fp8) * scale_inv of the channel's group, returned as `dtype`.
    scales: float32 [..., S], or int32 [..., ceil(S/4)] packed UE8M0."""
    H = x_fp8.shape[-1]
    if scales.dtype == torch.int32:
        scales = unpack_ue8m0(scales, num_scales(H))
    return (x_fp8.float() * _expand_groups(scales.float(), H)).to(dtype)


# ------------------------------------------------------------------------------------------------
# 5. Low-latency dispatch
# ------------------------------------------------------------------------------------------------
class LowLatencyDispatchResult(NamedTuple):
    recv_x: torch.Tensor                   # [El, R*M, H] bf16 or float8_e4m3fn
    recv_x_scales: Optional[torch.Tensor]  # [El, R*M, S] float32 / [El, R*M, ceil(S/4)] int32
    recv_count: torch.Tensor               # [El] int32
    recv_src_info: torch.Tensor            # [El, R*M] int32, source token index per row
    recv_layout_range: torch.Tensor        # [El, R] int64, (begin << 32) | count
    recv_sources: list                     # per local expert: [(src_rank, src_token), ...]


def decode_layout_range(v: int) -> tuple[int, int]:
    """(begin, count) from a recv_layout_range entry."""
    return v >> 32, v & 0xFFFFFFFF


def _ll_tokens(topk_idxs: Tensors, expert: int) -> list[torch.Tensor]:
    """For each source rank, the ascending tokens that selected `expert`."""
    return [torch.nonzero((t == expert).any(dim=1)).flatten() for t in topk_idxs]


def wire_cast(x: torch.Tensor, wire_format: str):
    """bf16 rows x [T, H] in a named wire format (epgen.formats): x itself for "bf16", else
    dispatch's (data, scales) tuple, scales in the format's normal-mode layout."""
    flags = {"bf16": (False, False, False), "fp8_e4m3_f32_128": (True, False, False),
             "fp8_ue8m0_128": (True, True, True)}
    if wire_format in flags:
        data, scales = ll_cast(x, *flags[wire_format])
    else:
        data, scales = ll_cast(x, wire_format=wire_format)
    return data if scales is None else (data, scales)


def ll_cast(x: torch.Tensor, use_fp8: bool = True, round_scale: bool = False,
            use_ue8m0: bool = False, wire_format: Optional[str] = None):
    """(data, scales or None) a low-latency dispatch sends for bf16 rows x [..., H]: DeepEP's
    flags (per_token_cast_to_fp8, or the BF16 rows), or wire_format "mxfp8" (mxfp8_quantize,
    E8M0 bytes packed four per int32: [..., ceil(H/128)]) or "nvfp4" (nvfp4_quantize with the
    per-token global scale, scales as nvfp4_wire_scales: [..., ceil(H/64) + 1] int32), or an
    opaque format "opaque<R>[+<S>]": x (any dtype, R bytes a row) or x = (data, side) as it is,
    nothing cast (the caller quantized it)."""
    if _is_opaque(wire_format):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, None)
    if wire_format == "mxfp8":
        q, s = mxfp8_quantize(x)
        return q, pack_scale_bytes(s)
    if wire_format == "nvfp4":
        d, b, g = nvfp4_quantize(x)
        return d, nvfp4_wire_scales(b, g)
    if wire_format is not None:
        raise ValueError(f"wire_format={wire_format!r}: must be None, 'mxfp8' or 'nvfp4'")
    return per_token_cast_to_fp8(x, round_scale, use_ue8m0) if use_fp8 else (x, None)


def _is_opaque(wire_format: Optional[str]) -> bool:
    return wire_format is not None and wire_format.startswith("opaque")


def _byte_rows(t: torch.Tensor) -> torch.Tensor:
    """A [T, W] tensor of any dtype as its bytes, uint8 [T, W * element size] (no cast)."""
    return t.contiguous().view(torch.uint8)


def low_latency_dispatch(xs: Tensors, topk_idxs: Tensors, num_experts: int, rank: int,
                         num_max_dispatch_tokens_per_rank: int, use_fp8: bool = True,
                         round_scale: bool = False, use_ue8m0: bool = False,
                         wire_format: Optional[str] = None) -> LowLatencyDispatchResult:
    """What rank `rank` receives from a low-latency dispatch, in one canonical placement.

    xs[r]: rank r's [T_r, H] bf16 tokens (T_r <= M); topk_idxs[r]: [T_r, K] int64, -1 skipped,
    experts distinct within a row. Every (token, expert of `rank`) pair is one row of
    recv_x[local expert]. Here the rows of expert e are grouped by source rank ascending, tokens
    ascending, source r's chunk at begin = sum of the counts of sources < r: epgen's kernels'
    placement (rows in a chunk ascending is what the combine relies on: ll_row_places; DeepEP's
    order within a chunk is arbitrary); compare with check_low_latency_dispatch.
    FP8: rows are per_token_cast_to_fp8(row, round_scale, use_ue8m0); scales are returned as the
    logical [El, R*M, S] tensor (DeepEP's is column-major in the last two dims: compare values).
    Rows past recv_count[e] are unspecified (here zeros, src_info -1).
    wire_format "mxfp8" / "nvfp4" (use_fp8 etc. then unused): rows and scales are ll_cast's.
    An opaque wire_format: xs[r] is rank r's rows (any dtype) or (rows, side rows); both arrive
    byte for byte, recv_x and recv_x_scales (the side rows) in their senders' dtypes.
    """
    R, M = len(xs), num_max_dispatch_tokens_per_rank
    El = num_experts // R
    for r, t in enumerate(topk_idxs):
        _check_topk(t, num_experts, R)
        _check_no_duplicates(t)
        if t.shape[0] > M:
            raise ValueError(f"rank {r} has {t.shape[0]} tokens > M={M}")
    casts = [ll_cast(x, use_fp8, round_scale, use_ue8m0, wire_format) for x in xs]
    if _is_opaque(wire_format):       # the caller's bytes, returned in its dtypes
        data = [_byte_rows(d) for d, _ in casts]
        aux = None if casts[0][1] is None else [_byte_rows(a) for _, a in casts]
        views = (casts[0][0].dtype, None if aux is None else casts[0][1].dtype)
    else:
        data = [_as_bytes(c[0]) for c in casts]
        aux = None if casts[0][1] is None else [c[1] for c in casts]     # the scales
        views = (casts[0][0].dtype, None)
    recv_x, recv_aux, recv_count, src_info, layout, sources = _ll_place(
        data, aux, topk_idxs, El, rank, M)
    recv_x = recv_x.view(views[0])
    if views[1] is not None:
        recv_aux = recv_aux.view(views[1])
    return LowLatencyDispatchResult(recv_x, recv_aux, recv_count, src_info, layout, sources)


def _ll_place(data: list, aux: list | None, topk_idxs: Tensors, El: int, rank: int, M: int):
    """Where low_latency_dispatch puts rows: rank r's data[r] (and aux[r]: scales or side
    rows) of each token routed to local expert le at slots [begin, begin + n) of le, the
    ranks in order, their tokens ascending. (recv, recv_aux, recv_count, src_info, layout,
    sources) with recv / recv_aux in data's / aux's dtypes."""
    R, dev = len(data), data[0].device
    recv = torch.zeros(El, R * M, data[0].shape[1], dtype=data[0].dtype, device=dev)
    recv_aux = None if aux is None else \
        torch.zeros(El, R * M, aux[0].shape[1], dtype=aux[0].dtype, device=dev)
    recv_count = torch.zeros(El, dtype=torch.int32, device=dev)
    src_info = torch.full((El, R * M), -1, dtype=torch.int32, device=dev)
    layout = torch.zeros(El, R, dtype=torch.int64, device=dev)
    sources = []
    for le in range(El):
        begin, pairs = 0, []
        for r, toks in enumerate(_ll_tokens(topk_idxs, rank * El + le)):
            n = len(toks)
            recv[le, begin:begin + n] = data[r][toks]
            if recv_aux is not None:
                recv_aux[le, begin:begin + n] = aux[r][toks]
            src_info[le, begin:begin + n] = toks.to(torch.int32)
            layout[le, r] = (begin << 32) | n
            pairs += [(r, t) for t in toks.tolist()]
            begin += n
        recv_count[le] = begin
        sources.append(pairs)
    return recv, recv_aux, recv_count, src_info, layout, sources


def ll_row_places(topk_idx: torch.Tensor) -> torch.Tensor:
    """[T, K] int64: where a low-latency dispatch puts each (token, top-k slot) row inside its
    (expert, source) chunk: the number of entries before (t, k), in (token, slot) order, that
    name the same expert (-1 where topk_idx is -1). A chunk so holds its tokens ascending
    (_ll_place's order), and the tokens' owner can tell each row's place from topk_idx alone
    (templates/ll_common.cuh entry_place)."""
    seen: dict = {}
    places = []
    for e in topk_idx.flatten().tolist():
        places.append(seen.get(e, 0) if e >= 0 else -1)
        if e >= 0:
            seen[e] = seen.get(e, 0) + 1
    return torch.tensor(places, dtype=torch.int64).view(topk_idx.shape).to(topk_idx.device)


def ll_combine_slot_index(topk_idx: torch.Tensor, num_ranks: int, num_experts: int,
                          M: int) -> torch.Tensor:
    """[T, K] int64: the slot of the owner's low-latency combine receive half that holds the
    expert output of (t, k) (templates/ll_common.cuh "Where a (token, top-k slot) row lives"):
    expert rank r's rows from r * M * min(K, El) on, its local experts in order, each taking
    as many slots as the owner sent it rows, each row at its ll_row_places; -1 where topk_idx
    is -1."""
    K = topk_idx.shape[1]
    El = num_experts // num_ranks
    idx = topk_idx.cpu()
    counts = torch.bincount(idx[idx >= 0], minlength=num_experts)
    before = torch.cumsum(counts, 0) - counts                  # entries of experts < e
    rank = torch.arange(num_experts) // El
    base = rank * M * min(K, El) + before - before[rank * El]  # ... of this rank's experts < e
    rows = base[idx.clamp(min=0)] + ll_row_places(idx)
    return torch.where(idx >= 0, rows, -1).to(topk_idx.device)


def check_low_latency_dispatch(xs: Tensors, topk_idxs: Tensors, num_experts: int, rank: int,
                               num_max_dispatch_tokens_per_rank: int, recv_x: torch.Tensor,
                               recv_count: torch.Tensor, recv_src_info: torch.Tensor,
                               recv_layout_range: torch.Tensor,
                               recv_x_scales: Optional[torch.Tensor] = None,
                               round_scale: bool = False, use_ue8m0: bool = False,
                               exact_fp8: bool = False,
                               wire_format: Optional[str] = None) -> None:
    """Check a kernel's low-latency dispatch outputs for rank `rank`; raise AssertionError naming
    the first difference. FP8 is recognized from recv_x's dtype.

    Required: recv_count equal; for each local expert e and source r, layout range (begin, count)
    with count equal to the reference, ranges disjoint and inside [0, recv_count[e]); the src_info
    values of each range equal the reference tokens in order, ascending (ll_row_places: the
    combine's owner finds its rows by that order); each row equals its source token
    (named by src_info): BF16 bit-exact; wire_format mxfp8 / nvfp4: bytes and scales bit-exact
    with ll_cast; FP8 with exact_fp8, bytes and scales bit-exact; otherwise
    scales equal (round_scale / UE8M0) or within 2^-20 relative (float scales), and every
    dequantized element within 2^-4 * |x| + 2^-9 * scale_inv of the BF16 source x (RNE to e4m3
    has relative error < 2^-4 for normals, and absolute error <= 2^-10 * scale_inv for subnormals).
    """
    use_fp8 = recv_x.dtype == FP8
    ref = low_latency_dispatch(xs, topk_idxs, num_experts, rank, num_max_dispatch_tokens_per_rank,
                               use_fp8, round_scale, use_ue8m0, wire_format)
    where = f"rank {rank}"
    got_count, exp_count = recv_count.tolist(), ref.recv_count.tolist()
    assert got_count == exp_count, f"{where}: recv_count {got_count}, expected {exp_count}"
    El, R = ref.recv_layout_range.shape
    for le in range(El):
        spans = [decode_layout_range(int(v)) for v in recv_layout_range[le].tolist()]
        for r, (begin, n) in enumerate(spans):
            w = f"{where}, local expert {le}, source rank {r}"
            n_ref = decode_layout_range(int(ref.recv_layout_range[le, r]))[1]
            assert n == n_ref, f"{w}: layout count {n}, expected {n_ref}"
            assert n == 0 or 0 <= begin and begin + n <= exp_count[le], \
                f"{w}: range [{begin}, {begin + n}) outside [0, recv_count={exp_count[le]})"
        used = sorted((b, n, r) for r, (b, n) in enumerate(spans) if n > 0)
        for (b0, n0, r0), (b1, _, r1) in zip(used, used[1:]):
            assert b0 + n0 <= b1, \
                f"{where}, local expert {le}: ranges of sources {r0}, {r1} overlap"
        for r, (begin, n) in enumerate(spans):
            w = f"{where}, local expert {le}, source rank {r}"
            toks = recv_src_info[le, begin:begin + n].long()
            exp_toks = [t for s, t in ref.recv_sources[le] if s == r]
            assert toks.tolist() == exp_toks, \
                f"{w}: src_info {toks.tolist()}, expected tokens {exp_toks} in this order"
            if n > 0:
                got_s = None if recv_x_scales is None else recv_x_scales[le, begin:begin + n]
                if _is_opaque(wire_format):
                    _check_ll_bytes(w, ll_cast(xs[r], wire_format=wire_format), toks,
                                    recv_x[le, begin:begin + n], got_s)
                    continue
                _check_ll_rows(w, xs[r][toks.to(xs[r].device)], recv_x[le, begin:begin + n],
                               got_s, round_scale, use_ue8m0, exact_fp8, wire_format)


def _check_ll_bytes(w, src, toks, got, got_s):
    """One chunk of opaque rows (and side rows) against the source rows `toks`, byte for byte."""
    data, side = src
    toks = toks.to(data.device)
    assert got.dtype == data.dtype, f"{w}: recv_x is {got.dtype}, the rows were {data.dtype}"
    assert torch.equal(_byte_rows(got), _byte_rows(data)[toks]), f"{w}: opaque row bytes differ"
    if side is not None:
        assert got_s is not None and got_s.dtype == side.dtype, \
            f"{w}: side rows of {side.dtype} need recv_x_scales of that dtype"
        assert torch.equal(_byte_rows(got_s), _byte_rows(side)[toks]), \
            f"{w}: opaque side bytes differ"


def _check_ll_rows(w, src, got, got_s, round_scale, use_ue8m0, exact_fp8, wire_format=None):
    """One (expert, source) chunk of LL dispatch rows against its BF16 source tokens."""
    if wire_format is not None:     # MXFP8 / NVFP4: bit for bit with ll_cast
        q, s = ll_cast(src, wire_format=wire_format)
        assert got_s is not None, f"{w}: {wire_format} rows need recv_x_scales"
        assert torch.equal(_as_bytes(got), _as_bytes(q)), f"{w}: {wire_format} bytes differ"
        assert torch.equal(got_s, s), f"{w}: {wire_format} scales differ"
        return
    if got.dtype != FP8:
        assert torch.equal(got, src), f"{w}: BF16 rows differ from the source tokens"
        return
    assert got_s is not None, f"{w}: FP8 rows need recv_x_scales"
    q, s = per_token_cast_to_fp8(src, round_scale, use_ue8m0)
    if exact_fp8:
        assert torch.equal(got.view(torch.uint8), q.view(torch.uint8)), \
            f"{w}: FP8 bytes differ from per_token_cast_to_fp8"
    if exact_fp8 or round_scale:
        assert torch.equal(got_s, s), f"{w}: scales {got_s.tolist()}, expected {s.tolist()}"
    else:
        assert torch.allclose(got_s, s, rtol=2 ** -20, atol=0), \
            f"{w}: scales {got_s.tolist()}, expected {s.tolist()}"
    H = src.shape[1]
    scale_inv = unpack_ue8m0(got_s, num_scales(H)) if use_ue8m0 else got_s
    err = (per_token_cast_back(got, scale_inv) - src.float()).abs()
    tol = src.float().abs() * 2 ** -4 + _expand_groups(scale_inv, H) * 2 ** -9
    bad = ~(err <= tol)
    assert not bool(bad.any()), \
        f"{w}: FP8 element {bad.nonzero()[0].tolist()} off by {err[bad].max().item()}"


# ------------------------------------------------------------------------------------------------
# 6. Low-latency combine
# ------------------------------------------------------------------------------------------------
def _ll_combine_rows(xs: Tensors, topk_idx: torch.Tensor, rank: int, recv_src_infos: Tensors,
                     recv_layout_ranges: Tensors, skip_ranks=()) -> torch.Tensor:
    """y[t, k]: float32 expert output of slot k of owner `rank`'s token t (zeros where the slot
    is -1 or its expert lives on a rank in skip_ranks), found through the expert ranks' handles."""
    R = len(xs)
    El, RM, H = xs[0].shape
    _check_topk(topk_idx, El * R, R)
    _check_no_duplicates(topk_idx)
    T, K = topk_idx.shape
    dev = xs[0].device
    row_of = {}  # (global expert, token) -> row of xs[owner].view(El * R * M, H)
    for j in range(R):
        lay, info = recv_layout_ranges[j].tolist(), recv_src_infos[j].tolist()
        for le in range(El):
            begin, n = decode_layout_range(lay[le][rank])
            for row in range(begin, begin + n):
                row_of[(j * El + le, info[le][row])] = le * RM + row
    y = torch.zeros(T, K, H, dtype=torch.float32, device=dev)  # y[t, k] = output of slot k
    idx = topk_idx.tolist()
    for j in range(R):
        if j in skip_ranks:
            continue
        slots = [(t, k) for t in range(T) for k in range(K) if idx[t][k] // El == j]
        for t, k in slots:
            if (idx[t][k], t) not in row_of:
                raise ValueError(f"token {t} of rank {rank} is missing from the rows of expert "
                                 f"{idx[t][k]}")
        if slots:
            ts, ks = (torch.tensor(v, device=dev) for v in zip(*slots))
            rows = torch.tensor([row_of[(idx[t][k], t)] for t, k in slots], device=dev)
            y[ts, ks] = xs[j].reshape(El * RM, H)[rows].float()
    return y


def low_latency_combine(xs: Tensors, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                        rank: int, recv_src_infos: Tensors, recv_layout_ranges: Tensors,
                        wire_format: str = "bf16") -> torch.Tensor:
    """What token owner `rank` gets from a low-latency combine: [T, H] in xs' dtype (bf16).

    xs[j]: rank j's expert outputs [El, R*M, H], row i of local expert e being the output for the
    row the LL dispatch placed there; recv_src_infos[j] / recv_layout_ranges[j]: rank j's LL handle
    (any placement, e.g. a kernel's). topk_idx / topk_weights: rank `rank`'s [T, K] int64 / float32
    (the dispatch's top-k). combined[t] = sum over k ascending with topk_idx[t][k] != -1 of
    float32(weight[t][k]) * float32(y_k), added in float32 (multiply, round, add, round), rounded
    once to bf16; y_k is the row of expert topk_idx[t][k] (on rank e // El, local e % El) inside
    source `rank`'s range whose src_info is t. Tokens with no expert get zeros.
    This is the per-expert combine's order (templates/ll_combine.cuh, EPGEN_LL_COMBINE=per_expert).
    wire_format (COMBINE_FORMATS): the rows cross the wire in it, so float32(y_k) is
    combine_wire_values(y_k) (section 8); "bf16" adds the rows themselves.
    """
    y = _ll_combine_rows(xs, topk_idx, rank, recv_src_infos, recv_layout_ranges)
    if wire_format != "bf16":    # a message's values depend on its row alone
        T, K, H = y.shape
        y = combine_wire_values(y.view(T * K, H).to(torch.bfloat16), wire_format).view(T, K, H)
    return sum_rows_per_expert(y, topk_idx, topk_weights).to(torch.bfloat16)


def low_latency_combine_slot_rows(xs: Tensors, topk_idx: torch.Tensor, rank: int,
                                  recv_src_infos: Tensors,
                                  recv_layout_ranges: Tensors) -> torch.Tensor:
    """The bf16 rows [T, K, H] token owner `rank` receives, slot (t, k) from expert
    topk_idx[t][k] (zeros for -1): what combine_wire_encode turns into that slot's message."""
    return _ll_combine_rows(xs, topk_idx, rank, recv_src_infos,
                            recv_layout_ranges).to(torch.bfloat16)


def sum_rows_per_expert(y: torch.Tensor, topk_idx: torch.Tensor,
                        topk_weights: torch.Tensor) -> torch.Tensor:
    """low_latency_combine's float32 sum of y [T, K, H] (float32 slot rows) over k ascending."""
    T, K = topk_idx.shape
    valid, w = (topk_idx >= 0).to(y.device), topk_weights.float().to(y.device)
    acc = torch.zeros(T, y.shape[2], dtype=torch.float32, device=y.device)
    for k in range(K):
        acc = torch.where(valid[:, k:k + 1], acc + w[:, k:k + 1] * y[:, k], acc)
    return acc


# The per-rank combine's partial sums cross the wire in BF16: at DeepEP's shape and inputs their
# calc_diff to the float64 truth is at most 2.8e-6 (EP2/4/8), under DeepEP's 1e-5 bound, so
# float32 partials (2x the bytes) are not needed (bench/ll_partial_precision.py, bench/NOTES.md).
PER_RANK_PARTIAL_DTYPE = torch.bfloat16


def low_latency_combine_per_rank(xs: Tensors, topk_idx: torch.Tensor,
                                 topk_weights: torch.Tensor, rank: int, recv_src_infos: Tensors,
                                 recv_layout_ranges: Tensors,
                                 partial_dtype: torch.dtype = PER_RANK_PARTIAL_DTYPE,
                                 masked_ranks: Sequence[int] = ()) -> torch.Tensor:
    """The per-rank combine (templates/ll_combine_per_rank.cuh, EPGEN_LL_COMBINE=per_rank), bit
    for bit. Arguments as low_latency_combine's.

    Expert rank j's partial for owner `rank`'s token t: p_j[t] = sum over k ascending with
    topk_idx[t][k] on rank j of float32(weight[t][k]) * float32(y_k) (multiply, round, add,
    round, starting from +0), rounded to partial_dtype (float32: exact). The owner adds, for j
    ascending over the ranks holding an expert of t and not in masked_ranks (enable_shrink: their
    partials are absent), float32(p_j[t]) to a float32 +0 (add, round), and rounds once to bf16.
    Tokens with no expert (or only masked ranks' experts) get zeros.
    """
    if partial_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"partial_dtype={partial_dtype}: must be torch.float32 or torch.bfloat16")
    R = len(xs)
    El = xs[0].shape[0]
    y = _ll_combine_rows(xs, topk_idx, rank, recv_src_infos, recv_layout_ranges,
                         skip_ranks=set(masked_ranks))
    return sum_rows_per_rank(y, topk_idx, topk_weights, El, R, partial_dtype,
                             masked_ranks).to(xs[0].dtype)


def sum_rows_per_rank(y: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                      num_local_experts: int, num_ranks: int,
                      partial_dtype: torch.dtype = PER_RANK_PARTIAL_DTYPE,
                      masked_ranks: Sequence[int] = ()) -> torch.Tensor:
    """low_latency_combine_per_rank's float32 result from y [T, K, H] (float32 slot rows)."""
    T, K = topk_idx.shape
    dev = y.device
    w = topk_weights.float().to(dev)
    home = torch.where(topk_idx >= 0, topk_idx // num_local_experts,
                       torch.full_like(topk_idx, -1)).to(dev)
    acc = torch.zeros(T, y.shape[2], dtype=torch.float32, device=dev)
    for j in range(num_ranks):
        if j in masked_ranks:
            continue
        on_j = home == j
        part = torch.zeros_like(acc)
        for k in range(K):
            part = torch.where(on_j[:, k:k + 1], part + w[:, k:k + 1] * y[:, k], part)
        part = part.to(partial_dtype).float()
        acc = torch.where(on_j.any(dim=1, keepdim=True), acc + part, acc)
    return acc


# ------------------------------------------------------------------------------------------------
# 7. Wire formats: MXFP8 and NVFP4 quantizers (bit-exact definitions; see README "Wire formats")
# ------------------------------------------------------------------------------------------------
MX_GROUP = 32            # MXFP8: channels per E8M0 scale (OCP MX v1.0)
E4M3_EMAX = 8            # exponent of e4m3's largest normal (448 = 1.75 * 2^8)
E8M0_BIAS = 127
NVFP4_GROUP = 16         # NVFP4: channels per e4m3 block scale
E2M1_MAX = 6.0
# e2m1 magnitudes by code (sign is bit 3): 0, 0.5, 1, 1.5, 2, 3, 4, 6.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    """float32 [..., H] -> ([..., G, group] zero-padded, G = ceil(H / group))."""
    H = x.shape[-1]
    G = (H + group - 1) // group
    padded = torch.nn.functional.pad(x.float(), (0, G * group - H))
    return padded.view(*x.shape[:-1], G, group), G


def _floor_log2(v: torch.Tensor) -> torch.Tensor:
    """floor(log2(v)) of positive finite float32 v (normal or subnormal), exactly: frexp gives
    v = m * 2^e with m in [0.5, 1)."""
    return torch.frexp(v)[1] - 1


def _exp2_int(e: torch.Tensor) -> torch.Tensor:
    """2.0 ** e as float32, exactly, for integer e in [-149, 127] (ldexp on float64 then a cast
    that is exact since the result is a float32 power of two)."""
    return torch.ldexp(torch.ones_like(e, dtype=torch.float64), e.to(torch.float64)).float()


def mxfp8_quantize(x: torch.Tensor):
    """MXFP8 (OCP MX v1.0): [..., H] -> (x_fp8 [..., H] float8_e4m3fn, scales [..., ceil(H/32)]
    uint8, the E8M0 biased exponents).

    Per token and per group of 32 channels (the last group partial when H % 32 != 0):
      amax = max |float32(x)| of the group;
      X = floor(log2(amax)) - 8 (e4m3's emax), clamped to [-127, 127]; amax == 0 gives X = -127;
      scale byte = X + 127 (E8M0; 0xFF, NaN, never produced);
      x_fp8 = e4m3(clamp(float32(x) * 2^-X, -448, 448)), round to nearest even (x * 2^-X is exact:
      a power of two). |x| * 2^-X lies in [0, 512), so values in (464, 512) saturate to 448 (the
      MX spec leaves overflow to the implementation; this is the satfinite choice).
    """
    g, _ = _groups(x, MX_GROUP)
    amax = g.abs().amax(dim=-1)
    X = torch.where(amax > 0, _floor_log2(torch.where(amax > 0, amax, torch.ones_like(amax)))
                    - E4M3_EMAX, torch.full_like(amax, -E8M0_BIAS, dtype=torch.int32))
    X = X.clamp(-E8M0_BIAS, E8M0_BIAS).to(torch.int32)
    H = x.shape[-1]
    inv = _exp2_int(-X).repeat_interleave(MX_GROUP, dim=-1)[..., :H]
    q = (x.float() * inv).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, (X + E8M0_BIAS).to(torch.uint8)


def e8m0_to_float(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes (uint8) -> float32 2^(byte - 127) (byte 0 is 2^-127, a float32 subnormal)."""
    return _exp2_int(scales.to(torch.int32) - E8M0_BIAS)


def mxfp8_dequantize(x_fp8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32(x_fp8) * 2^(scale byte - 127) of the channel's group (exact in float32 unless the
    product is below float32's range)."""
    H = x_fp8.shape[-1]
    s = e8m0_to_float(scales).repeat_interleave(MX_GROUP, dim=-1)[..., :H]
    return x_fp8.float() * s


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """float32 -> e2m1 codes (uint8, 0..15): round to nearest, ties to the even code (the even
    mantissa), |v| > 6 saturating to 6, the sign kept (negative values rounding to 0 give -0,
    code 8). This is PTX cvt.rn.satfinite.e2m1x2.f32 on finite inputs."""
    a = v.abs()
    code = torch.zeros_like(a, dtype=torch.int32)
    # Midpoints between codes c and c + 1; a tie goes to whichever of c, c + 1 is even.
    for c, (lo, hi) in enumerate(zip(E2M1_VALUES, E2M1_VALUES[1:])):
        mid = (lo + hi) / 2
        code += ((a >= mid) if c % 2 else (a > mid)).to(torch.int32)
    return (code | (torch.signbit(v).to(torch.int32) << 3)).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (uint8, low 4 bits) -> float32."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    c = codes.to(torch.int64)
    mag = table[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """[..., 2n] codes -> [..., n] uint8: element 2i in the low nibble of byte i, 2i + 1 high."""
    c = codes.to(torch.uint8)
    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_e2m1: [..., n] uint8 -> [..., 2n] codes."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def nvfp4_global_scale(x: torch.Tensor) -> torch.Tensor:
    """The per-token float32 global scale: (448 * 6) / amax(|x| of the token), IEEE division
    (amax clamped below by 1e-4, as the FP8 casts do), [...]."""
    amax = x.float().abs().amax(dim=-1).clamp(min=AMAX_MIN)
    return torch.full_like(amax, FP8_MAX * E2M1_MAX) / amax


def nvfp4_quantize(x: torch.Tensor, global_scale: Optional[torch.Tensor] = None):
    """NVFP4: [..., H] (H even) -> (data [..., H/2] uint8, block_scales [..., ceil(H/16)] uint8
    e4m3 bytes, global_scale [...] float32).

    global_scale g: one float32 per token (nvfp4_global_scale when None; a caller's [...] or
    broadcastable tensor otherwise). It travels with the token: dispatch mixes tokens from ranks
    whose tensors had different global scales. Per token and group of 16 channels (last partial):
      amax = max |float32(x)|;  sf = e4m3((amax / 6) * g) (float32 ops, each rounded to nearest
      even; e4m3 round to nearest even, saturating at 448);
      q = g / float32(sf) (IEEE division), 0 where sf == 0;
      value = e2m1(float32(x) * q) (e2m1_encode), packed two per byte (pack_e2m1).
    Dequantized: e2m1 * float32(sf) / g (nvfp4_dequantize).
    """
    H = x.shape[-1]
    if H % 2:
        raise ValueError(f"NVFP4 needs an even hidden size, got {H}")
    g = nvfp4_global_scale(x) if global_scale is None else \
        global_scale.float().expand(x.shape[:-1]).contiguous()
    blocks, _ = _groups(x, NVFP4_GROUP)
    amax = blocks.abs().amax(dim=-1)
    sf_f = (amax / torch.full_like(amax, E2M1_MAX)) * g.unsqueeze(-1)
    sf = sf_f.clamp(max=FP8_MAX).to(FP8)
    sf32 = sf.float()
    q = torch.where(sf32 != 0, g.unsqueeze(-1) / torch.where(sf32 != 0, sf32, torch.ones_like(sf32)),
                    torch.zeros_like(sf32))
    codes = e2m1_encode(x.float() * q.repeat_interleave(NVFP4_GROUP, dim=-1)[..., :H])
    return pack_e2m1(codes), sf.view(torch.uint8), g


def nvfp4_dequantize(data: torch.Tensor, block_scales: torch.Tensor,
                     global_scale: torch.Tensor) -> torch.Tensor:
    """float32 e2m1 value * float32(e4m3 block scale) / global scale, [..., H]."""
    v = e2m1_decode(unpack_e2m1(data))
    H = v.shape[-1]
    sf = block_scales.view(FP8).float().repeat_interleave(NVFP4_GROUP, dim=-1)[..., :H]
    return v * sf / global_scale.float().unsqueeze(-1)


def pack_scale_bytes(b: torch.Tensor) -> torch.Tensor:
    """[..., n] uint8 -> [..., ceil(n/4)] int32, byte i of int j = byte 4j + i (little-endian),
    the last int zero-padded: DeepEP's UE8M0 packing, used for every 1-byte scale."""
    pad = (-b.shape[-1]) % 4
    return torch.nn.functional.pad(b.to(torch.uint8), (0, pad)).contiguous().view(torch.int32)


def unpack_scale_bytes(packed: torch.Tensor, n: int) -> torch.Tensor:
    return packed.contiguous().view(torch.uint8)[..., :n]


def nvfp4_wire_scales(block_scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4's scale columns on the wire: the e4m3 block-scale bytes packed four per int32
    (pack_scale_bytes), then one column holding the float32 global scale's bits: int32
    [..., ceil(H/64) + 1]. The global scale so travels with its token through any dispatch."""
    g = global_scale.float().contiguous().view(torch.int32).unsqueeze(-1)
    return torch.cat([pack_scale_bytes(block_scales), g], dim=-1)


def nvfp4_split_wire_scales(wire: torch.Tensor, hidden: int):
    """Inverse of nvfp4_wire_scales: (block_scales uint8 [..., ceil(H/16)], global [...] f32)."""
    G = (hidden + NVFP4_GROUP - 1) // NVFP4_GROUP
    block = unpack_scale_bytes(wire[..., :-1], G)
    return block, wire[..., -1].contiguous().view(torch.float32)


# Received-scale layouts of low-latency dispatch (formats.RECV_SCALE_LAYOUTS; the device map is
# templates/ll_scale_layout.cuh, checked against these on the host). An expert's scales are RM rows
# of W 4-byte words (float scales, or 1-byte scales packed four per word, pack_scale_bytes).
def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def scale_layout_words(layout: str, experts: int, RM: int, W: int) -> int:
    """Words of the storage holding `experts` experts' scales in `layout` (padding included)."""
    rows = {"deepep": RM, "deepgemm": _cdiv(RM, 4) * 4, "cutlass_128x4": _cdiv(RM, 128) * 128}
    return experts * rows[layout] * W


def scale_word_offsets(layout: str, experts: int, RM: int, W: int) -> torch.Tensor:
    """int64 [experts, RM, W]: the storage word of word q of row m of expert e.
      deepep:   (e * W + q) * RM + m  (DeepEP's column-major scales)
      deepgemm: (e * W + q) * RM4 + m, RM4 = RM rounded up to 4 (TMA's 16 bytes: DeepGEMM's
                get_mn_major_tma_aligned_tensor strides (RM4 * W, 1, RM4))
      cutlass_128x4: a word is 4 consecutive scale columns (4q .. 4q + 3) of one row, and CUTLASS's
                128x4 tile (TensorRT-LLM get_sf_out_offset_128x4: byte ((m // 128) * ceil(n/4) +
                k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + k % 4, the experts one after
                another, each padded to ceil(RM / 128) * 128 rows) puts those 4 bytes at word
                ((e * ceil(RM/128) + m // 128) * W + q) * 128 + (m % 32) * 4 + (m % 128) // 32."""
    e = torch.arange(experts).view(-1, 1, 1)
    m = torch.arange(RM).view(1, -1, 1)
    q = torch.arange(W).view(1, 1, -1)
    if layout == "cutlass_128x4":
        tiles = _cdiv(RM, 128)
        return ((e * tiles + m // 128) * W + q) * 128 + (m % 32) * 4 + (m % 128) // 32
    rows = _cdiv(RM, 4) * 4 if layout == "deepgemm" else RM
    if layout not in ("deepep", "deepgemm"):
        raise ValueError(f"layout={layout!r}: one of deepep, deepgemm, cutlass_128x4")
    return (e * W + q) * rows + m


def scales_to_layout(words: torch.Tensor, layout: str) -> torch.Tensor:
    """[E, RM, W] 4-byte words (any 4-byte dtype) -> the layout's flat storage (same dtype, zero
    padding): what the dispatch writes for the rows it fills."""
    E, RM, W = words.shape
    out = torch.zeros(scale_layout_words(layout, E, RM, W), dtype=words.dtype)
    out[scale_word_offsets(layout, E, RM, W).flatten()] = words.flatten()
    return out


def scales_from_layout(storage: torch.Tensor, layout: str, E: int, RM: int, W: int) -> torch.Tensor:
    """Inverse of scales_to_layout: the flat storage -> [E, RM, W] words."""
    return storage.flatten()[scale_word_offsets(layout, E, RM, W)]


def swizzle_128x4(sf: torch.Tensor) -> torch.Tensor:
    """uint8 [M, n] block scales -> CUTLASS's 128x4 scale-factor tiles, flat uint8
    [ceil(M/128) * 128 * ceil(n/4) * 4], zero-padded (scales_to_layout of the bytes packed
    four per word, one expert)."""
    words = pack_scale_bytes(sf)
    return scales_to_layout(words.unsqueeze(0), "cutlass_128x4").view(torch.uint8)


# ------------------------------------------------------------------------------------------------
# 8. Combine wire formats: LogFMT-10 (DeepEP 567632d, csrc/kernels/internode_ll.cu logfmt_encode /
#    logfmt_check_amaxmin / decode_and_accumulate) and FP8 per-128; README "Wire formats"
# ------------------------------------------------------------------------------------------------
LOGFMT_GROUP = 128       # channels per (amax, amin) metadata pair
LOGFMT_CODES = 1 << 9    # 9-bit magnitude codes; code 0 is zero, 1..511 a log scale
LOGFMT_MIN_CLIP = 32.0   # log2 range clip: amin is at least amax * 2^-32
LOGFMT_BLOCK = 16        # values per 20-byte packed block (16 x 9 code bits + 16 sign bits)

# DeepEP computes its logarithms with lg2.approx / ex2.approx, which no CPU reproduces; epgen's
# LogFMT-10 defines them by float32 operations a kernel repeats exactly (each rounded to nearest
# even, no FMA), so the bytes on the wire and the decoded values are bit-exact everywhere:
#   log2 of a bf16 magnitude 2^e * (1 + m/128) (subnormals normalised first): float32(e) +
#     LOG2_1P_M[m], LOG2_1P_M[m] = float32(log2(1 + m/128)); log2(0) = -inf;
#   exp2(v): n = rint(v), f = v - n (exact), p = Horner(EXP2_POLY, f), then p * 2^n (for n below
#     -126 as (p * 2^(n+64)) * 2^-64, one rounding into the subnormals; n < -150 gives 0);
#   log2(y) for y in [1, 1.03125] (only (1 + 2^step) / 2 needs it): d = y - 1 (exact),
#     d * Horner(LOG2_1P_POLY, d).
# The polynomials: Taylor coefficients rounded to float32 (exp2: ln2^k / k!, k = 0..7, |f| <= 1/2;
# log2(1+d): (-1)^(k+1) / (k ln2), k = 1..6, d <= 1/32); errors below 2 ulp (test_formats_reference).
# templates/ll_combine_wire.cuh holds the same constants as bit patterns (a CPU test compares).


def _f32_const(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float64).float())


LOG2_1P_M = tuple(_f32_const(math.log2(1 + m / 128)) for m in range(128))
EXP2_POLY = tuple(_f32_const(math.log(2) ** k / math.factorial(k)) for k in range(7, -1, -1))
LOG2_1P_POLY = tuple(_f32_const((-1) ** (k + 1) / (k * math.log(2))) for k in range(6, 0, -1))


def _fconst(v: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, v, dtype=torch.float32)


def _horner(coeffs, x: torch.Tensor) -> torch.Tensor:
    """coeffs highest degree first; each multiply and add rounded (float32)."""
    acc = _fconst(coeffs[0], x)
    for c in coeffs[1:]:
        acc = acc * x + _fconst(c, x)
    return acc


def logfmt_log2_bf16(mag_bits: torch.Tensor) -> torch.Tensor:
    """epgen's log2 of bf16 magnitudes given as their 15-bit patterns (int32), float32."""
    b = mag_bits.to(torch.int32)
    e, m = b >> 7, b & 0x7F
    # Subnormal m * 2^-133: shift the leading one into the implicit bit.
    lead = sum((m >= (1 << k)).to(torch.int32) for k in range(1, 7))   # floor(log2 m), exact
    sub = (e == 0) & (m > 0)
    ex = torch.where(sub, lead - 133, e - 127)
    mm = torch.where(sub, (m << (7 - lead)) & 0x7F, m)
    table = torch.tensor(LOG2_1P_M, dtype=torch.float32, device=b.device)
    out = ex.float() + table[mm.long()]
    return torch.where(b == 0, torch.full_like(out, float("-inf")), out)


def logfmt_exp2(v: torch.Tensor) -> torch.Tensor:
    """epgen's exp2 of float32 v (finite), float32."""
    v = v.float()
    n = torch.round(v)                       # half to even, as rintf
    p = _horner(EXP2_POLY, v - n)
    ni = n.clamp(-200, 127).to(torch.int32)
    def pow2(k):                              # 2^k as float32 from the bits, k in [-126, 127]
        return ((k + 127) << 23).view(torch.float32)
    normal = p * pow2(ni.clamp(min=-126))
    sub = (p * pow2((ni + 64).clamp(-126, 127))) * _fconst(2.0 ** -64, p)
    out = torch.where(ni >= -126, normal, sub)
    return torch.where(n < -150, torch.zeros_like(out), out)


def logfmt_log2_near1(y: torch.Tensor) -> torch.Tensor:
    """epgen's log2 of float32 y in [1, 1.03125], float32."""
    d = y.float() - _fconst(1.0, y)
    return d * _horner(LOG2_1P_POLY, d)


class LogFMTMessage(NamedTuple):
    meta: torch.Tensor       # [T, G, 2] bf16: (amax, amin) of the group's magnitudes
    cast: torch.Tensor       # [T, ceil(H / chunk)] bool: the chunk travels as LogFMT (else BF16)
    payload: torch.Tensor    # [T, 4 * G + 2 * H] uint8: meta bytes, then the chunks, padded
    num_bytes: torch.Tensor  # [T] int64: the bytes of each token's message


def logfmt_chunk(hidden: int) -> int:
    """Channels per encode-or-not decision: one warp iteration of DeepEP's send (32 lanes x
    kNumSendUnrolls int4 of 8 bf16): 1024 when hidden % 1024 == 0, else 512. epgen extends the
    format to hidden % 16 == 0 (DeepEP needs hidden % 512 == 0): the last chunk and the last
    128-channel group may then be partial."""
    if hidden <= 0 or hidden % LOGFMT_BLOCK:
        raise ValueError(f"LogFMT needs a positive hidden % 16 == 0 (its 16-value blocks), "
                         f"got {hidden}")
    return 1024 if hidden % 1024 == 0 else 512


def logfmt_message_bytes(hidden: int) -> int:
    """The largest message: the metadata and every chunk as BF16."""
    return 4 * ((hidden + LOGFMT_GROUP - 1) // LOGFMT_GROUP) + 2 * hidden


def _logfmt_log_range(meta: torch.Tensor):
    """(log_amax, log_amin, ok) per group from the bf16 (amax, amin) metadata, float32:
    log_amin = max(log2(amin), log_amax - 32) (amin == 0 gives log_amax - 32), and the group may
    be encoded when log_amax < 0 (all magnitudes below 1) and log_amin < log_amax."""
    bits = meta.contiguous().view(torch.int16).to(torch.int32) & 0x7FFF
    log_amax = logfmt_log2_bf16(bits[..., 0])
    clip = log_amax - _fconst(LOGFMT_MIN_CLIP, log_amax)
    log_amin = torch.where(bits[..., 1] == 0, clip,
                           torch.maximum(logfmt_log2_bf16(bits[..., 1]), clip))
    return log_amax, log_amin, (log_amax < 0) & (log_amin < log_amax)


def _logfmt_step(log_amax: torch.Tensor, log_amin: torch.Tensor) -> torch.Tensor:
    return (log_amax - log_amin) / _fconst(float(LOGFMT_CODES - 2), log_amax)


def _logfmt_steps(log_amax: torch.Tensor, log_amin: torch.Tensor):
    """(step, step_inv, fused_rounding) of logfmt_encode, float32 (each op rounded)."""
    step = _logfmt_step(log_amax, log_amin)
    step_inv = _fconst(1.0, step) / step
    half = logfmt_log2_near1((_fconst(1.0, step) + logfmt_exp2(step)) * _fconst(0.5, step))
    rounding = _fconst(2.0, step) - half * step_inv
    fused = rounding - log_amin * step_inv
    return step, step_inv, fused


def _chunk_bounds(H: int):
    C = logfmt_chunk(H)
    return [(c, min(c + C, H)) for c in range(0, H, C)]


def logfmt_encode(x: torch.Tensor) -> LogFMTMessage:
    """LogFMT-10 encoding of bf16 [T, H] rows, the bytes one combine message carries.

    Metadata: per group of 128 channels (the last may be partial), (amax, amin) of the bf16
    magnitudes (sign bit cleared), as bf16, written first: 4 bytes a group. Then the chunks of
    logfmt_chunk(H) channels in order; a chunk is encoded when every group in it may be
    (_logfmt_log_range, the receiver's rule of logfmt_check_amaxmin), else it travels as its
    BF16 bytes (2 bytes a channel). Encoded, each block of 16 channels is 20 bytes, little-endian:
    bits 9j..9j+8 the code of value j, bits 144..159 the 16 sign bits. Code, with the group's
    log range (float32, each operation rounded; log2 / exp2 as defined above):
        step = (log_amax - log_amin) / 510; step_inv = 1 / step
        rounding = 2 - log2((1 + 2^step) * 0.5) * step_inv; fused = rounding - log_amin * step_inv
        code = min(floor(max(log2(|x|) * step_inv + fused, 0)), 511)    (|x| = 0: code 0)
    """
    if x.dim() != 2 or x.dtype != torch.bfloat16:
        raise ValueError(f"logfmt_encode takes bf16 [T, H], got {x.dtype} {list(x.shape)}")
    T, H = x.shape
    chunks = _chunk_bounds(H)
    G = (H + LOGFMT_GROUP - 1) // LOGFMT_GROUP
    bits = x.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    sign = (bits >> 15) & 1
    magb = bits & 0x7FFF
    padded = torch.nn.functional.pad(magb, (0, G * LOGFMT_GROUP - H), value=-1)
    amax = padded.view(T, G, LOGFMT_GROUP).amax(dim=-1)
    amin = torch.where(padded < 0, torch.full_like(padded, 0xFFFF), padded).view(
        T, G, LOGFMT_GROUP).amin(dim=-1)
    meta = torch.stack([amax, amin], dim=-1).to(torch.int16).view(torch.bfloat16)
    log_amax, log_amin, ok = _logfmt_log_range(meta)
    grp = lambda a, b: slice(a // LOGFMT_GROUP, (b + LOGFMT_GROUP - 1) // LOGFMT_GROUP)  # noqa
    cast = torch.stack([ok[:, grp(a, b)].all(dim=-1) for a, b in chunks], dim=-1)
    _, step_inv, fused = _logfmt_steps(log_amax, log_amin)
    per_ch = lambda v: v.repeat_interleave(LOGFMT_GROUP, dim=-1)[:, :H]  # noqa: E731
    t = logfmt_log2_bf16(magb) * per_ch(step_inv) + per_ch(fused)
    codes = torch.floor(torch.clamp(t, min=0)).clamp(max=LOGFMT_CODES - 1)
    codes = torch.nan_to_num(codes, nan=0.0).to(torch.int64)     # groups not encoded: unused
    # Pack 16-value blocks: 9-bit codes then 16 signs, as a 160-bit little-endian integer.
    B = H // LOGFMT_BLOCK
    cb = codes.view(T, B, LOGFMT_BLOCK)
    sb = sign.view(T, B, LOGFMT_BLOCK).to(torch.int64)
    code_bits = (cb.unsqueeze(-1) >> torch.arange(9, device=x.device)) & 1   # [T, B, 16, 9]
    stream = torch.zeros(T, B, 160, dtype=torch.int64, device=x.device)
    stream[..., :144] = code_bits.flatten(-2)
    stream[..., 144:] = sb
    enc = (stream.view(T, B, 20, 8) << torch.arange(8, device=x.device)).sum(-1).to(torch.uint8)
    raw = x.contiguous().view(torch.uint8).view(T, H, 2)
    meta_bytes = meta.contiguous().view(torch.uint8).view(T, -1)
    out = torch.zeros(T, logfmt_message_bytes(H), dtype=torch.uint8, device=x.device)
    out[:, :4 * G] = meta_bytes
    off = torch.full((T,), 4 * G, dtype=torch.int64, device=x.device)
    rows = torch.arange(T, device=x.device)
    for c, (a, b) in enumerate(chunks):      # every row's chunk c, at that row's offset
        for form, piece in ((True, enc[:, a // 16:b // 16].flatten(1)),
                            (False, raw[:, a:b].flatten(1))):
            sel = rows[cast[:, c] == form]
            cols = off[sel, None] + torch.arange(piece.shape[1], device=x.device)
            out[sel[:, None], cols] = piece[sel]
        off += torch.where(cast[:, c], (b - a) // 16 * 20, 2 * (b - a))
    num_bytes = off.cpu()
    return LogFMTMessage(meta, cast, out, num_bytes)


def logfmt_decode(msg: LogFMTMessage, hidden: int) -> torch.Tensor:
    """The float32 [T, H] values a receiver reads from logfmt_encode's bytes (it finds the
    chunks' forms from the metadata alone): BF16 chunks as they are; encoded values, with the
    group's step = (log_amax - log_amin) / 510, code == 0 -> 0, else
    exp2(float32(code - 1) * step + log_amin) (multiply and add each rounded), with the sign."""
    T, H = msg.payload.shape[0], hidden
    G = (H + LOGFMT_GROUP - 1) // LOGFMT_GROUP
    meta = msg.payload[:, :4 * G].contiguous().view(torch.bfloat16).view(T, G, 2)
    log_amax, log_amin, ok = _logfmt_log_range(meta)
    step = _logfmt_step(log_amax, log_amin)
    dev = msg.payload.device
    out = torch.zeros(T, H, dtype=torch.float32, device=dev)
    off = torch.full((T,), 4 * G, dtype=torch.int64, device=dev)
    rows = torch.arange(T, device=dev)
    for a, b in _chunk_bounds(H):
        n = b - a
        cast = ok[:, a // LOGFMT_GROUP:(b + LOGFMT_GROUP - 1) // LOGFMT_GROUP].all(dim=-1)
        sel = rows[~cast]                       # BF16 chunks as they are
        cols = off[sel, None] + torch.arange(2 * n, device=dev)
        out[sel, a:b] = msg.payload[sel[:, None], cols].view(torch.bfloat16).float()
        sel = rows[cast]
        nb = n // LOGFMT_BLOCK * 20
        cols = off[sel, None] + torch.arange(nb, device=dev)
        blk = msg.payload[sel[:, None], cols].view(len(sel), n // LOGFMT_BLOCK, 20).to(torch.int64)
        bit = ((blk.unsqueeze(-1) >> torch.arange(8, device=dev)) & 1).flatten(-2)  # [S, B, 160]
        codes = (bit[..., :144].reshape(len(sel), n // LOGFMT_BLOCK, LOGFMT_BLOCK, 9)
                 << torch.arange(9, device=dev)).sum(-1).flatten(1)
        signs = bit[..., 144:].flatten(1)
        g = torch.arange(a, b, device=dev) // LOGFMT_GROUP
        val = logfmt_exp2((codes - 1).float() * step[sel][:, g] + log_amin[sel][:, g])
        val = torch.where(codes == 0, torch.zeros_like(val), val)
        out[sel, a:b] = torch.where(signs == 1, -val, val)
        off += torch.where(cast, nb, 2 * n)
    return out


# The combine's FP8 wire format (epgen.formats "fp8_e4m3_f32_128"): per_token_cast_to_fp8's cast
# (float32 scale_inv = max(amax, 1e-4) / 448 per 128 channels, the last group partial), the
# message being the H e4m3 bytes then the S float32 scale_inv, 16-byte padded.
def fp8_combine_message_bytes(hidden: int) -> int:
    return (hidden + 4 * num_scales(hidden) + 15) // 16 * 16


COMBINE_FORMATS = ("bf16", "fp8_e4m3_f32_128", "logfmt10")


def combine_wire_encode(x: torch.Tensor, wire_format: str = "bf16"):
    """The bytes a low-latency combine sends for bf16 rows x [N, H] in `wire_format`:
    (payload [N, max bytes] uint8, num_bytes [N] int64); a row's message is payload[i, :n_i]."""
    N, H = x.shape
    if wire_format == "bf16":
        return x.contiguous().view(torch.uint8).view(N, 2 * H), torch.full((N,), 2 * H)
    if wire_format == "fp8_e4m3_f32_128":
        q, s = per_token_cast_to_fp8(x)
        out = torch.zeros(N, fp8_combine_message_bytes(H), dtype=torch.uint8, device=x.device)
        out[:, :H] = q.view(torch.uint8)
        out[:, H:H + 4 * s.shape[1]] = s.contiguous().view(torch.uint8)
        return out, torch.full((N,), H + 4 * s.shape[1])
    if wire_format == "logfmt10":
        m = logfmt_encode(x)
        return m.payload, m.num_bytes
    raise ValueError(f"wire_format={wire_format!r}: must be one of {COMBINE_FORMATS}")


def combine_wire_values(x: torch.Tensor, wire_format: str = "bf16") -> torch.Tensor:
    """The float32 values the receiver adds for rows x [N, H] sent in `wire_format`: the BF16
    values; FP8: float32(e4m3) * scale_inv (rounded); LogFMT-10: logfmt_decode."""
    if wire_format == "bf16":
        return x.float()
    if wire_format == "fp8_e4m3_f32_128":
        q, s = per_token_cast_to_fp8(x)
        return per_token_cast_back(q, s)
    if wire_format == "logfmt10":
        return logfmt_decode(logfmt_encode(x), x.shape[1])
    raise ValueError(f"wire_format={wire_format!r}: must be one of {COMBINE_FORMATS}")
