//! The forward and the weight gradient of a `phase_rows` convolution (ResNet's 3x3, stride 1
//! or 2) computed directly from the input's stride phases, without a column matrix: with few
//! filters the im2col product spends most of its time writing the column matrix (and, for
//! `dW = dY x cols^T`, packing its transpose): with 8 filters each column element feeds 8
//! multiply-adds. These kernels read each shifted phase plane in place instead.
//!
//! Row `r = (c, i, j)` of the column matrix is the phase plane of channel `c` shifted by
//! `phase_of(i, j)` and masked by `inside_masks` (the same values `same_row` copies), read
//! 16 pixels at a time by masked loads (`lane_masks`). `forward` keeps 8 filters x 48 output
//! pixels in registers over the whole patch; `weight_gradient` keeps 8 filters x 3 patch rows
//! of 16-lane sums over all pixels of a group of images, then adds the lanes.

use std::arch::x86_64::*;

use super::{phase_margins, phase_of, Conv2dGeometry};

/// Filters per register block; `direct_weight_gradient_fits` asks for a multiple of it.
const FILTERS: usize = super::DIRECT_DW_FILTERS;

/// Rows of the column matrix per register block (a 3x3 kernel's row of offsets).
const ROWS: usize = 3;

/// `dw [O, C*kh*kw] = dY x cols^T` (added to `dw` when `accumulate`) for one group of images: `planes` from
/// `phase_images` (planes `plane` floats apart), `dy` the group's output gradient `[O, nq]`,
/// `lanes` from `lane_masks`. `O` must be a multiple of `FILTERS`.
///
/// # Safety
/// The CPU must have AVX-512F, and `planes` must be laid out by `phase_images` for `g` and
/// the group (its margins keep every unmasked lane of a load inside it); the lengths are
/// asserted here.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn weight_gradient(
    planes: &[f32],
    plane: usize,
    g: &Conv2dGeometry,
    nq: usize,
    dy: &[f32],
    lanes: &[u16],
    accumulate: bool,
    dw: &mut [f32],
) {
    let (k, ck, s) = (g.kh * g.kw, g.patch(), g.stride);
    let nv = nq.div_ceil(16);
    assert!(g.o.is_multiple_of(FILTERS) && dy.len() >= g.o * nq && dw.len() >= g.o * ck);
    assert!(lanes.len() >= k * nv && planes.len() >= g.c * s * s * plane);
    let front = phase_margins(g).0 as isize;
    // Row r's source: its channel's phase plane, shifted.
    let source = |r: usize| -> usize {
        let (phase, shift) = phase_of(g, (r % k) / g.kw, r % g.kw);
        let at = ((r / k) * s * s + phase) * plane;
        (at as isize + front + shift) as usize
    };
    // Every lane a masked load reads lies inside the plane (`phase_images`); the masked-off
    // lanes of the last vector may not, and masked loads do not touch them.
    let tail: u16 = if nq.is_multiple_of(16) {
        u16::MAX
    } else {
        (1u16 << (nq % 16)) - 1
    };
    let mut r0 = 0;
    while r0 < ck {
        let rows = ROWS.min(ck - r0);
        // A short last block repeats its last row (computed, not stored).
        let (ra, rb, rc) = (r0, r0 + 1.min(rows - 1), r0 + 2.min(rows - 1));
        let (xa, xb, xc) = (
            planes.as_ptr().add(source(ra)),
            planes.as_ptr().add(source(rb)),
            planes.as_ptr().add(source(rc)),
        );
        let (la, lb, lc) = (
            lanes.as_ptr().add((ra % k) * nv),
            lanes.as_ptr().add((rb % k) * nv),
            lanes.as_ptr().add((rc % k) * nv),
        );
        for o0 in (0..g.o).step_by(FILTERS) {
            let mut acc = [[_mm512_setzero_ps(); ROWS]; FILTERS];
            let dy0 = dy.as_ptr().add(o0 * nq);
            for v in 0..nv {
                let x0 = _mm512_maskz_loadu_ps(*la.add(v), xa.add(16 * v));
                let x1 = _mm512_maskz_loadu_ps(*lb.add(v), xb.add(16 * v));
                let x2 = _mm512_maskz_loadu_ps(*lc.add(v), xc.add(16 * v));
                let m = if v + 1 == nv { tail } else { u16::MAX };
                for (f, acc) in acc.iter_mut().enumerate() {
                    let d = _mm512_maskz_loadu_ps(m, dy0.add(f * nq + 16 * v));
                    acc[0] = _mm512_fmadd_ps(d, x0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(d, x1, acc[1]);
                    acc[2] = _mm512_fmadd_ps(d, x2, acc[2]);
                }
            }
            for (f, acc) in acc.iter().enumerate() {
                for (j, a) in acc.iter().enumerate().take(rows) {
                    let at = (o0 + f) * ck + r0 + j;
                    let sum = _mm512_reduce_add_ps(*a);
                    dw[at] = if accumulate { dw[at] + sum } else { sum };
                }
            }
        }
        r0 += rows;
    }
}

/// Output pixels (16-lane vectors) per register block of `forward`.
const VECTORS: usize = 3;

/// `out [O, nq] = W [O, C*kh*kw] x cols` for one group of images, the columns read from
/// `planes` (`phase_images`, planes `plane` floats apart) and `lanes` (`lane_masks`) instead of
/// a column matrix. `O` must be a multiple of `FILTERS`. Blocks of 8 filters x 48 pixels are
/// summed in registers over the whole patch and stored once.
///
/// # Safety
/// The CPU must have AVX-512F, and `planes` must be laid out by `phase_images` for `g` and
/// the group (its margins keep every unmasked lane of a load inside it); the lengths are
/// asserted here.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn forward(
    planes: &[f32],
    plane: usize,
    g: &Conv2dGeometry,
    nq: usize,
    weight: &[f32],
    lanes: &[u16],
    out: &mut [f32],
) {
    let (k, ck, s) = (g.kh * g.kw, g.patch(), g.stride);
    let nv = nq.div_ceil(16);
    assert!(g.o.is_multiple_of(FILTERS) && weight.len() >= g.o * ck && out.len() >= g.o * nq);
    assert!(lanes.len() >= k * nv && planes.len() >= g.c * s * s * plane);
    let front = phase_margins(g).0 as isize;
    // Per row of the column matrix: where it starts in `planes`, and its offset's masks.
    let rows: Vec<(usize, usize)> = (0..ck)
        .map(|r| {
            let (phase, shift) = phase_of(g, (r % k) / g.kw, r % g.kw);
            let at = ((r / k) * s * s + phase) * plane;
            ((at as isize + front + shift) as usize, (r % k) * nv)
        })
        .collect();
    let tail: u16 = if nq.is_multiple_of(16) {
        u16::MAX
    } else {
        (1u16 << (nq % 16)) - 1
    };
    let (x, lane, out_ptr) = (planes.as_ptr(), lanes.as_ptr(), out.as_mut_ptr());
    for o0 in (0..g.o).step_by(FILTERS) {
        let w0 = weight.as_ptr().add(o0 * ck);
        for v0 in (0..nv).step_by(VECTORS) {
            // Vectors past the group's pixels load nothing and are not stored.
            let live = |j: usize| v0 + j < nv;
            let (v1, v2) = ((v0 + 1).min(nv - 1), (v0 + 2).min(nv - 1));
            let (on1, on2) = (
                if live(1) { u16::MAX } else { 0 },
                if live(2) { u16::MAX } else { 0 },
            );
            let mut acc = [[_mm512_setzero_ps(); VECTORS]; FILTERS];
            for (r, &(src, lrow)) in rows.iter().enumerate() {
                let xa = x.add(src);
                let x0 = _mm512_maskz_loadu_ps(*lane.add(lrow + v0), xa.add(16 * v0));
                let x1 = _mm512_maskz_loadu_ps(*lane.add(lrow + v1) & on1, xa.add(16 * v1));
                let x2 = _mm512_maskz_loadu_ps(*lane.add(lrow + v2) & on2, xa.add(16 * v2));
                for (f, acc) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*w0.add(f * ck + r));
                    acc[0] = _mm512_fmadd_ps(w, x0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(w, x1, acc[1]);
                    acc[2] = _mm512_fmadd_ps(w, x2, acc[2]);
                }
            }
            for (f, acc) in acc.iter().enumerate() {
                for (j, a) in acc.iter().enumerate() {
                    let v = v0 + j;
                    if v >= nv {
                        break;
                    }
                    let m = if v + 1 == nv { tail } else { u16::MAX };
                    _mm512_mask_storeu_ps(out_ptr.add((o0 + f) * nq + 16 * v), m, *a);
                }
            }
        }
    }
}
