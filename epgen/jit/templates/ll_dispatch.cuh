// Low-latency dispatch (DeepEP V1's API and outputs), one message per (token, destination rank)
// (kernels.md 4.9): a token whose experts sit on one rank crosses NVLink once, not once per expert.
//
// Region layout (byte offsets are launch arguments, computed in epgen/ops/low_latency.py):
//   sig_off : u64 [2][kMaxSig]            signal tag_word(epoch, count) per (local expert, source)
//   recv_off: msg [2][R][M]               message slot per (source, source token)
//   send_off: payload [M], then header [M][kMaxDst]   staging for NVSHMEM puts (non-P2P peers)
// Message = header {layout tag << 16 | token, epoch low, n, epoch high, n entries (local expert << 16 | slot)}, padded to 16
// bytes, + payload: FP8 e4m3 row (H bytes) + float scale_inv per 128 channels, padded to 16
// bytes; or the BF16 row; or an opaque row then its side row (FMT 3). `slot` is the row's
// place in its (local expert, source) chunk: its place among the expert's rows in (token,
// top-k slot) order (ll_common.cuh entry_place), so chunks hold their tokens ascending.
// Send phase (phases & 1): each block takes a contiguous share of the tokens, one token at a
// time; warp 0 groups the token's experts by destination rank and writes one header per
// destination while warps 1.. cast the token once into shared memory; then all warps copy
// header + payload to each destination (NVLink stores, or nvshmemx_putmem_nbi_warp). The last
// block to finish reads and resets the counters and publishes E signals.
// Receive phase (phases & 2): every block waits for the E signals of its rank and computes the
// per-(expert, source) begin offsets (sources ascending); warps scan the R x M message slots,
// take those tagged with this call's epoch, read each payload once and store it into the row of
// every entry (recv_x, src_info, column-major scales); block 0 writes counts, ranges and stats.
#pragma once
#include "ll_common.cuh"
#include "ll_scale_layout.cuh"

namespace epgen {

// FMT: a wire format beyond DeepEP's flags (epgen.formats, the spec's wire_format), cast from
// BF16 here exactly as epgen/reference.py defines it: 0 = the flags' (BF16, FP8 per 128),
// 1 = MXFP8 (e4m3 + E8M0 per 32), 2 = NVFP4 (e2m1 two per byte + e4m3 per 16 + float32 global),
// 3 = opaque: rows of OROW bytes (x, any element type) plus OSIDE side bytes (a_side), both
// multiples of 16, copied as they are (no cast) into recv_x and recv_scales ([El][RM][OSIDE]);
// H is then the combine's hidden, which sizes the slots (OROW + OSIDE <= 2 H: a BF16 row's room).
// SFL: where recv_scales' words go (ll_scale_layout.cuh; the spec's recv_scale_layout).
template <int H, int K, int E, int R, bool FP8, bool ROUND, bool UE8M0, int THREADS, int FMT = 0,
          int SFL = 0, int OROW = 0, int OSIDE = 0>
struct LLDispatch {
    static constexpr int El = E / R;
    static constexpr int S = (H + facts::kScaleGroup - 1) / facts::kScaleGroup;   // FP8 scales
    static constexpr int S4 = (S + 3) / 4;
    static constexpr bool kOpaque = FMT == 3;
    static constexpr bool kQuant = FP8 || (FMT != 0 && !kOpaque);
    static constexpr int kDataBytes = kOpaque ? OROW : FMT == 2 ? H / 2 : kQuant ? H : 2 * H;
    static constexpr int kXRowBytes = kOpaque ? OROW : 2 * H;       // a row of x
    // 4-byte scale words after the data: float scale_inv per 128 (FP8), float 2^X per 32 (MXFP8:
    // the receive packs the exponent bytes, as for UE8M0), or NVFP4's wire words (block-scale
    // bytes four per word, then the global scale), copied as they are.
    static constexpr int kSW = FMT == 1 ? H / 32 : FMT == 2 ? (H / 16 + 3) / 4 + 1 : S;
    static constexpr int kSW4 = (kSW + 3) / 4;
    static constexpr bool kPackScales = UE8M0 || FMT == 1;
    // cutlass_128x4 tiles hold NVFP4's block-scale words only: its global scales (the last word)
    // go after every expert's tiles, a float32 [El, RM].
    static constexpr bool kGlobalApart = FMT == 2 && SFL == 2;
    static constexpr int kSWOut = kPackScales ? kSW4 : kGlobalApart ? kSW - 1 : kSW;  // words a row
    static constexpr int kPayload = kOpaque ? OROW + OSIDE
                                  : kQuant ? ll::align16(kDataBytes + 4 * kSW) : 2 * H;
    static constexpr int kMaxDst = K < R ? K : R;              // destinations of one token
    static constexpr int kHdr = ll::align16(ll::kHeaderFixed + 4 * K);        // room for K entries
    static constexpr int kHdrN16 = kHdr / 16;
    static constexpr int kMsg = kHdr + kPayload;
    static constexpr int kN16 = kMsg / 16;
    static constexpr int kWarps = THREADS / 32;
    static constexpr int kParts = kWarps / kMaxDst >= 1 ? kWarps / kMaxDst : 1;
    static constexpr int kPart = (kN16 + kParts - 1) / kParts;
    static constexpr int kRowN16 = kDataBytes / 16;         // 16-byte units of a recv_x row
    static_assert(H % 16 == 0, "hidden must be a multiple of 16");
    static_assert(E % R == 0 && E <= ll::kMaxSig && E <= THREADS && R <= ll::kMaxRankSig,
                  "experts / ranks");
    static_assert(K >= 1 && K <= ll::kMaxTopk, "top-k");
    static_assert(!UE8M0 || ROUND, "UE8M0 needs round_scale");
    static_assert(FMT == 0 || (!FP8 && (kOpaque || H % 32 == 0)),
                  "MXFP8 / NVFP4 / opaque: use_fp8 off; MXFP8 / NVFP4: hidden % 32");
    static_assert(kOpaque ? OROW > 0 && OROW % 16 == 0 && OSIDE >= 0 && OSIDE % 16 == 0 &&
                            OROW + OSIDE <= 2 * H && SFL == 0
                          : OROW == 0 && OSIDE == 0,
                  "opaque: rows and side rows of 16-byte multiples, within a BF16 row's room");
    static_assert(SFL == 0 || (SFL == 1 && (FP8 || FMT == 1)) || (SFL == 2 && FMT != 0),
                  "recv_scale_layout: deepgemm for FP8 / MXFP8, cutlass_128x4 for MXFP8 / NVFP4");
    // A signal's count field is 16 bits: a (local expert, source) count is at most T * K
    // (the receive refuses counts > M), T <= kMaxTokens.
    static_assert(ll::kMaxTokens * K <= (int)ll::kValueMask, "count field of the signal word");

