//! What the generated launchers of the fused distillation loss (`src/kd_loss.cu`) do not
//! spell: the checks of the teachers' pointers and of a cached-target row, the cached-target
//! kernels' names. Generated from the `.cu`: the row kernels' arguments and by-name launches
//! (`launchers::KdRowArgs`, `kd_row_call`; `KdCachedRowArgs`, `kd_cached_row_call`), the
//! by-value [`TeacherLogits`] and the limits [`MAX_TEACHERS`], [`CACHED_MAX_CLASSES`].
//! The host-side arguments (kernel choice, row counts, scalars) and the f64 reference live
//! with the loss's other host code in `recycle_engine::kd_loss`.

use std::fmt;

pub use crate::launchers::{TeacherLogits, CACHED_MAX_CLASSES, MAX_TEACHERS};

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
        t.p[..ptrs.len()].copy_from_slice(ptrs);
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

/// Whether the cached-target row kernel `kernel` (a name [`cached_kernel_name`] gives) takes
/// `k` cached classes of `classes`: a row longer than [`CACHED_MAX_CLASSES`] or `k` outside
/// `1..=classes` is an error.
pub fn check_cached_row(kernel: &str, k: u32, classes: u32) -> Result<(), KdError> {
    if classes as usize > CACHED_MAX_CLASSES {
        return Err(KdError(format!(
            "{kernel}: {classes} classes; the cached-target kernels take at most \
             {CACHED_MAX_CLASSES}"
        )));
    }
    if k == 0 || k > classes {
        return Err(KdError(format!(
            "{kernel}: k = {k} cached classes of {classes}"
        )));
    }
    Ok(())
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
        assert_eq!(t.p[..3], [0x1000, 0x2000, 0]);
        assert!(TeacherLogits::new(&[]).is_err());
        assert!(TeacherLogits::new(&[1; 9]).is_err());
        assert!(TeacherLogits::new(&[1; 8]).is_ok());
    }

    #[test]
    fn cached_row_shapes() {
        let kernel = cached_kernel_name(false, false);
        assert!(check_cached_row(kernel, 3, 10).is_ok());
        assert!(check_cached_row(kernel, 1, 65_536).is_ok());
        for (k, classes) in [(0, 10), (11, 10), (1, 65_537)] {
            assert!(
                check_cached_row(kernel, k, classes).is_err(),
                "k {k} of {classes}"
            );
        }
    }

    #[test]
    fn every_row_kernel_has_its_typed_launch() {
        use crate::call::Ptr;
        use crate::launchers::{
            kd_cached_row_call, kd_row_call, KdCachedRowArgs, KdRowArgs, KD_CACHED_ROW_KERNELS,
            KD_ROW_KERNELS,
        };
        let a = KdRowArgs {
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
        let c = KdCachedRowArgs {
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
        let cfg = crate::launch::single_block();
        let (_, kernels) = crate::launchers::FAMILIES
            .iter()
            .find(|(f, _)| *f == "kd_loss")
            .unwrap();
        // Every kernel of the family but the reduction is in exactly one of the two lists.
        assert_eq!(KD_ROW_KERNELS.len(), 8);
        assert_eq!(KD_CACHED_ROW_KERNELS.len(), 4);
        for kernel in kernels.iter().filter(|n| **n != "kd_loss_reduce") {
            let row = KD_ROW_KERNELS.contains(kernel);
            assert_ne!(row, KD_CACHED_ROW_KERNELS.contains(kernel), "{kernel}");
            if row {
                let call = kd_row_call(kernel, cfg, &a).unwrap();
                assert_eq!(call.kernel, *kernel);
                assert_eq!(call.args[0], crate::call::Value::U64(1));
                assert_eq!(call.args[2], crate::call::Value::Teachers(a.teachers));
                assert!(kd_cached_row_call(kernel, cfg, &c).is_err());
            } else {
                let call = kd_cached_row_call(kernel, cfg, &c).unwrap();
                assert_eq!(call.kernel, *kernel);
                assert_eq!(call.args[4], crate::call::Value::U64(7));
                assert!(kd_row_call(kernel, cfg, &a).is_err());
            }
        }
        for (mse, bf16) in [(false, false), (false, true), (true, false), (true, true)] {
            assert!(KD_CACHED_ROW_KERNELS.contains(&cached_kernel_name(mse, bf16)));
        }
        let err = kd_row_call("kd_loss_reduce", cfg, &a).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kd_loss_reduce is not one of the RK_KD_ROW (src/kd_loss.cu) kernels"
        );
    }
}
