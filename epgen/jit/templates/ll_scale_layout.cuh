// Where low-latency dispatch stores a received row's scale words (the spec's recv_scale_layout;
// README "Wire formats", epgen.formats.RECV_SCALE_LAYOUTS). One expert's scales are RM rows
// (num_ranks * max tokens) of W 4-byte words (a float scale, four packed exponent / e4m3 bytes);
// word_offset gives the word index, in the recv_scales allocation, of word q of row m of local
// expert e. epgen/reference.py scale_word_offsets is the same map in torch, and the host build of
// this header (tests/host/scale_layout_host.cpp) is checked against it.
//   L 0 "deepep": MN-major, DeepEP's [E, W, RM] transposed: ((e * W + q) * RM + m).
//   L 1 "deepgemm": MN-major with the row count padded to 4 words (16 bytes: TMA's alignment),
//       DeepGEMM's get_mn_major_tma_aligned(_packed_ue8m0)_tensor: ((e * W + q) * RM4 + m).
//   L 2 "cutlass_128x4": CUTLASS / cuBLAS block-scaled scale-factor tiles (TensorRT-LLM's
//       SWIZZLED_128x4, get_sf_out_offset_128x4): per expert ceil(RM / 128) x W tiles of 128 rows x
//       4 bytes (one word), tile (m / 128, q) at ((m / 128) * W + q) * 128 words, inside it row m
//       at word (m % 32) * 4 + (m % 128) / 32. A word holds 4 scale bytes of one row, so the
//       swizzle moves whole words.
#pragma once

namespace epgen {
namespace llsf {

template <int L>
__host__ __device__ __forceinline__ int64_t word_offset(int64_t e, int64_t m, int64_t q, int64_t RM,
                                                        int64_t W) {
    static_assert(L >= 0 && L <= 2, "recv_scale_layout code");
    if constexpr (L == 0) {
        return (e * W + q) * RM + m;
    } else if constexpr (L == 1) {
        return (e * W + q) * ((RM + 3) / 4 * 4) + m;
    } else {
        const int64_t tiles_m = (RM + 127) / 128;
        return ((e * tiles_m + m / 128) * W + q) * 128 + (m % 32) * 4 + (m % 128) / 32;
    }
}

// Words of `experts` experts' scales in layout L (where NVFP4's global scales start in L 2).
template <int L>
__host__ __device__ __forceinline__ int64_t total_words(int64_t experts, int64_t RM, int64_t W) {
    if constexpr (L == 0) return experts * W * RM;
    else if constexpr (L == 1) return experts * W * ((RM + 3) / 4 * 4);
    else return experts * ((RM + 127) / 128) * W * 128;
}

}  // namespace llsf
}  // namespace epgen
