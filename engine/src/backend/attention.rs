//! Scaled dot-product attention at the backend level: [`attention_fwd`] and [`attention_bwd`],
//! `out = dropout(softmax(q k^T / sqrt(Dh) + mask)) v`, dispatched by device, and
//! [`key_mask`], the padding mask in the form each arm reads.
//!
//! - The CPU arm is fused per (batch, head): two sgemm calls around a row softmax, run in
//!   parallel over `B * H` with rayon, keeping only the probabilities (before dropout) for the
//!   backward. It stays fused: each (batch, head) keeps its scores in cache instead of
//!   writing and reading back whole `[B, H, Sq, Sk]` tensors between steps, and its results
//!   are the ones the engine's tests and PyTorch fixtures pin.
//! - Every other device runs the composition of backend primitives ([`composed_fwd`],
//!   [`composed_bwd`]): `matmul_fwd` (batched), `scale_fwd`, a broadcast `binary_fwd` add of
//!   the additive mask, `softmax_fwd`, `dropout_fwd`, `matmul_fwd`, and their backward
//!   functions in reverse. On a GPU each is a kernel (`crate::cuda`); the composition is
//!   written once, here, and runs on the CPU too, where the tests hold it to the fused arm.
//!
//! Padding: `key_padding_mask[b, j] == 0` removes key `j` from every query of batch item `b`.
//! The CPU arm replaces its score by [`MASKED_SCORE`], a large finite negative, rather than
//! `-inf`: a row whose keys are all padding then gets uniform weights over all keys (as with
//! BERT's additive `finfo.min` mask) instead of `0/0 = NaN`, and the masked scores do not
//! depend on `q` or `k`, so they get no gradient. The composed arm adds `MASKED_SCORE`
//! instead, which in f32 (and bf16) rounds to `MASKED_SCORE` itself for any score below ~1e22,
//! so the softmax sees the same values; a padded key's probability is exactly 0 (or uniform
//! and constant in a row of padding).
//!
//! Dropout acts on the probabilities with the rule of `crate::backend::dropout`: element `i`
//! of the `[B, H, Sq, Sk]` probability tensor (row-major) is kept iff
//! `rng::uniform_at(seed, i) >= p`, and kept values are scaled by `1 / (1 - p)`; the mask is
//! recomputed from the seed in the backward. The composed arm scales the scores after the
//! product rather than as the product's alpha: a rounding apart from the CPU arm.

use rayon::prelude::*;

use super::dropout::{dropout_bwd, dropout_fwd};
use super::elementwise::{binary_fwd, scale_fwd, to_compute_dtype};
use super::gemm::{sgemm, sgemm_serial, SERIAL_GEMM_AVAILABLE};
use super::matmul::{matmul_bwd, matmul_fwd};
use super::params::{AttentionDims, ProbDropout};
use super::softmax::{softmax_backward_row_cpu, softmax_bwd, softmax_fwd, softmax_row_cpu};
use super::{scratch, BinaryOp, ProductDims, SoftmaxKind};
use crate::{rng, DType, Device, Error, Result, Tensor};

/// The op's name, for errors.
const OP: &str = "scaled_dot_product_attention";

/// Score given to padded keys before the softmax.
pub const MASKED_SCORE: f32 = -1e30;

/// A `[B, Sk]` key padding mask in the form the arm of one device reads.
#[derive(Debug, Clone)]
pub enum KeyMask {
    /// The CPU arm: whether key `j` of batch item `b` is attended, at `b * Sk + j`.
    Keep(Vec<bool>),
    /// The composed arm: the additive mask `[B, 1, 1, Sk]` (0 or [`MASKED_SCORE`]) in the
    /// compute dtype, on the device.
    Bias(Tensor),
}

/// The padding mask `mask` (`[B, Sk]`, i32 or float, 1 = attend, 0 = padding; shape and values
/// checked) in the form the attention arm of `device` reads, for activations of `dtype`.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn key_mask(
    mask: &Tensor,
    dims: &AttentionDims,
    dtype: DType,
    device: Device,
) -> Result<KeyMask> {
    match device {
        Device::Cpu => {
            crate::cuda::cpu_only(OP, [mask])?;
            Ok(KeyMask::Keep(read_key_mask(mask, dims.b, dims.sk)?))
        }
        // Made once per mask tensor, not once per layer (`cuda::attention::padding_bias`).
        d @ Device::Cuda(_) => crate::on_cuda!(
            d,
            crate::cuda::attention::padding_bias(mask, dims.b, dims.sk, dtype, d)
                .map(KeyMask::Bias)
        ),
    }
}

/// The additive form of a read mask: 0 where attended, [`MASKED_SCORE`] where padded.
pub fn additive_mask(keep: &[bool]) -> Vec<f32> {
    keep.iter()
        .map(|&k| if k { 0.0 } else { MASKED_SCORE })
        .collect()
}

