// Low-latency combine (DeepEP V1 semantics): each expert-output row goes back to its token's
// owner, into the slot of its (expert rank, local expert, place in the dispatch's chunk); the
// owner sums w_k * y_k over its valid top-k, finding each row's slot from its topk_idx
// (ll_common.cuh "Where a (token, top-k slot) row lives").
//
// Region layout (byte offsets are launch arguments):
//   sig_off : u64 [2][64]                 signal tag_word(epoch, 1) per source rank
//   recv_off: [2][R][M * min(K, El)] slots of kSlot bytes, by expert rank, then local expert,
//                                         then place; half h at h * half_bytes (layout_facts.
//                                         ll_combine_half_bytes: the same for every format and
//                                         top-k, so that a hooked combine still unread in one
//                                         half never meets the next call's)
//   rows_off: int [2][M][kMaxTopk]        the receive's slot of each (token, top-k slot), -1 for
//                                         none: send block b writes its tokens', receive block b
//                                         reads them
//   send_off: bf16 [El][R*M][H]           zero-copy buffer / staging for NVSHMEM puts (FMT != 0:
//                                         [El][R*M] slots of kSlot bytes, no zero-copy)
// FMT: the wire format (ll_combine_wire.cuh): 0 BF16 rows, 1 FP8 + float scales, 2 LogFMT-10.
// Send phase (phases & 1): warps walk (local expert, source, row) from the handle's layout
// range and src_info, copy the row to the owner (NVLink stores or nvshmemx_putmem_nbi_warp);
// each block then finds the receive slots of its contiguous share of the owner's tokens
// (find_rows) while its stores drain, and the last block signals every rank. Receive phase
// (phases & 2): every block waits for all ranks' signals, then its warps reduce its tokens'
// (token, 256-channel slice) units in float (multiply and add rounded separately, k ascending;
// a batch of a token's rows loaded before the first add) and store BF16.
#pragma once
#include "ll_common.cuh"
#include "ll_combine_wire.cuh"

namespace epgen {

template <int H, int K, int E, int R, int THREADS, int FMT>
struct LLCombine {
    using W = llw::Wire<H>;
    static constexpr int kSlot = FMT == 1 ? W::kFp8Bytes : FMT == 2 ? W::kLogfmtBytes : 2 * H;
    // BF16 receive: rows in flight at once (a token's all at top-k <= 8; 4 beyond, where 8
    // int4 per lane spill under the 64 registers of a 1024-thread block: seen at top-16)
    static constexpr int kLoadBatch = K <= 8 ? K : 4;
    static constexpr int kPieces = (W::kBlocks + 31) / 32;   // LogFMT receive: 512 channels
    static constexpr int El = E / R;
    static constexpr int kPerRank = K < El ? K : El;  // a token's experts on one rank, at most
    // Slots of a receive half: kPerRank per (expert rank, token) (layout_facts.
    // ll_combine_recv_rows, static_asserted equal); expert rank r's from r * M * kPerRank on.
    static __host__ __device__ constexpr long long recv_rows(int M) {
        return (long long)R * M * kPerRank;
    }
    static constexpr int kRowN16 = H / 8;          // 16-byte units of a BF16 row
    static constexpr int kSlices = (kRowN16 + 31) / 32;
    static constexpr int kWarps = THREADS / 32;
    static_assert(H % 16 == 0, "hidden must be a multiple of 16");
    static_assert(E % R == 0 && E <= ll::kMaxSig && E <= THREADS && R <= ll::kMaxRankSig,
                  "experts / ranks");
    static_assert(K >= 1 && K <= ll::kMaxTopk, "top-k");
    static_assert(FMT >= 0 && FMT <= 2 && kSlot <= W::kLogfmtBytes, "format / slot");

    // The row table of a half: int [M][kMaxTopk], the receive's slot of each (token, top-k slot).
    static __device__ __forceinline__ int* rows_of_half(const LowLatencyCombineArgs& a, int half) {
        return reinterpret_cast<int*>(reinterpret_cast<char*>(a.rdma_base) + a.rows_off +
                                      (uint64_t)half * a.max_tokens * ll::kMaxTopk * 4);
    }

