// NVSHMEM device API under NVRTC (../shared/docs/nvshmem-nvrtc.md, recipe A).
// Only the point-to-point device headers: the collective headers cost ~2 s of NVRTC time and
// epgen's kernels synchronise with signals instead.
#pragma once
#include <cuda/std/type_traits>
// NVSHMEM <= 3.4 headers name std:: traits; NVRTC has no host standard library.
namespace std { using ::cuda::std::is_integral; using ::cuda::std::is_unsigned; using ::cuda::std::is_signed; }
// '#pragma once' header: include it first, then drop the device transports NVRTC cannot compile
// (IBGDA needs <infiniband/mlx5dv.h>). Remote PEs are then reached through the proxy path.
#include <non_abi/nvshmem_build_options.h>
#undef NVSHMEM_IBGDA_SUPPORT
#undef NVSHMEM_IBGDA_SUPPORT_GPUMEM_ONLY
#undef NVSHMEM_GPUNETIO_SUPPORT
#include <device/nvshmem_defines.h>
#include <device/nvshmemx_defines.h>
