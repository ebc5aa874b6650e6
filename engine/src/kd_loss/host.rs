//! The fused distillation loss's host side, shared by its CPU arm (`recycle::distill`), its
//! CUDA arm (`cuda::loss`, kernel `kernels/src/kd_loss.cu`) and their tests: the one [`KdKind`],
//! which row kernel a term and the logits' types pick, the row counts and scalars the host
//! computes before a launch, and the f64 reference of one row.
//!
//! The kernel sees one row per block, so the normalisers — how many rows have a label (CE) and
//! how many rows count (KD) — cannot be found inside it without a second pass. The host knows
//! them anyway: it holds the labels and the mask before uploading them, and it validates the
//! labels there (a label outside `[0, C)` is an error, as in the CPU loss). [`row_counts`]
//! counts them exactly as `kd_loss_cpu` does, and [`KdScalars::new`] turns them into the kernel
//! arguments in the CPU's order of f32 operations, so that with the same per-row values the
//! GPU gradient has the CPU's bits.

use crate::{Error, Result};

/// Which distillation term.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KdKind {
    /// KL(p_teacher ‖ p_student) at `temperature`, scaled by T².
    Kl { temperature: f32 },
    /// Mean squared error between logits.
    Mse,
}

impl KdKind {
    /// The names a recipe gives the terms.
    pub const NAMES: [&'static str; 2] = ["kl", "mse"];

    /// The term named `name` (KL at `temperature`, or MSE, which has none); None for a name
    /// not in [`KdKind::NAMES`].
    pub fn from_name(name: &str, temperature: f32) -> Option<KdKind> {
        match name {
            "kl" => Some(KdKind::Kl { temperature }),
            "mse" => Some(KdKind::Mse),
            _ => None,
        }
    }
}

/// `L = L_ce + weight · L_kd`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KdLoss {
    pub kind: KdKind,
    /// λ of the paper.
    pub weight: f32,
    /// Label that marks rows without a CE target (PyTorch's default -100).
    pub ignore_index: i32,
}

impl KdLoss {
    pub fn kl(temperature: f32, weight: f32) -> Self {
        KdLoss {
            kind: KdKind::Kl { temperature },
            weight,
            ignore_index: -100,
        }
    }

    pub fn mse(weight: f32) -> Self {
        KdLoss {
            kind: KdKind::Mse,
            weight,
            ignore_index: -100,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if let KdKind::Kl { temperature } = self.kind {
            if !(temperature > 0.0 && temperature.is_finite()) {
                return Err(Error::invalid(
                    "KdLoss",
                    format!("temperature {temperature} must be a positive number"),
                ));
            }
        }
        if !(self.weight >= 0.0 && self.weight.is_finite()) {
            return Err(Error::invalid(
                "KdLoss",
                format!("weight (lambda) {} must be zero or positive", self.weight),
            ));
        }
        Ok(())
    }
}

/// Storage type of the student's or the teachers' logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    F32,
    Bf16,
}

fn kd_err(msg: String) -> Error {
    Error::invalid("kd_loss", msg)
}

/// The kernel for a term (`None`: CE only — no teacher, or λ = 0) and the logits' types.
pub fn kernel_name(
    term: Option<KdKind>,
    student: Storage,
    teachers: Storage,
) -> Result<&'static str> {
    use Storage::*;
    let name = match (term, student, teachers) {
        (None, F32, _) => "kd_loss_ce_f32",
        (None, Bf16, _) => "kd_loss_ce_bf16",
        (Some(KdKind::Kl { .. }), Bf16, Bf16) => "kd_loss_kl_bf16_bf16",
        (Some(KdKind::Kl { .. }), F32, Bf16) => "kd_loss_kl_f32_bf16",
        (Some(KdKind::Kl { .. }), F32, F32) => "kd_loss_kl_f32_f32",
        (Some(KdKind::Mse), Bf16, Bf16) => "kd_loss_mse_bf16_bf16",
        (Some(KdKind::Mse), F32, Bf16) => "kd_loss_mse_f32_bf16",
        (Some(KdKind::Mse), F32, F32) => "kd_loss_mse_f32_f32",
        (Some(_), Bf16, F32) => {
            return Err(kd_err(
                "no kernel takes bf16 student logits with f32 teacher logits; cast the \
                 teachers' logits to bf16"
                    .to_string(),
            ))
        }
    };
    Ok(name)
}