    // rows[t][k] for this block's tokens [t0, t1): expert rank r's rows for this owner start at
    // r * M * kPerRank, its local experts' in order, each expert's in (token, slot) order, as
    // the dispatch placed them (ll_common.cuh entry_place). So the slot of entry q (expert e on
    // rank r) is r * M * kPerRank + the entries naming an expert of r below e, or e itself
    // earlier in (token, slot) order: every expert's entries counted (before t0, and all),
    // scanned for the bases, then warp 0 walks the block's tokens in order (bench/NOTES.md
    // session 17: ~2.5 us a block; a ballot per entry for blocks of <= 32 measured slower).
    static __device__ void find_rows(const LowLatencyCombineArgs& a, int* rows, int t0, int t1) {
        __shared__ int s_run[E];     // entries naming each expert before t0, then + its base
        __shared__ int s_all[E];     // entries naming each expert
        __shared__ int s_all_cum[E];
        const int tid = threadIdx.x, lane = tid & 31;
        const int M = a.max_tokens;
        ll::count_entries<THREADS, E>(a.topk_idx, t0 * K, a.num_tokens * K, s_run, s_all);
        ll::block_inclusive_scan<THREADS>(s_all, s_all_cum, E);
        for (int e = tid; e < E; e += THREADS) {
            const int r = e / El, first = r * El;
            s_run[e] += r * M * kPerRank + s_all_cum[e] - s_all[e] -
                        (first > 0 ? s_all_cum[first - 1] : 0);
        }
        __syncthreads();
        if (tid < 32) {
            for (int t = t0; t < t1; ++t) {
                const int64_t e = lane < K ? a.topk_idx[(int64_t)t * K + lane] : -1;
                const int row = ll::entry_place(e >= 0 && e < E ? (int)e : -1, s_run);
                if (lane < K) rows[t * ll::kMaxTopk + lane] = row;
            }
        }
        __syncthreads();
    }

