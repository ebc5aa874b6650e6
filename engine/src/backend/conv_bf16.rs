//! `conv2d` for bf16 weights in bf16 products (`gemm_bf16`: each product of two bf16 values,
//! f32 accumulation) where the CPU has AVX512_BF16: a frozen teacher's forward, and a student
//! computing in bf16 (`activations = "bf16"`, a bf16 working copy of its weights) forward and
//! backward, instead of widening the weight to f32 for `sgemm`. The input, the output
//! gradient and the column matrix are rounded to bf16 as the kernel packs them; the weight
//! (or its transpose) is packed once per call, not per group of images.
//!
//! The schedule is the f32 backward's (`conv.rs`): runs of images, each with its own column
//! buffers and partial `dW`, added in run order at the end; the input gradient of a stride-1
//! "same"-style convolution as the forward convolution of `dY` with the flipped weight, the
//! others lowered (`dcols = W^T dY`, then col2im). The f32 backward on bf16-rounded operands
//! is the reference (tests below).

use half::bf16;

use super::conv::{
    backward_over_runs, backward_runs, bias_grad_cpu, col2im_cpu, flipped_weight, gather_group,
    grouped_forward, im2col_cpu, transposed_geometry, Conv2dGrads, ConvSchedule,
};
use super::gemm::{gemm_bf16_accumulate, gemm_bf16_packed, Bf16Lhs, Half};
use super::{scratch, Conv2dGeometry};
use crate::{Error, Result};

