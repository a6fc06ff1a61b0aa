// Combine wire formats of the per-expert low-latency combine (ll_combine.cuh): what one warp
// writes for one expert-output row, and what one lane adds back. The exact definitions are
// epgen/reference.py section 8 (combine_wire_encode / combine_wire_values); every float
// operation here is one IEEE operation rounded to nearest even (__f*_rn, no contraction), in the
// reference's order, so the bytes and the sums are bit-exact with it.
//   FMT 1, fp8_e4m3_f32_128: [H] e4m3 then [ceil(H/128)] float32 scale_inv.
//   FMT 2, logfmt10 (DeepEP's LogFMT-10, 567632d): [G] bf16x2 (amax, amin) of the magnitudes
//     per 128 channels, then per chunk (1024 channels if H % 1024 == 0, else 512; the last may
//     be partial) either 20-byte blocks of 16 values (9-bit codes, then 16 sign bits) when every
//     group of the chunk qualifies, or the chunk's BF16 bytes.
#pragma once

namespace epgen {
namespace llw {

// reference.LOG2_1P_M / EXP2_POLY / LOG2_1P_POLY as float32 bit patterns (tests compare them).
static __constant__ unsigned int kLog2_1pM[128] = {
    0x00000000u, 0x3c37f286u, 0x3cb73cb4u, 0x3d08e68fu, 0x3d35d69cu, 0x3d626fd6u, 0x3d8759c5u, 0x3d9d517fu,
    0x3db31fb8u, 0x3dc8c50bu, 0x3dde4212u, 0x3df39761u, 0x3e0462c4u, 0x3e0ee68du, 0x3e19574fu, 0x3e23b550u,
    0x3e2e00d2u, 0x3e383a17u, 0x3e42615fu, 0x3e4c76e8u, 0x3e567af1u, 0x3e606db6u, 0x3e6a4f72u, 0x3e74205fu,
    0x3e7de0b6u, 0x3e83c857u, 0x3e88983fu, 0x3e8d602eu, 0x3e92203du, 0x3e96d888u, 0x3e9b8926u, 0x3ea03232u,
    0x3ea4d3c2u, 0x3ea96df0u, 0x3eae00d2u, 0x3eb28c7fu, 0x3eb7110eu, 0x3ebb8e96u, 0x3ec0052bu, 0x3ec474e4u,
    0x3ec8ddd4u, 0x3ecd4012u, 0x3ed19bb0u, 0x3ed5f0c4u, 0x3eda3f60u, 0x3ede8797u, 0x3ee2c97du, 0x3ee70525u,
    0x3eeb3a9fu, 0x3eef69ffu, 0x3ef39355u, 0x3ef7b6b4u, 0x3efbd42bu, 0x3effebcdu, 0x3f01fed4u, 0x3f0404e8u,
    0x3f060828u, 0x3f08089eu, 0x3f0a0650u, 0x3f0c0146u, 0x3f0df989u, 0x3f0fef1fu, 0x3f11e20fu, 0x3f13d260u,
    0x3f15c01au, 0x3f17ab44u, 0x3f1993e3u, 0x3f1b7a00u, 0x3f1d5da0u, 0x3f1f3ecau, 0x3f211d84u, 0x3f22f9d5u,
    0x3f24d3c2u, 0x3f26ab53u, 0x3f28808cu, 0x3f2a5374u, 0x3f2c2411u, 0x3f2df268u, 0x3f2fbe80u, 0x3f31885cu,
    0x3f335004u, 0x3f35157du, 0x3f36d8cbu, 0x3f3899f5u, 0x3f3a58ffu, 0x3f3c15eeu, 0x3f3dd0c8u, 0x3f3f8991u,
    0x3f41404fu, 0x3f42f506u, 0x3f44a7bau, 0x3f465872u, 0x3f480731u, 0x3f49b3fbu, 0x3f4b5ed7u, 0x3f4d07c7u,
    0x3f4eaed0u, 0x3f5053f7u, 0x3f51f740u, 0x3f5398afu, 0x3f553848u, 0x3f56d60fu, 0x3f587209u, 0x3f5a0c3au,
    0x3f5ba4a4u, 0x3f5d3b4eu, 0x3f5ed039u, 0x3f60636au, 0x3f61f4e5u, 0x3f6384adu, 0x3f6512c7u, 0x3f669f35u,
    0x3f6829fbu, 0x3f69b31eu, 0x3f6b3a9fu, 0x3f6cc083u, 0x3f6e44cdu, 0x3f6fc781u, 0x3f7148a1u, 0x3f72c832u,
    0x3f744636u, 0x3f75c2b0u, 0x3f773da4u, 0x3f78b714u, 0x3f7a2f04u, 0x3f7ba578u, 0x3f7d1a71u, 0x3f7e8df2u,
};
static __constant__ unsigned int kExp2Poly[8] = {0x377fe5feu, 0x39218489u, 0x3aaec3ffu, 0x3c1d955bu, 0x3d635847u, 0x3e75fdf0u, 0x3f317218u, 0x3f800000u};
static __constant__ unsigned int kLog2_1pPoly[6] = {0xbe76384fu, 0x3e93bb63u, 0xbeb8aa3bu, 0x3ef6384fu, 0xbf38aa3bu, 0x3fb8aa3bu};

// A word of a message another GPU wrote during this kernel: a weak load, ordered after the
// writer's release by the receive's acquire of its signal and the __syncthreads after it (the
// PTX model's causality order; nothing of the slot is read earlier in the kernel, so no stale
// line can sit in L1). Not common.cuh's L1-bypassing asm load: an inline-asm load here costs
// the LogFMT receive its register budget (spills at hidden 7168).
__device__ __forceinline__ uint32_t ld_peer(const char* p) {
    return *reinterpret_cast<const uint32_t*>(p);
}

// A block's copy of kLog2_1pM (lanes index it divergently). Call before a __syncthreads.
__device__ __forceinline__ void load_log2_table(float* s) {
    for (int i = threadIdx.x; i < 128; i += blockDim.x) s[i] = __uint_as_float(kLog2_1pM[i]);
}

// reference.logfmt_log2_bf16: log2 of a bf16 magnitude (15-bit pattern), -inf for 0.
__device__ __forceinline__ float log2_bf16(uint32_t m, const float* tab) {
    if (m == 0u) return -__int_as_float(0x7f800000);
    int ex = (int)(m >> 7) - 127;
    uint32_t mm = m & 0x7fu;
    if ((m >> 7) == 0u) {                       // subnormal: mm * 2^-133
        const int lead = 31 - __clz((int)mm);
        ex = lead - 133;
        mm = (mm << (7 - lead)) & 0x7fu;
    }
    return __fadd_rn((float)ex, tab[mm]);
}

__device__ __forceinline__ float pow2i(int k) { return __uint_as_float((uint32_t)(k + 127) << 23); }

// reference.logfmt_exp2.
__device__ __forceinline__ float exp2_x(float v) {
    const float n = rintf(v);
    const float f = __fsub_rn(v, n);
    float p = __uint_as_float(kExp2Poly[0]);
    #pragma unroll
    for (int k = 1; k < 8; ++k) p = __fadd_rn(__fmul_rn(p, f), __uint_as_float(kExp2Poly[k]));
    if (n < -150.f) return 0.f;
    const int ni = (int)fminf(n, 127.f);
    if (ni >= -126) return __fmul_rn(p, pow2i(ni));
    return __fmul_rn(__fmul_rn(p, pow2i(ni + 64)), pow2i(-64));
}

// reference.logfmt_log2_near1: y in [1, 1.03125].
__device__ __forceinline__ float log2_near1(float y) {
    const float d = __fsub_rn(y, 1.f);
    float p = __uint_as_float(kLog2_1pPoly[0]);
    #pragma unroll
    for (int k = 1; k < 6; ++k) p = __fadd_rn(__fmul_rn(p, d), __uint_as_float(kLog2_1pPoly[k]));
    return __fmul_rn(d, p);
}

// reference._logfmt_log_range of one group's metadata word (amax | amin << 16); returns ok.
__device__ __forceinline__ bool log_range(uint32_t w, const float* tab, float& la, float& lm) {
    const uint32_t mx = w & 0x7fffu, mn = (w >> 16) & 0x7fffu;
    la = log2_bf16(mx, tab);
    const float clip = __fsub_rn(la, 32.f);
    lm = mn == 0u ? clip : fmaxf(log2_bf16(mn, tab), clip);
    return la < 0.f && lm < la;
}

__device__ __forceinline__ float logfmt_step(float la, float lm) {
    return __fdiv_rn(__fsub_rn(la, lm), 510.f);
}

// Built for the host too (tests/host/wire_host.cpp), so it reads no epgen::facts: an ll_combine
// unit static_asserts kS (layout_facts.SCALE_GROUP) and kLogfmtBytes (the host's slot size).
template <int H>
struct Wire {
    static constexpr int kG = (H + 127) / 128;                   // 128-channel groups
    static constexpr int kS = kG;                                 // FP8 scales
    static constexpr int kBlocks = H / 16;                        // 16-channel blocks
    static constexpr int kC = H % 1024 == 0 ? 1024 : 512;         // LogFMT chunk
    static constexpr int kChunks = (H + kC - 1) / kC;
    static constexpr int kFp8Bytes = (H + 4 * kS + 15) / 16 * 16;
    static constexpr int kLogfmtBytes = (4 * kG + 2 * H + 15) / 16 * 16;
    static_assert(H % 16 == 0 && kChunks <= 32, "hidden");

