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
}