    // Returns this call's epoch (a receive in the same launch takes it from here).
    static __device__ unsigned long long send(const LowLatencyCombineArgs& a, const ErrorCtx& err) {
        __shared__ int s_cnt[E];
        __shared__ int s_begin[E];
        __shared__ float s_log2[FMT == 2 ? 128 : 1];
        if (FMT == 2) llw::load_log2_table(s_log2);
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
        const unsigned long long epoch = ll::next_epoch(a.seq);
        const int half = (int)(epoch & 1ull);
        if (blockIdx.x == 0 && threadIdx.x == 0 && a.call_epoch != nullptr)
            a.call_epoch[0] = epoch;                 // for a receive launched on its own
        const int M = a.max_tokens;
        const int64_t RM = (int64_t)R * M;
        char* base = reinterpret_cast<char*>(a.rdma_base);
        const bool any_remote = a.any_remote != 0;

        for (int i = tid; i < E; i += THREADS) {
            const int64_t v = a.layout_range[i];
            int n = (int)(v & 0xffffffffll);
            const int b = (int)(v >> 32);
            if (n < 0 || n > M || b < 0 || (int64_t)b + n > RM) {
                report_error(err, kErrBadArg, i % R, i);
                n = 0;
            }
            s_cnt[i] = n;
            s_begin[i] = b;
        }
        __syncthreads();

        __shared__ int s_cum[E];
        ll::block_inclusive_scan<THREADS>(s_cnt, s_cum, E);
        const int total = s_cum[E - 1];
        // The same counts in (source, local expert) order, summed: the rows of local experts
        // before le from a source come first in that source's receive half.
        __shared__ int s_by_src[E];
        __shared__ int s_by_src_cum[E];
        for (int i = tid; i < E; i += THREADS) s_by_src[(i % R) * El + i / R] = s_cnt[i];
        __syncthreads();
        ll::block_inclusive_scan<THREADS>(s_by_src, s_by_src_cum, E);
        const int gw = ll::spread_warp_index();
        const int nw = gridDim.x * kWarps;
        for (int m = gw; m < total; m += nw) {
            const int p = ll::locate(s_cum, E, m);
            const int i = m - (s_cum[p] - s_cnt[p]);
            const int le = p / R, src = p % R;
            if (ll::masked(a.mask, src)) continue;
            const int64_t row = s_begin[p] + i;
            const int t = a.src_info[le * RM + row];
            if (t < 0 || t >= M) { if (lane == 0) report_error(err, kErrBadArg, src, t); continue; }
            const int q = src * El + le;
            const int place = s_by_src_cum[q] - s_by_src[q] + i -
                              (src > 0 ? s_by_src_cum[src * El - 1] : 0);
            if (place >= M * kPerRank) {      // a handle whose counts no dispatch made (no room)
                if (lane == 0) report_error(err, kErrBadArg, src, place);
                continue;
            }
            const uint64_t off = a.recv_off + (uint64_t)half * a.half_bytes
                                 + ((uint64_t)a.rank * M * kPerRank + place) * kSlot;
            const int4* xrow = reinterpret_cast<const int4*>(
                reinterpret_cast<const char*>(a.x) + (le * RM + row) * (int64_t)(2 * H));
            const int64_t pb = a.peer_bases[src];
            if (FMT != 0) {          // encode into the peer's slot, or stage and put what it took
                char* dst = pb != 0 ? reinterpret_cast<char*>(pb + off)
                                    : base + a.send_off + (le * RM + row) * (int64_t)kSlot;
                const int n = FMT == 1 ? W::fp8_encode(xrow, dst, lane)
                                       : W::logfmt_encode(xrow, dst, lane, s_log2);
                if (pb == 0) {
                    __threadfence();
                    __syncwarp();
                    nvshmemx_putmem_nbi_warp(base + off, dst, (size_t)n, a.pes[src]);
                }
            } else if (pb != 0) {
                warp_copy<kRowN16, 8, true>(reinterpret_cast<int4*>(pb + off), xrow, lane);
            } else {
                char* stage = base + a.send_off + (le * RM + row) * (int64_t)(2 * H);
                if (!a.zero_copy) {
                    warp_copy<kRowN16, 8, true>(reinterpret_cast<int4*>(stage), xrow, lane);
                    __threadfence();
                    __syncwarp();
                }
                nvshmemx_putmem_nbi_warp(base + off, stage, (size_t)(2 * H), a.pes[src]);
            }
        }

        // The receive's slots of this block's tokens, while its stores drain: the same block
        // index of the receive reads them (the same grid), after every rank's signal, ours
        // included, which the last block sends once every block arrived below.
        int t0, t1;
        ll::block_tokens(a.num_tokens, &t0, &t1);
        find_rows(a, rows_of_half(a, half), t0, t1);

        if (!ll::last_block_arrives(a.done, any_remote)) return epoch;
        for (int r = tid; r < R; r += THREADS) {
            if (ll::masked(a.mask, r)) continue;
            const uint64_t soff = a.sig_off + ((uint64_t)half * ll::kMaxRankSig + a.rank) * 8;
            ll::put_signal(base, a.peer_bases, a.pes, r, soff, ll::tag_word(epoch, 1u));
        }
        __syncthreads();
        if (tid == 0) {
            *a.done = 0;
            *a.seq = epoch;
        }
        return epoch;
    }

