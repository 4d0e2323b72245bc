// Flow-matching interpolant and fused velocity loss in CUDA C++: the contract of kernels/interpolant.py
// (reference_interpolant and reference_velocity_loss are the specification). Tensors are viewed as rows
// (B, C, S), one row per (sample, channel); with alpha, sigma and their derivatives at t[b]:
//
//   z1 = x + mu1,  z0 = noise + mu0            (CAR-Flow shifts, optional)
//   interpolant forward:   x_t = alpha z1 + sigma z0,  v = alpha' z1 + sigma' z0   (x's dtype)
//   interpolant backward:  dz1 = alpha g_xt + alpha' g_v,  dz0 = sigma g_xt + sigma' g_v
//   velocity forward:      partial[row, chunk] = sum over the chunk of (v_pred - v)^2   (fp32)
//   velocity backward:     d_v_pred = scale[b] (v_pred - v),  dz1 = -alpha' d_v_pred,  dz0 = -sigma' d_v_pred
//
// (scale[b] = d loss / d per-sample loss * 2 / (C S), from the caller). The gradients of z1 and z0 are
// written in fp32 as the Triton kernels write them: in full, (B, C, S), and/or as per-(row, chunk) sums
// for a shift that is constant over S (the caller sums the chunks); kernels/interpolant.py's
// _ShiftGrads turns them into the gradients of x, noise and the shifts.
//
// A shift is given in one of two forms: `rows`, one fp32 value per (b, c) row (a per-channel (B, C, 1, 1)
// shift: the caller passes the B C values), or `full`, a tensor of x's dtype whose row (b, c) starts at
// b sb + c sc elements and is contiguous over S (sb = 0 broadcasts a (1, C, H, W) shift over the batch).
//
// One block of G threads per (row, chunk of CHUNK elements): x, noise, v_pred, full shifts, outputs and
// gradients contiguous, read in VEC-element vectors (128-bit loads when S, the full shifts' row
// strides and every pointer allow, element loads otherwise). Chunk sums: warp shuffles, then the warp
// partials in a fixed order: deterministic, no atomics.
#include "common/rows.h"

