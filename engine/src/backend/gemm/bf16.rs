//! bf16 products (AVX512_BF16): `C = A * op(B)` with each product of two bf16 values and f32
//! accumulation, as cuBLASLt computes a bf16 matmul on a GPU. A frozen teacher's weights are
//! bf16, and a student computing in bf16 keeps a bf16 working copy of its weights: their
//! products (forward and both gradients) run here instead of widening to f32 for `sgemm`.
//!
//! One `vdpbf16ps` does two multiply-adds per f32 lane, twice an FMA's work, at the same
//! instruction rate on Zen 4. Operands are packed as pairs along k (one u32 holds
//! `op(X)[.., 2q]` in its low half and `op(X)[.., 2q + 1]` in its high half, f32 values
//! rounded to nearest even on the way), and the blocking is the f32 kernel's (`avx512`):
//! `NR`-column B panels k-major, A in `MR`-row panels k-major (`MR` pairs per k step), and a
//! tile of `MR x NR` accumulators. A is always packed: read in place, each of the 12 rows of a
//! tile needs its own pointer, and the kernel then issues twice the loads of its
//! `vdpbf16ps` (a pointer and a broadcast per row), which held it below the f32 kernel's speed.
//! Every packing path converts and transposes 16 x 16 blocks of pairs in registers.

use std::arch::x86_64::*;
use std::cell::RefCell;

use rayon::prelude::*;

use super::avx512::{available, transpose16, MR, NR};
use super::Half;

/// Rows of the smaller tile used for the last panel of a block when it has at most 8 rows.
const MR_SMALL: usize = 8;
/// Pairs of k per packed slice: the B panel `KCP x NR` u32 is 32 KiB, as for f32.
const KCP: usize = 256;
/// Rows of C per block (a multiple of `MR`): their `MC x KCP` pairs, 240 KiB, stay in L2.
const MC: usize = 240;
/// Columns of a packed B block (a multiple of `NR`).
const NC: usize = 4096;

/// Whether this CPU has AVX512_BF16 (and the AVX-512F, BW and VL the packing uses).
pub fn bf16_available() -> bool {
    available()
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512bf16")
}

/// A matrix view over a [`Half`]: element `(i, j)` at index `off + i * rs + j * cs`; either
/// `cs == 1` (rows contiguous) or `rs == 1` (columns contiguous).
#[derive(Clone, Copy)]
struct HView<'a> {
    data: Half<'a>,
    off: usize,
    rs: usize,
    cs: usize,
}

// SAFETY: `HView` only reads slices that the caller of `gemm_bf16` keeps borrowed.
unsafe impl Send for HView<'_> {}
unsafe impl Sync for HView<'_> {}

impl HView<'_> {
    fn at(self, i: usize, j: usize) -> Self {
        HView {
            off: self.off + i * self.rs + j * self.cs,
            ..self
        }
    }
}

#[derive(Clone, Copy)]
struct CPtr(*mut f32);
// SAFETY: each thread writes a disjoint part of C (see `gemm_bf16`).
unsafe impl Send for CPtr {}
unsafe impl Sync for CPtr {}
impl CPtr {
    fn add(self, off: usize) -> *mut f32 {
        self.0.wrapping_add(off)
    }
}

/// A left operand packed once for many products: `MR`-row panels of all `k.div_ceil(2)` pairs,
/// k-major (`pack_a_bf16`'s layout over the whole depth). A convolution's weight is used by
/// every group of images: packed per product, it cost as much as the product where the
/// images are small (ResNet-50's 7x7 layers: 2.4 M weights against 49 pixels an image).
pub struct PackedLhs {
    m: usize,
    k: usize,
    data: Vec<u32>,
}

impl PackedLhs {
    /// `A [m, k]` (row-major) packed.
    ///
    /// # Safety
    /// AVX512_BF16 (`bf16_available()`); `a` holds at least `m * k` elements.
    pub unsafe fn new(m: usize, k: usize, a: Half) -> PackedLhs {
        debug_assert!(a.len() >= m * k);
        let mut data = vec![0u32; m.div_ceil(MR) * MR * k.div_ceil(2)];
        if m > 0 && k > 0 {
            let view = HView {
                data: a,
                off: 0,
                rs: k,
                cs: 1,
            };
            pack_a_bf16(view, m, k, &mut data);
        }
        PackedLhs { m, k, data }
    }
}

