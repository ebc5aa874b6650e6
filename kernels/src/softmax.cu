// Softmax family: softmax and log-softmax over the last dimension, forward and backward.
//
// CPU twins (engine/src/backend/softmax.rs):
//   softmax_fwd_T          softmax_forward_cpu:      y = exp(x - max) * (1 / sum)
//   log_softmax_fwd_T      log_softmax_forward_cpu:  y = (x - max) - ln(sum)
//   softmax_bwd_T          softmax_backward_cpu:     dx = y * (dy - <dy, y>)
//   log_softmax_bwd_T      log_softmax_backward_cpu: dx = dy - exp(y) * sum(dy)
// The max and the sum come from one online pass (a running max and a sum rescaled when the max
// grows), merged across threads, warps and the block; the CPU uses two passes. The two agree to
// a few ulp; a row of -inf gives NaN, as on the CPU and in PyTorch.
//
// One block per row (`launch::rows(rows, cols)`): grid.x = rows, blockDim.x a multiple of 32
// chosen from cols; each thread strides over the row.

#include "common.cuh"

using namespace rk;

namespace {

template <typename T> __device__ __forceinline__ Lse row_lse(const T* x, uint32_t cols) {
    __shared__ Lse scratch[32];
    Lse acc = lse_empty();
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) acc = lse_push(acc, to_f32(x[j]));
    return block_lse(acc, scratch);
}

template <typename T>
__device__ __forceinline__ void softmax_fwd(const T* x, T* y, uint32_t cols, bool log) {
    const uint64_t base = (uint64_t)blockIdx.x * cols;
    x += base;
    y += base;
    const Lse r = row_lse(x, cols);
    if (log) {
        const float log_sum = logf(r.s);
        for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x)
            y[j] = from_f32<T>(sub_rn(sub_rn(to_f32(x[j]), r.m), log_sum));
    } else {
        const float inv = 1.0f / r.s;
        for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x)
            y[j] = from_f32<T>(mul_rn(expf(to_f32(x[j]) - r.m), inv));
    }
}

template <typename T>
__device__ __forceinline__ void softmax_bwd(const T* y, const T* dy, T* dx, uint32_t cols,
                                            bool log) {
    __shared__ float scratch[32];
    const uint64_t base = (uint64_t)blockIdx.x * cols;
    y += base;
    dy += base;
    dx += base;
    float acc = 0.0f;
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x)
        acc += log ? to_f32(dy[j]) : to_f32(y[j]) * to_f32(dy[j]);
    const float s = block_sum(acc, scratch);
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
        const float yj = to_f32(y[j]), gj = to_f32(dy[j]);
        dx[j] = from_f32<T>(log ? sub_rn(gj, mul_rn(expf(yj), s)) : mul_rn(yj, sub_rn(gj, s)));
    }
}

}  // namespace

#define RK_SOFTMAX_TYPED(T, S)                                                                \
    extern "C" __global__ void softmax_fwd_##S(const T* x, T* y, uint32_t cols) {            \
        softmax_fwd<T>(x, y, cols, false);                                                    \
    }                                                                                         \
    extern "C" __global__ void log_softmax_fwd_##S(const T* x, T* y, uint32_t cols) {        \
        softmax_fwd<T>(x, y, cols, true);                                                     \
    }                                                                                         \
    extern "C" __global__ void softmax_bwd_##S(const T* y, const T* dy, T* dx,               \
                                               uint32_t cols) {                               \
        softmax_bwd<T>(y, dy, dx, cols, false);                                               \
    }                                                                                         \
    extern "C" __global__ void log_softmax_bwd_##S(const T* y, const T* dy, T* dx,           \
                                                   uint32_t cols) {                           \
        softmax_bwd<T>(y, dy, dx, cols, true);                                                \
    }

RK_SOFTMAX_TYPED(float, f32)
RK_SOFTMAX_TYPED(bf16, bf16)
