//! The one CPU matrix-multiply primitive every op builds on (matmul, linear, conv via im2col,
//! attention): BLAS's `C = alpha * op(A) * op(B) + beta * C` over row-major f32 slices, run by
//! the `gemm` crate on all rayon threads.

use gemm::Parallelism;

use crate::{Error, Result};

/// `C[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * C`, all row-major.
/// `A` is stored `[m, k]`, or `[k, m]` when `trans_a`; `B` is `[k, n]`, or `[n, k]` when
/// `trans_b`. With `beta == 0` the old contents of `C` are ignored (may be uninitialised
/// garbage, NaN included).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
) -> Result<()> {
    if a.len() < m * k || b.len() < k * n || c.len() < m * n {
        return Err(Error::shape(
            "sgemm",
            format!(
                "buffers of {}, {}, {} elements for m={m} n={n} k={k}",
                a.len(),
                b.len(),
                c.len()
            ),
        ));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        c[..m * n]
            .iter_mut()
            .for_each(|x| *x = if beta == 0.0 { 0.0 } else { *x * beta });
        return Ok(());
    }
    // (row stride, column stride) of each operand as stored.
    let (a_rs, a_cs) = if trans_a {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    let (b_rs, b_cs) = if trans_b {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    // Small products are faster on one thread than split across the pool.
    let parallelism = if m * n * k < 64 * 64 * 64 {
        Parallelism::None
    } else {
        Parallelism::Rayon(0)
    };
    // SAFETY: the length checks above keep every (row, column) access inside the slices; `c`
    // is borrowed mutably, so it aliases neither `a` nor `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            beta != 0.0,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            beta,  // the gemm crate scales the old dst by its `alpha` ...
            alpha, // ... and the product by its `beta`
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(ta: bool, tb: bool, m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += av as f64 * bv as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn matches_naive_for_every_transpose_and_beta() {
        let (m, n, k) = (70, 33, 91); // above the threading threshold, odd sizes
        let a: Vec<f32> = (0..m * k)
            .map(|i| crate::rng::normal_at(1, i as u64))
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| crate::rng::normal_at(2, i as u64))
            .collect();
        for ta in [false, true] {
            for tb in [false, true] {
                let want = naive(ta, tb, m, n, k, &a, &b);
                let mut c = vec![f32::NAN; m * n];
                sgemm(ta, tb, m, n, k, 1.0, &a, &b, 0.0, &mut c).unwrap();
                for (x, y) in c.iter().zip(&want) {
                    assert!(
                        (x - y).abs() < 1e-4 * (1.0 + y.abs()),
                        "{ta} {tb}: {x} vs {y}"
                    );
                }
                let mut c2 = vec![1.0f32; m * n];
                sgemm(ta, tb, m, n, k, 2.0, &a, &b, 0.5, &mut c2).unwrap();
                for (x, y) in c2.iter().zip(&want) {
                    assert!((x - (2.0 * y + 0.5)).abs() < 1e-3 * (1.0 + y.abs()));
                }
            }
        }
        assert!(sgemm(false, false, 4, 4, 4, 1.0, &a[..3], &b, 0.0, &mut [0.0; 16]).is_err());
    }
}
