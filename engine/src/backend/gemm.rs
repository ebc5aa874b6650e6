//! The one CPU matrix-multiply primitive every op builds on (matmul, linear, conv via im2col,
//! attention): BLAS's `C = alpha * op(A) * op(B) + beta * C` over row-major f32 slices, run by
//! the `gemm` crate on all rayon threads.
//!
//! On a CPU with AVX-512F (checked at run time) the products run on our own AVX-512 kernel
//! (`avx512`): the `gemm` crate runs AVX2 kernels on stable Rust, half the peak of such a core
//! (docs/benchmarks-steps.md). Elsewhere, or after `set_avx512(false)`, the `gemm` crate runs
//! them. With the cargo feature `openblas`, `sgemm` calls the system OpenBLAS through
//! `cblas_sgemm` instead. The `gemm` crate stays the oracle (`sgemm_gemm_crate`), and tests
//! compare every path with it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use gemm::Parallelism;

#[cfg(target_arch = "x86_64")]
mod avx512;
/// The 16 x 16 register transpose of the sgemm's packing, shared with the convolutions'
/// channel-last copies.
#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::transpose16;
#[cfg(target_arch = "x86_64")]
mod bf16;

static AVX512_ENABLED: AtomicBool = AtomicBool::new(true);
static AVX512_ENV: OnceLock<bool> = OnceLock::new();
static BF16_ENABLED: AtomicBool = AtomicBool::new(true);
static BF16_ENV: OnceLock<bool> = OnceLock::new();

/// An operand of [`gemm_bf16`]: f32 values (rounded to bf16 when used) or bf16 ones.
#[derive(Clone, Copy)]
pub enum Half<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
}

