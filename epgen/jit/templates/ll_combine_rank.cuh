// Low-latency combine reduced per expert rank (EPGEN_LL_COMBINE=per_rank; the per-expert kernel
// of ll_combine.cuh stays the default until a GPU run proves this one). Same result contract as
// epgen.reference.low_latency_combine_per_rank, bit for bit:
//   1. routes: each token owner sends its [T][K] (expert, weight) pairs to every rank (block 0
//      only; it waits on nothing) and signals tag_word(epoch, T);
//   2. every block of every expert rank waits for all owners' routes, then warps take
//      (owner s, token t, 256-channel slice) units: the token's experts on this rank, in top-k
//      order, each found in the handle (layout range + src_info of chunk (expert, s)); their
//      rows' loads all issued, then summed in float32 (multiply and add rounded separately),
//      rounded once to BF16 and stored as one partial row per (token, owner);
//   3. the owner's receive (phases & 2) adds, per token, the partials of the ranks holding its
//      experts in ascending rank order (all loads issued before the first add), in float32
//      from +0, and rounds once to BF16.
// The send half waits on the peers' routes, so return_recv_hook and enable_shrink use the
// per-expert kernel (ops/low_latency.py). Without a hook both phases run in one launch
// (phases = 3: one cuLaunchKernel per call); like DeepEP's low-latency kernels, this assumes
// every block of the grid (one per SM) is resident at once, so where ranks share a GPU (MPS
// does not guarantee it) the phases run as two launches, the receive's epoch from call_epoch.
//
// Region (byte offsets are launch arguments; the host's size of it is epgen/jit/layout_facts.py
// ll_per_rank_half_bytes, static_asserted equal to half_bytes): the per-expert receive area's half h (stride half_bytes) holds
//   routes   LLRoute [R owners][M][K]          what owner s sent for its token t
//   partials bf16    [R expert ranks][M][H]    what expert rank j summed for my token t
//   route staging [M][K], partial staging [R owners][M][H]: sources of NVSHMEM puts
// Signals: wsig_off u64 [2][64] routes, sig_off u64 [2][64] partials, per source rank.
#pragma once
#include "ll_common.cuh"

namespace epgen {

// One entry of an owner's top-k as the routes exchange carries it (8 bytes).
struct LLRoute {
    int expert;      // global expert, -1 for an empty slot
    float weight;
};

template <int H, int K, int E, int R, int THREADS>
struct LLCombineRank {
    static constexpr int El = E / R;
    static constexpr int kRowN16 = H / 8;          // 16-byte units of a BF16 row
    static constexpr int kSlices = (kRowN16 + 31) / 32;
    static constexpr int kWarps = THREADS / 32;
    static constexpr int kG = 32 / K;              // lanes probing one route's chunk
    static constexpr int kBatch = 4;               // send: row loads in flight per lane
    // receive: partials in flight per lane, at most one per rank holding an expert of the token
    static constexpr int kRecvBatch = (K < R ? K : R) < 8 ? (K < R ? K : R) : 8;
    static constexpr uint64_t kRow = 2ull * H;
    static_assert(H % 16 == 0, "hidden must be a multiple of 16");
    static_assert(E % R == 0 && E <= THREADS && R <= ll::kMaxRankSig && R <= 64, "experts / ranks");
    static_assert(K >= 1 && K <= ll::kMaxTopk, "top-k");

    static __host__ __device__ __forceinline__ constexpr uint64_t align256(uint64_t v) { return (v + 255) / 256 * 256; }
    static __host__ __device__ __forceinline__ constexpr uint64_t routes_off() { return 0; }
    static __host__ __device__ __forceinline__ constexpr uint64_t partials_off(int M) {
        return align256((uint64_t)R * M * K * sizeof(LLRoute));
    }
    static __host__ __device__ __forceinline__ constexpr uint64_t route_stage_off(int M) {
        return partials_off(M) + (uint64_t)R * M * kRow;
    }
    static __host__ __device__ __forceinline__ constexpr uint64_t partial_stage_off(int M) {
        return route_stage_off(M) + align256((uint64_t)M * K * sizeof(LLRoute));
    }
    // One half's bytes (the host sizes the area with layout_facts.ll_per_rank_half_bytes; the
    // rendered unit static_asserts the two agree).
    static __host__ __device__ __forceinline__ constexpr uint64_t half_bytes(int M) {
        return partial_stage_off(M) + (uint64_t)R * M * kRow;
    }

