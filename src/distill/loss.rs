//! The distillation loss, fused: `L = L_ce + λ·L_kd` and its gradient with respect to the
//! student logits, in one pass per row, without storing probability matrices.
//!
//! For a row with student logits `s`, the mean `t` of k teachers' logits and label `y`:
//! - `L_ce = logsumexp(s) - s[y]`, averaged over rows whose label is not the ignore index;
//! - KL: `L_kd = T² · KL(softmax(t/T) ‖ softmax(s/T))`, the teacher distribution being the
//!   target (PyTorch: `F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True,
//!   reduction='batchmean') · T²`), averaged over rows;
//! - MSE: `L_kd = mean over rows and classes of (s - t)²` (`F.mse_loss(s, t)`).
//!
//! The gradient written per row is `(softmax(s) − onehot(y)) / n_ce + λ·T·(softmax(s/T) −
//! softmax(t/T)) / n_kd` for KL and `... + λ·2(s − t) / (n_kd·C)` for MSE. An optional row mask
//! drops rows from both terms (MLM: only masked positions count). This CPU function is the
//! oracle for the fused CUDA kernel.

use rayon::prelude::*;
use recycle_engine::ops::elementwise::scale;
use recycle_engine::{cuda, DType, Device, Error, Result, Tape, Tensor, Var};

/// Which distillation term.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KdKind {
    /// KL(p_teacher ‖ p_student) at `temperature`, scaled by T².
    Kl { temperature: f32 },
    /// Mean squared error between logits.
    Mse,
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

/// What the fused loss computes.
#[derive(Debug, Clone)]
pub struct KdLossOutput {
    /// Mean cross-entropy over rows with a label.
    pub ce: f32,
    /// The distillation term before λ (0 without teachers).
    pub kd: f32,
    /// `ce + λ·kd`.
    pub total: f32,
    /// d total / d student logits, `[N, C]`.
    pub grad: Vec<f32>,
    /// Rows that counted for CE and for KD.
    pub ce_rows: usize,
    pub kd_rows: usize,
}

fn logsumexp(x: impl Iterator<Item = f32> + Clone) -> f32 {
    let m = x.clone().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return m;
    }
    let z: f32 = x.map(|v| (v - m).exp()).sum();
    m + z.ln()
}

