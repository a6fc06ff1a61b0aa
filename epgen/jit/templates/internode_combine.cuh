// The internode normal mode's combine: the dispatch's path backwards (templates/
// internode_dispatch.cuh), reducing inside each node first. epgen/reference_internode.py
// `combine` defines the result and its rounding order; the handle gives every count.
//
// Channel c is kBlocks adjacent blocks of one warp per role (as the dispatch: role =
// block-in-channel * warps-per-block + warp; one block where the roles fit in 32 warps):
//   warps [0, R)         NVLink sender of source rank s = (m, j): this rank's rows from s in
//                        channel c (x rows recv_gbl_channel_prefix[s][c] + i, the dispatch's
//                        receive order) -> combine ring (c, my local rank, m) of forwarder
//                        (my node, j)
//   warps [R, R + Nn)    forwarder of source node m: per token of rank (m, j = my local rank)
//                        it received over RDMA (send_nvl_head says which local ranks hold a row),
//                        sums those rows in float32, local ranks ascending, rounds once to BF16
//                        (weights summed likewise, kept float32) and puts the partial to the
//                        owner (m, j) with put-with-signal (chunked, credited as the dispatch's)
//   warp R + Nn          reducer: per token t of channel c, bias0 + bias1 + the node partials,
//                        nodes ascending (send_rdma_head says which nodes hold a partial),
//                        rounded once
// Each ring's records arrive in the order its consumer takes them (token order), so a consumer
// waiting for its next record never waits behind a full ring. A channel's blocks need only
// each other and the same channel's blocks of their peers. Counters: 64-bit, monotonic,
// each ring empty between calls.
#pragma once
#include "internode_common.cuh"

