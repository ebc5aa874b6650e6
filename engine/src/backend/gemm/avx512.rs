//! An AVX-512 f32 matrix product, used by `sgemm` when the CPU has AVX-512F.
//!
//! Why our own: on stable Rust the `gemm` crate runs its AVX2 kernels even on AVX-512 machines
//! (its AVX-512 kernels are behind a nightly feature), so it stops at half the floating-point
//! peak of a core that has two 512-bit FMA pipes. A ResNet training step is ~85% matrix
//! products (convolutions lowered by im2col), and PyTorch (oneDNN) runs them at AVX-512
//! speed: this kernel closes that gap. AVX-512 intrinsics are stable since Rust 1.89.
//!
//! The algorithm is the Goto/BLIS one:
//! - `C` is cut into `NC`-column blocks; for each, `k` into `KC`-deep slices, and each slice of
//!   `op(B)` (`KC x NC`) is packed into `NR`-column panels stored k-major (two cache lines of
//!   the panel per k step; a row-major B is copied, a transposed one goes through 16 x 16
//!   register transposes);
//! - the rows of `C` are walked in `MC`-row blocks (the block of A, `MC x KC`, stays in L2),
//!   packed into `MR`-row panels (k-major, `MR` floats per k step) where that pays
//!   (`pack_a_first`: a transposed A, or a wide C), and within the block, for each B panel, in
//!   `MR`-row tiles;
//! - the microkernel multiplies `MR` rows of `op(A)` by one `KC x NR` panel of B into an
//!   `MR x NR` tile of 12 x 2 registers (12 rows, 32 columns): per k step two vector loads of
//!   B, twelve broadcasts of A and 24 FMAs, the B panel (32 KiB) in L1 while the A panel (or
//!   the rows of an unpacked A) stream from L2. Products of 8, 16 or 32 rows (convolutions
//!   with few filters) use 8-row tiles where 12-row ones would compute rows that are thrown
//!   away. A row-major B used by few rows of A (up to 64: a convolution's forward) is read in
//!   place, prefetched, rather than packed: its packing cost 40% of such a product.
//!
//! On one core of the development machine's Xeon (AVX-512, 236 GFLOP/s FMA peak) the kernel
//! loop runs at about 86% of peak; packing is most of the rest (docs/benchmarks.md, "CPU
//! matmul and conv2d").
//!
//! Transposes are handled by packing (or strides, for an unpacked A), ragged edges by zero
//! padding in the packed panels and masked loads and stores. With `beta == 0` the old `C` is
//! never read (it may hold NaN). The parallel driver splits `C` into column (or row) ranges,
//! one per rayon thread, each running the serial algorithm.

use std::arch::x86_64::*;
use std::cell::RefCell;

use rayon::prelude::*;

/// Rows of the register tile (broadcasts of A).
pub const MR: usize = 12;
/// Rows of the smaller tile `tile_rows` picks for few-row products.
const MR_SMALL: usize = 8;
/// Elements of the largest B that `serial` reads in place under the unpacked-A kernel (1 MiB
/// of f32).
const IN_PLACE_B: usize = 1 << 18;
/// Rows of A up to which a row-major B is read in place beside a packed A.
const IN_PLACE_B_ROWS: usize = 64;
/// Columns of C from which a row-major A is packed: a narrower product uses each panel of A
/// for too few B panels to pay for its 16 x 16 transposes (ResNet's `dw`, n = 64-256, ran
/// 10-25% slower packed).
const PACK_A_MIN_N: usize = 512;
/// Rows of B ahead that the in-place-B kernel prefetches.
const PF: usize = 8;
/// Columns of the register tile: two 16-lane vectors.
pub const NR: usize = 32;
/// Depth of a packed slice: the B panel `KC x NR` is 32 KiB, within the 48 KiB L1d of Zen 5
/// and Sapphire Rapids beside the 12 KiB that one tile reads of A (Zen 4's L1d is 32 KiB, yet
/// KC = 128, 192 or 384 measured no faster there).
const KC: usize = 256;
/// Rows of C per block (a multiple of `MR`): their `MC x KC` of A, 240 KiB, stays in L2.
const MC: usize = 240;
/// Columns of a packed B block (a multiple of `NR`): 4 MiB at most.
const NC: usize = 4096;

/// Whether this CPU can run the kernel (the answer is cached by std).
pub fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// A read-only matrix view: element `(i, j)` is at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    rs: usize,
    cs: usize,
}

// SAFETY: a `View` is only read, and only while the slice it was made from is borrowed by the
// caller of `sgemm` (which outlives every thread of the parallel driver).
unsafe impl Send for View {}
unsafe impl Sync for View {}