    // ---- FP8 e4m3 + float32 scale_inv per 128 (reference.per_token_cast_to_fp8) ----------------
    static __device__ __forceinline__ int fp8_encode(const int4* xrow, char* dst, int lane) {
        constexpr int kNC = H / 8;
        float* scales = reinterpret_cast<float*>(dst + H);
        #pragma unroll 1
        for (int c0 = 0; c0 < kNC; c0 += 32) {
            const int c = c0 + lane;          // 16 lanes = 128 channels = one group
            const bool active = c < kNC;
            float v[8];
            float amax = 0.f;
            if (active) {
                int4 raw = ld_nc_v4(xrow + c);
                const __nv_bfloat162* b = reinterpret_cast<const __nv_bfloat162*>(&raw);
                #pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float2 f = __bfloat1622float2(b[j]);
                    v[2 * j] = f.x; v[2 * j + 1] = f.y;
                }
                #pragma unroll
                for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(v[j]));
            }
            #pragma unroll
            for (int o = 8; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
            amax = fmaxf(amax, 1e-4f);
            const float scale_inv = __fdiv_rn(amax, 448.f);
            const float scale = __fdiv_rn(1.f, scale_inv);
            if (active) {
                uint32_t packed[2];
                #pragma unroll
                for (int j = 0; j < 2; ++j) {
                    float2 lo = make_float2(fminf(fmaxf(__fmul_rn(v[4 * j], scale), -448.f), 448.f),
                                            fminf(fmaxf(__fmul_rn(v[4 * j + 1], scale), -448.f), 448.f));
                    float2 hi = make_float2(fminf(fmaxf(__fmul_rn(v[4 * j + 2], scale), -448.f), 448.f),
                                            fminf(fmaxf(__fmul_rn(v[4 * j + 3], scale), -448.f), 448.f));
                    packed[j] = __nv_cvt_float2_to_fp8x2(lo, __NV_SATFINITE, __NV_E4M3) |
                                (__nv_cvt_float2_to_fp8x2(hi, __NV_SATFINITE, __NV_E4M3) << 16);
                }
                *reinterpret_cast<uint2*>(dst + c * 8) = make_uint2(packed[0], packed[1]);
                if ((c & 15) == 0) scales[c >> 4] = scale_inv;
            }
        }
        return H + 4 * kS;
    }

