// The emulator's own test cases (tests/test_csrc_emulator.py): one legal kernel it must run clean, and
// planted bugs it must report. Each launcher returns the launch's cudaError_t.
#include "common/alignflow_cuda.h"

// Sum of `values` over a block whose last warp may be partial: a shuffle reduction over exactly the
// lanes the warp has (xor offsets stay inside a power-of-two lane count), partials through shared
// memory, one __syncthreads. Legal CUDA: the emulator must run it clean, in any thread order.
__device__ float warp_sum(float v, unsigned lanes) {
    unsigned mask = lanes >= 32 ? 0xffffffffu : (1u << lanes) - 1u;
    for (unsigned offset = lanes / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(mask, v, offset);
    return v;
}

__device__ unsigned lanes_in_warp() {
    unsigned first = threadIdx.x / 32 * 32;
    return min(32u, blockDim.x - first);
}

__global__ void block_sum(const float* values, float* out) {
    AF_SHARED(float, partial, 32);
    unsigned t = threadIdx.x;
    float v = warp_sum(values[blockIdx.x * blockDim.x + t], lanes_in_warp());
    if (t % 32 == 0) partial[t / 32] = v;
    __syncthreads();
    if (t == 0) {
        float s = 0.0f;
        for (unsigned w = 0; w < (blockDim.x + 31) / 32; ++w) s += partial[w];
        out[blockIdx.x] = s;
    }
}

// Bug: no barrier between the partials' writes and thread 0's reads.
__global__ void missing_barrier(const float* values, float* out) {
    AF_SHARED(float, partial, 32);
    unsigned t = threadIdx.x;
    float v = warp_sum(values[blockIdx.x * blockDim.x + t], lanes_in_warp());
    if (t % 32 == 0) partial[t / 32] = v;
    if (t == 0) {
        float s = 0.0f;
        for (unsigned w = 0; w < (blockDim.x + 31) / 32; ++w) s += partial[w];
        out[blockIdx.x] = s;
    }
}

// Bug: two reductions reuse one buffer; the second writes before every thread has read the first
// (a __syncthreads is missing between them: a write-after-read race).
__global__ void reused_buffer(const float* values, float* out) {
    AF_SHARED(float, partial, 32);
    unsigned t = threadIdx.x, warps = (blockDim.x + 31) / 32;
    float x = values[blockIdx.x * blockDim.x + t];
    float v = warp_sum(x, lanes_in_warp());
    if (t % 32 == 0) partial[t / 32] = v;
    __syncthreads();
    float mean = 0.0f;
    for (unsigned w = 0; w < warps; ++w) mean += partial[w];
    mean /= blockDim.x;
    float c = warp_sum((x - mean) * (x - mean), lanes_in_warp());
    if (t % 32 == 0) partial[t / 32] = c;
    __syncthreads();
    if (t == 0) {
        float s = 0.0f;
        for (unsigned w = 0; w < warps; ++w) s += partial[w];
        out[blockIdx.x] = s;
    }
}

// Bug: a full-warp mask in a block whose last warp is partial (lanes 16..31 do not exist).
__global__ void full_mask_partial_warp(const float* values, float* out) {
    unsigned t = threadIdx.x;
    float v = values[t];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    out[t] = v;
}

// Bug: half the warp returns early, the rest shuffle with a mask that still names them.
__global__ void exited_lane(const float* values, float* out) {
    unsigned t = threadIdx.x;
    if (t >= 16) return;
    out[t] = __shfl_xor_sync(0xffffffffu, values[t], 1);
}

// Bug: two __syncthreads on the two sides of a branch.
__global__ void divergent_barrier(const float* values, float* out) {
    unsigned t = threadIdx.x;
    if (t < 16) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[t] = values[t];
}

// Bug: lane 0 waits for lane 1 in __syncwarp while lane 1 waits for the block in __syncthreads.
__global__ void deadlock(const float* values, float* out) {
    unsigned t = threadIdx.x;
    if (t == 0) __syncwarp(0x3u);
    else __syncthreads();
    out[t] = values[t];
}

// Legal but reads outside the mask: lanes 0..15 shuffle among themselves and read lane + 16. The
// value is undefined on a GPU; the emulator returns NaN.
__global__ void read_outside_mask(const float* values, float* out) {
    unsigned t = threadIdx.x;
    if (t < 16) out[t] = __shfl_sync(0xffffu, values[t], t + 16);
    else out[t] = values[t];
}

// Votes and the other shuffles, over a full warp: out[t] gets one value per op.
__global__ void warp_ops(const float* values, float* out) {
    unsigned t = threadIdx.x;
    float v = values[t];
    unsigned ballot = __ballot_sync(0xffffffffu, v > 0.0f);
    out[0 * 32 + t] = __shfl_up_sync(0xffffffffu, v, 3);
    out[1 * 32 + t] = __shfl_down_sync(0xffffffffu, v, 5, 16);
    out[2 * 32 + t] = __shfl_sync(0xffffffffu, v, 7, 8);
    out[3 * 32 + t] = static_cast<float>(__popc(ballot));
    out[4 * 32 + t] = static_cast<float>(__any_sync(0xffffffffu, v > 2.0f));
    out[5 * 32 + t] = static_cast<float>(__all_sync(0xffffffffu, v > -10.0f));
}

// Out of bounds: writes one element past the output (AddressSanitizer names this line).
__global__ void out_of_bounds(const float* values, float* out) {
    unsigned t = threadIdx.x;
    out[t + 1] = values[t];
}

// Atomics from every block into one cell.
__global__ void atomic_total(const float* values, float* out) {
    atomicAdd(out, values[blockIdx.x * blockDim.x + threadIdx.x]);
}

#define CASE(name)                                                                                   \
    AF_C_EXPORT int case_##name(const float* values, float* out, int blocks, int threads) {          \
        auto name##_kernel = &name;                                                                  \
        return static_cast<int>(AF_LAUNCH(name##_kernel, dim3(blocks), dim3(threads), 0, nullptr, values, out)); \
    }

CASE(block_sum)
CASE(missing_barrier)
CASE(reused_buffer)
CASE(full_mask_partial_warp)
CASE(exited_lane)
CASE(divergent_barrier)
CASE(deadlock)
CASE(read_outside_mask)
CASE(warp_ops)
CASE(out_of_bounds)
CASE(atomic_total)
