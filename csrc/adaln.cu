// adaLN-Zero glue of a SiT block in CUDA C++: the contract of kernels/adaln.py (its reference_*
// functions are the specification).
//
//   forward:  [x_new = x + gate * h (stored in x's dtype)]   y = LN(x_or_x_new) * (1 + scale) + shift
//   backward: dx (x's dtype), dh = gate * dx, and per-sample d_shift, d_scale, d_gate in fp32
//
// x, h, y: (B, N, D) contiguous rows; gate, shift, scale: (B, D) contiguous. Statistics in fp32; the
// LayerNorm of the residual op normalises x_new as stored (rounded to x's dtype), as the backward
// reads it. Rows are handled by a group of G = 32 * k threads (a warp for D <= 256 bf16 elements);
// each thread holds ITEMS vectors of VEC elements, loaded with 128-bit loads when D is a multiple of
// VEC and the pointers 16-byte aligned (element loads otherwise). Row sums: a warp shuffle reduction,
// then the G / 32 warp partials through shared memory in a fixed order; the backward's per-sample
// column sums: one partial per (sample, tile) in registers, summed over tiles by a second kernel in a
// fixed order. No atomics: results are bitwise deterministic for a given shape.
#include "common/rows.h"

namespace alignflow {
namespace {

template <class TX, class TM, int VEC, int ITEMS>
__global__ void __launch_bounds__(256)
adaln_forward_kernel(const TX* __restrict__ x, const TM* __restrict__ h, const TM* __restrict__ gate,
                     const TM* __restrict__ shift, const TM* __restrict__ scale, TX* __restrict__ x_new,
                     TM* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                     long long rows, int N, int D, float eps) {
    AF_SHARED(float, sum_buffer, 32);  // two buffers: the second reduction needs no barrier before it
    AF_SHARED(float, var_buffer, 32);
    const int G = int(blockDim.x), warps_per_row = G / 32;
    const long long row = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    const bool valid = row < rows;
    const long long b = valid ? row / N : 0;
    const TX* x_row = x + row * D;
    float v[ITEMS][VEC];
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        const int col = (i * G + int(threadIdx.x)) * VEC;
        if (valid && col < D) {
            load<VEC>(x_row + col, v[i]);
            if (h != nullptr) {
                float hv[VEC], gv[VEC];
                load<VEC>(h + row * D + col, hv);
                load<VEC>(gate + b * D + col, gv);
#pragma unroll
                for (int k = 0; k < VEC; ++k) v[i][k] = round_to<TX>(v[i][k] + gv[k] * hv[k]);
                store<VEC>(x_new + row * D + col, v[i]);
            }
#pragma unroll
            for (int k = 0; k < VEC; ++k) s += v[i][k];
        }
    }
    const float mean = row_sum(s, sum_buffer, warps_per_row) / float(D);
    float c = 0.0f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        const int col = (i * G + int(threadIdx.x)) * VEC;
        if (valid && col < D) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                v[i][k] -= mean;
                c += v[i][k] * v[i][k];
            }
        }
    }
    const float rstd = 1.0f / sqrtf(row_sum(c, var_buffer, warps_per_row) / float(D) + eps);
    if (!valid) return;  // after the last barrier
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        const int col = (i * G + int(threadIdx.x)) * VEC;
        if (col < D) {
            float sh[VEC], sc[VEC], out[VEC];
            load<VEC>(shift + b * D + col, sh);
            load<VEC>(scale + b * D + col, sc);
#pragma unroll
            for (int k = 0; k < VEC; ++k) out[k] = v[i][k] * rstd * (1.0f + sc[k]) + sh[k];
            store<VEC>(y + row * D + col, out);
        }
    }
    if (threadIdx.x == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// One block per (sample, tile of rows); G threads walk the tile's rows one at a time, reducing each
// row's two sums through a shared buffer that alternates between rows (so one barrier per row).
// The block bound is the widest row's G: 512 threads for VEC = 8 (1024 would cap registers at 64,
// where the 8-element build spilled 28 bytes, ptxas -v sm_90a), 1024 for VEC = 4 and the scalar build.
template <class TX, class TM, int VEC, int ITEMS>
__global__ void __launch_bounds__(VEC == 8 ? 512 : 1024)
adaln_backward_kernel(const TX* __restrict__ x, const TM* __restrict__ h, const TM* __restrict__ gate,
                      const TM* __restrict__ scale, const float* __restrict__ mean,
                      const float* __restrict__ rstd, const TM* __restrict__ dy,
                      const TX* __restrict__ g_x_new, TX* __restrict__ dx, TM* __restrict__ dh,
                      float* __restrict__ partial, int N, int D, int tiles, int rows_per_tile,
                      int need_modulation, int need_gate) {
    AF_SHARED(float, g_buffer, 64);  // [parity][warp]
    AF_SHARED(float, gx_buffer, 64);
    const int G = int(blockDim.x), warps = G / 32, warp = int(threadIdx.x) / 32;
    const long long b = blockIdx.x / tiles;
    const int tile = int(blockIdx.x % tiles);
    float sc[ITEMS][VEC], gt[ITEMS][VEC];
    float d_shift[ITEMS][VEC], d_scale[ITEMS][VEC], d_gate[ITEMS][VEC];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        const int col = (i * G + int(threadIdx.x)) * VEC;
#pragma unroll
        for (int k = 0; k < VEC; ++k) d_shift[i][k] = d_scale[i][k] = d_gate[i][k] = sc[i][k] = gt[i][k] = 0.0f;
        if (col < D) {
            load<VEC>(scale + b * D + col, sc[i]);
            if (h != nullptr) load<VEC>(gate + b * D + col, gt[i]);
        }
    }
    const int n_end = min(N, (tile + 1) * rows_per_tile);
    for (int n = tile * rows_per_tile, parity = 0; n < n_end; ++n, parity ^= 1) {
        const long long row = b * N + n;
        const float mu = mean[row], rs = rstd[row];
        float x_hat[ITEMS][VEC], g[ITEMS][VEC];
        float sum_g = 0.0f, sum_gx = 0.0f;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            const int col = (i * G + int(threadIdx.x)) * VEC;
#pragma unroll
            for (int k = 0; k < VEC; ++k) x_hat[i][k] = g[i][k] = 0.0f;
            if (col < D) {
                float dyv[VEC];
                load<VEC>(x + row * D + col, x_hat[i]);
                load<VEC>(dy + row * D + col, dyv);
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    x_hat[i][k] = (x_hat[i][k] - mu) * rs;
                    g[i][k] = dyv[k] * (1.0f + sc[i][k]);  // d loss / d x_hat
                    sum_g += g[i][k];
                    sum_gx += g[i][k] * x_hat[i][k];
                    d_shift[i][k] += dyv[k];
                    d_scale[i][k] += dyv[k] * x_hat[i][k];
                }
            }
        }
        sum_g = warp_sum(sum_g);
        sum_gx = warp_sum(sum_gx);
        if (warps > 1) {
            if (threadIdx.x % 32 == 0) {
                g_buffer[parity * 32 + warp] = sum_g;
                gx_buffer[parity * 32 + warp] = sum_gx;
            }
            __syncthreads();
            sum_g = sum_gx = 0.0f;
            for (int w = 0; w < warps; ++w) {
                sum_g += g_buffer[parity * 32 + w];
                sum_gx += gx_buffer[parity * 32 + w];
            }
        }
        const float mean_g = sum_g / float(D), mean_gx = sum_gx / float(D);
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            const int col = (i * G + int(threadIdx.x)) * VEC;
            if (col < D) {
                float d[VEC];
#pragma unroll
                for (int k = 0; k < VEC; ++k) d[k] = (g[i][k] - mean_g - x_hat[i][k] * mean_gx) * rs;
                if (g_x_new != nullptr) {
                    float gx[VEC];
                    load<VEC>(g_x_new + row * D + col, gx);
#pragma unroll
                    for (int k = 0; k < VEC; ++k) d[k] += gx[k];
                }
                if (need_gate) {
                    float hv[VEC];
                    load<VEC>(h + row * D + col, hv);
#pragma unroll
                    for (int k = 0; k < VEC; ++k) d_gate[i][k] += d[k] * hv[k];
                }
                if (dh != nullptr) {
                    float o[VEC];
#pragma unroll
                    for (int k = 0; k < VEC; ++k) o[k] = gt[i][k] * d[k];
                    store<VEC>(dh + row * D + col, o);
                }
                if (dx != nullptr) store<VEC>(dx + row * D + col, d);
            }
        }
    }
    // partial: (B, tiles, 3, D) = d_shift, d_scale, d_gate of this tile's rows
    float* out = partial + (b * tiles + tile) * 3LL * D;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        const int col = (i * G + int(threadIdx.x)) * VEC;
        if (col < D) {
            if (need_modulation) {
                for (int k = 0; k < VEC; ++k) out[col + k] = d_shift[i][k];
                for (int k = 0; k < VEC; ++k) out[D + col + k] = d_scale[i][k];
            }
            if (need_gate)
                for (int k = 0; k < VEC; ++k) out[2 * D + col + k] = d_gate[i][k];
        }
    }
}

