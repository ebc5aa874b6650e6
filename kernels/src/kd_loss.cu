// The fused distillation loss: L = L_ce + lambda * L_kd and dL/d(student logits), in one pass
// per row (two sweeps over the row, which stays in L2 between them), without storing any
// probability matrix.
//
// CPU twin: engine/src/kd_loss/cpu.rs, `kd_loss_cpu` (`recycle_engine::kd_loss`). Per row r of C classes,
// with student logits s, the mean t of k teachers' logits (summed in teacher order, then divided
// by k, in f32), label y and mask m:
//   - rows with m[r] == 0 count for nothing: zero gradient, zero losses;
//   - CE (rows whose label is not the ignore index): row_ce = lse(s) - s[y],
//     gradient (softmax(s) - onehot(y)) * ce_weight;
//   - KL at temperature T (kd_loss_kl_*): row_kd = T^2 * sum_c pt * (log pt - log ps) with
//     ps = softmax(s / T), pt = softmax(t / T): KL(p_teacher || p_student), the teacher being the
//     target (PyTorch: kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True) * T^2);
//     gradient += kd_scale * (ps - pt);
//   - MSE (kd_loss_mse_*): row_kd = mean_c (s - t)^2, gradient += kd_scale * (s - t);
//   - CE only (kd_loss_ce_*: no teacher, or lambda == 0): the CE terms alone.
// The normalisers are kernel arguments computed on the host, which knows the labels and the mask
// before launching (it validates them) while the kernel sees one row: ce_weight = 1 / (rows
// with a label), kd_weight = 1 / (counted rows), and kd_scale = lambda * T * kd_weight (KL) or
// lambda * 2 * kd_weight / C (MSE), each computed in f32 in the CPU's order
// (`recycle_engine::kd_loss::KdScalars`); an upstream gradient other than 1 is folded into
// ce_weight and kd_scale. The gradient is written as the student's type (bf16 or f32) to
// `grad`, which may be the logits buffer itself (in place): each element is read, in both
// sweeps, by the thread that writes it.
//
// Sweep 1 keeps three online log-sum-exp pairs per thread (s, s/T, t/T), merged over the block;
// sweep 2 writes the gradient and sums the row's KD term. Everything is f32 except the final
// reduction over rows (kd_loss_reduce, f64 in a fixed order, as the CPU sums rows in f64):
// ce = sum(row_ce) * ce_weight, kd = sum(row_kd) * kd_weight, total = ce + lambda * kd.
// Per-row values agree with the CPU to a few ulp (expf and the order of the sums differ); a
// label outside [0, C) that is not the ignore index (the host rejects those) gives a NaN row.
//
// Launch: one block per row, `launch::rows(rows, C)` (any C: the row is strided, 30522 and
// beyond); kd_loss_reduce one block, `launch::single_block()`.

#include "common.cuh"

using namespace rk;

// At most this many teachers' logits are averaged in the kernel (the generated
// `launchers::MAX_TEACHERS`); a larger ensemble is averaged beforehand.
#define RK_MAX_TEACHERS 8

// The teachers' logit buffers, passed by value: `k` of them are used. The generator writes
// the Rust `#[repr(C)] launchers::TeacherLogits` from this definition.
struct TeacherLogits {
    const void* p[RK_MAX_TEACHERS];
};

enum KdKind { KD_CE_ONLY = 0, KD_KL = 1, KD_MSE = 2 };

