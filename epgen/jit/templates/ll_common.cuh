// Shared pieces of the low-latency kernels (ll_dispatch.cuh, ll_combine.cuh).
//
// Signals are 64-bit words (epoch tag << 16) | value written into the receiver's symmetric region:
// a receiver waits until the tag equals its own epoch, so stale words from earlier calls never
// match and nothing has to be cleaned. Epochs come from a device-side 64-bit sequence word per
// op (graph replays advance it on the device); a signal carries the epoch's low 48 bits, a
// message header all 64, so no stale word matches for the life of a process (2^48 calls). The send phase's blocks finish with a
// "last block signals" step: each block orders its peer writes (system fence; nvshmem_quiet
// for proxy puts), bumps a local done counter, and the block that arrives last publishes the
// signals with release stores (NVLink) or nvshmemx_signal_op (peers without P2P).
#pragma once
#include "common.cuh"
#include "nvshmem_prelude.cuh"

namespace epgen {
namespace ll {

// The host's values (epgen/jit/layout_facts.py, rendered before this header as epgen::facts).
// Dispatch signals: [2 halves][kMaxSig] u64; index (local expert * R + source rank).
constexpr int kMaxSig = facts::kLLMaxSig;
// Per-rank words (combine signals, shrink verdicts): [2 halves][kMaxRankSig] u64.
constexpr int kMaxRankSig = facts::kLLMaxRankSig;
// Enumerators (no device storage): num_max_dispatch_tokens_per_rank, top-k entries, and a
// dispatch message header's fixed part (then its entries).
enum : int { kMaxTokens = facts::kLLMaxTokens, kMaxTopk = facts::kMaxTopk,
             kHeaderFixed = facts::kLLHeaderFixed };
// Phase bits of a launch (args.phases): send, receive, or both in one launch.
enum : int { kSend = facts::kLLSend, kRecv = facts::kLLRecv };

__host__ __device__ constexpr int align16(int v) { return (v + 15) / 16 * 16; }

// A kernel entry's phases (args.phases): both in one launch where the grid is resident
// (ops/low_latency.py fuse_phases), the receive taking this call's epoch from its own send; a
// receive launched on its own reads the epoch its send stored in call_epoch. Op: LLDispatch,
// LLCombine, LLCombineRank (send(a, err) -> epoch, recv(a, err, epoch)).
template <class Op, class Args>
__device__ __forceinline__ void run_phases(const Args& a, const ErrorCtx& err) {
    unsigned long long epoch = 0;
    if (a.phases & kSend) epoch = Op::send(a, err);
    else epoch = (unsigned long long)ld_volatile(reinterpret_cast<const long long*>(a.call_epoch));
    if (a.phases & kRecv) Op::recv(a, err, epoch);
}

__device__ __forceinline__ bool masked(const int* mask, int r) {
    return mask != nullptr && ld_volatile(mask + r) != 0;
}

// Epoch tags in signal and verdict words: the epoch's low 48 bits above a 16-bit value.
constexpr int kTagShift = 16;
constexpr unsigned long long kTagMask = (1ull << 48) - 1ull;
constexpr unsigned long long kValueMask = (1ull << kTagShift) - 1ull;
__device__ __forceinline__ unsigned long long tag_word(unsigned long long epoch, unsigned v) {
    return ((epoch & kTagMask) << kTagShift) | ((unsigned long long)v & kValueMask);
}
__device__ __forceinline__ bool tag_matches(unsigned long long word, unsigned long long epoch) {
    return (word >> kTagShift) == (epoch & kTagMask);
}

// The epoch after sequence value *seq. The half a call uses is its parity, so consecutive
// calls alternate halves; a tag of 0 (what a zeroed, never written word holds) is skipped by
// 2, which keeps the alternation.
__device__ __forceinline__ unsigned long long next_epoch(const unsigned long long* seq) {
    unsigned long long e = (unsigned long long)ld_volatile(reinterpret_cast<const long long*>(seq)) + 1ull;
    if ((e & kTagMask) == 0ull) e += 2ull;
    return e;
}

// Publish one signal word at byte offset `off` of rank dst's region.
__device__ __forceinline__ void put_signal(char* base, const int64_t* peer_bases, const int* pes,
                                           int dst, uint64_t off, unsigned long long value) {
    const int64_t pb = peer_bases[dst];
    if (pb != 0) {
        st_release_sys(reinterpret_cast<long long*>(pb + off), (long long)value);
    } else {
        nvshmemx_signal_op(reinterpret_cast<uint64_t*>(base + off), value, NVSHMEM_SIGNAL_SET,
                           pes[dst]);
    }
}

// Wait for the signal at local byte offset `off` to carry `epoch`: true, with its value field
// in *value, once it does. False when another thread raised an error, when the peer is
// masked out meanwhile, or when the deadline passed: an error naming the peer without a mask;
// with a mask (enable_shrink) the caller's peer_verdict decides instead.
__device__ __forceinline__ bool wait_signal(const ErrorCtx& err, const char* base, uint64_t off,
                                            unsigned long long epoch, int peer, int detail,
                                            const int* mask, int* value) {
    const long long* sig = reinterpret_cast<const long long*>(base + off);
    long long v = 0;
    bool arrived = false;
    wait_until(err, peer, detail, [&] {
        v = ld_acquire_sys(sig);
        arrived = tag_matches((unsigned long long)v, epoch);
        return arrived || masked(mask, peer);
    }, mask == nullptr);
    *value = arrived ? (int)((unsigned long long)v & kValueMask) : 0;
    return arrived;
}

// enable_shrink (DeepEP's fault-tolerant EP): whether `peer` takes part in this receive. Blocks
// wait on their own clocks, so a late peer could arrive for one block and miss another's
// deadline; the blocks agree through one verdict word per (half, peer), tagged with the epoch:
// the first block to decide wins, and a peer found out is masked for later calls too.
// Verdict words: u64 [2 halves][kMaxRankSig], tag_word(epoch, 1 = in, 2 = out).
__device__ __forceinline__ bool peer_verdict(unsigned long long* verdicts, int* mask,
                                             unsigned long long epoch, int peer, bool arrived) {
    fence_acq_rel_sys();   // what this block saw arrive is visible to whoever reads our verdict
    const unsigned long long mine = tag_word(epoch, arrived ? 1u : 2u);
    unsigned long long cur = *reinterpret_cast<volatile unsigned long long*>(verdicts + peer);
    while (!tag_matches(cur, epoch)) {
        const unsigned long long prev = atomicCAS(verdicts + peer, cur, mine);
        if (prev == cur) { cur = mine; break; }
        cur = prev;
    }
    fence_acq_rel_sys();   // and what the deciding block saw is visible to this one
    const bool in = (cur & 3ull) == 1ull;
    if (!in && ld_volatile(mask + peer) == 0) atomicExch(mask + peer, 1);
    return in;
}

// End of a send phase, called by every thread of every block. Returns true in the block
// that arrived last (all other blocks' peer writes are then ordered before its stores).
__device__ __forceinline__ bool last_block_arrives(int* done, bool any_remote) {
    __shared__ int s_last;
    __threadfence_system();
    if (any_remote) nvshmem_quiet();
    __syncthreads();
    if (threadIdx.x == 0) {
        fence_acq_rel_sys();
        const int old = atomicAdd(done, 1);
        s_last = (old == (int)gridDim.x - 1);
    }
    __syncthreads();
    const bool last = s_last != 0;
    if (last) fence_acq_rel_sys();
    return last;
}

// Global warp index for work split into units: consecutive units go to different blocks
// (SMs) first, so a few hundred units use every SM instead of the first few blocks' warps.
__device__ __forceinline__ int spread_warp_index() {
    return (int)(threadIdx.x >> 5) * (int)gridDim.x + (int)blockIdx.x;
}

// Inclusive prefix sums of cnt[0, n) into cum[0, n), n <= THREADS (both in shared memory).
// Lets warps walk the valid (chunk, row) pairs as one dense range: striding over all E * M
// slots instead would hand every valid row to the same few warps.
template <int THREADS>
__device__ __forceinline__ void block_inclusive_scan(const int* cnt, int* cum, int n) {
    static_assert(THREADS % 32 == 0 && THREADS <= 1024, "block size");
    __shared__ int s_warp[THREADS / 32];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int v = tid < n ? cnt[tid] : 0;
    #pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += t;
    }
    if (lane == 31) s_warp[warp] = v;
    __syncthreads();
    if (warp == 0) {
        int w = lane < THREADS / 32 ? s_warp[lane] : 0;
        #pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int t = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += t;
        }
        if (lane < THREADS / 32) s_warp[lane] = w;
    }
    __syncthreads();
    if (tid < n) cum[tid] = v + (warp > 0 ? s_warp[warp - 1] : 0);
    __syncthreads();
}

