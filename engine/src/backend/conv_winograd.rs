//! Winograd F(2,3) for the 3x3 stride-1 "same" convolutions of the CPU arm (ResNet's): each
//! 2x2 block of outputs is `A^T [(G g G^T) ⊙ (B^T d B)] A` of its 4x4 input tile `d`, so the
//! 36 multiply-adds per output pixel, channel and filter of a direct or im2col convolution
//! become 16 per 2x2 block: 2.25x fewer. The element-wise product summed over channels is 16
//! independent matrix products, one per position `ξ` of the 4x4 transformed tile:
//! `M_ξ [tiles, O] = V_ξ [tiles, C] x U_ξ [C, O]`, run by the sgemm.
//!
//! Layouts: channels last, so that the transforms run 16 channels (or filters) to a vector.
//! A chunk of images is copied into a zero-margined channel-last image (`padded_images`),
//! transformed into `V [16, tiles, C]` (`input_tiles`), multiplied, and `M [16, tiles, O]`
//! transformed back into each image's 2x2 blocks (`output_tiles`), channel last, then
//! transposed into the output. An odd height or width pads the last row or column of tiles
//! with zeros; their extra outputs are dropped.
//!
//! The input gradient is this forward of `dY` with the flipped weight (`conv.rs`,
//! `transposed_geometry`). The weight gradient is the exact gradient of this forward:
//! `dU_ξ [C, O] = V_ξ^T x dM_ξ` summed over the tiles, `dM` the adjoint of the output
//! transform of `dY`, then `dW = G^T dU G` (`weight_gradient`).
//!
//! The transforms are written once over fixed 16-lane arrays, inlined into a copy compiled
//! for AVX-512F (picked at run time) and a baseline copy: the same operations in the same
//! order, so both give the same bits. The channel-last copies around them have their own
//! AVX-512 copy (`copies_x86`: 16x16 blocks transposed in registers); copies give the same
//! bits whichever runs.

use rayon::prelude::*;

use super::{scratch, Conv2dGeometry};
use crate::backend::gemm::sgemm_serial;
use crate::Result;

/// Positions of a transformed 4x4 tile: one product each.
const XI: usize = 16;

/// Lanes of the transforms: one AVX-512 register of f32.
const LANES: usize = 16;

/// Tiles (product rows) a chunk of images aims at: enough rows for the product to run at
/// the kernel's speed, few enough that a chunk's `V` and `M` stay within a few MiB.
const CHUNK_TILES: usize = 256;

/// Fewest input channels and filters for which `fits` takes a convolution...
const MIN_CHANNELS: usize = 64;

/// ... and the fewest pixels per image below `ANY_SIZE_CHANNELS` of them.
const MIN_PIXELS: usize = 14 * 14;

/// Channels and filters from which `fits` takes every image size.
const ANY_SIZE_CHANNELS: usize = 128;

/// Whether a convolution of `PerItem` / `Grouped` runs here (forward, input gradient as a
/// forward, weight gradient): 3x3, stride 1, padding 1 (output as large as the input), and
/// channels and filters from `ANY_SIZE_CHANNELS` on, or from `MIN_CHANNELS` on for images of
/// `MIN_PIXELS` or more. A rule on the shape alone, from per-shape timings of ResNet-18's
/// convolutions at widths 1/8 to 1 (one thread, docs/benchmarks.md): 1.15-1.5x faster from
/// 128 channels at every size and for 64 channels at 14x14 and 28x28; for 64 at 7x7 even
/// to 10% slower, at 4x4 the forward slower than `direct_forward`.
pub(super) fn fits(g: &Conv2dGeometry) -> bool {
    let channels = g.c.min(g.o);
    g.kh == 3
        && g.kw == 3
        && g.stride == 1
        && g.padding == 1
        && g.oh == g.h
        && g.ow == g.w
        && channels >= MIN_CHANNELS
        && (channels >= ANY_SIZE_CHANNELS || g.pixels() >= MIN_PIXELS)
}

/// Tiles of one image: `(rows, columns)` of 2x2 output blocks.
fn tile_grid(g: &Conv2dGeometry) -> (usize, usize) {
    (g.oh.div_ceil(2), g.ow.div_ceil(2))
}

/// Images per chunk: enough for `CHUNK_TILES` tiles, from the shape and batch alone (so the
/// split, and with it every result, is the same on any number of threads).
fn chunk_images(g: &Conv2dGeometry) -> usize {
    let (th, tw) = tile_grid(g);
    CHUNK_TILES.div_ceil((th * tw).max(1)).clamp(1, g.n.max(1))
}

