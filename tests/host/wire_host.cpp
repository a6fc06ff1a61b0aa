// Host build of templates/ll_combine_wire.cuh's LogFMT-10 paths (tests/test_combine_wire_host.py):
// a warp is 32 std::threads in lockstep at the shuffles, the float intrinsics are the host's
// IEEE single operations (built with -ffp-contract=off), so the device code itself, not a
// re-statement of it, is checked bit for bit against epgen.reference on a CPU.
// stdin: H, T, then T rows of H bf16 (uint16). stdout: per row the message bytes (count, then
// bytes), then the H decoded float32 bit patterns.
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
// Declared only (the FP8 paths are not instantiated here).
struct __nv_bfloat162 {}; struct __half2 {}; struct __half2_raw {};
typedef unsigned short __nv_fp8x2_storage_t;
enum { __NV_SATFINITE, __NV_E4M3 };
float2 __bfloat1622float2(__nv_bfloat162);
uint32_t __nv_cvt_float2_to_fp8x2(float2, int, int);
__half2_raw __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t, int);
float2 __half22float2(__half2);
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

#include "../../epgen/templates/ll_combine_wire.cuh"
using namespace epgen::llw;

template <int H>
void run(int T) {
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
    int H, T;
    if (scanf("%d %d", &H, &T) != 2) return 2;
    getchar();
    switch (H) {
        case 7168: run<7168>(T); break;
        case 4096: run<4096>(T); break;
        case 2880: run<2880>(T); break;
        case 512: run<512>(T); break;
        default: fprintf(stderr, "hidden %d not built\n", H); return 2;
    }
    return 0;
}