    // Step 1 (block 0): this owner's routes to every rank, then the routes signals.
    static __device__ void send_routes(const LowLatencyCombineRankArgs& a, uint64_t half_off,
                                       int half, unsigned long long epoch) {
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
        const int M = a.max_tokens, T = a.num_tokens, n = T * K;
        char* base = reinterpret_cast<char*>(a.rdma_base);
        const uint64_t dst = half_off + routes_off() + (uint64_t)a.rank * M * K * sizeof(LLRoute);
        if (a.any_remote) {       // puts read from symmetric memory: stage once
            LLRoute* stage = reinterpret_cast<LLRoute*>(base + half_off + route_stage_off(M));
            for (int i = tid; i < n; i += THREADS)
                stage[i] = LLRoute{(int)a.topk_idx[i], a.topk_weights[i]};
            __threadfence();
            __syncthreads();
        }
        for (int r = 0; r < R; ++r) {
            const int64_t pb = a.peer_bases[r];
            if (pb != 0) {
                LLRoute* d = reinterpret_cast<LLRoute*>(pb + dst);
                for (int i = tid; i < n; i += THREADS)
                    d[i] = LLRoute{(int)a.topk_idx[i], a.topk_weights[i]};
            } else if (warp == r % kWarps && n > 0) {
                nvshmemx_putmem_nbi_warp(base + dst, base + half_off + route_stage_off(M),
                                         (size_t)n * sizeof(LLRoute), a.pes[r]);
            }
        }
        (void)lane;
        __threadfence_system();
        if (a.any_remote) nvshmem_quiet();
        __syncthreads();
        for (int r = tid; r < R; r += THREADS)
            ll::put_signal(base, a.peer_bases, a.pes, r,
                           a.wsig_off + ((uint64_t)half * ll::kMaxRankSig + a.rank) * 8,
                           ll::tag_word(epoch, (unsigned)T));
    }

