// A fused multi-tensor AdamW step in CUDA C++: the contract of kernels/adamw.py (reference_adamw_step is
// the specification; it is torch.optim.AdamW's update, amsgrad and maximize off). Per element, with
// the gradient divided by *grad_scale where given (the clip / loss-scale divisor of engine.optim):
//
//   p = p (1 - lr wd);  m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2
//   p = p - (lr / bias1) m / (sqrt(v) / sqrt(bias2) + eps)      [p_bf16 = bf16(p) where given]
//
// p, m, v fp32; g fp32 or bf16. The .grad is not written back (torch's fused kernel writes g / scale
// there; nothing of ours reads it after the step). A non-finite *grad_scale skips the step: every block
// returns before it writes (engine.optim hands an inf divisor for a non-finite gradient norm, so
// params, moments and bf16 copies stay as they were; the step counts are the caller's, see
// ClippedAdamW). Every tensor of a list in one table (TensorEntry, device memory) and
// one list of (tensor, chunk) pairs: one block per chunk of kChunk elements. A chunk whose tensor's
// pointers are 16-byte aligned and whose length is a multiple of VEC runs in the VEC kernel (128-bit
// loads), the others (tails of odd sizes, unaligned views) in the element kernel: the launcher gives
// each kernel its own pair list, so a model of aligned tensors takes one launch.
#include "common/rows.h"

namespace alignflow {
namespace {

constexpr int kChunk = 4096;  // elements per block: 256 threads x 16 (a starting point, not a sweep)

struct alignas(16) TensorEntry {  // 48 bytes: read with three 128-bit loads
    float* param;
    const void* grad;
    float* exp_avg;
    float* exp_avg_sq;
    __nv_bfloat16* param_bf16;  // or null
    long long numel;
};

// The step's scalars as torch.optim.AdamW rounds them: computed in double on the host, used in fp32.
struct Hyper {
    float decay;          // 1 - lr wd
    float step_size;      // lr / (1 - beta1^step)
    float one_minus_beta1, beta2, one_minus_beta2, eps;
    float bias2_sqrt;     // sqrt(1 - beta2^step)
};

template <class TG, int VEC>
__global__ void __launch_bounds__(256)
adamw_kernel(const TensorEntry* __restrict__ tensors, const int* __restrict__ pairs, Hyper h,
             const float* __restrict__ grad_scale) {
    const int tensor = pairs[2 * blockIdx.x], chunk = pairs[2 * blockIdx.x + 1];
    const TensorEntry e = tensors[tensor];
    const long long begin = (long long)chunk * kChunk;
    const int size = int(min(e.numel - begin, (long long)kChunk));
    const float scale = grad_scale != nullptr ? *grad_scale : 1.0f;
    if (!(fabsf(scale) <= 3.4028234663852886e38f)) return;  // not finite (inf, NaN): the step is skipped
    const TG* grad = static_cast<const TG*>(e.grad) + begin;
    float* param = e.param + begin;
    float* exp_avg = e.exp_avg + begin;
    float* exp_avg_sq = e.exp_avg_sq + begin;
    for (int i = int(threadIdx.x) * VEC; i < size; i += int(blockDim.x) * VEC) {
        float g[VEC], p[VEC], m[VEC], v[VEC];
        load<VEC>(grad + i, g);
        load<VEC>(param + i, p);
        load<VEC>(exp_avg + i, m);
        load<VEC>(exp_avg_sq + i, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {  // in torch.optim.AdamW's order of operations
            const float gk = grad_scale != nullptr ? g[k] / scale : g[k];
            p[k] *= h.decay;
            m[k] += h.one_minus_beta1 * (gk - m[k]);                  // lerp(m, g, 1 - beta1)
            v[k] = v[k] * h.beta2 + h.one_minus_beta2 * (gk * gk);    // mul_, addcmul_
            p[k] += -h.step_size * (m[k] / (sqrtf(v[k]) / h.bias2_sqrt + h.eps));  // addcdiv_
        }
        store<VEC>(param + i, p);
        store<VEC>(exp_avg + i, m);
        store<VEC>(exp_avg_sq + i, v);
        if (e.param_bf16 != nullptr) store<VEC>(e.param_bf16 + begin + i, p);
    }
}

template <class F>
cudaError_t dispatch(int grad_dtype, F&& f) {
    if (grad_dtype == kFloat32) return f(float{});
    if (grad_dtype == kBFloat16) return f(__nv_bfloat16{});
    return cudaErrorNotSupported;
}

}  // namespace
}  // namespace alignflow

using namespace alignflow;

// Elements per chunk, and the VEC of the vector kernel for a gradient dtype (0 fp32, 1 bf16; else 0).
AF_C_EXPORT int alignflow_adamw_chunk() { return kChunk; }
AF_C_EXPORT int alignflow_adamw_vec(int grad_dtype) {
    return grad_dtype == kFloat32 ? 4 : grad_dtype == kBFloat16 ? 8 : 0;
}

// tensors: device array of `TensorEntry` (6 words each: param, grad, exp_avg, exp_avg_sq, param_bf16 or
// 0, numel); vector_pairs / element_pairs: device arrays of (tensor, chunk) int32 pairs for the VEC and
// the element kernel (the caller sorts chunks as alignflow_adamw_vec says). grad_scale: device fp32
// scalar or null. The scalars as struct Hyper says.
AF_C_EXPORT int alignflow_adamw_step(const void* tensors, const int* vector_pairs, int num_vector, const int* element_pairs,
                                     int num_element, float decay, float step_size, float one_minus_beta1,
                                     float beta2, float one_minus_beta2, float eps, float bias2_sqrt,
                                     const float* grad_scale, int grad_dtype, cudaStream_t stream) {
    if (num_vector < 0 || num_element < 0) return cudaErrorInvalidValue;
    const Hyper h{decay, step_size, one_minus_beta1, beta2, one_minus_beta2, eps, bias2_sqrt};
    const TensorEntry* table = static_cast<const TensorEntry*>(tensors);
    return dispatch(grad_dtype, [&](auto tag) {
        using TG = decltype(tag);
        constexpr int kVec = sizeof(TG) == 4 ? 4 : 8;  // alignflow_adamw_vec
        cudaError_t err = cudaSuccess;
        if (num_vector > 0) {
            auto kernel = &adamw_kernel<TG, kVec>;
            err = AF_LAUNCH(kernel, dim3(num_vector), dim3(256), 0, stream, table, vector_pairs, h, grad_scale);
        }
        if (err == cudaSuccess && num_element > 0) {
            auto kernel = &adamw_kernel<TG, 1>;
            err = AF_LAUNCH(kernel, dim3(num_element), dim3(256), 0, stream, table, element_pairs, h, grad_scale);
        }
        return err;
    });
}