    // LogFMT-10 receive: warps reduce (token, 512-channel piece) units, a lane a 16-channel
    // block; each message's metadata says which of its chunks came encoded (every lane reads it,
    // so the chunk offsets need no exchange with the other pieces' warps).
    static __device__ void recv_logfmt(const LowLatencyCombineArgs& a, const ErrorCtx& err,
                                       const bool* s_in, const char* area, const int* rows,
                                       const float* tab, int t0, int t1) {
        const int lane = threadIdx.x & 31;
        const int units = (t1 - t0) * kPieces;
        for (int u = (int)(threadIdx.x >> 5); u < units; u += kWarps) {
            const int t = t0 + u / kPieces, piece = u % kPieces;
            int my_row = -1;
            float my_w = 0.f;
            if (lane < K) {
                my_row = row_of(a, err, s_in, rows, t, lane);
                my_w = a.topk_weights[(int64_t)t * K + lane];
            }
            const int b = piece * 32 + lane;
            const bool active = b < W::kBlocks;
            float acc[16];
            #pragma unroll
            for (int j = 0; j < 16; ++j) acc[j] = 0.f;
            for (int k = 0; k < K; ++k) {
                const int row = __shfl_sync(0xffffffffu, my_row, k);
                const float w = __shfl_sync(0xffffffffu, my_w, k);
                if (row < 0) continue;                     // the same for the whole warp
                const char* slot = area + (uint64_t)row * kSlot;
                const uint32_t bad = W::logfmt_bad_chunks(slot, lane, tab);
                if (!active) continue;
                W::logfmt_add16(slot, b, bad, tab, w, acc);
            }
            if (active) {
                int4 o[2];
                __nv_bfloat162* ob = reinterpret_cast<__nv_bfloat162*>(o);
                #pragma unroll
                for (int j = 0; j < 8; ++j) ob[j] = __floats2bfloat162_rn(acc[2 * j], acc[2 * j + 1]);
                int4* dst = reinterpret_cast<int4*>(reinterpret_cast<char*>(a.out) + (int64_t)t * (2 * H)) + 2 * b;
                st_v4(dst, o[0]);
                st_v4(dst + 1, o[1]);
            }
        }
    }

    // The receive slot of token t's top-k entry k (lane k of a warp), -1 where none: its expert
    // invalid (-1, or out of range: an error) or its rank not taken (s_in).
    static __device__ __forceinline__ int row_of(const LowLatencyCombineArgs& a,
                                                 const ErrorCtx& err, const bool* s_in,
                                                 const int* rows, int t, int k) {
        const int64_t e = a.topk_idx[(int64_t)t * K + k];
        if (e >= 0 && e < E) return s_in[(int)e / El] ? rows[t * ll::kMaxTopk + k] : -1;
        if (e != -1) report_error(err, kErrBadIndex, -1, t);
        return -1;
    }

