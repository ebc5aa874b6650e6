//! Normalisation layers on the tape: 2-d batch normalisation (ResNet) and layer normalisation
//! (BERT), each with one forward and one backward for every device. The work is done by the
//! backend-level functions of `crate::backend::norm` (CPU arm and CUDA arm beneath them), which
//! also hold the kernels, the numerics and the argument checks.

pub use crate::backend::BatchNormOptions;

use crate::backend::norm::{
    batch_norm2d_bwd, batch_norm2d_eval_stats, batch_norm2d_fwd, layer_norm_bwd, layer_norm_fwd,
};
use crate::{Result, Tape, Tensor, Var};

/// Batch normalisation of `x` (`[N, C, H, W]`) with per-channel `weight` and `bias` (`[C]`).
/// In training mode `running_mean` and `running_var` (f32 `[C]`) are updated in place, on any
/// tape (as PyTorch does under `no_grad`); in evaluation they are only read. Parameter
/// gradients are f32 on every device.
pub fn batch_norm2d(
    tape: &Tape,
    x: &Var,
    weight: &Var,
    bias: &Var,
    running_mean: &Tensor,
    running_var: &Tensor,
    opts: BatchNormOptions,
) -> Result<Var> {
    let (y, batch_stats) = batch_norm2d_fwd(
        x.tensor(),
        weight.tensor(),
        bias.tensor(),
        running_mean,
        running_var,
        opts,
    )?;
    // The statistics the forward normalised with: the batch's, or (evaluation) the running
    // ones as they are now, kept only when a backward can run (they may change before it).
    let stats = match batch_stats {
        Some(s) => s,
        None if tape.is_recording() => {
            batch_norm2d_eval_stats(running_mean, running_var, opts.eps)?
        }
        None => return Ok(tape.constant(y)),
    };
    let (saved_x, saved_w) = (x.tensor().clone(), weight.tensor().clone());
    Ok(tape.record(
        y,
        &[x, weight, bias],
        Box::new(move |g, needs| {
            let (dx, dw, db) =
                batch_norm2d_bwd(&saved_x, g, &stats, &saved_w, opts.training, needs[0])?;
            Ok(vec![dx, needs[1].then_some(dw), needs[2].then_some(db)])
        }),
    ))
}

