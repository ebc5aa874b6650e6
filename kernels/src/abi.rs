//! The parameter list of every kernel, in order: what a launch must pass. A test compares each
//! entry with the `.entry` declaration in the embedded PTX (count, order and width of every
//! parameter), so a signature changed in a `.cu` file without this table fails the tests
//! instead of a launch on a GPU.
//!
//! Types: `ptr` a device pointer (`CUdeviceptr`, nullable where the kernel's file says so),
//! `u64`, `u32`, `i32` (CUDA `int`, flags are 0 or 1), `f32`, and `TeacherLogits`
//! ([`crate::kd::TeacherLogits`], 64 bytes by value). In a kernel name, `{T}` stands for both
//! `f32` and `bf16`.

/// `(kernel name pattern, parameters)`.
pub const PARAMS: &[(&str, &str)] = &[
    // elementwise.cu
    ("add_{T}", "ptr a, ptr b, ptr out, u64 n"),
    ("sub_{T}", "ptr a, ptr b, ptr out, u64 n"),
    ("mul_{T}", "ptr a, ptr b, ptr out, u64 n"),
    ("scale_{T}", "ptr x, ptr out, u64 n, f32 s"),
    ("add_scalar_{T}", "ptr x, ptr out, u64 n, f32 s"),
    ("accumulate_{T}", "ptr src, ptr dst, u64 n"),
    ("channel_add_{T}", "ptr x, ptr v, ptr out, u32 c, u32 inner"),
    ("channel_mul_{T}", "ptr x, ptr v, ptr out, u32 c, u32 inner"),
    (
        "channel_sum_{T}",
        "ptr g, ptr x, ptr out, u32 outer, u32 c, u32 inner, i32 accumulate",
    ),
    (
        "channel_sum_last_{T}",
        "ptr g, ptr x, ptr out, u32 outer, u32 c, i32 accumulate",
    ),
    ("relu_fwd_{T}", "ptr x, ptr y, u64 n"),
    ("relu_bwd_{T}", "ptr y, ptr g, ptr dx, u64 n"),
    ("gelu_fwd_{T}", "ptr x, ptr y, u64 n"),
    ("gelu_bwd_{T}", "ptr x, ptr g, ptr dx, u64 n"),
    ("tanh_fwd_{T}", "ptr x, ptr y, u64 n"),
    ("tanh_bwd_{T}", "ptr y, ptr g, ptr dx, u64 n"),
    ("cast_f32_to_bf16", "ptr x, ptr y, u64 n"),
    ("cast_bf16_to_f32", "ptr x, ptr y, u64 n"),
    // softmax.cu
    ("softmax_fwd_{T}", "ptr x, ptr y, u32 cols"),
    ("log_softmax_fwd_{T}", "ptr x, ptr y, u32 cols"),
    ("softmax_bwd_{T}", "ptr y, ptr dy, ptr dx, u32 cols"),
    ("log_softmax_bwd_{T}", "ptr y, ptr dy, ptr dx, u32 cols"),
    // layernorm.cu
    (
        "layernorm_fwd_{T}",
        "ptr x, ptr residual, ptr sum_out, ptr weight, ptr bias, ptr y, ptr mean_out, \
         ptr rstd_out, u32 d, f32 eps",
    ),
    (
        "layernorm_bwd_{T}",
        "ptr x, ptr dy, ptr dresidual, ptr mean, ptr rstd, ptr weight, ptr dx, ptr partial, \
         u32 rows, u32 d",
    ),
    (
        "layernorm_bwd_reduce",
        "ptr partial, u32 blocks, u32 d, ptr dweight, ptr dbias, i32 accumulate",
    ),
    // batchnorm.cu
    (
        "batchnorm_stats_partial_{T}",
        "ptr x, ptr partial, u32 n, u32 c, u32 hw",
    ),
    (
        "batchnorm_fwd_{T}",
        "ptr x, ptr y, ptr mean, ptr inv_std, ptr weight, ptr bias, u32 c, u32 hw",
    ),
    (
        "batchnorm_eval_fwd_{T}",
        "ptr x, ptr y, ptr running_mean, ptr running_var, ptr weight, ptr bias, u32 c, u32 hw, \
         f32 eps",
    ),
    (
        "batchnorm_bwd_partial_{T}",
        "ptr x, ptr dy, ptr mean, ptr inv_std, ptr partial, u32 n, u32 c, u32 hw",
    ),
    (
        "batchnorm_bwd_dx_{T}",
        "ptr x, ptr dy, ptr mean, ptr inv_std, ptr weight, ptr sum_dy, ptr sum_dyx, ptr dx, \
         u32 c, u32 hw, u32 count, i32 training",
    ),
    (
        "batchnorm_stats_finish",
        "ptr partial, u32 c, u32 splits, u32 count, f32 eps, f32 momentum, i32 update_running, \
         ptr mean, ptr var, ptr inv_std, ptr running_mean, ptr running_var",
    ),
    (
        "batchnorm_bwd_finish",
        "ptr partial, u32 c, u32 splits, ptr sum_dy, ptr sum_dyx, ptr dweight, ptr dbias, \
         i32 accumulate",
    ),
    // embedding.cu
    (
        "embedding_fwd_{T}",
        "ptr weight, ptr ids, ptr out, u32 dim, u32 vocab",
    ),
    (
        "embedding_bwd_count",
        "ptr ids, u32 n_ids, u32 vocab, u32 segments, ptr counts",
    ),
    (
        "embedding_bwd_offsets",
        "ptr counts, ptr totals, u32 vocab, u32 segments",
    ),
    ("embedding_bwd_scan", "ptr totals, ptr starts, u32 vocab"),
    (
        "embedding_bwd_place",
        "ptr ids, ptr counts, ptr starts, ptr order, u32 n_ids, u32 vocab, u32 segments",
    ),
    (
        "embedding_bwd_accumulate_{T}",
        "ptr g, ptr order, ptr starts, ptr dweight, u32 dim, i32 accumulate",
    ),
    // dropout.cu
    (
        "dropout_{T}",
        "ptr x, ptr y, u64 n, f32 p, f32 scale, u64 seed, u64 index_base",
    ),
    // cross_entropy.cu
    (
        "cross_entropy_fwd_{T}",
        "ptr logits, ptr labels, ptr lse, ptr row_loss, u32 classes, i32 ignore_index, \
         i32 has_ignore, f32 label_smoothing",
    ),
    (
        "cross_entropy_bwd_{T}",
        "ptr logits, ptr labels, ptr lse, ptr dlogits, u32 classes, i32 ignore_index, \
         i32 has_ignore, f32 label_smoothing, f32 scale",
    ),
    (
        "cross_entropy_reduce",
        "ptr row_loss, u32 rows, u32 kept, ptr out",
    ),
    // optimizers.cu ({T}: the gradient's type)
    (
        "sgdw_step_{T}",
        "ptr param, ptr grad, ptr momentum_buf, ptr working, u64 n, f32 lr, f32 decay, \
         f32 momentum, f32 grad_weight, i32 nesterov, i32 first",
    ),
    (
        "adamw_step_{T}",
        "ptr param, ptr grad, ptr exp_avg, ptr exp_avg_sq, ptr working, u64 n, f32 decay, \
         f32 grad_weight, f32 beta2, f32 sq_weight, f32 neg_step_size, \
         f32 bias_correction2_sqrt, f32 eps",
    ),
    // kd_loss.cu
    ("kd_loss_kl_bf16_bf16", KD_LOSS),
    ("kd_loss_kl_f32_bf16", KD_LOSS),
    ("kd_loss_kl_f32_f32", KD_LOSS),
    ("kd_loss_mse_bf16_bf16", KD_LOSS),
    ("kd_loss_mse_f32_bf16", KD_LOSS),
    ("kd_loss_mse_f32_f32", KD_LOSS),
    ("kd_loss_ce_bf16", KD_LOSS),
    ("kd_loss_ce_f32", KD_LOSS),
    (
        "kd_loss_reduce",
        "ptr row_ce, ptr row_kd, u32 rows, f32 ce_weight, f32 kd_weight, f32 lambda, ptr out",
    ),
    // pool.cu
    ("max_pool2d_fwd_{T}", POOL),
    ("max_pool2d_bwd_{T}", POOL_BWD),
    (
        "global_avg_pool_fwd_{T}",
        "ptr x, ptr y, u64 planes, u32 plane",
    ),
    (
        "global_avg_pool_bwd_{T}",
        "ptr g, ptr dx, u64 n, u32 plane, f32 scale",
    ),
    // layout.cu
    (
        "strided_copy_{T}",
        "ptr x, ptr y, u64 n, u32 rank, ptr meta",
    ),
    ("broadcast_add_{T}", BROADCAST),
    ("broadcast_sub_{T}", BROADCAST),
    ("broadcast_mul_{T}", BROADCAST),
    (
        "reduce_to_{T}",
        "ptr x, ptr y, u64 n, u64 m, u32 rank, u32 rrank, ptr meta",
    ),
    ("sum_all_{T}", "ptr x, ptr out, u64 n, u64 divisor"),
];

