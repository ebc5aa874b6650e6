//! Matrix products at the backend level: [`matmul_fwd`] / [`matmul_bwd`] (one 2-D product, or
//! a batch of them: attention's per-head products) and [`linear_fwd`] / [`linear_bwd`]
//! (PyTorch's `x W^T + b`), dispatched by device, with the CPU arm below them and the CUDA arm
//! in `crate::cuda::matmul` (cuBLASLt).
//!
//! On the CPU every product, forward and backward, goes through [`super::gemm::sgemm`] with
//! transpose flags instead of materialised transposes: for `C = op(A) op(B)` the gradients are
//! again products of the stored operands, `dA = dC op(B)^T` and `dB = op(A)^T dC`, each written
//! in the layout its operand is stored in. One exception: `linear` with bf16 weights (a frozen
//! teacher's, or a bf16 student's working copy) runs in bf16 products where the CPU has them
//! (`super::matmul_bf16`, on [`super::gemm::gemm_bf16`]).
//!
//! Storage types: the CPU arm reads f32 or bf16 and writes f32; the CUDA arm runs in the first
//! operand's dtype (the other cast to it), writes the output and `dA` in it, `dB` in `B`'s
//! dtype and the bias gradient in f32 (its kernel sums in f32).

use rayon::prelude::*;

use super::matmul_bf16::{linear_backward_bf16_cpu, linear_forward_bf16_cpu};
use super::ProductDims;
use crate::backend::gemm::{
    bf16_products_active, sgemm, sgemm_serial, Half, SERIAL_GEMM_AVAILABLE, SERIAL_MNK,
};
use crate::{DType, Device, Error, Result, Tensor};

/// `op(a) op(b)` for the product(s) `d` made from their shapes (2-D operands: one product;
/// rank >= 3: a batch), on their device.
pub fn matmul_fwd(a: &Tensor, b: &Tensor, d: &ProductDims) -> Result<Tensor> {
    let op = product_op(a);
    check_operands(op, a, b, d)?;
    match crate::cuda::common_device(op, &[a, b])? {
        Device::Cpu => {
            let mut out = vec![0f32; d.batch * d.m * d.n];
            let (sa, sb) = (a.read_f32()?, b.read_f32()?);
            if a.rank() == 2 {
                matmul_forward_cpu(&sa, &sb, d.m, d.k, d.n, d.trans_a, d.trans_b, &mut out)?;
            } else {
                batched_matmul_forward_cpu(
                    &sa, &sb, d.batch, d.m, d.k, d.n, d.trans_a, d.trans_b, &mut out,
                )?;
            }
            Tensor::f32(out, &d.out_shape)
        }
        dev => crate::on_cuda!(dev, crate::cuda::matmul::product_fwd(op, a, b, None, d)),
    }
}

/// The gradients of [`matmul_fwd`] from its operands and the output gradient `dy`:
/// `[da, db]`, each in its operand's stored layout and only when `need` asks for it.
pub fn matmul_bwd(
    a: &Tensor,
    b: &Tensor,
    dy: &Tensor,
    d: &ProductDims,
    need: [bool; 2],
) -> Result<[Option<Tensor>; 2]> {
    let op = product_op(a);
    check_operands(op, a, b, d)?;
    check_output_grad(op, dy, d)?;
    match crate::cuda::common_device(op, &[a, b, dy])? {
        Device::Cpu => {
            let (sa, sb, g) = (a.read_f32()?, b.read_f32()?, dy.read_f32()?);
            let (da, db) = if a.rank() == 2 {
                matmul_backward_cpu(
                    &sa, &sb, &g, d.m, d.k, d.n, d.trans_a, d.trans_b, need[0], need[1],
                )?
            } else {
                batched_matmul_backward_cpu(
                    &sa, &sb, &g, d.batch, d.m, d.k, d.n, d.trans_a, d.trans_b, need[0], need[1],
                )?
            };
            Ok([
                da.map(|v| Tensor::f32(v, a.shape())).transpose()?,
                db.map(|v| Tensor::f32(v, b.shape())).transpose()?,
            ])
        }
        dev => crate::on_cuda!(
            dev,
            crate::cuda::matmul::product_bwd(op, a, b, dy, d, [need[0], need[1], false])
                .map(|[da, db, _]| [da, db])
        ),
    }
}

