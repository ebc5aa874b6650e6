//! Matrix products on the tape: `matmul` (2-D), `batched_matmul` (rank >= 3, identical leading
//! batch dims: attention's per-head products) and `linear` (PyTorch's `x W^T + b`, every dense
//! layer of BERT and ResNet's classifier), each with one forward and one backward for every
//! device. The work is done by the backend-level functions of `crate::backend::matmul` (CPU arm
//! and CUDA arm beneath them), which also hold the kernels and the numerics.

use crate::backend::matmul::{linear_bwd, linear_fwd, matmul_bwd, matmul_fwd};
use crate::backend::ProductDims;
use crate::{Error, Result, Tape, Tensor, Var};

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
    let d = ProductDims::new("matmul", a.shape(), b.shape(), trans_a, trans_b)?;
    record_product(tape, a, b, d)
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
    let d = ProductDims::new("batched_matmul", sa, sb, trans_a, trans_b)?;
    record_product(tape, a, b, d)
}

/// The forward of a (batched) product and its one backward.
fn record_product(tape: &Tape, a: &Var, b: &Var, d: ProductDims) -> Result<Var> {
    let out = matmul_fwd(a.tensor(), b.tensor(), &d)?;
    let (ta, tb) = (a.tensor().clone(), b.tensor().clone());
    Ok(tape.record(
        out,
        &[a, b],
        Box::new(move |g, needs| {
            let [da, db] = matmul_bwd(&ta, &tb, g, &d, [needs[0], needs[1]])?;
            Ok(vec![da, db])
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
    let rows: usize = xs[..xs.len() - 1].iter().product();
    let mut out_shape = xs[..xs.len() - 1].to_vec();
    out_shape.push(out_f);
    let d = ProductDims::linear(rows, in_f, out_f, out_shape);
    let out = linear_fwd(x.tensor(), weight.tensor(), bias.map(|b| b.tensor()), &d)?;
    let (tx, tw) = (x.tensor().clone(), weight.tensor().clone());
    let backward = Box::new(move |g: &Tensor, needs: &[bool]| {
        let need = [needs[0], needs[1], needs.get(2).copied().unwrap_or(false)];
        let [dx, dw, db] = linear_bwd(&tx, &tw, g, &d, need)?;
        let mut grads = vec![dx, dw];
        if needs.len() == 3 {
            grads.push(db);
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
    use crate::backend::gemm::bf16_products_active;
    use crate::gradcheck::GradCheck;
    use crate::{DType, Device};

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

    /// `(rows, cols)` of `op(X)` for `X` stored `[r, c]`.
    fn op_dims(r: usize, c: usize, trans: bool) -> (usize, usize) {
        if trans {
            (c, r)
        } else {
            (r, c)
        }
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