/// `(ce_rows, kd_rows)` as `kd_loss_cpu` counts them: rows that count (mask non-zero, or no
/// mask) and whose label is not `ignore_index`; rows that count, when a KD term is active.
/// A counted label outside `[0, classes)` is an error naming the row.
pub fn row_counts(
    labels: &[i32],
    mask: Option<&[i32]>,
    classes: usize,
    ignore_index: i32,
    kd_active: bool,
) -> Result<(usize, usize)> {
    if let Some(m) = mask {
        if m.len() != labels.len() {
            return Err(kd_err(format!(
                "mask has {} rows, the labels {}",
                m.len(),
                labels.len()
            )));
        }
    }
    let counts = |r: usize| mask.is_none_or(|m| m[r] != 0);
    let mut ce_rows = 0;
    let mut kd_rows = 0;
    for (r, &y) in labels.iter().enumerate() {
        if !counts(r) {
            continue;
        }
        kd_rows += 1;
        if y == ignore_index {
            continue;
        }
        if y < 0 || y as usize >= classes {
            return Err(kd_err(format!(
                "label {y} in row {r} is outside [0, {classes})"
            )));
        }
        ce_rows += 1;
    }
    Ok((ce_rows, if kd_active { kd_rows } else { 0 }))
}

/// The scalar arguments of `kd_loss_*` and `kd_loss_reduce`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KdScalars {
    /// `kd_loss_reduce`'s `ce_weight`: 1 / ce_rows (0 without any).
    pub ce_weight: f32,
    /// `kd_loss_reduce`'s `kd_weight`: 1 / kd_rows (0 without any).
    pub kd_weight: f32,
    /// `kd_loss_reduce`'s `lambda`.
    pub lambda: f32,
    /// `kd_loss_*`'s `ce_weight`: `ce_weight * upstream`.
    pub grad_ce_weight: f32,
    /// `kd_loss_*`'s `kd_scale`: `lambda * T * kd_weight` (KL) or `lambda * 2 * kd_weight / C`
    /// (MSE), times `upstream`; 0 when no KD term is active.
    pub grad_kd_scale: f32,
    /// `kd_loss_*`'s `inv_t` (1 / T) and `t_sq` (T²); 1 for MSE and CE only.
    pub inv_t: f32,
    pub t_sq: f32,
}

impl KdScalars {
    /// Scalars for `term` (`None`: CE only) with weight `lambda`, the row counts of
    /// [`row_counts`], `classes` per row, and the upstream gradient of the total loss
    /// (1 for `backward(loss)`; folded into the gradient weights, one rounding where the CPU
    /// scales its finished gradient in a second).
    pub fn new(
        term: Option<KdKind>,
        lambda: f32,
        ce_rows: usize,
        kd_rows: usize,
        classes: usize,
        upstream: f32,
    ) -> Result<Self> {
        if let Some(KdKind::Kl { temperature }) = term {
            if !(temperature > 0.0 && temperature.is_finite()) {
                return Err(kd_err(format!(
                    "temperature {temperature} must be a positive number"
                )));
            }
        }
        if !(lambda >= 0.0 && lambda.is_finite()) {
            return Err(kd_err(format!(
                "weight (lambda) {lambda} must be zero or positive"
            )));
        }
        if classes == 0 {
            return Err(kd_err("the logits have no classes".to_string()));
        }
        // As kd_loss_cpu: a term with lambda == 0 counts no KD rows.
        let kd_rows = if term.is_none() || lambda == 0.0 {
            0
        } else {
            kd_rows
        };
        let w_ce = if ce_rows > 0 {
            1.0 / ce_rows as f32
        } else {
            0.0
        };
        let w_kd = if kd_rows > 0 {
            1.0 / kd_rows as f32
        } else {
            0.0
        };
        let (kd_scale, inv_t, t_sq) = match term {
            Some(KdKind::Kl { temperature: tau }) if kd_rows > 0 => {
                (lambda * tau * w_kd, 1.0 / tau, tau * tau)
            }
            Some(KdKind::Mse) if kd_rows > 0 => (lambda * 2.0 * w_kd / classes as f32, 1.0, 1.0),
            _ => (0.0, 1.0, 1.0),
        };
        Ok(KdScalars {
            ce_weight: w_ce,
            kd_weight: w_kd,
            lambda,
            grad_ce_weight: w_ce * upstream,
            grad_kd_scale: kd_scale * upstream,
            inv_t,
            t_sq,
        })
    }