/// A dense layer `x [..., in] W^T + bias` with `weight [out, in]` and `bias [out]`; `d` is
/// [`ProductDims::linear`] of their shapes.
pub fn linear_fwd(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    d: &ProductDims,
) -> Result<Tensor> {
    const OP: &str = "linear";
    check_linear(x, weight, bias, d)?;
    let mut on = vec![x, weight];
    on.extend(bias);
    match crate::cuda::common_device(OP, &on)? {
        Device::Cpu => {}
        dev => {
            return crate::on_cuda!(
                dev,
                crate::cuda::matmul::product_fwd(OP, x, weight, bias, d)
            )
        }
    }
    let (rows, in_f, out_f) = (d.m, d.k, d.n);
    let mut out = vec![0f32; rows * out_f];
    let bias_read = bias.map(|b| b.read_f32()).transpose()?;
    if weight.dtype() == DType::BF16 && bf16_products_active() {
        // bf16 weights (a frozen teacher's, or the working copy of a student computing in
        // bf16): bf16 products, f32 accumulation (see `matmul_bf16`).
        let xb = BorrowedHalf::read(x)?;
        linear_forward_bf16_cpu(
            xb.half(),
            &weight.read_bf16()?,
            bias_read.as_deref(),
            rows,
            in_f,
            out_f,
            &mut out,
        )?;
    } else {
        linear_forward_cpu(
            &x.read_f32()?,
            &weight.read_f32()?,
            bias_read.as_deref(),
            rows,
            in_f,
            out_f,
            &mut out,
        )?;
    }
    Tensor::f32(out, &d.out_shape)
}

/// The gradients of [`linear_fwd`] from its input, its weight and the output gradient `dy`:
/// `[dx, dweight, dbias]`, each only when `need` asks for it.
pub fn linear_bwd(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    d: &ProductDims,
    need: [bool; 3],
) -> Result<[Option<Tensor>; 3]> {
    const OP: &str = "linear";
    check_linear(x, weight, None, d)?;
    check_output_grad(OP, dy, d)?;
    match crate::cuda::common_device(OP, &[x, weight, dy])? {
        Device::Cpu => {
            let bf16_backward = weight.dtype() == DType::BF16 && bf16_products_active();
            let (dx, dw, db) = if bf16_backward {
                // The backward of the bf16 forward above, in bf16 products as well.
                linear_backward_bf16_cpu(
                    BorrowedHalf::read(x)?.half(),
                    &weight.read_bf16()?,
                    &dy.read_f32()?,
                    d.m,
                    d.k,
                    d.n,
                    need,
                )?
            } else {
                linear_backward_cpu(
                    &x.read_f32()?,
                    &weight.read_f32()?,
                    &dy.read_f32()?,
                    d.m,
                    d.k,
                    d.n,
                    need,
                )?
            };
            Ok([
                dx.map(|v| Tensor::f32(v, x.shape())).transpose()?,
                dw.map(|v| Tensor::f32(v, weight.shape())).transpose()?,
                db.map(|v| Tensor::f32(v, &[d.n])).transpose()?,
            ])
        }
        dev => crate::on_cuda!(
            dev,
            crate::cuda::matmul::product_bwd(OP, x, weight, dy, d, need)
        ),
    }
}

/// The op a product's errors name.
fn product_op(a: &Tensor) -> &'static str {
    if a.rank() == 2 {
        "matmul"
    } else {
        "batched_matmul"
    }
}

/// Float operands of the shapes `d` was made from.
fn check_operands(op: &'static str, a: &Tensor, b: &Tensor, d: &ProductDims) -> Result<()> {
    a.expect_float(op)?;
    b.expect_float(op)?;
    let want = ProductDims::new(op, a.shape(), b.shape(), d.trans_a, d.trans_b)?;
    if &want != d {
        return Err(Error::shape(
            op,
            format!(
                "a {:?} and b {:?} are not the operands of the product {d:?}",
                a.shape(),
                b.shape()
            ),
        ));
    }
    Ok(())
}

