//! The fused distillation loss. The whole family — the CPU twin, the op on the tape, the
//! host side its CUDA arm shares and the f64 reference — lives in `recycle_engine::kd_loss`,
//! beside the CUDA arm (`recycle_engine::cuda`) and the kernels (`recycle-kernels`'s
//! `kd_loss.cu`); the trainer and the bindings reach it here.

pub use recycle_engine::kd_loss::{kd_loss, kd_loss_cpu, KdKind, KdLoss, KdLossOutput, KdLossVars};
