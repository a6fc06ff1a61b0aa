// Shared device helpers: memory-ordering primitives, 16-byte copies, deadlines, the error word.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda/std/cstdint>

namespace epgen {

using ::cuda::std::int64_t;
using ::cuda::std::uint64_t;
using ::cuda::std::int32_t;
using ::cuda::std::uint32_t;

// ---- error word (mapped pinned host memory, see epgen/runtime/errors.py) ----------------
// word[kErrFieldCode] code (0: none; first error wins), then op, rank, peer, detail.
enum ErrorCode : int { kErrNone = 0, kErrTimeout = 1, kErrBadIndex = 2, kErrCapacity = 3,
                       kErrBadArg = 4 };
enum ErrorField : int { kErrFieldCode = 0, kErrFieldOp = 1, kErrFieldRank = 2, kErrFieldPeer = 3,
                        kErrFieldDetail = 4 };

struct ErrorCtx {
    int* word;
    int* flag;                 // device memory: set by every report (read cheaply on the GPU)
    unsigned long long deadline;
    int rank;
    int op;
};

template <typename Args>
__device__ __forceinline__ ErrorCtx make_error_ctx(const Args& a) {
    unsigned long long now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    return ErrorCtx{a.error_word, a.error_flag, now + a.timeout_ns, a.rank, a.op};
}

__device__ __forceinline__ unsigned long long globaltimer() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ void report_error(const ErrorCtx& e, int code, int peer, int detail) {
    if (e.flag != nullptr) atomicExch(e.flag, 1);
    if (atomicCAS_system(e.word + kErrFieldCode, 0, code) == 0) {
        volatile int* w = e.word;
        w[kErrFieldOp] = e.op; w[kErrFieldRank] = e.rank; w[kErrFieldPeer] = peer;
        w[kErrFieldDetail] = detail;
        __threadfence_system();
    }
}

__device__ __forceinline__ bool error_raised(const ErrorCtx& e) {
    return reinterpret_cast<volatile int*>(e.word)[kErrFieldCode] != 0;
}

// ---- memory ordering across GPUs (scope must be .sys for peers' writes) -----------------
__device__ __forceinline__ int ld_acquire_sys(const int* p) {
    int v; asm volatile("ld.acquire.sys.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ long long ld_acquire_sys(const long long* p) {
    long long v; asm volatile("ld.acquire.sys.global.s64 %0, [%1];" : "=l"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ void st_release_sys(int* p, int v) {
    asm volatile("st.release.sys.global.s32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void st_release_sys(long long* p, long long v) {
    asm volatile("st.release.sys.global.s64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ int ld_volatile(const int* p) {
    int v; asm volatile("ld.volatile.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ long long ld_volatile(const long long* p) {
    long long v; asm volatile("ld.volatile.global.s64 %0, [%1];" : "=l"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ int atomic_add_release_sys(int* p, int v) {
    int old; asm volatile("atom.add.release.sys.global.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
    return old;
}
__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

// Spin until pred() holds; false when the deadline passed or another thread raised an error
// (then the error word says which). Checks the clock and the word every 256 polls only.
// report_timeout=false leaves a missed deadline to the caller (enable_shrink masks the peer).
template <typename Pred>
__device__ __forceinline__ bool wait_until(const ErrorCtx& e, int peer, int detail, Pred pred,
                                           bool report_timeout = true) {
    unsigned iter = 0;
    while (!pred()) {
        if ((++iter & 255u) == 0) {
            if (error_raised(e)) return false;
            if (globaltimer() > e.deadline) {
                if (report_timeout) report_error(e, kErrTimeout, peer, detail);
                return false;
            }
        }
    }
    return true;
}

// ---- no silent garbage (design.md, Errors) ----------------------------------------------
// Called by every thread of every block at the end of a kernel, after the block's output
// writes. True in the block that arrives last when an error was reported (by this call or an
// earlier one): that block then poisons all of the call's outputs, so a call whose wait hit
// its deadline hands back nothing that looks valid. `done` is a counter no other kernel uses
// meanwhile; it is left at 0.
__device__ __forceinline__ bool last_block_sees_error(int* done, const ErrorCtx& e) {
    __shared__ int s_poison;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();       // this block's outputs and reports before its arrival
        int poison = 0;
        if (atomicAdd(done, 1) == (int)gridDim.x - 1) {
            atomicExch(done, 0);
            __threadfence();   // every block's outputs and reports before the check
            poison = e.flag != nullptr && *reinterpret_cast<volatile int*>(e.flag) != 0;
        }
        s_poison = poison;
    }
    __syncthreads();
    return s_poison != 0;
}

// Poison byte patterns: 0xff is NaN in bf16, fp32 and e4m3 and -1 in every integer width.
constexpr unsigned char kPoisonNaN = 0xff;
constexpr unsigned char kPoisonZero = 0;

// Fill n bytes at p (16-byte aligned, or null) with byte v, by the threads of one block.
__device__ __forceinline__ void poison_fill(void* p, int64_t n, unsigned char v) {
    if (p == nullptr || n <= 0) return;
    const int w = (int)((unsigned)v * 0x01010101u);
    const int4 q = make_int4(w, w, w, w);
    int4* p16 = reinterpret_cast<int4*>(p);
    const int64_t n16 = n / 16;
    for (int64_t i = threadIdx.x; i < n16; i += blockDim.x) p16[i] = q;
    for (int64_t i = n16 * 16 + threadIdx.x; i < n; i += blockDim.x)
        reinterpret_cast<unsigned char*>(p)[i] = v;
}

// ---- 16-byte copies ---------------------------------------------------------------------
// Read-only input (never written during the kernel): the non-coherent path is legal.
__device__ __forceinline__ int4 ld_nc_v4(const int4* p) {
    int4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
// Data another GPU wrote during this kernel, after an acquire: a weak, L1-bypassing load.
__device__ __forceinline__ int4 ld_v4(const int4* p) {
    int4 v;
    asm volatile("ld.global.L1::no_allocate.v4.s32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ void st_v4(int4* p, const int4& v) {
    asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1,%2,%3,%4};"
                 :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

// Warp copy of N 16-byte units, UNROLL loads in flight per lane before the stores.
// The UNROLL for warp_copy<N> with the fewest dependent memory round trips a lane waits for
// (each pass of the main loop one, each element of the tail one: its stores may alias its next
// loads), fewer registers on a tie; at most 8 vectors in flight a lane (14 made the internode
// dispatch spill at EP32 / EP64, whose 640-864 threads a block cap registers near 96). For a
// warp that is alone in its role (the internode kernels' roles), the copy's latency is the
// role's speed.
template <int N>
__host__ __device__ constexpr int copy_unroll() {
    int best = 1, best_rounds = 1 << 30;
    for (int u = 1; u <= 8; ++u) {
        const int step = 32 * u, tail = N - (N / step) * step;
        const int rounds = N / step + (tail + 31) / 32;
        if (rounds < best_rounds) best = u, best_rounds = rounds;
    }
    return best;
}
static_assert(copy_unroll<896>() == 7 && copy_unroll<448>() == 7 && copy_unroll<4>() == 1,
              "BF16 / FP8 rows of 7168: four passes / two (the fixed 4 took 7 / 4)");

template <int N, int UNROLL, bool SRC_READ_ONLY>
__device__ __forceinline__ void warp_copy(int4* dst, const int4* src, int lane) {
    constexpr int kStep = 32 * UNROLL;
    #pragma unroll 1
    for (int base = 0; base < (N / kStep) * kStep; base += kStep) {
        int4 v[UNROLL];
        #pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            v[u] = SRC_READ_ONLY ? ld_nc_v4(src + base + u * 32 + lane) : ld_v4(src + base + u * 32 + lane);
        #pragma unroll
        for (int u = 0; u < UNROLL; ++u) st_v4(dst + base + u * 32 + lane, v[u]);
    }
    constexpr int kTail = (N / kStep) * kStep;
    #pragma unroll
    for (int i = kTail + lane; i < N; i += 32)
        st_v4(dst + i, SRC_READ_ONLY ? ld_nc_v4(src + i) : ld_v4(src + i));
}


__device__ __forceinline__ int warp_reduce_sum(int v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_reduce_max(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Named barrier for a subgroup of warps (the unaligned form: safe from divergent paths).
__device__ __forceinline__ void named_barrier(int id, int threads) {
    asm volatile("barrier.sync %0, %1;" :: "r"(id), "r"(threads) : "memory");
}

}  // namespace epgen
