//! The ABI of the fused distillation loss (`src/kd_loss.cu`) that the generated launchers do
//! not spell: the teachers' pointers as the kernel takes them (by value), and the typed launch
//! of the row kernel a name picks. The host-side arguments (kernel choice, row counts, scalars)
//! and the f64 reference live with the loss's other host code in `recycle_engine::kd_loss`.

use std::fmt;

use crate::call::{KernelCall, Ptr};
use crate::launch::LaunchConfig;
use crate::launchers as k;

/// Most teachers whose logits the kernel averages itself (`RK_MAX_TEACHERS`).
pub const MAX_TEACHERS: usize = 8;

/// The kernel's `TeacherLogits` argument: device pointers (`CUdeviceptr`) to each teacher's
/// `[rows, C]` logits, the first `k` of them used; passed by value.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TeacherLogits {
    pub ptrs: [u64; MAX_TEACHERS],
}

impl TeacherLogits {
    /// The pointers of 1 to [`MAX_TEACHERS`] teachers (none for the CE-only kernel: use
    /// `TeacherLogits::default()` and k = 0).
    pub fn new(ptrs: &[u64]) -> Result<Self, KdError> {
        if ptrs.is_empty() || ptrs.len() > MAX_TEACHERS {
            return Err(KdError(format!(
                "{} teachers given; the fused kernel averages 1 to {MAX_TEACHERS} \
                 (average a larger ensemble first)",
                ptrs.len()
            )));
        }
        let mut t = TeacherLogits::default();
        t.ptrs[..ptrs.len()].copy_from_slice(ptrs);
        Ok(t)
    }
}

/// An argument the fused loss cannot take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KdError(pub String);

impl fmt::Display for KdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kd_loss: {}", self.0)
    }
}

impl std::error::Error for KdError {}

/// The arguments of a row kernel (`kd_loss_kl_*`, `kd_loss_mse_*`, `kd_loss_ce_*`); `logits`
/// and `grad` hold the student's storage type, which the kernel's name says.
#[derive(Debug, Clone, Copy)]
pub struct RowArgs {
    pub logits: u64,
    pub grad: u64,
    pub teachers: TeacherLogits,
    pub k: u32,
    pub labels: Ptr<i32>,
    pub mask: Ptr<i32>,
    pub row_ce: Ptr<f32>,
    pub row_kd: Ptr<f32>,
    pub classes: u32,
    pub ignore_index: i32,
    pub inv_t: f32,
    pub t_sq: f32,
    pub ce_weight: f32,
    pub kd_scale: f32,
}

/// The launch of the row kernel `kernel` (a name `recycle_engine::kd_loss::kernel_name` gives), through its typed
/// launcher.
pub fn row_call(kernel: &str, config: LaunchConfig, a: &RowArgs) -> Result<KernelCall, KdError> {
    macro_rules! call {
        ($launcher:path) => {
            $launcher(
                config,
                Ptr::new(a.logits),
                Ptr::new(a.grad),
                a.teachers,
                a.k,
                a.labels,
                a.mask,
                a.row_ce,
                a.row_kd,
                a.classes,
                a.ignore_index,
                a.inv_t,
                a.t_sq,
                a.ce_weight,
                a.kd_scale,
            )
        };
    }
    Ok(match kernel {
        "kd_loss_ce_f32" => call!(k::kd_loss_ce_f32),
        "kd_loss_ce_bf16" => call!(k::kd_loss_ce_bf16),
        "kd_loss_kl_bf16_bf16" => call!(k::kd_loss_kl_bf16_bf16),
        "kd_loss_kl_f32_bf16" => call!(k::kd_loss_kl_f32_bf16),
        "kd_loss_kl_f32_f32" => call!(k::kd_loss_kl_f32_f32),
        "kd_loss_mse_bf16_bf16" => call!(k::kd_loss_mse_bf16_bf16),
        "kd_loss_mse_f32_bf16" => call!(k::kd_loss_mse_f32_bf16),
        "kd_loss_mse_f32_f32" => call!(k::kd_loss_mse_f32_f32),
        other => {
            return Err(KdError(format!(
                "{other} is not a row kernel of kd_loss.cu"
            )))
        }
    })
}

/// Most classes the cached-target kernels take (`RK_CACHED_MAX_CLASSES`: a bitmap of the row
/// in shared memory; the range of the cache's u16 indices).
pub const CACHED_MAX_CLASSES: usize = 65_536;

/// The arguments of a cached-target row kernel (`kd_loss_cached_kl_*`, `kd_loss_cached_mse_*`):
/// the student's logits and gradient (its storage type in the kernel's name), and the cache's
/// rows as `[rows, k]` class indices and teacher logits with the `[rows]` log-sum-exp of the
/// rest at the loss's temperature.
#[derive(Debug, Clone, Copy)]
pub struct CachedRowArgs {
    pub logits: u64,
    pub grad: u64,
    pub indices: Ptr<u32>,
    pub values: Ptr<f32>,
    pub tail_lse: Ptr<f32>,
    pub k: u32,
    pub labels: Ptr<i32>,
    pub mask: Ptr<i32>,
    pub row_ce: Ptr<f32>,
    pub row_kd: Ptr<f32>,
    pub classes: u32,
    pub ignore_index: i32,
    pub inv_t: f32,
    pub t_sq: f32,
    pub ce_weight: f32,
    pub kd_scale: f32,
}