namespace epgen {

namespace icomb {
// RDMA control words (after the dispatch's four arrays, idisp::kRdma*).
constexpr int kTail = 4, kHead = 5, kSendTail = 6, kRecvHead = 7;
// NVLink control words: on the sender [c][forwarder j][m]: kSendTailN (local), kSendHeadN
// (written by the forwarder); on the forwarder [c][sender k][m]: kTailN (written by sender k),
// kHeadN (local).
constexpr int kSendTailN = 4, kSendHeadN = 5, kTailN = 6, kHeadN = 7;
// The host sizes both control areas for facts::kInodeCtrlWords arrays: the dispatch's, then these.
static_assert(kRecvHead + 1 == facts::kInodeCtrlWords && kHeadN + 1 == facts::kInodeCtrlWords,
              "control word arrays the host sizes (epgen/jit/layout_facts.py kInodeCtrlWords)");
constexpr int kWaitNvlSpace = 21, kWaitNvlData = 22, kWaitRdmaCredit = 23, kWaitRdmaData = 24;

// acc[0..8) += the 8 BF16 values of q (float32, in order).
__device__ __forceinline__ void add_bf16x8(float* acc, const int4& q) {
    const __nv_bfloat162* b = reinterpret_cast<const __nv_bfloat162*>(&q);
    #pragma unroll
    for (int e = 0; e < 4; ++e) {
        const float2 f = __bfloat1622float2(b[e]);
        acc[2 * e] += f.x;
        acc[2 * e + 1] += f.y;
    }
}
// The 8 values rounded to BF16 (nearest even), packed.
__device__ __forceinline__ int4 bf16x8(const float* acc) {
    int4 o;
    __nv_bfloat162* b = reinterpret_cast<__nv_bfloat162*>(&o);
    #pragma unroll
    for (int e = 0; e < 4; ++e) b[e] = __floats2bfloat162_rn(acc[2 * e], acc[2 * e + 1]);
    return o;
}
}  // namespace icomb

template <int H, int K, int L, int R, int NB, int THREADS>
__device__ __forceinline__ void internode_combine_kernel(const InternodeCombineArgs& a) {
    using namespace icomb;
    constexpr int kNodes = R / L, kWarps = R + kNodes + 1;
    constexpr int kRowB = 2 * H, kOffW = kRowB, kRec = (kRowB + 4 * K + 15) / 16 * 16;
    constexpr int kHV = kRowB / 16;
    constexpr int kWarpsPerBlock = THREADS / 32;
    constexpr int kBlocks = (kWarps + kWarpsPerBlock - 1) / kWarpsPerBlock;   // per channel
    static_assert(THREADS % 32 == 0 && kWarpsPerBlock <= 32 && (kBlocks - 1) * kWarpsPerBlock < kWarps,
                  "threads: whole warps, at most 32 a block, no block without a role");
    static_assert(kRowB % 16 == 0 && L <= 32 && kNodes <= 32 && K <= 32, "shapes");
    ErrorCtx err = make_error_ctx(a);
    char* rdma = reinterpret_cast<char*>(a.rdma);
    char* nvl = reinterpret_cast<char*>(a.nvl);
    const int block = blockIdx.x, blocks = gridDim.x;
    const int warp = (int)(blockIdx.x % kBlocks * kWarpsPerBlock + threadIdx.x / 32);   // role
    const int lane = threadIdx.x % 32;
    const int c = block / kBlocks, C = blocks / kBlocks;
    const int me = a.rank, my_node = me / L, my_local = me % L;
    const int T = a.num_tokens, per = (T + C - 1) / C;
    const int tb = min(T, c * per), te = min(T, tb + per);
    const int slots = a.rdma_slots, cap = a.nvl_cap;
    auto rdma_word = [&](char* base, int which, int node) {
        return reinterpret_cast<long long*>(base + a.rdma_ctrl_off) + (which * kNodes + node) * idisp::kMaxC + c;
    };
    auto nvl_word = [&](char* base, int which, int l, int m) {
        return reinterpret_cast<long long*>(base + a.nvl_ctrl_off) +
               (((int64_t)which * idisp::kMaxC + c) * L + l) * kNodes + m;
    };
    auto rdma_recv_ring = [&](int n) { return rdma + a.rdma_ring_off + (int64_t)(n * C + c) * slots * kRec; };
    auto rdma_send_ring = [&](int m) {
        return rdma + a.rdma_ring_off + ((int64_t)kNodes * C + m * C + c) * slots * kRec;
    };
    auto nvl_ring = [&](char* base, int k, int m) {     // on forwarder: from sender k, node m
        return base + a.nvl_ring_off + ((int64_t)(c * L + k) * kNodes + m) * cap * kRec;
    };
    auto peer_nvl = [&](int local) { return reinterpret_cast<char*>(a.nvl_peers[my_node * L + local]); };

    if (warp < R) {
        // ---------------------------------------------------------------- NVLink sender of s
        const int s = warp, m = s / L, j = s % L;
        const int start = a.recv_gbl_channel_prefix[s * C + c];
        const int end = c + 1 < C ? a.recv_gbl_channel_prefix[s * C + c + 1] : a.recv_gbl_rank_prefix_sum[s];
        char* fwd = peer_nvl(j);
        long long* tailp = nvl_word(nvl, kSendTailN, j, m);
        const long long* headp = nvl_word(nvl, kSendHeadN, j, m);
        long long* remote_tail = nvl_word(fwd, kTailN, my_local, m);
        char* ring = nvl_ring(fwd, my_local, m);
        long long tail = ld_volatile(tailp);
        #pragma unroll 1
        for (int row = start; row < end && row < a.num_rows; ++row) {
            int ok = 1;
            if (lane == 0)
                ok = idisp::wait_ring(err, my_node * L + j, me, s, kWaitNvlSpace,
                                      [&] { return ld_acquire_sys(headp) - (tail + 1 - cap) >= 0; });
            if (!__shfl_sync(0xffffffffu, ok, 0)) break;
            char* rec = ring + (tail % cap) * kRec;
            warp_copy<kHV, copy_unroll<kHV>(), true>(reinterpret_cast<int4*>(rec),
                                    reinterpret_cast<const int4*>(a.x + (int64_t)row * kRowB), lane);
            if (K > 0 && lane < K)
                reinterpret_cast<float*>(rec + kOffW)[lane] =
                    a.topk_weights != nullptr ? a.topk_weights[(int64_t)row * K + lane] : 0.0f;
            ++tail;
            __syncwarp();
            if (lane == 0) st_release_sys(remote_tail, tail);
        }
        if (lane == 0) idisp::st_volatile_ll(tailp, tail);
    } else if (warp < R + kNodes) {
        // ---------------------------------------------------------------- forwarder of node m
        const int m = warp - R, owner = m * L + my_local;
        const int64_t prev = c > 0 ? a.recv_rdma_channel_prefix[m * C + c - 1] : 0;
        const int expected = a.recv_rdma_channel_prefix[m * C + c] - (int)prev;
        const int64_t row_base = (m > 0 ? a.recv_rdma_rank_prefix_sum[m - 1] : 0) + prev;
        // Lane k < L: the combine ring from local rank k (consumed count).
        long long nv_head = lane < L ? ld_volatile(nvl_word(nvl, kHeadN, lane, m)) : 0;
        // RDMA side: staging ring m, the owner's ring (my node, c); credit from the owner.
        long long* send_tail = rdma_word(rdma, kSendTail, m);
        const long long* credit = rdma_word(rdma, kHead, m);
        uint64_t* sig = reinterpret_cast<uint64_t*>(rdma_word(rdma, kTail, my_node));
        char* stage = rdma_send_ring(m);
        char* remote = rdma_recv_ring(my_node);
        long long tail = ld_volatile(send_tail), put_from = tail;
        int pending = 0, limit = 0;
        bool dead = false;
        auto flush = [&]() {
            __threadfence_system();
            if (lane == 0) nvshmem_fence();
            __syncwarp();
            const int64_t off = (put_from % slots) * kRec;
            nvshmemx_putmem_signal_nbi_warp(remote + off, stage + off, (size_t)pending * kRec, sig,
                                            (uint64_t)pending, NVSHMEM_SIGNAL_ADD, a.pes[owner]);
            put_from = tail;
            pending = 0;
        };
        #pragma unroll 1
        for (int i = 0; i < expected && !dead; ++i) {
            const int64_t row = row_base + i;
            const int hk = lane < L && row < a.num_rdma_rows ? a.send_nvl_head[row * L + lane] : -1;
            const unsigned bits = __ballot_sync(0xffffffffu, hk >= 0);
            // Every needed row present (lane k waits for ring k).
            int ok = 1;
            if (hk >= 0) {
                const long long* tk = nvl_word(nvl, kTailN, lane, m);
                const long long want = nv_head;
                ok = idisp::wait_ring(err, my_node * L + lane, me, owner, kWaitNvlData,
                                      [&] { return ld_acquire_sys(tk) - want > 0; });
            }
            if (__ballot_sync(0xffffffffu, !ok)) { dead = true; break; }
            __syncwarp();
            if (pending == 0) {
                limit = (int)min((long long)a.rdma_chunk, slots - tail % slots);
                if (lane == 0)
                    ok = idisp::wait_ring(err, owner, me, -1, kWaitRdmaCredit,
                                          [&] { return ld_acquire_sys(credit) - (tail + limit - slots) >= 0; });
                if (!__shfl_sync(0xffffffffu, ok, 0)) { dead = true; break; }
            }
            char* out = stage + (tail % slots) * kRec;
            // 16-byte slices, the whole warp in step (the shuffles need every lane).
            #pragma unroll 1
            for (int v0 = 0; v0 < kHV; v0 += 32) {
                const int v = v0 + lane;
                float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                #pragma unroll 1
                for (int k = 0; k < L; ++k) {
                    if (!((bits >> k) & 1u)) continue;
                    const long long hkk = __shfl_sync(0xffffffffu, nv_head, k);
                    if (v < kHV)
                        add_bf16x8(acc, ld_v4(reinterpret_cast<const int4*>(nvl_ring(nvl, k, m) + (hkk % cap) * kRec) + v));
                }
                if (v < kHV) reinterpret_cast<int4*>(out)[v] = bf16x8(acc);
            }
            if (K > 0) {
                float w = 0.0f;
                #pragma unroll 1
                for (int k = 0; k < L; ++k) {
                    if (!((bits >> k) & 1u)) continue;
                    const long long hkk = __shfl_sync(0xffffffffu, nv_head, k);
                    if (lane < K)
                        w += reinterpret_cast<const volatile float*>(nvl_ring(nvl, k, m) + (hkk % cap) * kRec + kOffW)[lane];
                }
                if (lane < K) reinterpret_cast<float*>(out + kOffW)[lane] = w;
            }
            __syncwarp();
            // Rows consumed: credit each local rank's ring.
            if (hk >= 0) {
                ++nv_head;
                st_release_sys(nvl_word(peer_nvl(lane), kSendHeadN, my_local, m), nv_head);
            }
            ++tail;
            if (++pending == limit) flush();
        }
        if (!dead && pending > 0) flush();
        __syncwarp();
        if (lane < L) idisp::st_volatile_ll(nvl_word(nvl, kHeadN, lane, m), nv_head);
        if (lane == 0) {
            nvshmem_quiet();
            idisp::st_volatile_ll(send_tail, tail);
        }
    } else if (warp < kWarps) {     // (a channel's last block may hold idle warps)
        // ---------------------------------------------------------------- reducer (owner)
        // Lane n < Nn: RDMA ring (n, c) consumed / credited counts.
        long long head = lane < kNodes ? ld_volatile(rdma_word(rdma, kRecvHead, lane)) : 0;
        long long credited = head;
        bool dead = false;
        #pragma unroll 1
        for (int t = tb; t < te && !dead; ++t) {
            const int hn = lane < kNodes ? a.send_rdma_head[(int64_t)t * kNodes + lane] : -1;
            const unsigned bits = __ballot_sync(0xffffffffu, hn >= 0);
            int ok = 1;
            if (hn >= 0) {
                const long long* tn = rdma_word(rdma, kTail, lane);
                const long long want = head;
                ok = idisp::wait_ring(err, lane * L + my_local, me, -1, kWaitRdmaData,
                                      [&] { return ld_acquire_sys(tn) - want > 0; });
            }
            if (__ballot_sync(0xffffffffu, !ok)) { dead = true; break; }
            __syncwarp();
            #pragma unroll 1
            for (int v0 = 0; v0 < kHV; v0 += 32) {
                const int v = v0 + lane;
                float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                if (v < kHV) {
                    if (NB > 0) add_bf16x8(acc, ld_nc_v4(reinterpret_cast<const int4*>(a.bias0 + (int64_t)t * kRowB) + v));
                    if (NB > 1) add_bf16x8(acc, ld_nc_v4(reinterpret_cast<const int4*>(a.bias1 + (int64_t)t * kRowB) + v));
                }
                #pragma unroll 1
                for (int n = 0; n < kNodes; ++n) {
                    if (!((bits >> n) & 1u)) continue;
                    const long long hnn = __shfl_sync(0xffffffffu, head, n);
                    if (v < kHV)
                        add_bf16x8(acc, ld_v4(reinterpret_cast<const int4*>(rdma_recv_ring(n) + (hnn % slots) * kRec) + v));
                }
                if (v < kHV) reinterpret_cast<int4*>(a.combined_x + (int64_t)t * kRowB)[v] = bf16x8(acc);
            }
            if (K > 0 && a.combined_w != nullptr) {
                float w = 0.0f;
                #pragma unroll 1
                for (int n = 0; n < kNodes; ++n) {
                    if (!((bits >> n) & 1u)) continue;
                    const long long hnn = __shfl_sync(0xffffffffu, head, n);
                    if (lane < K)
                        w += reinterpret_cast<const volatile float*>(rdma_recv_ring(n) + (hnn % slots) * kRec + kOffW)[lane];
                }
                if (lane < K) a.combined_w[(int64_t)t * K + lane] = w;
            }
            __syncwarp();
            if (hn >= 0) {
                ++head;
                // Credits in batches of a chunk (the sender needs room for one chunk at a time).
                if (head - credited >= a.rdma_chunk) {
                    nvshmemx_signal_op(reinterpret_cast<uint64_t*>(rdma_word(rdma, kHead, my_node)),
                                       (uint64_t)(head - credited), NVSHMEM_SIGNAL_ADD,
                                       a.pes[lane * L + my_local]);
                    credited = head;
                }
            }
        }
        if (lane < kNodes) {
            if (head > credited)
                nvshmemx_signal_op(reinterpret_cast<uint64_t*>(rdma_word(rdma, kHead, my_node)),
                                   (uint64_t)(head - credited), NVSHMEM_SIGNAL_ADD,
                                   a.pes[lane * L + my_local]);
            idisp::st_volatile_ll(rdma_word(rdma, kRecvHead, lane), head);
            nvshmem_quiet();
        }
    }
    if (last_block_sees_error(reinterpret_cast<int*>(nvl + a.done_off), err)) {   // NaN
        poison_fill(a.combined_x, (int64_t)T * kRowB, kPoisonNaN);
        poison_fill(a.combined_w, (int64_t)T * K * 4, kPoisonNaN);
    }
}

// The generated unit's entry (templates/kernel.cu.j2): the spec struct S by name, epgen/jit/specs.py
// InternodeCombineSpec.constants; the one place its members meet the template's parameter order.
template <class S>
__device__ __forceinline__ void internode_combine_entry(const InternodeCombineArgs& a) {
    internode_combine_kernel<S::hidden, S::num_topk, S::ranks_per_node, S::num_ranks,
                             S::num_biases, S::threads>(a);
}

}  // namespace epgen