impl View {
    /// The view starting at element `(i, j)`.
    fn at(self, i: usize, j: usize) -> View {
        View {
            // SAFETY (of later reads): callers only offset inside the checked operand.
            ptr: self.ptr.wrapping_add(i * self.rs + j * self.cs),
            ..self
        }
    }
}

/// `C[m, n] = alpha * op(A) * op(B) + beta * C` with every operand row-major and densely stored
/// (`A` is `[m, k]` or `[k, m]` when `trans_a`; `B` `[k, n]` or `[n, k]` when `trans_b`).
///
/// # Safety
/// The CPU must have AVX-512F (`available()`), and the slices must hold at least `m*k`, `k*n`
/// and `m*n` elements; m, n, k non-zero.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
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
    debug_assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    let av = if trans_a {
        View {
            ptr: a.as_ptr(),
            rs: 1,
            cs: m,
        }
    } else {
        View {
            ptr: a.as_ptr(),
            rs: k,
            cs: 1,
        }
    };
    let bv = if trans_b {
        View {
            ptr: b.as_ptr(),
            rs: 1,
            cs: k,
        }
    } else {
        View {
            ptr: b.as_ptr(),
            rs: n,
            cs: 1,
        }
    };
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    if threads <= 1 {
        serial(m, n, k, alpha, av, bv, beta, c.as_mut_ptr(), n);
        return;
    }
    // Split the larger side of C into one range per thread, in whole register tiles.
    let cp = CPtr(c.as_mut_ptr());
    if n >= m {
        let per = n.div_ceil(threads).div_ceil(NR) * NR;
        (0..n.div_ceil(per)).into_par_iter().for_each(|t| {
            let j0 = t * per;
            let nn = per.min(n - j0);
            // SAFETY: threads write disjoint column ranges of C.
            unsafe { serial(m, nn, k, alpha, av, bv.at(0, j0), beta, cp.add(j0), n) };
        });
    } else {
        let per = m.div_ceil(threads).div_ceil(MR) * MR;
        (0..m.div_ceil(per)).into_par_iter().for_each(|t| {
            let i0 = t * per;
            let mm = per.min(m - i0);
            // SAFETY: threads write disjoint row ranges of C.
            unsafe { serial(mm, n, k, alpha, av.at(i0, 0), bv, beta, cp.add(i0 * n), n) };
        });
    }
}

#[derive(Clone, Copy)]
struct CPtr(*mut f32);
// SAFETY: each thread writes a disjoint part of C (see the drivers).
unsafe impl Send for CPtr {}
unsafe impl Sync for CPtr {}
impl CPtr {
    fn add(self, off: usize) -> *mut f32 {
        self.0.wrapping_add(off)
    }
}

thread_local! {
    /// The packing buffers (B, and A when packed) of this thread, kept between calls (a fresh 4 MiB buffer per product
    /// would cost page faults on every call).
    static PACK: RefCell<(AlignedBuf, AlignedBuf)> =
        const { RefCell::new((AlignedBuf::new(), AlignedBuf::new())) };
}

/// A growable f32 buffer whose usable part starts on a 64-byte boundary.
struct AlignedBuf {
    data: Vec<f32>,
}

impl AlignedBuf {
    const fn new() -> Self {
        AlignedBuf { data: Vec::new() }
    }

    fn get(&mut self, len: usize) -> &mut [f32] {
        if self.data.len() < len + 16 {
            self.data = vec![0f32; len + 16];
        }
        let skip = self.data.as_ptr().align_offset(64).min(15);
        &mut self.data[skip..skip + len]
    }
}

