//! Scaled dot-product attention, fused per (batch, head):
//! `out = dropout(softmax(q k^T / sqrt(Dh) + mask)) v`.
//!
//! Each (batch, head) pair is one independent problem: two sgemm calls around a row softmax,
//! run in parallel over `B * H` with rayon. Only the probabilities (before dropout) are kept for
//! backward; the dropout mask is recomputed from its seed, since it is a pure function of
//! `(seed, element index)`.
//!
//! Padding: `key_padding_mask[b, j] == 0` removes key `j` from every query of batch item `b`.
//! Its score is replaced by `MASKED_SCORE`, a large finite negative, rather than `-inf`: a row
//! whose keys are all padding then gets uniform weights over all keys (as with BERT's additive
//! `finfo.min` mask) instead of `0/0 = NaN`, and the masked scores do not depend on `q` or `k`,
//! so they get no gradient.
//!
//! Dropout acts on the probabilities with the same rule as `ops::dropout`: element `i` of the
//! `[B, H, Sq, Sk]` probability tensor (row-major) is kept iff `rng::uniform_at(seed, i) >= p`,
//! and kept values are scaled by `1 / (1 - p)`.

use rayon::prelude::*;

use crate::backend::gemm::sgemm;
use crate::backend::softmax::{softmax_backward_row_cpu, softmax_row_cpu};
use crate::{rng, DType, Error, Result, Tape, Tensor, Var};

/// Score given to padded keys before the softmax.
pub const MASKED_SCORE: f32 = -1e30;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionOptions {
    /// Probability of dropping an attention weight (used only when `training`).
    pub dropout: f32,
    /// Stream of the dropout mask; use a fresh one per step and layer.
    pub seed: u64,
    pub training: bool,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        AttentionOptions {
            dropout: 0.0,
            seed: 0,
            training: false,
        }
    }
}

/// Sizes of one attention call: q is `[b, h, sq, dh]`, k `[b, h, sk, dh]`, v `[b, h, sk, dv]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    pub b: usize,
    pub h: usize,
    pub sq: usize,
    pub sk: usize,
    pub dh: usize,
    pub dv: usize,
}

/// Dropout of the attention probabilities: `Some((p, seed))` when active.
pub type ProbDropout = Option<(f32, u64)>;

/// Multiplier applied to probability `index` by dropout: 0 when dropped, `1 / (1 - p)` when kept.
#[inline]
pub fn dropout_factor(p: f32, seed: u64, index: u64) -> f32 {
    if rng::uniform_at(seed, index) >= p {
        1.0 / (1.0 - p)
    } else {
        0.0
    }
}

/// Forward for all (batch, head) pairs. `keep[b * sk + j]` says whether key `j` of batch item
/// `b` is attended (None: all are). Fills `probs` (`[b, h, sq, sk]`, before dropout) and `out`
/// (`[b, h, sq, dv]`).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_cpu(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    keep: Option<&[bool]>,
    dims: AttentionDims,
    dropout: ProbDropout,
    probs: &mut [f32],
    out: &mut [f32],
) -> Result<()> {
    let AttentionDims {
        h, sq, sk, dh, dv, ..
    } = dims;
    if dims.b * h * sq * sk * dh * dv == 0 {
        // Some dimension is empty: there is nothing to compute (and no chunk size of zero to
        // hand to rayon). The caller rejects Sk = 0 and Dh = 0; otherwise the output is empty.
        return Ok(());
    }
    let scale = 1.0 / (dh as f32).sqrt();
    probs
        .par_chunks_mut(sq * sk)
        .zip(out.par_chunks_mut(sq * dv))
        .enumerate()
        .try_for_each(|(bh, (p, o))| -> Result<()> {
            let (qs, ks, vs) = (
                &q[bh * sq * dh..(bh + 1) * sq * dh],
                &k[bh * sk * dh..(bh + 1) * sk * dh],
                &v[bh * sk * dv..(bh + 1) * sk * dv],
            );
            let keep = keep.map(|m| &m[(bh / h) * sk..(bh / h + 1) * sk]);
            sgemm(false, true, sq, sk, dh, scale, qs, ks, 0.0, p)?;
            let mut row_buf = vec![0f32; sk];
            for row in p.chunks_mut(sk) {
                if let Some(keep) = keep {
                    for (s, &kept) in row.iter_mut().zip(keep) {
                        if !kept {
                            *s = MASKED_SCORE;
                        }
                    }
                }
                row_buf.copy_from_slice(row);
                softmax_row_cpu(&row_buf, row);
            }
            match dropout {
                Some((rate, seed)) => {
                    let base = (bh * sq * sk) as u64;
                    let dropped: Vec<f32> = p
                        .iter()
                        .enumerate()
                        .map(|(i, &x)| x * dropout_factor(rate, seed, base + i as u64))
                        .collect();
                    sgemm(false, false, sq, dv, sk, 1.0, &dropped, vs, 0.0, o)
                }
                None => sgemm(false, false, sq, dv, sk, 1.0, p, vs, 0.0, o),
            }
        })
}

