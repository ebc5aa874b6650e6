//! The distillation loss against cached teacher targets: the teacher's top-k logits per row
//! and the exact mass of the rest, instead of its whole row of logits.
//!
//! A row of the cache holds the k largest teacher logits `v_i` at classes `I` (ties: the lower
//! class first) and `L = log Σ_{j ∉ I} e^{t_j / T}`, the log-sum-exp of the other classes at the
//! loss's temperature (`-inf` when k = C). That defines a distribution over k + 1 buckets — the
//! k classes and "the rest" — which is exactly the teacher's `softmax(t/T)` with the tail classes
//! merged: `q_i = e^{v_i/T} / Z`, `q_rest = e^L / Z`, `Z = Σ_i e^{v_i/T} + e^L`. The student's
//! distribution is merged the same way, `P_rest = Σ_{j ∉ I} softmax(s/T)_j` (summed directly, not
//! as `1 - Σ_i p_i`, so a rest of 1e-9 keeps its digits). Then
//!
//! - KL: `L_kd = T² · [Σ_i q_i log(q_i / p_i) + q_rest log(q_rest / P_rest)]`, with gradient
//!   `T·(p_j − q_j)` for `j ∈ I` and `T·p_j·(1 − q_rest / P_rest)` for the rest (times λ over the
//!   counted rows, as the online loss);
//! - MSE: `L_kd = (1/k) Σ_i (s_i − v_i)²` over the cached classes, gradient `2(s_i − v_i)/k`.
//!
//! At k = C both are the online loss's formulas; the rows are then scattered back into full rows
//! and handed to [`kd_loss_cpu`], so the result is the online loss bit for bit (given values
//! stored without rounding). At k < C the KL is the online KL minus exactly
//! `T² · q_rest · KL(q_tail ‖ p_tail)` (the tail distributions conditioned on the rest: merging
//! buckets only loses information), and the gradient differs only on the tail classes, by at
//! most `2 · λ · T · q_rest / rows` in L1 per row. The tests check both statements.
//!
//! An ensemble's online target is the mean of its teachers' logits, which top-k rows of each
//! teacher cannot rebuild below k = C: several cached teachers need k = C (an error otherwise).

use rayon::prelude::*;

use super::cpu::{exp_row, row_max, row_sum};
use super::{kd_loss_cpu, KdKind, KdLoss, KdLossOutput};
use crate::{Error, Result};

/// One teacher's cached targets for the rows of one step (`[rows, k]` row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct CachedTargets {
    pub rows: usize,
    pub classes: usize,
    pub k: usize,
    /// Class of each cached logit, largest logit first in each row.
    pub indices: Vec<u32>,
    /// The teacher's logit at each of `indices`.
    pub values: Vec<f32>,
    /// Per row, `log Σ e^{t_j / T}` over the classes not cached (`-inf` when k = C).
    pub tail_lse: Vec<f32>,
}

fn cache_err(msg: String) -> Error {
    Error::invalid("kd_loss_cached", msg)
}

impl CachedTargets {
    /// The top `k` of each row of `logits` (`[rows, classes]`) and the log-sum-exp of the rest
    /// at `temperature` (which only the KL term reads; give 1 for MSE).
    pub fn from_logits(
        logits: &[f32],
        classes: usize,
        k: usize,
        temperature: f32,
    ) -> Result<CachedTargets> {
        if classes == 0 || !logits.len().is_multiple_of(classes) {
            return Err(cache_err(format!(
                "{} logits are not rows of {classes} classes",
                logits.len()
            )));
        }
        if k == 0 || k > classes {
            return Err(cache_err(format!(
                "k = {k} must be between 1 and the {classes} classes"
            )));
        }
        if !(temperature > 0.0 && temperature.is_finite()) {
            return Err(cache_err(format!(
                "temperature {temperature} must be a positive number"
            )));
        }
        let rows = logits.len() / classes;
        let inv = 1.0 / temperature as f64;
        let per_row: Vec<(Vec<u32>, Vec<f32>, f32)> = logits
            .par_chunks(classes)
            .map(|t| {
                let mut order: Vec<u32> = (0..classes as u32).collect();
                // Largest first; ties (and NaN, which the trainer refuses anyway) by class.
                let cmp =
                    |a: &u32, b: &u32| t[*b as usize].total_cmp(&t[*a as usize]).then(a.cmp(b));
                if k < classes {
                    order.select_nth_unstable_by(k - 1, cmp);
                }
                let (top, tail) = order.split_at_mut(k);
                top.sort_unstable_by(cmp);
                let m = tail
                    .iter()
                    .map(|&j| t[j as usize])
                    .fold(f32::NEG_INFINITY, f32::max);
                let lse = if tail.is_empty() {
                    f64::NEG_INFINITY
                } else {
                    let z: f64 = tail
                        .iter()
                        .map(|&j| ((t[j as usize] as f64 - m as f64) * inv).exp())
                        .sum();
                    m as f64 * inv + z.ln()
                };
                let values = top.iter().map(|&j| t[j as usize]).collect();
                (top.to_vec(), values, lse as f32)
            })
            .collect();
        let mut out = CachedTargets {
            rows,
            classes,
            k,
            indices: Vec::with_capacity(rows * k),
            values: Vec::with_capacity(rows * k),
            tail_lse: Vec::with_capacity(rows),
        };
        for (i, v, l) in per_row {
            out.indices.extend(i);
            out.values.extend(v);
            out.tail_lse.push(l);
        }
        Ok(out)
    }

