/* What the host primitives a replayed call is made of cost on this machine, from C (no Python):
   cuLaunchKernel of an empty kernel taking a 216-byte struct (the LL combine's size),
   cuEventRecord of a timing-less event (torch.cuda.Event()'s flags), cuStreamIsCapturing,
   each LAUNCHES times with the stream held by a spinning kernel (the calls only queue; the
   driver's queue holds fewer than 2000 launches: a held loop of 2000 measured the spin, 52 us a
   launch, on the H200 host of ab11ee9), the best of ROUNDS rounds.
   bench/host_primitives.py builds and runs it (with and without an MPS daemon). */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static const char *PTX =
    ".version 8.0\n.target sm_90\n.address_size 64\n"
    ".visible .entry empty(.param .align 8 .b8 p[216]) { ret; }\n"
    ".visible .entry spin(.param .u64 cycles) {\n"
    " .reg .u64 %r<4>; .reg .pred %p;\n"
    " ld.param.u64 %r1, [cycles]; mov.u64 %r2, %clock64;\n"
    "L: mov.u64 %r3, %clock64; sub.u64 %r3, %r3, %r2; setp.lt.u64 %p, %r3, %r1; @%p bra L;\n"
    " ret; }\n";

/* the driver's entry points, looked up in libcuda.so.1 (no toolkit headers needed) */
typedef int CUresult;
typedef void *CUcontext, *CUmodule, *CUfunction, *CUstream, *CUevent;
typedef int CUdevice, CUstreamCaptureStatus;
enum { CU_STREAM_NON_BLOCKING = 1, CU_EVENT_DISABLE_TIMING = 2 };
static CUresult (*cuInit)(unsigned);
static CUresult (*cuDeviceGet)(CUdevice *, int);
static CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice);
static CUresult (*cuCtxSetCurrent)(CUcontext);
static CUresult (*cuModuleLoadData)(CUmodule *, const void *);
static CUresult (*cuModuleGetFunction)(CUfunction *, CUmodule, const char *);
static CUresult (*cuStreamCreate)(CUstream *, unsigned);
static CUresult (*cuEventCreate)(CUevent *, unsigned);
static CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                                  unsigned, unsigned, CUstream, void **, void **);
static CUresult (*cuEventRecord)(CUevent, CUstream);
static CUresult (*cuStreamIsCapturing)(CUstream, CUstreamCaptureStatus *);
static CUresult (*cuStreamSynchronize)(CUstream);

static void load_driver(void) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) { fprintf(stderr, "%s\n", dlerror()); exit(1); }
#define SYM(f, name) if (!(*(void **)&f = dlsym(lib, name))) { fprintf(stderr, "no %s\n", name); exit(1); }
    SYM(cuInit, "cuInit"); SYM(cuDeviceGet, "cuDeviceGet");
    SYM(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain"); SYM(cuCtxSetCurrent, "cuCtxSetCurrent");
    SYM(cuModuleLoadData, "cuModuleLoadData"); SYM(cuModuleGetFunction, "cuModuleGetFunction");
    SYM(cuStreamCreate, "cuStreamCreate"); SYM(cuEventCreate, "cuEventCreate");
    SYM(cuLaunchKernel, "cuLaunchKernel"); SYM(cuEventRecord, "cuEventRecord");
    SYM(cuStreamIsCapturing, "cuStreamIsCapturing"); SYM(cuStreamSynchronize, "cuStreamSynchronize");
#undef SYM
}

#define CK(x) do { CUresult r_ = (x); if (r_) { fprintf(stderr, "%s: %d\n", #x, r_); exit(1); } } while (0)

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

int main(void) {
    CUdevice dev; CUcontext ctx; CUmodule mod; CUfunction empty, spin; CUstream s; CUevent ev;
    load_driver();
    CK(cuInit(0)); CK(cuDeviceGet(&dev, 0)); CK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CK(cuCtxSetCurrent(ctx)); CK(cuModuleLoadData(&mod, PTX));
    CK(cuModuleGetFunction(&empty, mod, "empty")); CK(cuModuleGetFunction(&spin, mod, "spin"));
    CK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING)); CK(cuEventCreate(&ev, CU_EVENT_DISABLE_TIMING));
    unsigned char args[216] = {0};
    void *params[1] = {args};
    unsigned long long cycles = 20000000ull;      /* ~10 ms at ~2 GHz: longer than a round's calls */
    void *spin_params[1] = {&cycles};
    enum { LAUNCHES = 200, ROUNDS = 10 };
    double launch = 1e30, record = 1e30, capturing = 1e30, both = 1e30;
    for (int round = 0; round <= ROUNDS; round++) {      /* round 0 warms up */
        double t0, us;
        CUstreamCaptureStatus st;
        CK(cuLaunchKernel(spin, 1, 1, 1, 32, 1, 1, 0, s, spin_params, NULL));
        t0 = now_us();
        for (int i = 0; i < LAUNCHES; i++)
            CK(cuLaunchKernel(empty, 1, 1, 1, 32, 1, 1, 0, s, params, NULL));
        us = (now_us() - t0) / LAUNCHES;
        if (round && us < launch) launch = us;
        t0 = now_us();
        for (int i = 0; i < LAUNCHES; i++) CK(cuEventRecord(ev, s));
        us = (now_us() - t0) / LAUNCHES;
        if (round && us < record) record = us;
        t0 = now_us();
        for (int i = 0; i < LAUNCHES; i++) CK(cuStreamIsCapturing(s, &st));
        us = (now_us() - t0) / LAUNCHES;
        if (round && us < capturing) capturing = us;
        CK(cuStreamSynchronize(s));
        CK(cuLaunchKernel(spin, 1, 1, 1, 32, 1, 1, 0, s, spin_params, NULL));
        t0 = now_us();
        for (int i = 0; i < LAUNCHES / 2; i++) {
            CK(cuLaunchKernel(empty, 1, 1, 1, 32, 1, 1, 0, s, params, NULL));
            CK(cuLaunchKernel(empty, 1, 1, 1, 32, 1, 1, 0, s, params, NULL));
        }
        us = (now_us() - t0) / (LAUNCHES / 2);
        if (round && us < both) both = us;
        CK(cuStreamSynchronize(s));
    }
    printf("C: cuLaunchKernel %.2f us | cuEventRecord %.2f us | cuStreamIsCapturing %.2f us"
           " | two launches %.2f us\n", launch, record, capturing, both);
    return 0;
}
