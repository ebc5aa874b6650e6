//! Matrix products on the tape: `matmul` (2-D), `batched_matmul` (rank >= 3, identical leading
//! batch dims: attention's per-head products) and `linear` (PyTorch's `x W^T + b`, every dense
//! layer of BERT and ResNet's classifier).
//!
//! Every product, forward and backward, goes through `ops::gemm::sgemm` with transpose flags
//! instead of materialised transposes: for `C = op(A) op(B)` the gradients are again products
//! of the stored operands, `dA = dC op(B)^T` and `dB = op(A)^T dC`, each written in the layout
//! its operand is stored in. One exception: `linear` with bf16 weights (a frozen teacher's) runs
//! its forward in bf16 products (`ops::gemm::gemm_bf16`) where the CPU has them.

use rayon::prelude::*;

use crate::ops::gemm::{
    bf16_products_active, gemm_bf16, sgemm, sgemm_serial, Half, SERIAL_GEMM_AVAILABLE, SERIAL_MNK,
};
use crate::{DType, Device, Error, Result, Tape, Tensor, Var};

// ---------------------------------------------------------------------------------------------
// CPU kernels
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

/// `linear_forward_cpu` for bf16 weights, in bf16 products with f32 accumulation (the input
/// rounded to bf16): how `linear` runs a bf16 teacher where `bf16_products_active()`.
pub fn linear_forward_bf16_cpu(
    x: &[f32],
    weight: &[half::bf16],
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
        Half::F32(x),
        Half::Bf16(weight),
        true,
        out,
        parallel,
    )?;
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
        let mut d = vec![0f32; out_f];
        if out_f > 0 {
            for row in grad[..rows * out_f].chunks(out_f) {
                d.iter_mut().zip(row).for_each(|(d, g)| *d += g);
            }
        }
        Some(d)
    } else {
        None
    };
    Ok((dx, dw, db))
}

// ---------------------------------------------------------------------------------------------
// Tape ops
// ---------------------------------------------------------------------------------------------

/// `(rows, cols)` of `op(X)` for `X` stored `[r, c]`.
fn op_dims(r: usize, c: usize, trans: bool) -> (usize, usize) {
    if trans {
        (c, r)
    } else {
        (r, c)
    }
}

fn mat_dims(
    op: &'static str,
    a: &[usize],
    b: &[usize],
    trans_a: bool,
    trans_b: bool,
) -> Result<(usize, usize, usize)> {
    let (ra, ca) = (a[a.len() - 2], a[a.len() - 1]);
    let (rb, cb) = (b[b.len() - 2], b[b.len() - 1]);
    let (m, k) = op_dims(ra, ca, trans_a);
    let (k2, n) = op_dims(rb, cb, trans_b);
    if k != k2 {
        return Err(Error::shape(
            op,
            format!(
                "a {a:?}{} and b {b:?}{}: inner dimensions {k} and {k2} differ",
                if trans_a { " (transposed)" } else { "" },
                if trans_b { " (transposed)" } else { "" },
            ),
        ));
    }
    Ok((m, k, n))
}