/// What [`attention_fwd`] keeps for [`attention_bwd`].
#[derive(Debug, Clone)]
pub struct AttentionSaved {
    /// The probabilities `[B, H, Sq, Sk]`, before dropout.
    probs: Tensor,
    /// The composed arm's probabilities after dropout (the second product's operand).
    dropped: Option<Tensor>,
}

/// `dropout(softmax(q k^T / sqrt(Dh) + mask)) v` for `q [B, H, Sq, Dh]`, `k [B, H, Sk, Dh]`,
/// `v [B, H, Sk, Dv]` (shapes and options validated by the caller; `mask` from [`key_mask`]
/// for their device): `[B, H, Sq, Dv]` and what the backward needs.
pub fn attention_fwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&KeyMask>,
    dims: AttentionDims,
    dropout: ProbDropout,
) -> Result<(Tensor, AttentionSaved)> {
    match crate::cuda::common_device(OP, &[q, k, v])? {
        Device::Cpu => {
            let keep = mask.map(keep_of).transpose()?;
            let mut probs = vec![0f32; dims.b * dims.h * dims.sq * dims.sk];
            let mut out = vec![0f32; dims.b * dims.h * dims.sq * dims.dv];
            attention_forward_cpu(
                (&q.read_f32()?, &k.read_f32()?, &v.read_f32()?),
                keep,
                dims,
                dropout,
                &mut probs,
                &mut out,
            )?;
            let saved = AttentionSaved {
                probs: Tensor::f32(probs, &[dims.b, dims.h, dims.sq, dims.sk])?,
                dropped: None,
            };
            Ok((
                Tensor::f32(out, &[dims.b, dims.h, dims.sq, dims.dv])?,
                saved,
            ))
        }
        _ => composed_fwd(q, k, v, mask.map(bias_of).transpose()?, dims, dropout),
    }
}

/// The gradients of [`attention_fwd`] with respect to `q`, `k` and `v` from the output
/// gradient `g`, each only when `need` asks for it.
pub fn attention_bwd(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    saved: &AttentionSaved,
    mask: Option<&KeyMask>,
    g: &Tensor,
    dims: AttentionDims,
    dropout: ProbDropout,
    need: [bool; 3],
) -> Result<[Option<Tensor>; 3]> {
    match crate::cuda::common_device(OP, &[q, k, v, g])? {
        Device::Cpu => {
            let keep = mask.map(keep_of).transpose()?;
            let mut dq = need[0].then(|| vec![0f32; q.elem_count()]);
            let mut dk = need[1].then(|| vec![0f32; k.elem_count()]);
            let mut dv = need[2].then(|| vec![0f32; v.elem_count()]);
            attention_backward_cpu(
                (&q.read_f32()?, &k.read_f32()?, &v.read_f32()?),
                &saved.probs.read_f32()?,
                &g.read_f32()?,
                keep,
                dims,
                dropout,
                [dq.as_deref_mut(), dk.as_deref_mut(), dv.as_deref_mut()],
            )?;
            Ok([
                dq.map(|d| Tensor::f32(d, q.shape())).transpose()?,
                dk.map(|d| Tensor::f32(d, k.shape())).transpose()?,
                dv.map(|d| Tensor::f32(d, v.shape())).transpose()?,
            ])
        }
        _ => composed_bwd((q, k, v), saved, g, dims, dropout, need),
    }
}

/// The CPU arm's mask.
fn keep_of(mask: &KeyMask) -> Result<&[bool]> {
    match mask {
        KeyMask::Keep(keep) => Ok(keep),
        KeyMask::Bias(_) => Err(Error::invalid(
            OP,
            "the key mask was made for a GPU, the tensors are on the CPU; make it with \
             key_mask for the tensors' device",
        )),
    }
}

/// The composed arm's mask.
fn bias_of(mask: &KeyMask) -> Result<&Tensor> {
    match mask {
        KeyMask::Bias(bias) => Ok(bias),
        KeyMask::Keep(_) => Err(Error::invalid(
            OP,
            "the key mask was made for the CPU, the tensors are on a GPU; make it with \
             key_mask for the tensors' device",
        )),
    }
}

/// The forward as a composition of backend primitives, on the tensors' device.
pub fn composed_fwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    dims: AttentionDims,
    dropout: ProbDropout,
) -> Result<(Tensor, AttentionSaved)> {
    let scores = matmul_fwd(q, k, &scores_dims(q, k)?)?;
    let scores = scale_fwd(&scores, score_scale(dims))?;
    let scores = match bias {
        Some(bias) => binary_fwd(BinaryOp::Add, &scores, bias)?,
        None => scores,
    };
    let probs = softmax_fwd(&scores, SoftmaxKind::Softmax)?;
    let dropped = match dropout {
        Some((p, seed)) => {
            check_composed_rate(p)?;
            Some(dropout_fwd(&probs, p, seed)?)
        }
        None => None,
    };
    let weights = dropped.as_ref().unwrap_or(&probs);
    let out = matmul_fwd(weights, v, &values_dims(weights, v)?)?;
    Ok((out, AttentionSaved { probs, dropped }))
}

