//! The CUDA arm of the products' backend-level functions (`crate::backend::matmul`): cuBLASLt
//! products ([`super::blas`]) forward and backward. No tape here: the ops and their one
//! backward each are in `crate::ops::matmul`.
//!
//! Types: the product runs in the first operand's type (the activations'); the other operand
//! is cast to it when it differs (a bf16 weight under f32 activations). The output has that
//! type; each operand's gradient has the type of its operand (a bf16 product writes an f32
//! weight gradient directly, cuBLASLt's bf16-in/f32-out combination), the bias gradient is f32.
//! Backward is the two products of the gradient ([`grad_products`]), with transposes chosen so
//! that nothing is copied; `linear`'s bias gradient is the column sum kernel of `bias_add`.

use std::sync::Arc;

use super::blas::{self, Gemm};
use super::common::{as_dtype, empty, view};
use super::elementwise::{bias_add_bwd, channel_add};
use super::CudaContext;
use crate::backend::ProductDims;
use crate::{DType, Result, Tensor};

/// Which tensor a product of the backward reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operand {
    A,
    B,
    G,
}

/// One product `op(lhs) op(rhs)`, `[m, k] x [k, n]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Product {
    pub lhs: Operand,
    pub rhs: Operand,
    pub trans_l: bool,
    pub trans_r: bool,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

/// The products giving `dA` and `dB` (each in its operand's stored layout) of
/// `D = op(A) op(B)` (`[m, k] x [k, n]`) from `G = dD`: the CPU's `matmul_backward_cpu`.
pub(crate) fn grad_products(
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
) -> (Product, Product) {
    use Operand::*;
    let p = |lhs, rhs, trans_l, trans_r, m, k, n| Product {
        lhs,
        rhs,
        trans_l,
        trans_r,
        m,
        k,
        n,
    };
    let da = if trans_a {
        // A stored [k, m]: dA = op(B) G^T.
        p(B, G, trans_b, true, k, n, m)
    } else {
        // dA = G op(B)^T; op(B)^T is B as stored when trans_b.
        p(G, B, false, !trans_b, m, n, k)
    };
    let db = if trans_b {
        // B stored [n, k]: dB = G^T op(A).
        p(G, A, true, trans_a, n, m, k)
    } else {
        // dB = op(A)^T G.
        p(A, G, !trans_a, false, k, m, n)
    };
    (da, db)
}

/// `op(lhs) op(rhs) (+ bias)` over `d.batch` products, into a new tensor of `d.out_shape` in
/// `output` type. `lhs` and `rhs` share their type; `bias` has the output's.
fn product(
    ctx: &Arc<CudaContext>,
    lhs: &Tensor,
    rhs: &Tensor,
    bias: Option<&Tensor>,
    d: &ProductDims,
    output: DType,
) -> Result<Tensor> {
    const OP: &str = "matmul";
    let ProductDims {
        batch,
        m,
        k,
        n,
        trans_a,
        trans_b,
        ref out_shape,
    } = *d;
    let shape = &out_shape[..];
    let input = lhs.dtype();
    // f32 operands with a bf16 result is not a cuBLASLt combination: f32, then a cast.
    let direct = if input == DType::F32 {
        DType::F32
    } else {
        output
    };
    // The bias epilogue reads the vector with vector loads: a parameter view at an odd offset
    // of the flat buffer is copied to a fresh (pool-aligned) allocation.
    let bias = bias
        .map(|b| -> Result<Tensor> {
            let b = as_dtype(b, direct)?;
            if view(&b, OP)?.ptr % 16 == 0 {
                Ok(b)
            } else {
                super::elementwise::deep_copy(&b)
            }
        })
        .transpose()?;
    let out = if k == 0 {
        // cuBLASLt rejects k = 0; the product of empty sums is zero (plus the bias).
        let z = Tensor::zeros(shape, direct, lhs.device())?;
        if let Some(b) = &bias {
            channel_add(&z, b, &z, n, 1)?;
        }
        z
    } else {
        let out = empty(ctx, direct, shape)?;
        let g = Gemm {
            batch,
            m,
            k,
            n,
            trans_a,
            trans_b,
            input,
            output: direct,
            bias: bias.is_some(),
        };
        let bias_ptr = match &bias {
            Some(b) => view(b, OP)?.ptr,
            None => 0,
        };
        blas::gemm(
            ctx,
            &g,
            view(lhs, OP)?.ptr,
            view(rhs, OP)?.ptr,
            bias_ptr,
            view(&out, OP)?.ptr,
        )?;
        out
    };
    as_dtype(&out, output)
}