    // The 8 values of 16-byte unit c, float32(e4m3) * scale_inv (reference.per_token_cast_back).
    static __device__ __forceinline__ void fp8_decode8(const char* slot, int c, float* v) {
        const uint32_t w[2] = {ld_peer(slot + c * 8), ld_peer(slot + c * 8 + 4)};
        const float s = __uint_as_float(ld_peer(slot + H + 4 * (c >> 4)));
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(
                (__nv_fp8x2_storage_t)((w[j >> 1] >> (16 * (j & 1))) & 0xffffu), __NV_E4M3);
            const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
            v[2 * j] = __fmul_rn(f.x, s);
            v[2 * j + 1] = __fmul_rn(f.y, s);
        }
    }

    // ---- LogFMT-10 ---------------------------------------------------------------------------
    // The 16 channels of block b as 8 words of two bf16 each.
    static __device__ __forceinline__ void load_block(const int4* xrow, int b, uint32_t* w) {
        const int4 r0 = ld_nc_v4(xrow + 2 * b), r1 = ld_nc_v4(xrow + 2 * b + 1);
        w[0] = r0.x; w[1] = r0.y; w[2] = r0.z; w[3] = r0.w;
        w[4] = r1.x; w[5] = r1.y; w[6] = r1.z; w[7] = r1.w;
    }

