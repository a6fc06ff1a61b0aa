// Normal-mode intranode combine over NVLink. Block c = channel c. A sender group per remote
// token owner s pushes this rank's rows of s's channel-c tokens (found by binary search in
// recv_src_idx, which is ascending per source) in order into ring (c, me) of s's region; the
// reducer group walks this rank's own channel-c tokens in order: the contribution of rank r to
// token t is the next slot of ring (c, r) (running index via ballots), the self contribution is
// read from x. Sum in float32, fixed order (bias0, bias1, ranks ascending), round once to bf16.
#pragma once
#include "normal_ctrl.cuh"

namespace epgen {

template <int R, int K, int H, int NB, int THREADS>
struct CombineCfg {
    static constexpr int kWarps = THREADS / 32;
    static constexpr int kWS = (kWarps / (2 * (R - 1))) > 0 ? kWarps / (2 * (R - 1)) : 1;
    static constexpr int kWR = kWarps - (R - 1) * kWS;     // reducer warps
    static_assert(kWR >= 1, "not enough warps");
    static_assert(R <= 15, "named barrier ids");
    static constexpr int kHB = H * 2;
    static constexpr int kOffW = kHB;
    static constexpr int kRec = (kHB + K * 4 + 15) / 16 * 16;
    // The ring batch (facts, layout_facts.py): a ring holds one of each side's, or they deadlock.
    static constexpr int kChunk = facts::kNormalRingBatch;        // sender rows per published tail
    enum : int { kReduceBatch = facts::kNormalRingBatch };        // reducer tokens per ballot
    static_assert(kReduceBatch == 32, "a reducer's batch is one token per lane of its ballots");
};

__device__ __forceinline__ void add_bf16x8(float (&acc)[8], const int4& v) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 f = __bfloat1622float2(h[i]);
        acc[2 * i] += f.x;
        acc[2 * i + 1] += f.y;
    }
}