/// `conv2d_forward_cpu` for bf16 weights, in bf16 products with f32 accumulation (the input
/// rounded to bf16, see `gemm_bf16`): how `conv2d` runs bf16 weights (a frozen teacher's, a
/// student's computing in bf16) where `bf16_products_active()`. Groups images as
/// `ConvSchedule::auto` would; the weight is packed for the kernel once, not per group.
pub fn conv2d_forward_bf16_cpu(
    x: &[f32],
    weight: &[bf16],
    bias: Option<&[f32]>,
    g: &Conv2dGeometry,
    out: &mut [f32],
) -> Result<()> {
    if x.len() < g.n * g.image()
        || weight.len() < g.o * g.patch()
        || out.len() < g.n * g.o * g.pixels()
    {
        return Err(Error::shape(
            "conv2d",
            format!(
                "buffers of {}, {}, {} elements for input, weight, output; {g:?} needs {}, {}, {}",
                x.len(),
                weight.len(),
                out.len(),
                g.n * g.image(),
                g.o * g.patch(),
                g.n * g.o * g.pixels()
            ),
        ));
    }
    if let Some(b) = bias {
        if b.len() < g.o {
            return Err(Error::shape(
                "conv2d",
                format!("bias of {} elements for {} output channels", b.len(), g.o),
            ));
        }
    }
    let (ck, oimg) = (g.patch(), g.o * g.pixels());
    if g.n == 0 || oimg == 0 {
        return Ok(());
    }
    let out = &mut out[..g.n * oimg];
    if ck == 0 {
        // No input channels: the output is the bias alone.
        for (i, o) in out.iter_mut().enumerate() {
            *o = bias.map_or(0.0, |b| b[i / g.pixels() % g.o]);
        }
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    let items = ConvSchedule::auto(g).group();
    // Fewer images than threads: spread each product over the threads instead.
    let parallel = g.n < threads;
    let packed = Bf16Lhs::pack(g.o, ck, Half::Bf16(weight))?;
    grouped_forward(x, bias, g, out, items, |cols, columns, out| {
        gemm_bf16_packed(
            &packed,
            columns,
            Half::F32(cols),
            false,
            out,
            false,
            parallel,
        )
    })
}

/// `conv2d_backward_cpu` for bf16 weights in bf16 products: the gradients of
/// `conv2d_forward_bf16_cpu` given `grad = dL/dout [N, O, OH, OW]`; `need` says which of
/// (input, weight, bias) to compute. An error where `bf16_products_active()` is false.
pub fn conv2d_backward_bf16_cpu(
    x: &[f32],
    weight: &[bf16],
    grad: &[f32],
    g: &Conv2dGeometry,
    need: [bool; 3],
) -> Result<Conv2dGrads> {
    let (ck, p, img, oimg) = (g.patch(), g.pixels(), g.image(), g.o * g.pixels());
    if x.len() < g.n * img || weight.len() < g.o * ck || grad.len() < g.n * oimg {
        return Err(Error::shape(
            "conv2d",
            format!(
                "buffers of {}, {}, {} elements for input, weight, output gradient; {g:?} \
                 needs {}, {}, {}",
                x.len(),
                weight.len(),
                grad.len(),
                g.n * img,
                g.o * ck,
                g.n * oimg
            ),
        ));
    }
    let [need_x, need_w, need_b] = need;
    let db = need_b.then(|| bias_grad_cpu(grad, g.n, g.o, p));
    let empty = g.n == 0 || oimg == 0 || ck == 0;
    if let Some(t) = transposed_geometry(g).filter(|_| need_x && !empty) {
        // dx as a forward convolution of dY (products of depth O*kh*kw, no scatter-add).
        let wf: Vec<f32> = weight[..g.o * ck].iter().map(|v| v.to_f32()).collect();
        let flipped: Vec<bf16> = flipped_weight(&wf, g)
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let mut dx = vec![0f32; g.n * img];
        conv2d_forward_bf16_cpu(&grad[..g.n * oimg], &flipped, None, &t, &mut dx)?;
        let rest = conv2d_backward_bf16_cpu(x, weight, grad, g, [false, need_w, false])?;
        return Ok(Conv2dGrads {
            x: Some(dx),
            weight: rest.weight,
            bias: db,
        });
    }
    let mut dx = need_x.then(|| vec![0f32; g.n * img]);
    let mut dw = need_w.then(|| vec![0f32; g.o * ck]);
    if empty || !(need_x || need_w) {
        return Ok(Conv2dGrads {
            x: dx,
            weight: dw,
            bias: db,
        });
    }
    // W^T [C*kh*kw, O]: the lowered input gradient's left operand, packed once.
    let wt = if need_x {
        let mut t = vec![bf16::ZERO; ck * g.o];
        for (o, row) in weight[..g.o * ck].chunks_exact(ck).enumerate() {
            for (r, &v) in row.iter().enumerate() {
                t[r * g.o + o] = v;
            }
        }
        Some(Bf16Lhs::pack(ck, g.o, Half::Bf16(&t))?)
    } else {
        None
    };
    let schedule = ConvSchedule::auto(g);
    let (per, items) = backward_runs(g, schedule);
    // Fewer images than threads (`Batched`): each product spread over the threads.
    let parallel = matches!(schedule, ConvSchedule::Batched { .. });
    let direct = items == 1 && g.is_pointwise();
    let grad = &grad[..g.n * oimg];
    let run = |t: usize, dx_run: Option<&mut [f32]>| -> Result<Option<Vec<f32>>> {
        let first = t * per;
        let cnt = per.min(g.n - first);
        let cols_len = if direct { 0 } else { ck * items * p };
        let mut cols = scratch::take(if need_w { cols_len } else { 0 });
        let mut dcols = scratch::take(if need_x { cols_len } else { 0 });
        let mut dyt = scratch::take(if items > 1 { oimg * items } else { 0 });
        let mut dw_part = need_w.then(|| vec![0f32; g.o * ck]);
        let mut dx_run = dx_run;
        for b in (0..cnt).step_by(items) {
            let c = items.min(cnt - b);
            let x_g = &x[(first + b) * img..][..c * img];
            let dy_g = &grad[(first + b) * oimg..][..c * oimg];
            let dy: &[f32] = if c == 1 {
                dy_g
            } else {
                gather_group(dy_g, c, g.o, p, &mut dyt);
                &dyt[..c * oimg]
            };
            if let Some(dw_part) = dw_part.as_mut() {
                let cols: &[f32] = if direct {
                    x_g
                } else {
                    im2col_cpu(x_g, g, c, &mut cols, false);
                    &cols[..ck * c * p]
                };
                // dW [O, C*kh*kw] += dY [O, c*P] x cols^T.
                let (lhs, rhs) = (Half::F32(dy), Half::F32(cols));
                gemm_bf16_accumulate(g.o, ck, c * p, lhs, rhs, true, dw_part, parallel)?;
            }
            if let (Some(dx_run), Some(wt)) = (dx_run.as_deref_mut(), wt.as_ref()) {
                let dx_g = &mut dx_run[b * img..][..c * img];
                let rhs = Half::F32(dy);
                if direct {
                    gemm_bf16_packed(wt, p, rhs, false, dx_g, false, parallel)?;
                } else {
                    let dcols = &mut dcols[..ck * c * p];
                    gemm_bf16_packed(wt, c * p, rhs, false, dcols, false, parallel)?;
                    col2im_cpu(dcols, g, c, dx_g, parallel);
                }
            }
        }
        Ok(dw_part)
    };
    backward_over_runs(
        dx.as_deref_mut(),
        dw.as_deref_mut(),
        per * img,
        g.n,
        per,
        run,
    )?;
    Ok(Conv2dGrads {
        x: dx,
        weight: dw,
        bias: db,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::conv::{conv2d_backward_cpu, conv2d_forward_cpu};
    use crate::backend::gemm::bf16_products_active;
    use crate::backend::matmul_bf16::tests::{round, values};
    use crate::backend::Conv2dOptions;

    /// A sum of `depth` products of values in [-1, 1] in two summation orders: off by
    /// `depth * 2^-24` of the largest partial sum at most (the bound of `matmul_bf16`'s tests).
    fn close(got: &[f32], want: &[f32], depth: usize, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= depth as f32 * 1.2e-7,
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    /// The bf16 forward and backward against the f32 ones on bf16-rounded operands, for the
    /// shapes of every path: 3x3 "same" (dx by the flipped forward, grouped images), strided
    /// 3x3 and 1x1 (dx lowered: col2im), pointwise (the image is the column matrix), a
    /// batch smaller than the threads (products spread over them).
    #[test]
    fn bf16_conv_matches_the_f32_path_on_rounded_operands() {
        if !bf16_products_active() {
            eprintln!("no AVX512_BF16 on this CPU: the bf16 convolution is not tested");
            return;
        }
        // (n, c, h, w, o, k, stride, padding)
        for (si, &(n, c, h, w, o, k, stride, padding)) in [
            (6, 5, 7, 7, 9, 3, 1, 1),
            (3, 8, 9, 8, 12, 3, 2, 1),
            (4, 6, 6, 6, 10, 1, 2, 0),
            (5, 7, 5, 5, 20, 1, 1, 0),
            (1, 16, 12, 12, 24, 3, 1, 1),
            (2, 3, 10, 10, 4, 5, 1, 0),
        ]
        .iter()
        .enumerate()
        {
            let opts = Conv2dOptions { stride, padding };
            let g = Conv2dGeometry::new(&[n, c, h, w], &[o, c, k, k], opts).unwrap();
            let seed = 10 * si as u32;
            let x = values(g.n * g.image(), seed + 1);
            let wt = values(g.o * g.patch(), seed + 2);
            let bias = values(g.o, seed + 3);
            let dy = values(g.n * g.o * g.pixels(), seed + 4);
            let w16: Vec<bf16> = wt.iter().map(|&v| bf16::from_f32(v)).collect();
            let (xr, wr, dyr) = (round(&x), round(&wt), round(&dy));
            let what = format!("{g:?}");

            let mut want = vec![0f32; dy.len()];
            conv2d_forward_cpu(&xr, &wr, Some(&bias), &g, &mut want).unwrap();
            let mut got = vec![0f32; dy.len()];
            conv2d_forward_bf16_cpu(&x, &w16, Some(&bias), &g, &mut got).unwrap();
            close(&got, &want, g.patch(), &format!("out {what}"));

            let want = conv2d_backward_cpu(&xr, &wr, &dyr, &g, [true, true, false]).unwrap();
            let want_db = conv2d_backward_cpu(&xr, &wr, &dy, &g, [false, false, true]).unwrap();
            let got = conv2d_backward_bf16_cpu(&x, &w16, &dy, &g, [true; 3]).unwrap();
            let depth_x = g.o * g.kh * g.kw;
            close(
                &got.x.unwrap(),
                &want.x.unwrap(),
                depth_x,
                &format!("dx {what}"),
            );
            let depth_w = g.n * g.pixels();
            let got_dw = got.weight.unwrap();
            close(
                &got_dw,
                &want.weight.unwrap(),
                depth_w,
                &format!("dw {what}"),
            );
            assert_eq!(got.bias, want_db.bias, "dbias {what}");

            // Each gradient alone is the same as with the others.
            let alone = conv2d_backward_bf16_cpu(&x, &w16, &dy, &g, [false, true, false]).unwrap();
            assert_eq!(alone.weight.unwrap(), got_dw, "dw alone {what}");
            assert!(alone.x.is_none() && alone.bias.is_none());
        }
    }

    #[test]
    fn short_buffers_are_errors() {
        let opts = Conv2dOptions {
            stride: 1,
            padding: 1,
        };
        let g = Conv2dGeometry::new(&[2, 3, 5, 5], &[4, 3, 3, 3], opts).unwrap();
        let w16 = vec![bf16::ZERO; 4 * 27];
        let x = vec![0f32; 2 * 75];
        let dy = vec![0f32; 2 * 4 * 25];
        assert!(conv2d_backward_bf16_cpu(&x[..10], &w16, &dy, &g, [true; 3]).is_err());
        assert!(conv2d_backward_bf16_cpu(&x, &w16[..5], &dy, &g, [true; 3]).is_err());
        assert!(conv2d_backward_bf16_cpu(&x, &w16, &dy[..7], &g, [true; 3]).is_err());
    }
}
