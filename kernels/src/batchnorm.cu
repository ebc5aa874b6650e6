// 2-d batch normalisation over NCHW activations, viewed as [n, c, hw].
//
// CPU twins (engine/src/ops/norm.rs):
//   batchnorm_stats_partial_T + batchnorm_stats_finish
//                          batch_norm2d_stats_cpu (per-channel mean and biased variance) and
//                          batch_norm_running_update_cpu (momentum, unbiased variance), plus
//                          inv_std = 1 / sqrt(var + eps) in f32 as batch_norm2d computes it
//   batchnorm_fwd_T        batch_norm2d_forward_cpu: (x - mean) * scale + bias with
//                          scale = inv_std * weight, centred first as the CPU (folding the mean
//                          into one shift cancels when |mean| >> std); bit-exact in f32 for
//                          equal statistics: no fused multiply-add
//   batchnorm_eval_fwd_T   the same map from the running statistics (evaluation mode)
//   batchnorm_bwd_partial_T + batchnorm_bwd_finish
//                          batch_norm2d_backward_cpu's per-channel sum(dy) and sum(dy * xhat)
//                          (accumulated in f64 as on the CPU) = dbias and dweight
//   batchnorm_bwd_dx_T     batch_norm2d_backward_cpu's dx, training or evaluation
//
// Statistics: the CPU makes two f64 passes (mean, then squared deviations). Here one pass
// accumulates, in f64, sums of (x - K) and (x - K)^2 with K the channel's first value (a shift
// that keeps the variance formula from cancelling), split over `splits` blocks per channel
// whose partials the finishing kernel adds in order; the result matches the CPU to f32
// rounding.
//
// Launch: the partial kernels use `launch::batchnorm_reduce(n, c, hw)`: grid (splits, c), and
// a scratch of c * (1 + 2 * splits) f64 (`BatchnormReduce::scratch_f64`); the finishing kernels
// `launch::columns(c)`; forward and dx `launch::planes(n * c, hw)`: one block per plane.

#include "common.cuh"

using namespace rk;

