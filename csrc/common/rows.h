// Helpers shared by the row-wise kernels: dtype codes, fp32 conversion, 128-bit vector loads and
// stores, and a deterministic row reduction over a group of warps.
#pragma once

#include "alignflow_cuda.h"

#include <cstdint>
#include <initializer_list>

namespace alignflow {

// dtype codes of the C launchers (kernels/_cuda.py passes the same numbers)
enum Dtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// VEC consecutive elements as fp32: 128-bit loads when VEC elements span whole 16-byte words (the
// caller guarantees 16-byte alignment then), element loads otherwise.
template <int VEC, class T>
__device__ __forceinline__ void load(const T* __restrict__ p, float* out) {
    constexpr int kBytes = VEC * int(sizeof(T));
    if constexpr (kBytes % 16 == 0) {
        constexpr int kPer = 16 / int(sizeof(T));
#pragma unroll
        for (int c = 0; c < kBytes / 16; ++c) {
            uint4 word = reinterpret_cast<const uint4*>(p)[c];
            const T* e = reinterpret_cast<const T*>(&word);
#pragma unroll
            for (int k = 0; k < kPer; ++k) out[c * kPer + k] = to_float(e[k]);
        }
    } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = to_float(p[k]);
    }
}

template <int VEC, class T>
__device__ __forceinline__ void store(T* __restrict__ p, const float* in) {
    constexpr int kBytes = VEC * int(sizeof(T));
    if constexpr (kBytes % 16 == 0) {
        constexpr int kPer = 16 / int(sizeof(T));
#pragma unroll
        for (int c = 0; c < kBytes / 16; ++c) {
            uint4 word;
            T* e = reinterpret_cast<T*>(&word);
#pragma unroll
            for (int k = 0; k < kPer; ++k) e[k] = from_float<T>(in[c * kPer + k]);
            reinterpret_cast<uint4*>(p)[c] = word;
        }
    } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) p[k] = from_float<T>(in[k]);
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Sum `v` over the G threads of this thread's row; `buffer` holds one float per warp of the block.
// Every thread of the block calls it (a __syncthreads inside when a row spans several warps).
// (Smem: a float array under nvcc, the emulator's checked shared array under g++.)
template <class Smem>
__device__ __forceinline__ float row_sum(float v, Smem& buffer, int warps_per_row) {
    v = warp_sum(v);
    if (warps_per_row == 1) return v;
    int warp = int((threadIdx.y * blockDim.x + threadIdx.x) / 32);
    int first = int(threadIdx.y) * warps_per_row;
    if (threadIdx.x % 32 == 0) buffer[warp] = v;
    __syncthreads();
    float s = 0.0f;
    for (int w = 0; w < warps_per_row; ++w) s += buffer[first + w];
    return s;
}

// At most 256 threads per block (the launcher's rows-per-block choice): a 1024-thread bound would cap
// registers at 64, where the 16-element scalar build spilled 4 bytes (ptxas -v, sm_90a).
// Round a value through T (the value T would store), in fp32.
template <class T>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int round_up(int a, int b) { return (a + b - 1) / b * b; }
inline int ceil_div(long long a, long long b) { return int((a + b - 1) / b); }

}  // namespace alignflow
