// get_dispatch_layout in one pass: a thread owns a token, builds its rank mask from the K
// indices, writes its is_token_in_rank row, and adds to shared-memory histograms that each
// block flushes with one atomic per expert / rank (outputs are zeroed by the host).
#pragma once
#include "common.cuh"

namespace epgen {

// L > 0: the ranks form R / L nodes of L ranks (rank r on node r / L), and the kernel also
// counts each token once per node it touches (num_tokens_per_rdma_rank); L == 0 is one node.
template <int R, int E, int K, int THREADS, int L = 0, typename Args>
__device__ __forceinline__ void layout_kernel(const Args& a) {
    static_assert(R <= 64, "rank mask is one 64-bit word");
    static_assert(L == 0 || (L > 0 && L < R && R % L == 0), "L must divide R");
    constexpr int kLocalExperts = E / R;
    constexpr int kNodes = L > 0 ? R / L : 0;
    __shared__ int s_expert[E];
    __shared__ int s_rank[R + kNodes];      // [R, R + kNodes): per-node counts
    for (int i = threadIdx.x; i < E; i += THREADS) s_expert[i] = 0;
    for (int i = threadIdx.x; i < R + kNodes; i += THREADS) s_rank[i] = 0;
    __syncthreads();

    ErrorCtx err = make_error_ctx(a);
    for (int t = blockIdx.x * THREADS + threadIdx.x; t < a.num_tokens; t += gridDim.x * THREADS) {
        unsigned long long mask = 0;
        const int64_t* row = a.topk_idx + (int64_t)t * K;
        #pragma unroll
        for (int k = 0; k < K; ++k) {
            int64_t e = row[k];
            if (e < 0) {
                if (e != -1) report_error(err, kErrBadIndex, -1, t);
                continue;
            }
            if (e >= E) { report_error(err, kErrBadIndex, -1, t); continue; }
            atomicAdd(&s_expert[(int)e], 1);
            mask |= 1ull << ((int)e / kLocalExperts);
        }
        bool* out = a.is_token_in_rank + (int64_t)t * R;
        #pragma unroll
        for (int r = 0; r < R; ++r) {
            bool in = (mask >> r) & 1ull;
            out[r] = in;
            if (in) atomicAdd(&s_rank[r], 1);
        }
        if constexpr (kNodes > 0) {
            constexpr unsigned long long kNodeBits = L >= 64 ? ~0ull : (1ull << L) - 1;
            #pragma unroll
            for (int n = 0; n < kNodes; ++n)
                if ((mask >> (n * L)) & kNodeBits) atomicAdd(&s_rank[R + n], 1);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < E; i += THREADS)
        if (s_expert[i]) atomicAdd(a.num_tokens_per_expert + i, s_expert[i]);
    for (int i = threadIdx.x; i < R; i += THREADS)
        if (s_rank[i]) atomicAdd(a.num_tokens_per_rank + i, s_rank[i]);
    if constexpr (kNodes > 0) {
        for (int i = threadIdx.x; i < kNodes; i += THREADS)
            if (s_rank[R + i]) atomicAdd(a.num_tokens_per_rdma_rank + i, s_rank[R + i]);
    }
}


// The generated unit's entry (templates/kernel.cu.j2): the spec struct S by name, epgen/jit/specs.py
// LayoutSpec.constants; this is the one place its members meet the template's parameter order.
template <class S, typename Args>
__device__ __forceinline__ void layout_entry(const Args& a) {
    layout_kernel<S::num_ranks, S::num_experts, S::num_topk, S::threads, S::ranks_per_node>(a);
}

}  // namespace epgen