/// Backward for all (batch, head) pairs from the saved probabilities (before dropout) and the
/// upstream `dout`. Fills whichever of `dq`, `dk`, `dv_out` are given.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_cpu(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    dout: &[f32],
    keep: Option<&[bool]>,
    dims: AttentionDims,
    dropout: ProbDropout,
    dq: Option<&mut [f32]>,
    dk: Option<&mut [f32]>,
    dv_out: Option<&mut [f32]>,
) -> Result<()> {
    let AttentionDims {
        b,
        h,
        sq,
        sk,
        dh,
        dv,
    } = dims;
    if b * h * sq * sk * dh * dv == 0 {
        // Some dimension is empty: there is nothing to compute (and no chunk size of zero to
        // hand to rayon). The caller rejects Sk = 0 and Dh = 0; otherwise the output is empty.
        return Ok(());
    }
    let bh_count = b * h;
    let scale = 1.0 / (dh as f32).sqrt();
    let (dqs, dks, dvs) = (
        split_per_head(dq, sq * dh, bh_count),
        split_per_head(dk, sk * dh, bh_count),
        split_per_head(dv_out, sk * dv, bh_count),
    );
    dqs.into_par_iter()
        .zip(dks)
        .zip(dvs)
        .enumerate()
        .try_for_each(|(bh, ((dq, dk), dvv))| -> Result<()> {
            let (qs, ks, vs) = (
                &q[bh * sq * dh..(bh + 1) * sq * dh],
                &k[bh * sk * dh..(bh + 1) * sk * dh],
                &v[bh * sk * dv..(bh + 1) * sk * dv],
            );
            let p = &probs[bh * sq * sk..(bh + 1) * sq * sk];
            let g = &dout[bh * sq * dv..(bh + 1) * sq * dv];
            let keep = keep.map(|m| &m[(bh / h) * sk..(bh / h + 1) * sk]);
            let base = (bh * sq * sk) as u64;
            let factor = |i: usize| match dropout {
                Some((rate, seed)) => dropout_factor(rate, seed, base + i as u64),
                None => 1.0,
            };
            if let Some(dvv) = dvv {
                // dV = dropout(P)^T dOut
                let pd: Vec<f32> = match dropout {
                    Some(_) => p.iter().enumerate().map(|(i, &x)| x * factor(i)).collect(),
                    None => p.to_vec(),
                };
                sgemm(true, false, sk, dv, sq, 1.0, &pd, g, 0.0, dvv)?;
            }
            if dq.is_none() && dk.is_none() {
                return Ok(());
            }
            // dP = (dOut V^T) * dropout factor, then through the softmax row by row.
            let mut dp = vec![0f32; sq * sk];
            sgemm(false, true, sq, sk, dv, 1.0, g, vs, 0.0, &mut dp)?;
            if dropout.is_some() {
                dp.iter_mut().enumerate().for_each(|(i, d)| *d *= factor(i));
            }
            let mut ds = vec![0f32; sq * sk];
            for ((ds_row, dp_row), p_row) in ds.chunks_mut(sk).zip(dp.chunks(sk)).zip(p.chunks(sk))
            {
                softmax_backward_row_cpu(p_row, dp_row, ds_row);
                if let Some(keep) = keep {
                    // Masked scores are constants: no gradient flows through them.
                    for (d, &kept) in ds_row.iter_mut().zip(keep) {
                        if !kept {
                            *d = 0.0;
                        }
                    }
                }
            }
            // S = scale * Q K^T  =>  dQ = scale * dS K,  dK = scale * dS^T Q.
            if let Some(dq) = dq {
                sgemm(false, false, sq, dh, sk, scale, &ds, ks, 0.0, dq)?;
            }
            if let Some(dk) = dk {
                sgemm(true, false, sk, dh, sq, scale, &ds, qs, 0.0, dk)?;
            }
            Ok(())
        })
}