/// The serial algorithm over one part of C (`ldc` = its row stride).
///
/// # Safety
/// As `sgemm`, with `c` valid for `m` rows of `n` columns at stride `ldc`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn serial(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: View,
    b: View,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    PACK.with(|bufs| {
        let mut bufs = bufs.borrow_mut();
        let (bbuf, abuf) = &mut *bufs;
        // A row-major B used by few rows of A is read where it lies: packing it would cost
        // about as much as the products that use it (a convolution's columns times 8-64
        // filters: 40% of the product at 64). Either at most two row tiles and a B that stays
        // in L2 (1 MiB), or up to 64 rows on a packed A, whose kernel prefetches the rows of B
        // ahead (their stride defeats the hardware prefetchers).
        let pack_a_rows = pack_a_first(a, n);
        let pack_b_rows = !(b.cs == 1
            && ((m <= 2 * MR && k * n <= IN_PLACE_B) || (pack_a_rows && m <= IN_PLACE_B_ROWS)));
        let nc_max = n.min(NC).div_ceil(NR) * NR;
        let bpack = bbuf.get(if pack_b_rows { k.min(KC) * nc_max } else { 0 });
        let apack = abuf.get(if pack_a_rows {
            k.min(KC) * m.min(MC).div_ceil(MR) * MR
        } else {
            0
        });
        for j0 in (0..n).step_by(NC) {
            let nc = NC.min(n - j0);
            for p0 in (0..k).step_by(KC) {
                let kc = KC.min(k - p0);
                // Later k slices accumulate onto the first one's result.
                let beta_here = if p0 == 0 { beta } else { 1.0 };
                if pack_b_rows {
                    pack_b(b.at(p0, j0), kc, nc, bpack);
                }
                for i0 in (0..m).step_by(MC) {
                    let mc = MC.min(m - i0);
                    if pack_a_rows {
                        pack_a(a.at(i0, p0), mc, kc, apack);
                    }
                    if pack_a_rows {
                        let (bp, ldb, panel) = if pack_b_rows {
                            (bpack.as_ptr(), NR, NR * kc)
                        } else {
                            (b.at(p0, j0).ptr, b.rs, NR)
                        };
                        let blk = Block {
                            a: apack.as_ptr(),
                            b: bp,
                            ldb,
                            panel,
                            c: c.add(i0 * ldc + j0),
                            ldc,
                            mc,
                            nc,
                            kc,
                        };
                        block_packed(blk, alpha, beta_here);
                        continue;
                    }
                    for jr in (0..nc).step_by(NR) {
                        let nr = NR.min(nc - jr);
                        let (bp, ldb) = if pack_b_rows {
                            (bpack.as_ptr().add(jr * kc), NR)
                        } else {
                            (b.at(p0, j0 + jr).ptr, b.rs)
                        };
                        let mut ir = 0;
                        while ir < mc {
                            let rows = tile_rows(mc - ir, pack_a_rows);
                            let mr = rows.min(mc - ir);
                            let ar = if pack_a_rows {
                                View {
                                    ptr: apack.as_ptr().add(ir * kc),
                                    rs: 1,
                                    cs: MR,
                                }
                            } else {
                                a.at(i0 + ir, p0)
                            };
                            let ct = c.add((i0 + ir) * ldc + j0 + jr);
                            let t = Tile {
                                b: bp,
                                ldb,
                                c: ct,
                                ldc,
                                mr,
                                nr,
                            };
                            match (rows, nr > 16) {
                                (MR, true) => kernel::<MR, 2>(kc, ar, t, alpha, beta_here),
                                (MR, false) => kernel::<MR, 1>(kc, ar, t, alpha, beta_here),
                                (_, true) => kernel::<MR_SMALL, 2>(kc, ar, t, alpha, beta_here),
                                (_, false) => kernel::<MR_SMALL, 1>(kc, ar, t, alpha, beta_here),
                            }
                            ir += mr;
                        }
                    }
                }
            }
        }
    });
}

/// Whether `serial` packs A into `MR`-row panels (then the kernel reads one contiguous panel
/// with broadcasts at constant offsets, instead of `MR` rows through their strides). A
/// transposed A always when more than one B panel uses it: read in place, each k step of a
/// tile touches a new cache line `m` floats on, and with `m` a multiple of 512 those lines
/// crowd two L1 sets (ResNet's `dx` at 4608 rows ran at 98 GFLOP/s in place, 149 packed). A
/// row-major A from `PACK_A_MIN_N` columns of C on (BERT's products: 10-30% faster), or where
/// its rows alias in L1 (`rows_alias`).
fn pack_a_first(a: View, n: usize) -> bool {
    if n <= NR {
        return false;
    }
    if a.rs == 1 {
        return true;
    }
    n >= PACK_A_MIN_N || rows_alias(a.rs)
}

/// Rows of the next register tile when `left` rows of the block remain: `MR`, or `MR_SMALL`
/// where that wastes fewer rows (8 filters: one 8-row tile, not two thirds of a 12-row one;
/// 16 or 32: tiles of 8). Packed A is laid out in `MR`-row panels: `MR`, or `MR_SMALL` for a
/// last panel of at most that many rows.
fn tile_rows(left: usize, packed_a: bool) -> usize {
    if packed_a {
        if left <= MR_SMALL {
            MR_SMALL
        } else {
            MR
        }
    } else if left.is_multiple_of(MR) {
        MR
    } else if left <= MR_SMALL || (left.is_multiple_of(MR_SMALL) && left <= 6 * MR_SMALL) {
        MR_SMALL
    } else {
        MR
    }
}