namespace alignflow {
namespace {

struct PathAt {
    float alpha, sigma, d_alpha, d_sigma;
};

// 0 linear: alpha = 1 - t, sigma = t;  1 cosine: alpha = cos(pi t / 2), sigma = sin(pi t / 2).
// sincospif rather than cosf(t * pi / 2): its argument reduction is exact and needs no local memory
// (cosf's slow path for large arguments put a 32-byte stack frame in every kernel, ptxas -v sm_90a);
// it differs from the reference's cos(fp32(pi / 2) t) by about an ulp.
__device__ __forceinline__ PathAt path_at(float t, int path) {
    if (path == 0) return {1.0f - t, t, -1.0f, 1.0f};
    float alpha, sigma;
    sincospif(0.5f * t, &sigma, &alpha);
    return {alpha, sigma, -1.5707963267948966f * sigma, 1.5707963267948966f * alpha};
}

template <class T>
struct Shift {
    const T* full;       // rows at b * sb + c * sc, contiguous over S; or null
    const float* rows;   // one fp32 value per (b, c) row; or null
    long long sb, sc;
};

// Where this block works: its row, the row's sample and channel, and its chunk [begin, begin + size) of S.
struct Place {
    long long row, b, c;
    long long begin;
    int size;  // of the chunk (at most 16384 elements): 32-bit loop counters, whose trip count needs no
               // 64-bit division (a subroutine call)
};

// 32-bit divisions: the launcher keeps rows * chunks (so C too) below 2^31, and a 64-bit division is a
// subroutine call, whose clobbered registers spilled 20 bytes in the bf16 velocity backward (sm_80).
__device__ __forceinline__ Place place(long long C, long long S, long long chunk_size, int num_chunks) {
    const unsigned block = blockIdx.x, chunks = unsigned(num_chunks), row = block / chunks;
    Place p;
    p.row = row;
    p.b = row / unsigned(C);
    p.c = row % unsigned(C);
    p.begin = (long long)(block % chunks) * chunk_size;
    p.size = int(min(S, p.begin + chunk_size) - p.begin);
    return p;
}

// z = base + shift over VEC elements of the row at `col` (fp32)
template <int VEC, class T>
__device__ __forceinline__ void load_shifted(const T* __restrict__ base, const Shift<T>& shift, const Place& p,
                                             long long col, float* z) {
    load<VEC>(base + col, z);
    if (shift.rows != nullptr) {
        const float m = shift.rows[p.row];
#pragma unroll
        for (int k = 0; k < VEC; ++k) z[k] += m;
    } else if (shift.full != nullptr) {
        float m[VEC];
        load<VEC>(shift.full + p.b * shift.sb + p.c * shift.sc + col, m);
#pragma unroll
        for (int k = 0; k < VEC; ++k) z[k] += m[k];
    }
}

template <class T, int VEC>
__global__ void __launch_bounds__(256)
interpolant_forward_kernel(const T* __restrict__ x, const T* __restrict__ noise, const float* __restrict__ t,
                           Shift<T> mu0, Shift<T> mu1, T* __restrict__ x_t, T* __restrict__ v, long long C,
                           long long S, long long chunk_size, int num_chunks, int path) {
    const Place p = place(C, S, chunk_size, num_chunks);
    const PathAt k = path_at(t[p.b], path);
    const long long offset = p.row * S;
    for (int i = int(threadIdx.x) * VEC; i < p.size; i += int(blockDim.x) * VEC) {
        const long long col = p.begin + i;
        float z1[VEC], z0[VEC], out[VEC];
        load_shifted<VEC>(x + offset, mu1, p, col, z1);
        load_shifted<VEC>(noise + offset, mu0, p, col, z0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) out[e] = k.alpha * z1[e] + k.sigma * z0[e];
        store<VEC>(x_t + offset + col, out);
#pragma unroll
        for (int e = 0; e < VEC; ++e) out[e] = k.d_alpha * z1[e] + k.d_sigma * z0[e];
        store<VEC>(v + offset + col, out);
    }
}

// The gradients of z1 and z0 over VEC elements at `col`: in full (fp32) where asked, and added to the
// chunk sums.
template <int VEC>
__device__ __forceinline__ void put_z_grads(const float* dz1, const float* dz0, long long at, float* __restrict__ dz1_full,
                                            float* __restrict__ dz0_full, float& dz1_sum, float& dz0_sum) {
    if (dz1_full != nullptr) store<VEC>(dz1_full + at, dz1);
    if (dz0_full != nullptr) store<VEC>(dz0_full + at, dz0);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
        dz1_sum += dz1[e];
        dz0_sum += dz0[e];
    }
}

// Every thread of the block calls this (barriers inside): the chunk sums into dz1_rows / dz0_rows
// (row, chunk), where asked.
template <class Smem>
__device__ __forceinline__ void put_chunk_sums(float dz1_sum, float dz0_sum, Smem& buffer1, Smem& buffer0,
                                               float* __restrict__ dz1_rows, float* __restrict__ dz0_rows) {
    const int warps = int(blockDim.x) / 32;
    const long long at = blockIdx.x;  // (row, chunk) row-major
    if (dz1_rows != nullptr) {
        dz1_sum = row_sum(dz1_sum, buffer1, warps);
        if (threadIdx.x == 0) dz1_rows[at] = dz1_sum;
    }
    if (dz0_rows != nullptr) {
        dz0_sum = row_sum(dz0_sum, buffer0, warps);
        if (threadIdx.x == 0) dz0_rows[at] = dz0_sum;
    }
}

template <class TG, int VEC>
__global__ void __launch_bounds__(256)
interpolant_backward_kernel(const TG* __restrict__ g_xt, const TG* __restrict__ g_v, const float* __restrict__ t,
                            float* __restrict__ dz1_full, float* __restrict__ dz0_full, float* __restrict__ dz1_rows,
                            float* __restrict__ dz0_rows, long long C, long long S, long long chunk_size,
                            int num_chunks, int path) {
    AF_SHARED(float, dz1_buffer, 32);
    AF_SHARED(float, dz0_buffer, 32);
    const Place p = place(C, S, chunk_size, num_chunks);
    const PathAt k = path_at(t[p.b], path);
    const long long offset = p.row * S;
    float dz1_sum = 0.0f, dz0_sum = 0.0f;
    for (int i = int(threadIdx.x) * VEC; i < p.size; i += int(blockDim.x) * VEC) {
        const long long col = p.begin + i;
        float dz1[VEC], dz0[VEC], g[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) dz1[e] = dz0[e] = 0.0f;
        if (g_xt != nullptr) {
            load<VEC>(g_xt + offset + col, g);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                dz1[e] += k.alpha * g[e];
                dz0[e] += k.sigma * g[e];
            }
        }
        if (g_v != nullptr) {
            load<VEC>(g_v + offset + col, g);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                dz1[e] += k.d_alpha * g[e];
                dz0[e] += k.d_sigma * g[e];
            }
        }
        put_z_grads<VEC>(dz1, dz0, offset + col, dz1_full, dz0_full, dz1_sum, dz0_sum);
    }
    put_chunk_sums(dz1_sum, dz0_sum, dz1_buffer, dz0_buffer, dz1_rows, dz0_rows);
}

