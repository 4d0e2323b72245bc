// The one torch file of csrc/: the C launchers as functions on tensors, built by setup.py into the
// kernels._csrc extension (the .cu files stay free of torch headers). The caller (kernels/_cuda.py)
// allocates every output, so this extension and the torch-independent fatbin object (ctypes) run
// the same Python code; here only the device guard, the current stream and the error check are added.
// ATen/cuda/CUDAContext.h is avoided: it needs cusparse.h, which a CUDA toolkit may not have.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>

extern "C" {
int alignflow_adaln_supported(int x_dtype, int mod_dtype);
int alignflow_adaln_max_width();
int alignflow_adaln_backward_tiles(int B, int N);
int alignflow_adaln_forward(const void* x, const void* h, const void* gate, const void* shift, const void* scale,
                            void* x_new, void* y, float* mean, float* rstd, int B, int N, int D, float eps, int x_dtype,
                            int mod_dtype, cudaStream_t stream);
int alignflow_adaln_backward(const void* x, const void* h, const void* gate, const void* scale, const float* mean,
                             const float* rstd, const void* dy, const void* g_x_new, void* dx, void* dh, float* partial,
                             float* sums, int B, int N, int D, int need_modulation, int need_gate, int x_dtype,
                             int mod_dtype, cudaStream_t stream);
int alignflow_alignment_supported(int p_dtype, int q_dtype);
int alignflow_alignment_forward(const void* p, const void* q, float* stats, long long R, int D, float eps, int dtype,
                                cudaStream_t stream);
int alignflow_alignment_backward(const void* p, const void* q, const float* stats, const float* g, void* dp, void* dq,
                                 long long R, int D, float eps, int dtype, cudaStream_t stream);
int alignflow_velocity_supported(int x_dtype, int v_dtype);
int alignflow_flow_chunks(long long rows, long long S);
int alignflow_interpolant_forward(const void* x, const void* noise, const float* t, const void* mu0_full,
                                  const float* mu0_rows, long long mu0_sb, long long mu0_sc, const void* mu1_full,
                                  const float* mu1_rows, long long mu1_sb, long long mu1_sc, void* x_t, void* v,
                                  long long B, long long C, long long S, int path, int dtype, cudaStream_t stream);
int alignflow_interpolant_backward(const void* g_xt, const void* g_v, const float* t, float* dz1_full, float* dz0_full,
                                   float* dz1_rows, float* dz0_rows, long long B, long long C, long long S, int path,
                                   int dtype, cudaStream_t stream);
int alignflow_velocity_forward(const void* v_pred, const void* x, const void* noise, const float* t,
                               const void* mu0_full, const float* mu0_rows, long long mu0_sb, long long mu0_sc,
                               const void* mu1_full, const float* mu1_rows, long long mu1_sb, long long mu1_sc,
                               float* partial, long long B, long long C, long long S, int path, int x_dtype,
                               int v_dtype, cudaStream_t stream);
int alignflow_velocity_backward(const void* v_pred, const void* x, const void* noise, const float* t,
                                const void* mu0_full, const float* mu0_rows, long long mu0_sb, long long mu0_sc,
                                const void* mu1_full, const float* mu1_rows, long long mu1_sb, long long mu1_sc,
                                const float* scale, void* d_v_pred, float* dz1_full, float* dz0_full, float* dz1_rows,
                                float* dz0_rows, long long B, long long C, long long S, int path, int x_dtype,
                                int v_dtype, cudaStream_t stream);
int alignflow_adamw_chunk();
int alignflow_adamw_vec(int grad_dtype);
int alignflow_adamw_step(const void* tensors, const int* vector_pairs, int num_vector, const int* element_pairs,
                         int num_element, float decay, float step_size, float one_minus_beta1, float beta2,
                         float one_minus_beta2, float eps, float bias2_sqrt, const float* grad_scale, int grad_dtype,
                         cudaStream_t stream);
}

