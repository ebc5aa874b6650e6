//! The fused distillation loss, `L = L_ce + λ·L_kd` and its gradient in one pass per row: the
//! whole family in one place.
//!
//! | Piece | File |
//! |---|---|
//! | the kernels | `kernels/src/kd_loss.cu` |
//! | their ABI beyond the generated launchers (teacher pointers, the row launch) | `kernels/src/kd_loss.rs` |
//! | what both arms share: [`KdLoss`], [`KdKind`], kernel choice, row counts, scalars | `host.rs` |
//! | the f64 reference of one row | `reference.rs` |
//! | the CPU twin, the oracle of the kernels | `cpu.rs` |
//! | the loss on cached top-k targets (CPU) and its op | `cached.rs`, `cached_op.rs` |
//! | the op on the tape, dispatching to the CPU or the CUDA arm | `op.rs` |
//! | the CUDA arm (plans and launch; behind `crate::cuda::kd_loss`) | `cuda.rs` |
//! | the CUDA arm of the loss on cached targets below k = C (behind `crate::cuda::kd_loss_cached`) | `cached_cuda.rs` |
//!
//! Tests: the CPU twin against the f64 formulas here (`cpu.rs`), the host side's counts and
//! scalars (`host.rs`), the CUDA arm's plans on the kernel simulator against the reference
//! (`cuda.rs`), the kernels' shared math bit for bit (`kernels/tests/host_parity.rs`),
//! the kernels against the CPU twin (`tests/kd_loss_kernel.rs`, the cached-target kernels against
//! `kd_loss_buckets_cpu` there too), PyTorch parity
//! (`tests/kd_loss.rs`), and `recycle gpu-check` on a device.

mod cached;
#[cfg(feature = "cuda")]
pub(crate) mod cached_cuda;
mod cached_op;
mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod host;
mod op;
mod reference;

pub use cached::{kd_loss_buckets_cpu, kd_loss_cached_cpu, CachedTargets};
pub use cached_op::kd_loss_cached;
pub use cpu::{kd_loss_cpu, KdLossOutput};
pub use host::{kernel_name, row_counts, KdKind, KdLoss, KdScalars, Storage};
pub use op::{kd_loss, KdLossVars};
pub use reference::reference_row;