/// Whether `MR` rows of A read in place, `rs` floats apart, would crowd few L1 sets: the set
/// of an address is fixed by its offset modulo 4 KiB, so rows whose distance is a multiple of
/// 2 KiB land on one or two offsets, 6 to 12 rows competing for the same 12 ways with the B
/// panel. Such A (k a multiple of 512: a square 1024 or 2048 product, BERT's 512-wide FFN
/// output) is packed into a contiguous panel first. Four offsets (3 rows a set, ResNet's
/// k = 2304) measured faster in place.
fn rows_alias(rs: usize) -> bool {
    let bytes = rs * 4;
    let distinct_offsets = 4096 / gcd(bytes, 4096);
    distinct_offsets <= 2
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Packs `op(A)[0..mc, 0..kc]` of a row-major A (`cs == 1`) into `MR`-row panels, k-major
/// (`MR` floats per k step), through 16 x 16 register transposes; rows past `mc` are zero.
///
/// # Safety
/// AVX-512F; the view covers `mc x kc` with `cs == 1`; `dst` holds
/// `mc.div_ceil(MR) * MR * kc` floats.
#[target_feature(enable = "avx512f")]
unsafe fn pack_a(a: View, mc: usize, kc: usize, dst: &mut [f32]) {
    if a.rs == 1 {
        // Transposed A: the rows of a panel are adjacent at each k step. Sixteen k steps at a
        // time across all panels: the 16 stored rows' lines are read once and stay in L1
        // while each panel gets 16 consecutive steps (panel by panel over all kc steps reads
        // lines `m` floats apart, 23% of BERT's dW product; row by row stores 12 KiB apart).
        let panels = mc.div_ceil(MR);
        let dst = dst[..panels * MR * kc].as_mut_ptr();
        let full: __mmask16 = (1u16 << MR) - 1;
        let last: __mmask16 = (1u16 << (mc - (panels - 1) * MR)) - 1;
        for p0 in (0..kc).step_by(16) {
            for pi in 0..panels {
                let m = if pi + 1 < panels { full } else { last };
                for p in p0..kc.min(p0 + 16) {
                    // SAFETY: k step p, rows pi*MR.. (masked to mc) lie inside the operand;
                    // the panel holds MR floats per k step.
                    let v = _mm512_maskz_loadu_ps(m, a.ptr.add(p * a.cs + pi * MR));
                    _mm512_mask_storeu_ps(dst.add((pi * kc + p) * MR), full, v);
                }
            }
        }
        return;
    }
    debug_assert_eq!(a.cs, 1);
    for (pi, panel) in dst[..mc.div_ceil(MR) * MR * kc]
        .chunks_exact_mut(MR * kc)
        .enumerate()
    {
        let i0 = pi * MR;
        let rows = MR.min(mc - i0);
        for p0 in (0..kc).step_by(16) {
            let kp = 16.min(kc - p0);
            let kmask: __mmask16 = if kp == 16 { 0xffff } else { (1u16 << kp) - 1 };
            let mut block = [_mm512_setzero_ps(); 16];
            for (r, v) in block.iter_mut().enumerate().take(rows) {
                // SAFETY: row i0+r, columns p0..p0+kp lie inside the operand (masked).
                *v = _mm512_maskz_loadu_ps(kmask, a.ptr.add((i0 + r) * a.rs + p0));
            }
            let t = transpose16(block);
            let rmask: __mmask16 = (1u16 << MR) - 1;
            for (q, v) in t.iter().enumerate().take(kp) {
                _mm512_mask_storeu_ps(panel.as_mut_ptr().add((p0 + q) * MR), rmask, *v);
            }
        }
    }
}

/// Packs `op(B)[0..kc, 0..nc]` into `NR`-column panels, k-major, zero columns past `nc`.
///
/// # Safety
/// AVX-512F; the view covers `kc x nc`; `dst` holds `nc.div_ceil(NR) * NR * kc` floats.
#[target_feature(enable = "avx512f")]
unsafe fn pack_b(b: View, kc: usize, nc: usize, dst: &mut [f32]) {
    let panels = nc.div_ceil(NR);
    if b.cs == 1 {
        for (pj, panel) in dst[..panels * NR * kc]
            .chunks_exact_mut(NR * kc)
            .enumerate()
        {
            let j0 = pj * NR;
            let cols = NR.min(nc - j0);
            // Vector copies (a 32-float `copy_from_slice` is a call to memmove). Panel by
            // panel: row by row of B (one sequential read of each row, scattered to the panels)
            // measured slower, its stores 32 KiB apart crowding one L1 set.
            let masks: [__mmask16; NR / 16] = std::array::from_fn(|v| {
                let live = cols.saturating_sub(16 * v).min(16);
                ((1u32 << live) - 1) as __mmask16
            });
            for (p, d) in panel.chunks_exact_mut(NR).enumerate() {
                for (v, &m) in masks.iter().enumerate() {
                    // SAFETY: row p, columns j0..j0+cols of the view lie inside the operand
                    // (masked); the panel row holds NR floats.
                    let x = _mm512_maskz_loadu_ps(m, b.ptr.add(p * b.rs + j0 + 16 * v));
                    _mm512_storeu_ps(d.as_mut_ptr().add(16 * v), x);
                }
            }
        }
        return;
    }
    for (pj, panel) in dst[..panels * NR * kc]
        .chunks_exact_mut(NR * kc)
        .enumerate()
    {
        let j0 = pj * NR;
        let cols = NR.min(nc - j0);
        // Transposed B: each column of op(B) is contiguous in memory, the panel wants rows.
        // Transpose 16 x 16 blocks in registers (a scalar gather costs about as much as
        // the product itself when B is used by few rows of A, as in conv's dW).
        for h in 0..NR / 16 {
            let jh = j0 + 16 * h;
            let live = cols.saturating_sub(16 * h).min(16);
            for p0 in (0..kc).step_by(16) {
                let kp = 16.min(kc - p0);
                let kmask: __mmask16 = if kp == 16 { 0xffff } else { (1u16 << kp) - 1 };
                let mut block = [_mm512_setzero_ps(); 16];
                for (jj, v) in block.iter_mut().enumerate().take(live) {
                    // SAFETY: column jh+jj, rows p0..p0+kp lie inside the operand (masked).
                    *v = _mm512_maskz_loadu_ps(kmask, b.ptr.add((jh + jj) * b.cs + p0));
                }
                let t = transpose16(block);
                for (q, v) in t.iter().enumerate().take(kp) {
                    _mm512_storeu_ps(panel.as_mut_ptr().add((p0 + q) * NR + 16 * h), *v);
                }
            }
        }
    }
}

/// The transpose of a 16 x 16 block held as 16 row vectors: `out[j][i] = rows[i][j]`.
#[target_feature(enable = "avx512f")]
pub(crate) fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // Pairs of rows interleaved (per 128-bit lane), then pairs of pairs: u[4g + c] holds, in
    // lane L, column 4L + c of rows 4g..4g+3.
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let (g, c) = (i / 4, i % 4);
        let a = _mm512_castps_pd(t[4 * g + c / 2]);
        let b = _mm512_castps_pd(t[4 * g + 2 + c / 2]);
        _mm512_castpd_ps(if c % 2 == 0 {
            _mm512_unpacklo_pd(a, b)
        } else {
            _mm512_unpackhi_pd(a, b)
        })
    });
    // Then a 4 x 4 transpose of 128-bit lanes among u[c], u[4 + c], u[8 + c], u[12 + c].
    let mut out = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        let v = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
        let w = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]);
        let v2 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
        let w2 = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
        out[c] = _mm512_shuffle_f32x4::<0x88>(v, v2);
        out[8 + c] = _mm512_shuffle_f32x4::<0xdd>(v, v2);
        out[4 + c] = _mm512_shuffle_f32x4::<0x88>(w, w2);
        out[12 + c] = _mm512_shuffle_f32x4::<0xdd>(w, w2);
    }
    out
}

