// The first include of every generated translation unit: everything heavy and fixed (NVSHMEM's
// point-to-point device API, CUDA's bf16/fp8 types, epgen's common helpers). NVRTC compiles it
// once into a precompiled header (compiler.py), so a kernel's cold compile parses only itself.
#pragma once
#include "nvshmem_prelude.cuh"
#include "common.cuh"