/// Where `serial_bf16` reads A: rows to pack per block, or panels packed beforehand (from
/// row `row0`, a multiple of `MR`, of a [`PackedLhs`]).
#[derive(Clone, Copy)]
enum Lhs<'a> {
    Rows(HView<'a>),
    Packed { panels: &'a [u32], row0: usize },
}

// SAFETY: as `HView`: only read while the caller's operands stay borrowed.
unsafe impl Send for Lhs<'_> {}
unsafe impl Sync for Lhs<'_> {}

impl Lhs<'_> {
    fn at_row(self, i: usize) -> Self {
        match self {
            Lhs::Rows(v) => Lhs::Rows(v.at(i, 0)),
            Lhs::Packed { panels, row0 } => Lhs::Packed {
                panels,
                row0: row0 + i,
            },
        }
    }
}

/// A growable u32 buffer whose usable part starts on a 64-byte boundary (a panel row that
/// straddles two cache lines costs the kernel a split load per vector).
struct AlignedPairs {
    data: Vec<u32>,
}

impl AlignedPairs {
    const fn new() -> Self {
        AlignedPairs { data: Vec::new() }
    }

    fn get(&mut self, len: usize) -> &mut [u32] {
        if self.data.len() < len + 16 {
            self.data = vec![0u32; len + 16];
        }
        let skip = self.data.as_ptr().align_offset(64).min(15);
        &mut self.data[skip..skip + len]
    }
}

thread_local! {
    /// The packing buffers (B panels, A panels) of this thread, kept between calls.
    static PACK16: RefCell<(AlignedPairs, AlignedPairs)> =
        const { RefCell::new((AlignedPairs::new(), AlignedPairs::new())) };
}

/// `C[m, n] (+)= A[m, k] * op(B)` in bf16 products with f32 accumulation, `A` row-major,
/// `B` `[k, n]` or, when `trans_b`, `[n, k]`. C is overwritten, or added to when
/// `accumulate`.
///
/// # Safety
/// The CPU must have AVX512_BF16 (`bf16_available()`); `a`, `b`, `c` hold at least `m*k`,
/// `k*n`, `m*n` elements; m, n, k non-zero.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_bf16(
    m: usize,
    n: usize,
    k: usize,
    a: Half,
    b: Half,
    trans_b: bool,
    c: &mut [f32],
    accumulate: bool,
    parallel: bool,
) {
    debug_assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    let av = HView {
        data: a,
        off: 0,
        rs: k,
        cs: 1,
    };
    drive(m, n, k, Lhs::Rows(av), b, trans_b, c, accumulate, parallel);
}

/// [`gemm_bf16`] with A packed beforehand: `C[a.rows(), n] (+)= A * op(B)`.
///
/// # Safety
/// As [`gemm_bf16`], with `m = a.rows()`, `k = a.depth()`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_bf16_packed(
    a: &PackedLhs,
    n: usize,
    b: Half,
    trans_b: bool,
    c: &mut [f32],
    accumulate: bool,
    parallel: bool,
) {
    let lhs = Lhs::Packed {
        panels: &a.data,
        row0: 0,
    };
    drive(a.m, n, a.k, lhs, b, trans_b, c, accumulate, parallel);
}

