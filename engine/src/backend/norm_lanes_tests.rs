//! The lane kernels of batch norm and layer norm against the reference loops of `norm.rs`, on
//! planes and rows of every size around the lane width, values far from zero mean, and pools
//! of 1 and 3 threads.

use super::*;
use crate::backend::norm::{
    batch_norm2d_backward_reference, batch_norm2d_forward_reference, batch_norm2d_stats_reference,
    layer_norm_backward_reference, layer_norm_forward_reference, layer_norm_stats_reference,
};

fn values(len: usize, seed: u64, offset: f32, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|i| offset + scale * crate::rng::normal_at(seed, i as u64))
        .collect()
}

/// `(n, c, hw)`: planes shorter than, equal to and longer than the lanes, one-value planes,
/// the demo's 28x28 and 4x4 planes.
const SHAPES: &[(usize, usize, usize)] = &[
    (2, 3, 1),
    (3, 2, 15),
    (2, 3, 16),
    (4, 2, 17),
    (5, 3, 49),
    (7, 2, 33),
    (3, 4, 784),
    (16, 5, 16),
];

/// `(offset, scale)` of the values: centred, and a mean 10^4 standard deviations from zero
/// (where sums of the raw values in f32 would lose the variance).
const SPREADS: &[(f32, f32)] = &[(0.0, 1.0), (300.0, 0.03)];

fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

#[test]
fn statistics_match_the_reference() {
    for (si, &(n, c, hw)) in SHAPES.iter().enumerate() {
        for &(offset, scale) in SPREADS {
            let x = values(n * c * hw, si as u64, offset, scale);
            let (want_m, want_v) = batch_norm2d_stats_reference(&x, n, c, hw);
            let one = in_pool(1, || stats(&x, n, c, hw));
            let three = in_pool(3, || stats(&x, n, c, hw));
            assert_eq!(one, three, "shape {si}: thread counts differ");
            let (m, v) = one;
            for ch in 0..c {
                let what = format!("shape {si}, offset {offset}, channel {ch}");
                let sd = want_v[ch].sqrt();
                // The mean to f32 rounding of the values' spread, not of their size.
                assert!(
                    (m[ch] - want_m[ch]).abs() <= 2e-7 * want_m[ch].abs() + 1e-5 * sd,
                    "{what}: mean {} vs {}",
                    m[ch],
                    want_m[ch]
                );
                assert!(
                    (v[ch] - want_v[ch]).abs() <= 1e-5 * want_v[ch],
                    "{what}: variance {} vs {}",
                    v[ch],
                    want_v[ch]
                );
            }
        }
    }
}

#[test]
fn forward_is_the_reference_bit_for_bit() {
    for (si, &(n, c, hw)) in SHAPES.iter().enumerate() {
        let x = values(n * c * hw, 10 + si as u64, 0.5, 2.0);
        let mean = values(c, 20, 0.0, 1.0);
        let inv_std = values(c, 21, 2.0, 0.5);
        let (w, b) = (values(c, 22, 1.0, 0.3), values(c, 23, 0.0, 0.3));
        let mut want = vec![0f32; x.len()];
        batch_norm2d_forward_reference(&x, c, hw, &mean, &inv_std, &w, &b, &mut want);
        let mut got = vec![f32::NAN; x.len()];
        forward(&x, c, hw, &mean, &inv_std, &w, &b, &mut got);
        assert_eq!(got, want, "shape {si}");
    }
}

/// Gradients within f32 rounding of the reference's f64 sums: each sum to `1e-5` of the sum
/// of its terms' magnitudes, `dx` to `1e-5` of its terms' magnitudes.
#[test]
fn gradients_match_the_reference() {
    for (si, &(n, c, hw)) in SHAPES.iter().enumerate() {
        for &(offset, scale) in SPREADS {
            let x = values(n * c * hw, 30 + si as u64, offset, scale);
            let dy = values(n * c * hw, 40 + si as u64, 0.1, 1.0);
            let (mean, var) = batch_norm2d_stats_reference(&x, n, c, hw);
            let inv_std: Vec<f32> = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
            let w = values(c, 41, 1.0, 0.3);
            for training in [true, false] {
                let mut want_dx = vec![0f32; x.len()];
                let (want_dw, want_db) = batch_norm2d_backward_reference(
                    &x,
                    &dy,
                    n,
                    c,
                    hw,
                    &mean,
                    &inv_std,
                    &w,
                    training,
                    Some(&mut want_dx),
                );
                let run = || {
                    let mut dx = vec![f32::NAN; x.len()];
                    let (dw, db) = backward(
                        &x,
                        &dy,
                        n,
                        c,
                        hw,
                        &mean,
                        &inv_std,
                        &w,
                        training,
                        Some(&mut dx),
                    );
                    (dx, dw, db)
                };
                let one = in_pool(1, run);
                assert_eq!(one, in_pool(3, run), "shape {si}: thread counts differ");
                let (dx, dw, db) = one;
                let plane = |b: usize, ch: usize| (b * c + ch) * hw..(b * c + ch + 1) * hw;
                for ch in 0..c {
                    let what = format!("shape {si}, offset {offset}, training {training}, ch {ch}");
                    let (mut abs_g, mut abs_gx) = (0f64, 0f64);
                    for b in 0..n {
                        for (&g, &v) in dy[plane(b, ch)].iter().zip(&x[plane(b, ch)]) {
                            abs_g += g.abs() as f64;
                            abs_gx += (g as f64 * (v as f64 - mean[ch] as f64)).abs()
                                * inv_std[ch] as f64;
                        }
                    }
                    assert!(
                        ((db[ch] - want_db[ch]).abs() as f64) <= 1e-5 * abs_g,
                        "{what}: dbias {} vs {}",
                        db[ch],
                        want_db[ch]
                    );
                    assert!(
                        ((dw[ch] - want_dw[ch]).abs() as f64) <= 1e-5 * abs_gx,
                        "{what}: dweight {} vs {}",
                        dw[ch],
                        want_dw[ch]
                    );
                    let count = (n * hw) as f64;
                    let k = (w[ch] * inv_std[ch]).abs() as f64;
                    for b in 0..n {
                        for i in plane(b, ch) {
                            let xhat = (x[i] as f64 - mean[ch] as f64) * inv_std[ch] as f64;
                            let terms = k
                                * (dy[i].abs() as f64
                                    + abs_g / count
                                    + xhat.abs() * abs_gx / count);
                            assert!(
                                ((dx[i] - want_dx[i]).abs() as f64) <= 1e-5 * terms + 1e-30,
                                "{what}: dx[{i}] {} vs {}",
                                dx[i],
                                want_dx[i]
                            );
                        }
                    }
                }
            }
        }
    }
}