/// `U [16, C, O]`: `G g G^T` of every filter's 3x3 kernel `g = w[o, c]`, with
/// `G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]`.
pub(super) fn weight_tiles(w: &[f32], c: usize, o: usize, u: &mut [f32]) {
    // Blocks of 16 filters, written as whole 64-byte runs of the 16 planes (`C * O` floats
    // apart: one filter at a time, the planes' lines evict each other).
    for ch in 0..c {
        for oc0 in (0..o).step_by(LANES) {
            let n = LANES.min(o - oc0);
            let mut block = [[0f32; LANES]; XI];
            for l in 0..n {
                let k = &w[((oc0 + l) * c + ch) * 9..][..9];
                // t = G g, 4x3.
                let mut t = [[0f32; 3]; 4];
                for j in 0..3 {
                    let (g0, g1, g2) = (k[j], k[3 + j], k[6 + j]);
                    t[0][j] = g0;
                    t[1][j] = 0.5 * (g0 + g1 + g2);
                    t[2][j] = 0.5 * (g0 - g1 + g2);
                    t[3][j] = g2;
                }
                // u = t G^T, 4x4.
                for (i, row) in t.iter().enumerate() {
                    let [t0, t1, t2] = *row;
                    let ui = [t0, 0.5 * (t0 + t1 + t2), 0.5 * (t0 - t1 + t2), t2];
                    for (j, v) in ui.into_iter().enumerate() {
                        block[i * 4 + j][l] = v;
                    }
                }
            }
            for (xi, lanes) in block.iter().enumerate() {
                u[(xi * c + ch) * o + oc0..][..n].copy_from_slice(&lanes[..n]);
            }
        }
    }
}

/// `B^T d B` of a 4x4 tile, `L` channels at a time,
/// `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`.
#[inline(always)]
fn transform_input<const L: usize>(d: &[[[f32; L]; 4]; 4]) -> [[[f32; L]; 4]; 4] {
    let mut t = [[[0f32; L]; 4]; 4];
    for i in 0..4 {
        for l in 0..L {
            let (d0, d1, d2, d3) = (d[i][0][l], d[i][1][l], d[i][2][l], d[i][3][l]);
            t[i][0][l] = d0 - d2;
            t[i][1][l] = d1 + d2;
            t[i][2][l] = d2 - d1;
            t[i][3][l] = d1 - d3;
        }
    }
    let mut v = [[[0f32; L]; 4]; 4];
    for j in 0..4 {
        for l in 0..L {
            let (t0, t1, t2, t3) = (t[0][j][l], t[1][j][l], t[2][j][l], t[3][j][l]);
            v[0][j][l] = t0 - t2;
            v[1][j][l] = t1 + t2;
            v[2][j][l] = t2 - t1;
            v[3][j][l] = t1 - t3;
        }
    }
    v
}

/// `A^T m A` of a transformed 4x4 tile, `L` filters at a time: the 2x2 outputs,
/// `A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]`.
#[inline(always)]
fn transform_output<const L: usize>(m: &[[[f32; L]; 4]; 4]) -> [[[f32; L]; 2]; 2] {
    let mut s = [[[0f32; L]; 2]; 4];
    for i in 0..4 {
        for l in 0..L {
            let (m0, m1, m2, m3) = (m[i][0][l], m[i][1][l], m[i][2][l], m[i][3][l]);
            s[i][0][l] = m0 + m1 + m2;
            s[i][1][l] = m1 - m2 - m3;
        }
    }
    let mut y = [[[0f32; L]; 2]; 2];
    for j in 0..2 {
        for l in 0..L {
            let (s0, s1, s2, s3) = (s[0][j][l], s[1][j][l], s[2][j][l], s[3][j][l]);
            y[0][j][l] = s0 + s1 + s2;
            y[1][j][l] = s1 - s2 - s3;
        }
    }
    y
}

/// Sizes of a chunk's buffers.
#[derive(Clone, Copy)]
struct Chunk {
    /// Images in the chunk.
    items: usize,
    /// Tile rows and columns per image.
    th: usize,
    tw: usize,
    /// Rows and columns of a padded image: `2 * th + 2`, `2 * tw + 2`.
    pr: usize,
    pq: usize,
}