impl Half<'_> {
    pub fn len(&self) -> usize {
        match self {
            Half::F32(v) => v.len(),
            Half::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Turns bf16 products ([`gemm_bf16`], used for bf16 weights) on or off for the whole
/// process (on by default where the CPU has AVX512_BF16). `RECYCLE_BF16_PRODUCTS=0` turns
/// them off from the start; then bf16 weights are widened and multiplied in f32.
pub fn set_bf16_products(on: bool) {
    BF16_ENABLED.store(on, Ordering::Relaxed);
}

/// Whether [`gemm_bf16`] can run now: AVX512_BF16 present, the AVX-512 kernels on, bf16
/// products not turned off.
pub fn bf16_products_active() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let env_on =
            *BF16_ENV.get_or_init(|| std::env::var("RECYCLE_BF16_PRODUCTS").as_deref() != Ok("0"));
        env_on && BF16_ENABLED.load(Ordering::Relaxed) && avx512_active() && bf16::bf16_available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `C[m, n] = A[m, k] * op(B)` with each product of two bf16 values (f32 operands rounded to
/// bf16, to nearest even) and f32 accumulation, as a GPU's bf16 matmul computes; `A` is
/// row-major, `B` is `[k, n]` or, when `trans_b`, `[n, k]`; C is overwritten. This is how bf16
/// weights multiply (a frozen teacher's, or a student's computing in bf16): twice the f32
/// kernel's multiply-adds per instruction. `parallel` spreads it over the rayon threads. An
/// error where [`bf16_products_active`] is false (callers check it and take the f32 path
/// instead).
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16(
    m: usize,
    n: usize,
    k: usize,
    a: Half,
    b: Half,
    trans_b: bool,
    c: &mut [f32],
    parallel: bool,
) -> Result<()> {
    bf16_product(m, n, k, a, b, trans_b, c, false, parallel)
}

/// [`gemm_bf16`] adding onto `C` (`C += A * op(B)`): a weight gradient summed over the groups
/// of a batch.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16_accumulate(
    m: usize,
    n: usize,
    k: usize,
    a: Half,
    b: Half,
    trans_b: bool,
    c: &mut [f32],
    parallel: bool,
) -> Result<()> {
    bf16_product(m, n, k, a, b, trans_b, c, true, parallel)
}

/// A left operand for [`gemm_bf16_packed`]: `A [m, k]` rounded to bf16 and laid out for the
/// kernel once, for products that use it many times (a convolution's weight, once per group
/// of images).
pub struct Bf16Lhs {
    m: usize,
    k: usize,
    #[cfg(target_arch = "x86_64")]
    packed: bf16::PackedLhs,
}

impl Bf16Lhs {
    /// `a [m, k]` (row-major) packed; an error where [`bf16_products_active`] is false.
    pub fn pack(m: usize, k: usize, a: Half) -> Result<Bf16Lhs> {
        if a.len() < m * k {
            return Err(Error::shape(
                "gemm_bf16",
                format!("a left operand of {} elements for m={m} k={k}", a.len()),
            ));
        }
        check_bf16_active()?;
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: AVX512_BF16 is present (checked above); the length too.
            let packed = unsafe { bf16::PackedLhs::new(m, k, a) };
            Ok(Bf16Lhs { m, k, packed })
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("bf16 products are never active off x86_64")
    }

    pub fn rows(&self) -> usize {
        self.m
    }

    pub fn depth(&self) -> usize {
        self.k
    }
}

/// [`gemm_bf16`] (or, when `accumulate`, [`gemm_bf16_accumulate`]) on a packed left operand:
/// `C[a.rows(), n] (+)= A * op(B)`.
pub fn gemm_bf16_packed(
    a: &Bf16Lhs,
    n: usize,
    b: Half,
    trans_b: bool,
    c: &mut [f32],
    accumulate: bool,
    parallel: bool,
) -> Result<()> {
    let (m, k) = (a.m, a.k);
    if b.len() < k * n || c.len() < m * n {
        return Err(Error::shape(
            "gemm_bf16",
            format!(
                "buffers of {}, {} elements for m={m} n={n} k={k}",
                b.len(),
                c.len()
            ),
        ));
    }
    check_bf16_active()?;
    if empty_product(m, n, k, c, accumulate) {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX512_BF16 is present (`check_bf16_active`); lengths checked above.
    unsafe {
        bf16::gemm_bf16_packed(&a.packed, n, b, trans_b, c, accumulate, parallel)
    };
    Ok(())
}

/// A product with no terms: `C` is left as it is, or zeroed when it is not accumulated into.
/// True when there is nothing more to do.
fn empty_product(m: usize, n: usize, k: usize, c: &mut [f32], accumulate: bool) -> bool {
    if k == 0 && !accumulate {
        c[..m * n].fill(0.0);
    }
    m == 0 || n == 0 || k == 0
}

fn check_bf16_active() -> Result<()> {
    if !bf16_products_active() {
        return Err(Error::invalid(
            "gemm_bf16",
            "bf16 products need AVX512_BF16 (or were turned off): use sgemm".to_string(),
        ));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn bf16_product(
    m: usize,
    n: usize,
    k: usize,
    a: Half,
    b: Half,
    trans_b: bool,
    c: &mut [f32],
    accumulate: bool,
    parallel: bool,
) -> Result<()> {
    if a.len() < m * k || b.len() < k * n || c.len() < m * n {
        return Err(Error::shape(
            "gemm_bf16",
            format!(
                "buffers of {}, {}, {} elements for m={m} n={n} k={k}",
                a.len(),
                b.len(),
                c.len()
            ),
        ));
    }
    check_bf16_active()?;
    if empty_product(m, n, k, c, accumulate) {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX512_BF16 is present (`bf16_products_active`); lengths checked above.
    unsafe {
        bf16::gemm_bf16(m, n, k, a, b, trans_b, c, accumulate, parallel)
    };
    Ok(())
}

/// Turns the AVX-512 kernel on or off for the whole process (on by default; benchmarks compare
/// the two paths in one run). Without AVX-512F on the CPU it stays off whatever is asked. The
/// environment variable `RECYCLE_GEMM=gemm-crate` turns it off from the start.
pub fn set_avx512(on: bool) {
    AVX512_ENABLED.store(on, Ordering::Relaxed);
}

/// Whether `sgemm` and `sgemm_serial` run the AVX-512 kernel now.
pub fn avx512_active() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let env_on = *AVX512_ENV
            .get_or_init(|| std::env::var("RECYCLE_GEMM").as_deref() != Ok("gemm-crate"));
        env_on && AVX512_ENABLED.load(Ordering::Relaxed) && avx512::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

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
    if settle_trivial(m, n, k, a, b, beta, c)? {
        return Ok(());
    }
    #[cfg(feature = "openblas")]
    {
        cblas::sgemm(trans_a, trans_b, m, n, k, alpha, a, b, beta, c)
    }
    #[cfg(not(feature = "openblas"))]
    {
        let parallel = m * n * k >= SERIAL_MNK;
        native(trans_a, trans_b, m, n, k, alpha, a, b, beta, c, parallel);
        Ok(())
    }
}

/// Checks the lengths and finishes the products with nothing to multiply (an empty `c`, or
/// `k = 0`, where `c = beta * c`); true when nothing is left to do.
fn settle_trivial(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
) -> Result<bool> {
    check_lengths(m, n, k, a, b, c)?;
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

/// Products with fewer multiply-adds than this run on one thread: splitting them across the
/// pool costs more than it saves (OpenBLAS uses the same threshold internally).
pub const SERIAL_MNK: usize = 64 * 64 * 64;

/// Whether `sgemm_serial` really stays on the calling thread, so that a caller may run many
/// independent products in parallel itself (conv over batch items, attention over heads).
/// False with `openblas`, whose own thread pool cannot be turned off per call (0.3.21).
pub const SERIAL_GEMM_AVAILABLE: bool = !cfg!(feature = "openblas");

/// `sgemm` on the calling thread only (when `SERIAL_GEMM_AVAILABLE`; otherwise the same as
/// `sgemm`, and callers should not run it from several threads at once).
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
    if cfg!(feature = "openblas") {
        return sgemm(trans_a, trans_b, m, n, k, alpha, a, b, beta, c);
    }
    if settle_trivial(m, n, k, a, b, beta, c)? {
        return Ok(());
    }
    native(trans_a, trans_b, m, n, k, alpha, a, b, beta, c, false);
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
    if settle_trivial(m, n, k, a, b, beta, c)? {
        return Ok(());
    }
    gemm_crate(
        trans_a,
        trans_b,
        m,
        n,
        k,
        alpha,
        a,
        b,
        beta,
        c,
        m * n * k >= SERIAL_MNK,
    );
    Ok(())
}

fn check_lengths(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &[f32]) -> Result<()> {
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
    Ok(())
}

/// The AVX-512 kernel when active, else the `gemm` crate; the caller has checked lengths and
/// that m, n, k are non-zero.
#[allow(clippy::too_many_arguments)]
fn native(
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
    #[cfg(target_arch = "x86_64")]
    if avx512_active() {
        // SAFETY: AVX-512F is present (`avx512_active`), and the caller checked the lengths.
        unsafe { avx512::sgemm(trans_a, trans_b, m, n, k, alpha, a, b, beta, c, parallel) };
        return;
    }
    gemm_crate(trans_a, trans_b, m, n, k, alpha, a, b, beta, c, parallel);
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
}

#[cfg(feature = "openblas")]
mod cblas {
    //! `cblas_sgemm` from the system OpenBLAS (LP64: 32-bit `int` sizes), linked by build.rs.

    use crate::{Error, Result};

    const ROW_MAJOR: i32 = 101;
    const NO_TRANS: i32 = 111;
    const TRANS: i32 = 112;

    extern "C" {
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
    ) -> Result<()> {
        let int = |v: usize| {
            i32::try_from(v).map_err(|_| {
                Error::invalid(
                    "sgemm",
                    format!("dimension {v} exceeds OpenBLAS's 32-bit sizes (m={m} n={n} k={k})"),
                )
            })
        };
        let (mi, ni, ki) = (int(m)?, int(n)?, int(k)?);
        let lda = if trans_a { mi } else { ki };
        let ldb = if trans_b { ki } else { ni };
        let t = |x: bool| if x { TRANS } else { NO_TRANS };
        // SAFETY: the caller checked that `a`, `b`, `c` hold at least m*k, k*n, m*n elements,
        // which with these leading dimensions bounds every access; `c` is borrowed mutably so
        // it aliases neither input. BLAS with beta == 0 overwrites C without reading it.
        unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                t(trans_a),
                t(trans_b),
                mi,
                ni,
                ki,
                alpha,
                a.as_ptr(),
                lda,
                b.as_ptr(),
                ldb,
                beta,
                c.as_mut_ptr(),
                ni,
            );
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
        let (m, n, k) = (96, 80, 72);
        let a: Vec<f32> = (0..m * k)
            .map(|i| crate::rng::normal_at(3, i as u64))
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| crate::rng::normal_at(4, i as u64))
            .collect();
        let mut c1 = vec![0f32; m * n];
        let mut c2 = vec![f32::NAN; m * n];
        sgemm(true, false, m, n, k, 1.0, &a, &b, 0.0, &mut c1).unwrap();
        sgemm_serial(true, false, m, n, k, 1.0, &a, &b, 0.0, &mut c2).unwrap();
        for (x, y) in c1.iter().zip(&c2) {
            assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
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
        for &(m, n, k) in &[(1, 1, 1), (7, 5, 3), (70, 33, 91), (257, 129, 300)] {
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
