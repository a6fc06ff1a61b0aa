// Low-latency barrier with deadlines: clean_low_latency_buffer's (DeepEP V1), and destroy()'s
// with enable_shrink. One block; thread p < R handles peer p: it stores (epoch << 32) | 1 into
// peer p's slot for this rank (NVLink store, or nvshmemx_signal_op where there is no P2P), then
// waits for peer p's word in this rank's slot p. Epochs come from a device-side sequence word
// and pick one of two halves, so a fast peer already in the next barrier never overwrites the
// word a slow one still waits for, and stale words never match.
// Without a mask a peer missing the deadline is an error naming it (DeepEP: a full barrier);
// with one (enable_shrink) it is masked out locally, and masked peers are neither signalled nor
// waited for.
#pragma once
#include "ll_common.cuh"

namespace epgen {

template <int R, int THREADS>
__device__ __forceinline__ void ll_barrier_kernel(const LowLatencyBarrierArgs& a) {
    static_assert(R >= 2 && R <= ll::kMaxRankSig && R <= THREADS, "ranks");
    const ErrorCtx err = make_error_ctx(a);
    __shared__ unsigned long long s_epoch;
    const int p = threadIdx.x;
    char* base = reinterpret_cast<char*>(a.rdma_base);
    if (p == 0) s_epoch = ll::next_epoch(a.seq);
    // this rank's earlier writes to peers (stores and NVSHMEM puts) land before its signal
    __threadfence_system();
    if (a.any_remote) nvshmem_quiet();
    __syncthreads();
    const unsigned long long epoch = s_epoch;
    const uint64_t half = epoch & 1u;
    const bool peer = p < R && p != a.rank && !ll::masked(a.mask, p);
    if (peer) {
        const unsigned long long v = ll::tag_word(epoch, 1u);
        ll::put_signal(base, a.peer_bases, a.pes, p,
                       a.sig_off + (half * ll::kMaxRankSig + a.rank) * 8, v);
        int value = 0;
        const bool arrived = ll::wait_signal(err, base, a.sig_off + (half * ll::kMaxRankSig + p) * 8,
                                             epoch, p, 0, a.mask, &value);
        if (!arrived && a.mask != nullptr && !error_raised(err)) atomicExch(a.mask + p, 1);
    }
    __syncthreads();
    if (p == 0) *a.seq = epoch;
}


// The generated unit's entry (templates/kernel.cu.j2): the spec struct S by name, epgen/jit/specs.py
// LowLatencyBarrierSpec.constants; this is the one place its members meet the template's parameter order.
template <class S>
__device__ __forceinline__ void ll_barrier_entry(const LowLatencyBarrierArgs& a) {
    ll_barrier_kernel<S::num_ranks, S::threads>(a);
}

}  // namespace epgen