template <class TX, class TV, int VEC>
__global__ void __launch_bounds__(256)
velocity_forward_kernel(const TV* __restrict__ v_pred, const TX* __restrict__ x, const TX* __restrict__ noise,
                        const float* __restrict__ t, Shift<TX> mu0, Shift<TX> mu1, float* __restrict__ partial,
                        long long C, long long S, long long chunk_size, int num_chunks, int path) {
    AF_SHARED(float, sum_buffer, 32);
    const Place p = place(C, S, chunk_size, num_chunks);
    const PathAt k = path_at(t[p.b], path);
    const long long offset = p.row * S;
    float sum = 0.0f;
    for (int i = int(threadIdx.x) * VEC; i < p.size; i += int(blockDim.x) * VEC) {
        const long long col = p.begin + i;
        float z1[VEC], z0[VEC], pred[VEC];
        load_shifted<VEC>(x + offset, mu1, p, col, z1);
        load_shifted<VEC>(noise + offset, mu0, p, col, z0);
        load<VEC>(v_pred + offset + col, pred);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            const float error = pred[e] - (k.d_alpha * z1[e] + k.d_sigma * z0[e]);
            sum += error * error;
        }
    }
    sum = row_sum(sum, sum_buffer, int(blockDim.x) / 32);
    if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

// (256, 1): with the thread bound alone, ptxas (CUDA 13.0, sm_80) held the fp32 instance to 32
// registers and spilled 8 bytes; with it, 44 registers and no spill.
template <class TX, class TV, int VEC>
__global__ void __launch_bounds__(256, 1)
velocity_backward_kernel(const TV* __restrict__ v_pred, const TX* __restrict__ x, const TX* __restrict__ noise,
                         const float* __restrict__ t, Shift<TX> mu0, Shift<TX> mu1, const float* __restrict__ scale,
                         TV* __restrict__ d_v_pred, float* __restrict__ dz1_full, float* __restrict__ dz0_full,
                         float* __restrict__ dz1_rows, float* __restrict__ dz0_rows, long long C, long long S,
                         long long chunk_size, int num_chunks, int path) {
    AF_SHARED(float, dz1_buffer, 32);
    AF_SHARED(float, dz0_buffer, 32);
    const Place p = place(C, S, chunk_size, num_chunks);
    const PathAt k = path_at(t[p.b], path);
    const float g = scale[p.b];
    const long long offset = p.row * S;
    float dz1_sum = 0.0f, dz0_sum = 0.0f;
    for (int i = int(threadIdx.x) * VEC; i < p.size; i += int(blockDim.x) * VEC) {
        const long long col = p.begin + i;
        float z1[VEC], z0[VEC], d[VEC];
        load_shifted<VEC>(x + offset, mu1, p, col, z1);
        load_shifted<VEC>(noise + offset, mu0, p, col, z0);
        load<VEC>(v_pred + offset + col, d);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            d[e] = g * (d[e] - (k.d_alpha * z1[e] + k.d_sigma * z0[e]));
            z1[e] = -k.d_alpha * d[e];  // now dz1
            z0[e] = -k.d_sigma * d[e];  // now dz0
        }
        if (d_v_pred != nullptr) store<VEC>(d_v_pred + offset + col, d);
        put_z_grads<VEC>(z1, z0, offset + col, dz1_full, dz0_full, dz1_sum, dz0_sum);
    }
    put_chunk_sums(dz1_sum, dz0_sum, dz1_buffer, dz0_buffer, dz1_rows, dz0_rows);
}

