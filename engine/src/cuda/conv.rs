//! The CUDA arm of `conv2d`: cuDNN forward, backward-data and backward-filter
//! ([`super::dnn`]), the bias through the `channel_add` / `channel_sum` kernels of `bias_add`.
//!
//! Types as for the products: the convolution runs in the input's type (the weight is cast to
//! it when it differs), the output has that type, and each gradient the type of its tensor.

use super::common::{as_dtype, empty, run, view};
use super::common_device;
use super::dnn::{self, ConvKey, ConvPtrs, Direction};
use super::elementwise::{cast, channel_add_plan, channel_sum_plan};
use crate::ops::conv::Conv2dGeometry;
use crate::{DType, Result, Tape, Tensor, Var};

/// The CUDA arm of `conv2d` (shapes validated by the caller into `g`).
pub(crate) fn conv2d(
    tape: &Tape,
    x: &Var,
    weight: &Var,
    bias: Option<&Var>,
    g: Conv2dGeometry,
) -> Result<Var> {
    const OP: &str = "conv2d";
    let mut all = vec![x.tensor(), weight.tensor()];
    all.extend(bias.map(|b| b.tensor()));
    common_device(OP, &all)?;
    for t in &all {
        t.expect_float(OP)?;
    }
    let dtype = x.tensor().dtype();
    let key = ConvKey::new(&g, dtype)?;
    let ctx = view(x.tensor(), OP)?.ctx;
    let device = x.tensor().device();
    // cuDNN's vectorised (and tensor-op) kernels want 16-byte aligned operands; activations
    // are fresh allocations, but a weight is a view at any offset of the flat parameter
    // buffer, so a misaligned one is copied (once per forward; the backward reuses it).
    let aligned = |t: Tensor| -> Result<Tensor> {
        if view(&t, OP)?.ptr % 16 == 0 {
            Ok(t)
        } else {
            super::elementwise::deep_copy(&t)
        }
    };
    let (tx, tw) = (
        aligned(x.tensor().clone())?,
        aligned(as_dtype(weight.tensor(), dtype)?)?,
    );
    let y_shape = [g.n, g.o, g.oh, g.ow];
    // cuDNN rejects empty tensors: an empty input or filter sum is zero.
    let empty_problem = g.n * g.o * g.oh * g.ow == 0 || g.c * g.kh * g.kw == 0;
    let out = if empty_problem {
        Tensor::zeros(&y_shape, dtype, device)?
    } else {
        let y = empty(&ctx, dtype, &y_shape)?;
        let p = ConvPtrs {
            x: view(&tx, OP)?.ptr,
            w: view(&tw, OP)?.ptr,
            y: view(&y, OP)?.ptr,
        };
        dnn::convolve(&ctx, &key, Direction::Forward, p)?;
        y
    };
    if let Some(b) = bias {
        let b = as_dtype(b.tensor(), dtype)?;
        let yv = view(&out, OP)?;
        // In place: each element reads and writes its own address.
        let plan = channel_add_plan(
            yv.ptr,
            view(&b, OP)?.ptr,
            yv.ptr,
            g.n,
            g.o,
            g.oh * g.ow,
            dtype,
        )?;
        run(&ctx, &plan)?;
    }
    let w_dtype = weight.tensor().dtype();
    let bias_dtype = bias.map(|b| b.tensor().dtype());
    let backward = Box::new(move |grad: &Tensor, needs: &[bool]| {
        const BW: &str = "conv2d backward";
        let dy = as_dtype(grad, dtype)?;
        let dx = needs[0]
            .then(|| -> Result<Tensor> {
                if empty_problem {
                    return Tensor::zeros(tx.shape(), dtype, device);
                }
                let dx = empty(&ctx, dtype, tx.shape())?;
                let p = ConvPtrs {
                    x: view(&dx, BW)?.ptr,
                    w: view(&tw, BW)?.ptr,
                    y: view(&dy, BW)?.ptr,
                };
                dnn::convolve(&ctx, &key, Direction::BackwardData, p)?;
                Ok(dx)
            })
            .transpose()?;
        let dw = needs[1]
            .then(|| -> Result<Tensor> {
                if empty_problem {
                    return Tensor::zeros(tw.shape(), w_dtype, device);
                }
                let dw = empty(&ctx, dtype, tw.shape())?;
                let p = ConvPtrs {
                    x: view(&tx, BW)?.ptr,
                    w: view(&dw, BW)?.ptr,
                    y: view(&dy, BW)?.ptr,
                };
                dnn::convolve(&ctx, &key, Direction::BackwardFilter, p)?;
                as_dtype(&dw, w_dtype)
            })
            .transpose()?;
        let mut grads = vec![dx, dw];
        if let Some(bd) = bias_dtype {
            let db = needs
                .get(2)
                .copied()
                .unwrap_or(false)
                .then(|| -> Result<Tensor> {
                    if g.n * g.oh * g.ow == 0 {
                        return Tensor::zeros(&[g.o], bd, device);
                    }
                    // Per channel, the sum over images and pixels: f32 `[O]`.
                    let s = empty(&ctx, DType::F32, &[g.o])?;
                    let plan = channel_sum_plan(
                        view(&dy, BW)?.ptr,
                        view(&s, BW)?.ptr,
                        g.n,
                        g.o,
                        g.oh * g.ow,
                        dtype,
                    )?;
                    run(&ctx, &plan)?;
                    if bd == DType::F32 {
                        Ok(s)
                    } else {
                        cast(&s, bd)
                    }
                })
                .transpose()?;
            grads.push(db);
        }
        Ok(grads)
    });
    Ok(match bias {
        Some(b) => tape.record(out, &[x, weight, b], backward),
        None => tape.record(out, &[x, weight], backward),
    })
}