    // 16 bits naming the message layout (the shapes that place headers): a header is taken
    // only with this call's epoch and this tag, so after a shape change no old payload bytes
    // that happen to sit where a header now is pass for one (review R5).
    static __device__ __forceinline__ int layout_tag(int max_tokens) {
        uint32_t h = 2166136261u;                               // FNV-1a over the shapes
        const uint32_t v[6] = {(uint32_t)H, (uint32_t)K, (uint32_t)E, (uint32_t)R,
                               (uint32_t)(FP8 | (ROUND << 1) | (UE8M0 << 2) | (FMT << 3)) ^
                                  ((uint32_t)OROW << 8) ^ ((uint32_t)OSIDE << 20),
                               (uint32_t)max_tokens};
        #pragma unroll
        for (int i = 0; i < 6; ++i) { h ^= v[i]; h *= 16777619u; }
        return (int)((h ^ (h >> 16)) & 0xffffu);
    }

    // Index in recv_scales of scale word g (of kSWOut; NVFP4's global scale kSW - 1) of a row.
    static __device__ __forceinline__ int64_t scale_word(int64_t le, int64_t row, int64_t g,
                                                         int64_t RM) {
        if constexpr (kGlobalApart) {
            if (g == kSW - 1) return llsf::total_words<SFL>(El, RM, kSWOut) + le * RM + row;
        }
        return llsf::word_offset<SFL>(le, row, g, RM, kSWOut);
    }

    // Byte offset of signal i = (local expert * R + source rank) of a half.
    static __device__ __forceinline__ uint64_t sig_off(const LowLatencyDispatchArgs& a, int half, int i) {
        return a.sig_off + ((uint64_t)half * ll::kMaxSig + i) * 8;
    }

    // Warps 1.. load / cast the token while warp 0 routes it (the two overlap).
    static constexpr int kCopyThreads = THREADS - 32;