/// The CUDA arm of the products' forwards (validated by the caller): `D = op(A) op(B) (+ bias
/// along the last axis)` in `a`'s type, `b` cast to it.
pub(crate) fn product_fwd(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    d: &ProductDims,
) -> Result<Tensor> {
    let dtype = a.dtype();
    let ctx = view(a, op)?.ctx;
    let tb = as_dtype(b, dtype)?;
    product(&ctx, a, &tb, bias, d, dtype)
}

/// The CUDA arm of the products' backwards: `[dA, dB, dbias]` from the operands and the output
/// gradient `dy`, each when `need` asks for it; `dA` in `a`'s type, `dB` in `b`'s, `dbias`
/// (the column sums of `dy`) f32.
pub(crate) fn product_bwd(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    dy: &Tensor,
    d: &ProductDims,
    need: [bool; 3],
) -> Result<[Option<Tensor>; 3]> {
    let dtype = a.dtype();
    let ctx = view(a, op)?.ctx;
    let tb = as_dtype(b, dtype)?;
    let g = as_dtype(dy, dtype)?;
    let (pa, pb) = grad_products(d.m, d.k, d.n, d.trans_a, d.trans_b);
    let pick = |o: Operand| match o {
        Operand::A => a,
        Operand::B => &tb,
        Operand::G => &g,
    };
    let grad = |p: Product, output: DType, shape: &[usize]| {
        let dims = ProductDims {
            batch: d.batch,
            m: p.m,
            k: p.k,
            n: p.n,
            trans_a: p.trans_l,
            trans_b: p.trans_r,
            out_shape: shape.to_vec(),
        };
        product(&ctx, pick(p.lhs), pick(p.rhs), None, &dims, output)
    };
    let da = need[0].then(|| grad(pa, dtype, a.shape())).transpose()?;
    let db = need[1]
        .then(|| grad(pb, b.dtype(), b.shape()))
        .transpose()?;
    let dbias = need[2]
        .then(|| -> Result<Tensor> {
            // The column sums of G over all rows: f32 `[n]`.
            if g.elem_count().checked_div(d.n).unwrap_or(0) == 0 {
                return Tensor::zeros(&[d.n], DType::F32, g.device());
            }
            bias_add_bwd(&g, d.n, 1)
        })
        .transpose()?;
    Ok([da, db, dbias])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::matmul::{matmul_backward_cpu, matmul_forward_cpu};

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 13) as f32 / 4.0 - 1.5)
            .collect()
    }

    /// The backward products, run by the CPU matmul, give the CPU backward's gradients.
    #[test]
    fn gradient_products_match_the_cpu_backward() {
        let (m, k, n) = (3, 4, 5);
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                let a = values(m * k, 1);
                let b = values(k * n, 2);
                let g = values(m * n, 3);
                let (want_a, want_b) =
                    matmul_backward_cpu(&a, &b, &g, m, k, n, trans_a, trans_b, true, true).unwrap();
                let (pa, pb) = grad_products(m, k, n, trans_a, trans_b);
                for (p, want) in [(pa, want_a.unwrap()), (pb, want_b.unwrap())] {
                    let pick = |o| match o {
                        Operand::A => &a,
                        Operand::B => &b,
                        Operand::G => &g,
                    };
                    let mut got = vec![0f32; p.m * p.n];
                    matmul_forward_cpu(
                        pick(p.lhs),
                        pick(p.rhs),
                        p.m,
                        p.k,
                        p.n,
                        p.trans_l,
                        p.trans_r,
                        &mut got,
                    )
                    .unwrap();
                    assert_eq!(got, want, "{p:?} for trans {trans_a} {trans_b}");
                }
            }
        }
    }
}
