//! The name of every kernel, by family: the strings the engine passes to `cuModuleGetFunction`
//! on the module loaded from that family's fatbin. Each constant's value is its own name
//! (`names::kd_loss::kd_loss_kl_bf16_bf16 == "kd_loss_kl_bf16_bf16"`), so a typo is a compile
//! error, and the tests check that every name here is defined by every image of its fatbin.
//!
//! Suffixes: `_f32` / `_bf16` is the storage type of the activation tensors (of the gradient
//! buffer for the optimizers); `kd_loss_<kind>_<student>_<teachers>`. The signatures and the CPU
//! twins are documented in each `src/<family>.cu` and listed in docs/kernels.md.

macro_rules! family {
    ($(#[$doc:meta])* $fam:ident { $($name:ident),* $(,)? }) => {
        $(#[$doc])*
        #[allow(non_upper_case_globals)]
        pub mod $fam {
            $(pub const $name: &str = stringify!($name);)*
            /// Every kernel of the family.
            pub const ALL: &[&str] = &[$(stringify!($name)),*];
        }
    };
}

family! {
    /// `src/elementwise.cu`.
    elementwise {
        add_f32, sub_f32, mul_f32, scale_f32, add_scalar_f32, accumulate_f32,
        channel_add_f32, channel_mul_f32, channel_sum_f32, channel_sum_last_f32,
        relu_fwd_f32, relu_bwd_f32, gelu_fwd_f32, gelu_bwd_f32, tanh_fwd_f32, tanh_bwd_f32,
        add_bf16, sub_bf16, mul_bf16, scale_bf16, add_scalar_bf16, accumulate_bf16,
        channel_add_bf16, channel_mul_bf16, channel_sum_bf16, channel_sum_last_bf16,
        relu_fwd_bf16, relu_bwd_bf16, gelu_fwd_bf16, gelu_bwd_bf16, tanh_fwd_bf16, tanh_bwd_bf16,
        cast_f32_to_bf16, cast_bf16_to_f32,
    }
}

family! {
    /// `src/softmax.cu`.
    softmax {
        softmax_fwd_f32, log_softmax_fwd_f32, softmax_bwd_f32, log_softmax_bwd_f32,
        softmax_fwd_bf16, log_softmax_fwd_bf16, softmax_bwd_bf16, log_softmax_bwd_bf16,
    }
}

family! {
    /// `src/layernorm.cu`.
    layernorm {
        layernorm_fwd_f32, layernorm_bwd_f32, layernorm_fwd_bf16, layernorm_bwd_bf16,
        layernorm_bwd_reduce,
    }
}

family! {
    /// `src/batchnorm.cu`.
    batchnorm {
        batchnorm_stats_partial_f32, batchnorm_fwd_f32, batchnorm_eval_fwd_f32,
        batchnorm_bwd_partial_f32, batchnorm_bwd_dx_f32,
        batchnorm_stats_partial_bf16, batchnorm_fwd_bf16, batchnorm_eval_fwd_bf16,
        batchnorm_bwd_partial_bf16, batchnorm_bwd_dx_bf16,
        batchnorm_stats_finish, batchnorm_bwd_finish,
    }
}

family! {
    /// `src/embedding.cu`.
    embedding {
        embedding_fwd_f32, embedding_fwd_bf16,
        embedding_bwd_count, embedding_bwd_offsets, embedding_bwd_scan, embedding_bwd_place,
        embedding_bwd_accumulate_f32, embedding_bwd_accumulate_bf16,
    }
}

family! {
    /// `src/dropout.cu`.
    dropout { dropout_f32, dropout_bf16 }
}

family! {
    /// `src/cross_entropy.cu`.
    cross_entropy {
        cross_entropy_fwd_f32, cross_entropy_bwd_f32, cross_entropy_fwd_bf16,
        cross_entropy_bwd_bf16, cross_entropy_reduce,
    }
}

family! {
    /// `src/optimizers.cu`.
    optimizers { sgdw_step_f32, adamw_step_f32, sgdw_step_bf16, adamw_step_bf16 }
}

family! {
    /// `src/kd_loss.cu`.
    kd_loss {
        kd_loss_kl_bf16_bf16, kd_loss_kl_f32_bf16, kd_loss_kl_f32_f32,
        kd_loss_mse_bf16_bf16, kd_loss_mse_f32_bf16, kd_loss_mse_f32_f32,
        kd_loss_ce_bf16, kd_loss_ce_f32, kd_loss_reduce,
    }
}

family! {
    /// `src/pool.cu`.
    pool {
        max_pool2d_fwd_f32, max_pool2d_bwd_f32, global_avg_pool_fwd_f32, global_avg_pool_bwd_f32,
        max_pool2d_fwd_bf16, max_pool2d_bwd_bf16, global_avg_pool_fwd_bf16,
        global_avg_pool_bwd_bf16,
    }
}

family! {
    /// `src/layout.cu`.
    layout {
        strided_copy_f32, broadcast_add_f32, broadcast_sub_f32, broadcast_mul_f32, reduce_to_f32,
        sum_all_f32,
        strided_copy_bf16, broadcast_add_bf16, broadcast_sub_bf16, broadcast_mul_bf16,
        reduce_to_bf16, sum_all_bf16,
    }
}

/// Every family (the name of its fatbin in [`crate::all`]) and its kernels.
pub const FAMILIES: &[(&str, &[&str])] = &[
    ("elementwise", elementwise::ALL),
    ("softmax", softmax::ALL),
    ("layernorm", layernorm::ALL),
    ("batchnorm", batchnorm::ALL),
    ("embedding", embedding::ALL),
    ("dropout", dropout::ALL),
    ("cross_entropy", cross_entropy::ALL),
    ("optimizers", optimizers::ALL),
    ("kd_loss", kd_loss::ALL),
    ("pool", pool::ALL),
    ("layout", layout::ALL),
];
