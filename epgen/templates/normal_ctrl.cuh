// Fixed control area at the start of a Buffer's NVLink region (normal mode). Offsets are fixed
// (sized for 128 channels x 8 ranks) so calls with different SM counts or ring sizes never
// misalign them. Every counter is monotonic across calls: nothing is zeroed between calls.
// Mirrored in epgen/ops/intranode.py (CTRL_BYTES).
#pragma once
#include "common.cuh"

namespace epgen {
namespace nctrl {
constexpr int kMaxC = 128;
constexpr int kMaxR = 8;
constexpr int kRowInts = 1024;                       // notify table row: [flag, T, per-rank R, El]
constexpr long long kNotifySeq = 0;                  // own: notify/barrier calls so far
constexpr long long kNotifyTable = 4096;             // [2 parity][8 src][kRowInts] written by src
constexpr long long kDispCall = kNotifyTable + 2LL * kMaxR * kRowInts * 4;   // own [kMaxC]
constexpr long long kDispSendTail = kDispCall + kMaxC * 4;                 // own [kMaxC][8 dst]
constexpr long long kDispHead = kDispSendTail + kMaxC * kMaxR * 4;         // own [kMaxC][8 src]
constexpr long long kDispTail = kDispHead + kMaxC * kMaxR * 4;             // by src [kMaxC][8 src]
constexpr long long kDispMeta = kDispTail + kMaxC * kMaxR * 4;             // by src [2][kMaxC][8][4]
constexpr long long kCombSendTail = kDispMeta + 2LL * kMaxC * kMaxR * 16;  // own [kMaxC][8 owner]
constexpr long long kCombHead = kCombSendTail + kMaxC * kMaxR * 4;         // own [kMaxC][8 sender]
constexpr long long kCombTail = kCombHead + kMaxC * kMaxR * 4;             // by sender [kMaxC][8]
constexpr long long kCtrlBytes = 131072;
static_assert(kCombTail + kMaxC * kMaxR * 4 <= kCtrlBytes, "control area overflow");

__device__ __forceinline__ int* word(char* base, long long off, int i = 0) {
    return reinterpret_cast<int*>(base + off) + i;
}
__device__ __forceinline__ int cr(int c, int r) { return c * kMaxR + r; }
}  // namespace nctrl

__device__ __forceinline__ void st_volatile(int* p, int v) {
    asm volatile("st.volatile.global.s32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
}  // namespace epgen