    // FP8 cast of one BF16 token into the message payload (shared memory), by warps 1...
    // (Its own copy of load8 / e4m3x8 below: written over them, the FP8 kernels' machine code
    // changes; kept as it was, it stays byte-identical.)
    static __device__ __forceinline__ void cast_fp8(const int4* xrow, char* payload) {
        constexpr int kNC = H / 8;                            // 8-channel chunks
        constexpr int kIter = (kNC + kCopyThreads - 1) / kCopyThreads;
        float* scales = reinterpret_cast<float*>(payload + H);
        #pragma unroll
        for (int it = 0; it < kIter; ++it) {
            const int c = it * kCopyThreads + (int)threadIdx.x - 32;
            const bool active = c < kNC;
            float v[8];
            float amax = 0.f;
            if (active) {
                int4 raw = ld_nc_v4(xrow + c);
                const __nv_bfloat162* b = reinterpret_cast<const __nv_bfloat162*>(&raw);
                #pragma unroll
                for (int j = 0; j < 4; ++j) {
                    float2 f = __bfloat1622float2(b[j]);
                    v[2 * j] = f.x; v[2 * j + 1] = f.y;
                }
                #pragma unroll
                for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(v[j]));
            } else {
                #pragma unroll
                for (int j = 0; j < 8; ++j) v[j] = 0.f;
            }
            // 16 chunks = 128 channels = one scale group, aligned to half warps.
            #pragma unroll
            for (int o = 8; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
            amax = fmaxf(amax, 1e-4f);
            float scale_inv = __fdiv_rn(amax, 448.f);
            if (ROUND) {
                const uint32_t bits = __float_as_uint(scale_inv);
                const uint32_t ex = ((bits >> 23) & 0xffu) + ((bits & 0x7fffffu) != 0u ? 1u : 0u);
                scale_inv = __uint_as_float(ex << 23);
            }
            const float scale = __fdiv_rn(1.f, scale_inv);
            if (active) {
                uint32_t packed[2];
                #pragma unroll
                for (int j = 0; j < 2; ++j) {
                    float2 lo = make_float2(fminf(fmaxf(__fmul_rn(v[4 * j], scale), -448.f), 448.f),
                                            fminf(fmaxf(__fmul_rn(v[4 * j + 1], scale), -448.f), 448.f));
                    float2 hi = make_float2(fminf(fmaxf(__fmul_rn(v[4 * j + 2], scale), -448.f), 448.f),
                                            fminf(fmaxf(__fmul_rn(v[4 * j + 3], scale), -448.f), 448.f));
                    const uint32_t a = __nv_cvt_float2_to_fp8x2(lo, __NV_SATFINITE, __NV_E4M3);
                    const uint32_t b = __nv_cvt_float2_to_fp8x2(hi, __NV_SATFINITE, __NV_E4M3);
                    packed[j] = a | (b << 16);
                }
                *reinterpret_cast<uint2*>(payload + c * 8) = make_uint2(packed[0], packed[1]);
                if ((c & 15) == 0) scales[c >> 4] = scale_inv;
            }
        }
    }

    // 8 floats already scaled -> 8 e4m3 bytes: clamp to +-448, round to nearest even.
    static __device__ __forceinline__ uint2 e4m3x8(const float* v, float scale) {
        uint32_t packed[2];
        #pragma unroll
        for (int j = 0; j < 2; ++j) {
            float2 lo = make_float2(fminf(fmaxf(__fmul_rn(v[4 * j], scale), -448.f), 448.f),
                                    fminf(fmaxf(__fmul_rn(v[4 * j + 1], scale), -448.f), 448.f));
            float2 hi = make_float2(fminf(fmaxf(__fmul_rn(v[4 * j + 2], scale), -448.f), 448.f),
                                    fminf(fmaxf(__fmul_rn(v[4 * j + 3], scale), -448.f), 448.f));
            const uint32_t a = __nv_cvt_float2_to_fp8x2(lo, __NV_SATFINITE, __NV_E4M3);
            const uint32_t b = __nv_cvt_float2_to_fp8x2(hi, __NV_SATFINITE, __NV_E4M3);
            packed[j] = a | (b << 16);
        }
        return make_uint2(packed[0], packed[1]);
    }

    // 8 BF16 channels of chunk c (8 zeros past the row) as floats, and their amax.
    static __device__ __forceinline__ float load8(const int4* xrow, int c, bool active, float* v) {
        float amax = 0.f;
        if (active) {
            int4 raw = ld_nc_v4(xrow + c);
            const __nv_bfloat162* b = reinterpret_cast<const __nv_bfloat162*>(&raw);
            #pragma unroll
            for (int j = 0; j < 4; ++j) {
                float2 f = __bfloat1622float2(b[j]);
                v[2 * j] = f.x; v[2 * j + 1] = f.y;
            }
            #pragma unroll
            for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(v[j]));
        } else {
            #pragma unroll
            for (int j = 0; j < 8; ++j) v[j] = 0.f;
        }
        return amax;
    }

