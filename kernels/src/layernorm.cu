// Layer normalisation over the last dimension.
//
// CPU twins (engine/src/ops/norm.rs):
//   layernorm_fwd_T         layer_norm_stats_cpu + layer_norm_forward_cpu
//   layernorm_bwd_T         layer_norm_backward_cpu's dx and its per-block partial sums of
//                           dweight / dbias
//   layernorm_bwd_reduce    the sum of those partials in block order (dweight, dbias)
// Statistics are accumulated in f64 as on the CPU (mean, biased variance, then
// rstd = 1 / sqrt(var + eps) in f64, rounded to f32); the affine map rounds after every
// operation as Rust does, so with equal statistics the outputs are bit-identical in f32.
//
// Forward: one block per row, `launch::rows(rows, d)`. Backward: `launch::layernorm_backward`
// gives a fixed number of blocks G (a function of `rows` only); block b handles rows b, b + G,
// ... and owns partial[b][0..d] (dweight) and partial[b][d..2d] (dbias); then
// `layernorm_bwd_reduce` with `launch::columns(d)` adds the G partials column by column.

#include "common.cuh"

using namespace rk;

namespace {

template <typename T>
__device__ __forceinline__ void layernorm_fwd(const T* x, const T* weight, const T* bias, T* y,
                                              float* mean_out, float* rstd_out, uint32_t d,
                                              float eps) {
    __shared__ double scratch[32];
    const uint64_t row = blockIdx.x, base = row * d;

    // Pass 1: the sum.
    double acc = 0.0;
    for (uint32_t j = threadIdx.x; j < d; j += blockDim.x) acc += (double)to_f32(x[base + j]);
    const double mean = block_sum(acc, scratch) / (double)d;

    // Pass 2: sum of squared deviations (two passes, as the CPU: no cancellation).
    acc = 0.0;
    for (uint32_t j = threadIdx.x; j < d; j += blockDim.x) {
        const double dv = (double)to_f32(x[base + j]) - mean;
        acc += dv * dv;
    }
    const double var = block_sum(acc, scratch) / (double)d;
    const float mean_f = (float)mean;
    const float rstd = (float)(1.0 / sqrt(var + (double)eps));
    if (threadIdx.x == 0) {
        if (mean_out != nullptr) mean_out[row] = mean_f;
        if (rstd_out != nullptr) rstd_out[row] = rstd;
    }

    // Pass 3: (x - mean) * rstd * weight + bias, rounded after each operation.
    for (uint32_t j = threadIdx.x; j < d; j += blockDim.x) {
        const float h = to_f32(x[base + j]);
        const float v = mul_rn(mul_rn(sub_rn(h, mean_f), rstd), to_f32(weight[j]));
        y[base + j] = from_f32<T>(add_rn(v, to_f32(bias[j])));
    }
}

template <typename T>
__device__ __forceinline__ void layernorm_bwd(const T* x, const T* dy, const float* mean,
                                              const float* rstd,
                                              const T* weight, T* dx, float* partial,
                                              uint32_t rows, uint32_t d) {
    __shared__ float scratch[32];
    float* pw = partial + (uint64_t)blockIdx.x * 2 * d;
    float* pb = pw + d;
    // Each thread owns columns threadIdx.x + k * blockDim.x of this block's partials for the
    // whole kernel, so the read-modify-writes below need no synchronisation.
    for (uint32_t j = threadIdx.x; j < d; j += blockDim.x) {
        pw[j] = 0.0f;
        pb[j] = 0.0f;
    }
    for (uint32_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const uint64_t base = (uint64_t)row * d;
        const float m = mean[row], rs = rstd[row];
        float a_g = 0.0f, a_gx = 0.0f;
        for (uint32_t j = threadIdx.x; j < d; j += blockDim.x) {
            const float g = to_f32(dy[base + j]), xc = sub_rn(to_f32(x[base + j]), m);
            const float gw = mul_rn(g, to_f32(weight[j]));
            a_g += gw;
            a_gx += mul_rn(mul_rn(gw, xc), rs);
            pw[j] = add_rn(pw[j], mul_rn(mul_rn(g, xc), rs));
            pb[j] = add_rn(pb[j], g);
        }
        const float mg = block_sum(a_g, scratch) / (float)d;
        const float mgx = block_sum(a_gx, scratch) / (float)d;
        for (uint32_t j = threadIdx.x; j < d; j += blockDim.x) {
            const float g = to_f32(dy[base + j]);
            const float xhat = mul_rn(sub_rn(to_f32(x[base + j]), m), rs);
            const float gw = mul_rn(g, to_f32(weight[j]));
            dx[base + j] = from_f32<T>(mul_rn(rs, sub_rn(sub_rn(gw, mg), mul_rn(xhat, mgx))));
        }
    }
}

}  // namespace

#define RK_LAYERNORM_TYPED(T, S)                                                              \
    /* mean_out and rstd_out may be null (inference) */                                      \
    extern "C" __global__ void layernorm_fwd_##S(const T* x, const T* weight, const T* bias,  \
                                                 T* y, float* mean_out, float* rstd_out,      \
                                                 uint32_t d, float eps) {                     \
        layernorm_fwd<T>(x, weight, bias, y, mean_out, rstd_out, d, eps);                     \
    }                                                                                         \
    /* partial is [gridDim.x, 2, d] f32 scratch */                                            \
    extern "C" __global__ void layernorm_bwd_##S(const T* x, const T* dy, const float* mean,  \
                                                 const float* rstd, const T* weight, T* dx,   \
                                                 float* partial, uint32_t rows, uint32_t d) { \
        layernorm_bwd<T>(x, dy, mean, rstd, weight, dx, partial, rows, d);                    \
    }

RK_LAYERNORM_TYPED(float, f32)
RK_LAYERNORM_TYPED(bf16, bf16)

// dweight[j] = sum over blocks of partial[b][j], dbias[j] = ... partial[b][d + j], blocks in
// order (the CPU adds its row blocks in order too).
extern "C" __global__ void layernorm_bwd_reduce(const float* partial, uint32_t blocks,
                                                uint32_t d, float* dweight, float* dbias) {
    RK_GRID_STRIDE(j, d) {
        float sw = 0.0f, sb = 0.0f;
        for (uint32_t b = 0; b < blocks; ++b) {
            sw = add_rn(sw, partial[(uint64_t)b * 2 * d + j]);
            sb = add_rn(sb, partial[(uint64_t)b * 2 * d + d + j]);
        }
        dweight[j] = sw;
        dbias[j] = sb;
    }
}