/// `op(a) op(b)` for 2-D `a`, `b`; `trans_*` transposes an operand without copying it.
pub fn matmul(tape: &Tape, a: &Var, b: &Var, trans_a: bool, trans_b: bool) -> Result<Var> {
    a.tensor().expect_float("matmul")?;
    b.tensor().expect_float("matmul")?;
    if a.tensor().rank() != 2 || b.tensor().rank() != 2 {
        return Err(Error::shape(
            "matmul",
            format!(
                "needs 2-D operands, got a {:?} and b {:?} (use batched_matmul for rank >= 3)",
                a.shape(),
                b.shape()
            ),
        ));
    }
    let (m, k, n) = mat_dims("matmul", a.shape(), b.shape(), trans_a, trans_b)?;
    match crate::cuda::common_device("matmul", &[a.tensor(), b.tensor()])? {
        Device::Cpu => {}
        d => {
            return crate::on_cuda!(
                d,
                crate::cuda::matmul::matmul(tape, a, b, (m, k, n), (trans_a, trans_b))
            )
        }
    }
    let mut out = vec![0f32; m * n];
    matmul_forward_cpu(
        &a.tensor().read_f32()?,
        &b.tensor().read_f32()?,
        m,
        k,
        n,
        trans_a,
        trans_b,
        &mut out,
    )?;
    let out = Tensor::f32(out, &[m, n])?;
    let (sa, sb) = (a.tensor().clone(), b.tensor().clone());
    Ok(tape.record(
        out,
        &[a, b],
        Box::new(move |g, needs| {
            let (da, db) = matmul_backward_cpu(
                &sa.read_f32()?,
                &sb.read_f32()?,
                &g.read_f32()?,
                m,
                k,
                n,
                trans_a,
                trans_b,
                needs[0],
                needs[1],
            )?;
            Ok(vec![
                da.map(|d| Tensor::f32(d, sa.shape())).transpose()?,
                db.map(|d| Tensor::f32(d, sb.shape())).transpose()?,
            ])
        }),
    ))
}

/// Products of matching batches: `a [..., m, k] x b [..., k, n] -> [..., m, n]` (before the
/// transposes, which apply to the last two dims). The leading dims must be identical (no
/// broadcasting) and the rank at least 3.
pub fn batched_matmul(tape: &Tape, a: &Var, b: &Var, trans_a: bool, trans_b: bool) -> Result<Var> {
    a.tensor().expect_float("batched_matmul")?;
    b.tensor().expect_float("batched_matmul")?;
    let (sa, sb) = (a.shape(), b.shape());
    if sa.len() < 3 || sb.len() != sa.len() || sa[..sa.len() - 2] != sb[..sb.len() - 2] {
        return Err(Error::shape(
            "batched_matmul",
            format!(
                "needs operands of the same rank >= 3 with identical leading (batch) dims, \
                 got a {sa:?} and b {sb:?}"
            ),
        ));
    }
    let (m, k, n) = mat_dims("batched_matmul", sa, sb, trans_a, trans_b)?;
    let lead = &sa[..sa.len() - 2];
    let batch: usize = lead.iter().product();
    match crate::cuda::common_device("batched_matmul", &[a.tensor(), b.tensor()])? {
        Device::Cpu => {}
        d => {
            let mut out_shape = lead.to_vec();
            out_shape.extend([m, n]);
            return crate::on_cuda!(
                d,
                crate::cuda::matmul::batched_matmul(
                    tape,
                    a,
                    b,
                    batch,
                    (m, k, n),
                    (trans_a, trans_b),
                    out_shape
                )
            );
        }
    }
    let mut out = vec![0f32; batch * m * n];
    batched_matmul_forward_cpu(
        &a.tensor().read_f32()?,
        &b.tensor().read_f32()?,
        batch,
        m,
        k,
        n,
        trans_a,
        trans_b,
        &mut out,
    )?;
    let mut out_shape = lead.to_vec();
    out_shape.extend([m, n]);
    let out = Tensor::f32(out, &out_shape)?;
    let (ta, tb) = (a.tensor().clone(), b.tensor().clone());
    Ok(tape.record(
        out,
        &[a, b],
        Box::new(move |g, needs| {
            let (da, db) = batched_matmul_backward_cpu(
                &ta.read_f32()?,
                &tb.read_f32()?,
                &g.read_f32()?,
                batch,
                m,
                k,
                n,
                trans_a,
                trans_b,
                needs[0],
                needs[1],
            )?;
            Ok(vec![
                da.map(|d| Tensor::f32(d, ta.shape())).transpose()?,
                db.map(|d| Tensor::f32(d, tb.shape())).transpose()?,
            ])
        }),
    ))
}

