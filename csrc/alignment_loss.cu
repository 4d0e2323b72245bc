// REPA alignment loss in CUDA C++: the contract of kernels/alignment_loss.py (reference_alignment_loss
// is the specification). Per token row of p = z_pred, q = z_target (R rows of D, contiguous):
//
//   forward:  stats (3, R) fp32 = cos, |p|, |q|;   cos = <p, q> / (max(|p|, eps) max(|q|, eps))
//   backward: dp = g (q / (P Q) - cos p / P^2),  dq = g (p / (P Q) - cos q / Q^2)   (P, Q the clamped
//             norms; the cos / P^2 term is 0 where |p| < eps: clamp_min passes no gradient)
//
// A group of G = 32 k threads per row walks the row in VEC-element vectors (128-bit loads when D is a
// multiple of VEC and the pointers 16-byte aligned); the forward's three sums reduce by warp shuffles,
// then the warp partials in a fixed order (deterministic). The backward needs no reduction.
#include "common/rows.h"

namespace alignflow {
namespace {

template <class T, int VEC>
__global__ void __launch_bounds__(256)
alignment_forward_kernel(const T* __restrict__ p, const T* __restrict__ q, float* __restrict__ stats, long long R,
                         int D, float eps) {
    AF_SHARED(float, dot_buffer, 32);
    AF_SHARED(float, pp_buffer, 32);
    AF_SHARED(float, qq_buffer, 32);
    const int G = int(blockDim.x), warps_per_row = G / 32;
    const long long row = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    const bool valid = row < R;
    float dot = 0.0f, pp = 0.0f, qq = 0.0f;
    if (valid) {
        for (int col = int(threadIdx.x) * VEC; col < D; col += G * VEC) {
            float a[VEC], b[VEC];
            load<VEC>(p + row * D + col, a);
            load<VEC>(q + row * D + col, b);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                dot += a[k] * b[k];
                pp += a[k] * a[k];
                qq += b[k] * b[k];
            }
        }
    }
    dot = row_sum(dot, dot_buffer, warps_per_row);
    pp = row_sum(pp, pp_buffer, warps_per_row);
    qq = row_sum(qq, qq_buffer, warps_per_row);
    if (!valid || threadIdx.x != 0) return;
    const float p_norm = sqrtf(pp), q_norm = sqrtf(qq);
    stats[row] = dot / (fmaxf(p_norm, eps) * fmaxf(q_norm, eps));
    stats[R + row] = p_norm;
    stats[2 * R + row] = q_norm;
}

template <class T, int VEC>
__global__ void __launch_bounds__(256)
alignment_backward_kernel(const T* __restrict__ p, const T* __restrict__ q, const float* __restrict__ stats,
                          const float* __restrict__ g_cos, T* __restrict__ dp, T* __restrict__ dq, long long R, int D,
                          float eps) {
    const int G = int(blockDim.x);
    const long long row = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= R) return;
    const float cos = stats[row], p_norm = stats[R + row], q_norm = stats[2 * R + row], g = g_cos[row];
    const float p_den = fmaxf(p_norm, eps), q_den = fmaxf(q_norm, eps);
    const float p_self = p_norm >= eps ? g * cos / (p_den * p_den) : 0.0f;
    const float q_self = q_norm >= eps ? g * cos / (q_den * q_den) : 0.0f;
    const float cross = g / (p_den * q_den);
    for (int col = int(threadIdx.x) * VEC; col < D; col += G * VEC) {
        float a[VEC], b[VEC], out[VEC];
        load<VEC>(p + row * D + col, a);
        load<VEC>(q + row * D + col, b);
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = cross * b[k] - p_self * a[k];
        store<VEC>(dp + row * D + col, out);
        if (dq != nullptr) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) out[k] = cross * a[k] - q_self * b[k];
            store<VEC>(dq + row * D + col, out);
        }
    }
}

// Threads per row: about 4 vectors each, 32 to 256; rows per block to fill 256 threads.
inline dim3 block_shape(int D, int vec) {
    const int G = min(256, max(32, round_up(ceil_div(ceil_div(D, vec), 4), 32)));
    return dim3(G, max(1, 256 / G));
}

template <class T, int VEC>
cudaError_t forward(const void* p, const void* q, float* stats, long long R, int D, float eps, cudaStream_t stream) {
    const dim3 block = block_shape(D, VEC);
    auto alignment_forward = &alignment_forward_kernel<T, VEC>;
    return AF_LAUNCH(alignment_forward, dim3(ceil_div(R, block.y)), block, 0, stream, static_cast<const T*>(p),
                     static_cast<const T*>(q), stats, R, D, eps);
}

template <class T, int VEC>
cudaError_t backward(const void* p, const void* q, const float* stats, const float* g, void* dp, void* dq, long long R,
                     int D, float eps, cudaStream_t stream) {
    const dim3 block = block_shape(D, VEC);
    auto alignment_backward = &alignment_backward_kernel<T, VEC>;
    return AF_LAUNCH(alignment_backward, dim3(ceil_div(R, block.y)), block, 0, stream, static_cast<const T*>(p),
                     static_cast<const T*>(q), stats, g, static_cast<T*>(dp), static_cast<T*>(dq), R, D, eps);
}

template <class F>
cudaError_t dispatch(int dtype, F&& f) {
    if (dtype == kFloat32) return f(float{});
    if (dtype == kBFloat16) return f(__nv_bfloat16{});
    if (dtype == kFloat16) return f(__half{});
    return cudaErrorNotSupported;
}

}  // namespace
}  // namespace alignflow

using namespace alignflow;

// 1 when the kernels take p and q of these dtypes (codes: 0 fp32, 1 bf16, 2 fp16; one dtype for both).
AF_C_EXPORT int alignflow_alignment_supported(int p_dtype, int q_dtype) {
    return p_dtype == q_dtype && dispatch(p_dtype, [](auto) { return cudaSuccess; }) == cudaSuccess;
}

// stats: (3, R) fp32 = cos, |p|, |q| of each of the R rows of D elements of p and q.
AF_C_EXPORT int alignflow_alignment_forward(const void* p, const void* q, float* stats, long long R, int D, float eps,
                                            int dtype, cudaStream_t stream) {
    if (R < 1 || D < 1 || R > 2147483647LL * 8) return cudaErrorInvalidValue;
    return dispatch(dtype, [&](auto t) {
        using T = decltype(t);
        constexpr int kVec = 16 / int(sizeof(T));
        if (D % kVec == 0 && aligned16(p) && aligned16(q)) return forward<T, kVec>(p, q, stats, R, D, eps, stream);
        return forward<T, 1>(p, q, stats, R, D, eps, stream);
    });
}

// dp (and dq unless null) from the forward's stats and g = d loss / d cos per row (fp32).
AF_C_EXPORT int alignflow_alignment_backward(const void* p, const void* q, const float* stats, const float* g, void* dp,
                                             void* dq, long long R, int D, float eps, int dtype, cudaStream_t stream) {
    if (R < 1 || D < 1 || R > 2147483647LL * 8) return cudaErrorInvalidValue;
    return dispatch(dtype, [&](auto t) {
        using T = decltype(t);
        constexpr int kVec = 16 / int(sizeof(T));
        if (D % kVec == 0 && aligned16(p) && aligned16(q) && aligned16(dp) && (!dq || aligned16(dq)))
            return backward<T, kVec>(p, q, stats, g, dp, dq, R, D, eps, stream);
        return backward<T, 1>(p, q, stats, g, dp, dq, R, D, eps, stream);
    });
}