/// Where one register tile reads B and writes C: `b` holds `kc` rows of `NR` floats, `ldb`
/// apart (a packed panel: `ldb == NR`, zero past `nr`; B in place: its row stride, masked past
/// `nr`); `c` is valid for `mr` rows of `nr` columns at stride `ldc`.
#[derive(Clone, Copy)]
struct Tile {
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
}

/// `C[0..mr, 0..nr] = alpha * op(A)[0..mr, 0..kc] * B + beta * C` for one register tile of `R`
/// rows (`MR` or `MR_SMALL`) and `16 * NV` columns (`NV` = 2 for full panels, 1 when at most
/// 16 columns remain: half the FMAs): per k step `NV` vector loads of B, `R` broadcasts of A
/// and `R * NV` FMAs. A is read where it lies, through its strides: each of its rows is a
/// sequential stream (or, transposed, each k step reads adjacent floats), which measured as
/// fast as reading a packed copy, without the cost of packing. Rows past `mr` re-read row 0
/// and are not stored; columns past `nr` are masked.
///
/// # Safety
/// AVX-512F; `a` valid for `mr <= R` rows of `kc` columns; `t` as [`Tile`] says.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn kernel<const R: usize, const NV: usize>(
    kc: usize,
    a: View,
    t: Tile,
    alpha: f32,
    beta: f32,
) {
    let Tile {
        b,
        ldb,
        c,
        ldc,
        mr,
        nr,
    } = t;
    // Lanes of each column vector that lie inside C (and inside B read in place).
    let masks: [__mmask16; NV] = std::array::from_fn(|v| {
        let cols = nr.saturating_sub(16 * v).min(16);
        if cols == 16 {
            0xffff
        } else {
            ((1u32 << cols) - 1) as __mmask16
        }
    });
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    let rows: [*const f32; R] =
        std::array::from_fn(|r| a.ptr.add(if r < mr { r * a.rs } else { 0 }));
    let mut b = b;
    for p in 0..kc {
        let bv: [__m512; NV] =
            std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], b.add(16 * v)));
        for (r, row) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*rows[r].add(p * a.cs));
            for v in 0..NV {
                row[v] = _mm512_fmadd_ps(av, bv[v], row[v]);
            }
        }
        b = b.add(ldb);
    }
    let valpha = _mm512_set1_ps(alpha);
    let vbeta = _mm512_set1_ps(beta);
    for (r, row) in acc.iter().enumerate().take(mr) {
        let crow = c.add(r * ldc);
        for (v, &m) in masks.iter().enumerate() {
            if m == 0 {
                continue;
            }
            let p = crow.add(16 * v);
            let mut out = _mm512_mul_ps(valpha, row[v]);
            if beta != 0.0 {
                out = _mm512_fmadd_ps(vbeta, _mm512_maskz_loadu_ps(m, p), out);
            }
            _mm512_mask_storeu_ps(p, m, out);
        }
    }
}

