//! The one CPU matrix-multiply primitive every op builds on (matmul, linear, conv via im2col,
//! attention): BLAS's `C = alpha * op(A) * op(B) + beta * C` over row-major f32 slices, run by
//! the `gemm` crate on all rayon threads.
//!
//! With the cargo feature `openblas`, products run on the system OpenBLAS (`cblas_sgemm`)
//! instead: on AVX-512 machines its kernels are much faster than the `gemm` crate's AVX2 ones
//! on stable Rust (docs/benchmarks.md). OpenBLAS is then pinned to one thread and the work is
//! split over rayon here, so that `sgemm_serial` really stays on its thread (conv runs batch
//! items in parallel) and the two thread pools never fight over the cores. The `gemm` crate
//! stays the default and the oracle (`sgemm_gemm_crate`); a test compares the two paths.

use gemm::Parallelism;

use crate::{Error, Result};

/// Products with fewer multiply-adds than this run on one thread: splitting them across the
/// pool costs more than it saves.
pub const SERIAL_MNK: usize = 64 * 64 * 64;

/// `C[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * C`, all row-major, on all rayon
/// threads. `A` is stored `[m, k]`, or `[k, m]` when `trans_a`; `B` is `[k, n]`, or `[n, k]`
/// when `trans_b`. With `beta == 0` the old contents of `C` are ignored (may be uninitialised
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
    if !degenerate(m, n, k, a, b, beta, c)? {
        let parallel = m * n * k >= SERIAL_MNK && rayon::current_num_threads() > 1;
        #[cfg(feature = "openblas")]
        cblas::sgemm(trans_a, trans_b, m, n, k, alpha, a, b, beta, c, parallel)?;
        #[cfg(not(feature = "openblas"))]
        gemm_crate(trans_a, trans_b, m, n, k, alpha, a, b, beta, c, parallel);
    }
    Ok(())
}

/// `sgemm` on the calling thread only, for callers that run many independent products in
/// parallel themselves (conv over batch items, attention over heads).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_serial(
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
    if !degenerate(m, n, k, a, b, beta, c)? {
        #[cfg(feature = "openblas")]
        cblas::sgemm(trans_a, trans_b, m, n, k, alpha, a, b, beta, c, false)?;
        #[cfg(not(feature = "openblas"))]
        gemm_crate(trans_a, trans_b, m, n, k, alpha, a, b, beta, c, false);
    }
    Ok(())
}

/// `sgemm` through the `gemm` crate whatever the features: the oracle the OpenBLAS path is
/// tested against.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_gemm_crate(
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
    if !degenerate(m, n, k, a, b, beta, c)? {
        let parallel = m * n * k >= SERIAL_MNK && rayon::current_num_threads() > 1;
        gemm_crate(trans_a, trans_b, m, n, k, alpha, a, b, beta, c, parallel);
    }
    Ok(())
}

/// Checks the buffer lengths and handles the products with nothing to multiply (an empty
/// `C`; `k == 0`, where `C = beta * C`). Returns whether it did (the caller then has nothing
/// left to do).
fn degenerate(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
) -> Result<bool> {
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
        return Ok(true);
    }
    if k == 0 {
        c[..m * n]
            .iter_mut()
            .for_each(|x| *x = if beta == 0.0 { 0.0 } else { *x * beta });
        return Ok(true);
    }
    Ok(false)
}