// ------------------------------------------------------------------------------------------------
// Launch shape: threads per block and chunk per block from (rows, S) alone, so that the caller can
// size the per-chunk buffers before the dtype and alignment pick the vector width. At least one
// 8-element vector per thread, at most 256 threads; chunks grow (1, 2, 4, 8 vectors per thread)
// while the grid keeps about 1024 blocks (8 per SM of an H100): a starting point, not a sweep.
// ------------------------------------------------------------------------------------------------

struct Layout {
    int threads, num_chunks;
    long long chunk_size;
};

inline Layout layout(long long rows, long long S) {
    Layout l;
    l.threads = int(min(256LL, (long long)round_up(int(min(S, 1LL << 20) + 7) / 8, 32)));
    int items = 1;
    while (items < 8 && rows * ((S + 16LL * l.threads * items - 1) / (16LL * l.threads * items)) >= 1024) items *= 2;
    l.chunk_size = 8LL * l.threads * items;  // a multiple of every VEC
    l.num_chunks = int((S + l.chunk_size - 1) / l.chunk_size);
    return l;
}

// The layout of a flow kernel over (B, C, S) on `path`; false where an argument or the grid is out of range.
inline bool flow_layout(long long B, long long C, long long S, int path, Layout& l) {
    if (B < 1 || C < 1 || S < 1 || path < 0 || path > 1) return false;
    l = layout(B * C, S);
    return B * C * l.num_chunks <= 2147483647LL;
}

template <class T>
bool shift_vectorizable(const Shift<T>& s, int vec) {
    return s.full == nullptr || (aligned16(s.full) && s.sb % vec == 0 && s.sc % vec == 0);
}

bool all_aligned(std::initializer_list<const void*> pointers) {
    for (const void* p : pointers)
        if (p && !aligned16(p)) return false;
    return true;
}

template <class F>
cudaError_t dispatch_one(int dtype, F&& f) {
    if (dtype == kFloat32) return f(float{});
    if (dtype == kBFloat16) return f(__nv_bfloat16{});
    if (dtype == kFloat16) return f(__half{});
    return cudaErrorNotSupported;
}

// (x, v_pred) dtype pairs of the velocity loss: one dtype, or an fp32 x with a bf16/fp16 prediction
template <class F>
cudaError_t dispatch_pair(int x_dtype, int v_dtype, F&& f) {
    if (x_dtype == kFloat32 && v_dtype == kFloat32) return f(float{}, float{});
    if (x_dtype == kBFloat16 && v_dtype == kBFloat16) return f(__nv_bfloat16{}, __nv_bfloat16{});
    if (x_dtype == kFloat16 && v_dtype == kFloat16) return f(__half{}, __half{});
    if (x_dtype == kFloat32 && v_dtype == kBFloat16) return f(float{}, __nv_bfloat16{});
    if (x_dtype == kFloat32 && v_dtype == kFloat16) return f(float{}, __half{});
    return cudaErrorNotSupported;
}

template <class T>
Shift<T> shift_of(const void* full, const float* rows, long long sb, long long sc) {
    return Shift<T>{static_cast<const T*>(full), rows, sb, sc};
}

template <class T>
constexpr int vec_of() { return 16 / int(sizeof(T)); }

}  // namespace
}  // namespace alignflow

using namespace alignflow;

