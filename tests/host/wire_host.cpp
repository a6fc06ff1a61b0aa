// Host build of templates/ll_combine_wire.cuh's encoders and decoders (tests/test_combine_wire_host.py):
// a warp is 32 std::threads in lockstep at the shuffles, the float intrinsics are the host's
// IEEE single operations (built with -ffp-contract=off), so the device code itself, not a
// re-statement of it, is checked bit for bit against epgen.reference on a CPU.
// stdin: format (1 fp8_e4m3_f32_128, 2 logfmt10), H, T, then T rows of H bf16 (uint16). stdout:
// per row the message bytes (count, then bytes), then the H decoded float32 bit patterns. The
// CUDA conversions the FP8 path uses are written out below (e4m3: round to nearest even over the
// finite values, the kernel having clamped to +-448).
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

#define __device__
#define __host__
#define __forceinline__ inline
#define __constant__
struct int4 { int x, y, z, w; };
struct uint2 { uint32_t x, y; };
struct float2 { float x, y; };
inline uint2 make_uint2(uint32_t a, uint32_t b) { return {a, b}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
struct Dim { unsigned x; };
static thread_local Dim threadIdx{0};
static Dim blockDim{32};
struct __nv_bfloat162 { uint16_t x, y; };
struct __half2_raw { float x, y; };        // e4m3 -> half -> float is exact: hold the floats
typedef __half2_raw __half2;
typedef unsigned short __nv_fp8x2_storage_t;
enum { __NV_SATFINITE, __NV_E4M3 };
inline float bf16_to_float(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline float2 __bfloat1622float2(__nv_bfloat162 b) { return {bf16_to_float(b.x), bf16_to_float(b.y)}; }
inline float e4m3_value(uint32_t c) {                 // finite codes 0..126 (no sign)
    const int e = (c >> 3) & 15, m = c & 7;
    return e == 0 ? std::ldexp((float)m, -9) : std::ldexp(1.f + m / 8.f, e - 7);
}
inline uint32_t e4m3_rn(float v) {
    const float a = std::fabs(v);
    uint32_t best = 0;
    for (uint32_t c = 1; c < 127; ++c) {
        const float d = std::fabs(e4m3_value(c) - a), db = std::fabs(e4m3_value(best) - a);
        if (d < db || (d == db && (c & 1) == 0)) best = c;
    }
    return best | (std::signbit(v) ? 0x80u : 0u);
}
inline uint32_t __nv_cvt_float2_to_fp8x2(float2 v, int, int) { return e4m3_rn(v.x) | (e4m3_rn(v.y) << 8); }
inline float e4m3_signed(uint32_t c) { const float f = e4m3_value(c & 0x7f); return (c & 0x80) ? -f : f; }
inline __half2_raw __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t v, int) {
    return {e4m3_signed(v & 0xff), e4m3_signed(v >> 8)};
}
inline float2 __half22float2(__half2 h) { return {h.x, h.y}; }
inline int4 ld_nc_v4(const int4* p) { return *p; }

inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline uint32_t __float2uint_rd(float x) {
    if (!(x > 0.f)) return 0u;
    double f = std::floor((double)x);
    return f >= 4294967295.0 ? 0xffffffffu : (uint32_t)f;
}
inline int __clz(int x) { return __builtin_clz((unsigned)x); }
inline int __popc(uint32_t x) { return __builtin_popcount(x); }
using std::max; using std::min; using std::fmaxf; using std::fminf; using std::rintf;

// Lockstep warp collectives.
static std::barrier<>* g_bar;
static uint64_t g_slot[32];
template <class T> T exchange(T v, int src) {
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    g_slot[threadIdx.x] = u;
    g_bar->arrive_and_wait();
    uint64_t r = g_slot[src];
    g_bar->arrive_and_wait();
    T out;
    std::memcpy(&out, &r, sizeof(T));
    return out;
}
template <class T> T __shfl_xor_sync(unsigned, T v, int o) { return exchange(v, (int)threadIdx.x ^ o); }
inline uint32_t __reduce_or_sync(unsigned, uint32_t v) {
    g_slot[threadIdx.x] = v;
    g_bar->arrive_and_wait();
    uint32_t r = 0;
    for (int i = 0; i < 32; ++i) r |= (uint32_t)g_slot[i];
    g_bar->arrive_and_wait();
    return r;
}

#include "../../epgen/jit/templates/ll_combine_wire.cuh"
using namespace epgen::llw;

template <int H>
void run(int fmt, int T) {
    using W = Wire<H>;
    std::vector<uint16_t> x((size_t)T * H);
    if (fread(x.data(), 2, x.size(), stdin) != x.size()) { fprintf(stderr, "short input\n"); exit(2); }
    float tab[128];
    for (int i = 0; i < 128; ++i) tab[i] = __uint_as_float(kLog2_1pM[i]);
    std::barrier<> bar(32);
    g_bar = &bar;
    for (int t = 0; t < T; ++t) {
        std::vector<int4> row(H / 8);
        std::memcpy(row.data(), x.data() + (size_t)t * H, 2 * H);
        std::vector<uint32_t> msg(W::kLogfmtBytes / 4 + 8, 0xdeadbeefu);
        std::vector<float> out(H);
        int nbytes = 0;
        std::vector<std::thread> lanes;
        for (int l = 0; l < 32; ++l)
            lanes.emplace_back([&, l] {
                threadIdx.x = l;
                char* dst = reinterpret_cast<char*>(msg.data());
                if (fmt == 1) {
                    const int n = W::fp8_encode(row.data(), dst, l);
                    if (l == 0) nbytes = n;
                    bar.arrive_and_wait();
                    for (int c = l; c < H / 8; c += 32) W::fp8_decode8(dst, c, &out[8 * c]);
                    return;
                }
                const int n = W::logfmt_encode(row.data(), dst, l, tab);
                if (l == 0) nbytes = n;
                bar.arrive_and_wait();
                for (int p = 0; p < (W::kBlocks + 31) / 32; ++p) {
                    const uint32_t bad = W::logfmt_bad_chunks(dst, l, tab);
                    const int b = p * 32 + l;
                    if (b >= W::kBlocks) continue;
                    float acc[16] = {0.f};           // one addend of weight 1: the values
                    W::logfmt_add16(dst, b, bad, tab, 1.f, acc);
                    for (int j = 0; j < 16; ++j) out[16 * b + j] = acc[j];
                }
            });
        for (auto& th : lanes) th.join();
        printf("%d", nbytes);
        const unsigned char* bytes = reinterpret_cast<const unsigned char*>(msg.data());
        for (int i = 0; i < nbytes; ++i) printf(" %u", bytes[i]);
        printf("\n");
        for (int i = 0; i < H; ++i) {
            uint32_t u; std::memcpy(&u, &out[i], 4);
            printf("%u%c", u, i + 1 < H ? ' ' : '\n');
        }
    }
}

int main() {
    int fmt, H, T;
    if (scanf("%d %d %d", &fmt, &H, &T) != 3) return 2;
    getchar();
    switch (H) {
        case 7168: run<7168>(fmt, T); break;
        case 4096: run<4096>(fmt, T); break;
        case 2880: run<2880>(fmt, T); break;
        case 512: run<512>(fmt, T); break;
        default: fprintf(stderr, "hidden %d not built\n", H); return 2;
    }
    return 0;
}