/// One `mc x nc` block of C over one `kc` slice on a packed A: `a` in `MR`-row panels (`MR *
/// kc` floats each); B's panel `j` starts at `b + j * panel` with rows `ldb` apart (packed:
/// `panel = NR * kc`, `ldb = NR`; row-major B in place: `panel = NR`, `ldb` its row stride).
#[derive(Clone, Copy)]
struct Block {
    a: *const f32,
    b: *const f32,
    ldb: usize,
    panel: usize,
    c: *mut f32,
    ldc: usize,
    mc: usize,
    nc: usize,
    kc: usize,
}

/// The register tiles of a [`Block`]: for each B panel (in L1, `kc x NR`), every A panel
/// (streamed from L2). Swapping the two loops (the A panel in L1, B block in L2) measured the
/// same.
///
/// # Safety
/// AVX-512F; the block's pointers as [`Block`] says, `c` valid for `mc` rows of `nc` columns.
#[target_feature(enable = "avx512f")]
unsafe fn block_packed(blk: Block, alpha: f32, beta: f32) {
    let Block {
        a,
        b,
        ldb,
        panel,
        c,
        ldc,
        mc,
        nc,
        kc,
    } = blk;
    let tile = |ir: usize, jr: usize| {
        let rows = tile_rows(mc - ir, true);
        let mr = rows.min(mc - ir);
        let nr = NR.min(nc - jr);
        let t = Tile {
            b: b.add(jr / NR * panel),
            ldb,
            c: c.add(ir * ldc + jr),
            ldc,
            mr,
            nr,
        };
        let ap = a.add(ir * kc);
        match (rows, nr > 16) {
            (MR, true) => kernel_packed::<MR, 2>(kc, ap, t, alpha, beta),
            (MR, false) => kernel_packed::<MR, 1>(kc, ap, t, alpha, beta),
            (_, true) => kernel_packed::<MR_SMALL, 2>(kc, ap, t, alpha, beta),
            (_, false) => kernel_packed::<MR_SMALL, 1>(kc, ap, t, alpha, beta),
        }
        mr
    };
    for jr in (0..nc).step_by(NR) {
        let mut ir = 0;
        while ir < mc {
            ir += tile(ir, jr);
        }
    }
}