/// `max_pool2d_fwd_*`.
const POOL: &str = "ptr x, ptr y, ptr argmax, u64 n, u32 h, u32 w, u32 oh, u32 ow, u32 kernel, \
     u32 stride, u32 padding";

/// `max_pool2d_bwd_*`.
const POOL_BWD: &str = "ptr g, ptr argmax, ptr dx, u64 n, u32 h, u32 w, u32 oh, u32 ow, \
     u32 kernel, u32 stride, u32 padding";

/// `broadcast_{add,sub,mul}_*`.
const BROADCAST: &str = "ptr a, ptr b, ptr y, u64 n, u32 rank, ptr meta";

/// The parameters shared by every `kd_loss_*` row kernel.
const KD_LOSS: &str = "ptr logits, ptr grad, TeacherLogits teachers, u32 k, ptr labels, \
     ptr mask, ptr row_ce, ptr row_kd, u32 classes, i32 ignore_index, f32 inv_t, f32 t_sq, \
     f32 ce_weight, f32 kd_scale";

/// The parameter list of `kernel`, if it is a kernel of this crate.
pub fn params(kernel: &str) -> Option<&'static str> {
    PARAMS.iter().find_map(|(pattern, params)| {
        let matches = match pattern.split_once("{T}") {
            Some((pre, post)) => kernel
                .strip_prefix(pre)
                .and_then(|rest| rest.strip_suffix(post))
                .is_some_and(|t| t == "f32" || t == "bf16"),
            None => *pattern == kernel,
        };
        matches.then_some(*params)
    })
}