    // MXFP8 cast (reference.mxfp8_quantize), by warps 1..: per 32 channels (4 lanes) the shared
    // exponent X = floor(log2(amax)) - 8 clamped to >= -127, read from amax's exponent field:
    // the E8M0 byte X + 127 is max(field - 8, 0) (zero and subnormal amax give 0). The payload
    // word is the float with that exponent field (2^X, or 0 for byte 0); the receive packs it.
    static __device__ __forceinline__ void cast_mxfp8(const int4* xrow, char* payload) {
        constexpr int kNC = H / 8;
        constexpr int kIter = (kNC + kCopyThreads - 1) / kCopyThreads;
        float* scales = reinterpret_cast<float*>(payload + H);
        #pragma unroll
        for (int it = 0; it < kIter; ++it) {
            const int c = it * kCopyThreads + (int)threadIdx.x - 32;
            const bool active = c < kNC;
            float v[8];
            float amax = load8(xrow, c, active, v);
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
            const uint32_t ex = (__float_as_uint(amax) >> 23) & 0xffu;
            const uint32_t byte = ex > 8u ? ex - 8u : 0u;
            const float scale = __uint_as_float((254u - byte) << 23);   // 2^-X, exact
            if (active) {
                *reinterpret_cast<uint2*>(payload + c * 8) = e4m3x8(v, scale);
                if ((c & 3) == 0) scales[c >> 2] = __uint_as_float(byte << 23);
            }
        }
    }

    // e2m1 code of v (reference.e2m1_encode): nearest, ties to the even code, saturating at 6,
    // the sign kept. sm_90 has no e2m1 conversion instruction, so it is compares.
    static __device__ __forceinline__ uint32_t e2m1(float v) {
        const float m = fabsf(v);
        const uint32_t c = (m > 0.25f) + (m >= 0.75f) + (m > 1.25f) + (m >= 1.75f) + (m > 2.5f) +
                           (m >= 3.5f) + (m > 5.f);
        return c | ((__float_as_uint(v) >> 31) << 3);
    }