// 1 when the velocity loss takes x (and noise) of x_dtype with v_pred of v_dtype (codes: 0 fp32, 1 bf16,
// 2 fp16); the interpolant takes any one of the three dtypes.
AF_C_EXPORT int alignflow_velocity_supported(int x_dtype, int v_dtype) {
    return dispatch_pair(x_dtype, v_dtype, [](auto, auto) { return cudaSuccess; }) == cudaSuccess;
}

// Chunks per row of every flow kernel on (rows, S): the per-chunk buffers hold rows * chunks floats.
AF_C_EXPORT int alignflow_flow_chunks(long long rows, long long S) {
    if (rows < 1 || S < 1) return 0;
    return layout(rows, S).num_chunks;
}

// Shifts: mu*_full (x's dtype, row (b, c) at b sb + c sc, contiguous over S) or mu*_rows (fp32, one per
// row) or neither. x, noise, x_t, v: contiguous (B, C, S); t: (B,) fp32.
AF_C_EXPORT int alignflow_interpolant_forward(const void* x, const void* noise, const float* t, const void* mu0_full,
                                              const float* mu0_rows, long long mu0_sb, long long mu0_sc,
                                              const void* mu1_full, const float* mu1_rows, long long mu1_sb,
                                              long long mu1_sc, void* x_t, void* v, long long B, long long C,
                                              long long S, int path, int dtype, cudaStream_t stream) {
    Layout l;
    if (!flow_layout(B, C, S, path, l)) return cudaErrorInvalidValue;
    return dispatch_one(dtype, [&](auto tag) {
        using T = decltype(tag);
        constexpr int kVec = vec_of<T>();
        const Shift<T> mu0 = shift_of<T>(mu0_full, mu0_rows, mu0_sb, mu0_sc);
        const Shift<T> mu1 = shift_of<T>(mu1_full, mu1_rows, mu1_sb, mu1_sc);
        const dim3 grid(unsigned(B * C * l.num_chunks)), block(l.threads);
        const bool vectorized = S % kVec == 0 && all_aligned({x, noise, x_t, v}) && shift_vectorizable(mu0, kVec) &&
                                shift_vectorizable(mu1, kVec);
        auto kernel = vectorized ? &interpolant_forward_kernel<T, kVec> : &interpolant_forward_kernel<T, 1>;
        return AF_LAUNCH(kernel, grid, block, 0, stream, static_cast<const T*>(x), static_cast<const T*>(noise), t,
                         mu0, mu1, static_cast<T*>(x_t), static_cast<T*>(v), C, S, l.chunk_size, l.num_chunks, path);
    });
}

// g_xt, g_v: contiguous (B, C, S) of one dtype, either may be null. dz*_full: (B, C, S) fp32; dz*_rows:
// (B C, alignflow_flow_chunks) fp32 chunk sums; each may be null.
AF_C_EXPORT int alignflow_interpolant_backward(const void* g_xt, const void* g_v, const float* t, float* dz1_full,
                                               float* dz0_full, float* dz1_rows, float* dz0_rows, long long B,
                                               long long C, long long S, int path, int dtype, cudaStream_t stream) {
    Layout l;
    if (!flow_layout(B, C, S, path, l)) return cudaErrorInvalidValue;
    return dispatch_one(dtype, [&](auto tag) {
        using T = decltype(tag);
        constexpr int kVec = vec_of<T>();
        const dim3 grid(unsigned(B * C * l.num_chunks)), block(l.threads);
        const bool vectorized = S % kVec == 0 && all_aligned({g_xt, g_v, dz1_full, dz0_full});
        auto kernel = vectorized ? &interpolant_backward_kernel<T, kVec> : &interpolant_backward_kernel<T, 1>;
        return AF_LAUNCH(kernel, grid, block, 0, stream, static_cast<const T*>(g_xt), static_cast<const T*>(g_v), t,
                         dz1_full, dz0_full, dz1_rows, dz0_rows, C, S, l.chunk_size, l.num_chunks, path);
    });
}