/// Layer normalisation over the last dimension of `x` (`[..., D]`) with `weight` and `bias`
/// (`[D]`). Parameter gradients are f32 on every device.
pub fn layer_norm(tape: &Tape, x: &Var, weight: &Var, bias: &Var, eps: f32) -> Result<Var> {
    let (y, mean, rstd) = layer_norm_fwd(x.tensor(), weight.tensor(), bias.tensor(), eps)?;
    let (saved_x, saved_w) = (x.tensor().clone(), weight.tensor().clone());
    Ok(tape.record(
        y,
        &[x, weight, bias],
        Box::new(move |g, needs| {
            let (dx, dw, db) = layer_norm_bwd(&saved_x, g, &mean, &rstd, &saved_w, needs[0])?;
            Ok(vec![dx, needs[1].then_some(dw), needs[2].then_some(db)])
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::GradCheck;
    use crate::{DType, Device};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        Tensor::randn(shape, 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap()
    }

    fn vec_t(v: &[f32]) -> Tensor {
        Tensor::f32(v.to_vec(), &[v.len()]).unwrap()
    }

    #[test]
    fn batch_norm_training_forward_and_running_stats() {
        // N=2, C=2, H=1, W=2: channel 0 holds 1, 2, 3, 4; channel 1 holds 10, 10, 14, 14.
        let x = Tensor::f32(vec![1., 2., 10., 10., 3., 4., 14., 14.], &[2, 2, 1, 2]).unwrap();
        let tape = Tape::inference();
        let (xv, w, b) = (
            tape.constant(x),
            tape.constant(vec_t(&[2.0, 1.0])),
            tape.constant(vec_t(&[0.5, -1.0])),
        );
        let rm = vec_t(&[0.0, 1.0]);
        let rv = vec_t(&[1.0, 2.0]);
        let opts = BatchNormOptions {
            eps: 0.0,
            ..Default::default()
        };
        let y = batch_norm2d(&tape, &xv, &w, &b, &rm, &rv, opts).unwrap();
        let y = y.tensor().to_vec_f32().unwrap();
        // Channel 0: mean 2.5, biased var 1.25; channel 1: mean 12, var 4.
        let s = 1.25f32.sqrt();
        let want = [
            2.0 * (1.0 - 2.5) / s + 0.5,
            2.0 * (2.0 - 2.5) / s + 0.5,
            -1.0 - 1.0,
            -1.0 - 1.0,
            2.0 * (3.0 - 2.5) / s + 0.5,
            2.0 * (4.0 - 2.5) / s + 0.5,
            1.0 - 1.0,
            1.0 - 1.0,
        ];
        for (g, w) in y.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{y:?} vs {want:?}");
        }
        // Unbiased variances 5/3 and 16/3.
        let rm = rm.to_vec_f32().unwrap();
        let rv = rv.to_vec_f32().unwrap();
        assert!((rm[0] - 0.25).abs() < 1e-6 && (rm[1] - (0.9 + 1.2)).abs() < 1e-5);
        assert!((rv[0] - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-6);
        assert!((rv[1] - (1.8 + 0.1 * 16.0 / 3.0)).abs() < 1e-5);
    }

    #[test]
    fn batch_norm_eval_uses_running_stats_and_leaves_them() {
        let x = Tensor::f32(vec![1.0, 3.0, 5.0, 7.0], &[1, 2, 1, 2]).unwrap();
        let tape = Tape::inference();
        let (xv, w, b) = (
            tape.constant(x),
            tape.constant(vec_t(&[1.0, 3.0])),
            tape.constant(vec_t(&[0.0, 1.0])),
        );
        let (rm, rv) = (vec_t(&[1.0, 5.0]), vec_t(&[4.0, 1.0]));
        let opts = BatchNormOptions {
            training: false,
            eps: 0.0,
            ..Default::default()
        };
        let y = batch_norm2d(&tape, &xv, &w, &b, &rm, &rv, opts).unwrap();
        assert_eq!(y.tensor().to_vec_f32().unwrap(), vec![0.0, 1.0, 1.0, 7.0]);
        assert_eq!(rm.to_vec_f32().unwrap(), vec![1.0, 5.0]);
        assert_eq!(rv.to_vec_f32().unwrap(), vec![4.0, 1.0]);
    }

    #[test]
    fn batch_norm_gradients_in_both_modes() {
        let x = randn(&[3, 4, 2, 3], 1);
        let w = Tensor::randn(&[4], 1.0, 0.3, 2, DType::F32, Device::Cpu).unwrap();
        let b = randn(&[4], 3);
        for training in [true, false] {
            let rm = Tensor::randn(&[4], 0.0, 0.1, 4, DType::F32, Device::Cpu).unwrap();
            let rv = Tensor::rand_uniform(&[4], 0.5, 1.5, 5, DType::F32, Device::Cpu).unwrap();
            let opts = BatchNormOptions {
                training,
                ..Default::default()
            };
            let worst = GradCheck::default()
                .run(&[x.clone(), w.clone(), b.clone()], &[0, 1, 2], |t, v| {
                    batch_norm2d(t, &v[0], &v[1], &v[2], &rm, &rv, opts)
                })
                .unwrap();
            assert!(worst < 1e-2, "training={training}: {worst}");
        }
    }

    #[test]
    fn batch_norm_running_stats_may_share_one_buffer() {
        // Running statistics are often views of one flat buffer: no deadlock, both updated.
        let buf = Tensor::f32(vec![0.0, 0.0, 1.0, 1.0], &[4]).unwrap();
        let (rm, rv) = (buf.view(0, &[2]).unwrap(), buf.view(2, &[2]).unwrap());
        let tape = Tape::inference();
        let x = tape.constant(randn(&[2, 2, 2, 2], 9));
        let w = tape.constant(vec_t(&[1.0, 1.0]));
        let b = tape.constant(vec_t(&[0.0, 0.0]));
        batch_norm2d(&tape, &x, &w, &b, &rm, &rv, Default::default()).unwrap();
        let v = buf.to_vec_f32().unwrap();
        assert!(v[0] != 0.0 && v[2] != 1.0, "{v:?}");
    }

    #[test]
    fn batch_norm_errors() {
        let tape = Tape::inference();
        let x = tape.constant(randn(&[2, 3, 2, 2], 1));
        let w3 = tape.constant(vec_t(&[1.0; 3]));
        let w2 = tape.constant(vec_t(&[1.0; 2]));
        let r3 = vec_t(&[0.0; 3]);
        let r2 = vec_t(&[0.0; 2]);
        let opts = BatchNormOptions::default();
        let err = batch_norm2d(&tape, &x, &w2, &w3, &r3, &r3, opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[2, 3, 2, 2]") && err.contains("weight") && err.contains("[2]"));
        let err = batch_norm2d(&tape, &x, &w3, &w3, &r3, &r2, opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("running_var"), "{err}");
        let x3 = tape.constant(randn(&[2, 3, 4], 1));
        assert!(batch_norm2d(&tape, &x3, &w3, &w3, &r3, &r3, opts).is_err());
        let one = tape.constant(randn(&[1, 3, 1, 1], 1));
        let err = batch_norm2d(&tape, &one, &w3, &w3, &r3, &r3, opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than one value"), "{err}");
        let eval = BatchNormOptions {
            training: false,
            ..opts
        };
        assert!(batch_norm2d(&tape, &one, &w3, &w3, &r3, &r3, eval).is_ok());
        let bad = BatchNormOptions {
            momentum: 2.0,
            ..opts
        };
        assert!(batch_norm2d(&tape, &x, &w3, &w3, &r3, &r3, bad).is_err());
    }

    #[test]
    fn layer_norm_forward_matches_definition() {
        let x = vec![1.0f32, 2.0, 3.0, 6.0, -1.0, -1.0, 1.0, 1.0];
        let tape = Tape::inference();
        let y = layer_norm(
            &tape,
            &tape.constant(Tensor::f32(x, &[2, 1, 4]).unwrap()),
            &tape.constant(vec_t(&[1.0, 2.0, 1.0, 1.0])),
            &tape.constant(vec_t(&[0.0, 0.0, 0.0, 1.0])),
            0.0,
        )
        .unwrap();
        assert_eq!(y.shape(), &[2, 1, 4]);
        let y = y.tensor().to_vec_f32().unwrap();
        // Row 0: mean 3, var (4 + 1 + 0 + 9) / 4 = 3.5.
        let s = 3.5f32.sqrt();
        let want = [-2.0 / s, -2.0 / s, 0.0, 3.0 / s + 1.0, -1.0, -2.0, 1.0, 2.0];
        for (g, w) in y.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{y:?} vs {want:?}");
        }
    }

    #[test]
    fn layer_norm_gradients() {
        let x = Tensor::randn(&[5, 3, 8], 0.5, 2.0, 1, DType::F32, Device::Cpu).unwrap();
        let w = Tensor::randn(&[8], 1.0, 0.5, 2, DType::F32, Device::Cpu).unwrap();
        let b = randn(&[8], 3);
        GradCheck::default()
            .run(&[x, w, b], &[0, 1, 2], |t, v| {
                layer_norm(t, &v[0], &v[1], &v[2], 1e-5)
            })
            .unwrap();
    }

    #[test]
    fn layer_norm_parameter_gradients_sum_over_many_row_blocks() {
        // More rows than one reduction block holds, so several partial sums are combined.
        let (rows, d) = (5000, 8);
        let x = randn(&[rows, d], 5);
        let dy = randn(&[rows, d], 6);
        let tape = Tape::recording();
        let (xv, w, b) = (
            tape.watch(x.clone()),
            tape.watch(vec_t(&[1.0; 8])),
            tape.watch(vec_t(&[0.0; 8])),
        );
        let y = layer_norm(&tape, &xv, &w, &b, 1e-5).unwrap();
        let g = tape.backward_with(&y, dy.clone()).unwrap();
        let (xs, gs) = (x.to_vec_f32().unwrap(), dy.to_vec_f32().unwrap());
        let (mut dw, mut db) = (vec![0f64; d], vec![0f64; d]);
        for (row, gr) in xs.chunks(d).zip(gs.chunks(d)) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            for j in 0..d {
                dw[j] += gr[j] as f64 * (row[j] as f64 - mean) / (var + 1e-5).sqrt();
                db[j] += gr[j] as f64;
            }
        }
        let got_w = g.get(&w).unwrap().to_vec_f32().unwrap();
        let got_b = g.get(&b).unwrap().to_vec_f32().unwrap();
        for j in 0..d {
            assert!(
                (got_w[j] as f64 - dw[j]).abs() < 1e-2,
                "{got_w:?} vs {dw:?}"
            );
            assert!(
                (got_b[j] as f64 - db[j]).abs() < 1e-2,
                "{got_b:?} vs {db:?}"
            );
        }
    }

    #[test]
    fn empty_inputs_are_fine() {
        let tape = Tape::inference();
        let x = tape.constant(Tensor::f32(vec![], &[0, 4]).unwrap());
        let w4 = tape.constant(vec_t(&[1.0; 4]));
        assert_eq!(
            layer_norm(&tape, &x, &w4, &w4, 1e-5).unwrap().shape(),
            &[0, 4]
        );
        let x = tape.constant(Tensor::f32(vec![], &[2, 4, 0, 3]).unwrap());
        let r4 = vec_t(&[0.0; 4]);
        let eval = BatchNormOptions {
            training: false,
            ..Default::default()
        };
        let y = batch_norm2d(&tape, &x, &w4, &w4, &r4, &r4, eval).unwrap();
        assert_eq!(y.shape(), &[2, 4, 0, 3]);
    }

    #[test]
    fn layer_norm_errors() {
        let tape = Tape::inference();
        let x = tape.constant(randn(&[2, 4], 1));
        let w4 = tape.constant(vec_t(&[1.0; 4]));
        let w3 = tape.constant(vec_t(&[1.0; 3]));
        let err = layer_norm(&tape, &x, &w4, &w3, 1e-5)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[2, 4]") && err.contains("bias") && err.contains("[3]"),
            "{err}"
        );
        assert!(layer_norm(&tape, &x, &w4, &w4, -1.0).is_err());
        let s = tape.constant(Tensor::f32(vec![1.0], &[]).unwrap());
        assert!(layer_norm(&tape, &s, &w4, &w4, 1e-5).is_err());
    }
}
