//! `linear` in bf16 products on the CPU: how a model with bf16 weights multiplies where the
//! CPU has AVX512_BF16 ([`super::gemm::bf16_products_active`]). A frozen teacher runs the
//! forward; a student computing in bf16 (`activations = "bf16"`, whose working copy of the
//! weights is bf16) runs the forward and both gradient products here too, as a GPU's bf16
//! matmul does: each product of two bf16 values (f32 operands rounded to bf16, to nearest
//! even) summed in f32 (`vdpbf16ps`), instead of widening the bf16 weights to f32 for
//! `sgemm` in every step. The f32 functions of `super::matmul` are the reference; the tests
//! below compare with them on bf16-rounded operands.

use half::bf16;
use rayon::prelude::*;

use super::gemm::{gemm_bf16, Half, SERIAL_MNK};
use super::matmul::{column_sums_cpu, LinearGrads};
use crate::{Error, Result};

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got < want {
        return Err(Error::shape(
            "linear",
            format!("{what} has {got} elements, the product needs {want}"),
        ));
    }
    Ok(())
}

/// `out[rows, out_f] = x[rows, in_f] W^T + bias` with `W` bf16 `[out_f, in_f]`, in bf16
/// products with f32 accumulation (`x` rounded to bf16 when it is f32).
pub fn linear_forward_bf16_cpu(
    x: Half,
    weight: &[bf16],
    bias: Option<&[f32]>,
    rows: usize,
    in_f: usize,
    out_f: usize,
    out: &mut [f32],
) -> Result<()> {
    let parallel = rows * out_f * in_f >= SERIAL_MNK;
    gemm_bf16(
        rows,
        out_f,
        in_f,
        x,
        Half::Bf16(weight),
        true,
        out,
        parallel,
    )?;
    if let Some(bias) = bias {
        check_len("bias", bias.len(), out_f)?;
        if out_f > 0 {
            out[..rows * out_f]
                .par_chunks_mut(out_f)
                .for_each(|row| row.iter_mut().zip(bias).for_each(|(o, b)| *o += b));
        }
    }
    Ok(())
}

/// The gradients of [`linear_forward_bf16_cpu`] given `grad [rows, out_f]`, in bf16 products
/// with f32 accumulation: `dx = dY W`, `dW = dY^T x` (`dY` rounded to bf16, transposed once
/// into a bf16 buffer since the kernel reads its left operand row-major); `dbias`, the column
/// sums of `dY`, in f32 as in the f32 path. `need` says which of (x, weight, bias) to compute.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_bf16_cpu(
    x: Half,
    weight: &[bf16],
    grad: &[f32],
    rows: usize,
    in_f: usize,
    out_f: usize,
    need: [bool; 3],
) -> Result<LinearGrads> {
    check_len("the output gradient", grad.len(), rows * out_f)?;
    let parallel = rows * out_f * in_f >= SERIAL_MNK;
    let dx = if need[0] {
        let mut d = vec![0f32; rows * in_f];
        gemm_bf16(
            rows,
            in_f,
            out_f,
            Half::F32(grad),
            Half::Bf16(weight),
            false,
            &mut d,
            parallel,
        )?;
        Some(d)
    } else {
        None
    };
    let dw = if need[1] {
        let grad_t = transpose_to_bf16(&grad[..rows * out_f], rows, out_f);
        let mut d = vec![0f32; out_f * in_f];
        gemm_bf16(
            out_f,
            in_f,
            rows,
            Half::Bf16(&grad_t),
            x,
            false,
            &mut d,
            parallel,
        )?;
        Some(d)
    } else {
        None
    };
    let db = need[2].then(|| column_sums_cpu(grad, rows, out_f));
    Ok((dx, dw, db))
}

/// `a [rows, cols]` transposed to `[cols, rows]` and rounded to bf16, in tiles of 32 x 32 so
/// that both sides stay in cache; rows of the result in parallel.
fn transpose_to_bf16(a: &[f32], rows: usize, cols: usize) -> Vec<bf16> {
    const TILE: usize = 32;
    let mut t = vec![bf16::ZERO; rows * cols];
    if rows == 0 {
        return t;
    }
    t.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(tile_c, block)| {
            let c0 = tile_c * TILE;
            let cn = block.len() / rows;
            for r0 in (0..rows).step_by(TILE) {
                for r in r0..(r0 + TILE).min(rows) {
                    let src = &a[r * cols + c0..][..cn];
                    for (c, &v) in src.iter().enumerate() {
                        block[c * rows + r] = bf16::from_f32(v);
                    }
                }
            }
        });
    t
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::gemm::bf16_products_active;
    use crate::backend::matmul::{linear_backward_cpu, linear_forward_cpu};

    pub(crate) fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed * 97);
                ((h >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    pub(crate) fn round(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
    }

    #[test]
    fn transpose_to_bf16_is_a_rounded_transpose() {
        let (rows, cols) = (45, 70);
        let a = values(rows * cols, 1);
        let t = transpose_to_bf16(&a, rows, cols);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(t[c * rows + r], bf16::from_f32(a[r * cols + c]));
            }
        }
    }

    /// The bf16 products against the f32 path on bf16-rounded operands: equal up to the order
    /// of the f32 sums (2e-5 relative to the sum of magnitudes), for f32 and bf16 inputs.
    #[test]
    fn bf16_linear_matches_the_f32_path_on_rounded_operands() {
        if !bf16_products_active() {
            eprintln!("no AVX512_BF16 on this CPU: the bf16 linear is not tested");
            return;
        }
        let (rows, in_f, out_f) = (37, 70, 53);
        let x = values(rows * in_f, 2);
        let w = values(out_f * in_f, 3);
        let bias = values(out_f, 4);
        let grad = values(rows * out_f, 5);
        let w16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let x16: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let (xr, wr, gr) = (round(&x), round(&w), round(&grad));
        let mut want = vec![0f32; rows * out_f];
        linear_forward_cpu(&xr, &wr, Some(&bias), rows, in_f, out_f, &mut want).unwrap();
        let (want_dx, want_dw, _) =
            linear_backward_cpu(&xr, &wr, &gr, rows, in_f, out_f, [true, true, false]).unwrap();
        let (_, _, want_db) =
            linear_backward_cpu(&xr, &wr, &grad, rows, in_f, out_f, [false, false, true]).unwrap();
        let close = |got: &[f32], want: &[f32], k: usize, what: &str| {
            assert_eq!(got.len(), want.len(), "{what}");
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                // Operands lie in [-1, 1]: a sum of k products is off by k * 2^-24 at most
                // between two summation orders.
                assert!(
                    (g - w).abs() <= k as f32 * 1.2e-7,
                    "{what}[{i}]: {g} vs {w}"
                );
            }
        };
        for xin in [Half::F32(&x), Half::Bf16(&x16)] {
            let mut out = vec![0f32; rows * out_f];
            linear_forward_bf16_cpu(xin, &w16, Some(&bias), rows, in_f, out_f, &mut out).unwrap();
            close(&out, &want, in_f, "out");
            let (dx, dw, db) =
                linear_backward_bf16_cpu(xin, &w16, &grad, rows, in_f, out_f, [true; 3]).unwrap();
            close(&dx.unwrap(), want_dx.as_deref().unwrap(), out_f, "dx");
            close(&dw.unwrap(), want_dw.as_deref().unwrap(), rows, "dw");
            assert_eq!(db.unwrap(), want_db.clone().unwrap(), "dbias");
        }
    }
}