/// [`kernel`] on a packed A panel (`MR` floats per k step, rows past `mr` zero): one pointer
/// into A, the broadcasts at constant offsets (folded into the FMAs or one `vbroadcastss`
/// each; no general-purpose register per row). B read in place (`t.ldb != NR`) is prefetched
/// `PF` rows ahead.
///
/// # Safety
/// AVX-512F; `a` holds `kc * MR` floats; `t` as [`Tile`] says.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn kernel_packed<const R: usize, const NV: usize>(
    kc: usize,
    a: *const f32,
    t: Tile,
    alpha: f32,
    beta: f32,
) {
    let Tile {
        b,
        ldb,
        c,
        ldc,
        mr,
        nr,
    } = t;
    let masks: [__mmask16; NV] = std::array::from_fn(|v| {
        let cols = nr.saturating_sub(16 * v).min(16);
        if cols == 16 {
            0xffff
        } else {
            ((1u32 << cols) - 1) as __mmask16
        }
    });
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    let (mut a, mut b) = (a, b);
    let in_place = ldb != NR;
    for _ in 0..kc {
        if in_place {
            for v in 0..NV {
                _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PF * ldb + 16 * v) as *const i8);
            }
        }
        let bv: [__m512; NV] =
            std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], b.add(16 * v)));
        for (r, row) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(r));
            for v in 0..NV {
                row[v] = _mm512_fmadd_ps(av, bv[v], row[v]);
            }
        }
        a = a.add(MR);
        b = b.add(ldb);
    }
    store_tile(&acc, c, ldc, mr, nr, alpha, beta);
}

