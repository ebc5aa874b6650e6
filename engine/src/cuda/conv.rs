//! The CUDA arm of the convolution's backend-level functions (`crate::backend::conv`): cuDNN
//! forward, backward-data and backward-filter ([`super::dnn`]), the bias through the
//! `channel_add` / `channel_sum` kernels of `bias_add`. No tape here: the op and its one
//! backward are in `crate::ops::conv`.
//!
//! Types as for the products: the convolution runs in the input's type (the weight is cast to
//! it when it differs); the output, `dx` and `dweight` have that type, `dbias` is f32.

use super::common::{as_dtype, empty, view};
use super::dnn::{self, ConvKey, ConvPtrs, Direction};
use super::elementwise::{bias_add_bwd, channel_add};
use crate::backend::conv::ConvOperands;
use crate::backend::Conv2dGeometry;
use crate::{DType, Result, Tensor};

/// cuDNN rejects empty tensors: an empty input or filter sum is zero.
fn is_empty_problem(g: &Conv2dGeometry) -> bool {
    g.n * g.o * g.oh * g.ow == 0 || g.c * g.kh * g.kw == 0
}

/// The CUDA arm of [`crate::backend::conv::conv2d_fwd`] (validated there).
pub(crate) fn conv2d_fwd(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    g: &Conv2dGeometry,
) -> Result<(Tensor, ConvOperands)> {
    const OP: &str = "conv2d";
    let dtype = x.dtype();
    let key = ConvKey::new(g, dtype)?;
    let ctx = view(x, OP)?.ctx;
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
    let (tx, tw) = (aligned(x.clone())?, aligned(as_dtype(weight, dtype)?)?);
    let y_shape = [g.n, g.o, g.oh, g.ow];
    let out = if is_empty_problem(g) {
        Tensor::zeros(&y_shape, dtype, x.device())?
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
        channel_add(&out, &as_dtype(b, dtype)?, &out, g.o, g.oh * g.ow)?;
    }
    Ok((out, ConvOperands { x: tx, weight: tw }))
}

/// The CUDA arm of [`crate::backend::conv::conv2d_bwd`], from the operands [`conv2d_fwd`] kept
/// (`w` already in `x`'s dtype and aligned).
pub(crate) fn conv2d_bwd(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    g: &Conv2dGeometry,
    need: [bool; 3],
) -> Result<[Option<Tensor>; 3]> {
    const BW: &str = "conv2d backward";
    let (dtype, device) = (x.dtype(), x.device());
    let key = ConvKey::new(g, dtype)?;
    let ctx = view(x, BW)?.ctx;
    let dy = as_dtype(dy, dtype)?;
    let empty_problem = is_empty_problem(g);
    let dx = need[0]
        .then(|| -> Result<Tensor> {
            if empty_problem {
                return Tensor::zeros(x.shape(), dtype, device);
            }
            let dx = empty(&ctx, dtype, x.shape())?;
            let p = ConvPtrs {
                x: view(&dx, BW)?.ptr,
                w: view(w, BW)?.ptr,
                y: view(&dy, BW)?.ptr,
            };
            dnn::convolve(&ctx, &key, Direction::BackwardData, p)?;
            Ok(dx)
        })
        .transpose()?;
    let dw = need[1]
        .then(|| -> Result<Tensor> {
            if empty_problem {
                return Tensor::zeros(w.shape(), dtype, device);
            }
            let dw = empty(&ctx, dtype, w.shape())?;
            let p = ConvPtrs {
                x: view(x, BW)?.ptr,
                w: view(&dw, BW)?.ptr,
                y: view(&dy, BW)?.ptr,
            };
            dnn::convolve(&ctx, &key, Direction::BackwardFilter, p)?;
            Ok(dw)
        })
        .transpose()?;
    let db = need[2]
        .then(|| -> Result<Tensor> {
            if g.n * g.oh * g.ow == 0 {
                return Tensor::zeros(&[g.o], DType::F32, device);
            }
            // Per channel, the sum over images and pixels: f32 `[O]`.
            bias_add_bwd(&dy, g.o, g.oh * g.ow)
        })
        .transpose()?;
    Ok([dx, dw, db])
}
