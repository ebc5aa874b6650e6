//! Learning-rate schedules: the paper's two recipes (table 1) and a constant.
//!
//! - ResNet: linear warmup for a number of steps (8 epochs), then cosine annealing;
//! - BERT: linear warmup for a fraction of training (6%), then linear decay.
//!
//! Conventions (Composer's, which the paper used), with `W` warmup steps and `T` total steps:
//! - warmup is linear from 0 at step 0 to `base_lr` at step `W` (so the first step trains at
//!   lr 0 when `W > 0`);
//! - the decay runs from `base_lr` at step `W` to `final_lr` at step `T`, following half a
//!   cosine or a straight line;
//! - from step `T` on the rate stays at `final_lr`.
//!
//! These equal PyTorch's `SequentialLR([LinearLR(start_factor≈0, total_iters=W),
//! CosineAnnealingLR(T_max=T-W, eta_min=final_lr)], milestones=[W])` (or a second `LinearLR`
//! with `end_factor = final_lr / base_lr` for the linear decay) on steps `0..=T`; after `T`
//! PyTorch's cosine would rise again, here it stays flat. Rates are computed in f64 from
//! closed forms and rounded to f32 once.

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrSchedule {
    Constant {
        lr: f32,
    },
    WarmupCosine {
        base_lr: f32,
        warmup_steps: u64,
        total_steps: u64,
        final_lr: f32,
    },
    WarmupLinearDecay {
        base_lr: f32,
        warmup_steps: u64,
        total_steps: u64,
        final_lr: f32,
    },
}

/// `floor(fraction * total)` as Composer converts a fraction of the duration to steps, with a
/// little slack so that fractions written in decimal land on the step they name
/// (0.29 × 100 is 28.999999999999996 in f64; this gives 29).
fn fraction_to_steps(fraction: f64, total_steps: u64) -> Result<u64> {
    if !(0.0..=1.0).contains(&fraction) {
        return Err(Error::invalid(
            "LrSchedule",
            format!("warmup fraction must be in [0, 1], got {fraction}"),
        ));
    }
    Ok((fraction * total_steps as f64 + 1e-9).floor() as u64)
}

impl LrSchedule {
    /// A constant rate.
    pub fn constant(lr: f32) -> Result<Self> {
        let s = LrSchedule::Constant { lr };
        s.validate()?;
        Ok(s)
    }

    /// Linear warmup for `warmup_steps`, then cosine annealing to `final_lr` at `total_steps`
    /// (the paper's ResNet recipe: warmup of 8 epochs' worth of steps).
    pub fn warmup_cosine(
        base_lr: f32,
        warmup_steps: u64,
        total_steps: u64,
        final_lr: f32,
    ) -> Result<Self> {
        let s = LrSchedule::WarmupCosine {
            base_lr,
            warmup_steps,
            total_steps,
            final_lr,
        };
        s.validate()?;
        Ok(s)
    }

    /// Like [`LrSchedule::warmup_cosine`], warmup given as a fraction of `total_steps`.
    pub fn warmup_cosine_fraction(
        base_lr: f32,
        warmup_fraction: f64,
        total_steps: u64,
        final_lr: f32,
    ) -> Result<Self> {
        let w = fraction_to_steps(warmup_fraction, total_steps)?;
        Self::warmup_cosine(base_lr, w, total_steps, final_lr)
    }

    /// Linear warmup for `warmup_steps`, then linear decay to `final_lr` at `total_steps`.
    pub fn warmup_linear_decay(
        base_lr: f32,
        warmup_steps: u64,
        total_steps: u64,
        final_lr: f32,
    ) -> Result<Self> {
        let s = LrSchedule::WarmupLinearDecay {
            base_lr,
            warmup_steps,
            total_steps,
            final_lr,
        };
        s.validate()?;
        Ok(s)
    }

    /// Like [`LrSchedule::warmup_linear_decay`], warmup given as a fraction of `total_steps`
    /// (the paper's BERT recipe: 0.06, rounded down to whole steps).
    pub fn warmup_linear_decay_fraction(
        base_lr: f32,
        warmup_fraction: f64,
        total_steps: u64,
        final_lr: f32,
    ) -> Result<Self> {
        let w = fraction_to_steps(warmup_fraction, total_steps)?;
        Self::warmup_linear_decay(base_lr, w, total_steps, final_lr)
    }

    /// Errors on a negative or non-finite rate, zero total steps, or warmup longer than the run.
    pub fn validate(&self) -> Result<()> {
        let op = "LrSchedule";
        let rate = |name: &str, v: f32| {
            if !v.is_finite() || v < 0.0 {
                Err(Error::invalid(
                    op,
                    format!("{name} must be finite and >= 0, got {v}"),
                ))
            } else {
                Ok(())
            }
        };
        match *self {
            LrSchedule::Constant { lr } => rate("lr", lr),
            LrSchedule::WarmupCosine {
                base_lr,
                warmup_steps,
                total_steps,
                final_lr,
            }
            | LrSchedule::WarmupLinearDecay {
                base_lr,
                warmup_steps,
                total_steps,
                final_lr,
            } => {
                rate("base_lr", base_lr)?;
                rate("final_lr", final_lr)?;
                if total_steps == 0 {
                    return Err(Error::invalid(op, "total_steps must be > 0".to_string()));
                }
                if warmup_steps > total_steps {
                    return Err(Error::invalid(
                        op,
                        format!(
                            "warmup of {warmup_steps} steps is longer than the {total_steps} steps of training"
                        ),
                    ));
                }
                Ok(())
            }
        }
    }