    static __device__ unsigned long long send(const LowLatencyCombineRankArgs& a, const ErrorCtx& err) {
        __shared__ int s_cnt[E];        // chunk (local expert, owner) = index le * R + owner
        __shared__ int s_begin[E];
        __shared__ int s_first[R + 1];  // owners' first unit (prefix of their token counts)
        const int tid = threadIdx.x, lane = tid & 31;
        const unsigned long long epoch = ll::next_epoch(a.seq);
        const int half = (int)(epoch & 1ull);
        if (blockIdx.x == 0 && threadIdx.x == 0 && a.call_epoch != nullptr)
            a.call_epoch[0] = epoch;                 // for a receive launched separately
        const int M = a.max_tokens;
        const int64_t RM = (int64_t)R * M;
        char* base = reinterpret_cast<char*>(a.rdma_base);
        const uint64_t half_off = a.recv_off + (uint64_t)half * a.half_bytes;
        const char* half_base = base + half_off;

        if (blockIdx.x == 0) send_routes(a, half_off, half, epoch);

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
        __shared__ int s_tokens[R];
        for (int r = tid; r < R; r += THREADS) {
            int t = 0;
            if (ll::wait_signal(err, base, a.wsig_off + ((uint64_t)half * ll::kMaxRankSig + r) * 8,
                                epoch, r, -2, nullptr, &t)) {
                if (t > M) { report_error(err, kErrBadArg, r, t); t = 0; }
            } else {
                t = 0;
            }
            s_tokens[r] = t;
        }
        __syncthreads();
        if (tid == 0) {
            s_first[0] = 0;
            for (int r = 0; r < R; ++r) s_first[r + 1] = s_first[r] + s_tokens[r];
        }
        __syncthreads();

        const int64_t gw = ll::spread_warp_index();
        const int64_t nw = (int64_t)gridDim.x * kWarps;
        const int64_t units = (int64_t)s_first[R] * kSlices;
        for (int64_t u = gw; u < units; u += nw) {
            const int st = (int)(u / kSlices), sl = (int)(u % kSlices);
            int s = 0;
            while (st >= s_first[s + 1]) ++s;
            const int t = st - s_first[s];
            // lane k: route k of (s, t), kept if its expert is one of this rank's
            int my_le = -1;
            float my_w = 0.f;
            if (lane < K) {
                const long long v = ld_volatile(reinterpret_cast<const long long*>(
                    half_base + routes_off() + (((uint64_t)s * M + t) * K + lane) * sizeof(LLRoute)));
                const int e = (int)(unsigned)(v & 0xffffffffll);
                my_w = __int_as_float((int)(v >> 32));
                if (e >= 0 && e < E) {
                    if (e / El == a.rank) my_le = e % El;
                } else if (e != -1) {
                    report_error(err, kErrBadIndex, s, t);
                }
            }
            if (__ballot_sync(0xffffffffu, my_le >= 0) == 0) continue;   // owner expects none
            // Rows: kG lanes per route probe its chunk (expert, s) of src_info together, lane g
            // of the group rows g, g + kG, ...; lane k then takes route k's row from its group.
            int found = -1;
            {
                const int k = lane / kG, g = lane % kG;
                const int le = __shfl_sync(0xffffffffu, my_le, k < K ? k : 0);
                if (k < K && le >= 0) {
                    const int p = le * R + s;
                    const int* info = a.src_info + le * RM + s_begin[p];
                    for (int i = g; i < s_cnt[p]; i += kG)
                        if (info[i] == t) { found = s_begin[p] + i; break; }
                }
            }
            int my_row = -1;
            #pragma unroll
            for (int g = 0; g < kG; ++g) {
                const int f = __shfl_sync(0xffffffffu, found, (lane < K ? lane : 0) * kG + g);
                if (f >= 0) my_row = f;
            }
            if (lane < K && my_le >= 0 && my_row < 0) report_error(err, kErrBadArg, s, t);   // not in the handle
            const int c = sl * 32 + lane;
            float acc[8];
            #pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] = 0.f;
            #pragma unroll
            for (int k0 = 0; k0 < K; k0 += kBatch) {
                int4 raw[kBatch];
                float w[kBatch];
                bool ok[kBatch];
                #pragma unroll
                for (int j = 0; j < kBatch; ++j) {          // loads first ...
                    ok[j] = false;
                    if (k0 + j < K) {
                        const int le = __shfl_sync(0xffffffffu, my_le, k0 + j);
                        const int row = __shfl_sync(0xffffffffu, my_row, k0 + j);
                        w[j] = __shfl_sync(0xffffffffu, my_w, k0 + j);
                        ok[j] = le >= 0 && row >= 0 && c < kRowN16;
                        if (ok[j])
                            raw[j] = ld_nc_v4(reinterpret_cast<const int4*>(
                                reinterpret_cast<const char*>(a.x) + (le * RM + row) * (int64_t)kRow) + c);
                    }
                }
                #pragma unroll
                for (int j = 0; j < kBatch; ++j) {          // ... then the adds, in top-k order
                    if (!ok[j]) continue;
                    const __nv_bfloat162* b = reinterpret_cast<const __nv_bfloat162*>(&raw[j]);
                    #pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        const float2 f = __bfloat1622float2(b[q]);
                        acc[2 * q] = __fadd_rn(acc[2 * q], __fmul_rn(w[j], f.x));
                        acc[2 * q + 1] = __fadd_rn(acc[2 * q + 1], __fmul_rn(w[j], f.y));
                    }
                }
            }
            int4 o;
            __nv_bfloat162* ob = reinterpret_cast<__nv_bfloat162*>(&o);
            #pragma unroll
            for (int q = 0; q < 4; ++q) ob[q] = __floats2bfloat162_rn(acc[2 * q], acc[2 * q + 1]);
            const uint64_t row_off = ((uint64_t)a.rank * M + t) * kRow + (uint64_t)sl * 512;
            const int64_t pb = a.peer_bases[s];
            if (pb != 0) {
                if (c < kRowN16)
                    st_v4(reinterpret_cast<int4*>(pb + half_off + partials_off(M) + row_off) + lane, o);
            } else {
                char* stage = base + half_off + partial_stage_off(M) + ((uint64_t)s * M + t) * kRow
                              + (uint64_t)sl * 512;
                if (c < kRowN16) st_v4(reinterpret_cast<int4*>(stage) + lane, o);
                __threadfence();
                __syncwarp();
                const int n16 = kRowN16 - sl * 32 < 32 ? kRowN16 - sl * 32 : 32;
                nvshmemx_putmem_nbi_warp(base + half_off + partials_off(M) + row_off, stage,
                                         (size_t)n16 * 16, a.pes[s]);
            }
        }

        if (!ll::last_block_arrives(a.done, a.any_remote != 0)) return epoch;
        // done and seq before the signals: with both phases in one launch, a block's receive
        // may finish as soon as the signals are out (every block has arrived by now)
        if (tid == 0) {
            *a.done = 0;
            *a.seq = epoch;
            __threadfence();
        }
        __syncthreads();
        for (int r = tid; r < R; r += THREADS) {
            const uint64_t soff = a.sig_off + ((uint64_t)half * ll::kMaxRankSig + a.rank) * 8;
            ll::put_signal(base, a.peer_bases, a.pes, r, soff, ll::tag_word(epoch, 1u));
        }
        return epoch;
    }

