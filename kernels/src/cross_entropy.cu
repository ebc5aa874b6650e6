// Cross-entropy with integer labels, an optional ignore index and label smoothing.
//
// CPU twins (engine/src/ops/loss.rs):
//   cross_entropy_fwd_T     cross_entropy_forward_cpu, per row: lse = log(sum(exp(x))) (kept
//                           for backward) and loss = (1 - eps) * (lse - x[y])
//                           + eps * (lse - mean(x)), in f64 as on the CPU; ignored rows 0
//   cross_entropy_reduce    the mean over kept rows (0 when none is kept, where PyTorch gives
//                           NaN), summed in f64
//   cross_entropy_bwd_T     cross_entropy_backward_cpu: scale * (exp(x - lse) - target) with
//                           target = 1 - eps + eps / C at the label and eps / C elsewhere;
//                           ignored rows 0
// `scale` is the upstream gradient divided by the number of kept rows, and `kept` of the
// reduce is that number: the host computes both, since it checks the labels before launching
// (cross_entropy_check_labels_cpu). A label outside [0, C) that is not the ignore index
// (which the host rejects) gives NaN rather than a read out of bounds. With eps = 0 the mean of
// the row is not computed, so a row holding -inf logits has a finite loss here and NaN on the
// CPU (0 * inf).
//
// Launch: fwd and bwd one block per row (`launch::rows(rows, classes)`); reduce one block
// (`launch::single_block()`).

#include "common.cuh"

using namespace rk;

namespace {

__device__ __forceinline__ bool ignored(int32_t y, int has_ignore, int32_t ignore_index) {
    return has_ignore && y == ignore_index;
}

template <typename T>
__device__ __forceinline__ void ce_fwd(const T* logits, const int32_t* labels, float* lse_out,
                                       float* row_loss, uint32_t classes, int32_t ignore_index,
                                       int has_ignore, float eps) {
    __shared__ Lse lse_scratch[32];
    __shared__ double sum_scratch[32];
    const uint64_t row = blockIdx.x;
    const T* x = logits + row * classes;
    Lse acc = lse_empty();
    double sx = 0.0;
    for (uint32_t j = threadIdx.x; j < classes; j += blockDim.x) {
        const float v = to_f32(x[j]);
        acc = lse_push(acc, v);
        if (eps != 0.0f) sx += (double)v;
    }
    const float lse = lse_value(block_lse(acc, lse_scratch));
    if (eps != 0.0f) sx = block_sum(sx, sum_scratch);
    if (threadIdx.x != 0) return;
    lse_out[row] = lse;
    const int32_t y = labels[row];
    if (ignored(y, has_ignore, ignore_index)) {
        row_loss[row] = 0.0f;
    } else if (y < 0 || (uint32_t)y >= classes) {
        row_loss[row] = NAN;
    } else {
        const double e = (double)eps;
        const double nll = (double)lse - (double)to_f32(x[y]);
        const double smooth = (double)lse - sx / (double)classes;
        row_loss[row] = (float)((1.0 - e) * nll + (e != 0.0 ? e * smooth : 0.0));
    }
}

template <typename T>
__device__ __forceinline__ void ce_bwd(const T* logits, const int32_t* labels, const float* lse,
                                       T* dlogits, uint32_t classes, int32_t ignore_index,
                                       int has_ignore, float eps, float scale) {
    const uint64_t row = blockIdx.x;
    const T* x = logits + row * classes;
    T* d = dlogits + row * classes;
    const int32_t y = labels[row];
    if (ignored(y, has_ignore, ignore_index) || y < 0 || (uint32_t)y >= classes) {
        const float fill = ignored(y, has_ignore, ignore_index) ? 0.0f : NAN;
        for (uint32_t j = threadIdx.x; j < classes; j += blockDim.x) d[j] = from_f32<T>(fill);
        return;
    }
    const float off = div_rn(eps, (float)classes);
    const float on = add_rn(sub_rn(1.0f, eps), off);
    const float l = lse[row];
    for (uint32_t j = threadIdx.x; j < classes; j += blockDim.x) {
        const float target = j == (uint32_t)y ? on : off;
        d[j] = from_f32<T>(mul_rn(scale, sub_rn(expf(sub_rn(to_f32(x[j]), l)), target)));
    }
}

}  // namespace

#define RK_CE_TYPED(T, S)                                                                     \
    extern "C" __global__ void cross_entropy_fwd_##S(                                         \
        const T* logits, const int32_t* labels, float* lse, float* row_loss, uint32_t classes,\
        int32_t ignore_index, int has_ignore, float label_smoothing) {                        \
        ce_fwd<T>(logits, labels, lse, row_loss, classes, ignore_index, has_ignore,           \
                  label_smoothing);                                                           \
    }                                                                                         \
    /* dlogits may be logits (in place) */                                                    \
    extern "C" __global__ void cross_entropy_bwd_##S(                                         \
        const T* logits, const int32_t* labels, const float* lse, T* dlogits,                \
        uint32_t classes, int32_t ignore_index, int has_ignore, float label_smoothing,        \
        float scale) {                                                                        \
        ce_bwd<T>(logits, labels, lse, dlogits, classes, ignore_index, has_ignore,            \
                  label_smoothing, scale);                                                    \
    }

RK_CE_TYPED(float, f32)
RK_CE_TYPED(bf16, bf16)

// out[0] = sum(row_loss) / kept (0 when kept == 0); one block, rows in a fixed order.
extern "C" __global__ void cross_entropy_reduce(const float* row_loss, uint32_t rows,
                                                uint32_t kept, float* out) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (uint32_t r = threadIdx.x; r < rows; r += blockDim.x) acc += (double)row_loss[r];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[0] = kept == 0 ? 0.0f : (float)(acc / (double)kept);
}