namespace rk {

// 1 / k when k is a power of two (then x * (1 / k) is exactly x / k), else 0: teacher_mean
// divides. Computed once per block, so the common ensembles (1, 2, 4, 8 teachers) skip the IEEE
// division's slow path per element.
RK_HD float exact_inv(uint32_t k) { return (k & (k - 1)) == 0 ? 1.0f / (float)k : 0.0f; }

// Mean of the k teachers' logits at element idx: summed in teacher order, divided by k (as the
// CPU loss: `sum::<f32>() / k`). `inv_k` is exact_inv(k).
template <typename T>
RK_HD float teacher_mean(const TeacherLogits& t, uint32_t k, float inv_k, uint64_t idx) {
    float acc = to_f32(static_cast<const T*>(t.p[0])[idx]);
#pragma unroll
    for (uint32_t q = 1; q < RK_MAX_TEACHERS; ++q)
        if (q < k) acc = add_rn(acc, to_f32(static_cast<const T*>(t.p[q])[idx]));
    return inv_k != 0.0f ? mul_rn(acc, inv_k) : div_rn(acc, (float)k);
}

// The CE part of one gradient element: (exp(s - lse) - [is label]) * ce_weight.
RK_HD float kd_grad_ce(float s, float lse, bool is_label, float ce_weight) {
    return mul_rn(sub_rn(expf(sub_rn(s, lse)), is_label ? 1.0f : 0.0f), ce_weight);
}

// One KL element: adds kd_scale * (ps - pt) to *g and returns pt * (log pt - log ps).
RK_HD float kd_kl_element(float s, float t, float inv_t, float lse_s, float lse_t,
                          float kd_scale, float* g) {
    const float log_ps = sub_rn(mul_rn(s, inv_t), lse_s);
    const float log_pt = sub_rn(mul_rn(t, inv_t), lse_t);
    const float pt = expf(log_pt);
    *g = add_rn(*g, mul_rn(kd_scale, sub_rn(expf(log_ps), pt)));
    return mul_rn(pt, sub_rn(log_pt, log_ps));
}

// One MSE element: adds kd_scale * (s - t) to *g and returns (s - t)^2.
RK_HD float kd_mse_element(float s, float t, float kd_scale, float* g) {
    const float d = sub_rn(s, t);
    *g = add_rn(*g, mul_rn(kd_scale, d));
    return mul_rn(d, d);
}

}  // namespace rk

namespace {

template <typename S, typename T, int KIND>
__device__ __forceinline__ void kd_loss_row(const S* logits, S* grad, const TeacherLogits& teachers,
                                            uint32_t k, const int32_t* labels,
                                            const int32_t* mask, float* row_ce, float* row_kd,
                                            uint32_t classes, int32_t ignore_index, float inv_t,
                                            float t_sq, float ce_weight, float kd_scale) {
    __shared__ Lse lse_scratch[32];
    __shared__ float sum_scratch[32];
    __shared__ float label_logit;
    const uint64_t row = blockIdx.x, base = row * classes;
    const S* s = logits + base;
    S* gr = grad + base;

    if (mask != nullptr && mask[row] == 0) {
        for (uint32_t j = threadIdx.x; j < classes; j += blockDim.x) gr[j] = from_f32<S>(0.0f);
        if (threadIdx.x == 0) {
            row_ce[row] = 0.0f;
            if (KIND != KD_CE_ONLY) row_kd[row] = 0.0f;
        }
        return;
    }
    const int32_t y = labels[row];
    const float inv_k = exact_inv(k);
    const bool has_label = y != ignore_index;
    const bool valid = has_label && y >= 0 && (uint32_t)y < classes;

    // Sweep 1: log-normalisers of s, s / T and t / T; the label's logit.
    Lse a_s = lse_empty(), a_ss = lse_empty(), a_tt = lse_empty();
    for (uint32_t j = threadIdx.x; j < classes; j += blockDim.x) {
        const float sv = to_f32(s[j]);
        if (valid) {
            a_s = lse_push(a_s, sv);
            if (j == (uint32_t)y) label_logit = sv;
        }
        if (KIND == KD_KL) {
            a_ss = lse_push(a_ss, mul_rn(sv, inv_t));
            a_tt = lse_push(a_tt, mul_rn(teacher_mean<T>(teachers, k, inv_k, base + j), inv_t));
        }
    }
    float lse = 0.0f, lse_s = 0.0f, lse_t = 0.0f;
    if (valid) lse = lse_value(block_lse(a_s, lse_scratch));
    if (KIND == KD_KL) {
        lse_s = lse_value(block_lse(a_ss, lse_scratch));
        lse_t = lse_value(block_lse(a_tt, lse_scratch));
    }
    // Every read of sweep 1 (and the label's logit) happens before any write of sweep 2.
    __syncthreads();

    // Sweep 2: the gradient, written in place, and the row's KD sum.
    float acc = 0.0f;
    for (uint32_t j = threadIdx.x; j < classes; j += blockDim.x) {
        const float sv = to_f32(s[j]);
        float g = valid ? kd_grad_ce(sv, lse, j == (uint32_t)y, ce_weight) : 0.0f;
        if (KIND == KD_KL)
            acc += kd_kl_element(sv, teacher_mean<T>(teachers, k, inv_k, base + j), inv_t, lse_s, lse_t,
                                 kd_scale, &g);
        if (KIND == KD_MSE)
            acc += kd_mse_element(sv, teacher_mean<T>(teachers, k, inv_k, base + j), kd_scale, &g);
        gr[j] = from_f32<S>(g);
    }
    if (KIND != KD_CE_ONLY) acc = block_sum(acc, sum_scratch);
    if (threadIdx.x == 0) {
        row_ce[row] = valid ? sub_rn(lse, label_logit) : (has_label ? NAN : 0.0f);
        if (KIND == KD_KL) row_kd[row] = mul_rn(acc, t_sq);
        if (KIND == KD_MSE) row_kd[row] = div_rn(acc, (float)classes);
    }
}

}  // namespace