/// One chunk per (batch, head) of an optional gradient buffer (all `None` when absent), so the
/// three gradients can be zipped together.
fn split_per_head(buf: Option<&mut [f32]>, len: usize, count: usize) -> Vec<Option<&mut [f32]>> {
    match buf {
        Some(buf) => buf.chunks_mut(len).map(Some).collect(),
        None => (0..count).map(|_| None).collect(),
    }
}

/// Fails unless `mask` has the shape of a `[B, S]` padding mask.
pub(crate) fn check_key_mask_shape(mask: &Tensor, b: usize, sk: usize) -> Result<()> {
    const OP: &str = "scaled_dot_product_attention";
    if mask.shape() != [b, sk] {
        return Err(Error::shape(
            OP,
            format!(
                "key_padding_mask has shape {:?}, expected [batch, keys] = [{b}, {sk}]",
                mask.shape()
            ),
        ));
    }
    Ok(())
}

/// Reads a `[B, S]` padding mask (i32 or float; 1 = attend, 0 = padding) into booleans.
pub(crate) fn read_key_mask(mask: &Tensor, b: usize, sk: usize) -> Result<Vec<bool>> {
    const OP: &str = "scaled_dot_product_attention";
    check_key_mask_shape(mask, b, sk)?;
    let values: Vec<f32> = match mask.dtype() {
        DType::I32 => mask.read_i32()?.iter().map(|&v| v as f32).collect(),
        _ => mask.to_vec_f32()?,
    };
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if v == 1.0 {
                return Ok(true);
            }
            if v == 0.0 {
                return Ok(false);
            }
            Err(Error::invalid(
                OP,
                format!(
                    "key_padding_mask[{}, {}] = {v}; expected 1 (attend) or 0 (padding), \
                     not an additive mask",
                    i / sk,
                    i % sk
                ),
            ))
        })
        .collect()
}

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
    match crate::cuda::common_device(OP, &[qt, kt, vt])? {
        crate::Device::Cpu => crate::cuda::cpu_only(OP, key_padding_mask)?,
        d => {
            return crate::on_cuda!(d, {
                // The mask becomes an additive mask on the GPU once per mask tensor, not once
                // per layer (`cuda::attention::padding_bias`).
                let bias = key_padding_mask
                    .map(|m| {
                        crate::cuda::attention::padding_bias(m, dims.b, dims.sk, qt.dtype(), d)
                    })
                    .transpose()?;
                crate::cuda::attention::attention(tape, (q, k, v), bias, dims.dh, dropout)
            });
        }
    }
    let keep = key_padding_mask
        .map(|m| read_key_mask(m, dims.b, dims.sk))
        .transpose()?;

    let mut probs = vec![0f32; dims.b * dims.h * dims.sq * dims.sk];
    let mut out = vec![0f32; dims.b * dims.h * dims.sq * dims.dv];
    attention_forward_cpu(
        &qt.read_f32()?,
        &kt.read_f32()?,
        &vt.read_f32()?,
        keep.as_deref(),
        dims,
        dropout,
        &mut probs,
        &mut out,
    )?;
    let out_shape = [dims.b, dims.h, dims.sq, dims.dv];
    let y = Tensor::f32(out, &out_shape)?;
    let (sq_t, sk_t, sv_t) = (qt.clone(), kt.clone(), vt.clone());
    Ok(tape.record(
        y,
        &[q, k, v],
        Box::new(move |g, needs| {
            let (qv, kv, vv) = (sq_t.to_vec_f32()?, sk_t.to_vec_f32()?, sv_t.to_vec_f32()?);
            let mut dq = needs[0].then(|| vec![0f32; qv.len()]);
            let mut dk = needs[1].then(|| vec![0f32; kv.len()]);
            let mut dv = needs[2].then(|| vec![0f32; vv.len()]);
            attention_backward_cpu(
                &qv,
                &kv,
                &vv,
                &probs,
                &g.read_f32()?,
                keep.as_deref(),
                dims,
                dropout,
                dq.as_deref_mut(),
                dk.as_deref_mut(),
                dv.as_deref_mut(),
            )?;
            Ok(vec![
                dq.map(|d| Tensor::f32(d, sq_t.shape())).transpose()?,
                dk.map(|d| Tensor::f32(d, sk_t.shape())).transpose()?,
                dv.map(|d| Tensor::f32(d, sv_t.shape())).transpose()?,
            ])
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::GradCheck;
    use crate::Device;

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
