// Low-latency dispatch (DeepEP V1 semantics), one message per (token, expert).
//
// Region layout (byte offsets are launch arguments, computed in epgen/ops/low_latency.py):
//   sig_off : u64 [2][kMaxSig]            signal (epoch << 32 | count) per (local expert, source)
//   recv_off: msg [2][El][R][M]           message slots, a chunk per (local expert, source)
//   send_off: msg [M]                     staging for NVSHMEM puts to non-P2P peers
// Message = 16-byte header (source token index, 3 reserved ints) + payload:
//   FP8: e4m3 row (H bytes) + float scale_inv per 128 channels (S floats), padded to 16 bytes;
//   BF16: the row (2H bytes).
// Send phase (phases & 1): a block per token at a time; slot per (token, expert) from an
// atomic on a local per-expert counter; the block casts the token into shared memory, then
// warps copy it to each destination (NVLink stores, or nvshmemx_putmem_nbi_warp). The last
// block to finish reads and resets the counters and publishes E signals.
// Receive phase (phases & 2): every block waits for the E signals of its rank, computes the
// per-(expert, source) begin offsets (sources ascending), and warps copy messages to recv_x /
// src_info / scales (column-major [El][S][R*M]); block 0 writes counts, ranges and stats.
#pragma once
#include "ll_common.cuh"

namespace epgen {

template <int H, int K, int E, int R, bool FP8, bool ROUND, bool UE8M0, int THREADS>
struct LLDispatch {
    static constexpr int El = E / R;
    static constexpr int S = (H + 127) / 128;
    static constexpr int S4 = (S + 3) / 4;
    static constexpr int kPayload = FP8 ? ll::align16(H + 4 * S) : 2 * H;
    static constexpr int kMsg = 16 + kPayload;
    static constexpr int kN16 = kMsg / 16;
    static constexpr int kWarps = THREADS / 32;
    static constexpr int kParts = kWarps / K >= 1 ? kWarps / K : 1;
    static constexpr int kPart = (kN16 + kParts - 1) / kParts;
    static constexpr int kRowN16 = FP8 ? H / 16 : H / 8;     // 16-byte units of a recv_x row
    static_assert(H % 16 == 0, "hidden must be a multiple of 16");
    static_assert(E % R == 0 && E <= ll::kMaxSig && E <= THREADS, "experts");
    static_assert(K >= 1 && K <= 32, "top-k");
    static_assert(!UE8M0 || ROUND, "UE8M0 needs round_scale");

    // Byte offset of signal i = (local expert * R + source rank) of a half.
    static __device__ __forceinline__ uint64_t sig_off(const LowLatencyDispatchArgs& a, int half, int i) {
        return a.sig_off + ((uint64_t)half * ll::kMaxSig + i) * 8;
    }

    // FP8 cast of one BF16 token into the message payload (shared memory), block-wide.
    static __device__ __forceinline__ void cast_fp8(const int4* xrow, char* payload) {
        constexpr int kNC = H / 8;                            // 8-channel chunks
        constexpr int kIter = (kNC + THREADS - 1) / THREADS;
        float* scales = reinterpret_cast<float*>(payload + H);
        #pragma unroll
        for (int it = 0; it < kIter; ++it) {
            const int c = it * THREADS + (int)threadIdx.x;
            const bool active = c < kNC;
            float v[8];
            float amax = 0.f;
            if (active) {
                int4 raw = ld_nc_v4(xrow + c);
                const __nv_bfloat162* b = reinterpret_cast<const __nv_bfloat162*>(&raw);
                #pragma unroll
                for (int j = 0; j < 4; ++j) {
                    float2 f = __bfloat1622float2(b[j]);
                    v[2 * j] = f.x; v[2 * j + 1] = f.y;
                }
                #pragma unroll
                for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(v[j]));
            } else {
                #pragma unroll
                for (int j = 0; j < 8; ++j) v[j] = 0.f;
            }
            // 16 chunks = 128 channels = one scale group, aligned to half warps.
            #pragma unroll
            for (int o = 8; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
            amax = fmaxf(amax, 1e-4f);
            float scale_inv = __fdiv_rn(amax, 448.f);
            if (ROUND) {
                const uint32_t bits = __float_as_uint(scale_inv);
                const uint32_t ex = ((bits >> 23) & 0xffu) + ((bits & 0x7fffffu) != 0u ? 1u : 0u);
                scale_inv = __uint_as_float(ex << 23);
            }
            const float scale = __fdiv_rn(1.f, scale_inv);
            if (active) {
                uint32_t packed[2];
                #pragma unroll
                for (int j = 0; j < 2; ++j) {
                    float2 lo = make_float2(fminf(fmaxf(__fmul_rn(v[4 * j], scale), -448.f), 448.f),
                                            fminf(fmaxf(__fmul_rn(v[4 * j + 1], scale), -448.f), 448.f));
                    float2 hi = make_float2(fminf(fmaxf(__fmul_rn(v[4 * j + 2], scale), -448.f), 448.f),
                                            fminf(fmaxf(__fmul_rn(v[4 * j + 3], scale), -448.f), 448.f));
                    const uint32_t a = __nv_cvt_float2_to_fp8x2(lo, __NV_SATFINITE, __NV_E4M3);
                    const uint32_t b = __nv_cvt_float2_to_fp8x2(hi, __NV_SATFINITE, __NV_E4M3);
                    packed[j] = a | (b << 16);
                }
                *reinterpret_cast<uint2*>(payload + c * 8) = make_uint2(packed[0], packed[1]);
                if ((c & 15) == 0) scales[c >> 4] = scale_inv;
            }
        }
    }