    /// Whether the KD kernel (rather than `kd_loss_ce_*`) has work to do.
    pub fn kd_active(&self) -> bool {
        self.kd_weight != 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_choice() {
        use Storage::*;
        let kl = Some(KdKind::Kl { temperature: 2.0 });
        assert_eq!(kernel_name(kl, Bf16, Bf16).unwrap(), "kd_loss_kl_bf16_bf16");
        assert_eq!(kernel_name(kl, F32, Bf16).unwrap(), "kd_loss_kl_f32_bf16");
        assert_eq!(
            kernel_name(Some(KdKind::Mse), F32, F32).unwrap(),
            "kd_loss_mse_f32_f32"
        );
        assert_eq!(kernel_name(None, Bf16, F32).unwrap(), "kd_loss_ce_bf16");
        assert!(kernel_name(kl, Bf16, F32).is_err());
    }

    #[test]
    fn counts_follow_the_cpu_loss() {
        let labels = [3, -100, 0, 1, -100, 2];
        assert_eq!(row_counts(&labels, None, 4, -100, true).unwrap(), (4, 6));
        assert_eq!(row_counts(&labels, None, 4, -100, false).unwrap(), (4, 0));
        // Masked-out rows count for nothing, and their labels are not checked.
        let mask = [1, 1, 0, 1, 1, 0];
        assert_eq!(
            row_counts(&labels, Some(&mask), 4, -100, true).unwrap(),
            (2, 4)
        );
        let bad = [0, 7, 1];
        let e = row_counts(&bad, None, 4, -100, true).unwrap_err();
        assert!(e.to_string().contains("label 7 in row 1"), "{e}");
        assert!(row_counts(&bad, Some(&[1, 0, 1]), 4, -100, true).is_ok());
        assert!(row_counts(&labels, Some(&[1]), 4, -100, true).is_err());
    }

    #[test]
    fn scalars_in_the_cpu_order() {
        let (lambda, tau) = (0.7f32, 3.0f32);
        let s =
            KdScalars::new(Some(KdKind::Kl { temperature: tau }), lambda, 3, 7, 10, 1.0).unwrap();
        let (w_ce, w_kd) = (1.0 / 3.0f32, 1.0 / 7.0f32);
        assert_eq!(s.ce_weight, w_ce);
        assert_eq!(s.kd_weight, w_kd);
        assert_eq!(s.grad_ce_weight, w_ce);
        // kd_loss_cpu: `cfg.weight * tau * w_kd`, left to right.
        assert_eq!(s.grad_kd_scale.to_bits(), (lambda * tau * w_kd).to_bits());
        assert_eq!((s.inv_t, s.t_sq), (1.0 / tau, 9.0));
        assert!(s.kd_active());

        let s = KdScalars::new(Some(KdKind::Mse), lambda, 3, 7, 10, 2.0).unwrap();
        // `cfg.weight * 2.0 * w_kd / classes as f32`, then the upstream gradient.
        assert_eq!(s.grad_kd_scale, lambda * 2.0 * w_kd / 10.0 * 2.0);
        assert_eq!(s.grad_ce_weight, w_ce * 2.0);
        assert_eq!((s.inv_t, s.t_sq), (1.0, 1.0));

        // lambda == 0 or no term: CE only; no labelled row: CE weight 0 (a zero loss, not NaN).
        for s in [
            KdScalars::new(Some(KdKind::Mse), 0.0, 3, 7, 10, 1.0).unwrap(),
            KdScalars::new(None, 0.5, 0, 7, 10, 1.0).unwrap(),
        ] {
            assert!(!s.kd_active());
            assert_eq!((s.kd_weight, s.grad_kd_scale), (0.0, 0.0));
        }
        assert_eq!(
            KdScalars::new(None, 0.5, 0, 7, 10, 1.0).unwrap().ce_weight,
            0.0
        );

        for t in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert!(
                KdScalars::new(Some(KdKind::Kl { temperature: t }), 1.0, 1, 1, 2, 1.0).is_err()
            );
        }
        assert!(KdScalars::new(None, -0.5, 1, 1, 2, 1.0).is_err());
        assert!(KdScalars::new(None, 0.5, 1, 1, 0, 1.0).is_err());
    }
}