impl Chunk {
    fn new(g: &Conv2dGeometry, items: usize) -> Chunk {
        let (th, tw) = tile_grid(g);
        Chunk {
            items,
            th,
            tw,
            pr: 2 * th + 2,
            pq: 2 * tw + 2,
        }
    }

    fn tiles(&self) -> usize {
        self.items * self.th * self.tw
    }
}

/// Zeros around an `h x w` image placed `off` rows and columns into the channel-last
/// `img [rows, cols, C]`.
#[inline(always)]
fn zero_margins(img: &mut [f32], c: usize, (h, w): (usize, usize), cols: usize, off: usize) {
    for (r, row) in img.chunks_exact_mut(cols * c).enumerate() {
        if r < off || r >= h + off {
            row.fill(0.0);
        } else {
            row[..off * c].fill(0.0);
            row[(w + off) * c..].fill(0.0);
        }
    }
}

/// `src [items, C, H, W]` -> `dst [items, rows, cols, C]`: each image channel last, `off`
/// rows and columns in, zeros around it (the padding, and the last tile's overhang).
#[inline(always)]
fn channel_last(
    src: &[f32],
    (c, h, w): (usize, usize, usize),
    items: usize,
    (rows, cols): (usize, usize),
    off: usize,
    dst: &mut [f32],
) {
    let hw = h * w;
    for (b, img) in dst[..items * rows * cols * c]
        .chunks_exact_mut(rows * cols * c)
        .enumerate()
    {
        let src = &src[b * c * hw..][..c * hw];
        zero_margins(img, c, (h, w), cols, off);
        for (r, row) in img.chunks_exact_mut(cols * c).enumerate() {
            if r < off || r >= h + off {
                continue;
            }
            let hi = r - off;
            let inner = &mut row[off * c..(w + off) * c];
            // 16 channels at a time: one vector store per pixel, not a scalar store per
            // channel and pixel `c` floats apart.
            let mut c0 = 0;
            while c0 + LANES <= c {
                let rows: [&[f32]; LANES] =
                    std::array::from_fn(|l| &src[(c0 + l) * hw + hi * w..][..w]);
                for (wi, px) in inner.chunks_exact_mut(c).enumerate() {
                    let lanes: [f32; LANES] = std::array::from_fn(|l| rows[l][wi]);
                    px[c0..c0 + LANES].copy_from_slice(&lanes);
                }
                c0 += LANES;
            }
            for ci in c0..c {
                let s = &src[ci * hw + hi * w..][..w];
                for (px, &v) in inner.chunks_exact_mut(c).zip(s) {
                    px[ci] = v;
                }
            }
        }
    }
}

/// `x [items, C, H, W]` -> `xt [items, pr, pq, C]`: the input shifted one row and column in.
#[inline(always)]
fn padded_images(x: &[f32], g: &Conv2dGeometry, ch: &Chunk, xt: &mut [f32]) {
    channel_last(x, (g.c, g.h, g.w), ch.items, (ch.pr, ch.pq), 1, xt);
}

/// `V [16, tiles, C]` of the chunk's padded images: tile `(b, ty, tx)` is row
/// `(b * th + ty) * tw + tx` of each `V_ξ`.
#[inline(always)]
fn input_tiles(xt: &[f32], c: usize, ch: &Chunk, v: &mut [f32]) {
    let tiles = ch.tiles();
    let at = |b: usize, r: usize, q: usize| ((b * ch.pr + r) * ch.pq + q) * c;
    for b in 0..ch.items {
        for ty in 0..ch.th {
            for tx in 0..ch.tw {
                let tile = (b * ch.th + ty) * ch.tw + tx;
                let base = at(b, 2 * ty, 2 * tx);
                let row = ch.pq * c;
                let mut c0 = 0;
                while c0 + LANES <= c {
                    let mut d = [[[0f32; LANES]; 4]; 4];
                    for (i, di) in d.iter_mut().enumerate() {
                        for (j, dij) in di.iter_mut().enumerate() {
                            *dij = xt[base + i * row + j * c + c0..][..LANES]
                                .try_into()
                                .expect("16 lanes");
                        }
                    }
                    let t = transform_input(&d);
                    for (xi, lanes) in t.iter().flatten().enumerate() {
                        v[(xi * tiles + tile) * c + c0..][..LANES].copy_from_slice(lanes);
                    }
                    c0 += LANES;
                }
                for cl in c0..c {
                    let mut d = [[[0f32; 1]; 4]; 4];
                    for (i, di) in d.iter_mut().enumerate() {
                        for (j, dij) in di.iter_mut().enumerate() {
                            dij[0] = xt[base + i * row + j * c + cl];
                        }
                    }
                    let t = transform_input(&d);
                    for (xi, lanes) in t.iter().flatten().enumerate() {
                        v[(xi * tiles + tile) * c + cl] = lanes[0];
                    }
                }
            }
        }
    }
}