    /// Checks the lengths, and that each row's classes are in range and distinct.
    pub fn validate(&self) -> Result<()> {
        let (rows, k, c) = (self.rows, self.k, self.classes);
        if k == 0 || k > c {
            return Err(cache_err(format!("k = {k} with {c} classes")));
        }
        if self.indices.len() != rows * k
            || self.values.len() != rows * k
            || self.tail_lse.len() != rows
        {
            return Err(cache_err(format!(
                "{} indices, {} values and {} tail sums for {rows} rows of k = {k}",
                self.indices.len(),
                self.values.len(),
                self.tail_lse.len()
            )));
        }
        let mut seen = vec![u32::MAX; c];
        for (r, row) in self.indices.chunks(k).enumerate() {
            for &j in row {
                let slot = seen
                    .get_mut(j as usize)
                    .ok_or_else(|| cache_err(format!("row {r}: class {j} is outside [0, {c})")))?;
                if *slot == r as u32 {
                    return Err(cache_err(format!("row {r}: class {j} is cached twice")));
                }
                *slot = r as u32;
            }
        }
        Ok(())
    }

    /// The full rows of logits, when every class is cached (k = C).
    pub(super) fn dense(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.classes];
        for (r, (idx, vals)) in self
            .indices
            .chunks(self.k)
            .zip(self.values.chunks(self.k))
            .enumerate()
        {
            let row = &mut out[r * self.classes..][..self.classes];
            for (&j, &v) in idx.iter().zip(vals) {
                row[j as usize] = v;
            }
        }
        out
    }
}

/// The fused loss (CE + λ·KD, its gradient) with the targets of `teachers` read from a cache
/// instead of their logits; arguments and output as [`kd_loss_cpu`]. With every teacher cached
/// at k = C this is [`kd_loss_cpu`] on the rebuilt rows (bit for bit); with one teacher at
/// k < C, the k + 1 bucket loss of [`kd_loss_buckets_cpu`]; several teachers below k = C are an
/// error (their mean logits cannot be rebuilt).
pub fn kd_loss_cached_cpu(
    cfg: &KdLoss,
    student: &[f32],
    teachers: &[CachedTargets],
    labels: &[i32],
    mask: Option<&[bool]>,
    classes: usize,
) -> Result<KdLossOutput> {
    match cached_route(teachers, labels.len(), classes)? {
        CachedRoute::Buckets(one) => kd_loss_buckets_cpu(cfg, student, one, labels, mask, classes),
        CachedRoute::Dense => {
            let dense: Vec<Vec<f32>> = teachers.iter().map(CachedTargets::dense).collect();
            let refs: Vec<&[f32]> = dense.iter().map(|d| &d[..]).collect();
            kd_loss_cpu(cfg, student, &refs, labels, mask, classes)
        }
    }
}

/// How the loss on cached targets is computed, on every device.
pub(super) enum CachedRoute<'a> {
    /// One teacher below k = C: the k + 1 bucket loss.
    Buckets(&'a CachedTargets),
    /// Every teacher at k = C (or none): the online loss on the rows scattered back.
    Dense,
}