/// A dense layer: `x [..., in] -> x W^T + bias [..., out]`, with `weight [out, in]` (PyTorch's
/// layout, so checkpoints load unchanged) and `bias [out]`.
pub fn linear(tape: &Tape, x: &Var, weight: &Var, bias: Option<&Var>) -> Result<Var> {
    x.tensor().expect_float("linear")?;
    weight.tensor().expect_float("linear")?;
    let (xs, ws) = (x.shape(), weight.shape());
    if ws.len() != 2 || xs.is_empty() || xs[xs.len() - 1] != ws[1] {
        return Err(Error::shape(
            "linear",
            format!(
                "input {xs:?} does not fit weight {ws:?} (expected x [..., in], weight [out, in])"
            ),
        ));
    }
    let (out_f, in_f) = (ws[0], ws[1]);
    if let Some(b) = bias {
        b.tensor().expect_float("linear")?;
        if b.shape() != [out_f] {
            return Err(Error::shape(
                "linear",
                format!(
                    "bias {:?} does not fit weight {ws:?} (expected [{out_f}])",
                    b.shape()
                ),
            ));
        }
    }
    let rows: usize = xs[..xs.len() - 1].iter().product();
    let mut on: Vec<&Tensor> = vec![x.tensor(), weight.tensor()];
    on.extend(bias.map(|b| b.tensor()));
    match crate::cuda::common_device("linear", &on)? {
        Device::Cpu => {}
        d => {
            let mut out_shape = xs[..xs.len() - 1].to_vec();
            out_shape.push(out_f);
            return crate::on_cuda!(
                d,
                crate::cuda::matmul::linear(tape, x, weight, bias, rows, in_f, out_f, out_shape)
            );
        }
    }
    let mut out = vec![0f32; rows * out_f];
    {
        let bias_read = bias.map(|b| b.tensor().read_f32()).transpose()?;
        if weight.tensor().dtype() == DType::BF16 && bf16_products_active() {
            // A frozen bf16 teacher: bf16 products, f32 accumulation (see `gemm_bf16`).
            linear_forward_bf16_cpu(
                &x.tensor().read_f32()?,
                &weight.tensor().read_bf16()?,
                bias_read.as_deref(),
                rows,
                in_f,
                out_f,
                &mut out,
            )?;
        } else {
            linear_forward_cpu(
                &x.tensor().read_f32()?,
                &weight.tensor().read_f32()?,
                bias_read.as_deref(),
                rows,
                in_f,
                out_f,
                &mut out,
            )?;
        }
    }
    let mut out_shape = xs[..xs.len() - 1].to_vec();
    out_shape.push(out_f);
    let out = Tensor::f32(out, &out_shape)?;
    let (tx, tw) = (x.tensor().clone(), weight.tensor().clone());
    let backward = Box::new(move |g: &Tensor, needs: &[bool]| {
        let need = [needs[0], needs[1], needs.get(2).copied().unwrap_or(false)];
        let (dx, dw, db) = linear_backward_cpu(
            &tx.read_f32()?,
            &tw.read_f32()?,
            &g.read_f32()?,
            rows,
            in_f,
            out_f,
            need,
        )?;
        let mut grads = vec![
            dx.map(|d| Tensor::f32(d, tx.shape())).transpose()?,
            dw.map(|d| Tensor::f32(d, tw.shape())).transpose()?,
        ];
        if needs.len() == 3 {
            grads.push(db.map(|d| Tensor::f32(d, &[out_f])).transpose()?);
        }
        Ok(grads)
    });
    Ok(match bias {
        Some(b) => tape.record(out, &[x, weight, b], backward),
        None => tape.record(out, &[x, weight], backward),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::GradCheck;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        Tensor::randn(shape, 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap()
    }

    /// op(X)[i][j] for X stored `[r, c]`.
    fn at(x: &[f32], c: usize, i: usize, j: usize, trans: bool) -> f64 {
        (if trans { x[j * c + i] } else { x[i * c + j] }) as f64
    }

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<f32> {
        let ca = if ta { m } else { k };
        let cb = if tb { k } else { n };
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| at(a, ca, i, p, ta) * at(b, cb, p, j, tb))
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    fn assert_close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len());
        for (i, (x, y)) in got.iter().zip(want).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "element {i}: {x} vs {y}"
            );
        }
    }

    fn stored(rows: usize, cols: usize, trans: bool) -> [usize; 2] {
        if trans {
            [cols, rows]
        } else {
            [rows, cols]
        }
    }

    #[test]
    fn matmul_matches_naive_for_every_transpose() {
        let (m, k, n) = (13, 17, 11);
        for ta in [false, true] {
            for tb in [false, true] {
                let a = randn(&stored(m, k, ta), 1);
                let b = randn(&stored(k, n, tb), 2);
                let tape = Tape::inference();
                let y = matmul(
                    &tape,
                    &tape.constant(a.clone()),
                    &tape.constant(b.clone()),
                    ta,
                    tb,
                )
                .unwrap();
                assert_eq!(y.shape(), &[m, n]);
                let want = naive(
                    &a.to_vec_f32().unwrap(),
                    &b.to_vec_f32().unwrap(),
                    m,
                    k,
                    n,
                    ta,
                    tb,
                );
                assert_close(&y.tensor().to_vec_f32().unwrap(), &want, 1e-5);
            }
        }
    }

    #[test]
    fn matmul_accepts_bf16_inputs() {
        let a = randn(&[4, 6], 3).cast(DType::BF16).unwrap();
        let b = randn(&[6, 5], 4);
        let tape = Tape::inference();
        let y = matmul(
            &tape,
            &tape.constant(a.clone()),
            &tape.constant(b.clone()),
            false,
            false,
        )
        .unwrap();
        assert_eq!(y.tensor().dtype(), DType::F32);
        let want = naive(
            &a.to_vec_f32().unwrap(),
            &b.to_vec_f32().unwrap(),
            4,
            6,
            5,
            false,
            false,
        );
        assert_close(&y.tensor().to_vec_f32().unwrap(), &want, 1e-5);
    }

    #[test]
    fn matmul_gradients_for_every_transpose() {
        let (m, k, n) = (5, 7, 6);
        for ta in [false, true] {
            for tb in [false, true] {
                let inputs = [randn(&stored(m, k, ta), 5), randn(&stored(k, n, tb), 6)];
                let err = GradCheck::default()
                    .run(&inputs, &[0, 1], |tape, v| {
                        matmul(tape, &v[0], &v[1], ta, tb)
                    })
                    .unwrap();
                assert!(err < 1e-2, "{ta} {tb}: {err}");
            }
        }
    }

    #[test]
    fn matmul_rejects_bad_shapes() {
        let tape = Tape::inference();
        let a = tape.constant(randn(&[3, 4], 1));
        let b = tape.constant(randn(&[5, 2], 2));
        let err = matmul(&tape, &a, &b, false, false).unwrap_err().to_string();
        assert!(
            err.contains("matmul") && err.contains("[3, 4]") && err.contains("[5, 2]"),
            "{err}"
        );
        assert!(matmul(&tape, &a, &b, true, false).is_err());
        // [3,4]^T [5,2]^T: k = 3 vs 2
        assert!(matmul(&tape, &a, &b, false, true).is_err());
        let c = tape.constant(randn(&[2, 3, 4], 3));
        assert!(matmul(&tape, &c, &b, false, false).is_err());
        let ints = tape.constant(Tensor::from_vec(vec![1i32; 4], &[2, 2], Device::Cpu).unwrap());
        assert!(matmul(&tape, &ints, &ints, false, false).is_err());
    }

    fn batched_naive(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Vec<f32> {
        let (sa, sb) = (a.shape(), b.shape());
        let r = sa.len();
        let (m, k) = op_dims(sa[r - 2], sa[r - 1], ta);
        let n = op_dims(sb[r - 2], sb[r - 1], tb).1;
        let batch: usize = sa[..r - 2].iter().product();
        let (av, bv) = (a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
        (0..batch)
            .flat_map(|i| {
                naive(
                    &av[i * m * k..(i + 1) * m * k],
                    &bv[i * k * n..(i + 1) * k * n],
                    m,
                    k,
                    n,
                    ta,
                    tb,
                )
            })
            .collect()
    }

    #[test]
    fn batched_matmul_matches_naive_small_and_large_items() {
        // Small items take the parallel-over-batch path; 80x70x60 items the threaded-gemm path
        // (or parallel with serial gemm when the batch covers the threads).
        for &(lead, m, k, n) in &[
            (&[2usize, 3][..], 4usize, 5usize, 3usize),
            (&[3][..], 80, 70, 60),
            (&[1][..], 80, 70, 60),
        ] {
            for ta in [false, true] {
                for tb in [false, true] {
                    let mut sa = lead.to_vec();
                    sa.extend(stored(m, k, ta));
                    let mut sb = lead.to_vec();
                    sb.extend(stored(k, n, tb));
                    let (a, b) = (randn(&sa, 7), randn(&sb, 8));
                    let tape = Tape::inference();
                    let y = batched_matmul(
                        &tape,
                        &tape.constant(a.clone()),
                        &tape.constant(b.clone()),
                        ta,
                        tb,
                    )
                    .unwrap();
                    let mut want_shape = lead.to_vec();
                    want_shape.extend([m, n]);
                    assert_eq!(y.shape(), &want_shape[..]);
                    assert_close(
                        &y.tensor().to_vec_f32().unwrap(),
                        &batched_naive(&a, &b, ta, tb),
                        1e-4,
                    );
                }
            }
        }
    }

    #[test]
    fn batched_matmul_gradients() {
        for ta in [false, true] {
            for tb in [false, true] {
                let mut sa = vec![2, 3];
                sa.extend(stored(4, 5, ta));
                let mut sb = vec![2, 3];
                sb.extend(stored(5, 3, tb));
                let inputs = [randn(&sa, 9), randn(&sb, 10)];
                GradCheck::default()
                    .run(&inputs, &[0, 1], |tape, v| {
                        batched_matmul(tape, &v[0], &v[1], ta, tb)
                    })
                    .unwrap();
            }
        }
        // One input constant: only the other gets a gradient.
        let inputs = [randn(&[2, 4, 5], 11), randn(&[2, 5, 3], 12)];
        GradCheck::default()
            .run(&inputs, &[1], |tape, v| {
                batched_matmul(tape, &v[0], &v[1], false, false)
            })
            .unwrap();
    }

    #[test]
    fn batched_matmul_rejects_bad_shapes() {
        let tape = Tape::inference();
        let c = |s: &[usize]| tape.constant(randn(s, 1));
        let err = batched_matmul(&tape, &c(&[2, 3, 4]), &c(&[3, 4, 5]), false, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("batched_matmul")
                && err.contains("[2, 3, 4]")
                && err.contains("[3, 4, 5]"),
            "{err}"
        );
        assert!(batched_matmul(&tape, &c(&[3, 4]), &c(&[4, 5]), false, false).is_err());
        assert!(batched_matmul(&tape, &c(&[2, 3, 4]), &c(&[2, 5, 4]), false, false).is_err());
        assert!(batched_matmul(&tape, &c(&[2, 3, 4]), &c(&[1, 2, 4, 5]), false, false).is_err());
        assert!(batched_matmul(&tape, &c(&[2, 3, 4]), &c(&[2, 5, 4]), false, true).is_ok());
    }

    fn linear_naive(
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        rows: usize,
        i: usize,
        o: usize,
    ) -> Vec<f32> {
        let mut out = naive(x, w, rows, i, o, false, true);
        if let Some(b) = b {
            for r in 0..rows {
                for j in 0..o {
                    out[r * o + j] += b[j];
                }
            }
        }
        out
    }

    #[test]
    fn linear_matches_naive() {
        let x = randn(&[2, 3, 6], 13);
        let w = randn(&[4, 6], 14);
        let b = randn(&[4], 15);
        let tape = Tape::inference();
        let (xv, wv, bv) = (
            tape.constant(x.clone()),
            tape.constant(w.clone()),
            tape.constant(b.clone()),
        );
        let y = linear(&tape, &xv, &wv, Some(&bv)).unwrap();
        assert_eq!(y.shape(), &[2, 3, 4]);
        let (xs, ws, bs) = (
            x.to_vec_f32().unwrap(),
            w.to_vec_f32().unwrap(),
            b.to_vec_f32().unwrap(),
        );
        assert_close(
            &y.tensor().to_vec_f32().unwrap(),
            &linear_naive(&xs, &ws, Some(&bs), 6, 6, 4),
            1e-5,
        );
        let y = linear(&tape, &xv, &wv, None).unwrap();
        assert_close(
            &y.tensor().to_vec_f32().unwrap(),
            &linear_naive(&xs, &ws, None, 6, 6, 4),
            1e-5,
        );
        // A single vector in, a single vector out.
        let x1 = tape.constant(randn(&[6], 16));
        assert_eq!(linear(&tape, &x1, &wv, Some(&bv)).unwrap().shape(), &[4]);
    }

    #[test]
    fn linear_gradients() {
        let inputs = [randn(&[2, 3, 6], 17), randn(&[4, 6], 18), randn(&[4], 19)];
        GradCheck::default()
            .run(&inputs, &[0, 1, 2], |tape, v| {
                linear(tape, &v[0], &v[1], Some(&v[2]))
            })
            .unwrap();
        GradCheck::default()
            .run(&inputs[..2], &[0, 1], |tape, v| {
                linear(tape, &v[0], &v[1], None)
            })
            .unwrap();
        // Frozen input (data): only weight and bias get gradients.
        GradCheck::default()
            .run(&inputs, &[1, 2], |tape, v| {
                linear(tape, &v[0], &v[1], Some(&v[2]))
            })
            .unwrap();
    }

    #[test]
    fn linear_rejects_bad_shapes() {
        let tape = Tape::inference();
        let c = |s: &[usize]| tape.constant(randn(s, 1));
        let err = linear(&tape, &c(&[2, 5]), &c(&[4, 6]), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("linear") && err.contains("[2, 5]") && err.contains("[4, 6]"),
            "{err}"
        );
        assert!(linear(&tape, &c(&[2, 6]), &c(&[4, 6, 1]), None).is_err());
        assert!(linear(&tape, &c(&[2, 6]), &c(&[4, 6]), Some(&c(&[5]))).is_err());
        assert!(linear(&tape, &c(&[2, 6]), &c(&[4, 6]), Some(&c(&[4, 1]))).is_err());
    }

    /// A bf16 weight (a teacher's): with bf16 products the input is rounded to bf16 and the
    /// sums are f32; without them the weight is widened. Either way close to f64 arithmetic
    /// on the operands each path uses.
    #[test]
    fn linear_with_bf16_weights() {
        let (rows, in_f, out_f) = (37, 70, 45);
        let x = randn(&[rows, in_f], 1);
        let w = randn(&[out_f, in_f], 2).cast(DType::BF16).unwrap();
        let b = randn(&[out_f], 3).cast(DType::BF16).unwrap();
        let tape = Tape::inference();
        let y = linear(
            &tape,
            &tape.constant(x.clone()),
            &tape.constant(w.clone()),
            Some(&tape.constant(b.clone())),
        )
        .unwrap()
        .into_tensor()
        .to_vec_f32()
        .unwrap();
        let round = |v: f32| {
            if bf16_products_active() {
                half::bf16::from_f32(v).to_f32()
            } else {
                v
            }
        };
        let (xv, wv, bv) = (
            x.to_vec_f32().unwrap(),
            w.to_vec_f32().unwrap(),
            b.to_vec_f32().unwrap(),
        );
        for r in 0..rows {
            for o in 0..out_f {
                let terms: Vec<f64> = (0..in_f)
                    .map(|i| round(xv[r * in_f + i]) as f64 * wv[o * in_f + i] as f64)
                    .collect();
                let want = terms.iter().sum::<f64>() + bv[o] as f64;
                let mag: f64 = terms.iter().map(|t| t.abs()).sum::<f64>() + bv[o].abs() as f64;
                let got = y[r * out_f + o] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * mag,
                    "({r},{o}): {got} vs {want}"
                );
            }
        }
    }
}
