// The normal-mode notify helper: the counts exchange before an uncached dispatch (every rank
// writes its row into every peer's table, waits for all rows, builds the full rank prefix
// matrix and the received counts), and in barrier-only mode a cross-rank barrier (dispatch and
// combine use it when a direction's ring layout changes between calls).
#pragma once
#include "normal_ctrl.cuh"

namespace epgen {

// ---------------------------------------------------------------------------------- notify
template <int R, int El, int THREADS>
__device__ __forceinline__ void notify_kernel(const NotifyArgs& a) {
    using namespace nctrl;
    ErrorCtx err = make_error_ctx(a);
    __shared__ long long s_peer[R];
    __shared__ int s_seq, s_ok;
    char* own = reinterpret_cast<char*>(a.nvl);
    const int tid = threadIdx.x, me = a.rank;
    if (tid < R) s_peer[tid] = (long long)a.peers[tid];
    if (tid == 0) { s_seq = next_seq(ld_volatile(word(own, kNotifySeq))); s_ok = 1; }
    __syncthreads();
    const int seq = s_seq, par = seq & 1;
    constexpr int kFields = 1 + R + El;   // T, per-rank counts, my counts for the peer's experts
    if (!a.barrier_only) {
        #pragma unroll 1
        for (int p = 0; p < R; ++p) {
            int* row = word(reinterpret_cast<char*>(s_peer[p]), kNotifyTable, (par * kMaxR + me) * kRowInts);
            for (int i = tid; i < kFields; i += THREADS) {
                int v;
                if (i == 0) v = a.num_tokens;
                else if (i < 1 + R) v = a.num_tokens_per_rank[i - 1];
                else v = a.num_tokens_per_expert ? a.num_tokens_per_expert[p * El + (i - 1 - R)] : 0;
                row[1 + i] = v;
            }
        }
    }
    __threadfence_system();
    __syncthreads();
    if (tid < R) {
        int* flag = word(reinterpret_cast<char*>(s_peer[tid]), kNotifyTable, (par * kMaxR + me) * kRowInts);
        st_release_sys(flag, seq);
        const int* mine = word(own, kNotifyTable, (par * kMaxR + tid) * kRowInts);
        if (!wait_until(err, tid, 1, [&] { return ld_acquire_sys(mine) == seq; })) s_ok = 0;
    }
    __syncthreads();
    fence_acq_rel_sys();
    if (s_ok && !a.barrier_only) {
        auto field = [&](int src, int i) {
            return ld_volatile(word(own, kNotifyTable, (par * kMaxR + src) * kRowInts + 1 + i));
        };
        if (tid < R) {
            int acc = 0;
            #pragma unroll
            for (int i = 0; i < R; ++i) {
                acc += field(i, 1 + tid);
                a.rank_prefix[i * R + tid] = acc;
            }
            a.num_tokens_all[tid] = field(tid, 0);
        }
        if (a.host_counts != nullptr) {
            for (int e = tid; e < El; e += THREADS) {
                int acc = 0;
                #pragma unroll
                for (int s = 0; s < R; ++s) acc += field(s, 1 + R + e);
                const int al = a.expert_alignment;
                acc = (acc + al - 1) / al * al;
                reinterpret_cast<volatile int*>(a.host_counts)[1 + e] = acc;
            }
            if (tid == 0) {
                int n = 0;
                #pragma unroll
                for (int s = 0; s < R; ++s) n += field(s, 1 + me);
                reinterpret_cast<volatile int*>(a.host_counts)[0] = n;
            }
            __threadfence_system();
        }
    }
    __syncthreads();
    if (tid == 0) st_volatile(word(own, kNotifySeq), seq);
}


// The generated unit's entry (templates/kernel.cu.j2): the spec struct S by name, epgen/jit/specs.py
// NormalDispatchSpec / NormalCombineSpec.constants; this is the one place its members meet the template's parameter order.
template <class S>
__device__ __forceinline__ void normal_notify_entry(const NotifyArgs& a) {
    notify_kernel<S::num_ranks, S::notify_local_experts, S::notify_threads>(a);
}

}  // namespace epgen