    static __device__ void send(const LowLatencyDispatchArgs& a, const ErrorCtx& err) {
        extern __shared__ int4 smem_msg[];                   // kMsg bytes
        __shared__ int s_e[K];
        __shared__ int s_slot[K];
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
        const uint32_t epoch = ll::next_epoch(a.seq);
        const int half = (int)(epoch & 1u);
        if (blockIdx.x == 0 && threadIdx.x == 0) *a.call_epoch = (int)epoch;   // for the receive
        const int M = a.max_tokens;
        char* base = reinterpret_cast<char*>(a.rdma_base);
        const bool any_remote = a.any_remote != 0;

        for (int t = blockIdx.x; t < a.num_tokens; t += gridDim.x) {
            if (tid < K) {
                const int64_t e = a.topk_idx[(int64_t)t * K + tid];
                int ev = -1, slot = 0;
                if (e >= 0 && e < E) {
                    const int dst = (int)e / El;
                    if (!ll::masked(a.mask, dst)) {
                        slot = atomicAdd(a.counters + e, 1);
                        if (slot >= M) report_error(err, kErrCapacity, dst, (int)e);
                        else ev = (int)e;
                    }
                } else if (e != -1) {
                    report_error(err, kErrBadIndex, -1, t);
                }
                s_e[tid] = ev;
                s_slot[tid] = slot;
            }
            int* hdr = reinterpret_cast<int*>(smem_msg);
            if (tid < 4) hdr[tid] = tid == 0 ? t : 0;
            const int4* xrow = reinterpret_cast<const int4*>(
                reinterpret_cast<const char*>(a.x) + (int64_t)t * H * 2);
            if constexpr (FP8) {
                cast_fp8(xrow, reinterpret_cast<char*>(smem_msg + 1));
            } else {
                for (int i = tid; i < H / 8; i += THREADS) smem_msg[1 + i] = ld_nc_v4(xrow + i);
            }
            __syncthreads();
            if (any_remote) {   // symmetric staging copy: the source of proxy puts
                int4* stage = reinterpret_cast<int4*>(base + a.send_off + (uint64_t)t * kMsg);
                for (int i = tid; i < kN16; i += THREADS) st_v4(stage + i, smem_msg[i]);
                __threadfence();
                __syncthreads();
            }
            for (int u = warp; u < K * kParts; u += kWarps) {
                const int k = u % K, part = u / K;
                const int e = s_e[k];
                if (e < 0) continue;
                const int dst = e / El, le = e % El;
                const int lo = part * kPart;
                const int hi = lo + kPart < kN16 ? lo + kPart : kN16;
                if (lo >= hi) continue;
                const uint64_t off = a.recv_off +
                    ((((uint64_t)half * El + le) * R + a.rank) * (uint64_t)M + s_slot[k]) * kMsg;
                const int64_t pb = a.peer_bases[dst];
                if (pb != 0) {
                    int4* d = reinterpret_cast<int4*>(pb + off);
                    int i = lo + lane;
                    #pragma unroll 4
                    for (; i < hi; i += 32) st_v4(d + i, smem_msg[i]);
                } else {
                    nvshmemx_putmem_nbi_warp(base + off + (uint64_t)lo * 16,
                                             base + a.send_off + (uint64_t)t * kMsg + (uint64_t)lo * 16,
                                             (size_t)(hi - lo) * 16, a.pes[dst]);
                }
            }
            __syncthreads();
        }

        if (!ll::last_block_arrives(a.done, any_remote)) return;
        for (int e = tid; e < E; e += THREADS) {
            const int cnt = atomicExch(a.counters + e, 0);
            const int dst = e / El, le = e % El;
            if (ll::masked(a.mask, dst)) continue;
            const unsigned long long v = ((unsigned long long)epoch << 32) | (uint32_t)cnt;
            ll::put_signal(base, a.peer_bases, a.pes, dst, sig_off(a, half, le * R + a.rank), v);
        }
        __syncthreads();
        if (tid == 0) {
            *a.done = 0;
            *a.seq = (int)epoch;
        }
    }