/// The 2x2 blocks of image `b` of the chunk from `M [16, tiles, O]`, plus the bias, channel
/// last: `yt [2 * th, 2 * tw, O]`.
#[inline(always)]
fn output_tiles(m: &[f32], o: usize, ch: &Chunk, b: usize, bias: Option<&[f32]>, yt: &mut [f32]) {
    let tiles = ch.tiles();
    let row = 2 * ch.tw * o;
    for ty in 0..ch.th {
        for tx in 0..ch.tw {
            let tile = (b * ch.th + ty) * ch.tw + tx;
            let base = 2 * ty * row + 2 * tx * o;
            let mut k0 = 0;
            while k0 + LANES <= o {
                let mut mt = [[[0f32; LANES]; 4]; 4];
                for (xi, lanes) in mt.iter_mut().flatten().enumerate() {
                    *lanes = m[(xi * tiles + tile) * o + k0..][..LANES]
                        .try_into()
                        .expect("16 lanes");
                }
                let mut y = transform_output(&mt);
                if let Some(bias) = bias {
                    let bias: &[f32; LANES] = bias[k0..][..LANES].try_into().expect("16 lanes");
                    for lanes in y.iter_mut().flatten() {
                        for (yv, bv) in lanes.iter_mut().zip(bias) {
                            *yv += bv;
                        }
                    }
                }
                for (a, ya) in y.iter().enumerate() {
                    for (e, lanes) in ya.iter().enumerate() {
                        yt[base + a * row + e * o + k0..][..LANES].copy_from_slice(lanes);
                    }
                }
                k0 += LANES;
            }
            for kl in k0..o {
                let mut mt = [[[0f32; 1]; 4]; 4];
                for (xi, lanes) in mt.iter_mut().flatten().enumerate() {
                    lanes[0] = m[(xi * tiles + tile) * o + kl];
                }
                let mut y = transform_output(&mt);
                if let Some(bias) = bias {
                    y.iter_mut().flatten().for_each(|lane| lane[0] += bias[kl]);
                }
                for (a, ya) in y.iter().enumerate() {
                    for (e, lanes) in ya.iter().enumerate() {
                        yt[base + a * row + e * o + kl] = lanes[0];
                    }
                }
            }
        }
    }
}

/// The adjoint of `transform_output`: `A dy A^T` of a 2x2 block of output gradient, `L`
/// filters at a time, `A = [[1, 0], [1, 1], [1, -1], [0, -1]]`.
#[inline(always)]
fn transform_output_adjoint<const L: usize>(dy: &[[[f32; L]; 2]; 2]) -> [[[f32; L]; 4]; 4] {
    let mut s = [[[0f32; L]; 2]; 4];
    for j in 0..2 {
        for l in 0..L {
            let (d0, d1) = (dy[0][j][l], dy[1][j][l]);
            s[0][j][l] = d0;
            s[1][j][l] = d0 + d1;
            s[2][j][l] = d0 - d1;
            s[3][j][l] = -d1;
        }
    }
    let mut m = [[[0f32; L]; 4]; 4];
    for i in 0..4 {
        for l in 0..L {
            let (s0, s1) = (s[i][0][l], s[i][1][l]);
            m[i][0][l] = s0;
            m[i][1][l] = s0 + s1;
            m[i][2][l] = s0 - s1;
            m[i][3][l] = -s1;
        }
    }
    m
}

