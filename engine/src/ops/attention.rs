//! Scaled dot-product attention on the tape, one forward and one backward for every device:
//! `out = dropout(softmax(q k^T / sqrt(Dh) + mask)) v`. The work is done by
//! `crate::backend::attention` (the fused CPU arm, and the composition of backend primitives
//! that runs on a GPU), which also holds the padding and dropout rules.

pub use crate::backend::attention::MASKED_SCORE;
pub use crate::backend::params::{AttentionDims, AttentionOptions, ProbDropout};

use crate::backend::attention::{attention_bwd, attention_fwd, key_mask};
use crate::{Error, Result, Tape, Tensor, Var};

/// Attention of `q` (`[B, H, Sq, Dh]`) over keys `k` (`[B, H, Sk, Dh]`) and values `v`
/// (`[B, H, Sk, Dv]`), with an optional key padding mask (`[B, Sk]`, 1 = attend, 0 = padding);
/// returns `[B, H, Sq, Dv]`. Self-attention is `Sq == Sk`, `Dv == Dh`.
pub fn scaled_dot_product_attention(
    tape: &Tape,
    q: &Var,
    k: &Var,
    v: &Var,
    key_padding_mask: Option<&Tensor>,
    opts: AttentionOptions,
) -> Result<Var> {
    const OP: &str = "scaled_dot_product_attention";
    let (qt, kt, vt) = (q.tensor(), k.tensor(), v.tensor());
    for (name, t) in [("q", qt), ("k", kt), ("v", vt)] {
        t.expect_float(OP)?;
        t.expect_rank(OP, name, 4)?;
    }
    let (qs, ks, vs) = (qt.shape(), kt.shape(), vt.shape());
    if ks[0] != qs[0] || ks[1] != qs[1] || ks[3] != qs[3] {
        return Err(Error::shape(
            OP,
            format!("q {qs:?} and k {ks:?} must agree in batch, heads and head size"),
        ));
    }
    if vs[0] != ks[0] || vs[1] != ks[1] || vs[2] != ks[2] {
        return Err(Error::shape(
            OP,
            format!("k {ks:?} and v {vs:?} must agree in batch, heads and keys"),
        ));
    }
    let dims = AttentionDims {
        b: qs[0],
        h: qs[1],
        sq: qs[2],
        sk: ks[2],
        dh: qs[3],
        dv: vs[3],
    };
    if dims.dh == 0 || dims.sk == 0 {
        return Err(Error::shape(
            OP,
            format!("q {qs:?}, k {ks:?}: need at least one key and a non-empty head size"),
        ));
    }
    if !(0.0..=1.0).contains(&opts.dropout) {
        return Err(Error::invalid(
            OP,
            format!("dropout {} must be in [0, 1]", opts.dropout),
        ));
    }
    let dropout = (opts.training && opts.dropout > 0.0).then_some((opts.dropout, opts.seed));
    let device = crate::cuda::common_device(OP, &[qt, kt, vt])?;
    let mask = key_padding_mask
        .map(|m| key_mask(m, &dims, qt.dtype(), device))
        .transpose()?;
    let (y, saved) = attention_fwd(qt, kt, vt, mask.as_ref(), dims, dropout)?;
    let (tq, tk, tv) = (qt.clone(), kt.clone(), vt.clone());
    Ok(tape.record(
        y,
        &[q, k, v],
        Box::new(move |g, needs| {
            let need = [needs[0], needs[1], needs[2]];
            let grads = attention_bwd(
                (&tq, &tk, &tv),
                &saved,
                mask.as_ref(),
                g,
                dims,
                dropout,
                need,
            )?;
            Ok(grads.into())
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::attention::dropout_factor;
    use crate::gradcheck::GradCheck;
    use crate::{DType, Device};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        Tensor::randn(shape, 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap()
    }

    /// Attention written out with loops, in f64, optionally with dropout.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[i32]>,
        d: AttentionDims,
        dropout: ProbDropout,
    ) -> Vec<f32> {
        let mut out = vec![0f32; d.b * d.h * d.sq * d.dv];
        for bh in 0..d.b * d.h {
            let b = bh / d.h;
            for i in 0..d.sq {
                let scores: Vec<f64> = (0..d.sk)
                    .map(|j| {
                        if mask.is_some_and(|m| m[b * d.sk + j] == 0) {
                            return f64::NEG_INFINITY;
                        }
                        let dot: f64 = (0..d.dh)
                            .map(|x| {
                                q[(bh * d.sq + i) * d.dh + x] as f64
                                    * k[(bh * d.sk + j) * d.dh + x] as f64
                            })
                            .sum();
                        dot / (d.dh as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d.dv {
                    let mut acc = 0f64;
                    for j in 0..d.sk {
                        let idx = ((bh * d.sq + i) * d.sk + j) as u64;
                        let f = dropout.map_or(1.0, |(p, s)| dropout_factor(p, s, idx)) as f64;
                        acc += e[j] / z * f * v[(bh * d.sk + j) * d.dv + c] as f64;
                    }
                    out[(bh * d.sq + i) * d.dv + c] = acc as f32;
                }
            }
        }
        out
    }

    fn dims(b: usize, h: usize, sq: usize, sk: usize, dh: usize, dv: usize) -> AttentionDims {
        AttentionDims {
            b,
            h,
            sq,
            sk,
            dh,
            dv,
        }
    }

    #[test]
    fn forward_matches_naive_with_mask_and_dropout() {
        let d = dims(2, 3, 5, 6, 4, 3);
        let (q, k, v) = (
            randn(&[2, 3, 5, 4], 1),
            randn(&[2, 3, 6, 4], 2),
            randn(&[2, 3, 6, 3], 3),
        );
        let mask_v = vec![1, 1, 1, 0, 1, 0, 1, 1, 1, 1, 1, 1];
        let mask = Tensor::from_vec(mask_v.clone(), &[2, 6], Device::Cpu).unwrap();
        let tape = Tape::inference();
        let (qv, kv, vv) = (
            tape.constant(q.clone()),
            tape.constant(k.clone()),
            tape.constant(v.clone()),
        );
        let (qf, kf, vf) = (
            q.to_vec_f32().unwrap(),
            k.to_vec_f32().unwrap(),
            v.to_vec_f32().unwrap(),
        );
        for (opts, dropout) in [
            (AttentionOptions::default(), None),
            (
                AttentionOptions {
                    dropout: 0.3,
                    seed: 77,
                    training: true,
                },
                Some((0.3, 77)),
            ),
            (
                // Dropout is off in evaluation whatever the rate.
                AttentionOptions {
                    dropout: 0.3,
                    seed: 77,
                    training: false,
                },
                None,
            ),
        ] {
            let got = scaled_dot_product_attention(&tape, &qv, &kv, &vv, Some(&mask), opts)
                .unwrap()
                .tensor()
                .to_vec_f32()
                .unwrap();
            let want = naive(&qf, &kf, &vf, Some(&mask_v), d, dropout);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "{opts:?}: {g} vs {w}");
            }
        }
        // An f32 mask means the same as the i32 one.
        let fmask = mask.cast(DType::F32).unwrap();
        let a =
            scaled_dot_product_attention(&tape, &qv, &kv, &vv, Some(&fmask), Default::default())
                .unwrap();
        let want = naive(&qf, &kf, &vf, Some(&mask_v), d, None);
        for (g, w) in a.tensor().to_vec_f32().unwrap().iter().zip(&want) {
            assert!((g - w).abs() < 1e-5);
        }
    }

    #[test]
    fn large_heads_match_naive() {
        // 64 x 64 x 64 products take sgemm's multi-threaded path inside the per-head loop.
        let d = dims(1, 3, 64, 64, 64, 64);
        let shape = [1, 3, 64, 64];
        let (q, k, v) = (randn(&shape, 21), randn(&shape, 22), randn(&shape, 23));
        let mut mask_v = vec![1i32; 64];
        mask_v[40..].fill(0);
        let mask = Tensor::from_vec(mask_v.clone(), &[1, 64], Device::Cpu).unwrap();
        let tape = Tape::inference();
        let got = scaled_dot_product_attention(
            &tape,
            &tape.constant(q.clone()),
            &tape.constant(k.clone()),
            &tape.constant(v.clone()),
            Some(&mask),
            Default::default(),
        )
        .unwrap()
        .tensor()
        .to_vec_f32()
        .unwrap();
        let want = naive(
            &q.to_vec_f32().unwrap(),
            &k.to_vec_f32().unwrap(),
            &v.to_vec_f32().unwrap(),
            Some(&mask_v),
            d,
            None,
        );
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "{g} vs {w}");
        }
    }

    #[test]
    fn empty_queries_or_values_give_empty_output() {
        let tape = Tape::recording();
        let q = tape.watch(randn(&[2, 2, 0, 4], 1));
        let k = tape.watch(randn(&[2, 2, 3, 4], 2));
        let v = tape.watch(randn(&[2, 2, 3, 0], 3));
        let opts = AttentionOptions::default();
        let y = scaled_dot_product_attention(&tape, &q, &k, &k, None, opts).unwrap();
        assert_eq!(y.shape(), &[2, 2, 0, 4]);
        let k2 = tape.watch(randn(&[2, 2, 3, 4], 4));
        let y = scaled_dot_product_attention(&tape, &k2, &k2, &v, None, opts).unwrap();
        assert_eq!(y.shape(), &[2, 2, 3, 0]);
        let g = tape
            .backward_with(&y, Tensor::f32(vec![], &[2, 2, 3, 0]).unwrap())
            .unwrap();
        let dk = g.get(&k2).unwrap().to_vec_f32().unwrap();
        assert!(dk.len() == 48 && dk.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn fully_masked_row_is_finite_and_uniform() {
        let (q, k) = (randn(&[1, 1, 2, 4], 1), randn(&[1, 1, 3, 4], 2));
        let v = Tensor::f32(vec![1.0, 2.0, 3.0], &[1, 1, 3, 1]).unwrap();
        let mask = Tensor::from_vec(vec![0i32, 0, 0], &[1, 3], Device::Cpu).unwrap();
        let tape = Tape::recording();
        let (qv, kv, vv) = (tape.watch(q), tape.watch(k), tape.watch(v));
        let y = scaled_dot_product_attention(&tape, &qv, &kv, &vv, Some(&mask), Default::default())
            .unwrap();
        for y in y.tensor().to_vec_f32().unwrap() {
            assert!((y - 2.0).abs() < 1e-6, "{y}");
        }
        let g = tape
            .backward_with(&y, Tensor::f32(vec![1.0, 1.0], &[1, 1, 2, 1]).unwrap())
            .unwrap();
        for var in [&qv, &kv, &vv] {
            assert!(g
                .get(var)
                .unwrap()
                .to_vec_f32()
                .unwrap()
                .iter()
                .all(|x| x.is_finite()));
        }
        assert!(g
            .get(&qv)
            .unwrap()
            .to_vec_f32()
            .unwrap()
            .iter()
            .all(|&x| x == 0.0));
    }

    #[test]
    fn gradients_without_and_with_dropout() {
        let q = randn(&[2, 2, 4, 5], 11);
        let k = randn(&[2, 2, 4, 5], 12);
        let v = randn(&[2, 2, 4, 5], 13);
        let mask = Tensor::from_vec(vec![1i32, 1, 0, 1, 1, 1, 1, 1], &[2, 4], Device::Cpu).unwrap();
        for opts in [
            AttentionOptions::default(),
            AttentionOptions {
                dropout: 0.25,
                seed: 5,
                training: true,
            },
        ] {
            for m in [None, Some(&mask)] {
                GradCheck::default()
                    .run(&[q.clone(), k.clone(), v.clone()], &[0, 1, 2], |t, x| {
                        scaled_dot_product_attention(t, &x[0], &x[1], &x[2], m, opts)
                    })
                    .unwrap();
            }
        }
        // Cross-attention shapes: Sq != Sk, Dv != Dh.
        GradCheck::default()
            .run(
                &[
                    randn(&[1, 2, 3, 4], 1),
                    randn(&[1, 2, 5, 4], 2),
                    randn(&[1, 2, 5, 2], 3),
                ],
                &[0, 1, 2],
                |t, x| {
                    scaled_dot_product_attention(t, &x[0], &x[1], &x[2], None, Default::default())
                },
            )
            .unwrap();
    }

    #[test]
    fn errors_name_shapes_and_values() {
        let tape = Tape::inference();
        let q = tape.constant(randn(&[2, 2, 4, 8], 1));
        let k = tape.constant(randn(&[2, 2, 4, 8], 2));
        let k_bad = tape.constant(randn(&[2, 2, 4, 6], 2));
        let v_bad = tape.constant(randn(&[2, 2, 3, 8], 3));
        let opts = AttentionOptions::default();
        let err = scaled_dot_product_attention(&tape, &q, &k_bad, &k, None, opts)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[2, 2, 4, 8]") && err.contains("[2, 2, 4, 6]"),
            "{err}"
        );
        assert!(scaled_dot_product_attention(&tape, &q, &k, &v_bad, None, opts).is_err());
        let m_bad = Tensor::from_vec(vec![1i32; 6], &[2, 3], Device::Cpu).unwrap();
        let err = scaled_dot_product_attention(&tape, &q, &k, &k, Some(&m_bad), opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[2, 3]") && err.contains("[2, 4]"), "{err}");
        let additive =
            Tensor::f32(vec![0.0, 0.0, -10000.0, 0.0, 0.0, 0.0, 0.0, 0.0], &[2, 4]).unwrap();
        let err = scaled_dot_product_attention(&tape, &q, &k, &k, Some(&additive), opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("key_padding_mask[0, 2]"), "{err}");
        let bad_p = AttentionOptions {
            dropout: 1.5,
            ..opts
        };
        assert!(scaled_dot_product_attention(&tape, &q, &k, &k, None, bad_p).is_err());
        let r3 = tape.constant(randn(&[2, 4, 8], 1));
        assert!(scaled_dot_product_attention(&tape, &r3, &k, &k, None, opts).is_err());
    }
}
