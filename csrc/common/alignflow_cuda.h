// The one header every csrc/*.cu includes.
//
// Under nvcc it is plain CUDA. Built with a host compiler and -DALIGNFLOW_CUEMU, the same source runs
// on the CPU through the emulator in cuemu.h (each CUDA thread a fiber, see csrc/README.md), so CI
// runs every kernel against its PyTorch reference without a GPU.
//
// What a kernel must write through the macros below (the only differences from plain CUDA):
//   AF_SHARED(T, name, n)        a static __shared__ T name[n]
//   AF_DYNAMIC_SHARED(T, name)   extern __shared__ T name[] (the launch's dynamic shared memory)
//   AF_LAUNCH(kernel, grid, block, smem, stream, args...)   a launch; evaluates to its cudaError_t
// `kernel` is a plain name or a pointer variable (`auto k = &my_kernel<float, 4>;`): a template-id
// holds commas a macro would split.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#if defined(__CUDACC__)

#include <cuda_runtime.h>

#define AF_SHARED(T, name, n) __shared__ T name[n]
#define AF_DYNAMIC_SHARED(T, name) \
    extern __shared__ __align__(16) unsigned char af_dynamic_shared_[]; \
    T* name = reinterpret_cast<T*>(af_dynamic_shared_)
#define AF_LAUNCH(kernel, grid, block, smem, stream, ...) \
    (kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__), cudaGetLastError())

#elif defined(ALIGNFLOW_CUEMU)

#include "cuemu.h"

#else
#error "csrc/*.cu builds with nvcc, or with a host compiler and -DALIGNFLOW_CUEMU (the CPU emulator)"
#endif

#define AF_C_EXPORT extern "C" __attribute__((visibility("default")))