/// The backward of [`composed_fwd`]: the primitives' backward functions in reverse order.
pub fn composed_bwd(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    saved: &AttentionSaved,
    g: &Tensor,
    dims: AttentionDims,
    dropout: ProbDropout,
    need: [bool; 3],
) -> Result<[Option<Tensor>; 3]> {
    let probs = &saved.probs;
    let weights = saved.dropped.as_ref().unwrap_or(probs);
    let need_scores = need[0] || need[1];
    let [dweights, dv] = matmul_bwd(
        weights,
        v,
        g,
        &values_dims(weights, v)?,
        [need_scores, need[2]],
    )?;
    let Some(dweights) = dweights else {
        return Ok([None, None, dv]);
    };
    let dprobs = match dropout {
        Some((p, seed)) => dropout_bwd(&dweights, p, seed, probs.dtype())?,
        None => dweights,
    };
    let dscores = softmax_bwd(probs, &dprobs, SoftmaxKind::Softmax)?;
    // The mask is a constant: the scores' gradient passes the addition unchanged.
    let dscores = scale_fwd(
        &to_compute_dtype(&dscores, probs.dtype())?,
        score_scale(dims),
    )?;
    let [dq, dk] = matmul_bwd(q, k, &dscores, &scores_dims(q, k)?, [need[0], need[1]])?;
    Ok([dq, dk, dv])
}

/// `1 / sqrt(Dh)`.
fn score_scale(dims: AttentionDims) -> f32 {
    1.0 / (dims.dh as f32).sqrt()
}

/// The product `q k^T`, batched over `[B, H]`.
fn scores_dims(q: &Tensor, k: &Tensor) -> Result<ProductDims> {
    ProductDims::new("batched_matmul", q.shape(), k.shape(), false, true)
}

/// The product `weights v`, batched over `[B, H]`.
fn values_dims(weights: &Tensor, v: &Tensor) -> Result<ProductDims> {
    ProductDims::new("batched_matmul", weights.shape(), v.shape(), false, false)
}

/// The dropout kernels take a rate below 1 (the CPU arm also takes 1: everything dropped).
fn check_composed_rate(p: f32) -> Result<()> {
    if (0.0..1.0).contains(&p) {
        return Ok(());
    }
    Err(Error::invalid(
        "dropout",
        format!("drop probability {p} must be in [0, 1)"),
    ))
}

// ---------------------------------------------------------------------------------------------
// The CPU arm: fused per (batch, head), over slices
// ---------------------------------------------------------------------------------------------

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
pub fn attention_forward_cpu(
    (q, k, v): (&[f32], &[f32], &[f32]),
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
    let product = head_product(dims.b * h);
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
            product(false, true, sq, sk, dh, scale, qs, ks, 0.0, p)?;
            let mut row_buf = scratch::take(sk);
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
                    let mut dropped = scratch::take(sq * sk);
                    for (i, (d, &x)) in dropped.iter_mut().zip(p.iter()).enumerate() {
                        *d = x * dropout_factor(rate, seed, base + i as u64);
                    }
                    product(false, false, sq, dv, sk, 1.0, &dropped, vs, 0.0, o)
                }
                None => product(false, false, sq, dv, sk, 1.0, p, vs, 0.0, o),
            }
        })
}

/// Backward for all (batch, head) pairs from the saved probabilities (before dropout) and the
/// upstream `dout`. Fills whichever of `dq`, `dk`, `dv_out` are given.
pub fn attention_backward_cpu(
    (q, k, v): (&[f32], &[f32], &[f32]),
    probs: &[f32],
    dout: &[f32],
    keep: Option<&[bool]>,
    dims: AttentionDims,
    dropout: ProbDropout,
    [dq, dk, dv_out]: [Option<&mut [f32]>; 3],
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
    let product = head_product(bh_count);
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
                match dropout {
                    Some(_) => {
                        let mut pd = scratch::take(sq * sk);
                        for (i, (d, &x)) in pd.iter_mut().zip(p).enumerate() {
                            *d = x * factor(i);
                        }
                        product(true, false, sk, dv, sq, 1.0, &pd, g, 0.0, dvv)?;
                    }
                    None => product(true, false, sk, dv, sq, 1.0, p, g, 0.0, dvv)?,
                }
            }
            if dq.is_none() && dk.is_none() {
                return Ok(());
            }
            // dP = (dOut V^T) * dropout factor, then through the softmax row by row.
            let mut dp = scratch::take(sq * sk);
            product(false, true, sq, sk, dv, 1.0, g, vs, 0.0, &mut dp)?;
            if dropout.is_some() {
                dp.iter_mut().enumerate().for_each(|(i, d)| *d *= factor(i));
            }
            let mut ds = scratch::take(sq * sk);
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
                product(false, false, sq, dh, sk, scale, &ds, ks, 0.0, dq)?;
            }
            if let Some(dk) = dk {
                product(true, false, sk, dh, sq, scale, &ds, qs, 0.0, dk)?;
            }
            Ok(())
        })
}

