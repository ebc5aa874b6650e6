// Fused optimizer steps over a model's flat parameter buffer: one launch updates every
// parameter, its optimizer state and, optionally, a bf16 working copy of the weights.
//
// CPU twins (engine/src/optim/sgdw.rs, adamw.rs), element for element in the same order of
// operations, each rounded (no fused multiply-add), so in f32 the GPU produces the CPU's bits:
//   sgdw_step_G     sgdw_update_cpu with the scalars of SgdwStep
//   adamw_step_G    adamw_update_cpu with the scalars of AdamWStep (PyTorch's lerp for the
//                   first moment, branch for branch)
// The suffix G is the storage type of the gradient buffer (f32 or bf16, widened on read).
// Parameters and state are f32 (the master weights); `working`, when not null, receives the
// updated parameters rounded to bf16 in the same pass (the copy the forward pass reads).
// The per-step scalars (learning rate, decay multiplier, bias corrections) are computed on the
// host in f64 and rounded to f32 exactly as the CPU optimizers do (SgdwStep / AdamWStep).
//
// Launch: `launch::elementwise(n)` (grid-stride).

#include "common.cuh"

namespace rk {

// One SGDW element (sgdw_update_cpu's loop body). `buf` is read and written only when
// momentum != 0.
RK_HD float sgdw_element(float param, float g, float* buf, float lr, float decay, float momentum,
                         float grad_weight, int nesterov, int first) {
    float d = g;
    if (momentum != 0.0f) {
        const float b = first ? g : add_rn(mul_rn(*buf, momentum), mul_rn(grad_weight, g));
        *buf = b;
        d = nesterov ? add_rn(g, mul_rn(momentum, b)) : b;
    }
    // Two roundings, as PyTorch: p.mul_(decay) then p.add_(d, alpha=-lr).
    return sub_rn(mul_rn(param, decay), mul_rn(lr, d));
}

// PyTorch's lerp for f32 (adamw.rs's `lerp`).
RK_HD float torch_lerp(float start, float end, float weight) {
    return fabsf(weight) < 0.5f ? add_rn(start, mul_rn(weight, sub_rn(end, start)))
                                : sub_rn(end, mul_rn(sub_rn(end, start), sub_rn(1.0f, weight)));
}

// One AdamW element (adamw_update_cpu's loop body).
RK_HD float adamw_element(float param, float g, float* exp_avg, float* exp_avg_sq, float decay,
                          float grad_weight, float beta2, float sq_weight, float neg_step_size,
                          float bias_correction2_sqrt, float eps) {
    const float p = mul_rn(param, decay);
    const float m = torch_lerp(*exp_avg, g, grad_weight);
    const float v = add_rn(mul_rn(*exp_avg_sq, beta2), mul_rn(mul_rn(sq_weight, g), g));
    *exp_avg = m;
    *exp_avg_sq = v;
    const float denom = add_rn(div_rn(sqrt_rn(v), bias_correction2_sqrt), eps);
    return add_rn(p, div_rn(mul_rn(neg_step_size, m), denom));
}

}  // namespace rk

using namespace rk;

#define RK_OPTIM_TYPED(G, S)                                                                  \
    /* momentum_buf may be null when momentum == 0; working may be null */                   \
    extern "C" __global__ void sgdw_step_##S(float* param, const G* grad, float* momentum_buf, \
                                             bf16* working, uint64_t n, float lr, float decay, \
                                             float momentum, float grad_weight, int nesterov,  \
                                             int first) {                                      \
        RK_GRID_STRIDE(i, n) {                                                                 \
            float buf = momentum != 0.0f && !first ? momentum_buf[i] : 0.0f;                   \
            const float p = sgdw_element(param[i], to_f32(grad[i]), &buf, lr, decay, momentum, \
                                         grad_weight, nesterov, first);                        \
            if (momentum != 0.0f) momentum_buf[i] = buf;                                       \
            param[i] = p;                                                                      \
            if (working != nullptr) working[i] = from_f32<bf16>(p);                            \
        }                                                                                      \
    }                                                                                          \
    /* working may be null */                                                                  \
    extern "C" __global__ void adamw_step_##S(                                                 \
        float* param, const G* grad, float* exp_avg, float* exp_avg_sq, bf16* working,         \
        uint64_t n, float decay, float grad_weight, float beta2, float sq_weight,              \
        float neg_step_size, float bias_correction2_sqrt, float eps) {                         \
        RK_GRID_STRIDE(i, n) {                                                                 \
            float m = exp_avg[i], v = exp_avg_sq[i];                                           \
            const float p = adamw_element(param[i], to_f32(grad[i]), &m, &v, decay,            \
                                          grad_weight, beta2, sq_weight, neg_step_size,        \
                                          bias_correction2_sqrt, eps);                         \
            exp_avg[i] = m;                                                                    \
            exp_avg_sq[i] = v;                                                                 \
            param[i] = p;                                                                      \
            if (working != nullptr) working[i] = from_f32<bf16>(p);                            \
        }                                                                                      \
    }

RK_OPTIM_TYPED(float, f32)
RK_OPTIM_TYPED(bf16, bf16)