/// Checks `teachers` against `rows` rows of `classes` classes and picks the route; several
/// teachers below k = C are an error (their mean logits cannot be rebuilt).
pub(super) fn cached_route(
    teachers: &[CachedTargets],
    rows: usize,
    classes: usize,
) -> Result<CachedRoute<'_>> {
    for (j, t) in teachers.iter().enumerate() {
        check_targets(j, t, rows, classes)?;
    }
    match teachers {
        [one] if one.k < classes => Ok(CachedRoute::Buckets(one)),
        many if many.iter().all(|t| t.k == classes) => Ok(CachedRoute::Dense),
        many => Err(cache_err(format!(
            "{} teachers cached at k = {:?} of {classes} classes: the mean of several \
             teachers' logits needs every class cached (k = {classes}); cache them at k = \
             {classes}, or distill from one teacher per step (strategy single or random-one)",
            many.len(),
            many.iter().map(|t| t.k).collect::<Vec<_>>()
        ))),
    }
}

fn check_targets(j: usize, t: &CachedTargets, rows: usize, classes: usize) -> Result<()> {
    if t.rows != rows || t.classes != classes {
        return Err(cache_err(format!(
            "teacher {j}'s cached targets are {} rows of {} classes, the student's logits {rows} \
             rows of {classes}: the cache is not of this step's batch",
            t.rows, t.classes
        )));
    }
    t.validate()
        .map_err(|e| cache_err(format!("teacher {j}: {e}")))
}

/// The k + 1 bucket loss of one cached teacher, at any k (the module's formulas).
pub fn kd_loss_buckets_cpu(
    cfg: &KdLoss,
    student: &[f32],
    teacher: &CachedTargets,
    labels: &[i32],
    mask: Option<&[bool]>,
    classes: usize,
) -> Result<KdLossOutput> {
    check_targets(0, teacher, labels.len(), classes)?;
    // CE and its gradient exactly as the online loss computes them (no teacher).
    let mut out = kd_loss_cpu(cfg, student, &[], labels, mask, classes)?;
    let counts = |r: usize| mask.is_none_or(|m| m[r]);
    let kd_rows = if cfg.weight == 0.0 {
        0
    } else {
        (0..labels.len()).filter(|&r| counts(r)).count()
    };
    if kd_rows == 0 {
        return Ok(out);
    }
    let w_kd = 1.0 / kd_rows as f32;
    let k = teacher.k;
    let partial: Vec<f64> = out
        .grad
        .par_chunks_mut(classes)
        .enumerate()
        .map_init(
            || vec![0f32; classes],
            |scratch, (r, g)| {
                if !counts(r) {
                    return 0.0;
                }
                let s = &student[r * classes..][..classes];
                let idx = &teacher.indices[r * k..][..k];
                let v = &teacher.values[r * k..][..k];
                match cfg.kind {
                    KdKind::Kl { temperature } => {
                        let scale = cfg.weight * temperature * w_kd;
                        kl_row(
                            s,
                            idx,
                            v,
                            teacher.tail_lse[r],
                            temperature,
                            scale,
                            g,
                            scratch,
                        )
                    }
                    KdKind::Mse => {
                        let scale = cfg.weight * 2.0 * w_kd / k as f32;
                        let mut se = 0f64;
                        for (&j, &t) in idx.iter().zip(v) {
                            let d = s[j as usize] - t;
                            se += (d * d) as f64;
                            g[j as usize] += scale * d;
                        }
                        se / k as f64
                    }
                }
            },
        )
        .collect();
    let kd = (partial.iter().sum::<f64>() * w_kd as f64) as f32;
    out.kd = kd;
    out.total = out.ce + cfg.weight * kd;
    out.kd_rows = kd_rows;
    Ok(out)
}

/// [`kl_row_generic`] compiled for AVX-512 when the CPU has it (as the online loss's rows are:
/// BERT's rows are vocabulary-wide, and the loops over them vectorise).
#[allow(clippy::too_many_arguments)]
fn kl_row(
    s: &[f32],
    idx: &[u32],
    v: &[f32],
    tail_lse: f32,
    temperature: f32,
    scale: f32,
    g: &mut [f32],
    e: &mut [f32],
) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { kl_row_avx512(s, idx, v, tail_lse, temperature, scale, g, e) };
    }
    kl_row_generic(s, idx, v, tail_lse, temperature, scale, g, e)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