namespace {

// Element k of channel ch, for k in [0, n * hw): plane k / hw of the batch.
template <typename T>
__device__ __forceinline__ float channel_at(const T* x, uint32_t c, uint32_t hw, uint32_t ch,
                                            uint32_t k) {
    const uint32_t b = k / hw, o = k - b * hw;
    return to_f32(x[((uint64_t)b * c + ch) * hw + o]);
}

// This block's slice of the channel's n * hw values: split s of `splits` equal ranges.
__device__ __forceinline__ void split_range(uint32_t count, uint32_t* lo, uint32_t* hi) {
    const uint64_t s = blockIdx.x, splits = gridDim.x;
    *lo = (uint32_t)(count * s / splits);
    *hi = (uint32_t)(count * (s + 1) / splits);
}

template <typename T>
__device__ __forceinline__ void stats_partial(const T* x, double* partial, uint32_t n, uint32_t c,
                                              uint32_t hw) {
    __shared__ double scratch[32];
    const uint32_t ch = blockIdx.y, splits = gridDim.x, count = n * hw;
    const float shift = to_f32(x[(uint64_t)ch * hw]);
    uint32_t lo, hi;
    split_range(count, &lo, &hi);
    double s1 = 0.0, s2 = 0.0;
    for (uint32_t k = lo + threadIdx.x; k < hi; k += blockDim.x) {
        const double v = (double)channel_at(x, c, hw, ch, k) - (double)shift;
        s1 += v;
        s2 += v * v;
    }
    s1 = block_sum(s1, scratch);
    s2 = block_sum(s2, scratch);
    double* p = partial + (uint64_t)ch * (1 + 2 * splits);
    if (threadIdx.x == 0) {
        if (blockIdx.x == 0) p[0] = (double)shift;
        p[1 + 2 * blockIdx.x] = s1;
        p[2 + 2 * blockIdx.x] = s2;
    }
}

template <typename T>
__device__ __forceinline__ void bwd_partial(const T* x, const T* dy, const float* mean,
                                            const float* inv_std, double* partial, uint32_t n,
                                            uint32_t c, uint32_t hw) {
    __shared__ double scratch[32];
    const uint32_t ch = blockIdx.y, count = n * hw;
    const float m = mean[ch], is = inv_std[ch];
    uint32_t lo, hi;
    split_range(count, &lo, &hi);
    double sdy = 0.0, sdyx = 0.0;
    for (uint32_t k = lo + threadIdx.x; k < hi; k += blockDim.x) {
        const uint32_t b = k / hw, o = k - b * hw;
        const uint64_t idx = ((uint64_t)b * c + ch) * hw + o;
        const float g = to_f32(dy[idx]);
        const float xhat = mul_rn(sub_rn(to_f32(x[idx]), m), is);
        sdy += (double)g;
        sdyx += (double)mul_rn(g, xhat);
    }
    sdy = block_sum(sdy, scratch);
    sdyx = block_sum(sdyx, scratch);
    if (threadIdx.x == 0) {
        double* p = partial + (uint64_t)ch * (1 + 2 * gridDim.x);
        p[1 + 2 * blockIdx.x] = sdy;
        p[2 + 2 * blockIdx.x] = sdyx;
    }
}

// y = (x - mean) * scale + bias for plane blockIdx.x (channel blockIdx.x % c).
template <typename T>
__device__ __forceinline__ void affine_plane(const T* x, T* y, float mean, float scale,
                                             float bias, uint32_t hw) {
    const uint64_t base = (uint64_t)blockIdx.x * hw;
    for (uint32_t j = threadIdx.x; j < hw; j += blockDim.x)
        y[base + j] =
            from_f32<T>(add_rn(mul_rn(sub_rn(to_f32(x[base + j]), mean), scale), bias));
}

template <typename T>
__device__ __forceinline__ void bwd_dx(const T* x, const T* dy, const float* mean,
                                       const float* inv_std, const float* weight,
                                       const float* sum_dy, const float* sum_dyx, T* dx,
                                       uint32_t c, uint32_t hw, uint32_t count, int training) {
    const uint32_t ch = blockIdx.x % c;
    const uint64_t base = (uint64_t)blockIdx.x * hw;
    const float k = mul_rn(weight[ch], inv_std[ch]);
    if (training) {
        const float m = mean[ch], is = inv_std[ch];
        const float mdy = div_rn(sum_dy[ch], (float)count);
        const float mdyx = div_rn(sum_dyx[ch], (float)count);
        for (uint32_t j = threadIdx.x; j < hw; j += blockDim.x) {
            const float g = to_f32(dy[base + j]);
            const float xhat = mul_rn(sub_rn(to_f32(x[base + j]), m), is);
            dx[base + j] = from_f32<T>(mul_rn(k, sub_rn(sub_rn(g, mdy), mul_rn(xhat, mdyx))));
        }
    } else {
        for (uint32_t j = threadIdx.x; j < hw; j += blockDim.x)
            dx[base + j] = from_f32<T>(mul_rn(k, to_f32(dy[base + j])));
    }
}

}  // namespace