    // NVFP4 cast (reference.nvfp4_quantize), by warps 1..: the token's amax first (they meet at
    // named barrier 1 while warp 0 routes), global scale g = 2688 / max(amax, 1e-4); then per 16
    // channels (2 lanes) sf = e4m3((amax16 / 6) * g), q = g / sf (0 for sf 0), values e2m1(x * q)
    // two per byte (low nibble first), block-scale bytes after the data, zero-padded to 4 bytes,
    // then g.
    static __device__ __forceinline__ void cast_nvfp4(const int4* xrow, char* payload) {
        constexpr int kNC = H / 8;
        constexpr int kIter = (kNC + kCopyThreads - 1) / kCopyThreads;
        constexpr int G = H / 16;
        constexpr int kBlockBytes = 4 * ((G + 3) / 4);
        __shared__ float s_wmax[kWarps];
        float v[kIter][8];
        float amax = 0.f;
        #pragma unroll
        for (int it = 0; it < kIter; ++it) {
            const int c = it * kCopyThreads + (int)threadIdx.x - 32;
            amax = fmaxf(amax, load8(xrow, c, c < kNC, v[it]));
        }
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        if ((threadIdx.x & 31) == 0) s_wmax[threadIdx.x >> 5] = amax;
        asm volatile("bar.sync 1, %0;" ::"r"(kCopyThreads));
        amax = 0.f;
        #pragma unroll 1
        for (int w = 1; w < kWarps; ++w) amax = fmaxf(amax, s_wmax[w]);
        const float g = __fdiv_rn(2688.f, fmaxf(amax, 1e-4f));
        #pragma unroll
        for (int it = 0; it < kIter; ++it) {
            const int c = it * kCopyThreads + (int)threadIdx.x - 32;
            float bmax = 0.f;
            #pragma unroll
            for (int j = 0; j < 8; ++j) bmax = fmaxf(bmax, fabsf(v[it][j]));
            bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, 1));
            const float sf_f = fminf(__fmul_rn(__fdiv_rn(bmax, 6.f), g), 448.f);
            const __nv_fp8_storage_t sf = __nv_cvt_float_to_fp8(sf_f, __NV_SATFINITE, __NV_E4M3);
            const float sf32 = __half2float(__half(__nv_cvt_fp8_to_halfraw(sf, __NV_E4M3)));
            const float q = sf32 != 0.f ? __fdiv_rn(g, sf32) : 0.f;
            if (c < kNC) {
                uint32_t packed = 0;
                #pragma unroll
                for (int j = 0; j < 8; ++j) packed |= e2m1(__fmul_rn(v[it][j], q)) << (4 * j);
                *reinterpret_cast<uint32_t*>(payload + c * 4) = packed;
                if ((c & 1) == 0) payload[H / 2 + (c >> 1)] = (char)sf;
                if (c == 0) {
                    for (int b = G; b < kBlockBytes; ++b) payload[H / 2 + b] = 0;
                    *reinterpret_cast<float*>(payload + H / 2 + kBlockBytes) = g;
                }
            }
        }
    }

    // Returns this call's epoch (a receive in the same launch takes it from here).
    static __device__ unsigned long long send(const LowLatencyDispatchArgs& a, const ErrorCtx& err) {
        extern __shared__ int4 smem_payload[];               // kPayload bytes
        __shared__ int4 s_hdr[kMaxDst][kHdrN16];              // one header per destination
        __shared__ int s_dst[kMaxDst];
        __shared__ int s_ndst;
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
        const unsigned long long epoch = ll::next_epoch(a.seq);
        const int half = (int)(epoch & 1ull);
        if (blockIdx.x == 0 && threadIdx.x == 0 && a.call_epoch != nullptr)
            a.call_epoch[0] = epoch;                 // for a receive launched on its own
        const int M = a.max_tokens;
        char* base = reinterpret_cast<char*>(a.rdma_base);
        const bool any_remote = a.any_remote != 0;
        const uint64_t hdr_stage_off = a.send_off + (uint64_t)M * kPayload;

        // A contiguous share of the tokens, walked in order: each row's slot is its place in
        // (token, top-k slot) order among its expert's rows (ll_common.cuh entry_place), which
        // the combine's owner computes again from its topk_idx.
        __shared__ int s_run[E];              // each expert's entries before token t
        int t0, t1;
        ll::block_tokens(a.num_tokens, &t0, &t1);
        ll::count_entries<THREADS, E>(a.topk_idx, t0 * K, 0, s_run, nullptr);
        for (int t = t0; t < t1; ++t) {
            if (warp == 0) {   // lane k: expert k, its slot; group the lanes by destination
                const int64_t e = lane < K ? a.topk_idx[(int64_t)t * K + lane] : -1;
                const bool valid = e >= 0 && e < E;
                if (!valid && e != -1) report_error(err, kErrBadIndex, -1, t);
                const int place = ll::entry_place(valid ? (int)e : -1, s_run);
                int ev = -1, slot = 0;
                if (valid) {
                    const int dst = (int)e / El;
                    if (!ll::masked(a.mask, dst)) {
                        atomicAdd(a.counters + e, 1);        // the chunk's count (its signal)
                        slot = place;
                        if (slot >= M) report_error(err, kErrCapacity, dst, (int)e);
                        else ev = (int)e;
                    }
                }
                const int dst = ev >= 0 ? ev / El : -1;
                const unsigned same = __match_any_sync(0xffffffffu, dst);
                const int leader_lane = __ffs(same) - 1;
                const unsigned leaders = __ballot_sync(0xffffffffu, dst >= 0 && leader_lane == lane);
                if (dst >= 0) {
                    const int d = __popc(leaders & ((1u << leader_lane) - 1u));
                    const int j = __popc(same & ((1u << lane) - 1u));
                    int* h = reinterpret_cast<int*>(s_hdr[d]);
                    h[4 + j] = ((ev % El) << 16) | slot;
                    if (lane == leader_lane) {
                        h[0] = (int)(((uint32_t)layout_tag(M) << 16) | (uint32_t)t);
                        h[1] = (int)(uint32_t)epoch;
                        h[2] = __popc(same);
                        h[3] = (int)(uint32_t)(epoch >> 32);
                        s_dst[d] = dst;
                    }
                }
                if (lane == 0) s_ndst = __popc(leaders);
            } else {           // warps 1..: the token into shared memory, cast once
                const int4* xrow = reinterpret_cast<const int4*>(
                    reinterpret_cast<const char*>(a.x) + (int64_t)t * kXRowBytes);
                if constexpr (kOpaque) {   // the row, then its side row: bytes as they are
                    for (int i = tid - 32; i < OROW / 16; i += kCopyThreads)
                        smem_payload[i] = ld_nc_v4(xrow + i);
                    if constexpr (OSIDE > 0) {
                        const int4* srow = reinterpret_cast<const int4*>(
                            reinterpret_cast<const char*>(a.x_side) + (int64_t)t * OSIDE);
                        for (int i = tid - 32; i < OSIDE / 16; i += kCopyThreads)
                            smem_payload[OROW / 16 + i] = ld_nc_v4(srow + i);
                    }
                } else if constexpr (FMT == 1) {
                    cast_mxfp8(xrow, reinterpret_cast<char*>(smem_payload));
                } else if constexpr (FMT == 2) {
                    cast_nvfp4(xrow, reinterpret_cast<char*>(smem_payload));
                } else if constexpr (FP8) {
                    cast_fp8(xrow, reinterpret_cast<char*>(smem_payload));
                } else {
                    for (int i = tid - 32; i < H / 8; i += kCopyThreads)
                        smem_payload[i] = ld_nc_v4(xrow + i);
                }
            }
            __syncthreads();
            const int ndst = s_ndst;
            if (any_remote) {   // symmetric staging copies: the sources of proxy puts
                int4* stage = reinterpret_cast<int4*>(base + a.send_off + (uint64_t)t * kPayload);
                for (int i = tid; i < kPayload / 16; i += THREADS) st_v4(stage + i, smem_payload[i]);
                int4* hstage = reinterpret_cast<int4*>(base + hdr_stage_off +
                                                       (uint64_t)t * kMaxDst * kHdr);
                for (int i = tid; i < ndst * kHdrN16; i += THREADS)
                    st_v4(hstage + i, s_hdr[i / kHdrN16][i % kHdrN16]);
                __threadfence();
                __syncthreads();
            }
            for (int u = warp; u < ndst * kParts; u += kWarps) {
                const int d = u % ndst, part = u / ndst;
                const int dst = s_dst[d];
                const int lo = part * kPart;
                const int hi = lo + kPart < kN16 ? lo + kPart : kN16;
                if (lo >= hi) continue;
                const uint64_t off = a.recv_off + (((uint64_t)half * R + a.rank) * M + t) * kMsg;
                const int64_t pb = a.peer_bases[dst];
                if (pb != 0) {
                    int4* out = reinterpret_cast<int4*>(pb + off);
                    #pragma unroll 4
                    for (int i = lo + lane; i < hi; i += 32)
                        st_v4(out + i, i < kHdrN16 ? s_hdr[d][i] : smem_payload[i - kHdrN16]);
                } else {
                    if (lo < kHdrN16)
                        nvshmemx_putmem_nbi_warp(base + off, base + hdr_stage_off +
                                                 ((uint64_t)t * kMaxDst + d) * kHdr, kHdr, a.pes[dst]);
                    const int plo = (lo > kHdrN16 ? lo : kHdrN16) - kHdrN16, phi = hi - kHdrN16;
                    if (phi > plo)
                        nvshmemx_putmem_nbi_warp(
                            base + off + kHdr + (uint64_t)plo * 16,
                            base + a.send_off + (uint64_t)t * kPayload + (uint64_t)plo * 16,
                            (size_t)(phi - plo) * 16, a.pes[dst]);
                }
            }
            __syncthreads();
        }

        if (!ll::last_block_arrives(a.done, any_remote)) return epoch;
        for (int e = tid; e < E; e += THREADS) {
            const int cnt = atomicExch(a.counters + e, 0);
            const int dst = e / El, le = e % El;
            if (ll::masked(a.mask, dst)) continue;
            ll::put_signal(base, a.peer_bases, a.pes, dst, sig_off(a, half, le * R + a.rank),
                           ll::tag_word(epoch, (unsigned)cnt));
        }
        __syncthreads();
        if (tid == 0) {
            *a.done = 0;
            *a.seq = epoch;
        }
        return epoch;
    }

    // epoch: this call's, from the send phase of the same launch or (a launch of its own)
    // from call_epoch.
    static __device__ void recv(const LowLatencyDispatchArgs& a, const ErrorCtx& err,
                                unsigned long long epoch) {
        __shared__ int s_cnt[E];
        __shared__ int s_begin[E];
        const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
        const int half = (int)(epoch & 1ull);
        const int M = a.max_tokens;
        const int tag = layout_tag(M);                  // headers of this layout only
        const int64_t RM = (int64_t)R * M;
        const char* base = reinterpret_cast<const char*>(a.rdma_base);

        __shared__ bool s_arrived[E];
        for (int i = tid; i < E; i += THREADS) {
            const int src = i % R;
            int cnt = 0;
            bool arrived = false;
            if (!ll::masked(a.mask, src)) {
                const unsigned long long t0 = globaltimer();
                arrived = ll::wait_signal(err, base, sig_off(a, half, i), epoch, src, i, a.mask, &cnt);
                if (blockIdx.x == 0 && a.wait_stats != nullptr)
                    atomicAdd(reinterpret_cast<unsigned long long*>(a.wait_stats + src),
                              globaltimer() - t0);
            }
            s_cnt[i] = cnt;
            s_arrived[i] = arrived;
        }
        __syncthreads();
        __shared__ bool s_in[R];   // sources whose messages this receive takes
        if (tid < R) s_in[tid] = true;
        if (a.mask != nullptr) {   // enable_shrink: all blocks take the same sources
            if (tid < R) {
                bool all = true;
                for (int le = 0; le < El; ++le) all = all && s_arrived[le * R + tid];
                s_in[tid] = ll::peer_verdict(a.verdicts + half * ll::kMaxRankSig, a.mask, epoch,
                                             tid, all);
            }
            __syncthreads();
            for (int i = tid; i < E; i += THREADS) {
                const int src = i % R;
                if (!s_in[src]) s_cnt[i] = 0;
                else if (!s_arrived[i])   // arrived for the block that decided: visible now
                    ll::wait_signal(err, base, sig_off(a, half, i), epoch, src, i, nullptr, &s_cnt[i]);
            }
            __syncthreads();
        }
        for (int i = tid; i < E; i += THREADS) {
            if (s_cnt[i] > M) { report_error(err, kErrCapacity, i % R, s_cnt[i]); s_cnt[i] = 0; }
        }
        __syncthreads();
        for (int le = tid; le < El; le += THREADS) {
            int b = 0;
            #pragma unroll 1
            for (int src = 0; src < R; ++src) {
                const int n = s_cnt[le * R + src];
                s_begin[le * R + src] = b;
                if (blockIdx.x == 0) a.recv_layout_range[le * R + src] = ((int64_t)b << 32) | (int64_t)n;
                b += n;
            }
            if (blockIdx.x == 0) {
                a.recv_count[le] = b;
                if (a.cumulative_stats != nullptr) atomicAdd(a.cumulative_stats + le, b);
            }
        }
        __syncthreads();

        // Scan the R x M message slots; a slot holds this call's message when its header
        // carries this call's epoch (slots of tokens not sent here keep older epochs).
        __shared__ int s_le[kWarps][K];
        __shared__ int s_row[kWarps][K];
        constexpr int64_t kRowBytes = kDataBytes;
        // A message's payload is split into `parts` slices, each a unit of work, so that the
        // R x M slots keep every warp busy (one warp per message would leave most idle).
        constexpr int kBatch = 2;
        constexpr int kMaxParts = (kRowN16 + 32 * kBatch - 1) / (32 * kBatch);
        const int gw = ll::spread_warp_index();
        const int nw = gridDim.x * kWarps;
        int parts = nw / (R * M);
        parts = parts < 1 ? 1 : parts > kMaxParts ? kMaxParts : parts;
        for (int u = gw; u < R * M * parts; u += nw) {
            const int m = u / parts, part = u % parts;
            const int src = m / M, t = m % M;
            if (!s_in[src]) continue;
            const int4* msg = reinterpret_cast<const int4*>(
                base + a.recv_off + (((uint64_t)half * R + src) * M + t) * kMsg);
            const int4 h = ld_v4(msg);                  // token, epoch low, n, epoch high
            if ((uint32_t)h.y != (uint32_t)epoch || (uint32_t)h.w != (uint32_t)(epoch >> 32) ||
                ((uint32_t)h.x >> 16) != (uint32_t)tag) continue;
            const int n = h.z >= 0 && h.z <= K ? h.z : 0;
            if (lane < n) {
                const int ent = ld_volatile(reinterpret_cast<const int*>(msg) + 4 + lane);
                const int le = ent >> 16, slot = ent & 0xffff;
                int row = -1;
                if (le < El && slot < s_cnt[le * R + src]) {
                    row = s_begin[le * R + src] + slot;
                    if (part == 0) a.recv_src_info[le * RM + row] = h.x & 0xffff;
                } else if (part == 0) {
                    report_error(err, kErrBadArg, src, ent);
                }
                s_le[warp][lane] = le;
                s_row[warp][lane] = row;
            }
            __syncwarp();
            // Read this slice of the payload once, store it into every entry's row.
            const int4* pay = msg + kHdrN16;
            #pragma unroll 1
            for (int c0 = part * 32 * kBatch; c0 < kRowN16; c0 += parts * 32 * kBatch) {
                int4 v[kBatch];
                #pragma unroll
                for (int b = 0; b < kBatch; ++b) {
                    const int c = c0 + b * 32 + lane;
                    if (c < kRowN16) v[b] = ld_v4(pay + c);
                }
                for (int j = 0; j < n; ++j) {
                    const int row = s_row[warp][j];
                    if (row < 0) continue;
                    int4* out = reinterpret_cast<int4*>(reinterpret_cast<char*>(a.recv_x) +
                                                        (s_le[warp][j] * RM + row) * kRowBytes);
                    #pragma unroll
                    for (int b = 0; b < kBatch; ++b) {
                        const int c = c0 + b * 32 + lane;
                        if (c < kRowN16) st_v4(out + c, v[b]);
                    }
                }
            }
            if constexpr (kOpaque && OSIDE > 0) {   // the side row, to recv_scales [El][RM][OSIDE]
                const int4* side = pay + OROW / 16;
                for (int c = part * 32 + lane; c < OSIDE / 16; c += parts * 32) {
                    const int4 v = ld_v4(side + c);
                    for (int j = 0; j < n; ++j) {
                        const int row = s_row[warp][j];
                        if (row >= 0)
                            st_v4(reinterpret_cast<int4*>(a.recv_scales) +
                                  (s_le[warp][j] * RM + row) * (OSIDE / 16) + c, v);
                    }
                }
            }
            if constexpr (kQuant) {
                const float* sc = reinterpret_cast<const float*>(
                    reinterpret_cast<const char*>(pay) + kDataBytes);
                if constexpr (kPackScales) {
                    int* out = reinterpret_cast<int*>(a.recv_scales);
                    for (int q4 = part * 32 + lane; q4 < kSW4; q4 += parts * 32) {
                        uint32_t packed = 0;
                        #pragma unroll
                        for (int q = 0; q < 4; ++q) {
                            const int g = 4 * q4 + q;
                            if (g < kSW) {
                                const uint32_t bits = __float_as_uint(
                                    *reinterpret_cast<const volatile float*>(sc + g));
                                packed |= ((bits >> 23) & 0xffu) << (8 * q);
                            }
                        }
                        for (int j = 0; j < n; ++j) {
                            const int row = s_row[warp][j];
                            if (row >= 0) out[scale_word(s_le[warp][j], row, q4, RM)] = (int)packed;
                        }
                    }
                } else {
                    float* out = reinterpret_cast<float*>(a.recv_scales);
                    for (int g = part * 32 + lane; g < kSW; g += parts * 32) {
                        const float v = *reinterpret_cast<const volatile float*>(sc + g);
                        for (int j = 0; j < n; ++j) {
                            const int row = s_row[warp][j];
                            if (row >= 0) out[scale_word(s_le[warp][j], row, g, RM)] = v;
                        }
                    }
                }
            }
            __syncwarp();   // s_le / s_row are rewritten for the next message
        }
        // the blocks' count: the int after `done`, 0 between calls (a fused launch has no call_epoch)
        if (last_block_sees_error(a.done + 1, err)) {
            const int64_t rows = (int64_t)El * RM;      // outputs: NaN, -1, counts 0
            poison_fill(a.recv_x, rows * kRowBytes, kPoisonNaN);
            if constexpr (kOpaque && OSIDE > 0)
                poison_fill(a.recv_scales, rows * OSIDE, kPoisonNaN);
            if constexpr (FP8 && SFL == 0) poison_fill(a.recv_scales, rows * (UE8M0 ? S4 : S) * 4, kPoisonNaN);
            if constexpr (SFL != 0)
                poison_fill(a.recv_scales, (llsf::total_words<SFL>(El, RM, kSWOut) +
                                            (kGlobalApart ? rows : 0)) * 4, kPoisonNaN);
            poison_fill(a.recv_src_info, rows * 4, kPoisonNaN);
            poison_fill(a.recv_layout_range, (int64_t)El * R * 8, kPoisonZero);
            poison_fill(a.recv_count, (int64_t)El * 4, kPoisonZero);
        }
    }
};