/// `dM [16, tiles, O]` of the chunk's output gradient `dyt [items, 2 * th, 2 * tw, O]`
/// (channel last, zeros in the overhang): the adjoint of `output_tiles` without the bias.
#[inline(always)]
fn grad_tiles(dyt: &[f32], o: usize, ch: &Chunk, dm: &mut [f32]) {
    let tiles = ch.tiles();
    let row = 2 * ch.tw * o;
    for b in 0..ch.items {
        for ty in 0..ch.th {
            for tx in 0..ch.tw {
                let tile = (b * ch.th + ty) * ch.tw + tx;
                let base = (b * 2 * ch.th + 2 * ty) * row + 2 * tx * o;
                let mut k0 = 0;
                while k0 + LANES <= o {
                    let mut d = [[[0f32; LANES]; 2]; 2];
                    for (a, da) in d.iter_mut().enumerate() {
                        for (e, lanes) in da.iter_mut().enumerate() {
                            *lanes = dyt[base + a * row + e * o + k0..][..LANES]
                                .try_into()
                                .expect("16 lanes");
                        }
                    }
                    let m = transform_output_adjoint(&d);
                    for (xi, lanes) in m.iter().flatten().enumerate() {
                        dm[(xi * tiles + tile) * o + k0..][..LANES].copy_from_slice(lanes);
                    }
                    k0 += LANES;
                }
                for kl in k0..o {
                    let mut d = [[[0f32; 1]; 2]; 2];
                    for (a, da) in d.iter_mut().enumerate() {
                        for (e, lanes) in da.iter_mut().enumerate() {
                            lanes[0] = dyt[base + a * row + e * o + kl];
                        }
                    }
                    let m = transform_output_adjoint(&d);
                    for (xi, lanes) in m.iter().flatten().enumerate() {
                        dm[(xi * tiles + tile) * o + kl] = lanes[0];
                    }
                }
            }
        }
    }
}

/// `dW [O, C, 3, 3]` from `dU [16, C, O]`: the adjoint of `weight_tiles`, `G^T dU G`, as
/// `G^T (dU G)`.
pub(super) fn weight_tiles_adjoint(du: &[f32], c: usize, o: usize, dw: &mut [f32]) {
    // Blocks of 16 filters, read as whole 64-byte runs of the 16 planes (`weight_tiles`).
    for ch in 0..c {
        for oc0 in (0..o).step_by(LANES) {
            let n = LANES.min(o - oc0);
            let mut d = [[0f32; LANES]; XI];
            for (xi, lanes) in d.iter_mut().enumerate() {
                lanes[..n].copy_from_slice(&du[(xi * c + ch) * o + oc0..][..n]);
            }
            for l in 0..n {
                // t = dU G, 4x3.
                let mut t = [[0f32; 3]; 4];
                for (i, ti) in t.iter_mut().enumerate() {
                    let [d0, d1, d2, d3] = [0, 1, 2, 3].map(|j| d[i * 4 + j][l]);
                    *ti = [d0 + 0.5 * (d1 + d2), 0.5 * (d1 - d2), 0.5 * (d1 + d2) + d3];
                }
                // dg = G^T t, 3x3.
                let k = &mut dw[((oc0 + l) * c + ch) * 9..][..9];
                for sx in 0..3 {
                    let [t0, t1, t2, t3] = [0, 1, 2, 3].map(|i| t[i][sx]);
                    k[sx] = t0 + 0.5 * (t1 + t2);
                    k[3 + sx] = 0.5 * (t1 - t2);
                    k[6 + sx] = 0.5 * (t1 + t2) + t3;
                }
            }
        }
    }
}

/// `yt [2 * th, 2 * tw, O]` -> `out [O, H, W]` (the overhang of odd sizes dropped).
#[inline(always)]
fn unpad_output(yt: &[f32], g: &Conv2dGeometry, ch: &Chunk, out: &mut [f32]) {
    let (o, hw, row) = (g.o, g.h * g.w, 2 * ch.tw * g.o);
    let out = &mut out[..o * hw];
    for h in 0..g.h {
        let src = &yt[h * row..][..g.w * o];
        // 16 filters at a time: one vector load per pixel.
        let mut k0 = 0;
        while k0 + LANES <= o {
            for (wi, px) in src.chunks_exact(o).enumerate() {
                let lanes: &[f32; LANES] = px[k0..k0 + LANES].try_into().expect("16 lanes");
                for (l, &v) in lanes.iter().enumerate() {
                    out[(k0 + l) * hw + h * g.w + wi] = v;
                }
            }
            k0 += LANES;
        }
        for k in k0..o {
            for (wi, px) in src.chunks_exact(o).enumerate() {
                out[k * hw + h * g.w + wi] = px[k];
            }
        }
    }
}

/// The transforms of one chunk, compiled for AVX-512F or the baseline by the caller.
#[inline(always)]
fn chunk_in(x: &[f32], g: &Conv2dGeometry, ch: &Chunk, xt: &mut [f32], v: &mut [f32]) {
    padded_images(x, g, ch, xt);
    input_tiles(xt, g.c, ch, v);
}

