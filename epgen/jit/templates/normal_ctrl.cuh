// Fixed control area at the start of a Buffer's NVLink region (normal mode). Offsets are fixed
// (sized for 128 channels x 8 ranks) so calls with different SM counts or ring sizes never
// misalign them. Every counter is monotonic across calls: nothing is zeroed between calls.
// Ring counters (send tails, heads, tails) are 64-bit: they count records for the life of the
// process and never wrap, so slot = counter % cap holds for any cap. The per-call sequence
// words are 32-bit and only compared for equality and parity (wrap-safe; incremented in
// unsigned arithmetic). The sizes and the offsets the host knows are epgen/jit/layout_facts.py's
// (epgen::facts, rendered before this header); every generated unit static_asserts the offsets
// derived here against the host's (kDispCall, the ring counters' place and count).
#pragma once
#include "common.cuh"

namespace epgen {
namespace nctrl {
constexpr int kMaxC = facts::kNormalMaxChannels;
constexpr int kMaxR = facts::kNormalMaxRanks;
constexpr int kRowInts = facts::kNormalNotifyRowInts;   // notify table row: [flag, T, per-rank R, El]
constexpr long long kNotifySeq = facts::kNormalNotifySeqOff;       // own: notify/barrier calls so far
constexpr long long kNotifyTable = facts::kNormalNotifyTableOff;   // [2 parity][kMaxR src][kRowInts]
constexpr long long kDispCall = kNotifyTable + 2LL * kMaxR * kRowInts * 4;   // own [kMaxC] int
constexpr long long kDispMeta = kDispCall + kMaxC * 4;                     // by src [2][kMaxC][kMaxR][4] int
// 64-bit ring counters, [kMaxC][kMaxR] each
constexpr long long kDispSendTail = kDispMeta + 2LL * kMaxC * kMaxR * 16;  // own [c][dst]
constexpr long long kDispHead = kDispSendTail + kMaxC * kMaxR * 8;         // own [c][src]
constexpr long long kDispTail = kDispHead + kMaxC * kMaxR * 8;             // by src [c][src]
constexpr long long kCombSendTail = kDispTail + kMaxC * kMaxR * 8;         // own [c][owner]
constexpr long long kCombHead = kCombSendTail + kMaxC * kMaxR * 8;         // own [c][sender]
constexpr long long kCombTail = kCombHead + kMaxC * kMaxR * 8;             // by sender [c][sender]
constexpr long long kDispDone = kCombTail + kMaxC * kMaxR * 8;            // own int: blocks done
constexpr long long kCombDone = kDispDone + 4;                             // own int: blocks done
constexpr long long kCtrlBytes = facts::kNormalCtrlBytes;
static_assert(kCombDone + 4 <= kCtrlBytes, "control area overflow");

__device__ __forceinline__ int* word(char* base, long long off, int i = 0) {
    return reinterpret_cast<int*>(base + off) + i;
}
__device__ __forceinline__ long long* word64(char* base, long long off, int i = 0) {
    return reinterpret_cast<long long*>(base + off) + i;
}
// The call after sequence value v (unsigned: defined across the 32-bit wrap).
__device__ __forceinline__ int next_seq(int v) { return (int)((unsigned)v + 1u); }
__device__ __forceinline__ int cr(int c, int r) { return c * kMaxR + r; }
}  // namespace nctrl

__device__ __forceinline__ void st_volatile(int* p, int v) {
    asm volatile("st.volatile.global.s32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void st_volatile(long long* p, long long v) {
    asm volatile("st.volatile.global.s64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}
}  // namespace epgen