// Every entry point has the same signature:
//   logits [rows, C] (student, S), grad [rows, C] (S; may equal logits), teachers (k pointers
//   to [rows, C] of type T; ignored by kd_loss_ce_*), k (1..=8; 0 for kd_loss_ce_*),
//   labels i32 [rows], mask i32 [rows] or null (non-zero = the row counts), row_ce f32 [rows],
//   row_kd f32 [rows] (null for kd_loss_ce_*), C, ignore_index, inv_t = 1 / T, t_sq = T * T,
//   ce_weight, kd_scale.
#define RK_KD_ROW(NAME, S, T, KIND)                                                             \
    extern "C" __global__ void NAME(const S* logits, S* grad, TeacherLogits teachers,           \
                                    uint32_t k, const int32_t* labels, const int32_t* mask,     \
                                    float* row_ce, float* row_kd, uint32_t classes,             \
                                    int32_t ignore_index, float inv_t, float t_sq,              \
                                    float ce_weight, float kd_scale) {                          \
        kd_loss_row<S, T, KIND>(logits, grad, teachers, k, labels, mask, row_ce, row_kd,        \
                                classes, ignore_index, inv_t, t_sq, ce_weight, kd_scale);       \
    }

RK_KD_ROW(kd_loss_kl_bf16_bf16, bf16, bf16, KD_KL)
RK_KD_ROW(kd_loss_kl_f32_bf16, float, bf16, KD_KL)
RK_KD_ROW(kd_loss_kl_f32_f32, float, float, KD_KL)
RK_KD_ROW(kd_loss_mse_bf16_bf16, bf16, bf16, KD_MSE)
RK_KD_ROW(kd_loss_mse_f32_bf16, float, bf16, KD_MSE)
RK_KD_ROW(kd_loss_mse_f32_f32, float, float, KD_MSE)
RK_KD_ROW(kd_loss_ce_bf16, bf16, bf16, KD_CE_ONLY)
RK_KD_ROW(kd_loss_ce_f32, float, float, KD_CE_ONLY)

// out = [ce, kd, total]: ce = sum(row_ce) * ce_weight, kd = sum(row_kd) * kd_weight (0 when
// row_kd is null), total = ce + lambda * kd. One block; rows in a fixed order, f64 sums.
extern "C" __global__ void kd_loss_reduce(const float* row_ce, const float* row_kd, uint32_t rows,
                                          float ce_weight, float kd_weight, float lambda,
                                          float* out) {
    __shared__ double scratch[32];
    double a_ce = 0.0, a_kd = 0.0;
    for (uint32_t r = threadIdx.x; r < rows; r += blockDim.x) {
        a_ce += (double)row_ce[r];
        if (row_kd != nullptr) a_kd += (double)row_kd[r];
    }
    a_ce = block_sum(a_ce, scratch);
    a_kd = block_sum(a_kd, scratch);
    if (threadIdx.x == 0) {
        const float ce = (float)(a_ce * (double)ce_weight);
        const float kd = row_kd != nullptr ? (float)(a_kd * (double)kd_weight) : 0.0f;
        out[0] = ce;
        out[1] = kd;
        out[2] = add_rn(ce, mul_rn(lambda, kd));
    }
}