/// Splits C among the threads (columns, or rows in whole `MR` panels) for `serial_bf16`.
#[allow(clippy::too_many_arguments)]
unsafe fn drive(
    m: usize,
    n: usize,
    k: usize,
    a: Lhs,
    b: Half,
    trans_b: bool,
    c: &mut [f32],
    accumulate: bool,
    parallel: bool,
) {
    let (rs, cs) = if trans_b { (1, k) } else { (n, 1) };
    let bv = HView {
        data: b,
        off: 0,
        rs,
        cs,
    };
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let cp = CPtr(c.as_mut_ptr());
    if threads <= 1 {
        serial_bf16(m, n, k, a, bv, cp.0, n, accumulate);
    } else if n >= m {
        let per = n.div_ceil(threads).div_ceil(NR) * NR;
        (0..n.div_ceil(per)).into_par_iter().for_each(|t| {
            let j0 = t * per;
            let nn = per.min(n - j0);
            // SAFETY: threads write disjoint column ranges of C.
            unsafe { serial_bf16(m, nn, k, a, bv.at(0, j0), cp.add(j0), n, accumulate) };
        });
    } else {
        let per = m.div_ceil(threads).div_ceil(MR) * MR;
        (0..m.div_ceil(per)).into_par_iter().for_each(|t| {
            let i0 = t * per;
            let mm = per.min(m - i0);
            let ci = cp.add(i0 * n);
            // SAFETY: threads write disjoint row ranges of C.
            unsafe { serial_bf16(mm, n, k, a.at_row(i0), bv, ci, n, accumulate) };
        });
    }
}

/// The serial algorithm over one part of C (`ldc` = its row stride).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn serial_bf16(
    m: usize,
    n: usize,
    k: usize,
    a: Lhs,
    b: HView,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let kp_all = k.div_ceil(2);
    PACK16.with(|bufs| {
        let mut bufs = bufs.borrow_mut();
        let (bbuf, abuf) = &mut *bufs;
        let kp_max = k.min(2 * KCP).div_ceil(2);
        let bpack = bbuf.get(kp_max * n.min(NC).div_ceil(NR) * NR);
        let apack = match a {
            Lhs::Rows(_) => abuf.get(kp_max * m.min(MC).div_ceil(MR) * MR),
            Lhs::Packed { .. } => abuf.get(0),
        };
        for j0 in (0..n).step_by(NC) {
            let nc = NC.min(n - j0);
            for p0 in (0..k).step_by(2 * KCP) {
                let kc = (2 * KCP).min(k - p0);
                let kp = kc.div_ceil(2);
                // Later k slices add onto the first one's result.
                let add = accumulate || p0 > 0;
                pack_b_bf16(b.at(p0, j0), kc, nc, bpack);
                for i0 in (0..m).step_by(MC) {
                    let mc = MC.min(m - i0);
                    // Panel `ir / MR` of this block and slice: `MR` pairs a step from `ap`.
                    let (ap, panel_len) = match a {
                        Lhs::Rows(v) => {
                            pack_a_bf16(v.at(i0, p0), mc, kc, apack);
                            (apack.as_ptr(), MR * kp)
                        }
                        Lhs::Packed { panels, row0 } => {
                            let first = (row0 + i0) / MR * MR * kp_all + p0 / 2 * MR;
                            (panels.as_ptr().add(first), MR * kp_all)
                        }
                    };
                    for jr in (0..nc).step_by(NR) {
                        let nr = NR.min(nc - jr);
                        let bp = bpack.as_ptr().add(jr * kp);
                        let mut ir = 0;
                        while ir < mc {
                            let rows = if mc - ir <= MR_SMALL { MR_SMALL } else { MR };
                            let t = Tile {
                                c: c.add((i0 + ir) * ldc + j0 + jr),
                                ldc,
                                mr: rows.min(mc - ir),
                                nr,
                                add,
                            };
                            let ap = ap.add(ir / MR * panel_len);
                            match (rows, nr > 16) {
                                (MR, true) => kernel_bf16::<MR, 2>(kp, ap, bp, t),
                                (MR, false) => kernel_bf16::<MR, 1>(kp, ap, bp, t),
                                (_, true) => kernel_bf16::<MR_SMALL, 2>(kp, ap, bp, t),
                                (_, false) => kernel_bf16::<MR_SMALL, 1>(kp, ap, bp, t),
                            }
                            ir += t.mr;
                        }
                    }
                }
            }
        }
    });
}

fn mask16(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// Up to 16 pairs from a run of `len` consecutive elements of `data` starting at `at` (k
/// along the run), bf16-rounded; zero past `len` (masked loads: nothing past it is read).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pairs16(data: Half, at: usize, len: usize) -> __m512i {
    let n = len.min(32);
    match data {
        Half::F32(v) => {
            let p = v.as_ptr().wrapping_add(at);
            let lo = _mm512_maskz_loadu_ps(mask16(n), p);
            let hi = _mm512_maskz_loadu_ps(mask16(n.saturating_sub(16)), p.wrapping_add(16));
            // SAFETY (transmute): __m512bh and __m512i are both 512 plain bits.
            std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
        }
        Half::Bf16(v) => {
            let mask: __mmask32 = if n >= 32 { !0 } else { (1u32 << n) - 1 };
            _mm512_maskz_loadu_epi16(mask, v.as_ptr().wrapping_add(at) as *const i16)
        }
    }
}

