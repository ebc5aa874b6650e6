// Elementwise family: same-shape arithmetic, per-channel broadcasting (bias add), the channel
// reductions of their backward passes, activations and casts.
//
// CPU twins (engine/src/ops/elementwise.rs, activation.rs, engine/src/tensor.rs):
//   add/sub/mul_T           binary_forward_cpu (same shapes)       bit-exact for f32
//   scale_T, add_scalar_T   ops::elementwise::scale / add_scalar   bit-exact for f32
//   accumulate_T            Tensor::add_assign (dst f32 += src)    bit-exact
//   channel_add_T           bias_add_forward_cpu                   bit-exact for f32
//   channel_sum_T           bias_add_backward_cpu (inner > 1)
//   channel_sum_last_T      bias_add_backward_cpu (inner == 1)
//   relu_fwd/bwd_T          relu_forward_cpu / relu_backward_cpu (from the output)  bit-exact
//   gelu_fwd/bwd_T          gelu_forward_cpu / gelu_backward_cpu (from the input); the CPU
//                           evaluates in f64, the GPU in f32 through normcdff (an erfc, so the
//                           negative tail keeps its relative accuracy): a few ulp apart
//   tanh_fwd/bwd_T          tanh_forward_cpu / tanh_backward_cpu (from the output)
//   cast_f32_to_bf16        Tensor::cast(BF16): round to nearest even  bit-exact
//   cast_bf16_to_f32        Tensor::cast(F32)                          bit-exact
//                           (casts: bit-exact for every non-NaN value; a NaN stays a NaN, but
//                           its payload may differ from `half`'s, which quiets signalling NaNs)
//
// Channel layout: x is viewed as [outer, c, inner]; inner = H*W for NCHW activations (axis 1),
// inner = 1 for the last axis of a linear layer's output. The channel kernels run one block per
// row: with inner > 1 a row is one plane (outer * c rows of inner values, one channel each);
// with inner == 1 a row is one sample (outer rows of c values).
// Launch: grid-stride kernels take `launch::elementwise(n)`; channel_add
// `launch::channel_rows(.., outer, c, inner)`; channel_sum `launch::channel_sum(.., outer, c,
// inner)` (one block per channel); channel_sum_last `launch::channel_sum_last(.., outer, c)`.

#include "common.cuh"

using namespace rk;

