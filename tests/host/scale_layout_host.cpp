// Host build of templates/ll_scale_layout.cuh (tests/test_scale_layout_host.py): the device's own
// index map, run on a CPU. stdin: lines "L E RM W"; stdout per line: total_words<L>(E, RM, W), then
// word_offset<L>(e, m, q, RM, W) for every (e, m, q) in row-major order.
#include <cstdint>
#include <cstdio>

#define __device__
#define __host__
#define __forceinline__ inline
#include "../../epgen/jit/templates/ll_scale_layout.cuh"

template <int L>
static void dump(int64_t E, int64_t RM, int64_t W) {
    std::printf("%lld", (long long)epgen::llsf::total_words<L>(E, RM, W));
    for (int64_t e = 0; e < E; ++e)
        for (int64_t m = 0; m < RM; ++m)
            for (int64_t q = 0; q < W; ++q)
                std::printf(" %lld", (long long)epgen::llsf::word_offset<L>(e, m, q, RM, W));
    std::printf("\n");
}

int main() {
    int L;
    long long E, RM, W;
    while (std::scanf("%d %lld %lld %lld", &L, &E, &RM, &W) == 4) {
        if (L == 0) dump<0>(E, RM, W);
        else if (L == 1) dump<1>(E, RM, W);
        else dump<2>(E, RM, W);
    }
    return 0;
}