// ---------------------------------------------------------------------------------------------
// The loss on cached teacher targets (CPU twin: engine/src/kd_loss/cached.rs,
// `kd_loss_buckets_cpu`). A row of the cache holds the teacher's k largest logits v_i at classes
// I (`indices`, `values`, [rows, k]) and L = log sum_{j not in I} e^{t_j / T} (`tail_lse`,
// [rows]; -inf when k = C). Per row:
//   - masked rows and CE: as the kernels above (row_ce, the CE gradient);
//   - KL (kd_loss_cached_kl_*): the teacher's k + 1 buckets q_i = e^{v_i/T} / Z, q_rest = e^L / Z,
//     the student's p_j = softmax(s/T)_j and P_rest summed over the classes not in I (directly,
//     not 1 - sum p_i, as the CPU: a small rest keeps its digits);
//     row_kd = T^2 * [sum_i q_i (log q_i - log p_i) + q_rest (log q_rest - log P_rest)],
//     gradient += kd_scale * (p_j - q_j) on I and kd_scale * p_j * (1 - q_rest / P_rest) on
//     the rest (kd_scale = lambda * T / kd_rows);
//   - MSE (kd_loss_cached_mse_*): row_kd = (1/k) sum_i (s_i - v_i)^2, gradient += kd_scale *
//     (s_i - v_i) on I (kd_scale = lambda * 2 / (kd_rows * k)).
// Which classes are in I is a bitmap of the row in shared memory (RK_CACHED_MAX_CLASSES
// classes at most, the range of the cache's u16 indices; the host refuses more), built without
// atomics: each thread owns words of the bitmap and scans the row's k indices for them. The
// indices of a row are distinct (the host validates them), so each class's gradient is written
// once: the classes not in I in the sweep over the row, those in I in the loop over the k
// cached entries. The gradient may be the logits buffer itself (in place): every read of a
// class happens before its write, by the thread that writes it. Reduced by kd_loss_reduce.

#define RK_CACHED_MAX_CLASSES 65536

namespace {

template <typename S, int KIND>
__device__ __forceinline__ void kd_loss_cached_row(
    const S* logits, S* grad, const uint32_t* indices, const float* values,
    const float* tail_lse, uint32_t k, const int32_t* labels, const int32_t* mask, float* row_ce,
    float* row_kd, uint32_t classes, int32_t ignore_index, float inv_t, float t_sq,
    float ce_weight, float kd_scale) {
    __shared__ uint32_t in_top[RK_CACHED_MAX_CLASSES / 32];
    __shared__ Lse lse_scratch[32];
    __shared__ float sum_scratch[32];
    __shared__ float label_logit;
    const uint64_t row = blockIdx.x, base = row * classes;
    const S* s = logits + base;
    S* gr = grad + base;
    const uint32_t* idx = indices + row * (uint64_t)k;
    const float* v = values + row * (uint64_t)k;

    if (mask != nullptr && mask[row] == 0) {
        for (uint32_t j = threadIdx.x; j < classes; j += blockDim.x) gr[j] = from_f32<S>(0.0f);
        if (threadIdx.x == 0) {
            row_ce[row] = 0.0f;
            row_kd[row] = 0.0f;
        }
        return;
    }
    const int32_t y = labels[row];
    const bool has_label = y != ignore_index;
    const bool valid = has_label && y >= 0 && (uint32_t)y < classes;

    // The bitmap of the cached classes.
    const uint32_t words = (classes + 31) / 32;
    for (uint32_t w = threadIdx.x; w < words; w += blockDim.x) {
        uint32_t bits = 0;
        for (uint32_t i = 0; i < k; ++i)
            if (idx[i] / 32 == w) bits |= 1u << (idx[i] % 32);
        in_top[w] = bits;
    }
    __syncthreads();

    // Sweep 1: log-normalisers of s, s / T and of s / T over the classes not cached.
    Lse a_s = lse_empty(), a_ss = lse_empty(), a_rest = lse_empty();
    for (uint32_t j = threadIdx.x; j < classes; j += blockDim.x) {
        const float sv = to_f32(s[j]);
        if (valid) {
            a_s = lse_push(a_s, sv);
            if (j == (uint32_t)y) label_logit = sv;
        }
        if (KIND == KD_KL) {
            const float x = mul_rn(sv, inv_t);
            a_ss = lse_push(a_ss, x);
            if (((in_top[j / 32] >> (j % 32)) & 1u) == 0) a_rest = lse_push(a_rest, x);
        }
    }
    // The teacher's normaliser over its k values and the rest: log Z = lse(v / T, L).
    Lse a_t = lse_empty();
    if (KIND == KD_KL)
        for (uint32_t i = threadIdx.x; i < k; i += blockDim.x)
            a_t = lse_push(a_t, mul_rn(v[i], inv_t));
    float lse = 0.0f, lse_s = 0.0f, lse_rest = -INFINITY, lse_t = 0.0f, q_rest = 0.0f;
    const float tail = KIND == KD_KL ? tail_lse[row] : -INFINITY;
    if (valid) lse = lse_value(block_lse(a_s, lse_scratch));
    if (KIND == KD_KL) {
        lse_s = lse_value(block_lse(a_ss, lse_scratch));
        lse_rest = lse_value(block_lse(a_rest, lse_scratch));
        lse_t = lse_value(lse_push(block_lse(a_t, lse_scratch), tail));
        q_rest = expf(sub_rn(tail, lse_t));
    }
    // The tail classes' KL gradient factor p_j * (1 - q_rest / P_rest), as kd_scale * e^(x -
    // lse_s) * rest_coef; a rest the student gives no mass leaves p_j (as the CPU).
    const float p_rest = expf(sub_rn(lse_rest, lse_s));
    const float rest_coef = p_rest > 0.0f ? sub_rn(1.0f, div_rn(q_rest, p_rest)) : 1.0f;
    // Every read of sweep 1 (and the label's logit) happens before any write of sweep 2.
    __syncthreads();

    // Sweep 2: the gradient of the classes not cached.
    for (uint32_t j = threadIdx.x; j < classes; j += blockDim.x) {
        if ((in_top[j / 32] >> (j % 32)) & 1u) continue;
        const float sv = to_f32(s[j]);
        float g = valid ? kd_grad_ce(sv, lse, j == (uint32_t)y, ce_weight) : 0.0f;
        if (KIND == KD_KL) {
            const float p = expf(sub_rn(mul_rn(sv, inv_t), lse_s));
            g = add_rn(g, mul_rn(kd_scale, mul_rn(p, rest_coef)));
        }
        gr[j] = from_f32<S>(g);
    }
    // The cached classes: their gradient and the row's KD sum.
    float acc = 0.0f;
    for (uint32_t i = threadIdx.x; i < k; i += blockDim.x) {
        const uint32_t j = idx[i];
        const float sv = to_f32(s[j]);
        float g = valid ? kd_grad_ce(sv, lse, j == (uint32_t)y, ce_weight) : 0.0f;
        if (KIND == KD_KL) {
            const float log_q = sub_rn(mul_rn(v[i], inv_t), lse_t);
            const float log_p = sub_rn(mul_rn(sv, inv_t), lse_s);
            const float q = expf(log_q);
            g = add_rn(g, mul_rn(kd_scale, sub_rn(expf(log_p), q)));
            if (q > 0.0f) acc += mul_rn(q, sub_rn(log_q, log_p));
        }
        if (KIND == KD_MSE) acc += kd_mse_element(sv, v[i], kd_scale, &g);
        gr[j] = from_f32<S>(g);
    }
    acc = block_sum(acc, sum_scratch);
    if (threadIdx.x == 0) {
        row_ce[row] = valid ? sub_rn(lse, label_logit) : (has_label ? NAN : 0.0f);
        if (KIND == KD_KL) {
            if (q_rest > 0.0f)
                acc += mul_rn(q_rest, sub_rn(sub_rn(tail, lse_t), sub_rn(lse_rest, lse_s)));
            row_kd[row] = mul_rn(acc, t_sq);
        }
        if (KIND == KD_MSE) row_kd[row] = div_rn(acc, (float)k);
    }
}

}  // namespace