/// The `gemm` crate call; the caller has checked lengths and that m, n, k are non-zero.
#[allow(clippy::too_many_arguments)]
fn gemm_crate(
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
    parallel: bool,
) {
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
    let parallelism = if parallel {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: the length checks keep every (row, column) access inside the slices; `c` is
    // borrowed mutably, so it aliases neither `a` nor `b`.
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
}

#[cfg(feature = "openblas")]
mod cblas {
    //! `cblas_sgemm` from the system OpenBLAS (LP64: 32-bit `int` sizes), linked by build.rs.
    //! OpenBLAS's own threads are turned off once; parallel products are split into blocks of
    //! `C` here, one single-threaded `cblas_sgemm` per rayon task.

    use rayon::prelude::*;

    use crate::{Error, Result};

    const ROW_MAJOR: i32 = 101;
    const NO_TRANS: i32 = 111;
    const TRANS: i32 = 112;

    extern "C" {
        fn openblas_set_num_threads(n: i32);
        #[allow(clippy::too_many_arguments)]
        fn cblas_sgemm(
            order: i32,
            trans_a: i32,
            trans_b: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
    }

    static SINGLE_THREADED: std::sync::Once = std::sync::Once::new();

    /// A block of `C` written by one task; blocks are disjoint, so sending the pointer to
    /// another thread is sound.
    #[derive(Clone, Copy)]
    struct CPtr(*mut f32);
    unsafe impl Send for CPtr {}
    unsafe impl Sync for CPtr {}

    impl CPtr {
        // A method, so closures capture the whole (Send) wrapper rather than its raw field.
        fn get(self) -> *mut f32 {
            self.0
        }
    }

    /// The caller has checked lengths and that m, n, k are non-zero.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn sgemm(
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
        parallel: bool,
    ) -> Result<()> {
        for v in [m, n, k, m * k, k * n, m * n] {
            if i32::try_from(v).is_err() {
                return Err(Error::invalid(
                    "sgemm",
                    format!("m={m} n={n} k={k} exceeds OpenBLAS's 32-bit sizes"),
                ));
            }
        }
        // SAFETY: a plain setter of OpenBLAS's global thread count.
        SINGLE_THREADED.call_once(|| unsafe { openblas_set_num_threads(1) });
        let lda = if trans_a { m } else { k };
        let ldb = if trans_b { k } else { n };
        let (ap, bp, cp) = (
            a.as_ptr() as usize,
            b.as_ptr() as usize,
            CPtr(c.as_mut_ptr()),
        );
        // One block: rows [r0, r0 + rows) and columns [c0, c0 + cols) of C.
        let block = |r0: usize, rows: usize, c0: usize, cols: usize| {
            // Element offsets of the block's first row of op(A) and first column of op(B).
            let a_off = if trans_a { r0 } else { r0 * lda };
            let b_off = if trans_b { c0 * ldb } else { c0 };
            // SAFETY: the caller checked that `a`, `b`, `c` hold m*k, k*n, m*n elements; the
            // block lies inside those bounds with these leading dimensions, and blocks of `C`
            // handed to different tasks are disjoint. BLAS with beta == 0 overwrites C
            // without reading it. Every size fits in i32 (checked above).
            unsafe {
                cblas_sgemm(
                    ROW_MAJOR,
                    if trans_a { TRANS } else { NO_TRANS },
                    if trans_b { TRANS } else { NO_TRANS },
                    rows as i32,
                    cols as i32,
                    k as i32,
                    alpha,
                    (ap as *const f32).add(a_off),
                    lda as i32,
                    (bp as *const f32).add(b_off),
                    ldb as i32,
                    beta,
                    cp.get().add(r0 * n + c0),
                    n as i32,
                );
            }
        };
        if !parallel {
            block(0, m, 0, n);
            return Ok(());
        }
        // Split the longer side of C into a few blocks per thread (multiples of 16, the
        // kernels' register tile) so a thread slowed by other work does not hold up the rest.
        let tasks = 2 * rayon::current_num_threads();
        let split = |len: usize| {
            let step = len.div_ceil(tasks).next_multiple_of(16).max(16);
            (0..len.div_ceil(step)).map(move |i| (i * step, step.min(len - i * step)))
        };
        if m >= n {
            split(m)
                .collect::<Vec<_>>()
                .into_par_iter()
                .for_each(|(r0, rows)| block(r0, rows, 0, n));
        } else {
            split(n)
                .collect::<Vec<_>>()
                .into_par_iter()
                .for_each(|(c0, cols)| block(0, m, c0, cols));
        }
        Ok(())
    }
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

    #[test]
    fn serial_path_matches_threaded_path() {
        let (m, n, k) = (96, 200, 72);
        let a: Vec<f32> = (0..m * k)
            .map(|i| crate::rng::normal_at(3, i as u64))
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| crate::rng::normal_at(4, i as u64))
            .collect();
        let mut c1 = vec![0f32; m * n];
        let mut c2 = vec![f32::NAN; m * n];
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            // Wide C (split by columns) and tall C (split by rows, operands swapped).
            sgemm(ta, tb, m, n, k, 1.0, &a, &b, 0.0, &mut c1).unwrap();
            sgemm_serial(ta, tb, m, n, k, 1.0, &a, &b, 0.0, &mut c2).unwrap();
            for (x, y) in c1.iter().zip(&c2) {
                assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
            }
            sgemm(ta, tb, n, m, k, 1.0, &b, &a, 0.0, &mut c1).unwrap();
            sgemm_serial(ta, tb, n, m, k, 1.0, &b, &a, 0.0, &mut c2).unwrap();
            for (x, y) in c1.iter().zip(&c2) {
                assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
        assert!(
            sgemm_serial(false, false, 4, 4, 4, 1.0, &a[..3], &b, 0.0, &mut [0.0; 16]).is_err()
        );
    }

    /// With `--features openblas`, `sgemm` runs OpenBLAS: it must agree with the `gemm` crate
    /// for every transpose, alpha/beta, odd sizes, and a NaN-filled C with beta == 0.
    #[cfg(feature = "openblas")]
    #[test]
    fn openblas_matches_gemm_crate() {
        // Small (one call), tall and wide (split over threads into blocks of C).
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 5, 3),
            (70, 33, 91),
            (257, 129, 300),
            (40, 531, 77),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| crate::rng::normal_at(5, i as u64))
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| crate::rng::normal_at(6, i as u64))
                .collect();
            for ta in [false, true] {
                for tb in [false, true] {
                    for (alpha, beta) in [(1.0, 0.0), (0.5, 2.0)] {
                        let init: Vec<f32> = (0..m * n).map(|i| i as f32 * 0.01).collect();
                        let mut want = init.clone();
                        sgemm_gemm_crate(ta, tb, m, n, k, alpha, &a, &b, beta, &mut want).unwrap();
                        let mut got = if beta == 0.0 {
                            vec![f32::NAN; m * n]
                        } else {
                            init
                        };
                        sgemm(ta, tb, m, n, k, alpha, &a, &b, beta, &mut got).unwrap();
                        for (x, y) in got.iter().zip(&want) {
                            assert!(
                                (x - y).abs() < 1e-4 * (1.0 + y.abs()),
                                "{m}x{n}x{k} {ta} {tb}: {x} vs {y}"
                            );
                        }
                    }
                }
            }
        }
    }
}
