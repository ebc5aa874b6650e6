//! The f64 reference of one row of the fused distillation loss, from the definitions in
//! `kd_loss.cu`'s header: what the kernels' tests and the CPU twin are held to.

use super::KdKind;

/// The distillation loss of one row in f64, from the definitions of `kd_loss.cu`'s header:
/// `(row_ce, row_kd, gradient)` for the gradient weights `ce_weight` (CE) and `lambda_kd_weight`
/// (lambda / counted rows, times the upstream gradient); `label` None for a row without one.
/// The oracle of the kernel's host-side checks (`tests/host_parity.rs`, the engine's simulator
/// tests), itself checked against finite differences there.
pub fn reference_row(
    term: Option<KdKind>,
    s: &[f32],
    t: &[f32],
    label: Option<usize>,
    ce_weight: f64,
    lambda_kd_weight: f64,
) -> (f64, f64, Vec<f64>) {
    let softmax = |x: &[f64]| -> (Vec<f64>, f64) {
        let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = x.iter().map(|v| (v - m).exp()).sum();
        let lse = m + z.ln();
        (x.iter().map(|v| (v - lse).exp()).collect(), lse)
    };
    let sd: Vec<f64> = s.iter().map(|&v| v as f64).collect();
    let td: Vec<f64> = t.iter().map(|&v| v as f64).collect();
    let c = s.len();
    let mut g = vec![0f64; c];
    let mut row_ce = 0.0;
    if let Some(y) = label {
        let (p, lse) = softmax(&sd);
        row_ce = lse - sd[y];
        for j in 0..c {
            g[j] = (p[j] - if j == y { 1.0 } else { 0.0 }) * ce_weight;
        }
    }
    let row_kd = match term {
        None => 0.0,
        Some(KdKind::Kl { temperature }) => {
            let tau = temperature as f64;
            let (ps, _) = softmax(&sd.iter().map(|v| v / tau).collect::<Vec<_>>());
            let (pt, _) = softmax(&td.iter().map(|v| v / tau).collect::<Vec<_>>());
            // KL(p_teacher || p_student): the teacher distribution is the target.
            let kl: f64 = (0..c).map(|j| pt[j] * (pt[j].ln() - ps[j].ln())).sum();
            for j in 0..c {
                g[j] += lambda_kd_weight * tau * (ps[j] - pt[j]);
            }
            tau * tau * kl
        }
        Some(KdKind::Mse) => {
            for j in 0..c {
                g[j] += lambda_kd_weight * 2.0 * (sd[j] - td[j]) / c as f64;
            }
            (0..c).map(|j| (sd[j] - td[j]).powi(2)).sum::<f64>() / c as f64
        }
    };
    (row_ce, row_kd, g)
}