template <int H, int K, int E, int R, bool FP8, bool ROUND, bool UE8M0, int THREADS, int FMT = 0,
          int SFL = 0, int OROW = 0, int OSIDE = 0>
__device__ __forceinline__ void ll_dispatch_kernel(const LowLatencyDispatchArgs& a) {
    using D = LLDispatch<H, K, E, R, FP8, ROUND, UE8M0, THREADS, FMT, SFL, OROW, OSIDE>;
    const ErrorCtx err = make_error_ctx(a);
    ll::run_phases<D>(a, err);
}


// The generated unit's entry (templates/kernel.cu.j2): the spec struct S by name, epgen/jit/specs.py
// LowLatencyDispatchSpec.constants; this is the one place its members meet the template's parameter order.
template <class S>
using LLDispatchOf = LLDispatch<S::hidden, S::num_topk, S::num_experts, S::num_ranks, S::use_fp8,
                                S::round_scale, S::use_ue8m0, S::threads, S::wire_format_code,
                                S::recv_scale_layout_code, S::opaque_row_bytes,
                                S::opaque_side_bytes>;
template <class S>
__device__ __forceinline__ void ll_dispatch_entry(const LowLatencyDispatchArgs& a) {
    ll_dispatch_kernel<S::hidden, S::num_topk, S::num_experts, S::num_ranks, S::use_fp8,
                       S::round_scale, S::use_ue8m0, S::threads, S::wire_format_code,
                       S::recv_scale_layout_code, S::opaque_row_bytes,
                       S::opaque_side_bytes>(a);
}

}  // namespace epgen
