//! The CUDA arm of `scaled_dot_product_attention`, composed of ops that have CUDA arms:
//! `batched_matmul` (cuBLASLt), `scale`, a broadcast `add` of the padding mask, `softmax`,
//! `dropout` and `batched_matmul`. **Compiled, not run on a GPU.**
//!
//! Unlike the fused CPU op it keeps the scores as well as the probabilities for the backward
//! (each part records its own backward on the tape); a fused kernel (flash attention) is the
//! later optimisation. Agreement with the CPU twin:
//! - padding: the CPU *replaces* a padded key's score by `MASKED_SCORE` (-1e30); here the mask
//!   adds -1e30, which in f32 (and bf16) rounds to -1e30 itself for any score below ~1e22, so
//!   the softmax sees the same values (and a row of padding only gets uniform weights); the
//!   masked scores get no gradient since their probabilities are exactly 0 (or uniform and
//!   constant);
//! - dropout: the same rule on the same `[B, H, Sq, Sk]` row-major indices, so the same mask;
//! - scale: applied after the product rather than as the product's alpha: a rounding apart.

use crate::ops::attention::MASKED_SCORE;
use crate::ops::dropout::dropout;
use crate::ops::elementwise::{add, scale};
use crate::ops::matmul::batched_matmul;
use crate::ops::softmax::softmax;
use crate::{Result, Tape, Tensor, Var};

/// `softmax(q k^T / sqrt(dh) + mask) v` with optional dropout on the probabilities; shapes,
/// mask (`keep[b * sk + j]`) and options validated by the caller.
pub(crate) fn attention(
    tape: &Tape,
    (q, k, v): (&Var, &Var, &Var),
    keep: Option<&[bool]>,
    (b, sk, dh): (usize, usize, usize),
    drop: Option<(f32, u64)>,
) -> Result<Var> {
    let scores = batched_matmul(tape, q, k, false, true)?;
    let scores = scale(tape, &scores, 1.0 / (dh as f32).sqrt())?;
    let scores = match keep {
        Some(keep) => {
            let bias: Vec<f32> = keep
                .iter()
                .map(|&k| if k { 0.0 } else { MASKED_SCORE })
                .collect();
            let bias = Tensor::from_slice(&bias, &[b, 1, 1, sk], q.tensor().device())?
                .cast(q.tensor().dtype())?;
            add(tape, &scores, &tape.constant(bias))?
        }
        None => scores,
    };
    let probs = softmax(tape, &scores)?;
    let probs = match drop {
        Some((p, seed)) => dropout(tape, &probs, p, seed, true)?,
        None => probs,
    };
    batched_matmul(tape, &probs, v, false, false)
}