/// The fused loss over slices: `student` is `[N, C]`, each teacher `[N, C]` (their mean is the
/// target; none gives CE alone), `labels` `[N]`, `mask` `[N]` (true = the row counts).
pub fn kd_loss_cpu(
    cfg: &KdLoss,
    student: &[f32],
    teachers: &[&[f32]],
    labels: &[i32],
    mask: Option<&[bool]>,
    classes: usize,
) -> Result<KdLossOutput> {
    cfg.validate()?;
    let rows = labels.len();
    if classes == 0 || student.len() != rows * classes {
        return Err(Error::shape(
            "kd_loss",
            format!(
                "student logits have {} values for {rows} labels and {classes} classes",
                student.len()
            ),
        ));
    }
    for (j, t) in teachers.iter().enumerate() {
        if t.len() != student.len() {
            return Err(Error::shape(
                "kd_loss",
                format!(
                    "teacher {j} has {} logits, the student {}",
                    t.len(),
                    student.len()
                ),
            ));
        }
    }
    if let Some(m) = mask {
        if m.len() != rows {
            return Err(Error::shape(
                "kd_loss",
                format!("mask has {} rows, the logits {rows}", m.len()),
            ));
        }
    }
    let counts = |r: usize| mask.is_none_or(|m| m[r]);
    let mut ce_rows = 0;
    for (r, &y) in labels.iter().enumerate() {
        if !counts(r) || y == cfg.ignore_index {
            continue;
        }
        if y < 0 || y as usize >= classes {
            return Err(Error::invalid(
                "kd_loss",
                format!("label {y} in row {r} is outside [0, {classes})"),
            ));
        }
        ce_rows += 1;
    }
    let kd_rows = if teachers.is_empty() || cfg.weight == 0.0 {
        0
    } else {
        (0..rows).filter(|&r| counts(r)).count()
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
    let k = teachers.len() as f32;

    let mut grad = vec![0f32; student.len()];
    // Per-row (ce, kd) partial sums, reduced in row order afterwards so the result does not
    // depend on how rayon split the rows.
    let partial: Vec<(f64, f64)> = grad
        .par_chunks_mut(classes)
        .enumerate()
        .map(|(r, g)| {
            if !counts(r) {
                return (0.0, 0.0);
            }
            let s = &student[r * classes..(r + 1) * classes];
            let y = labels[r];
            let mut ce = 0f64;
            if y != cfg.ignore_index {
                let lse = logsumexp(s.iter().copied());
                ce = (lse - s[y as usize]) as f64;
                for (c, gv) in g.iter_mut().enumerate() {
                    *gv = ((s[c] - lse).exp() - if c as i32 == y { 1.0 } else { 0.0 }) * w_ce;
                }
            }
            if kd_rows == 0 {
                return (ce, 0.0);
            }
            // Mean of the teachers' logits for this row.
            let t: Vec<f32> = (0..classes)
                .map(|c| teachers.iter().map(|tj| tj[r * classes + c]).sum::<f32>() / k)
                .collect();
            let kd = match cfg.kind {
                KdKind::Kl { temperature: tau } => {
                    let inv = 1.0 / tau;
                    let lse_s = logsumexp(s.iter().map(|v| v * inv));
                    let lse_t = logsumexp(t.iter().map(|v| v * inv));
                    let mut kl = 0f64;
                    let scale = cfg.weight * tau * w_kd;
                    for c in 0..classes {
                        let log_pt = t[c] * inv - lse_t;
                        let log_ps = s[c] * inv - lse_s;
                        let pt = log_pt.exp();
                        kl += (pt * (log_pt - log_ps)) as f64;
                        g[c] += scale * (log_ps.exp() - pt);
                    }
                    kl * (tau * tau) as f64
                }
                KdKind::Mse => {
                    let scale = cfg.weight * 2.0 * w_kd / classes as f32;
                    let mut se = 0f64;
                    for c in 0..classes {
                        let d = s[c] - t[c];
                        se += (d * d) as f64;
                        g[c] += scale * d;
                    }
                    se / classes as f64
                }
            };
            (ce, kd)
        })
        .collect();
    let (ce_sum, kd_sum) = partial
        .iter()
        .fold((0f64, 0f64), |(a, b), (c, d)| (a + c, b + d));
    let ce = (ce_sum * w_ce as f64) as f32;
    let kd = (kd_sum * w_kd as f64) as f32;
    Ok(KdLossOutput {
        ce,
        kd,
        total: ce + cfg.weight * kd,
        grad,
        ce_rows,
        kd_rows,
    })
}

/// The three scalars of a distillation step, as values on the tape.
pub struct KdLossVars {
    /// `ce + λ·kd`: call `backward` on this.
    pub total: Var,
    pub ce: f32,
    pub kd: f32,
}

/// The fused loss on the tape: `student` `[N, C]` logits, `teachers` frozen `[N, C]` logits
/// (any float dtype, e.g. a bf16 teacher's output; empty for a plain step), `labels` i32 `[N]`,
/// `mask` an optional i32/f32 `[N]` (non-zero = the row counts). The backward scales the
/// precomputed gradient by the upstream gradient, so nothing is recomputed.
pub fn kd_loss(
    tape: &Tape,
    cfg: &KdLoss,
    student: &Var,
    teachers: &[Tensor],
    labels: &Tensor,
    mask: Option<&Tensor>,
) -> Result<KdLossVars> {
    let op = "kd_loss";
    student.tensor().expect_rank(op, "student logits", 2)?;
    labels.expect_dtype(op, DType::I32)?;
    let (n, c) = (student.shape()[0], student.shape()[1]);
    if labels.shape() != [n] {
        return Err(Error::shape(
            op,
            format!(
                "labels {:?} do not match student logits {:?}",
                labels.shape(),
                student.shape()
            ),
        ));
    }
    for (j, t) in teachers.iter().enumerate() {
        if t.shape() != student.shape() {
            return Err(Error::shape(
                op,
                format!(
                    "teacher {j} logits {:?} differ from student logits {:?}",
                    t.shape(),
                    student.shape()
                ),
            ));
        }
    }
    if let Device::Cuda(_) = student.tensor().device() {
        return kd_loss_cuda(tape, cfg, student, teachers, labels, mask);
    }
    let mask_rows: Option<Vec<bool>> = match mask {
        Some(m) => Some(m.to_vec_f32()?.iter().map(|&v| v != 0.0).collect()),
        None => None,
    };
    let s = student.tensor().read_f32()?;
    let t_reads = teachers
        .iter()
        .map(|t| t.read_f32())
        .collect::<Result<Vec<_>>>()?;
    let t_slices: Vec<&[f32]> = t_reads.iter().map(|r| &r[..]).collect();
    let y = labels.read_i32()?;
    let out = kd_loss_cpu(cfg, &s, &t_slices, &y, mask_rows.as_deref(), c)?;
    drop((s, t_reads, y));
    let grad = Tensor::f32(out.grad, &[n, c])?;
    let total = tape.record(
        Tensor::f32(vec![out.total], &[])?,
        &[student],
        Box::new(move |g, _| {
            let scale = g.to_scalar_f32()?;
            if scale == 1.0 {
                return Ok(vec![Some(grad)]);
            }
            let scaled: Vec<f32> = grad.read_f32()?.iter().map(|v| v * scale).collect();
            Ok(vec![Some(Tensor::f32(scaled, &[n, c])?)])
        }),
    );
    Ok(KdLossVars {
        total,
        ce: out.ce,
        kd: out.kd,
    })
}

/// The CUDA arm of [`kd_loss`]: the fused kernel (`kd_loss.cu`, through
/// `recycle_engine::cuda::kd_loss`), the gradient left on the GPU. Compiled, not run on a GPU.
fn kd_loss_cuda(
    tape: &Tape,
    cfg: &KdLoss,
    student: &Var,
    teachers: &[Tensor],
    labels: &Tensor,
    mask: Option<&Tensor>,
) -> Result<KdLossVars> {
    cfg.validate()?;
    let term = match cfg.kind {
        KdKind::Kl { temperature } => cuda::KdTerm::Kl { temperature },
        KdKind::Mse => cuda::KdTerm::Mse,
    };
    let out = cuda::kd_loss(
        Some(term),
        cfg.weight,
        cfg.ignore_index,
        student.tensor(),
        teachers,
        labels,
        mask,
        1.0,
    )?;
    let device = student.tensor().device();
    let grad = out.grad;
    let total = tape.record(
        Tensor::from_vec(vec![out.total], &[], device)?,
        &[student],
        Box::new(move |g, _| {
            let s = g.to_scalar_f32()?;
            if s == 1.0 {
                return Ok(vec![Some(grad)]);
            }
            let scaled = scale(&Tape::inference(), &Tape::inference().constant(grad), s)?;
            Ok(vec![Some(scaled.into_tensor())])
        }),
    );
    Ok(KdLossVars {
        total,
        ce: out.ce,
        kd: out.kd,
    })
}