// sums (B, 3, D) = partial (B, tiles, 3, D) summed over tiles in order.
__global__ void __launch_bounds__(256)
adaln_tile_sum_kernel(const float* __restrict__ partial, float* __restrict__ sums, int tiles, int D) {
    const long long b = blockIdx.y;
    const int j = int(blockIdx.x * blockDim.x + threadIdx.x);
    if (j >= 3 * D) return;
    float s = 0.0f;
    for (int t = 0; t < tiles; ++t) s += partial[(b * tiles + t) * 3LL * D + j];
    sums[b * 3LL * D + j] = s;
}

// Threads per row for rows of `vectors` vectors at ITEMS vectors per thread: a multiple of 32.
inline int threads_per_row(int vectors, int items) { return max(32, round_up(ceil_div(vectors, items), 32)); }

template <class TX, class TM, int VEC>
cudaError_t forward(const void* x, const void* h, const void* gate, const void* shift, const void* scale, void* x_new,
                    void* y, float* mean, float* rstd, int B, int N, int D, float eps, cudaStream_t stream) {
    constexpr int kItems = VEC == 1 ? 16 : 16 / VEC;  // 16 elements per thread and tensor
    const int G = threads_per_row(ceil_div(D, VEC), kItems);
    if (G > 256) return cudaErrorInvalidValue;  // the kernel's launch bound
    const int R = max(1, 256 / G);  // rows per block: about 256 threads
    const long long rows = (long long)B * N;
    auto adaln_forward = &adaln_forward_kernel<TX, TM, VEC, kItems>;
    return AF_LAUNCH(adaln_forward, dim3(ceil_div(rows, R)), dim3(G, R), 0, stream, static_cast<const TX*>(x),
                     static_cast<const TM*>(h), static_cast<const TM*>(gate), static_cast<const TM*>(shift),
                     static_cast<const TM*>(scale), static_cast<TX*>(x_new), static_cast<TM*>(y), mean, rstd, rows,
                     N, D, eps);
}