    /// The peak rate (what `Sgdw::initial_lr` should be).
    pub fn base_lr(&self) -> f32 {
        match *self {
            LrSchedule::Constant { lr } => lr,
            LrSchedule::WarmupCosine { base_lr, .. }
            | LrSchedule::WarmupLinearDecay { base_lr, .. } => base_lr,
        }
    }

    /// The rate for step `step` (counting from 0: the rate the first optimizer step uses is
    /// `lr_at(0)`).
    pub fn lr_at(&self, step: u64) -> f32 {
        let (base, w, total, last, cosine) = match *self {
            LrSchedule::Constant { lr } => return lr,
            LrSchedule::WarmupCosine {
                base_lr,
                warmup_steps,
                total_steps,
                final_lr,
            } => (base_lr, warmup_steps, total_steps, final_lr, true),
            LrSchedule::WarmupLinearDecay {
                base_lr,
                warmup_steps,
                total_steps,
                final_lr,
            } => (base_lr, warmup_steps, total_steps, final_lr, false),
        };
        let (base, last) = (base as f64, last as f64);
        // Every branch divides by a count that the branch condition keeps above zero, so an
        // unvalidated schedule still gives a number, never a panic.
        let lr = if step >= total {
            last
        } else if step < w {
            base * step as f64 / w as f64
        } else {
            let progress = (step - w) as f64 / (total - w) as f64;
            if cosine {
                last + (base - last) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            } else {
                base + (last - base) * progress
            }
        };
        lr as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f64) -> bool {
        (a as f64 - b).abs() <= 1e-6 * b.abs().max(1e-3)
    }

    #[test]
    fn warmup_cosine_shape() {
        let s = LrSchedule::warmup_cosine(1.0, 4, 12, 0.1).unwrap();
        assert_eq!(s.lr_at(0), 0.0);
        assert_eq!(s.lr_at(1), 0.25);
        assert_eq!(s.lr_at(3), 0.75);
        assert_eq!(s.lr_at(4), 1.0);
        // Halfway through the decay the cosine is at the midpoint.
        assert!(close(s.lr_at(8), 0.55), "{}", s.lr_at(8));
        assert!(close(s.lr_at(12), 0.1));
        assert_eq!(s.lr_at(13), 0.1);
        assert_eq!(s.lr_at(u64::MAX), 0.1);
        for step in 4..12 {
            assert!(
                s.lr_at(step + 1) <= s.lr_at(step),
                "not decreasing at {step}"
            );
        }
        assert_eq!(s.base_lr(), 1.0);
    }

    #[test]
    fn warmup_linear_decay_shape_and_fraction() {
        // The BERT recipe: 6% of 100 steps is 6 warmup steps.
        let s = LrSchedule::warmup_linear_decay_fraction(5e-4, 0.06, 100, 0.0).unwrap();
        assert_eq!(
            s,
            LrSchedule::WarmupLinearDecay {
                base_lr: 5e-4,
                warmup_steps: 6,
                total_steps: 100,
                final_lr: 0.0
            }
        );
        assert!(close(s.lr_at(3), 2.5e-4));
        assert!(close(s.lr_at(6), 5e-4));
        assert!(close(s.lr_at(53), 2.5e-4));
        assert_eq!(s.lr_at(100), 0.0);
        assert_eq!(s.lr_at(1000), 0.0);
        // A fraction written in decimal lands on the step it names.
        let s = LrSchedule::warmup_cosine_fraction(1.0, 0.29, 100, 0.0).unwrap();
        assert!(matches!(
            s,
            LrSchedule::WarmupCosine {
                warmup_steps: 29,
                ..
            }
        ));
    }

    #[test]
    fn degenerate_but_valid_schedules() {
        // No warmup: the first step is already at the peak.
        let s = LrSchedule::warmup_cosine(0.5, 0, 10, 0.0).unwrap();
        assert_eq!(s.lr_at(0), 0.5);
        // All warmup: the run ends at the peak and then falls to final_lr.
        let s = LrSchedule::warmup_linear_decay(0.5, 10, 10, 0.1).unwrap();
        assert_eq!(s.lr_at(5), 0.25);
        assert_eq!(s.lr_at(10), 0.1);
        assert_eq!(LrSchedule::constant(0.3).unwrap().lr_at(7), 0.3);
    }

    #[test]
    fn validation_errors() {
        let e = LrSchedule::warmup_cosine(1.0, 11, 10, 0.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("11") && e.contains("10"), "{e}");
        assert!(LrSchedule::warmup_cosine(1.0, 0, 0, 0.0).is_err());
        assert!(LrSchedule::warmup_linear_decay(-1.0, 1, 10, 0.0).is_err());
        assert!(LrSchedule::warmup_linear_decay(1.0, 1, 10, -0.1).is_err());
        assert!(LrSchedule::warmup_linear_decay(f32::NAN, 1, 10, 0.0).is_err());
        assert!(LrSchedule::constant(-0.1).is_err());
        assert!(LrSchedule::warmup_cosine_fraction(1.0, 1.5, 10, 0.0).is_err());
        assert!(LrSchedule::warmup_cosine_fraction(1.0, f64::NAN, 10, 0.0).is_err());
        // An unvalidated schedule built by hand still answers without panicking.
        let s = LrSchedule::WarmupCosine {
            base_lr: 1.0,
            warmup_steps: 20,
            total_steps: 10,
            final_lr: 0.0,
        };
        assert!(s.validate().is_err());
        assert!(s.lr_at(5).is_finite() && s.lr_at(15).is_finite());
    }
}
