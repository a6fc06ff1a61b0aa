// Normal-mode intranode dispatch over NVLink: the notify helper (counts exchange, also used as a
// cross-rank barrier) and the dispatch kernel (one block per channel; a self group copies
// x -> recv_x directly, a sender group per remote peer pushes records into the ring (c, me) in
// the peer's region, a receiver group per remote peer drains ring (c, src) of this region).
// Ordering (kernels.md 2.8): weak payload stores, named barrier, st.release.sys of the tail by
// one thread; consumer ld.acquire.sys of the tail, then weak reads; head published with release.
#pragma once
#include "normal_notify.cuh"

namespace epgen {


// -------------------------------------------------------------------------------- dispatch
template <int R, int El, int K, int HB, int S, int THREADS>
struct DispatchCfg {
    static constexpr int kWarps = THREADS / 32;
    static constexpr int kGroups = 2 * R - 1;              // R senders (self included) + R-1 receivers
    static constexpr int kWG = kWarps / kGroups;           // warps per group
    static_assert(kWG >= 1, "not enough warps for the rank count");
    static_assert(kGroups <= 15, "named barrier ids 1..15");
    static constexpr int kOffScales = HB;
    static constexpr int kOffIdx = HB + S * 4;
    static constexpr int kOffW = kOffIdx + K * 4;
    static constexpr int kOffSrc = kOffW + K * 4;
    static constexpr int kRec = (kOffSrc + 4 + 15) / 16 * 16;
    static_assert(HB % 16 == 0, "rows are 16-byte vectors");
    // Tokens a sender warp takes per ballot (one per lane); the host's ring minimum counts it.
    // An enumerator: a static constexpr member read in the loop gets device storage.
    enum : int { kBatch = facts::kNormalRingBatch };
    static_assert(kBatch == 32, "a sender's batch is one token per lane of its ballot");
};

template <int R, int El, int K, int HB, int S, int THREADS>
__device__ __forceinline__ void dispatch_kernel(const NormalDispatchArgs& a) {
    using namespace nctrl;
    using Cfg = DispatchCfg<R, El, K, HB, S, THREADS>;
    constexpr int kWG = Cfg::kWG, kGT = kWG * 32, kRec = Cfg::kRec;
    constexpr int kHV = HB / 16;
    // Loads in flight per lane: 8 where a row is long enough to use them (BF16 7168: 14 KB),
    // 4 otherwise (the FP8 paths' extra scale/index registers would spill at 8).
    constexpr int kUnroll = kHV >= 3 * 32 * 8 ? 8 : 4;
    ErrorCtx err = make_error_ctx(a);
    __shared__ long long s_peer[R];
    __shared__ int s_seq;
    __shared__ int s_cnt[Cfg::kGroups][2];
    __shared__ int s_b[Cfg::kGroups][4];
    __shared__ long long s_ctr[Cfg::kGroups];   // the group's 64-bit ring counter at call start

    char* own = reinterpret_cast<char*>(a.nvl);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, me = a.rank;
    const int c = blockIdx.x, C = gridDim.x;
    if (tid < R) s_peer[tid] = (long long)a.peers[tid];
    if (tid < Cfg::kGroups * 2) (&s_cnt[0][0])[tid] = 0;
    if (tid == 0) s_seq = next_seq(ld_volatile(word(own, kDispCall, c)));
    __syncthreads();
    const int seq = s_seq, par = seq & 1;
    const int cap = a.cap;
    const int T = a.num_tokens;
    const int per = (T + C - 1) / C;
    const int tb = min(T, c * per), te = min(T, tb + per);
    const int N = a.rank_prefix[(R - 1) * R + me];
    if (c == 0 && tid == 0 && a.num_worst_tokens > 0 && N > a.num_worst_tokens)
        report_error(err, kErrCapacity, -1, N);

    const int g = warp / kWG, wg = warp % kWG, gtid = tid - g * kWG * 32;
    const int bar = 1 + g;
    if (g < R) {
        // ---------------------------------------------------------------- sender to p
        const int p = g;
        int before = 0, in = 0;
        for (int t = gtid; t < te; t += kGT)
            if (a.is_token_in_rank[(int64_t)t * R + p]) { if (t < tb) ++before; else ++in; }
        before = warp_reduce_sum(before);
        in = warp_reduce_sum(in);
        if (lane == 0) { atomicAdd(&s_cnt[g][0], before); atomicAdd(&s_cnt[g][1], in); }
        named_barrier(bar, kGT);
        const int start = s_cnt[g][0], count = s_cnt[g][1];
        char* peer = reinterpret_cast<char*>(s_peer[p]);
        // 64-bit record counters; within a call, offsets from them are ints (< 2^31 records)
        // and the slot of record tail0 + i is (slot0 + i) % cap.
        long long tail0 = 0;
        int slot0 = 0;
        int64_t row_base = 0;
        if (p != me) {
            if (gtid == 0) {
                tail0 = ld_volatile(word64(own, kDispSendTail, cr(c, p)));
                int* meta = word(peer, kDispMeta, (par * kMaxC * kMaxR + cr(c, me)) * 4);
                meta[1] = count;
                meta[2] = start;
                st_release_sys(meta, seq);
                s_ctr[g] = tail0;
            }
            named_barrier(bar, kGT);
            tail0 = s_ctr[g];
            slot0 = (int)(tail0 % cap);
        } else {
            row_base = (me == 0 ? 0 : a.rank_prefix[(me - 1) * R + me]) + start;
        }
        char* ring = peer + a.ring_offset + (int64_t)(c * R + me) * cap * kRec;
        const long long* head = word64(peer, kDispHead, cr(c, me));
        int sent = 0;
        #pragma unroll 1
        for (int bt = tb; bt < te; bt += Cfg::kBatch) {
            const int t = bt + lane;
            const bool sel = t < te && a.is_token_in_rank[(int64_t)t * R + p];
            const unsigned mask = __ballot_sync(0xffffffffu, sel);
            const int n = __popc(mask);
            if (n == 0) continue;
            if (p != me) {
                if (lane == 0) {
                    const long long need = tail0 + sent + n - cap;
                    wait_until(err, p, 2, [&] { return ld_acquire_sys(head) - need >= 0; });
                }
                __syncwarp();
            }
            unsigned m = mask;
            #pragma unroll 1
            for (int j = 0; m; ++j) {
                const int pos = __ffs(m) - 1;
                m &= m - 1;
                if (j % kWG != wg) continue;
                const int tok = bt + pos;
                const int4* src = reinterpret_cast<const int4*>(a.x + (int64_t)tok * HB);
                if (p == me) {
                    const int64_t row = row_base + sent + j;
                    if (row >= a.num_recv_rows) continue;
                    warp_copy<kHV, kUnroll, true>(reinterpret_cast<int4*>(a.recv_x + row * HB), src, lane);
                    for (int j = lane; j < S; j += 32)
                        a.recv_scales[row * S + j] = a.x_scales[(int64_t)tok * a.scale_stride_t + (int64_t)j * a.scale_stride_s];
                    if (K > 0 && lane < K && a.recv_topk_idx != nullptr) {
                        const int64_t e = a.topk_idx[(int64_t)tok * K + lane];
                        const bool local = e >= (int64_t)me * El && e < (int64_t)(me + 1) * El;
                        a.recv_topk_idx[row * K + lane] = local ? e - (int64_t)me * El : -1;
                        if (a.recv_topk_weights != nullptr)
                            a.recv_topk_weights[row * K + lane] = local ? a.topk_weights[(int64_t)tok * K + lane] : 0.0f;
                    }
                    if (lane == 0 && a.recv_src_idx != nullptr) a.recv_src_idx[row] = tok;
                } else {
                    char* rec = ring + (int64_t)((slot0 + sent + j) % cap) * kRec;
                    warp_copy<kHV, kUnroll, true>(reinterpret_cast<int4*>(rec), src, lane);
                    for (int j = lane; j < S; j += 32)
                        reinterpret_cast<float*>(rec + Cfg::kOffScales)[j] =
                            a.x_scales[(int64_t)tok * a.scale_stride_t + (int64_t)j * a.scale_stride_s];
                    if (K > 0 && lane < K) {
                        int li = -1;
                        float w = 0.0f;
                        if (a.topk_idx != nullptr) {
                            const int64_t e = a.topk_idx[(int64_t)tok * K + lane];
                            const bool local = e >= (int64_t)p * El && e < (int64_t)(p + 1) * El;
                            li = local ? (int)(e - (int64_t)p * El) : -1;
                            if (a.topk_weights != nullptr && local) w = a.topk_weights[(int64_t)tok * K + lane];
                        }
                        reinterpret_cast<int*>(rec + Cfg::kOffIdx)[lane] = li;
                        reinterpret_cast<float*>(rec + Cfg::kOffW)[lane] = w;
                    }
                    if (lane == 0) *reinterpret_cast<int*>(rec + Cfg::kOffSrc) = tok;
                }
            }
            sent += n;
            if (p != me) {
                named_barrier(bar, kGT);
                if (gtid == 0) st_release_sys(word64(peer, kDispTail, cr(c, me)), tail0 + sent);
            }
        }
        if (p != me && gtid == 0) st_volatile(word64(own, kDispSendTail, cr(c, p)), tail0 + count);
    } else if (g < 2 * R - 1) {
        // ---------------------------------------------------------------- receiver from s
        const int rg = g - R;
        const int s = rg < me ? rg : rg + 1;
        if (gtid == 0) {
            const int* meta = word(own, kDispMeta, (par * kMaxC * kMaxR + cr(c, s)) * 4);
            int count = 0, start = 0;
            if (wait_until(err, s, 3, [&] { return ld_acquire_sys(meta) == seq; })) {
                count = ld_volatile(meta + 1);
                start = ld_volatile(meta + 2);
            }
            s_b[g][0] = count;
            s_b[g][1] = start;
            s_ctr[g] = ld_volatile(word64(own, kDispHead, cr(c, s)));
        }
        named_barrier(bar, kGT);
        const int count = s_b[g][0], start = s_b[g][1];
        const long long head0 = s_ctr[g];
        const int slot0 = (int)(head0 % cap);
        const int64_t row_base = (s == 0 ? 0 : a.rank_prefix[(s - 1) * R + me]) + start;
        const char* ring = own + a.ring_offset + (int64_t)(c * R + s) * cap * kRec;
        const long long* tailp = word64(own, kDispTail, cr(c, s));
        int consumed = 0;
        #pragma unroll 1
        while (consumed < count) {
            named_barrier(bar, kGT);   // everyone has read s_b[g][3] of the previous round
            if (gtid == 0) {
                const long long pos = head0 + consumed;
                long long tail = pos;
                int avail;
                if (wait_until(err, s, 4, [&] { tail = ld_acquire_sys(tailp); return tail - pos > 0; }))
                    avail = (int)min(tail - pos, (long long)(count - consumed));
                else
                    avail = count - consumed;   // give up: finish without data
                s_b[g][3] = avail;
            }
            named_barrier(bar, kGT);
            const int avail = s_b[g][3];
            #pragma unroll 1
            for (int i = wg; i < avail; i += kWG) {
                const char* rec = ring + (int64_t)((slot0 + consumed + i) % cap) * kRec;
                const int64_t row = row_base + consumed + i;
                if (row >= a.num_recv_rows) continue;
                warp_copy<kHV, kUnroll, false>(reinterpret_cast<int4*>(a.recv_x + row * HB),
                                         reinterpret_cast<const int4*>(rec), lane);
                for (int j = lane; j < S; j += 32)
                    a.recv_scales[row * S + j] = reinterpret_cast<const volatile float*>(rec + Cfg::kOffScales)[j];
                if (K > 0 && lane < K && a.recv_topk_idx != nullptr) {
                    a.recv_topk_idx[row * K + lane] = reinterpret_cast<const volatile int*>(rec + Cfg::kOffIdx)[lane];
                    if (a.recv_topk_weights != nullptr)
                        a.recv_topk_weights[row * K + lane] = reinterpret_cast<const volatile float*>(rec + Cfg::kOffW)[lane];
                }
                if (lane == 0 && a.recv_src_idx != nullptr)
                    a.recv_src_idx[row] = *reinterpret_cast<const volatile int*>(rec + Cfg::kOffSrc);
            }
            consumed += avail;
            named_barrier(bar, kGT);
            if (gtid == 0) st_release_sys(word64(own, kDispHead, cr(c, s)), head0 + consumed);
        }
    }
    // Padding rows of a worst-sized output: recv_topk_idx = -1, recv_src_idx = -1.
    if (a.num_worst_tokens > 0) {
        for (int64_t r = (int64_t)N + (int64_t)c * THREADS + tid; r < a.num_worst_tokens; r += (int64_t)C * THREADS) {
            if (K > 0 && a.recv_topk_idx != nullptr) {
                #pragma unroll
                for (int k = 0; k < K; ++k) a.recv_topk_idx[r * K + k] = -1;
            }
            if (a.recv_src_idx != nullptr) a.recv_src_idx[r] = -1;
        }
    }
    __syncthreads();
    if (tid == 0) st_volatile(word(own, kDispCall, c), seq);
    if (last_block_sees_error(word(own, kDispDone), err)) {     // outputs: NaN, -1
        const int64_t rows = a.num_recv_rows;
        poison_fill(a.recv_x, rows * HB, kPoisonNaN);
        poison_fill(a.recv_scales, rows * S * 4, kPoisonNaN);
        poison_fill(a.recv_topk_idx, rows * K * 8, kPoisonNaN);
        poison_fill(a.recv_topk_weights, rows * K * 4, kPoisonNaN);
        poison_fill(a.recv_src_idx, rows * 4, kPoisonNaN);
    }
}


// The generated unit's entry (templates/kernel.cu.j2): the spec struct S by name, epgen/jit/specs.py
// NormalDispatchSpec.constants; this is the one place its members meet the template's parameter order.
template <class S>
using DispatchCfgOf = DispatchCfg<S::num_ranks, S::experts_per_rank, S::num_topk, S::hidden_bytes,
                                  S::num_scales, S::threads>;
template <class S>
__device__ __forceinline__ void normal_dispatch_entry(const NormalDispatchArgs& a) {
    dispatch_kernel<S::num_ranks, S::experts_per_rank, S::num_topk, S::hidden_bytes, S::num_scales,
                    S::threads>(a);
}

}  // namespace epgen