#define RK_BATCHNORM_TYPED(T, S)                                                              \
    /* grid (splits, c); partial: c * (1 + 2 * splits) f64 */                                 \
    extern "C" __global__ void batchnorm_stats_partial_##S(const T* x, double* partial,      \
                                                           uint32_t n, uint32_t c,            \
                                                           uint32_t hw) {                     \
        stats_partial<T>(x, partial, n, c, hw);                                               \
    }                                                                                         \
    /* one block per plane (n * c blocks) */                                                  \
    extern "C" __global__ void batchnorm_fwd_##S(const T* x, T* y, const float* mean,        \
                                                 const float* inv_std, const float* weight,  \
                                                 const float* bias, uint32_t c,               \
                                                 uint32_t hw) {                               \
        const uint32_t ch = blockIdx.x % c;                                                   \
        const float scale = mul_rn(inv_std[ch], weight[ch]);                                  \
        affine_plane<T>(x, y, mean[ch], scale, bias[ch], hw);                                 \
    }                                                                                         \
    extern "C" __global__ void batchnorm_eval_fwd_##S(                                        \
        const T* x, T* y, const float* running_mean, const float* running_var,               \
        const float* weight, const float* bias, uint32_t c, uint32_t hw, float eps) {         \
        const uint32_t ch = blockIdx.x % c;                                                   \
        const float inv_std = div_rn(1.0f, sqrt_rn(add_rn(running_var[ch], eps)));            \
        const float scale = mul_rn(inv_std, weight[ch]);                                      \
        affine_plane<T>(x, y, running_mean[ch], scale, bias[ch], hw);                         \
    }                                                                                         \
    /* grid (splits, c); partial: c * (1 + 2 * splits) f64 (slot 0 unused) */                 \
    extern "C" __global__ void batchnorm_bwd_partial_##S(                                     \
        const T* x, const T* dy, const float* mean, const float* inv_std, double* partial,   \
        uint32_t n, uint32_t c, uint32_t hw) {                                                \
        bwd_partial<T>(x, dy, mean, inv_std, partial, n, c, hw);                              \
    }                                                                                         \
    /* one block per plane; sum_dy / sum_dyx from batchnorm_bwd_finish (unused when not      \
       training); count = n * hw */                                                           \
    extern "C" __global__ void batchnorm_bwd_dx_##S(                                          \
        const T* x, const T* dy, const float* mean, const float* inv_std,                    \
        const float* weight, const float* sum_dy, const float* sum_dyx, T* dx, uint32_t c,   \
        uint32_t hw, uint32_t count, int training) {                                          \
        bwd_dx<T>(x, dy, mean, inv_std, weight, sum_dy, sum_dyx, dx, c, hw, count, training); \
    }

RK_BATCHNORM_TYPED(float, f32)
RK_BATCHNORM_TYPED(bf16, bf16)

// Per channel: mean, biased variance, inv_std; the running statistics move towards the batch
// ones: running = (1 - momentum) * running + momentum * batch, with the variance made unbiased
// (* count / (count - 1), in f32 as on the CPU).
extern "C" __global__ void batchnorm_stats_finish(const double* partial, uint32_t c,
                                                  uint32_t splits, uint32_t count, float eps,
                                                  float momentum, float* mean, float* var,
                                                  float* inv_std,
                                                  float* running_mean, float* running_var) {
    RK_GRID_STRIDE(ch, c) {
        const double* p = partial + ch * (1 + 2 * (uint64_t)splits);
        double s1 = 0.0, s2 = 0.0;
        for (uint32_t s = 0; s < splits; ++s) {
            s1 += p[1 + 2 * s];
            s2 += p[2 + 2 * s];
        }
        const double nd = (double)count, d1 = s1 / nd;
        const float m = (float)(p[0] + d1);
        const float v = (float)fmax(s2 / nd - d1 * d1, 0.0);
        mean[ch] = m;
        var[ch] = v;
        inv_std[ch] = div_rn(1.0f, sqrt_rn(add_rn(v, eps)));
        const float unbias = div_rn((float)count, sub_rn((float)count, 1.0f));
        const float keep = sub_rn(1.0f, momentum);
        running_mean[ch] = add_rn(mul_rn(keep, running_mean[ch]), mul_rn(momentum, m));
        running_var[ch] =
            add_rn(mul_rn(keep, running_var[ch]), mul_rn(momentum, mul_rn(v, unbias)));
    }
}

// sum_dy[ch] = sum(dy), sum_dyx[ch] = sum(dy * xhat) (the scratch batchnorm_bwd_dx reads);
// dbias / dweight = the same.
extern "C" __global__ void batchnorm_bwd_finish(const double* partial, uint32_t c,
                                                uint32_t splits, float* sum_dy, float* sum_dyx,
                                                float* dweight, float* dbias) {
    RK_GRID_STRIDE(ch, c) {
        const double* p = partial + ch * (1 + 2 * (uint64_t)splits);
        double sdy = 0.0, sdyx = 0.0;
        for (uint32_t s = 0; s < splits; ++s) {
            sdy += p[1 + 2 * s];
            sdyx += p[2 + 2 * s];
        }
        const float fdy = (float)sdy, fdyx = (float)sdyx;
        sum_dy[ch] = fdy;
        sum_dyx[ch] = fdyx;
        dbias[ch] = fdy;
        dweight[ch] = fdyx;
    }
}