    // Byte offset of chunk c in the message, given the bit mask of chunks sent as BF16.
    static __device__ __forceinline__ int chunk_offset(int c, uint32_t bad) {
        const int n_enc = c - __popc(bad & ((1u << c) - 1u));    // earlier chunks are whole
        return 4 * kG + c * 2 * kC - n_enc * (2 * kC - kC / 16 * 20);
    }

    static __device__ __forceinline__ int logfmt_total(uint32_t bad) {
        int total = 4 * kG;
        #pragma unroll 1
        for (int c = 0; c < kChunks; ++c) {
            const int n = min(kC, H - c * kC);
            total += ((bad >> c) & 1u) ? 2 * n : n / 16 * 20;
        }
        return total;
    }

    // Block b's 16 channels (zeros past the row) and its group's metadata word (amax | amin <<
    // 16 of the magnitudes' bf16 patterns, over the group's 8 lanes); all lanes call.
    static __device__ __forceinline__ uint32_t block_and_meta(const int4* xrow, int b, uint32_t* w) {
        uint32_t mx = 0u, mn = 0xffffu;
        #pragma unroll
        for (int j = 0; j < 8; ++j) w[j] = 0u;
        if (b < kBlocks) {
            load_block(xrow, b, w);
            #pragma unroll
            for (int j = 0; j < 16; ++j) {
                const uint32_t m = (w[j >> 1] >> (16 * (j & 1))) & 0x7fffu;
                mx = max(mx, m);
                mn = min(mn, m);
            }
        }
        #pragma unroll
        for (int o = 4; o > 0; o >>= 1) {
            mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            mn = min(mn, __shfl_xor_sync(0xffffffffu, mn, o));
        }
        return mx | (mn << 16);
    }