template <int R, int K, int H, int NB, int THREADS>
__device__ __forceinline__ void combine_kernel(const NormalCombineArgs& a) {
    using namespace nctrl;
    using Cfg = CombineCfg<R, K, H, NB, THREADS>;
    constexpr int kWS = Cfg::kWS, kWR = Cfg::kWR, kRec = Cfg::kRec, kHV = Cfg::kHB / 16;
    constexpr int kChunk = Cfg::kChunk;
    ErrorCtx err = make_error_ctx(a);
    __shared__ long long s_peer[R];
    __shared__ int s_b[R][4];
    __shared__ long long s_ctr[R];   // a sender group's 64-bit ring counter at call start
    __shared__ int s_self;

    char* own = reinterpret_cast<char*>(a.nvl);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, me = a.rank;
    const int c = blockIdx.x, C = gridDim.x;
    const int cap = a.cap;
    if (tid < R) s_peer[tid] = (long long)a.peers[tid];
    if (tid == 0) s_self = 0;
    __syncthreads();

    if (warp < (R - 1) * kWS) {
        // -------------------------------------------------------------- sender to owner s
        const int sg = warp / kWS, wg = warp % kWS, gtid = tid - sg * kWS * 32;
        constexpr int kGT = kWS * 32;
        const int bar = 1 + sg;
        const int s = sg < me ? sg : sg + 1;
        char* peer = reinterpret_cast<char*>(s_peer[s]);
        if (gtid == 0) {
            const int Ts = a.num_tokens_all[s];
            const int per = (Ts + C - 1) / C;
            const int tb = min(Ts, c * per), te = min(Ts, tb + per);
            const int base = s == 0 ? 0 : a.rank_prefix[(s - 1) * R + me];
            const int end = a.rank_prefix[s * R + me];
            auto lower = [&](int v) {   // first row in [base, end) with src_idx >= v
                int lo = base, hi = end;
                while (lo < hi) { int mid = (lo + hi) / 2; if (a.recv_src_idx[mid] < v) lo = mid + 1; else hi = mid; }
                return lo;
            };
            s_b[sg][0] = lower(tb);
            s_b[sg][1] = lower(te);
            s_ctr[sg] = ld_volatile(word64(own, kCombSendTail, cr(c, s)));
        }
        named_barrier(bar, kGT);
        // 64-bit record counters; offsets within a call are ints, slots (slot0 + i) % cap
        const int lo = s_b[sg][0], cnt = s_b[sg][1] - lo;
        const long long tail0 = s_ctr[sg];
        const int slot0 = (int)(tail0 % cap);
        char* ring = peer + a.ring_offset + (int64_t)(c * R + me) * cap * kRec;
        const long long* head = word64(peer, kCombHead, cr(c, me));
        #pragma unroll 1
        for (int i0 = 0; i0 < cnt; i0 += kChunk) {
            const int n = min(kChunk, cnt - i0);
            if (lane == 0) {
                const long long need = tail0 + i0 + n - cap;
                wait_until(err, s, 5, [&] { return ld_acquire_sys(head) - need >= 0; });
            }
            __syncwarp();
            #pragma unroll 1
            for (int i = wg; i < n; i += kWS) {
                const int64_t row = lo + i0 + i;
                char* rec = ring + (int64_t)((slot0 + i0 + i) % cap) * kRec;
                warp_copy<kHV, 8, true>(reinterpret_cast<int4*>(rec),
                                        reinterpret_cast<const int4*>(a.x + row * Cfg::kHB), lane);
                if (K > 0 && lane < K)
                    reinterpret_cast<float*>(rec + Cfg::kOffW)[lane] =
                        a.topk_weights ? a.topk_weights[row * K + lane] : 0.0f;
            }
            named_barrier(bar, kGT);
            if (gtid == 0) st_release_sys(word64(peer, kCombTail, cr(c, me)), tail0 + i0 + n);
        }
        if (gtid == 0) st_volatile(word64(own, kCombSendTail, cr(c, s)), tail0 + cnt);
    } else {
        // -------------------------------------------------------------- reducer (owner me)
        const int wr = warp - (R - 1) * kWS, gtid = tid - (R - 1) * kWS * 32;
        constexpr int kGT = kWR * 32;
        const int bar = R;
        const int T = a.num_tokens;
        const int per = (T + C - 1) / C;
        const int tb = min(T, c * per), te = min(T, tb + per);
        int before = 0;
        for (int t = gtid; t < tb; t += kGT) before += a.is_token_in_rank[(int64_t)t * R + me] ? 1 : 0;
        before = warp_reduce_sum(before);
        if (lane == 0 && before) atomicAdd(&s_self, before);
        named_barrier(bar, kGT);
        const int64_t self_row0 = (me == 0 ? 0 : a.rank_prefix[(me - 1) * R + me]) + s_self;
        __shared__ long long s_head0[R];         // 64-bit ring counters at call start
        __shared__ int s_slot0[R];               // their slots (s_head0 % cap)
        __shared__ long long s_seen[Cfg::kWR][R];   // per warp: a tail value known to be reached
        if (gtid < R) {
            const long long h = gtid == me ? 0 : ld_volatile(word64(own, kCombHead, cr(c, gtid)));
            s_head0[gtid] = h;
            s_slot0[gtid] = (int)(h % cap);
        }
        named_barrier(bar, kGT);
        if (lane < R) s_seen[wr][lane] = s_head0[lane];
        __syncwarp();
        int running[R];
        #pragma unroll
        for (int r = 0; r < R; ++r) running[r] = 0;
        const char* rings = own + a.ring_offset + (int64_t)c * R * cap * kRec;
        #pragma unroll 1
        for (int bt = tb; bt < te; bt += Cfg::kReduceBatch) {
            const int t = bt + lane;
            unsigned m[R];
            #pragma unroll
            for (int r = 0; r < R; ++r)
                m[r] = __ballot_sync(0xffffffffu, t < te && a.is_token_in_rank[(int64_t)t * R + r]);
            const int nb = min(Cfg::kReduceBatch, te - bt);
            #pragma unroll 1
            for (int j = wr; j < nb; j += kWR) {
                const int tok = bt + j;
                const unsigned below = (1u << j) - 1u;
                int slot[R];        // self: row offset in x; peers: ring index; -1: not sent there
                #pragma unroll
                for (int r = 0; r < R; ++r) {
                    slot[r] = -1;
                    if (!((m[r] >> j) & 1u)) continue;
                    const int idx = running[r] + __popc(m[r] & below);
                    if (r == me) {
                        slot[r] = idx;
                    } else {
                        const long long need = s_head0[r] + idx;
                        if (__shfl_sync(0xffffffffu, (int)(s_seen[wr][r] - need <= 0), 0)) {
                            if (lane == 0) {
                                const long long* tp = word64(own, kCombTail, cr(c, r));
                                long long tl = need;
                                wait_until(err, r, 6, [&] { tl = ld_acquire_sys(tp); return tl - need > 0; });
                                s_seen[wr][r] = tl;
                            }
                            __syncwarp();
                        }
                        slot[r] = (s_slot0[r] + idx) % cap;
                    }
                }
                auto src_of = [&](int r) -> const char* {
                    return r == me ? a.x + (self_row0 + slot[r]) * Cfg::kHB
                                   : rings + ((int64_t)r * cap + slot[r]) * kRec;
                };
                // Several loads are issued before any is used: the stores are asm volatile, so
                // the compiler would otherwise keep one load in flight per lane and the loop
                // would run at memory latency. Sources q: biases first, then ranks ascending
                // (the fixed summation order); at most 8 loads in flight per lane.
                constexpr int kSrc = NB + R;
                constexpr int kG = kSrc < 4 ? kSrc : 4;            // sources loaded together
                constexpr int kU = kSrc <= 4 ? 8 / kSrc : 1;       // columns per iteration
                const int4* bias0 = reinterpret_cast<const int4*>(a.bias0 + (int64_t)tok * Cfg::kHB);
                const int4* bias1 = reinterpret_cast<const int4*>(a.bias1 + (int64_t)tok * Cfg::kHB);
                auto present = [&](int q) { return q < NB || slot[q - NB] >= 0; };
                auto load = [&](int q, int v) -> int4 {
                    if (q == 0 && NB > 0) return ld_nc_v4(bias0 + v);
                    if (q == 1 && NB > 1) return ld_nc_v4(bias1 + v);
                    const int r = q - NB;
                    if (slot[r] < 0) return make_int4(0, 0, 0, 0);
                    const int4* p = reinterpret_cast<const int4*>(src_of(r)) + v;
                    return r == me ? ld_nc_v4(p) : ld_v4(p);
                };
                #pragma unroll 1
                for (int v0 = lane; v0 < kHV; v0 += 32 * kU) {
                    float acc[kU][8];
                    #pragma unroll
                    for (int u = 0; u < kU; ++u)
                        #pragma unroll
                        for (int i = 0; i < 8; ++i) acc[u][i] = 0.0f;
                    #pragma unroll
                    for (int g = 0; g < kSrc; g += kG) {
                        int4 val[kU][kG];
                        #pragma unroll
                        for (int u = 0; u < kU; ++u)
                            #pragma unroll
                            for (int j = 0; j < kG; ++j)
                                val[u][j] = (g + j < kSrc && v0 + u * 32 < kHV) ? load(g + j, v0 + u * 32)
                                                                                 : make_int4(0, 0, 0, 0);
                        #pragma unroll
                        for (int u = 0; u < kU; ++u)
                            #pragma unroll
                            for (int j = 0; j < kG; ++j)      // absent ranks add nothing (not +0.0)
                                if (g + j < kSrc && present(g + j)) add_bf16x8(acc[u], val[u][j]);
                    }
                    #pragma unroll
                    for (int u = 0; u < kU; ++u) {
                        const int v = v0 + u * 32;
                        if (v >= kHV) break;
                        int4 out;
                        __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&out);
                        #pragma unroll
                        for (int i = 0; i < 4; ++i) o[i] = __floats2bfloat162_rn(acc[u][2 * i], acc[u][2 * i + 1]);
                        st_v4(reinterpret_cast<int4*>(a.combined_x + (int64_t)tok * Cfg::kHB) + v, out);
                    }
                }
                if (K > 0 && lane < K && a.combined_weights != nullptr) {
                    float w = 0.0f;
                    #pragma unroll
                    for (int r = 0; r < R; ++r) {
                        if (slot[r] < 0) continue;
                        if (r == me) w += a.topk_weights[(self_row0 + slot[r]) * K + lane];
                        else w += reinterpret_cast<const volatile float*>(src_of(r) + Cfg::kOffW)[lane];
                    }
                    a.combined_weights[(int64_t)tok * K + lane] = w;
                }
            }
            #pragma unroll
            for (int r = 0; r < R; ++r) running[r] += __popc(m[r]);
            named_barrier(bar, kGT);
            if (gtid == 0) {
                #pragma unroll
                for (int r = 0; r < R; ++r)
                    if (r != me) st_release_sys(word64(own, kCombHead, cr(c, r)), s_head0[r] + running[r]);
            }
        }
    }
    if (last_block_sees_error(word(own, kCombDone), err)) {     // outputs: NaN
        poison_fill(a.combined_x, (int64_t)a.num_tokens * Cfg::kHB, kPoisonNaN);
        poison_fill(a.combined_weights, (int64_t)a.num_tokens * K * 4, kPoisonNaN);
    }
}


// The generated unit's entry (templates/kernel.cu.j2): the spec struct S by name, epgen/jit/specs.py
// NormalCombineSpec.constants; this is the one place its members meet the template's parameter order.
template <class S>
using CombineCfgOf = CombineCfg<S::num_ranks, S::num_topk, S::hidden, S::num_biases, S::threads>;
template <class S>
__device__ __forceinline__ void normal_combine_entry(const NormalCombineArgs& a) {
    combine_kernel<S::num_ranks, S::num_topk, S::hidden, S::num_biases, S::threads>(a);
}

}  // namespace epgen