    // epoch: this call's, from the send phase of the same launch or (a launch of its own)
    // from call_epoch.
    static __device__ void recv(const LowLatencyCombineArgs& a, const ErrorCtx& err,
                                unsigned long long epoch) {
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
        const int half = (int)(epoch & 1ull);
        const char* base = reinterpret_cast<const char*>(a.rdma_base);
        int t0, t1;
        ll::block_tokens(a.num_tokens, &t0, &t1);
        const int* rows = rows_of_half(a, half);

        __shared__ bool s_in[R];   // ranks whose rows this receive adds
        __shared__ float s_log2[FMT == 2 ? 128 : 1];
        if (FMT == 2) llw::load_log2_table(s_log2);
        for (int r = tid; r < R; r += THREADS) {
            bool arrived = false;
            if (!ll::masked(a.mask, r)) {
                const unsigned long long t0 = globaltimer();
                int unused;
                arrived = ll::wait_signal(err, base,
                                          a.sig_off + ((uint64_t)half * ll::kMaxRankSig + r) * 8,
                                          epoch, r, -1, a.mask, &unused);
                if (blockIdx.x == 0 && a.wait_stats != nullptr)
                    atomicAdd(reinterpret_cast<unsigned long long*>(a.wait_stats + r), globaltimer() - t0);
            }
            s_in[r] = arrived;
        }
        __syncthreads();
        if (a.mask != nullptr) {   // enable_shrink: all blocks add the same ranks' rows
            if (tid < R)
                s_in[tid] = ll::peer_verdict(a.verdicts + half * ll::kMaxRankSig, a.mask, epoch,
                                             tid, s_in[tid]);
            __syncthreads();
        }

        const char* area = base + a.recv_off + (uint64_t)half * a.half_bytes;
        if (FMT == 2) {
            recv_logfmt(a, err, s_in, area, rows, s_log2, t0, t1);
        } else {
        const int units = (t1 - t0) * kSlices;
        for (int u = warp; u < units; u += kWarps) {
            const int t = t0 + u / kSlices, sl = u % kSlices;
            int my_row = -1;
            float my_w = 0.f;
            if (lane < K) {
                my_row = row_of(a, err, s_in, rows, t, lane);
                my_w = a.topk_weights[(int64_t)t * K + lane];
            }
            const int c = sl * 32 + lane;
            const bool in_row = c < kRowN16;
            float acc[8];
            #pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] = 0.f;
            if constexpr (FMT == 1) {
                #pragma unroll
                for (int k = 0; k < K; ++k) {
                    const int row = __shfl_sync(0xffffffffu, my_row, k);
                    const float w = __shfl_sync(0xffffffffu, my_w, k);
                    if (row < 0 || !in_row) continue;
                    float v[8];
                    W::fp8_decode8(area + (uint64_t)row * kSlot, c, v);
                    #pragma unroll
                    for (int j = 0; j < 8; ++j) acc[j] = __fadd_rn(acc[j], __fmul_rn(w, v[j]));
                }
            } else {
                #pragma unroll
                for (int k0 = 0; k0 < K; k0 += kLoadBatch) {
                    int4 raw[kLoadBatch];
                    #pragma unroll
                    for (int i = 0; i < kLoadBatch; ++i) {   // every load before the first add
                        const int row = __shfl_sync(0xffffffffu, my_row, (k0 + i) % K);
                        const bool live = k0 + i < K && in_row && row >= 0;
                        raw[i] = live ? ld_v4(reinterpret_cast<const int4*>(
                                            area + (uint64_t)row * kSlot) + c)
                                      : make_int4(0, 0, 0, 0);
                    }
                    #pragma unroll
                    for (int i = 0; i < kLoadBatch; ++i) {   // k ascending, as the golden model
                        const int k = k0 + i;
                        if (k >= K) break;
                        const int row = __shfl_sync(0xffffffffu, my_row, k);
                        const float w = __shfl_sync(0xffffffffu, my_w, k);
                        if (row < 0 || !in_row) continue;
                        const __nv_bfloat162* b = reinterpret_cast<const __nv_bfloat162*>(&raw[i]);
                        #pragma unroll
                        for (int j = 0; j < 4; ++j) {
                            const float2 f = __bfloat1622float2(b[j]);
                            acc[2 * j] = __fadd_rn(acc[2 * j], __fmul_rn(w, f.x));
                            acc[2 * j + 1] = __fadd_rn(acc[2 * j + 1], __fmul_rn(w, f.y));
                        }
                    }
                }
            }
            if (c < kRowN16) {
                int4 o;
                __nv_bfloat162* ob = reinterpret_cast<__nv_bfloat162*>(&o);
                #pragma unroll
                for (int j = 0; j < 4; ++j) ob[j] = __floats2bfloat162_rn(acc[2 * j], acc[2 * j + 1]);
                st_v4(reinterpret_cast<int4*>(reinterpret_cast<char*>(a.out) + (int64_t)t * (2 * H)) + c, o);
            }
        }
        }
        // the blocks' count: the int after `done`, 0 between calls (a fused launch has no call_epoch)
        if (last_block_sees_error(a.done + 1, err))
            poison_fill(a.out, (int64_t)a.num_tokens * 2 * H, kPoisonNaN);      // outputs: NaN
    }
};

template <class S>
using LLCombineOf = LLCombine<S::hidden, S::num_topk, S::num_experts, S::num_ranks, S::threads,
                              S::wire_format_code>;

template <int H, int K, int E, int R, int THREADS, int FMT>
__device__ __forceinline__ void ll_combine_kernel(const LowLatencyCombineArgs& a) {
    using C = LLCombine<H, K, E, R, THREADS, FMT>;
    const ErrorCtx err = make_error_ctx(a);
    ll::run_phases<C>(a, err);
}


// The generated unit's entry (templates/kernel.cu.j2): the spec struct S by name, epgen/jit/specs.py
// LowLatencyCombineSpec.constants; this is the one place its members meet the template's parameter order.
template <class S>
__device__ __forceinline__ void ll_combine_entry(const LowLatencyCombineArgs& a) {
    ll_combine_kernel<S::hidden, S::num_topk, S::num_experts, S::num_ranks, S::threads,
                      S::wire_format_code>(a);
}

}  // namespace epgen