/// The PTX declaration (`u64`, `u32`, `f32`, `b8[64]`) each parameter of `kernel` compiles to.
pub fn ptx_types(kernel: &str) -> Option<Vec<&'static str>> {
    let list = params(kernel)?;
    Some(
        list.split(',')
            .map(|p| match p.split_whitespace().next() {
                Some("ptr") | Some("u64") => "u64",
                Some("u32") | Some("i32") => "u32",
                Some("f32") => "f32",
                Some("TeacherLogits") => "b8[64]",
                other => panic!("abi: unknown parameter type {other:?} in {kernel}"),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names;

    #[test]
    fn every_kernel_has_parameters_and_every_entry_a_kernel() {
        let all: Vec<&str> = names::FAMILIES
            .iter()
            .flat_map(|(_, ks)| ks.iter().copied())
            .collect();
        for k in &all {
            assert!(params(k).is_some(), "no parameter list for {k}");
            assert!(ptx_types(k).is_some());
        }
        for (pattern, _) in PARAMS {
            let expanded: Vec<String> = match pattern.split_once("{T}") {
                Some((pre, post)) => vec![format!("{pre}f32{post}"), format!("{pre}bf16{post}")],
                None => vec![pattern.to_string()],
            };
            for k in expanded {
                assert!(all.contains(&k.as_str()), "{pattern}: {k} is not a kernel");
            }
        }
        assert_eq!(params("add_f16"), None);
        assert_eq!(
            ptx_types("kd_loss_kl_bf16_bf16").unwrap()[..4],
            ["u64", "u64", "b8[64]", "u32"]
        );
    }
}
