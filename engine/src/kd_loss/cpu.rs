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
//! oracle for the fused CUDA kernel (`kd_loss.cu`) and the CPU arm of [`super::kd_loss`].

use rayon::prelude::*;

use super::{KdKind, KdLoss};
use crate::backend::vmath::exp_fast;
use crate::{Error, Result};

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

// ---------------------------------------------------------------------------------------------
// Row kernels
// ---------------------------------------------------------------------------------------------
//
// BERT's rows are as wide as the vocabulary (30522 logits at each masked position), so the
// loss of one MLM step is tens of millions of exponentials: with the exponential of the C
// library, one element at a time, it cost as much as a teacher forward. The loops below keep
// 16 independent lanes (one AVX-512 register) so that the compiler vectorises them, use a
// polynomial exponential that vectorises with them, and compute three exponentials per element
// (softmax of s, of s/T and of t/T) where the textbook formulas take six. Each row is compiled
// twice, for AVX-512 and for the baseline, and the CPU picks at run time.

/// Lanes of the vectorised loops.
const LANES: usize = 16;
/// Elements summed in f32 lanes before the partial sum moves to f64: the f32 error stays that
/// of 64 terms per lane whatever the row length.
const BLOCK: usize = 1024;

#[inline(always)]
fn lanes(x: &[f32]) -> &[f32; LANES] {
    x.try_into().expect("a chunk of LANES")
}

/// The largest value (NaN ignored, as `f32::max`; -inf for an empty row).
#[inline(always)]
pub(super) fn row_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        let c = lanes(c);
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i]);
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// `Σ_c f(c)` over a row, `f` given the index range of one lane chunk: f32 lanes within a
/// block, f64 across blocks.
#[inline(always)]
pub(super) fn row_sum(len: usize, mut f: impl FnMut(usize) -> f32) -> f64 {
    let mut total = 0f64;
    for b0 in (0..len).step_by(BLOCK) {
        let b1 = (b0 + BLOCK).min(len);
        let mut acc = [0f32; LANES];
        let full = b0 + (b1 - b0) / LANES * LANES;
        for c0 in (b0..full).step_by(LANES) {
            for (i, a) in acc.iter_mut().enumerate() {
                *a += f(c0 + i);
            }
        }
        total += acc.iter().map(|&v| v as f64).sum::<f64>();
        total += (full..b1).map(|c| f(c) as f64).sum::<f64>();
    }
    total
}

/// `out[c] = e^((x[c] - shift) * scale)`; returns `Σ out`.
#[inline(always)]
pub(super) fn exp_row(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) -> f64 {
    let out = &mut out[..x.len()];
    let mut oc = out.chunks_exact_mut(LANES);
    for (o, xs) in (&mut oc).zip(x.chunks_exact(LANES)) {
        let xs = lanes(xs);
        for i in 0..LANES {
            o[i] = exp_fast((xs[i] - shift) * scale);
        }
    }
    let tail = x.len() / LANES * LANES;
    for (o, &v) in oc.into_remainder().iter_mut().zip(&x[tail..]) {
        *o = exp_fast((v - shift) * scale);
    }
    row_sum(x.len(), |c| out[c])
}

/// Everything one row needs besides its logits.
#[derive(Clone, Copy)]
struct RowSpec {
    /// `1 / ce_rows`: the CE term of a row is averaged over the rows that have a label.
    w_ce: f32,
    /// The label (0 when the row has none).
    label: usize,
    /// Whether the row has a CE term (its label is not the ignore index).
    has_label: bool,
    /// The distillation term, `None` when the step does not distill.
    kd: Option<KdKind>,
    /// `1 / kd_rows`.
    w_kd: f32,
    /// λ.
    weight: f32,
}

