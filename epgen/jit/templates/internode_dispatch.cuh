// The internode normal mode's dispatch (after internode_notify.cuh has exchanged the counts):
// token t of rank (m, j) crosses the network once per destination node n, to rank (n, j) (the
// forwarder), as an NVSHMEM put-with-signal (also where NVLink could reach the peer: virtual
// nodes make the calls RDMA makes); the forwarder copies each record over NVLink (peer
// pointers) to the ranks of node n its source meta names. epgen/reference_internode.py defines
// every output; regions/internode.py the regions' byte layout (the host passes the offsets).
//
// Channel c (the tokens [c * ceil(T/C), ...) of every rank) is kBlocks adjacent blocks of one
// warp per role (role = block-in-channel * warps-per-block + warp; one block where the roles
// fit in THREADS / 32 <= 32 warps, several for larger layouts: EP32 = 40 roles, EP64 = 80):
//   warps [0, Nn)          RDMA sender to node n: records of its channel's tokens that go to
//                          node n -> send staging ring (n, c) -> put-with-signal into ring
//                          (my node, c) of rank (n, j), the signal (tail) adding the chunk's count
//   warps [Nn, 2Nn)        forwarder of source node m: drains RDMA ring (m, c), copies each record
//                          into NVLink ring (c, j = my local rank, m) of every local rank it goes
//                          to, credits the sender (signal_op ADD to its head word)
//   warps [2Nn, 2Nn + R)   receiver of source rank s = (m, j): drains NVLink ring (c, j, m)
//                          into recv_x rows recv_gbl_channel_prefix[s][c] + i
// A channel's blocks need only each other and the same channel's blocks of their peers (never
// a later channel of their own grid), so ranks sharing a GPU need no co-residency of a whole
// grid, only of a channel's kBlocks. Every count a role expects
// comes from the notify's outputs (recv_rdma_channel_prefix, recv_gbl_channel_prefix), so no
// per-call metadata travels with the data. Ring counters are 64-bit, monotonic across calls
// (slot = counter % slots); every ring is empty between calls, and the uncached dispatch's notify
// is a cross-rank barrier, so a call may use another ring layout than the previous one.
// Ordering: RDMA data then signal (NVSHMEM guarantees it for a put-with-signal; the staging
// stores are fenced system-wide first, a NIC reads them; nvshmem_fence orders a channel's
// chunks, so a tail is a prefix of delivered records); NVLink records are weak 16-byte
// stores, __syncwarp, one st.release.sys of the tail; consumers ld.acquire.sys the tail first.
#pragma once
#include "internode_common.cuh"

namespace epgen {


template <int HB, int S, int K, int L, int R>
struct IDispatchCfg {
    static constexpr int kNodes = R / L;
    static constexpr int kWarps = 2 * kNodes + R;
    static constexpr int kOffScales = HB;
    static constexpr int kOffMeta = HB + 4 * S;          // int32 source node, int32 bits of local ranks
    // Source meta (L <= 32), also a recv_src_meta row; an enumerator: no device storage.
    enum : int { kMetaBytes = 2 * sizeof(int) };
    static constexpr int kOffIdx = kOffMeta + kMetaBytes;     // int32 global expert ids
    static constexpr int kOffW = kOffIdx + 4 * K;        // float32 weights
    static constexpr int kRec = (kOffW + 4 * K + 15) / 16 * 16;
    static_assert(HB % 16 == 0, "rows are 16-byte vectors");
    static_assert(L <= 32 && R % L == 0 && L < R, "nodes of at most 32 ranks, more than one node");
};

template <int HB, int S, int K, int L, int R, int THREADS>
__device__ __forceinline__ void internode_dispatch_kernel(const InternodeDispatchArgs& a) {
    using namespace idisp;
    using Cfg = IDispatchCfg<HB, S, K, L, R>;
    constexpr int kNodes = Cfg::kNodes, kRec = Cfg::kRec, kHV = HB / 16, kRV = kRec / 16;
    constexpr int kWarpsPerBlock = THREADS / 32;
    constexpr int kBlocks = (Cfg::kWarps + kWarpsPerBlock - 1) / kWarpsPerBlock;   // per channel
    static_assert(THREADS % 32 == 0 && kWarpsPerBlock <= 32 && (kBlocks - 1) * kWarpsPerBlock < Cfg::kWarps,
                  "threads: whole warps, at most 32 a block, no block without a role");
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
        return reinterpret_cast<long long*>(base + a.rdma_ctrl_off) + (which * kNodes + node) * kMaxC + c;
    };
    auto nvl_word = [&](char* base, int which, int l, int m) {
        return reinterpret_cast<long long*>(base + a.nvl_ctrl_off) +
               (((int64_t)which * kMaxC + c) * L + l) * kNodes + m;
    };
    // RDMA rings [Nn][C][slots] records: receive rings, then the send staging rings.
    auto rdma_recv_ring = [&](int m) { return rdma + a.rdma_ring_off + (int64_t)(m * C + c) * slots * kRec; };
    auto rdma_send_ring = [&](int n) {
        return rdma + a.rdma_ring_off + ((int64_t)kNodes * C + n * C + c) * slots * kRec;
    };
    // NVLink rings of a receiver: [C][L forwarder][Nn source node][cap] records.
    auto nvl_ring = [&](char* base, int j, int m) {
        return base + a.nvl_ring_off + ((int64_t)(c * L + j) * kNodes + m) * cap * kRec;
    };
    auto peer_nvl = [&](int local) {
        return reinterpret_cast<char*>(a.nvl_peers[my_node * L + local]);
    };