/// The product the per-(batch, head) tasks run: on the calling thread when there are at least
/// as many heads as threads (the heads already fill the pool; a threaded product inside each
/// would only add rayon's hand-offs), else threaded.
type HeadProduct =
    fn(bool, bool, usize, usize, usize, f32, &[f32], &[f32], f32, &mut [f32]) -> Result<()>;

fn head_product(heads: usize) -> HeadProduct {
    if SERIAL_GEMM_AVAILABLE && heads >= rayon::current_num_threads() {
        sgemm_serial
    } else {
        sgemm
    }
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
pub fn check_key_mask_shape(mask: &Tensor, b: usize, sk: usize) -> Result<()> {
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
pub fn read_key_mask(mask: &Tensor, b: usize, sk: usize) -> Result<Vec<bool>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        Tensor::randn(shape, 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap()
    }

    fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
        assert_eq!(got.shape(), want.shape(), "{what}");
        let (g, w) = (got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
        for (i, (g, w)) in g.iter().zip(&w).enumerate() {
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    /// The composition of backend primitives (the arm a GPU runs), run on the CPU, agrees with
    /// the fused CPU arm, forward and backward, with and without padding and dropout.
    #[test]
    fn composed_arm_matches_the_fused_arm() {
        let dims = AttentionDims {
            b: 2,
            h: 2,
            sq: 3,
            sk: 5,
            dh: 4,
            dv: 3,
        };
        let (q, k, v) = (
            randn(&[2, 2, 3, 4], 1),
            randn(&[2, 2, 5, 4], 2),
            randn(&[2, 2, 5, 3], 3),
        );
        let g = randn(&[2, 2, 3, 3], 4);
        let keep = vec![true, true, false, true, false, true, true, true, true, true];
        let bias = Tensor::f32(additive_mask(&keep), &[2, 1, 1, 5]).unwrap();
        for dropout in [None, Some((0.3f32, 9u64))] {
            for masked in [false, true] {
                let case = format!("dropout {dropout:?}, masked {masked}");
                let keep_mask = masked.then(|| KeyMask::Keep(keep.clone()));
                let (want, saved) =
                    attention_fwd(&q, &k, &v, keep_mask.as_ref(), dims, dropout).unwrap();
                let (got, csaved) =
                    composed_fwd(&q, &k, &v, masked.then_some(&bias), dims, dropout).unwrap();
                assert_close(&case, &got, &want, 1e-5);
                let need = [true, true, true];
                let want = attention_bwd(
                    (&q, &k, &v),
                    &saved,
                    keep_mask.as_ref(),
                    &g,
                    dims,
                    dropout,
                    need,
                )
                .unwrap();
                let got = composed_bwd((&q, &k, &v), &csaved, &g, dims, dropout, need).unwrap();
                for (name, (got, want)) in ["dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
                    let (got, want) = (got.as_ref().unwrap(), want.as_ref().unwrap());
                    assert_close(&format!("{case}: {name}"), got, want, 1e-5);
                }
                // Only what is asked for is computed.
                let only_v = composed_bwd(
                    (&q, &k, &v),
                    &csaved,
                    &g,
                    dims,
                    dropout,
                    [false, false, true],
                )
                .unwrap();
                assert!(only_v[0].is_none() && only_v[1].is_none() && only_v[2].is_some());
            }
        }
    }

    /// A mask made for one arm is refused by the other, with a message saying what to do.
    #[test]
    fn a_mask_for_the_wrong_arm_is_an_error() {
        let bias = KeyMask::Bias(Tensor::f32(vec![0.0; 2], &[1, 1, 1, 2]).unwrap());
        let e = keep_of(&bias).unwrap_err().to_string();
        assert!(
            e.contains("made for a GPU") && e.contains("key_mask"),
            "{e}"
        );
        let keep = KeyMask::Keep(vec![true, false]);
        let e = bias_of(&keep).unwrap_err().to_string();
        assert!(e.contains("made for the CPU"), "{e}");
        assert_eq!(additive_mask(&[true, false]), vec![0.0, MASKED_SCORE]);
    }
}