namespace {

struct Add {
    __device__ __forceinline__ float operator()(float a, float b) const { return add_rn(a, b); }
};
struct Sub {
    __device__ __forceinline__ float operator()(float a, float b) const { return sub_rn(a, b); }
};
struct Mul {
    __device__ __forceinline__ float operator()(float a, float b) const { return mul_rn(a, b); }
};

template <typename T, typename Op>
__device__ __forceinline__ void binary(const T* a, const T* b, T* out, uint64_t n) {
    Op op;
    RK_GRID_STRIDE(i, n) out[i] = from_f32<T>(op(to_f32(a[i]), to_f32(b[i])));
}

template <typename T, typename Op>
__device__ __forceinline__ void channel_binary(const T* x, const T* v, T* out, uint32_t c,
                                               uint32_t inner) {
    Op op;
    const uint64_t row = blockIdx.x;
    if (inner == 1) {
        const uint64_t base = row * c;
        for (uint32_t j = threadIdx.x; j < c; j += blockDim.x)
            out[base + j] = from_f32<T>(op(to_f32(x[base + j]), to_f32(v[j])));
    } else {
        const uint64_t base = row * inner;
        const float b = to_f32(v[row % c]);
        for (uint32_t j = threadIdx.x; j < inner; j += blockDim.x)
            out[base + j] = from_f32<T>(op(to_f32(x[base + j]), b));
    }
}

// One block per channel; the block's threads stride over the channel's outer * inner values.
template <typename T>
__device__ __forceinline__ void channel_sum(const T* g, float* out, uint32_t outer, uint32_t c,
                                            uint32_t inner) {
    __shared__ float scratch[32];
    const uint32_t ch = blockIdx.x;
    const uint64_t count = (uint64_t)outer * inner;
    float acc = 0.0f;
    auto add = [&](uint64_t o, uint64_t j) {
        acc += to_f32(g[(o * c + ch) * inner + j]);
    };
    if (count <= 0xffffffffull) {
        // 32-bit division: a 64-bit one costs several times more per element.
        for (uint32_t k = threadIdx.x; k < (uint32_t)count; k += blockDim.x) {
            const uint32_t o = k / inner;
            add(o, k - o * inner);
        }
    } else {
        for (uint64_t k = threadIdx.x; k < count; k += blockDim.x) {
            const uint64_t o = k / inner;
            add(o, k - o * inner);
        }
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[ch] = acc;
}

// Column sums of [outer, c]: a block of 32 x 8 threads owns 32 consecutive columns, each of its
// 8 rows of threads sums every 8th row (coalesced reads), then the 8 partials are added in order.
template <typename T>
__device__ __forceinline__ void channel_sum_last(const T* g, float* out, uint32_t outer,
                                                 uint32_t c) {
    __shared__ float part[8][33];
    const uint32_t col = blockIdx.x * 32 + threadIdx.x;
    float acc = 0.0f;
    if (col < c) {
        for (uint32_t r = threadIdx.y; r < outer; r += 8) acc += to_f32(g[(uint64_t)r * c + col]);
    }
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < c) {
        float s = part[0][threadIdx.x];
#pragma unroll
        for (int k = 1; k < 8; ++k) s += part[k][threadIdx.x];
        out[col] = s;
    }
}

__device__ __forceinline__ float gelu(float x) { return x * normcdff(x); }

__device__ __forceinline__ float gelu_grad(float x) {
    const float inv_sqrt_2pi = 0.398942280401432677940f;
    return normcdff(x) + x * (inv_sqrt_2pi * expf(-0.5f * x * x));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

#define RK_ELEMENTWISE_TYPED(T, S)                                                              \
    extern "C" __global__ void add_##S(const T* a, const T* b, T* out, uint64_t n) {            \
        binary<T, Add>(a, b, out, n);                                                           \
    }                                                                                           \
    extern "C" __global__ void sub_##S(const T* a, const T* b, T* out, uint64_t n) {            \
        binary<T, Sub>(a, b, out, n);                                                           \
    }                                                                                           \
    extern "C" __global__ void mul_##S(const T* a, const T* b, T* out, uint64_t n) {            \
        binary<T, Mul>(a, b, out, n);                                                           \
    }                                                                                           \
    /* out = s * x */                                                                           \
    extern "C" __global__ void scale_##S(const T* x, T* out, uint64_t n, float s) {            \
        RK_GRID_STRIDE(i, n) out[i] = from_f32<T>(mul_rn(to_f32(x[i]), s));                    \
    }                                                                                           \
    /* out = x + s */                                                                           \
    extern "C" __global__ void add_scalar_##S(const T* x, T* out, uint64_t n, float s) {       \
        RK_GRID_STRIDE(i, n) out[i] = from_f32<T>(add_rn(to_f32(x[i]), s));                    \
    }                                                                                           \
    /* dst += src, dst f32 (gradient accumulation) */                                           \
    extern "C" __global__ void accumulate_##S(const T* src, float* dst, uint64_t n) {          \
        RK_GRID_STRIDE(i, n) dst[i] = add_rn(dst[i], to_f32(src[i]));                          \
    }                                                                                           \
    extern "C" __global__ void channel_add_##S(const T* x, const T* v, T* out, uint32_t c,     \
                                               uint32_t inner) {                                \
        channel_binary<T, Add>(x, v, out, c, inner);                                            \
    }                                                                                           \
    /* out[ch] = sum over outer, inner of g */                                                  \
    extern "C" __global__ void channel_sum_##S(const T* g, float* out, uint32_t outer,         \
                                               uint32_t c, uint32_t inner) {                    \
        channel_sum<T>(g, out, outer, c, inner);                                                \
    }                                                                                           \
    extern "C" __global__ void channel_sum_last_##S(const T* g, float* out, uint32_t outer,    \
                                                    uint32_t c) {                               \
        channel_sum_last<T>(g, out, outer, c);                                                  \
    }                                                                                           \
    /* max(x, 0); NaN stays NaN */                                                              \
    extern "C" __global__ void relu_fwd_##S(const T* x, T* y, uint64_t n) {                    \
        RK_GRID_STRIDE(i, n) {                                                                  \
            const float v = to_f32(x[i]);                                                       \
            y[i] = from_f32<T>(v < 0.0f ? 0.0f : v);                                            \
        }                                                                                       \
    }                                                                                           \
    /* dx = g where the output y > 0, else 0 */                                                 \
    extern "C" __global__ void relu_bwd_##S(const T* y, const T* g, T* dx, uint64_t n) {       \
        RK_GRID_STRIDE(i, n) dx[i] = to_f32(y[i]) > 0.0f ? g[i] : from_f32<T>(0.0f);            \
    }                                                                                           \
    extern "C" __global__ void gelu_fwd_##S(const T* x, T* y, uint64_t n) {                    \
        RK_GRID_STRIDE(i, n) y[i] = from_f32<T>(gelu(to_f32(x[i])));                            \
    }                                                                                           \
    /* from the input x */                                                                      \
    extern "C" __global__ void gelu_bwd_##S(const T* x, const T* g, T* dx, uint64_t n) {       \
        RK_GRID_STRIDE(i, n) dx[i] = from_f32<T>(to_f32(g[i]) * gelu_grad(to_f32(x[i])));      \
    }                                                                                           \
    extern "C" __global__ void tanh_fwd_##S(const T* x, T* y, uint64_t n) {                    \
        RK_GRID_STRIDE(i, n) y[i] = from_f32<T>(tanhf(to_f32(x[i])));                           \
    }                                                                                           \
    /* from the output y: g * (1 - y^2) */                                                      \
    extern "C" __global__ void tanh_bwd_##S(const T* y, const T* g, T* dx, uint64_t n) {       \
        RK_GRID_STRIDE(i, n) {                                                                  \
            const float v = to_f32(y[i]);                                                       \
            dx[i] = from_f32<T>(mul_rn(to_f32(g[i]), sub_rn(1.0f, mul_rn(v, v))));             \
        }                                                                                       \
    }

RK_ELEMENTWISE_TYPED(float, f32)
RK_ELEMENTWISE_TYPED(bf16, bf16)

extern "C" __global__ void cast_f32_to_bf16(const float* x, bf16* y, uint64_t n) {
    RK_GRID_STRIDE(i, n) y[i] = from_f32<bf16>(x[i]);
}

extern "C" __global__ void cast_bf16_to_f32(const bf16* x, float* y, uint64_t n) {
    RK_GRID_STRIDE(i, n) y[i] = to_f32(x[i]);
}