/// The cached-target row kernel for a term (`mse`: MSE, else KL) and the student's storage
/// (`bf16`: bf16, else f32).
pub fn cached_kernel_name(mse: bool, bf16: bool) -> &'static str {
    match (mse, bf16) {
        (false, false) => "kd_loss_cached_kl_f32",
        (false, true) => "kd_loss_cached_kl_bf16",
        (true, false) => "kd_loss_cached_mse_f32",
        (true, true) => "kd_loss_cached_mse_bf16",
    }
}

/// The launch of the cached-target row kernel `kernel` (a name [`cached_kernel_name`] gives),
/// through its typed launcher. A row longer than [`CACHED_MAX_CLASSES`] or `k` outside
/// `1..=classes` is an error.
pub fn cached_row_call(
    kernel: &str,
    config: LaunchConfig,
    a: &CachedRowArgs,
) -> Result<KernelCall, KdError> {
    if a.classes as usize > CACHED_MAX_CLASSES {
        return Err(KdError(format!(
            "{kernel}: {} classes; the cached-target kernels take at most {CACHED_MAX_CLASSES}",
            a.classes
        )));
    }
    if a.k == 0 || a.k > a.classes {
        return Err(KdError(format!(
            "{kernel}: k = {} cached classes of {}",
            a.k, a.classes
        )));
    }
    macro_rules! call {
        ($launcher:path) => {
            $launcher(
                config,
                Ptr::new(a.logits),
                Ptr::new(a.grad),
                a.indices,
                a.values,
                a.tail_lse,
                a.k,
                a.labels,
                a.mask,
                a.row_ce,
                a.row_kd,
                a.classes,
                a.ignore_index,
                a.inv_t,
                a.t_sq,
                a.ce_weight,
                a.kd_scale,
            )
        };
    }
    Ok(match kernel {
        "kd_loss_cached_kl_f32" => call!(k::kd_loss_cached_kl_f32),
        "kd_loss_cached_kl_bf16" => call!(k::kd_loss_cached_kl_bf16),
        "kd_loss_cached_mse_f32" => call!(k::kd_loss_cached_mse_f32),
        "kd_loss_cached_mse_bf16" => call!(k::kd_loss_cached_mse_bf16),
        other => {
            return Err(KdError(format!(
                "{other} is not a cached-target row kernel of kd_loss.cu"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teacher_logits_layout_matches_the_kernel() {
        // struct TeacherLogits { const void* p[8]; }: 64 bytes, 8-byte aligned.
        assert_eq!(std::mem::size_of::<TeacherLogits>(), 64);
        assert_eq!(std::mem::align_of::<TeacherLogits>(), 8);
        let t = TeacherLogits::new(&[0x1000, 0x2000]).unwrap();
        assert_eq!(t.ptrs[..3], [0x1000, 0x2000, 0]);
        assert!(TeacherLogits::new(&[]).is_err());
        assert!(TeacherLogits::new(&[1; 9]).is_err());
        assert!(TeacherLogits::new(&[1; 8]).is_ok());
    }

    #[test]
    fn every_row_kernel_has_its_typed_launch() {
        let a = RowArgs {
            logits: 1,
            grad: 2,
            teachers: TeacherLogits::default(),
            k: 0,
            labels: Ptr::new(3),
            mask: Ptr::null(),
            row_ce: Ptr::new(4),
            row_kd: Ptr::null(),
            classes: 10,
            ignore_index: -100,
            inv_t: 1.0,
            t_sq: 1.0,
            ce_weight: 1.0,
            kd_scale: 0.0,
        };
        let cfg = crate::launch::single_block();
        let (_, kernels) = crate::launchers::FAMILIES
            .iter()
            .find(|(f, _)| *f == "kd_loss")
            .unwrap();
        let c = CachedRowArgs {
            logits: 1,
            grad: 2,
            indices: Ptr::new(5),
            values: Ptr::new(6),
            tail_lse: Ptr::new(7),
            k: 3,
            labels: Ptr::new(3),
            mask: Ptr::null(),
            row_ce: Ptr::new(4),
            row_kd: Ptr::new(8),
            classes: 10,
            ignore_index: -100,
            inv_t: 0.5,
            t_sq: 4.0,
            ce_weight: 1.0,
            kd_scale: 0.1,
        };
        let mut cached = 0;
        for kernel in kernels.iter().filter(|n| **n != "kd_loss_reduce") {
            if kernel.starts_with("kd_loss_cached_") {
                assert_eq!(cached_row_call(kernel, cfg, &c).unwrap().kernel, *kernel);
                assert!(row_call(kernel, cfg, &a).is_err());
                cached += 1;
            } else {
                assert_eq!(row_call(kernel, cfg, &a).unwrap().kernel, *kernel);
                assert!(cached_row_call(kernel, cfg, &c).is_err());
            }
        }
        assert_eq!(cached, 4);
        for (mse, bf16) in [(false, false), (false, true), (true, false), (true, true)] {
            assert!(kernels.contains(&cached_kernel_name(mse, bf16)));
        }
        assert!(row_call("kd_loss_reduce", cfg, &a).is_err());
        let kernel = cached_kernel_name(false, false);
        for (k, classes) in [(0, 10), (11, 10), (1, 65_537)] {
            let bad = CachedRowArgs { k, classes, ..c };
            assert!(
                cached_row_call(kernel, cfg, &bad).is_err(),
                "k {k} of {classes}"
            );
        }
    }
}