template <class TX, class TM, int VEC>
cudaError_t backward(const void* x, const void* h, const void* gate, const void* scale, const float* mean,
                     const float* rstd, const void* dy, const void* g_x_new, void* dx, void* dh, float* partial,
                     float* sums, int B, int N, int D, int tiles, int need_modulation, int need_gate,
                     cudaStream_t stream) {
    constexpr int kItems = VEC == 1 ? 4 : 1;  // 4 to 8 elements per thread: three accumulators each
    const int G = threads_per_row(ceil_div(D, VEC), kItems);
    if (G > (VEC == 8 ? 512 : 1024)) return cudaErrorInvalidValue;  // the kernel's launch bound
    const int rows_per_tile = ceil_div(N, tiles);
    auto adaln_backward = &adaln_backward_kernel<TX, TM, VEC, kItems>;
    cudaError_t err = AF_LAUNCH(adaln_backward, dim3(B * tiles), dim3(G), 0, stream, static_cast<const TX*>(x),
                                static_cast<const TM*>(h), static_cast<const TM*>(gate),
                                static_cast<const TM*>(scale), mean, rstd, static_cast<const TM*>(dy),
                                static_cast<const TX*>(g_x_new), static_cast<TX*>(dx), static_cast<TM*>(dh), partial,
                                N, D, tiles, rows_per_tile, need_modulation, need_gate);
    if (err != cudaSuccess || !(need_modulation || need_gate)) return err;
    auto adaln_tile_sum = &adaln_tile_sum_kernel;
    return AF_LAUNCH(adaln_tile_sum, dim3(ceil_div(3LL * D, 256), B), dim3(256), 0, stream,
                     static_cast<const float*>(partial), sums, tiles, D);
}

template <class F>
cudaError_t dispatch(int x_dtype, int mod_dtype, F&& f) {
    if (x_dtype == kFloat32 && mod_dtype == kFloat32) return f(float{}, float{});
    if (x_dtype == kBFloat16 && mod_dtype == kBFloat16) return f(__nv_bfloat16{}, __nv_bfloat16{});
    if (x_dtype == kFloat16 && mod_dtype == kFloat16) return f(__half{}, __half{});
    if (x_dtype == kFloat32 && mod_dtype == kBFloat16) return f(float{}, __nv_bfloat16{});
    if (x_dtype == kFloat32 && mod_dtype == kFloat16) return f(float{}, __half{});
    return cudaErrorNotSupported;
}