namespace {

using Optional = c10::optional<at::Tensor>;

int dtype_code(at::ScalarType t) {
    switch (t) {
        case at::kFloat: return 0;
        case at::kBFloat16: return 1;
        case at::kHalf: return 2;
        default: TORCH_CHECK(false, "alignflow CUDA kernels take float32, bfloat16 or float16, got ", t);
    }
}

const void* ptr(const Optional& t) { return t.has_value() ? t->data_ptr() : nullptr; }
void* mutable_ptr(const Optional& t) { return t.has_value() ? t->data_ptr() : nullptr; }
float* float_ptr(const Optional& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

void check(int code, const char* launcher) {
    TORCH_CHECK(code == 0, launcher, ": ", cudaGetErrorString(static_cast<cudaError_t>(code)));
}

void adaln_forward(const at::Tensor& x, const Optional& h, const Optional& gate, const at::Tensor& shift,
                   const at::Tensor& scale, const Optional& x_new, const at::Tensor& y, const at::Tensor& mean,
                   const at::Tensor& rstd, double eps) {
    TORCH_CHECK(x.is_cuda() && x.dim() == 3, "adaln_forward: x must be a (B, N, D) CUDA tensor");
    c10::cuda::CUDAGuard guard(x.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
    check(alignflow_adaln_forward(x.data_ptr(), ptr(h), ptr(gate), shift.data_ptr(), scale.data_ptr(),
                                  mutable_ptr(x_new), y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                  int(x.size(0)), int(x.size(1)), int(x.size(2)), float(eps),
                                  dtype_code(x.scalar_type()), dtype_code(y.scalar_type()), stream),
          "alignflow_adaln_forward");
}

void adaln_backward(const at::Tensor& x, const Optional& h, const Optional& gate, const at::Tensor& scale,
                    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& dy, const Optional& g_x_new,
                    const Optional& dx, const Optional& dh, const Optional& partial, const Optional& sums,
                    bool need_modulation, bool need_gate) {
    TORCH_CHECK(x.is_cuda() && x.dim() == 3, "adaln_backward: x must be a (B, N, D) CUDA tensor");
    c10::cuda::CUDAGuard guard(x.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
    check(alignflow_adaln_backward(x.data_ptr(), ptr(h), ptr(gate), scale.data_ptr(), mean.data_ptr<float>(),
                                   rstd.data_ptr<float>(), dy.data_ptr(), ptr(g_x_new), mutable_ptr(dx),
                                   mutable_ptr(dh), float_ptr(partial), float_ptr(sums), int(x.size(0)),
                                   int(x.size(1)), int(x.size(2)), need_modulation, need_gate,
                                   dtype_code(x.scalar_type()), dtype_code(scale.scalar_type()), stream),
          "alignflow_adaln_backward");
}

void alignment_forward(const at::Tensor& p, const at::Tensor& q, const at::Tensor& stats, double eps) {
    TORCH_CHECK(p.is_cuda() && p.dim() == 3, "alignment_forward: z_pred must be a (B, N, D) CUDA tensor");
    c10::cuda::CUDAGuard guard(p.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(p.device().index()).stream();
    check(alignflow_alignment_forward(p.data_ptr(), q.data_ptr(), stats.data_ptr<float>(), p.size(0) * p.size(1),
                                      int(p.size(2)), float(eps), dtype_code(p.scalar_type()), stream),
          "alignflow_alignment_forward");
}

void alignment_backward(const at::Tensor& p, const at::Tensor& q, const at::Tensor& stats, const at::Tensor& g,
                        const at::Tensor& dp, const Optional& dq, double eps) {
    TORCH_CHECK(p.is_cuda() && p.dim() == 3, "alignment_backward: z_pred must be a (B, N, D) CUDA tensor");
    c10::cuda::CUDAGuard guard(p.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(p.device().index()).stream();
    check(alignflow_alignment_backward(p.data_ptr(), q.data_ptr(), stats.data_ptr<float>(), g.data_ptr<float>(),
                                       dp.data_ptr(), mutable_ptr(dq), p.size(0) * p.size(1), int(p.size(2)),
                                       float(eps), dtype_code(p.scalar_type()), stream),
          "alignflow_alignment_backward");
}

cudaStream_t stream_of(const at::Tensor& t) {
    return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

void interpolant_forward(const at::Tensor& x, const at::Tensor& noise, const at::Tensor& t, const Optional& mu0_full,
                         const Optional& mu0_rows, int64_t mu0_sb, int64_t mu0_sc, const Optional& mu1_full,
                         const Optional& mu1_rows, int64_t mu1_sb, int64_t mu1_sc, const at::Tensor& x_t,
                         const at::Tensor& v, int64_t B, int64_t C, int64_t S, int64_t path) {
    TORCH_CHECK(x.is_cuda(), "interpolant_forward: x must be a CUDA tensor");
    c10::cuda::CUDAGuard guard(x.device());
    check(alignflow_interpolant_forward(x.data_ptr(), noise.data_ptr(), t.data_ptr<float>(), ptr(mu0_full),
                                        float_ptr(mu0_rows), mu0_sb, mu0_sc, ptr(mu1_full), float_ptr(mu1_rows),
                                        mu1_sb, mu1_sc, x_t.data_ptr(), v.data_ptr(), B, C, S, int(path),
                                        dtype_code(x.scalar_type()), stream_of(x)),
          "alignflow_interpolant_forward");
}

void interpolant_backward(const Optional& g_xt, const Optional& g_v, const at::Tensor& t, const Optional& dz1_full,
                          const Optional& dz0_full, const Optional& dz1_rows, const Optional& dz0_rows, int64_t B,
                          int64_t C, int64_t S, int64_t path) {
    TORCH_CHECK(g_xt.has_value() || g_v.has_value(), "interpolant_backward: give g_xt, g_v or both, got neither");
    const at::Tensor& g = g_xt.has_value() ? *g_xt : *g_v;
    TORCH_CHECK(g.is_cuda(), "interpolant_backward: the gradients must be CUDA tensors");
    c10::cuda::CUDAGuard guard(g.device());
    check(alignflow_interpolant_backward(ptr(g_xt), ptr(g_v), t.data_ptr<float>(), float_ptr(dz1_full),
                                         float_ptr(dz0_full), float_ptr(dz1_rows), float_ptr(dz0_rows), B, C, S,
                                         int(path), dtype_code(g.scalar_type()), stream_of(g)),
          "alignflow_interpolant_backward");
}

void velocity_forward(const at::Tensor& v_pred, const at::Tensor& x, const at::Tensor& noise, const at::Tensor& t,
                      const Optional& mu0_full, const Optional& mu0_rows, int64_t mu0_sb, int64_t mu0_sc,
                      const Optional& mu1_full, const Optional& mu1_rows, int64_t mu1_sb, int64_t mu1_sc,
                      const at::Tensor& partial, int64_t B, int64_t C, int64_t S, int64_t path) {
    TORCH_CHECK(x.is_cuda(), "velocity_forward: x must be a CUDA tensor");
    c10::cuda::CUDAGuard guard(x.device());
    check(alignflow_velocity_forward(v_pred.data_ptr(), x.data_ptr(), noise.data_ptr(), t.data_ptr<float>(),
                                     ptr(mu0_full), float_ptr(mu0_rows), mu0_sb, mu0_sc, ptr(mu1_full),
                                     float_ptr(mu1_rows), mu1_sb, mu1_sc, partial.data_ptr<float>(), B, C, S,
                                     int(path), dtype_code(x.scalar_type()), dtype_code(v_pred.scalar_type()),
                                     stream_of(x)),
          "alignflow_velocity_forward");
}

void velocity_backward(const at::Tensor& v_pred, const at::Tensor& x, const at::Tensor& noise, const at::Tensor& t,
                       const Optional& mu0_full, const Optional& mu0_rows, int64_t mu0_sb, int64_t mu0_sc,
                       const Optional& mu1_full, const Optional& mu1_rows, int64_t mu1_sb, int64_t mu1_sc,
                       const at::Tensor& scale, const Optional& d_v_pred, const Optional& dz1_full,
                       const Optional& dz0_full, const Optional& dz1_rows, const Optional& dz0_rows, int64_t B,
                       int64_t C, int64_t S, int64_t path) {
    TORCH_CHECK(x.is_cuda(), "velocity_backward: x must be a CUDA tensor");
    c10::cuda::CUDAGuard guard(x.device());
    check(alignflow_velocity_backward(v_pred.data_ptr(), x.data_ptr(), noise.data_ptr(), t.data_ptr<float>(),
                                      ptr(mu0_full), float_ptr(mu0_rows), mu0_sb, mu0_sc, ptr(mu1_full),
                                      float_ptr(mu1_rows), mu1_sb, mu1_sc, scale.data_ptr<float>(),
                                      mutable_ptr(d_v_pred), float_ptr(dz1_full), float_ptr(dz0_full),
                                      float_ptr(dz1_rows), float_ptr(dz0_rows), B, C, S, int(path),
                                      dtype_code(x.scalar_type()), dtype_code(v_pred.scalar_type()), stream_of(x)),
          "alignflow_velocity_backward");
}

void adamw_step(const at::Tensor& table, const at::Tensor& pairs, int64_t num_vector, int64_t num_element,
                double decay, double step_size, double one_minus_beta1, double beta2, double one_minus_beta2,
                double eps, double bias2_sqrt, const Optional& grad_scale, int64_t grad_dtype) {
    TORCH_CHECK(table.is_cuda() && pairs.is_cuda(), "adamw_step: the chunk tables must be CUDA tensors");
    c10::cuda::CUDAGuard guard(table.device());
    const int* vector_pairs = pairs.data_ptr<int>();
    check(alignflow_adamw_step(table.data_ptr(), vector_pairs, int(num_vector), vector_pairs + 2 * num_vector,
                               int(num_element), float(decay), float(step_size), float(one_minus_beta1), float(beta2),
                               float(one_minus_beta2), float(eps), float(bias2_sqrt), float_ptr(grad_scale),
                               int(grad_dtype), stream_of(table)),
          "alignflow_adamw_step");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "AlignFlow's CUDA C++ kernels (csrc/), called by kernels/_cuda.py";
    m.def("adaln_supported", &alignflow_adaln_supported);
    m.def("adaln_max_width", &alignflow_adaln_max_width);
    m.def("adaln_backward_tiles", &alignflow_adaln_backward_tiles);
    m.def("adaln_forward", &adaln_forward);
    m.def("adaln_backward", &adaln_backward);
    m.def("alignment_supported", &alignflow_alignment_supported);
    m.def("alignment_forward", &alignment_forward);
    m.def("alignment_backward", &alignment_backward);
    m.def("velocity_supported", &alignflow_velocity_supported);
    m.def("flow_chunks", &alignflow_flow_chunks);
    m.def("interpolant_forward", &interpolant_forward);
    m.def("interpolant_backward", &interpolant_backward);
    m.def("velocity_forward", &velocity_forward);
    m.def("velocity_backward", &velocity_backward);
    m.def("adamw_chunk", &alignflow_adamw_chunk);
    m.def("adamw_vec", &alignflow_adamw_vec);
    m.def("adamw_step", &adamw_step);
}