    // One warp encodes one row into dst (4-byte aligned); returns the message's bytes. Two
    // passes over the row (the second recomputes the metadata rather than hold it: registers).
    static __device__ int logfmt_encode(const int4* xrow, char* dst, int lane, const float* tab) {
        uint32_t bad = 0;
        #pragma unroll 1
        for (int b0 = 0; b0 < kBlocks; b0 += 32) {    // pass 1: metadata, which chunks qualify
            const int b = b0 + lane;                 // 8 lanes = 128 channels = one group
            uint32_t w[8];
            const uint32_t meta = block_and_meta(xrow, b, w);
            float la, lm;
            const bool ok = log_range(meta, tab, la, lm);
            if (b < kBlocks && (b & 7) == 0) *reinterpret_cast<uint32_t*>(dst + 4 * (b >> 3)) = meta;
            if (b < kBlocks && !ok) bad |= 1u << (b * 16 / kC);
        }
        bad = __reduce_or_sync(0xffffffffu, bad);
        #pragma unroll 1
        for (int b0 = 0; b0 < kBlocks; b0 += 32) {    // pass 2: the chunks
            const int b = b0 + lane;
            uint32_t w[8];
            const uint32_t meta = block_and_meta(xrow, b, w);
            if (b >= kBlocks) continue;
            const int c = b * 16 / kC;
            const int in_chunk = b - c * (kC / 16);
            uint32_t* out = reinterpret_cast<uint32_t*>(dst + chunk_offset(c, bad));
            if ((bad >> c) & 1u) {
                #pragma unroll
                for (int j = 0; j < 8; ++j) out[in_chunk * 8 + j] = w[j];
                continue;
            }
            float la, lm;
            log_range(meta, tab, la, lm);
            const float step = logfmt_step(la, lm);
            const float step_inv = __fdiv_rn(1.f, step);
            const float half = log2_near1(__fmul_rn(__fadd_rn(1.f, exp2_x(step)), 0.5f));
            const float rounding = __fsub_rn(2.f, __fmul_rn(half, step_inv));
            const float fused = __fsub_rn(rounding, __fmul_rn(lm, step_inv));
            uint32_t words[5] = {0u, 0u, 0u, 0u, 0u};
            #pragma unroll
            for (int j = 0; j < 16; ++j) {
                const uint32_t h = (w[j >> 1] >> (16 * (j & 1))) & 0xffffu;
                const float t = __fadd_rn(__fmul_rn(log2_bf16(h & 0x7fffu, tab), step_inv), fused);
                const uint32_t code = min(__float2uint_rd(fmaxf(t, 0.f)), 511u);
                const int bit = 9 * j;
                words[bit >> 5] |= code << (bit & 31);
                if ((bit & 31) > 23) words[(bit >> 5) + 1] |= code >> (32 - (bit & 31));
                words[4] |= (h >> 15) << (16 + j);
            }
            #pragma unroll
            for (int j = 0; j < 5; ++j) out[in_chunk * 5 + j] = words[j];
        }
        return logfmt_total(bad);
    }

    // The chunks sent as BF16 (bit c), from a received message's metadata; all lanes call.
    static __device__ __forceinline__ uint32_t logfmt_bad_chunks(const char* slot, int lane,
                                                                 const float* tab) {
        uint32_t bad = 0;
        for (int g = lane; g < kG; g += 32) {
            float la, lm;
            if (!log_range(ld_peer(slot + 4 * g), tab, la, lm))
                bad |= 1u << (g * 128 / kC);
        }
        return __reduce_or_sync(0xffffffffu, bad);
    }

    // acc[j] += w * value j of block b (reference.logfmt_decode; multiply and add rounded).
    static __device__ __forceinline__ void logfmt_add16(const char* slot, int b, uint32_t bad,
                                                        const float* tab, float w, float* acc) {
        const int c = b * 16 / kC;
        const int in_chunk = b - c * (kC / 16);
        const char* in = slot + chunk_offset(c, bad);
        if ((bad >> c) & 1u) {
            #pragma unroll
            for (int j = 0; j < 8; ++j) {
                const uint32_t x = ld_peer(in + 4 * (in_chunk * 8 + j));
                acc[2 * j] = __fadd_rn(acc[2 * j], __fmul_rn(w, __uint_as_float(x << 16)));
                acc[2 * j + 1] = __fadd_rn(acc[2 * j + 1], __fmul_rn(w, __uint_as_float(x & 0xffff0000u)));
            }
            return;
        }
        float la, lm;
        log_range(ld_peer(slot + 4 * (b >> 3)), tab, la, lm);
        const float step = logfmt_step(la, lm);
        uint32_t words[5];
        #pragma unroll
        for (int j = 0; j < 5; ++j) words[j] = ld_peer(in + 4 * (in_chunk * 5 + j));
        #pragma unroll
        for (int j = 0; j < 16; ++j) {
            const int bit = 9 * j;
            uint32_t code = words[bit >> 5] >> (bit & 31);
            if ((bit & 31) > 23) code |= words[(bit >> 5) + 1] << (32 - (bit & 31));
            code &= 0x1ffu;
            float x = code == 0u ? 0.f
                : exp2_x(__fadd_rn(__fmul_rn((float)((int)code - 1), step), lm));
            acc[j] = __fadd_rn(acc[j], __fmul_rn(w, ((words[4] >> (16 + j)) & 1u) ? -x : x));
        }
    }
};

}  // namespace llw
}  // namespace epgen