    // epoch: this call's, from the send phase of the same launch or (a launch of its own)
    // from call_epoch.
    static __device__ void recv(const LowLatencyCombineRankArgs& a, const ErrorCtx& err,
                                unsigned long long epoch) {
        const int tid = threadIdx.x, lane = tid & 31;
        const int half = (int)(epoch & 1ull);
        const int M = a.max_tokens;
        const char* base = reinterpret_cast<const char*>(a.rdma_base);

        __shared__ unsigned long long s_in;   // ranks whose partials arrived (bit r)
        if (tid == 0) s_in = 0ull;
        __syncthreads();
        for (int r = tid; r < R; r += THREADS) {
            const unsigned long long t0 = globaltimer();
            int unused;
            const bool arrived = ll::wait_signal(
                err, base, a.sig_off + ((uint64_t)half * ll::kMaxRankSig + r) * 8, epoch, r, -1,
                nullptr, &unused);
            if (blockIdx.x == 0 && a.wait_stats != nullptr)
                atomicAdd(reinterpret_cast<unsigned long long*>(a.wait_stats + r), globaltimer() - t0);
            if (arrived) atomicOr(&s_in, 1ull << r);
        }
        __syncthreads();
        const unsigned long long in = s_in;

        const int64_t gw = ll::spread_warp_index();
        const int64_t nw = (int64_t)gridDim.x * kWarps;
        const int64_t units = (int64_t)a.num_tokens * kSlices;
        const char* area = base + a.recv_off + (uint64_t)half * a.half_bytes + partials_off(M);
        for (int64_t u = gw; u < units; u += nw) {
            const int t = (int)(u / kSlices), sl = (int)(u % kSlices);
            unsigned lo = 0u, hi = 0u;            // ranks holding an expert of t
            if (lane < K) {
                const int64_t e = a.topk_idx[(int64_t)t * K + lane];
                if (e >= 0 && e < E) {
                    const int r = (int)e / El;
                    if (r < 32) lo = 1u << r; else hi = 1u << (r - 32);
                } else if (e != -1) {
                    report_error(err, kErrBadIndex, -1, t);
                }
            }
            unsigned long long ranks = ((unsigned long long)__reduce_or_sync(0xffffffffu, hi) << 32)
                                       | __reduce_or_sync(0xffffffffu, lo);
            ranks &= in;
            const int c = sl * 32 + lane;
            float acc[8];
            #pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] = 0.f;
            while (ranks != 0ull) {
                int4 raw[kRecvBatch];
                bool ok[kRecvBatch];
                #pragma unroll
                for (int j = 0; j < kRecvBatch; ++j) {          // up to kRecvBatch ranks' loads first ...
                    ok[j] = ranks != 0ull && c < kRowN16;
                    if (ranks != 0ull) {
                        const int r = __ffsll((long long)ranks) - 1;
                        ranks &= ranks - 1ull;
                        if (ok[j])
                            raw[j] = ld_v4(reinterpret_cast<const int4*>(
                                area + ((uint64_t)r * M + t) * kRow) + c);
                    }
                }
                #pragma unroll
                for (int j = 0; j < kRecvBatch; ++j) {          // ... then added in rank order
                    if (!ok[j]) continue;
                    const __nv_bfloat162* b = reinterpret_cast<const __nv_bfloat162*>(&raw[j]);
                    #pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        const float2 f = __bfloat1622float2(b[q]);
                        acc[2 * q] = __fadd_rn(acc[2 * q], f.x);
                        acc[2 * q + 1] = __fadd_rn(acc[2 * q + 1], f.y);
                    }
                }
            }
            if (c < kRowN16) {
                int4 o;
                __nv_bfloat162* ob = reinterpret_cast<__nv_bfloat162*>(&o);
                #pragma unroll
                for (int q = 0; q < 4; ++q) ob[q] = __floats2bfloat162_rn(acc[2 * q], acc[2 * q + 1]);
                st_v4(reinterpret_cast<int4*>(reinterpret_cast<char*>(a.out) + (int64_t)t * kRow) + c, o);
            }
        }
        // The blocks' count for the poison check: the int after `done` (ops/low_latency.py
        // control words), 0 between calls (last_block_sees_error leaves it so); never reset by
        // the send phase, which may still be running in other blocks of a fused launch.
        if (last_block_sees_error(a.done + 1, err))
            poison_fill(a.out, (int64_t)a.num_tokens * kRow, kPoisonNaN);      // outputs: NaN
    }
};

template <int H, int K, int E, int R, int THREADS>
__device__ __forceinline__ void ll_combine_rank_kernel(const LowLatencyCombineRankArgs& a) {
    using C = LLCombineRank<H, K, E, R, THREADS>;
    const ErrorCtx err = make_error_ctx(a);
    ll::run_phases<C>(a, err);
}


// The generated unit's entry (templates/kernel.cu.j2): the spec struct S by name, epgen/jit/specs.py
// LowLatencyCombineRankSpec.constants; this is the one place its members meet the template's parameter order.
template <class S>
using LLCombineRankOf = LLCombineRank<S::hidden, S::num_topk, S::num_experts, S::num_ranks, S::threads>;
template <class S>
__device__ __forceinline__ void ll_combine_rank_entry(const LowLatencyCombineRankArgs& a) {
    ll_combine_rank_kernel<S::hidden, S::num_topk, S::num_experts, S::num_ranks, S::threads>(a);
}

}  // namespace epgen