/// `(rows, d)`: rows shorter than, equal to and longer than the lanes, BERT-tiny's 128, and
/// more rows than one parameter-gradient block holds.
const ROWS: &[(usize, usize)] = &[(3, 1), (5, 7), (4, 16), (6, 17), (9, 128), (300, 100)];

#[test]
fn layer_norm_matches_the_reference() {
    for (si, &(rows, d)) in ROWS.iter().enumerate() {
        for &(offset, scale) in SPREADS {
            let what = format!("rows {rows}, d {d}, offset {offset}");
            let x = values(rows * d, 50 + si as u64, offset, scale);
            let dy = values(rows * d, 60 + si as u64, 0.1, 1.0);
            let (w, b) = (values(d, 61, 1.0, 0.3), values(d, 62, 0.0, 0.3));
            // Statistics: the mean to the rounding of the values' spread, 1/std to 1e-5.
            let (want_m, want_r) = layer_norm_stats_reference(&x, d, 1e-5);
            let (m, r) = layer_stats(&x, d, 1e-5);
            for i in 0..rows {
                let sd = 1.0 / want_r[i];
                assert!(
                    (m[i] - want_m[i]).abs() <= 2e-7 * want_m[i].abs() + 1e-5 * sd,
                    "{what}: mean {i} {} vs {}",
                    m[i],
                    want_m[i]
                );
                assert!(
                    (r[i] - want_r[i]).abs() <= 1e-5 * want_r[i],
                    "{what}: rstd {i} {} vs {}",
                    r[i],
                    want_r[i]
                );
            }
            // The rest from the reference's statistics, to compare the kernels alone.
            let mut want = vec![0f32; x.len()];
            layer_norm_forward_reference(&x, d, &want_m, &want_r, &w, &b, &mut want);
            let mut got = vec![f32::NAN; x.len()];
            layer_forward(&x, d, &want_m, &want_r, &w, &b, &mut got);
            assert_eq!(got, want, "{what}: forward");
            let mut want_dx = vec![0f32; x.len()];
            let (want_dw, want_db) =
                layer_norm_backward_reference(&x, &dy, d, &want_m, &want_r, &w, Some(&mut want_dx));
            let run = || {
                let mut dx = vec![f32::NAN; x.len()];
                let (dw, db) = layer_backward(&x, &dy, d, &want_m, &want_r, &w, Some(&mut dx));
                (dx, dw, db)
            };
            let (dx, dw, db) = in_pool(1, run);
            assert_eq!(
                in_pool(3, run),
                (dx.clone(), dw.clone(), db.clone()),
                "{what}"
            );
            assert_eq!((dw, db), (want_dw, want_db), "{what}: parameter gradients");
            // dx: to 1e-5 of its terms' magnitudes, r * (|g| + mean|g| + |xhat| mean|g xhat|).
            for i in 0..rows {
                let row = i * d..(i + 1) * d;
                let xhat = |j: usize| (x[j] - want_m[i]) * want_r[i];
                let mg = row
                    .clone()
                    .map(|j| (dy[j] * w[j - i * d]).abs())
                    .sum::<f32>()
                    / d as f32;
                let mgx = row
                    .clone()
                    .map(|j| (dy[j] * w[j - i * d] * xhat(j)).abs())
                    .sum::<f32>()
                    / d as f32;
                for j in row {
                    let terms =
                        want_r[i] * ((dy[j] * w[j - i * d]).abs() + mg + xhat(j).abs() * mgx);
                    assert!(
                        (dx[j] - want_dx[j]).abs() <= 1e-5 * terms + 1e-30,
                        "{what}: dx[{j}] {} vs {}",
                        dx[j],
                        want_dx[j]
                    );
                }
            }
        }
    }
}