    if (warp < kNodes) {
        // ---------------------------------------------------------------- RDMA sender to node n
        const int n = warp, dst = n * L + my_local;
        const int chunk = a.rdma_chunk;
        long long* send_tail = rdma_word(rdma, kRdmaSendTail, n);
        const long long* head = rdma_word(rdma, kRdmaHead, n);
        uint64_t* sig = reinterpret_cast<uint64_t*>(rdma_word(rdma, kRdmaTail, my_node));
        char* stage = rdma_send_ring(n);
        char* remote = rdma_recv_ring(my_node);      // the same offsets on rank dst
        long long tail = ld_volatile(send_tail);
        long long put_from = tail;
        int pending = 0, limit = 0;
        bool dead = false;
        auto flush = [&]() {
            __threadfence_system();                  // staging stores before the put reads them
            // Chunks arrive in order (the forwarder takes the tail as a ready prefix): fence
            // after the previous put to this PE. The signal adds the chunk's record count.
            if (lane == 0) nvshmem_fence();
            __syncwarp();
            const int64_t off = (put_from % slots) * kRec;
            nvshmemx_putmem_signal_nbi_warp(remote + off, stage + off, (size_t)pending * kRec, sig,
                                            (uint64_t)pending, NVSHMEM_SIGNAL_ADD, a.pes[dst]);
            put_from = tail;
            pending = 0;
        };
        #pragma unroll 1
        for (int bt = tb; bt < te && !dead; bt += 32) {
            const int t = bt + lane;
            bool sel = false;
            if (t < te) {
                #pragma unroll 1
                for (int k = 0; k < L; ++k) sel |= a.is_token_in_rank[(int64_t)t * R + n * L + k];
            }
            unsigned mask = __ballot_sync(0xffffffffu, sel);
            #pragma unroll 1
            while (mask) {
                const int tok = bt + __ffs(mask) - 1;
                mask &= mask - 1;
                if (pending == 0) {
                    // Room for a whole chunk that does not wrap (one put), credited by the forwarder.
                    limit = (int)min((long long)chunk, slots - tail % slots);
                    int ok = 1;
                    if (lane == 0)
                        ok = wait_ring(err, dst, me, -1, kWaitRdmaCredit,
                                       [&] { return ld_acquire_sys(head) - (tail + limit - slots) >= 0; });
                    if (!__shfl_sync(0xffffffffu, ok, 0)) { dead = true; break; }
                }
                char* rec = stage + (tail % slots) * kRec;
                warp_copy<kHV, copy_unroll<kHV>(), true>(reinterpret_cast<int4*>(rec),
                                        reinterpret_cast<const int4*>(a.x + (int64_t)tok * HB), lane);
                for (int i = lane; i < S; i += 32)
                    reinterpret_cast<float*>(rec + Cfg::kOffScales)[i] =
                        a.x_scales[(int64_t)tok * a.scale_stride_t + (int64_t)i * a.scale_stride_s];
                const bool in_k = lane < L && a.is_token_in_rank[(int64_t)tok * R + n * L + lane];
                const unsigned bits = __ballot_sync(0xffffffffu, in_k);
                if (lane == 0) {
                    reinterpret_cast<int*>(rec + Cfg::kOffMeta)[0] = my_node;
                    reinterpret_cast<unsigned*>(rec + Cfg::kOffMeta)[1] = bits;
                }
                if (K > 0 && lane < K) {
                    int e = -1;
                    float w = 0.0f;
                    if (a.topk_idx != nullptr) {
                        e = (int)a.topk_idx[(int64_t)tok * K + lane];
                        if (a.topk_weights != nullptr) w = a.topk_weights[(int64_t)tok * K + lane];
                    }
                    reinterpret_cast<int*>(rec + Cfg::kOffIdx)[lane] = e;
                    reinterpret_cast<float*>(rec + Cfg::kOffW)[lane] = w;
                }
                ++tail;
                if (++pending == limit) flush();
            }
        }
        if (!dead && pending > 0) flush();
        __syncwarp();
        if (lane == 0) {
            nvshmem_quiet();
            st_volatile_ll(send_tail, tail);
        }
    } else if (warp < 2 * kNodes) {
        // ---------------------------------------------------------------- forwarder of node m
        const int m = warp - kNodes, src = m * L + my_local;
        const int64_t prev = c > 0 ? a.recv_rdma_channel_prefix[m * C + c - 1] : 0;
        const int expected = a.recv_rdma_channel_prefix[m * C + c] - (int)prev;
        const int64_t row_base = (m > 0 ? a.recv_rdma_rank_prefix_sum[m - 1] : 0) + prev;
        long long* recv_head = rdma_word(rdma, kRdmaRecvHead, m);
        const long long* tailp = rdma_word(rdma, kRdmaTail, m);
        uint64_t* credit = reinterpret_cast<uint64_t*>(rdma_word(rdma, kRdmaHead, my_node));
        const char* ring = rdma_recv_ring(m);
        const long long head = ld_volatile(recv_head);
        // Lane k < L keeps the NVLink ring (c, my_local, m) counter of local rank k.
        long long fwd_tail = lane < L ? ld_volatile(nvl_word(nvl, kFwdTail, lane, m)) : 0;
        const long long fwd_tail0 = fwd_tail;
        int done = 0;
        bool dead = false;
        #pragma unroll 1
        while (done < expected && !dead) {
            const long long avail = warp_wait_records(err, src, me, -1, kWaitRdmaData, tailp,
                                                      head + done, expected - done);
            if (avail < 0) break;
            #pragma unroll 1
            for (int i = 0; i < (int)avail && !dead; ++i) {
                const char* rec = ring + ((head + done + i) % slots) * kRec;
                const unsigned bits = ld_volatile(reinterpret_cast<const int*>(rec + Cfg::kOffMeta) + 1);
                const int64_t row = row_base + done + i;
                if (lane < L && a.send_nvl_head != nullptr && row < a.num_rdma_recv_rows)
                    a.send_nvl_head[row * L + lane] = (bits >> lane) & 1u ? (int)(fwd_tail - fwd_tail0) : -1;
                #pragma unroll 1
                for (int k = 0; k < L; ++k) {
                    if (!((bits >> k) & 1u)) continue;
                    const long long tk = __shfl_sync(0xffffffffu, fwd_tail, k);
                    int ok = 1;
                    if (lane == 0) {
                        const long long* fhead = nvl_word(nvl, kFwdHead, k, m);
                        ok = wait_ring(err, my_node * L + k, me, src, kWaitNvlSpace,
                                       [&] { return ld_acquire_sys(fhead) - (tk + 1 - cap) >= 0; });
                    }
                    if (!__shfl_sync(0xffffffffu, ok, 0)) { dead = true; break; }
                    char* peer = peer_nvl(k);
                    warp_copy<kRV, copy_unroll<kRV>(), false>(reinterpret_cast<int4*>(nvl_ring(peer, my_local, m) + (tk % cap) * kRec),
                                             reinterpret_cast<const int4*>(rec), lane);
                    __syncwarp();
                    if (lane == 0) st_release_sys(nvl_word(peer, kNvlTail, my_local, m), tk + 1);
                    if (lane == k) ++fwd_tail;
                }
            }
            if (dead) break;
            done += (int)avail;
            __syncwarp();
            // Credits add up (order-free: a late signal never lowers the sender's count).
            if (lane == 0)
                nvshmemx_signal_op(credit, (uint64_t)avail, NVSHMEM_SIGNAL_ADD, a.pes[src]);
        }
        __syncwarp();
        if (lane < L) st_volatile_ll(nvl_word(nvl, kFwdTail, lane, m), fwd_tail);
        if (lane == 0) {
            nvshmem_quiet();
            st_volatile_ll(recv_head, head + done);
        }
    } else if (warp < Cfg::kWarps) {     // (a channel's last block may hold idle warps)
        // ---------------------------------------------------------------- receiver of rank s
        const int s = warp - 2 * kNodes, m = s / L, j = s % L;
        const int start = a.recv_gbl_channel_prefix[s * C + c];
        const int end = c + 1 < C ? a.recv_gbl_channel_prefix[s * C + c + 1] : a.recv_gbl_rank_prefix_sum[s];
        const int count = end - start;
        const int forwarder = my_node * L + j;
        long long* headp = nvl_word(nvl, kNvlHead, j, m);
        const long long* tailp = nvl_word(nvl, kNvlTail, j, m);
        long long* credit = nvl_word(peer_nvl(j), kFwdHead, my_local, m);
        const char* ring = nvl_ring(nvl, j, m);
        const long long head = ld_volatile(headp);
        const int El = a.num_local_experts;
        int done = 0;
        #pragma unroll 1
        while (done < count) {
            const long long avail = warp_wait_records(err, forwarder, me, s, kWaitNvlData, tailp,
                                                      head + done, count - done);
            if (avail < 0) break;
            #pragma unroll 1
            for (int i = 0; i < (int)avail; ++i) {
                const char* rec = ring + ((head + done + i) % cap) * kRec;
                const int64_t row = (int64_t)start + done + i;
                if (row >= a.num_recv_rows) continue;
                warp_copy<kHV, copy_unroll<kHV>(), false>(reinterpret_cast<int4*>(a.recv_x + row * HB),
                                         reinterpret_cast<const int4*>(rec), lane);
                for (int q = lane; q < S; q += 32)
                    a.recv_scales[row * S + q] = reinterpret_cast<const volatile float*>(rec + Cfg::kOffScales)[q];
                if (lane < 2 && a.recv_src_meta != nullptr)
                    reinterpret_cast<int*>(a.recv_src_meta + row * Cfg::kMetaBytes)[lane] =
                        reinterpret_cast<const volatile int*>(rec + Cfg::kOffMeta)[lane];
                if (K > 0 && lane < K && a.recv_topk_idx != nullptr) {
                    const int e = reinterpret_cast<const volatile int*>(rec + Cfg::kOffIdx)[lane];
                    const bool local = e >= me * El && e < (me + 1) * El;
                    a.recv_topk_idx[row * K + lane] = local ? (int64_t)(e - me * El) : (int64_t)-1;
                    if (a.recv_topk_weights != nullptr)
                        a.recv_topk_weights[row * K + lane] =
                            local ? reinterpret_cast<const volatile float*>(rec + Cfg::kOffW)[lane] : 0.0f;
                }
            }
            done += (int)avail;
            __syncwarp();
            if (lane == 0) st_release_sys(credit, head + done);
        }
        if (lane == 0) st_volatile_ll(headp, head + done);
    }
    if (a.num_worst_tokens > 0) {
        // Outputs sized by num_worst_tokens: the received counts must fit (else a capacity
        // error, and the receivers above dropped the rows past the end); padding rows get
        // recv_topk_idx -1 and send_nvl_head -1 (DeepEP's), the rest is unspecified.
        const int N = a.recv_gbl_rank_prefix_sum[R - 1];
        const int N_rdma = a.recv_rdma_rank_prefix_sum[kNodes - 1];
        if (block == 0 && threadIdx.x == 0 && max(N, N_rdma) > a.num_worst_tokens)
            report_error(err, kErrCapacity, -1, max(N, N_rdma));
        const int64_t step = (int64_t)blocks * THREADS, first = (int64_t)block * THREADS + threadIdx.x;
        if (K > 0 && a.recv_topk_idx != nullptr)
            for (int64_t i = (int64_t)N * K + first; i < (int64_t)a.num_worst_tokens * K; i += step)
                a.recv_topk_idx[i] = -1;
        if (a.send_nvl_head != nullptr)
            for (int64_t i = (int64_t)N_rdma * L + first; i < (int64_t)a.num_worst_tokens * L; i += step)
                a.send_nvl_head[i] = -1;
    }
    if (last_block_sees_error(reinterpret_cast<int*>(nvl + a.done_off), err)) {   // NaN, -1
        const int64_t rows = a.num_recv_rows;
        poison_fill(a.recv_x, rows * HB, kPoisonNaN);
        poison_fill(a.recv_scales, rows * S * 4, kPoisonNaN);
        poison_fill(a.recv_topk_idx, rows * K * 8, kPoisonNaN);
        poison_fill(a.recv_topk_weights, rows * K * 4, kPoisonNaN);
        poison_fill(a.recv_src_meta, rows * Cfg::kMetaBytes, kPoisonNaN);
        poison_fill(a.send_nvl_head, a.num_rdma_recv_rows * L * 4, kPoisonNaN);
    }
}

// The generated unit's entry (templates/kernel.cu.j2): the spec struct S by name, epgen/jit/specs.py
// InternodeDispatchSpec.constants; the one place its members meet the template's parameter order.
template <class S>
__device__ __forceinline__ void internode_dispatch_entry(const InternodeDispatchArgs& a) {
    internode_dispatch_kernel<S::row_bytes, S::num_scales, S::num_topk, S::ranks_per_node,
                              S::num_ranks, S::threads>(a);
}

}  // namespace epgen