// The chunk p holding dense row m: the first p with cum[p] > m (cum inclusive, ascending).
__device__ __forceinline__ int locate(const int* cum, int n, int m) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (cum[mid] > m) hi = mid; else lo = mid + 1;
    }
    return lo;
}

// -- Where a (token, top-k slot) row lives --------------------------------------------------
// The dispatch puts token t's row for expert e = topk[t][k] at place ord(t, k) of its (expert,
// source) chunk: the number of entries (t', k') before (t, k) in (token, slot) order that name
// e. A chunk then holds its tokens ascending (the golden model's placement), and the owner can
// tell from its topk_idx alone where each of its rows went, so the combine needs no per-row
// record and its receive half is [R][M * min(K, El)] rows, not [E][M]
// (layout_facts.ll_combine_recv_rows): expert rank r's rows for an owner at
// r * M * min(K, El) + (rows of its local experts before e from that owner) + ord(t, k).

// This block's tokens [*t0, *t1): a contiguous share (the ord of its entries follows from the
// counts before t0 and a walk over its own tokens in order).
__device__ __forceinline__ void block_tokens(int num_tokens, int* t0, int* t1) {
    *t0 = (int)((int64_t)blockIdx.x * num_tokens / gridDim.x);
    *t1 = (int)((int64_t)(blockIdx.x + 1) * num_tokens / gridDim.x);
}