/// 16 values of row `at..` (one per column, `live` of them) of a row-major operand as the
/// low (or, shifted, high) halves of 16 u32 pairs.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn halves16(data: Half, at: usize, live: usize) -> __m512i {
    match data {
        Half::F32(v) => {
            let x = _mm512_maskz_loadu_ps(mask16(live), v.as_ptr().wrapping_add(at));
            // SAFETY (transmute): __m256bh and __m256i are both 256 plain bits.
            let h = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(x));
            _mm512_cvtepu16_epi32(h)
        }
        Half::Bf16(v) => _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
            mask16(live),
            v.as_ptr().wrapping_add(at) as *const i16,
        )),
    }
}

/// Writes the transpose of 16 vectors of pairs (`rows[r]` = 16 pairs of line `r`) to `dst`:
/// pair `q` of lines `0..lanes` at `dst + (q0 + q) * stride`, for `q < qn`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn store_transposed(
    rows: [__m512i; 16],
    dst: *mut u32,
    stride: usize,
    lanes: usize,
    qn: usize,
) {
    // SAFETY (transmute): 16 vectors of 512 plain bits either way (a `map` with a cast would
    // be a closure without the target features, called per vector).
    let t = transpose16(std::mem::transmute::<[__m512i; 16], [__m512; 16]>(rows));
    for (q, v) in t.iter().enumerate().take(qn) {
        _mm512_mask_storeu_ps(dst.add(q * stride) as *mut f32, mask16(lanes), *v);
    }
}

/// Packs rows `0..mc` of `A[.., 0..kc]` (row-major) into `MR`-row panels of pairs, k-major
/// (`MR` u32 per pair step, `kc.div_ceil(2) * MR` per panel), zero past `mc` in the last.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack_a_bf16(a: HView, mc: usize, kc: usize, dst: &mut [u32]) {
    debug_assert_eq!(a.cs, 1);
    let kp = kc.div_ceil(2);
    for (pi, panel) in dst[..mc.div_ceil(MR) * MR * kp]
        .chunks_exact_mut(MR * kp)
        .enumerate()
    {
        let rows = MR.min(mc - pi * MR);
        for q0 in (0..kp).step_by(16) {
            let mut block = [_mm512_setzero_si512(); 16];
            for (r, v) in block.iter_mut().enumerate().take(rows) {
                let at = a.off + (pi * MR + r) * a.rs + 2 * q0;
                *v = pairs16(a.data, at, kc - 2 * q0);
            }
            let dst = panel.as_mut_ptr().add(q0 * MR);
            store_transposed(block, dst, MR, MR, 16.min(kp - q0));
        }
    }
}

/// Packs `op(B)[0..kc, 0..nc]` into `NR`-column panels of pairs, k-major (`NR` u32 per pair
/// step, `kc.div_ceil(2) * NR` per panel), zero past `kc` and `nc`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack_b_bf16(b: HView, kc: usize, nc: usize, dst: &mut [u32]) {
    let kp = kc.div_ceil(2);
    for (pj, panel) in dst[..nc.div_ceil(NR) * NR * kp]
        .chunks_exact_mut(NR * kp)
        .enumerate()
    {
        let j0 = pj * NR;
        for h in 0..NR / 16 {
            let live = nc.saturating_sub(j0 + 16 * h).min(16);
            let jh = j0 + 16 * h;
            if b.cs == 1 {
                // Row-major: rows 2q and 2q + 1 make one row of pairs.
                for q in 0..kp {
                    let row = |p: usize| {
                        if p < kc && live > 0 {
                            halves16(b.data, b.off + p * b.rs + jh, live)
                        } else {
                            _mm512_setzero_si512()
                        }
                    };
                    let pairs =
                        _mm512_or_si512(row(2 * q), _mm512_slli_epi32::<16>(row(2 * q + 1)));
                    let d = panel.as_mut_ptr().add(q * NR + 16 * h);
                    _mm512_storeu_si512(d as *mut __m512i, pairs);
                }
            } else {
                // Columns contiguous: each column of op(B) is a run of pairs; transpose.
                debug_assert_eq!(b.rs, 1);
                for q0 in (0..kp).step_by(16) {
                    let mut block = [_mm512_setzero_si512(); 16];
                    for (jj, v) in block.iter_mut().enumerate().take(live) {
                        let at = b.off + (jh + jj) * b.cs + 2 * q0;
                        *v = pairs16(b.data, at, kc - 2 * q0);
                    }
                    let d = panel.as_mut_ptr().add(q0 * NR + 16 * h);
                    store_transposed(block, d, NR, 16, 16.min(kp - q0));
                }
            }
        }
    }
}

