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

// Round a value through T (the value T would store), in fp32.
template <class T>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int round_up(int a, int b) { return (a + b - 1) / b * b; }
inline int ceil_div(long long a, long long b) { return int((a + b - 1) / b); }

}  // namespace alignflow