// Per expert (shared memory, zeroed here): before[e] = entries naming e in topk[0, before_n),
// all[e] (if not null) = those in topk[0, all_n). Invalid entries (-1, out of range) name none.
template <int THREADS, int E>
__device__ __forceinline__ void count_entries(const int64_t* topk, int before_n, int all_n,
                                              int* before, int* all) {
    for (int e = threadIdx.x; e < E; e += THREADS) {
        before[e] = 0;
        if (all != nullptr) all[e] = 0;
    }
    __syncthreads();
    const int n = all != nullptr ? all_n : before_n;
    for (int j = threadIdx.x; j < n; j += THREADS) {
        const int64_t e = topk[j];
        if (e < 0 || e >= E) continue;
        if (j < before_n) atomicAdd(before + e, 1);
        if (all != nullptr) atomicAdd(all + e, 1);
    }
    __syncthreads();
}

// Warp 0, lanes < K: the place of this lane's entry e (valid or -1) among e's entries, given
// run[e] = e's entries before this token; run[] then counts this token's too. Lanes naming
// the same expert (a repeated expert) take consecutive places in slot order.
__device__ __forceinline__ int entry_place(int e, int* run) {
    const int lane = threadIdx.x & 31;
    const unsigned same = __match_any_sync(0xffffffffu, e >= 0 ? e : -1 - lane);
    int place = -1;
    if (e >= 0) place = run[e] + __popc(same & ((1u << lane) - 1u));
    __syncwarp();
    if (e >= 0 && 31 - __clz(same) == lane) run[e] += __popc(same);   // the group's last lane
    __syncwarp();
    return place;
}

}  // namespace ll
}  // namespace epgen