// partial: (B C, alignflow_flow_chunks) fp32 sums of the squared error; the caller sums them per sample.
AF_C_EXPORT int alignflow_velocity_forward(const void* v_pred, const void* x, const void* noise, const float* t,
                                           const void* mu0_full, const float* mu0_rows, long long mu0_sb,
                                           long long mu0_sc, const void* mu1_full, const float* mu1_rows,
                                           long long mu1_sb, long long mu1_sc, float* partial, long long B,
                                           long long C, long long S, int path, int x_dtype, int v_dtype,
                                           cudaStream_t stream) {
    Layout l;
    if (!flow_layout(B, C, S, path, l)) return cudaErrorInvalidValue;
    return dispatch_pair(x_dtype, v_dtype, [&](auto x_tag, auto v_tag) {
        using TX = decltype(x_tag);
        using TV = decltype(v_tag);
        constexpr int kVec = vec_of<TX>() > vec_of<TV>() ? vec_of<TX>() : vec_of<TV>();
        const Shift<TX> mu0 = shift_of<TX>(mu0_full, mu0_rows, mu0_sb, mu0_sc);
        const Shift<TX> mu1 = shift_of<TX>(mu1_full, mu1_rows, mu1_sb, mu1_sc);
        const dim3 grid(unsigned(B * C * l.num_chunks)), block(l.threads);
        const bool vectorized = S % kVec == 0 && all_aligned({v_pred, x, noise}) && shift_vectorizable(mu0, kVec) &&
                                shift_vectorizable(mu1, kVec);
        auto kernel = vectorized ? &velocity_forward_kernel<TX, TV, kVec> : &velocity_forward_kernel<TX, TV, 1>;
        return AF_LAUNCH(kernel, grid, block, 0, stream, static_cast<const TV*>(v_pred), static_cast<const TX*>(x),
                         static_cast<const TX*>(noise), t, mu0, mu1, partial, C, S, l.chunk_size, l.num_chunks, path);
    });
}

// scale: (B,) fp32; d_v_pred: (B, C, S) of v_pred's dtype or null; dz*: as the interpolant backward's.
AF_C_EXPORT int alignflow_velocity_backward(const void* v_pred, const void* x, const void* noise, const float* t,
                                            const void* mu0_full, const float* mu0_rows, long long mu0_sb,
                                            long long mu0_sc, const void* mu1_full, const float* mu1_rows,
                                            long long mu1_sb, long long mu1_sc, const float* scale, void* d_v_pred,
                                            float* dz1_full, float* dz0_full, float* dz1_rows, float* dz0_rows,
                                            long long B, long long C, long long S, int path, int x_dtype,
                                            int v_dtype, cudaStream_t stream) {
    Layout l;
    if (!flow_layout(B, C, S, path, l)) return cudaErrorInvalidValue;
    return dispatch_pair(x_dtype, v_dtype, [&](auto x_tag, auto v_tag) {
        using TX = decltype(x_tag);
        using TV = decltype(v_tag);
        constexpr int kVec = vec_of<TX>() > vec_of<TV>() ? vec_of<TX>() : vec_of<TV>();
        const Shift<TX> mu0 = shift_of<TX>(mu0_full, mu0_rows, mu0_sb, mu0_sc);
        const Shift<TX> mu1 = shift_of<TX>(mu1_full, mu1_rows, mu1_sb, mu1_sc);
        const dim3 grid(unsigned(B * C * l.num_chunks)), block(l.threads);
        const bool vectorized = S % kVec == 0 && all_aligned({v_pred, x, noise, d_v_pred, dz1_full, dz0_full}) &&
                                shift_vectorizable(mu0, kVec) && shift_vectorizable(mu1, kVec);
        auto kernel = vectorized ? &velocity_backward_kernel<TX, TV, kVec> : &velocity_backward_kernel<TX, TV, 1>;
        return AF_LAUNCH(kernel, grid, block, 0, stream, static_cast<const TV*>(v_pred), static_cast<const TX*>(x),
                         static_cast<const TX*>(noise), t, mu0, mu1, scale, static_cast<TV*>(d_v_pred), dz1_full,
                         dz0_full, dz1_rows, dz0_rows, C, S, l.chunk_size, l.num_chunks, path);
    });
}