bool all_aligned(std::initializer_list<const void*> pointers) {
    for (const void* p : pointers)
        if (p && !aligned16(p)) return false;
    return true;
}

}  // namespace
}  // namespace alignflow

using namespace alignflow;

// 1 when the kernels take this (x dtype, modulation dtype) pair (dtype codes: 0 fp32, 1 bf16, 2 fp16).
AF_C_EXPORT int alignflow_adaln_supported(int x_dtype, int mod_dtype) {
    return dispatch(x_dtype, mod_dtype, [](auto, auto) { return cudaSuccess; }) == cudaSuccess;
}

// The widest row the kernels take.
AF_C_EXPORT int alignflow_adaln_max_width() { return 4096; }

// Row tiles per sample of the backward: partial holds B * tiles * 3 * D floats.
AF_C_EXPORT int alignflow_adaln_backward_tiles(int B, int N) {
    // about 264 blocks (two per SM of an H100), at least 8 rows per tile: a starting point, not a sweep
    int tiles = max(1, min(ceil_div(264, B), N / 8));
    return ceil_div(N, ceil_div(N, tiles));
}

// Forward; the residual op when h is not null (then gate and x_new too). mean, rstd: (B, N) fp32.
AF_C_EXPORT int alignflow_adaln_forward(const void* x, const void* h, const void* gate, const void* shift,
                                        const void* scale, void* x_new, void* y, float* mean, float* rstd, int B,
                                        int N, int D, float eps, int x_dtype, int mod_dtype, cudaStream_t stream) {
    if (D > alignflow_adaln_max_width() || D < 1 || B < 1 || N < 1) return cudaErrorInvalidValue;
    return dispatch(x_dtype, mod_dtype, [&](auto tx, auto tm) {
        using TX = decltype(tx);
        using TM = decltype(tm);
        constexpr int kVec = 16 / int(sizeof(TX) < sizeof(TM) ? sizeof(TX) : sizeof(TM));
        if (D % kVec == 0 && all_aligned({x, h, gate, shift, scale, x_new, y}))
            return forward<TX, TM, kVec>(x, h, gate, shift, scale, x_new, y, mean, rstd, B, N, D, eps, stream);
        return forward<TX, TM, 1>(x, h, gate, shift, scale, x_new, y, mean, rstd, B, N, D, eps, stream);
    });
}

// Backward. x is the normalised input (x_new for the residual op). Optional (null): h, gate (both
// given for the residual op), g_x_new, dx, dh. With need_modulation / need_gate, partial holds
// B * tiles * 3 * D floats (alignflow_adaln_backward_tiles) and sums (B, 3, D) receives d_shift,
// d_scale, d_gate in fp32.
AF_C_EXPORT int alignflow_adaln_backward(const void* x, const void* h, const void* gate, const void* scale,
                                         const float* mean, const float* rstd, const void* dy, const void* g_x_new,
                                         void* dx, void* dh, float* partial, float* sums, int B, int N, int D,
                                         int need_modulation, int need_gate, int x_dtype, int mod_dtype,
                                         cudaStream_t stream) {
    if (D > alignflow_adaln_max_width() || D < 1 || B < 1 || N < 1) return cudaErrorInvalidValue;
    if (need_gate && (!h || !gate)) return cudaErrorInvalidValue;
    const int tiles = alignflow_adaln_backward_tiles(B, N);
    return dispatch(x_dtype, mod_dtype, [&](auto tx, auto tm) {
        using TX = decltype(tx);
        using TM = decltype(tm);
        constexpr int kVec = 16 / int(sizeof(TX) < sizeof(TM) ? sizeof(TX) : sizeof(TM));
        if (D % kVec == 0 && all_aligned({x, h, gate, scale, dy, g_x_new, dx, dh}))
            return backward<TX, TM, kVec>(x, h, gate, scale, mean, rstd, dy, g_x_new, dx, dh, partial, sums, B, N, D,
                                          tiles, need_modulation, need_gate, stream);
        return backward<TX, TM, 1>(x, h, gate, scale, mean, rstd, dy, g_x_new, dx, dh, partial, sums, B, N, D, tiles,
                                   need_modulation, need_gate, stream);
    });
}