/// One row: writes `d total / d s` into `g` (zero on entry) and returns the row's (CE, KD)
/// before weighting. `t` is the mean teacher row, `ps` / `pt` scratch rows.
#[inline(always)]
fn loss_row_generic(
    spec: &RowSpec,
    s: &[f32],
    t: &[f32],
    g: &mut [f32],
    ps: &mut [f32],
    pt: &mut [f32],
) -> (f64, f64) {
    let classes = s.len();
    let mut ce = 0f64;
    if spec.has_label {
        // softmax(s) - onehot(y), scaled: one exponential per element.
        let m = row_max(s);
        let z = exp_row(s, m, 1.0, g);
        let lse = m as f64 + z.ln();
        ce = lse - s[spec.label] as f64;
        let scale = (spec.w_ce as f64 / z) as f32;
        g.iter_mut().for_each(|v| *v *= scale);
        g[spec.label] -= spec.w_ce;
    }
    let kd = match spec.kd {
        None => 0.0,
        Some(KdKind::Kl { temperature: tau }) => {
            let inv = 1.0 / tau;
            let ms = row_max(s);
            let zs = exp_row(s, ms, inv, ps);
            let mt = row_max(t);
            let zt = exp_row(t, mt, inv, pt);
            let lse_s = (ms * inv) as f64 + zs.ln();
            let lse_t = (mt * inv) as f64 + zt.ln();
            // KL = Σ p_t (log p_t - log p_s) = Σ p_t (t - s) / T + lse_s - lse_t, since Σ p_t = 1.
            let cross = row_sum(classes, |c| pt[c] * (t[c] - s[c])) / zt * inv as f64;
            let kl = cross + lse_s - lse_t;
            let scale = spec.weight * tau * spec.w_kd;
            let (a, b) = ((scale as f64 / zs) as f32, (scale as f64 / zt) as f32);
            for ((gv, &e_s), &e_t) in g.iter_mut().zip(&ps[..classes]).zip(&pt[..classes]) {
                *gv += a * e_s - b * e_t;
            }
            kl * (tau * tau) as f64
        }
        Some(KdKind::Mse) => {
            let scale = spec.weight * 2.0 * spec.w_kd / classes as f32;
            let se = row_sum(classes, |c| (s[c] - t[c]) * (s[c] - t[c]));
            for ((gv, &sv), &tv) in g.iter_mut().zip(s).zip(t) {
                *gv += scale * (sv - tv);
            }
            se / classes as f64
        }
    };
    (ce, kd)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn loss_row_avx512(
    spec: &RowSpec,
    s: &[f32],
    t: &[f32],
    g: &mut [f32],
    ps: &mut [f32],
    pt: &mut [f32],
) -> (f64, f64) {
    loss_row_generic(spec, s, t, g, ps, pt)
}

fn loss_row(
    spec: &RowSpec,
    s: &[f32],
    t: &[f32],
    g: &mut [f32],
    ps: &mut [f32],
    pt: &mut [f32],
) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { loss_row_avx512(spec, s, t, g, ps, pt) };
    }
    loss_row_generic(spec, s, t, g, ps, pt)
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
    // Checked: a caller's class count can be any size_t (the C ABI passes it through).
    if classes == 0 || rows.checked_mul(classes) != Some(student.len()) {
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
    let kd_kind = (kd_rows > 0).then_some(cfg.kind);
    // Per-row (ce, kd) partial sums, reduced in row order afterwards so the result does not
    // depend on how rayon split the rows.
    let partial: Vec<(f64, f64)> = grad
        .par_chunks_mut(classes)
        .enumerate()
        .map_init(
            // At most the student's length: with no rows, `classes` may be any size_t.
            || [(); 3].map(|_| vec![0f32; classes.min(student.len())]),
            |[tmean, ps, pt], (r, g)| {
                if !counts(r) {
                    return (0.0, 0.0);
                }
                let s = &student[r * classes..(r + 1) * classes];
                let y = labels[r];
                let has_label = y != cfg.ignore_index;
                let t: &[f32] = match (kd_kind, teachers) {
                    (None, _) | (_, []) => &[],
                    (_, [one]) => &one[r * classes..(r + 1) * classes],
                    (_, many) => {
                        // Mean of the teachers' logits for this row, summed in teacher order.
                        tmean.copy_from_slice(&many[0][r * classes..(r + 1) * classes]);
                        for tj in &many[1..] {
                            for (m, &v) in tmean.iter_mut().zip(&tj[r * classes..]) {
                                *m += v;
                            }
                        }
                        tmean.iter_mut().for_each(|m| *m /= k);
                        tmean
                    }
                };
                let spec = RowSpec {
                    w_ce,
                    label: if has_label { y as usize } else { 0 },
                    has_label,
                    kd: kd_kind,
                    w_kd,
                    weight: cfg.weight,
                };
                loss_row(&spec, s, t, g, ps, pt)
            },
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook formulas in f64, one element at a time.
    fn reference(
        cfg: &KdLoss,
        s: &[f32],
        teachers: &[&[f32]],
        labels: &[i32],
        mask: &[bool],
        classes: usize,
    ) -> (f64, f64, Vec<f64>) {
        let rows = labels.len();
        let ce_rows = (0..rows)
            .filter(|&r| mask[r] && labels[r] != cfg.ignore_index)
            .count();
        let kd_rows = (0..rows).filter(|&r| mask[r]).count();
        let (mut ce, mut kd) = (0f64, 0f64);
        let mut grad = vec![0f64; s.len()];
        let lse = |v: &[f64]| {
            let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
        };
        for r in (0..rows).filter(|&r| mask[r]) {
            let sr: Vec<f64> = s[r * classes..][..classes]
                .iter()
                .map(|&v| v as f64)
                .collect();
            let tr: Vec<f64> = (0..classes)
                .map(|c| {
                    teachers
                        .iter()
                        .map(|t| t[r * classes + c] as f64)
                        .sum::<f64>()
                        / teachers.len() as f64
                })
                .collect();
            let g = &mut grad[r * classes..][..classes];
            if labels[r] != cfg.ignore_index {
                let y = labels[r] as usize;
                let l = lse(&sr);
                ce += (l - sr[y]) / ce_rows as f64;
                for c in 0..classes {
                    g[c] += ((sr[c] - l).exp() - (c == y) as u8 as f64) / ce_rows as f64;
                }
            }
            match cfg.kind {
                KdKind::Kl { temperature } => {
                    let t = temperature as f64;
                    let ss: Vec<f64> = sr.iter().map(|v| v / t).collect();
                    let ts: Vec<f64> = tr.iter().map(|v| v / t).collect();
                    let (ls, lt) = (lse(&ss), lse(&ts));
                    for c in 0..classes {
                        let (lps, lpt) = (ss[c] - ls, ts[c] - lt);
                        kd += lpt.exp() * (lpt - lps) * t * t / kd_rows as f64;
                        g[c] += cfg.weight as f64 * t * (lps.exp() - lpt.exp()) / kd_rows as f64;
                    }
                }
                KdKind::Mse => {
                    for c in 0..classes {
                        let d = sr[c] - tr[c];
                        kd += d * d / (classes * kd_rows) as f64;
                        g[c] += cfg.weight as f64 * 2.0 * d / (classes * kd_rows) as f64;
                    }
                }
            }
        }
        (ce, kd, grad)
    }

    /// Vocabulary-wide rows (BERT's), several teachers, a mask and unlabelled rows: the
    /// vectorised rows agree with the f64 formulas.
    #[test]
    fn wide_rows_match_the_f64_formulas() {
        let (rows, classes) = (6, 30_522);
        let gen = |seed: u64, scale: f32| -> Vec<f32> {
            (0..rows * classes)
                .map(|i| scale * crate::rng::normal_at(seed, i as u64))
                .collect()
        };
        let s = gen(1, 3.0);
        let t1 = gen(2, 3.0);
        let t2 = gen(3, 2.0);
        let labels = [5, -100, 30_521, 17, 0, 999];
        let mask = [true, true, true, false, true, true];
        for cfg in [KdLoss::kl(4.0, 1.0), KdLoss::kl(1.0, 0.7), KdLoss::mse(0.5)] {
            for teachers in [vec![&t1[..]], vec![&t1[..], &t2[..]]] {
                let out = kd_loss_cpu(&cfg, &s, &teachers, &labels, Some(&mask), classes).unwrap();
                let (ce, kd, grad) = reference(&cfg, &s, &teachers, &labels, &mask, classes);
                assert!(
                    (out.ce as f64 - ce).abs() < 2e-6 * ce.abs().max(1.0),
                    "{ce}"
                );
                assert!(
                    (out.kd as f64 - kd).abs() < 2e-5 * kd.abs().max(1.0),
                    "{cfg:?}: {} vs {kd}",
                    out.kd
                );
                let scale = grad.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
                for (i, (g, w)) in out.grad.iter().zip(&grad).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() / scale < 1e-5,
                        "{cfg:?} grad[{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// The AVX-512 build of a row computes what the baseline build computes.
    #[test]
    fn both_builds_of_a_row_agree() {
        let classes = 1000;
        let s: Vec<f32> = (0..classes)
            .map(|i| 2.0 * crate::rng::normal_at(7, i as u64))
            .collect();
        let t: Vec<f32> = (0..classes)
            .map(|i| 2.0 * crate::rng::normal_at(8, i as u64))
            .collect();
        for kd in [
            Some(KdKind::Kl { temperature: 2.0 }),
            Some(KdKind::Mse),
            None,
        ] {
            let spec = RowSpec {
                w_ce: 0.5,
                label: 3,
                has_label: true,
                kd,
                w_kd: 0.25,
                weight: 1.5,
            };
            let mut scratch = [(); 6].map(|_| vec![0f32; classes]);
            let [g1, p1, q1, g2, p2, q2] = &mut scratch;
            let a = loss_row(&spec, &s, &t, g1, p1, q1);
            let b = loss_row_generic(&spec, &s, &t, g2, p2, q2);
            assert!(
                (a.0 - b.0).abs() < 1e-9 && (a.1 - b.1).abs() < 1e-9,
                "{a:?} {b:?}"
            );
            for (x, y) in g1.iter().zip(g2.iter()) {
                assert!((x - y).abs() < 1e-7, "{x} vs {y}");
            }
        }
    }
}