    static __device__ void recv(const LowLatencyDispatchArgs& a, const ErrorCtx& err) {
        __shared__ int s_cnt[E];
        __shared__ int s_begin[E];
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
        const uint32_t epoch = (uint32_t)ld_volatile(a.call_epoch);   // this call's send
        const int half = (int)(epoch & 1u);
        const int M = a.max_tokens;
        const int64_t RM = (int64_t)R * M;
        const char* base = reinterpret_cast<const char*>(a.rdma_base);

        __shared__ bool s_arrived[E];
        for (int i = tid; i < E; i += THREADS) {
            const int src = i % R;
            int cnt = 0;
            bool arrived = false;
            if (!ll::masked(a.mask, src)) {
                const unsigned long long t0 = globaltimer();
                arrived = ll::wait_signal(err, base, sig_off(a, half, i), epoch, src, i, a.mask, &cnt);
                if (blockIdx.x == 0 && a.wait_stats != nullptr)
                    atomicAdd(reinterpret_cast<unsigned long long*>(a.wait_stats + src),
                              globaltimer() - t0);
            }
            s_cnt[i] = cnt;
            s_arrived[i] = arrived;
        }
        __syncthreads();
        if (a.mask != nullptr) {   // enable_shrink: all blocks take the same sources
            __shared__ bool s_in[R];
            if (tid < R) {
                bool all = true;
                for (int le = 0; le < El; ++le) all = all && s_arrived[le * R + tid];
                s_in[tid] = ll::peer_verdict(a.verdicts + half * ll::kMaxRankSig, a.mask, epoch,
                                             tid, all);
            }
            __syncthreads();
            for (int i = tid; i < E; i += THREADS) {
                const int src = i % R;
                if (!s_in[src]) s_cnt[i] = 0;
                else if (!s_arrived[i])   // arrived for the block that decided: visible now
                    ll::wait_signal(err, base, sig_off(a, half, i), epoch, src, i, nullptr, &s_cnt[i]);
            }
            __syncthreads();
        }
        for (int i = tid; i < E; i += THREADS) {
            if (s_cnt[i] > M) { report_error(err, kErrCapacity, i % R, s_cnt[i]); s_cnt[i] = 0; }
        }
        __syncthreads();
        for (int le = tid; le < El; le += THREADS) {
            int b = 0;
            #pragma unroll 1
            for (int src = 0; src < R; ++src) {
                const int n = s_cnt[le * R + src];
                s_begin[le * R + src] = b;
                if (blockIdx.x == 0) a.recv_layout_range[le * R + src] = ((int64_t)b << 32) | (int64_t)n;
                b += n;
            }
            if (blockIdx.x == 0) {
                a.recv_count[le] = b;
                if (a.cumulative_stats != nullptr) atomicAdd(a.cumulative_stats + le, b);
            }
        }
        __syncthreads();

        __shared__ int s_cum[E];
        ll::block_inclusive_scan<THREADS>(s_cnt, s_cum, E);
        const int total = s_cum[E - 1];
        const int gw = blockIdx.x * (THREADS / 32) + warp;
        const int nw = gridDim.x * (THREADS / 32);
        for (int m = gw; m < total; m += nw) {
            const int p = ll::locate(s_cum, E, m);
            const int i = m - (s_cum[p] - s_cnt[p]);
            const int le = p / R, src = p % R;
            const int64_t row = s_begin[p] + i;
            const int4* msg = reinterpret_cast<const int4*>(
                base + a.recv_off + ((((uint64_t)half * El + le) * R + src) * (uint64_t)M + i) * kMsg);
            if (lane == 0) a.recv_src_info[le * RM + row] = ld_v4(msg).x;
            int4* dst = reinterpret_cast<int4*>(reinterpret_cast<char*>(a.recv_x) +
                                                (le * RM + row) * (int64_t)(FP8 ? H : 2 * H));
            warp_copy<kRowN16, 8, false>(dst, msg + 1, lane);
            if constexpr (FP8) {
                const float* sc = reinterpret_cast<const float*>(
                    reinterpret_cast<const char*>(msg + 1) + H);
                if constexpr (UE8M0) {
                    int* out = reinterpret_cast<int*>(a.recv_scales);
                    for (int j = lane; j < S4; j += 32) {
                        uint32_t packed = 0;
                        #pragma unroll
                        for (int q = 0; q < 4; ++q) {
                            const int g = 4 * j + q;
                            if (g < S) {
                                const uint32_t bits = __float_as_uint(
                                    *reinterpret_cast<const volatile float*>(sc + g));
                                packed |= ((bits >> 23) & 0xffu) << (8 * q);
                            }
                        }
                        out[((int64_t)le * S4 + j) * RM + row] = (int)packed;
                    }
                } else {
                    float* out = reinterpret_cast<float*>(a.recv_scales);
                    for (int g = lane; g < S; g += 32)
                        out[((int64_t)le * S + g) * RM + row] =
                            *reinterpret_cast<const volatile float*>(sc + g);
                }
            }
        }
    }
};

template <int H, int K, int E, int R, bool FP8, bool ROUND, bool UE8M0, int THREADS>
__device__ __forceinline__ void ll_dispatch_kernel(const LowLatencyDispatchArgs& a) {
    using D = LLDispatch<H, K, E, R, FP8, ROUND, UE8M0, THREADS>;
    const ErrorCtx err = make_error_ctx(a);
    if (a.phases & 1) D::send(a, err);
    if (a.phases & 2) D::recv(a, err);
}

}  // namespace epgen