// Every entry point has the same signature:
//   logits [rows, C] (student, S), grad [rows, C] (S; may equal logits), indices u32 [rows, k]
//   (distinct classes per row), values f32 [rows, k], tail_lse f32 [rows] (read by KL only),
//   k (1..=C), labels i32 [rows], mask i32 [rows] or null, row_ce f32 [rows], row_kd f32
//   [rows], C (at most RK_CACHED_MAX_CLASSES), ignore_index, inv_t = 1 / T, t_sq = T * T,
//   ce_weight, kd_scale.
#define RK_KD_CACHED_ROW(NAME, S, KIND)                                                         \
    extern "C" __global__ void NAME(const S* logits, S* grad, const uint32_t* indices,          \
                                    const float* values, const float* tail_lse, uint32_t k,     \
                                    const int32_t* labels, const int32_t* mask, float* row_ce,  \
                                    float* row_kd, uint32_t classes, int32_t ignore_index,      \
                                    float inv_t, float t_sq, float ce_weight, float kd_scale) { \
        kd_loss_cached_row<S, KIND>(logits, grad, indices, values, tail_lse, k, labels, mask,   \
                                    row_ce, row_kd, classes, ignore_index, inv_t, t_sq,         \
                                    ce_weight, kd_scale);                                       \
    }

RK_KD_CACHED_ROW(kd_loss_cached_kl_f32, float, KD_KL)
RK_KD_CACHED_ROW(kd_loss_cached_kl_bf16, bf16, KD_KL)
RK_KD_CACHED_ROW(kd_loss_cached_mse_f32, float, KD_MSE)
RK_KD_CACHED_ROW(kd_loss_cached_mse_bf16, bf16, KD_MSE)