fn kl_row_avx512(
    s: &[f32],
    idx: &[u32],
    v: &[f32],
    tail_lse: f32,
    temperature: f32,
    scale: f32,
    g: &mut [f32],
    e: &mut [f32],
) -> f64 {
    kl_row_generic(s, idx, v, tail_lse, temperature, scale, g, e)
}

/// One row's bucket KL (times T²), adding `scale · d KL / d s` (scale = λ·T / rows) into `g`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn kl_row_generic(
    s: &[f32],
    idx: &[u32],
    v: &[f32],
    tail_lse: f32,
    temperature: f32,
    scale: f32,
    g: &mut [f32],
    e: &mut [f32],
) -> f64 {
    let inv = 1.0 / temperature as f64;
    let tail_lse = tail_lse as f64;
    // Teacher buckets, normalised over the k values and the rest.
    let mt = v.iter().map(|&x| x as f64 * inv).fold(tail_lse, f64::max);
    let zt = v.iter().map(|&x| (x as f64 * inv - mt).exp()).sum::<f64>() + (tail_lse - mt).exp();
    let lzt = mt + zt.ln();
    let q_rest = (tail_lse - lzt).exp();
    // Student: e_j = e^{(s_j - m)/T}; the rest summed with the cached classes zeroed out.
    let ms = row_max(s);
    let zs = exp_row(s, ms, inv as f32, e);
    let top_e: Vec<f32> = idx.iter().map(|&j| e[j as usize]).collect();
    for &j in idx {
        e[j as usize] = 0.0;
    }
    let rest_s = row_sum(s.len(), |c| e[c]);
    let lzs = zs.ln();
    let mut kl = 0f64;
    for ((&j, &x), &ej) in idx.iter().zip(v).zip(&top_e) {
        let log_q = x as f64 * inv - lzt;
        let q = log_q.exp();
        let p = ej as f64 / zs;
        if q > 0.0 {
            let log_p = (s[j as usize] - ms) as f64 * inv - lzs;
            kl += q * (log_q - log_p);
        }
        g[j as usize] += (scale as f64 * (p - q)) as f32;
    }
    let tail = s.len() - idx.len();
    if tail > 0 {
        if q_rest > 0.0 {
            kl += q_rest * ((tail_lse - lzt) - (rest_s.ln() - lzs));
        }
        // d/ds_j for a tail class: T·p_j·(1 − q_rest / P_rest) = T·e_j·(1/zs − q_rest/rest_s).
        let coef = if rest_s > 0.0 {
            1.0 / zs - q_rest / rest_s
        } else {
            1.0 / zs
        };
        let c = (scale as f64 * coef) as f32;
        for (gv, &ej) in g.iter_mut().zip(e.iter()) {
            *gv += c * ej;
        }
    }
    kl * (temperature as f64 * temperature as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::normal_at;

    fn gen(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|i| scale * normal_at(seed, i as u64)).collect()
    }

    /// Teacher-like rows: one confident class per row on top of noise.
    fn peaked(seed: u64, rows: usize, classes: usize) -> Vec<f32> {
        let mut t = gen(seed, rows * classes, 1.5);
        for r in 0..rows {
            t[r * classes + (r * 7) % classes] += 8.0;
        }
        t
    }

    #[test]
    fn top_k_and_tail_are_exact() {
        let t = [1.0f32, 3.0, 3.0, -2.0, 0.5];
        let c = CachedTargets::from_logits(&t, 5, 2, 2.0).unwrap();
        // Ties go to the lower class.
        assert_eq!(c.indices, vec![1, 2]);
        assert_eq!(c.values, vec![3.0, 3.0]);
        let want = ((0.5f64).exp() + (-1.0f64).exp() + (0.25f64).exp()).ln();
        assert!((c.tail_lse[0] as f64 - want).abs() < 1e-6);
        let all = CachedTargets::from_logits(&t, 5, 5, 2.0).unwrap();
        assert_eq!(all.tail_lse, vec![f32::NEG_INFINITY]);
        assert!(CachedTargets::from_logits(&t, 5, 6, 2.0).is_err());
        assert!(CachedTargets::from_logits(&t, 5, 0, 2.0).is_err());
        assert!(CachedTargets::from_logits(&t, 4, 1, 2.0).is_err());
        let mut bad = c.clone();
        bad.indices[1] = 1;
        assert!(bad.validate().unwrap_err().to_string().contains("twice"));
        bad.indices[1] = 9;
        assert!(bad.validate().unwrap_err().to_string().contains("outside"));
    }

    /// At k = C the cached loss is the online loss bit for bit (one teacher and a mean of two),
    /// and the bucket formulas (forced) agree with it to f32 rounding.
    #[test]
    fn at_k_equal_c_it_is_the_online_loss() {
        let (rows, classes) = (7, 50);
        let s = gen(1, rows * classes, 3.0);
        let (t1, t2) = (peaked(2, rows, classes), peaked(3, rows, classes));
        let labels = [3, -100, 49, 0, 7, 8, 9];
        let mask = [true, true, false, true, true, true, true];
        for cfg in [KdLoss::kl(4.0, 0.7), KdLoss::kl(1.0, 1.0), KdLoss::mse(0.5)] {
            let tau = match cfg.kind {
                KdKind::Kl { temperature } => temperature,
                KdKind::Mse => 1.0,
            };
            let c1 = CachedTargets::from_logits(&t1, classes, classes, tau).unwrap();
            let c2 = CachedTargets::from_logits(&t2, classes, classes, tau).unwrap();
            for (online, cached) in [
                (vec![&t1[..]], vec![c1.clone()]),
                (vec![&t1[..], &t2[..]], vec![c1.clone(), c2]),
            ] {
                let want = kd_loss_cpu(&cfg, &s, &online, &labels, Some(&mask), classes).unwrap();
                let got =
                    kd_loss_cached_cpu(&cfg, &s, &cached, &labels, Some(&mask), classes).unwrap();
                assert_eq!(got.total.to_bits(), want.total.to_bits());
                assert_eq!(got.kd.to_bits(), want.kd.to_bits());
                assert!(got.grad.iter().zip(&want.grad).all(|(a, b)| a == b));
            }
            let want = kd_loss_cpu(&cfg, &s, &[&t1[..]], &labels, Some(&mask), classes).unwrap();
            let got = kd_loss_buckets_cpu(&cfg, &s, &c1, &labels, Some(&mask), classes).unwrap();
            assert_eq!(got.ce.to_bits(), want.ce.to_bits());
            assert!(
                (got.kd - want.kd).abs() <= 2e-6 * want.kd.abs().max(1.0),
                "{cfg:?}: {} vs {}",
                got.kd,
                want.kd
            );
            let scale = want.grad.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
            for (a, b) in got.grad.iter().zip(&want.grad) {
                assert!((a - b).abs() / scale < 1e-5, "{cfg:?}: {a} vs {b}");
            }
        }
    }

    /// Below k = C: the KL is the online KL minus `T² q_rest KL(q_tail ‖ p_tail)` (to f32
    /// rounding), never more; the gradients differ only on the tail classes, by at most
    /// `2 λ T q_rest / rows` in L1 per row. The measured errors for a peaked teacher are printed
    /// (`--nocapture`) and bounded.
    #[test]
    fn below_k_equal_c_the_error_is_the_tail_kl() {
        let (rows, classes) = (16, 100);
        let s = gen(4, rows * classes, 2.0);
        let t = peaked(5, rows, classes);
        let labels: Vec<i32> = (0..rows as i32).collect();
        let (tau, lambda) = (2.0f32, 1.0f32);
        let cfg = KdLoss::kl(tau, lambda);
        let online = kd_loss_cpu(&cfg, &s, &[&t[..]], &labels, None, classes).unwrap();
        let inv = 1.0 / tau as f64;
        let softmax = |x: &[f32]| -> Vec<f64> {
            let m = x.iter().map(|&v| v as f64 * inv).fold(f64::MIN, f64::max);
            let z: f64 = x.iter().map(|&v| (v as f64 * inv - m).exp()).sum();
            x.iter().map(|&v| (v as f64 * inv - m).exp() / z).collect()
        };
        for k in [1, 5, 10, 32] {
            let c = CachedTargets::from_logits(&t, classes, k, tau).unwrap();
            let got =
                kd_loss_cached_cpu(&cfg, &s, std::slice::from_ref(&c), &labels, None, classes)
                    .unwrap();
            let mut gap = 0f64;
            for r in 0..rows {
                let (p, q) = (
                    softmax(&s[r * classes..][..classes]),
                    softmax(&t[r * classes..][..classes]),
                );
                let top = &c.indices[r * k..][..k];
                let tail: Vec<usize> = (0..classes)
                    .filter(|j| !top.contains(&(*j as u32)))
                    .collect();
                let (qr, pr): (f64, f64) = (
                    tail.iter().map(|&j| q[j]).sum(),
                    tail.iter().map(|&j| p[j]).sum(),
                );
                let tail_kl: f64 = tail
                    .iter()
                    .map(|&j| q[j] / qr * ((q[j] / qr).ln() - (p[j] / pr).ln()))
                    .sum();
                gap += (tau * tau) as f64 * qr * tail_kl / rows as f64;
                // Gradient: equal on the cached classes, within the bound on the rest.
                let (go, gc) = (
                    &online.grad[r * classes..][..classes],
                    &got.grad[r * classes..][..classes],
                );
                let l1: f64 = tail.iter().map(|&j| (go[j] - gc[j]).abs() as f64).sum();
                assert!(
                    l1 <= 2.0 * (lambda * tau) as f64 * qr / rows as f64 + 1e-6,
                    "k {k} row {r}: {l1}"
                );
                for &j in top {
                    let j = j as usize;
                    assert!((go[j] - gc[j]).abs() < 1e-6, "k {k} row {r} class {j}");
                }
            }
            let err = online.kd as f64 - got.kd as f64;
            println!(
                "k {k:>3}: online KD {:.5}, cached {:.5}, error {err:.2e} (tail KL {gap:.2e})",
                online.kd, got.kd
            );
            assert!(err >= -1e-5, "merging buckets cannot raise the KL: {err}");
            assert!(
                (err - gap).abs() < 1e-5 + 1e-4 * gap,
                "k {k}: {err} vs {gap}"
            );
        }
    }

    /// The bucket loss's gradient against central differences of its value (KL and MSE, with
    /// CE and a mask).
    #[test]
    fn bucket_gradient_matches_finite_differences() {
        let (rows, classes, k) = (3, 12, 4);
        let s = gen(6, rows * classes, 1.5);
        let t = peaked(7, rows, classes);
        let labels = [2, -100, 11];
        let mask = [true, true, false];
        for cfg in [KdLoss::kl(2.0, 0.8), KdLoss::mse(0.6)] {
            let tau = match cfg.kind {
                KdKind::Kl { temperature } => temperature,
                KdKind::Mse => 1.0,
            };
            let c = CachedTargets::from_logits(&t, classes, k, tau).unwrap();
            let f = |x: &[f32]| {
                kd_loss_buckets_cpu(&cfg, x, &c, &labels, Some(&mask), classes)
                    .unwrap()
                    .total as f64
            };
            let out = kd_loss_buckets_cpu(&cfg, &s, &c, &labels, Some(&mask), classes).unwrap();
            let h = 1e-2f32;
            for i in 0..s.len() {
                let (mut up, mut down) = (s.clone(), s.clone());
                up[i] += h;
                down[i] -= h;
                let fd = (f(&up) - f(&down)) / (2.0 * h as f64);
                assert!(
                    (fd - out.grad[i] as f64).abs() < 2e-3,
                    "{cfg:?} [{i}]: finite difference {fd}, gradient {}",
                    out.grad[i]
                );
            }
        }
    }

    #[test]
    fn mismatched_targets_are_errors() {
        let (rows, classes) = (2, 6);
        let s = gen(8, rows * classes, 1.0);
        let t = gen(9, rows * classes, 1.0);
        let labels = [0, 1];
        let cfg = KdLoss::kl(2.0, 1.0);
        let c = CachedTargets::from_logits(&t, classes, 2, 2.0).unwrap();
        let e = kd_loss_cached_cpu(&cfg, &s, &[c.clone(), c.clone()], &labels, None, classes)
            .unwrap_err();
        assert!(e.to_string().contains("random-one"), "{e}");
        let e = kd_loss_cached_cpu(&cfg, &s, &[c], &labels[..1], None, classes).unwrap_err();
        assert!(e.to_string().contains("not of this step's batch"), "{e}");
    }
}