#[inline(always)]
fn chunk_out(
    m: &[f32],
    g: &Conv2dGeometry,
    ch: &Chunk,
    bias: Option<&[f32]>,
    yt: &mut [f32],
    out: &mut [f32],
) {
    let oimg = g.o * g.pixels();
    for (b, out_b) in out[..ch.items * oimg].chunks_exact_mut(oimg).enumerate() {
        output_tiles(m, g.o, ch, b, bias, yt);
        unpad_output(yt, g, ch, out_b);
    }
}

/// `dM` of a chunk's output gradient `dy [items, O, H, W]`, through `dyt`.
#[inline(always)]
fn chunk_grad(dy: &[f32], g: &Conv2dGeometry, ch: &Chunk, dyt: &mut [f32], dm: &mut [f32]) {
    let grid = (2 * ch.th, 2 * ch.tw);
    channel_last(dy, (g.o, g.h, g.w), ch.items, grid, 0, dyt);
    grad_tiles(dyt, g.o, ch, dm);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn chunk_grad_avx512(dy: &[f32], g: &Conv2dGeometry, ch: &Chunk, dyt: &mut [f32], dm: &mut [f32]) {
    let grid = (2 * ch.th, 2 * ch.tw);
    copies_x86::channel_last(dy, (g.o, g.h, g.w), ch.items, grid, 0, dyt);
    grad_tiles(dyt, g.o, ch, dm);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn chunk_in_avx512(x: &[f32], g: &Conv2dGeometry, ch: &Chunk, xt: &mut [f32], v: &mut [f32]) {
    let grid = (ch.pr, ch.pq);
    copies_x86::channel_last(x, (g.c, g.h, g.w), ch.items, grid, 1, xt);
    input_tiles(xt, g.c, ch, v);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn chunk_out_avx512(
    m: &[f32],
    g: &Conv2dGeometry,
    ch: &Chunk,
    bias: Option<&[f32]>,
    yt: &mut [f32],
    out: &mut [f32],
) {
    let oimg = g.o * g.pixels();
    for (b, out_b) in out[..ch.items * oimg].chunks_exact_mut(oimg).enumerate() {
        output_tiles(m, g.o, ch, b, bias, yt);
        copies_x86::unpad_output(yt, g, ch, out_b);
    }
}

/// The channel-last copies in AVX-512: blocks of 16 channels by 16 pixels transposed in
/// registers, one vector load and store per row of a block, where the plain copies gather or
/// scatter a float at a time. Copies only: the same bits as the plain ones.
#[cfg(target_arch = "x86_64")]
mod copies_x86 {
    use std::arch::x86_64::*;

    use super::{zero_margins, Chunk, Conv2dGeometry, LANES};
    use crate::backend::gemm::transpose16;

    /// The first `n` of 16 lanes.
    fn first(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// `super::channel_last`: 16 channels by 16 pixels of the flattened image at a time, so
    /// that small images (4x4: one block) fill whole blocks too.
    #[target_feature(enable = "avx512f")]
    pub(super) fn channel_last(
        src: &[f32],
        (c, h, w): (usize, usize, usize),
        items: usize,
        (rows, cols): (usize, usize),
        off: usize,
        dst: &mut [f32],
    ) {
        let hw = h * w;
        let at = |p: usize| ((p / w + off) * cols + p % w + off) * c;
        for (b, img) in dst[..items * rows * cols * c]
            .chunks_exact_mut(rows * cols * c)
            .enumerate()
        {
            let src = &src[b * c * hw..][..c * hw];
            zero_margins(img, c, (h, w), cols, off);
            let mut c0 = 0;
            while c0 + LANES <= c {
                for p0 in (0..hw).step_by(LANES) {
                    let n = LANES.min(hw - p0);
                    let block = std::array::from_fn(|l| {
                        let s = &src[(c0 + l) * hw + p0..][..n];
                        // SAFETY: the mask reads the `n` floats of `s`.
                        unsafe { _mm512_maskz_loadu_ps(first(n), s.as_ptr()) }
                    });
                    for (p, px) in transpose16(block).iter().enumerate().take(n) {
                        let d = &mut img[at(p0 + p) + c0..][..LANES];
                        // SAFETY: `d` holds 16 floats.
                        unsafe { _mm512_storeu_ps(d.as_mut_ptr(), *px) };
                    }
                }
                c0 += LANES;
            }
            for ci in c0..c {
                for (p, &v) in src[ci * hw..][..hw].iter().enumerate() {
                    img[at(p) + ci] = v;
                }
            }
        }
    }

    /// `super::unpad_output`: 16 pixels of the flattened image by 16 filters at a time.
    #[target_feature(enable = "avx512f")]
    pub(super) fn unpad_output(yt: &[f32], g: &Conv2dGeometry, ch: &Chunk, out: &mut [f32]) {
        let (o, w, hw) = (g.o, g.w, g.h * g.w);
        let at = |p: usize| ((p / w) * 2 * ch.tw + p % w) * o;
        let out = &mut out[..o * hw];
        let mut k0 = 0;
        while k0 + LANES <= o {
            for p0 in (0..hw).step_by(LANES) {
                let n = LANES.min(hw - p0);
                let mut block = [_mm512_setzero_ps(); LANES];
                for (p, px) in block.iter_mut().enumerate().take(n) {
                    let s = &yt[at(p0 + p) + k0..][..LANES];
                    // SAFETY: `s` holds 16 floats.
                    *px = unsafe { _mm512_loadu_ps(s.as_ptr()) };
                }
                for (l, lanes) in transpose16(block).iter().enumerate() {
                    let d = &mut out[(k0 + l) * hw + p0..][..n];
                    // SAFETY: the mask writes the `n` floats of `d`.
                    unsafe { _mm512_mask_storeu_ps(d.as_mut_ptr(), first(n), *lanes) };
                }
            }
            k0 += LANES;
        }
        for k in k0..o {
            for (p, y) in out[k * hw..][..hw].iter_mut().enumerate() {
                *y = yt[at(p) + k];
            }
        }
    }
}

fn lanes_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `V` of a chunk: in AVX-512 lanes where the CPU has them.
fn transform_chunk_in(
    x: &[f32],
    g: &Conv2dGeometry,
    ch: &Chunk,
    xt: &mut [f32],
    v: &mut [f32],
    lanes: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if lanes {
        // SAFETY: the CPU has AVX-512F (`lanes_available`).
        return unsafe { chunk_in_avx512(x, g, ch, xt, v) };
    }
    let _ = lanes;
    chunk_in(x, g, ch, xt, v)
}

/// `dM` of a chunk: in AVX-512 lanes where the CPU has them.
fn transform_chunk_grad(
    dy: &[f32],
    g: &Conv2dGeometry,
    ch: &Chunk,
    dyt: &mut [f32],
    dm: &mut [f32],
    lanes: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if lanes {
        // SAFETY: the CPU has AVX-512F (`lanes_available`).
        return unsafe { chunk_grad_avx512(dy, g, ch, dyt, dm) };
    }
    let _ = lanes;
    chunk_grad(dy, g, ch, dyt, dm)
}

/// The chunk's outputs from `M`: in AVX-512 lanes where the CPU has them.
fn transform_chunk_out(
    m: &[f32],
    g: &Conv2dGeometry,
    ch: &Chunk,
    bias: Option<&[f32]>,
    yt: &mut [f32],
    out: &mut [f32],
    lanes: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if lanes {
        // SAFETY: the CPU has AVX-512F (`lanes_available`).
        return unsafe { chunk_out_avx512(m, g, ch, bias, yt, out) };
    }
    let _ = lanes;
    chunk_out(m, g, ch, bias, yt, out)
}

/// `out [N, O, H, W] = conv(x, weight) + bias` by Winograd F(2,3), for a convolution that
/// `fits`: chunks of `chunk_images` images spread over the rayon threads, each transformed,
/// multiplied and transformed back on one thread.
pub(super) fn forward(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    g: &Conv2dGeometry,
    out: &mut [f32],
) -> Result<()> {
    forward_lanes(x, weight, bias, g, out, lanes_available())
}

/// `forward` with the transforms in AVX-512 lanes or not (`lanes` only where the CPU has
/// AVX-512F): tests compare the two.
pub(super) fn forward_lanes(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    g: &Conv2dGeometry,
    out: &mut [f32],
    lanes: bool,
) -> Result<()> {
    let (c, o, oimg) = (g.c, g.o, g.o * g.pixels());
    let mut u = scratch::take(XI * c * o);
    weight_tiles(weight, c, o, &mut u);
    let u = &u[..XI * c * o];
    let items = chunk_images(g);
    let full = Chunk::new(g, items);
    out[..g.n * oimg]
        .par_chunks_mut(items * oimg)
        .zip(x.par_chunks(items * g.image()))
        .try_for_each_init(
            || {
                (
                    scratch::take(items * full.pr * full.pq * c),
                    scratch::take(XI * full.tiles() * c),
                    scratch::take(XI * full.tiles() * o),
                    scratch::take(4 * full.th * full.tw * o),
                )
            },
            |(xt, v, m, yt), (out_c, x_c)| {
                let ch = Chunk::new(g, out_c.len() / oimg);
                let tiles = ch.tiles();
                transform_chunk_in(x_c, g, &ch, xt, v, lanes);
                for xi in 0..XI {
                    sgemm_serial(
                        false,
                        false,
                        tiles,
                        o,
                        c,
                        1.0,
                        &v[xi * tiles * c..][..tiles * c],
                        &u[xi * c * o..][..c * o],
                        0.0,
                        &mut m[xi * tiles * o..][..tiles * o],
                    )?;
                }
                transform_chunk_out(m, g, &ch, bias, yt, out_c, lanes);
                Ok(())
            },
        )
}

/// `dW [O, C, 3, 3]` of a convolution that `fits`, from its input and output gradient `dy`:
/// the exact gradient of the Winograd forward, `dU_ξ = V_ξ^T x dM_ξ` summed over the tiles
/// (`dM` the adjoint of the output transform of `dy`), then `dW = G^T dU G`. Chunks of
/// `chunk_images` images are grouped into runs spread over the rayon threads, each run's
/// partial `dU` accumulated chunk by chunk and the runs' partials added in run order: the
/// same bits on any number of threads.
pub(super) fn weight_gradient(x: &[f32], dy: &[f32], g: &Conv2dGeometry) -> Result<Vec<f32>> {
    weight_gradient_lanes(x, dy, g, lanes_available())
}

/// `weight_gradient` with the transforms in AVX-512 lanes or not (`lanes` only where the CPU
/// has AVX-512F).
pub(super) fn weight_gradient_lanes(
    x: &[f32],
    dy: &[f32],
    g: &Conv2dGeometry,
    lanes: bool,
) -> Result<Vec<f32>> {
    let (c, o, oimg) = (g.c, g.o, g.o * g.pixels());
    let mut dw = vec![0f32; o * c * 9];
    if g.n == 0 {
        return Ok(dw);
    }
    let items = chunk_images(g);
    let chunks = g.n.div_ceil(items);
    // The fewest runs the im2col backward uses: each run's partial `dU` is 16/9 of `dW`, a
    // fresh buffer to fill and to add, and chunks of 256 tiles already keep runs long.
    let runs = super::BACKWARD_RUNS.0.min(chunks);
    let per = chunks.div_ceil(runs.max(1));
    let full = Chunk::new(g, items);
    let parts = (0..chunks.div_ceil(per))
        .into_par_iter()
        .map(|run| -> Result<Vec<f32>> {
            let mut du = vec![0f32; XI * c * o];
            let mut xt = scratch::take(items * full.pr * full.pq * c);
            let mut v = scratch::take(XI * full.tiles() * c);
            let mut dyt = scratch::take(4 * full.tiles() * o);
            let mut dm = scratch::take(XI * full.tiles() * o);
            for (i, chunk) in (run * per..((run + 1) * per).min(chunks)).enumerate() {
                let first = chunk * items;
                let ch = Chunk::new(g, items.min(g.n - first));
                let tiles = ch.tiles();
                let x_c = &x[first * g.image()..][..ch.items * g.image()];
                let dy_c = &dy[first * oimg..][..ch.items * oimg];
                transform_chunk_in(x_c, g, &ch, &mut xt, &mut v, lanes);
                transform_chunk_grad(dy_c, g, &ch, &mut dyt, &mut dm, lanes);
                let beta = if i == 0 { 0.0 } else { 1.0 };
                for xi in 0..XI {
                    sgemm_serial(
                        true,
                        false,
                        c,
                        o,
                        tiles,
                        1.0,
                        &v[xi * tiles * c..][..tiles * c],
                        &dm[xi * tiles * o..][..tiles * o],
                        beta,
                        &mut du[xi * c * o..][..c * o],
                    )?;
                }
            }
            Ok(du)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut du = scratch::take(XI * c * o);
    super::sum_in_order(&mut du[..XI * c * o], &parts);
    weight_tiles_adjoint(&du, c, o, &mut dw);
    Ok(dw)
}