/// A dense layer's float operands of the shapes `d` was made from.
fn check_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, d: &ProductDims) -> Result<()> {
    const OP: &str = "linear";
    x.expect_float(OP)?;
    weight.expect_float(OP)?;
    let rows = x.elem_count().checked_div(d.k).unwrap_or(0);
    if weight.shape() != [d.n, d.k] || x.shape().last() != Some(&d.k) || rows != d.m {
        return Err(Error::shape(
            OP,
            format!(
                "input {:?} and weight {:?} are not the operands of the product {d:?}",
                x.shape(),
                weight.shape()
            ),
        ));
    }
    if let Some(b) = bias {
        b.expect_float(OP)?;
        if b.shape() != [d.n] {
            return Err(Error::shape(
                OP,
                format!(
                    "bias {:?} does not fit weight {:?} (expected [{}])",
                    b.shape(),
                    weight.shape(),
                    d.n
                ),
            ));
        }
    }
    Ok(())
}

/// An output gradient of the product's output shape.
fn check_output_grad(op: &'static str, dy: &Tensor, d: &ProductDims) -> Result<()> {
    if dy.shape() != d.out_shape.as_slice() {
        return Err(Error::shape(
            op,
            format!(
                "the output gradient {:?} differs from the output {:?}",
                dy.shape(),
                d.out_shape
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The CPU arm: kernels over slices
// ---------------------------------------------------------------------------------------------

/// `out[m, n] = op(a) op(b)` with `op(a)` of shape `[m, k]` (stored `[k, m]` when `trans_a`)
/// and `op(b)` of shape `[k, n]` (stored `[n, k]` when `trans_b`).
#[allow(clippy::too_many_arguments)]
pub fn matmul_forward_cpu(
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    out: &mut [f32],
) -> Result<()> {
    sgemm(trans_a, trans_b, m, n, k, 1.0, a, b, 0.0, out)
}

/// Gradients of the two operands of a product, `None` where not asked for.
pub type MatmulGrads = (Option<Vec<f32>>, Option<Vec<f32>>);

/// Gradients of `matmul_forward_cpu` given `grad = dL/dout` (`[m, n]`): `dA` in `a`'s stored
/// layout when `need_a`, `dB` in `b`'s stored layout when `need_b`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward_cpu(
    a: &[f32],
    b: &[f32],
    grad: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    need_a: bool,
    need_b: bool,
) -> Result<MatmulGrads> {
    let mut da = None;
    let mut db = None;
    if need_a {
        let mut d = vec![0f32; m * k];
        matmul_grad_a(b, grad, m, k, n, trans_a, trans_b, &mut d, false)?;
        da = Some(d);
    }
    if need_b {
        let mut d = vec![0f32; k * n];
        matmul_grad_b(a, grad, m, k, n, trans_a, trans_b, &mut d, false)?;
        db = Some(d);
    }
    Ok((da, db))
}

/// `da` (stored like `a`) from `b` and `grad`. `serial` keeps the product on this thread.
#[allow(clippy::too_many_arguments)]
fn matmul_grad_a(
    b: &[f32],
    grad: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    da: &mut [f32],
    serial: bool,
) -> Result<()> {
    let gemm = if serial { sgemm_serial } else { sgemm };
    if trans_a {
        // A stored [k, m]: dA^T = op(B) dC^T  -> [k, m]
        gemm(trans_b, true, k, m, n, 1.0, b, grad, 0.0, da)
    } else {
        // dA = dC op(B)^T -> [m, k]; op(B)^T is B as stored when trans_b.
        gemm(false, !trans_b, m, k, n, 1.0, grad, b, 0.0, da)
    }
}

/// `db` (stored like `b`) from `a` and `grad`.
#[allow(clippy::too_many_arguments)]
fn matmul_grad_b(
    a: &[f32],
    grad: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    db: &mut [f32],
    serial: bool,
) -> Result<()> {
    let gemm = if serial { sgemm_serial } else { sgemm };
    if trans_b {
        // B stored [n, k]: dB^T = dC^T op(A) -> [n, k]
        gemm(true, trans_a, n, k, m, 1.0, grad, a, 0.0, db)
    } else {
        // dB = op(A)^T dC -> [k, n]; op(A)^T is A as stored when trans_a.
        gemm(!trans_a, false, k, n, m, 1.0, a, grad, 0.0, db)
    }
}

/// Whether a batch of independent products should be spread over rayon threads (each product
/// on one thread) rather than run one after another with each product threaded: with enough
/// products to cover the threads, or products too small to feed a threaded gemm (attention
/// heads), spreading them needs no synchronisation inside a product.
fn batch_in_parallel(batch: usize, m: usize, n: usize, k: usize) -> bool {
    let small = m * n * k < SERIAL_MNK;
    // Without a truly serial sgemm (OpenBLAS), only products it keeps on one thread anyway
    // may run concurrently.
    batch > 1 && (small || (SERIAL_GEMM_AVAILABLE && batch >= rayon::current_num_threads()))
}

/// `out[i] = op(a[i]) op(b[i])` for `batch` products stored back to back.
#[allow(clippy::too_many_arguments)]
pub fn batched_matmul_forward_cpu(
    a: &[f32],
    b: &[f32],
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    out: &mut [f32],
) -> Result<()> {
    check_batch_buffers(a, b, batch, m, k, n)?;
    check_len("batched_matmul", out.len(), batch * m * n)?;
    if m * n == 0 {
        return Ok(());
    }
    let item = |(i, o): (usize, &mut [f32]), serial: bool| {
        let gemm = if serial { sgemm_serial } else { sgemm };
        gemm(
            trans_a,
            trans_b,
            m,
            n,
            k,
            1.0,
            &a[i * m * k..(i + 1) * m * k],
            &b[i * k * n..(i + 1) * k * n],
            0.0,
            o,
        )
    };
    let out = &mut out[..batch * m * n];
    if batch_in_parallel(batch, m, n, k) {
        out.par_chunks_mut(m * n)
            .enumerate()
            .try_for_each(|x| item(x, true))
    } else {
        out.chunks_mut(m * n)
            .enumerate()
            .try_for_each(|x| item(x, false))
    }
}

/// Gradients of `batched_matmul_forward_cpu`, each in its operand's stored layout.
#[allow(clippy::too_many_arguments)]
pub fn batched_matmul_backward_cpu(
    a: &[f32],
    b: &[f32],
    grad: &[f32],
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    need_a: bool,
    need_b: bool,
) -> Result<MatmulGrads> {
    check_batch_buffers(a, b, batch, m, k, n)?;
    check_len("batched_matmul backward", grad.len(), batch * m * n)?;
    let parallel = batch_in_parallel(batch, m, n, k);
    let (mk, kn, mn) = (m * k, k * n, m * n);
    // Zero-sized operands get an all-zero (possibly empty) gradient without a product.
    let mut da = need_a.then(|| vec![0f32; batch * mk]);
    if let Some(d) = da.as_mut().filter(|_| mk > 0) {
        let item = |(i, d): (usize, &mut [f32])| {
            let (bi, gi) = (&b[i * kn..(i + 1) * kn], &grad[i * mn..(i + 1) * mn]);
            matmul_grad_a(bi, gi, m, k, n, trans_a, trans_b, d, parallel)
        };
        if parallel {
            d.par_chunks_mut(mk).enumerate().try_for_each(item)?;
        } else {
            d.chunks_mut(mk).enumerate().try_for_each(item)?;
        }
    }
    let mut db = need_b.then(|| vec![0f32; batch * kn]);
    if let Some(d) = db.as_mut().filter(|_| kn > 0) {
        let item = |(i, d): (usize, &mut [f32])| {
            let (ai, gi) = (&a[i * mk..(i + 1) * mk], &grad[i * mn..(i + 1) * mn]);
            matmul_grad_b(ai, gi, m, k, n, trans_a, trans_b, d, parallel)
        };
        if parallel {
            d.par_chunks_mut(kn).enumerate().try_for_each(item)?;
        } else {
            d.chunks_mut(kn).enumerate().try_for_each(item)?;
        }
    }
    Ok((da, db))
}

fn check_len(op: &'static str, got: usize, want: usize) -> Result<()> {
    if got < want {
        return Err(Error::shape(
            op,
            format!("buffer of {got} elements, need {want}"),
        ));
    }
    Ok(())
}

fn check_batch_buffers(
    a: &[f32],
    b: &[f32],
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    check_len("batched_matmul", a.len(), batch * m * k)?;
    check_len("batched_matmul", b.len(), batch * k * n)
}

/// `out[rows, out_f] = x[rows, in_f] W^T + bias` with `W` stored `[out_f, in_f]`.
pub fn linear_forward_cpu(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    in_f: usize,
    out_f: usize,
    out: &mut [f32],
) -> Result<()> {
    sgemm(false, true, rows, out_f, in_f, 1.0, x, weight, 0.0, out)?;
    if let Some(bias) = bias {
        check_len("linear", bias.len(), out_f)?;
        if out_f > 0 {
            out[..rows * out_f]
                .par_chunks_mut(out_f)
                .for_each(|row| row.iter_mut().zip(bias).for_each(|(o, b)| *o += b));
        }
    }
    Ok(())
}

/// Gradients of (input, weight, bias) of a dense layer, `None` where not asked for.
pub type LinearGrads = (Option<Vec<f32>>, Option<Vec<f32>>, Option<Vec<f32>>);

/// Gradients of `linear_forward_cpu` given `grad [rows, out_f]`: `dx = dY W`, `dW = dY^T x`,
/// `dbias = column sums of dY`; `need` says which of (x, weight, bias) to compute.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_cpu(
    x: &[f32],
    weight: &[f32],
    grad: &[f32],
    rows: usize,
    in_f: usize,
    out_f: usize,
    need: [bool; 3],
) -> Result<LinearGrads> {
    let dx = if need[0] {
        let mut d = vec![0f32; rows * in_f];
        sgemm(
            false, false, rows, in_f, out_f, 1.0, grad, weight, 0.0, &mut d,
        )?;
        Some(d)
    } else {
        None
    };
    let dw = if need[1] {
        let mut d = vec![0f32; out_f * in_f];
        sgemm(true, false, out_f, in_f, rows, 1.0, grad, x, 0.0, &mut d)?;
        Some(d)
    } else {
        None
    };
    let db = if need[2] {
        check_len("linear backward", grad.len(), rows * out_f)?;
        Some(column_sums_cpu(grad, rows, out_f))
    } else {
        None
    };
    Ok((dx, dw, db))
}

/// The column sums of `a [rows, cols]` (a bias gradient): each column summed over the rows in
/// order, so the result is that of the plain row-by-row loop ([`column_sums_ref`]) bit for
/// bit; blocks of columns in parallel, the rows of a block added as vectors.
pub fn column_sums_cpu(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    /// Columns per task: a block's sums stay in L1 while the rows stream past.
    const COLS_PER_TASK: usize = 1024;
    let mut sums = vec![0f32; cols];
    if rows * cols < (1 << 15) {
        for row in a[..rows * cols].chunks(cols.max(1)) {
            sums.iter_mut().zip(row).for_each(|(s, v)| *s += v);
        }
        return sums;
    }
    sums.par_chunks_mut(COLS_PER_TASK)
        .enumerate()
        .for_each(|(blk, s)| {
            let c0 = blk * COLS_PER_TASK;
            for r in 0..rows {
                let row = &a[r * cols + c0..][..s.len()];
                s.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
        });
    sums
}

/// [`column_sums_cpu`]'s reference: one row after the other, serially.
pub fn column_sums_ref(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut sums = vec![0f32; cols];
    for r in 0..rows {
        for c in 0..cols {
            sums[c] += a[r * cols + c];
        }
    }
    sums
}

/// A tensor's values as a [`Half`] operand: bf16 storage in place, anything else read as f32.
enum BorrowedHalf<'a> {
    F32(crate::tensor::F32Read<'a>),
    Bf16(crate::tensor::Bf16Read<'a>),
}

impl<'a> BorrowedHalf<'a> {
    fn read(t: &'a Tensor) -> Result<Self> {
        Ok(if t.dtype() == DType::BF16 {
            BorrowedHalf::Bf16(t.read_bf16()?)
        } else {
            BorrowedHalf::F32(t.read_f32()?)
        })
    }

    fn half(&self) -> Half<'_> {
        match self {
            BorrowedHalf::F32(v) => Half::F32(v),
            BorrowedHalf::Bf16(v) => Half::Bf16(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_sums_match_the_serial_loop_bit_for_bit() {
        // Below and above the parallel threshold, with a partial last block of columns.
        for (rows, cols) in [(3, 5), (600, 3000), (40, 1), (0, 7)] {
            let a: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.4)
                .collect();
            assert_eq!(
                column_sums_cpu(&a, rows, cols),
                column_sums_ref(&a, rows, cols),
                "{rows} x {cols}"
            );
        }
    }
}