/// Where one register tile writes: `mr` rows of `nr` columns at `c`, `ldc` apart; added to
/// the old values when `add`.
#[derive(Clone, Copy)]
struct Tile {
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    add: bool,
}

/// One `R x 16 NV` tile: `kp` pair steps of `a` (an `MR`-row panel, `MR` pairs a step) times
/// `b` (an `NR`-column panel): per step `NV` vector loads of B, `R` broadcasts of A and
/// `R * NV` `vdpbf16ps`. Rows past `mr` are zero in the panel and not stored.
///
/// # Safety
/// AVX512_BF16; `a` holds `kp * MR` u32, `b` `kp * NR` (64-byte aligned); `t.c` valid for
/// `mr` rows of `nr` columns at stride `ldc`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn kernel_bf16<const R: usize, const NV: usize>(
    kp: usize,
    a: *const u32,
    b: *const u32,
    t: Tile,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    let (mut a, mut b) = (a, b);
    for _ in 0..kp {
        let bv: [__m512bh; NV] = std::array::from_fn(|v| {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_load_si512(
                b.add(16 * v) as *const __m512i
            ))
        });
        for (r, row) in acc.iter_mut().enumerate() {
            let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*a.add(r) as i32));
            for v in 0..NV {
                row[v] = _mm512_dpbf16_ps(row[v], av, bv[v]);
            }
        }
        a = a.add(MR);
        b = b.add(NR);
    }
    for (r, row) in acc.iter().enumerate().take(t.mr) {
        let crow = t.c.add(r * t.ldc);
        for (v, out) in row.iter().enumerate() {
            let m = mask16(t.nr.saturating_sub(16 * v));
            if m == 0 {
                continue;
            }
            let p = crow.add(16 * v);
            let mut out = *out;
            if t.add {
                out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(m, p));
            }
            _mm512_mask_storeu_ps(p, m, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bf16 products against f64 on the bf16-rounded operands: every operand kind, odd k,
    /// ragged edges, several k slices, row blocks and tile heights, both drivers, and the
    /// accumulating form.
    #[test]
    fn bf16_matches_rounded_f64_reference() {
        if !bf16_available() {
            eprintln!("no AVX512_BF16 on this CPU: bf16 kernel not tested");
            return;
        }
        use half::bf16;
        let round = |v: f32| bf16::from_f32(v).to_f32();
        for (si, &(m, n, k)) in [
            (1, 1, 1),
            (5, 7, 3),
            (13, 33, 17),
            (25, 70, 300),
            (40, 20, 600),
            (250, 45, 64),
            (30, 5000, 9),
            (64, 40, 1031),
        ]
        .iter()
        .enumerate()
        {
            let af: Vec<f32> = (0..m * k)
                .map(|i| crate::rng::normal_at(40 + si as u64, i as u64))
                .collect();
            let bf: Vec<f32> = (0..k * n)
                .map(|i| crate::rng::normal_at(50 + si as u64, i as u64))
                .collect();
            let ab: Vec<bf16> = af.iter().map(|&v| bf16::from_f32(v)).collect();
            let bb: Vec<bf16> = bf.iter().map(|&v| bf16::from_f32(v)).collect();
            let init: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32 - 3.0).collect();
            for a_bf16 in [false, true] {
                for (b_bf16, trans_b) in
                    [(false, false), (true, true), (false, true), (true, false)]
                {
                    for (parallel, accumulate) in [(false, false), (true, false), (true, true)] {
                        let a = if a_bf16 {
                            Half::Bf16(&ab)
                        } else {
                            Half::F32(&af)
                        };
                        let b = if b_bf16 {
                            Half::Bf16(&bb)
                        } else {
                            Half::F32(&bf)
                        };
                        let mut got = if accumulate {
                            init.clone()
                        } else {
                            vec![f32::NAN; m * n]
                        };
                        // SAFETY: AVX512_BF16 checked above; slices sized for m, n, k.
                        unsafe {
                            gemm_bf16(m, n, k, a, b, trans_b, &mut got, accumulate, parallel)
                        };
                        for i in 0..m {
                            for j in 0..n {
                                let mut want = if accumulate {
                                    init[i * n + j] as f64
                                } else {
                                    0.0
                                };
                                let mut mag = want.abs();
                                for p in 0..k {
                                    let bv = if trans_b {
                                        bf[j * k + p]
                                    } else {
                                        bf[p * n + j]
                                    };
                                    let t = round(af[i * k + p]) as f64 * round(bv) as f64;
                                    want += t;
                                    mag += t.abs();
                                }
                                let g = got[i * n + j] as f64;
                                assert!(
                                    (g - want).abs() <= 1e-5 * mag + 1e-6,
                                    "{m}x{n}x{k} a_bf16={a_bf16} b_bf16={b_bf16} \
                                     trans_b={trans_b} parallel={parallel} \
                                     accumulate={accumulate} ({i},{j}): {g} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// A left operand packed once gives the same bits as packed per product, on both drivers
    /// (row splits start at whole panels) and with several row blocks and k slices.
    #[test]
    fn packed_lhs_matches_packing_per_product() {
        if !bf16_available() {
            return;
        }
        for (si, &(m, n, k)) in [(5, 7, 3), (250, 45, 1031), (40, 300, 64), (600, 20, 17)]
            .iter()
            .enumerate()
        {
            let af: Vec<f32> = (0..m * k)
                .map(|i| crate::rng::normal_at(60 + si as u64, i as u64))
                .collect();
            let bf: Vec<f32> = (0..k * n)
                .map(|i| crate::rng::normal_at(70 + si as u64, i as u64))
                .collect();
            let ab: Vec<half::bf16> = af.iter().map(|&v| half::bf16::from_f32(v)).collect();
            for a in [Half::F32(&af), Half::Bf16(&ab)] {
                // SAFETY: AVX512_BF16 checked above; slices sized for m, n, k.
                let packed = unsafe { PackedLhs::new(m, k, a) };
                for (parallel, accumulate) in [(false, false), (true, false), (true, true)] {
                    let mut want = vec![1f32; m * n];
                    let mut got = want.clone();
                    let b = Half::F32(&bf);
                    // SAFETY: as above.
                    unsafe {
                        gemm_bf16(m, n, k, a, b, false, &mut want, accumulate, parallel);
                        gemm_bf16_packed(&packed, n, b, false, &mut got, accumulate, parallel);
                    }
                    assert_eq!(got, want, "{m}x{n}x{k} parallel={parallel}");
                }
            }
        }
    }

    /// Writes stay inside the m x n block of C, and rows of a short last panel are not
    /// stored: a guard after C is untouched.
    #[test]
    fn bf16_writes_nothing_past_c() {
        if !bf16_available() {
            return;
        }
        let (m, n, k) = (13, 35, 9);
        let (a, b) = (vec![1f32; m * k], vec![1f32; k * n]);
        let mut c = vec![7f32; m * n + 40];
        // SAFETY: AVX512_BF16 checked above; slices sized for m, n, k.
        unsafe {
            gemm_bf16(
                m,
                n,
                k,
                Half::F32(&a),
                Half::F32(&b),
                false,
                &mut c,
                false,
                false,
            )
        };
        assert!(c[..m * n].iter().all(|&v| v == k as f32));
        assert!(c[m * n..].iter().all(|&v| v == 7.0));
    }
}
