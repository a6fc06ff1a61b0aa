// The internode normal mode's notify: the counts exchange before an uncached internode dispatch.
// Every rank puts one row to every rank of the group (NVSHMEM put-with-signal, also to peers
// NVLink could reach: the same calls RDMA makes), waits for every row of this call (the signal
// carries the call's sequence; rows and signals are double-buffered by its parity), and derives
// the receive side of the internode handle (epgen/reference_internode.py defines each value):
// recv_gbl_rank_prefix_sum, recv_gbl_channel_prefix_matrix, recv_rdma_rank_prefix_sum,
// recv_rdma_channel_prefix_matrix, and for the host N, N_rdma and the aligned per-expert counts.
// Area at offset 0 of the RDMA region (regions/internode.py notify_* mirrors these offsets).
#pragma once
#include "common.cuh"
#include "nvshmem_prelude.cuh"

namespace epgen {

namespace inotify {
// The host's values (epgen::facts, layout_facts.py); what is derived here the notify's unit
// static_asserts against layout_facts' functions (stage_off, area_bytes).
constexpr int kMaxC = facts::kInodeNotifyMaxChannels;   // channels (num_sms / 2) a row has room for
template <int El> constexpr int row_ints() { return (2 + El + 2 * kMaxC + 3) / 4 * 4; }
constexpr uint64_t kSeqOff = facts::kInodeNotifySeqOff;   // int64: this rank's last call sequence
constexpr uint64_t kSigOff = facts::kInodeNotifySigOff;   // uint64 [2][R]: row of source s arrived
template <int R> constexpr uint64_t stage_off() { return (kSigOff + 16ull * R + 255) / 256 * 256; }
template <int R, int El> constexpr uint64_t table_off() {
    return stage_off<R>() + 2ull * R * row_ints<El>() * 4;     // staging [2][R dst][row]
}
template <int R, int El> constexpr uint64_t area_bytes() {
    return (table_off<R, El>() + 2ull * R * row_ints<El>() * 4 + 4095) / 4096 * 4096;
}
}  // namespace inotify

template <int R, int L, int El, int THREADS>
__device__ __forceinline__ void internode_notify_kernel(const InternodeNotifyArgs& a) {
    using namespace inotify;
    static_assert(R % L == 0 && L < R, "nodes of L ranks");
    static_assert(R <= THREADS && THREADS % 32 == 0, "a thread per source rank");
    constexpr int kNodes = R / L, kRow = row_ints<El>();
    ErrorCtx err = make_error_ctx(a);
    char* base = reinterpret_cast<char*>(a.rdma);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int me = a.rank, my_local = me % L, C = a.num_channels;
    // 64-bit: it never wraps, so its parity alternates for the life of the process (an int32
    // one went from INT_MAX, odd, to 1, odd: two calls in a row on the same half)
    __shared__ long long s_seq;
    __shared__ int s_ok;
    __shared__ int s_start[R];
    if (tid == 0) {
        s_seq = ld_volatile(reinterpret_cast<const long long*>(base + kSeqOff)) + 1;
        s_ok = 1;
    }
    __syncthreads();
    const long long seq = s_seq;
    const int par = (int)(seq & 1);
    auto stage = [&](int dst) {
        return reinterpret_cast<int*>(base + stage_off<R>()) + (par * R + dst) * kRow;
    };
    auto table = [&](int src) {
        return reinterpret_cast<int*>(base + table_off<R, El>()) + (par * R + src) * kRow;
    };
    auto sig = [&](int src) {
        return reinterpret_cast<uint64_t*>(base + kSigOff) + par * R + src;
    };
    // 1. This rank's row for each destination p.
    for (int i = tid; i < R * kRow; i += THREADS) {
        const int p = i / kRow, f = i % kRow, node = p / L;
        int v = 0;
        if (f == 0) v = a.num_tokens_per_rank[p];
        else if (f == 1) v = a.num_tokens_per_rdma_rank[node];
        else if (f < 2 + El) v = a.num_tokens_per_expert[p * El + (f - 2)];
        else if (f < 2 + El + C) v = a.gbl_prefix[p * C + (f - 2 - El)];
        else if (f >= 2 + El + kMaxC && f < 2 + El + kMaxC + C)
            v = a.rdma_prefix[node * C + (f - 2 - El - kMaxC)];
        stage(p)[f] = v;
    }
    __threadfence();
    __syncthreads();
    // 2. One put-with-signal per destination; the signal lands after the row.
    for (int p = warp; p < R; p += THREADS / 32)
        nvshmemx_putmem_signal_nbi_warp(table(me), stage(p), (size_t)kRow * 4, sig(me),
                                        (uint64_t)seq, NVSHMEM_SIGNAL_SET, a.pes[p]);
    __syncwarp();
    // 3. Every source's row of this call.
    if (tid < R) {
        const long long* w = reinterpret_cast<const long long*>(sig(tid));
        if (!wait_until(err, tid, 1, [&] { return ld_acquire_sys(w) == seq; }))
            s_ok = 0;
    }
    __syncthreads();
    fence_acq_rel_sys();
    if (s_ok) {
        auto field = [&](int src, int f) { return ld_volatile(table(src) + f); };
        if (tid == 0) {
            int acc = 0;
            for (int s = 0; s < R; ++s) {
                s_start[s] = acc;
                acc += field(s, 0);
                a.recv_gbl_rank_prefix_sum[s] = acc;
            }
            int rdma = 0;
            for (int m = 0; m < kNodes; ++m) {
                rdma += field(m * L + my_local, 1);
                a.recv_rdma_rank_prefix_sum[m] = rdma;
            }
            if (a.host_counts != nullptr) {
                reinterpret_cast<volatile int*>(a.host_counts)[0] = acc;
                reinterpret_cast<volatile int*>(a.host_counts)[1] = rdma;
                __threadfence_system();
            }
        }
        __syncthreads();
        for (int i = tid; i < R * C; i += THREADS) {
            const int s = i / C, c = i % C;
            a.recv_gbl_channel_prefix[i] = s_start[s] + (c > 0 ? field(s, 2 + El + c - 1) : 0);
        }
        for (int i = tid; i < kNodes * C; i += THREADS) {
            const int m = i / C, c = i % C;
            a.recv_rdma_channel_prefix[i] = field(m * L + my_local, 2 + El + kMaxC + c);
        }
        if (a.host_counts != nullptr) {
            for (int e = tid; e < El; e += THREADS) {
                int acc = 0;
                for (int s = 0; s < R; ++s) acc += field(s, 2 + e);
                const int al = a.expert_alignment;
                reinterpret_cast<volatile int*>(a.host_counts)[2 + e] = (acc + al - 1) / al * al;
            }
            __threadfence_system();
        }
    } else {
        // A peer missed the deadline (the error word names it): nothing here looks valid.
        for (int i = tid; i < R * C; i += THREADS) a.recv_gbl_channel_prefix[i] = -1;
        for (int i = tid; i < kNodes * C; i += THREADS) a.recv_rdma_channel_prefix[i] = -1;
        for (int i = tid; i < R; i += THREADS) a.recv_gbl_rank_prefix_sum[i] = -1;
        for (int i = tid; i < kNodes; i += THREADS) a.recv_rdma_rank_prefix_sum[i] = -1;
    }
    __syncthreads();
    if (tid == 0) *reinterpret_cast<volatile long long*>(base + kSeqOff) = seq;
}


// The generated unit's entry (templates/kernel.cu.j2): the spec struct S by name, epgen/jit/specs.py
// InternodeNotifySpec.constants; this is the one place its members meet the template's parameter order.
template <class S>
__device__ __forceinline__ void internode_notify_entry(const InternodeNotifyArgs& a) {
    internode_notify_kernel<S::num_ranks, S::ranks_per_node, S::experts_per_rank, S::threads>(a);
}

}  // namespace epgen