/// `C[0..mr, 0..nr] = alpha * acc + beta * C` (C not read when `beta == 0`), masked past `nr`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_tile<const R: usize, const NV: usize>(
    acc: &[[__m512; NV]; R],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    alpha: f32,
    beta: f32,
) {
    let masks: [__mmask16; NV] = std::array::from_fn(|v| {
        let cols = nr.saturating_sub(16 * v).min(16);
        if cols == 16 {
            0xffff
        } else {
            ((1u32 << cols) - 1) as __mmask16
        }
    });
    let valpha = _mm512_set1_ps(alpha);
    let vbeta = _mm512_set1_ps(beta);
    for (r, row) in acc.iter().enumerate().take(mr) {
        let crow = c.add(r * ldc);
        for (v, &m) in masks.iter().enumerate() {
            if m == 0 {
                continue;
            }
            let p = crow.add(16 * v);
            let mut out = _mm512_mul_ps(valpha, row[v]);
            if beta != 0.0 {
                out = _mm512_fmadd_ps(vbeta, _mm512_maskz_loadu_ps(m, p), out);
            }
            _mm512_mask_storeu_ps(p, m, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    fn reference(
        ta: bool,
        tb: bool,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        a: &[f32],
        b: &[f32],
        beta: f32,
        c: &[f32],
    ) -> Vec<f32> {
        let mut out = c.to_vec();
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += av as f64 * bv as f64;
                }
                let old = if beta == 0.0 {
                    0.0
                } else {
                    beta as f64 * c[i * n + j] as f64
                };
                out[i * n + j] = (alpha as f64 * s + old) as f32;
            }
        }
        out
    }

    /// Every transpose, ragged edges in all three dimensions (across MR, NR, KC, MC and the
    /// thread split), alpha/beta, and NaN in C with beta == 0.
    #[test]
    fn matches_f64_reference() {
        if !available() {
            eprintln!("no AVX-512F on this CPU: kernel not tested");
            return;
        }
        let shapes = [
            (1, 1, 1),
            (5, 7, 3),
            (12, 32, 8),
            (13, 33, 17),
            (25, 70, 300),
            (250, 40, 20),
            (37, 4100, 5),
            (241, 65, 513),
            (300, 20, 70),
            (30, 16, 600),
            (64, 100, 49),
            (40, 70, 512),
            (30, 50, 1024),
            // 8-row tiles, B read in place (at most two row tiles), k sliced past KC.
            (8, 784, 72),
            (16, 200, 144),
            (20, 45, 300),
            (32, 50, 9),
            (64, 37, 40),
            // 8-row tiles on a packed B (too large to read in place).
            (8, 2100, 130),
            // Packed A (a transposed one from 33 columns, a row-major one from PACK_A_MIN_N):
            // a last panel of 8 rows or fewer, a row-major B read in place beside it (up to 64
            // rows) across k slices, B packed above 64 rows, two MC blocks.
            (44, 520, 40),
            (64, 515, 270),
            (70, 530, 300),
            (250, 520, 20),
        ];
        for (si, &(m, n, k)) in shapes.iter().enumerate() {
            let a: Vec<f32> = (0..m * k)
                .map(|i| crate::rng::normal_at(10 + si as u64, i as u64))
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| crate::rng::normal_at(20 + si as u64, i as u64))
                .collect();
            let c0: Vec<f32> = (0..m * n)
                .map(|i| crate::rng::normal_at(30 + si as u64, i as u64))
                .collect();
            for ta in [false, true] {
                for tb in [false, true] {
                    for (alpha, beta) in [(1.0, 0.0), (-0.5, 1.0), (2.0, 0.25)] {
                        let want = reference(ta, tb, (m, n, k), alpha, &a, &b, beta, &c0);
                        for parallel in [false, true] {
                            let mut got = if beta == 0.0 {
                                vec![f32::NAN; m * n]
                            } else {
                                c0.clone()
                            };
                            // SAFETY: AVX-512F checked above; slices sized for m, n, k.
                            unsafe {
                                sgemm(ta, tb, m, n, k, alpha, &a, &b, beta, &mut got, parallel)
                            };
                            for (idx, (x, y)) in got.iter().zip(&want).enumerate() {
                                let tol = 1e-5 * (k as f32).sqrt() * (1.0 + y.abs()) * 4.0;
                                assert!(
                                    (x - y).abs() <= tol,
                                    "{m}x{n}x{k} ta={ta} tb={tb} alpha={alpha} beta={beta} \
                                     parallel={parallel} at {idx}: {x} vs {y}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn transpose16_transposes() {
        if !available() {
            return;
        }
        let m: Vec<f32> = (0..256).map(|i| i as f32).collect();
        // SAFETY: AVX-512F checked above; each row load reads 16 floats of `m`.
        let out = unsafe {
            let rows = std::array::from_fn(|i| _mm512_loadu_ps(m.as_ptr().add(16 * i)));
            transpose16(rows)
        };
        for (j, v) in out.iter().enumerate() {
            let mut lanes = [0f32; 16];
            // SAFETY: AVX-512F; `lanes` holds 16 floats.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *v) };
            for (i, &x) in lanes.iter().enumerate() {
                assert_eq!(x, m[i * 16 + j], "out[{j}][{i}]");
            }
        }
    }

    /// The packing paths alone: a packed A panel holds `op(A)` k-major, `MR` rows per k step,
    /// zero past the last row, for both storage orders; a packed B panel holds `op(B)` rows of
    /// `NR`, zero past the last column.
    #[test]
    fn packed_panels_hold_the_operand() {
        if !available() {
            return;
        }
        let (mc, kc, nc) = (29, 21, 45);
        let a: Vec<f32> = (0..mc * kc).map(|i| i as f32 + 1.0).collect();
        for trans in [false, true] {
            let v = if trans {
                View {
                    ptr: a.as_ptr(),
                    rs: 1,
                    cs: mc,
                }
            } else {
                View {
                    ptr: a.as_ptr(),
                    rs: kc,
                    cs: 1,
                }
            };
            let mut dst = vec![f32::NAN; mc.div_ceil(MR) * MR * kc];
            // SAFETY: AVX-512F checked above; the view covers mc x kc; dst sized as required.
            unsafe { pack_a(v, mc, kc, &mut dst) };
            for i in 0..mc.div_ceil(MR) * MR {
                for p in 0..kc {
                    let got = dst[(i / MR * kc + p) * MR + i % MR];
                    let want = if i < mc { a[i * v.rs + p * v.cs] } else { 0.0 };
                    assert_eq!(got, want, "trans={trans} row {i} k {p}");
                }
            }
        }
        let b: Vec<f32> = (0..kc * nc).map(|i| i as f32 + 1.0).collect();
        for trans in [false, true] {
            let v = if trans {
                View {
                    ptr: b.as_ptr(),
                    rs: 1,
                    cs: kc,
                }
            } else {
                View {
                    ptr: b.as_ptr(),
                    rs: nc,
                    cs: 1,
                }
            };
            let mut dst = vec![f32::NAN; nc.div_ceil(NR) * NR * kc];
            // SAFETY: AVX-512F checked above; the view covers kc x nc; dst sized as required.
            unsafe { pack_b(v, kc, nc, &mut dst) };
            for j in 0..nc.div_ceil(NR) * NR {
                for p in 0..kc {
                    let got = dst[(j / NR * kc + p) * NR + j % NR];
                    let want = if j < nc { b[p * v.rs + j * v.cs] } else { 0.0 };
                    assert_eq!(got, want, "trans={trans} column {j} k {p}");
                }
            }
        }
    }

    /// Writes stay inside the m x n block of C: a guard after it is untouched.
    #[test]
    fn writes_nothing_past_c() {
        if !available() {
            return;
        }
        let (m, n, k) = (13, 35, 9);
        let a = vec![1f32; m * k];
        let b = vec![1f32; k * n];
        let mut c = vec![7f32; m * n + 40];
        // SAFETY: AVX-512F checked above; slices sized for m, n, k.
        unsafe { sgemm(false, false, m, n, k, 1.0, &a, &b, 0.0, &mut c, false) };
        assert!(c[..m * n].iter().all(|&v| v == k as f32));
        assert!(c[m * n..].iter().all(|&v| v == 7.0));
    }
}
