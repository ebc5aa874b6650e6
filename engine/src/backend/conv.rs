//! 2-D convolution (NCHW, groups 1, dilation 1) at the backend level: [`conv2d_fwd`] and
//! [`conv2d_bwd`], dispatched by device, with the CPU arm below them and the CUDA arm in
//! `crate::cuda::conv` (cuDNN, the bias through `bias_add.cu`). It dominates a ResNet step on
//! the CPU.
//!
//! The CPU arm lowers it to matrix products (im2col): the patches of one image form a column
//! matrix `cols [C*kh*kw, OH*OW]`, and `out = W [O, C*kh*kw] x cols`. A 1x1 stride-1 unpadded
//! convolution needs no lowering: the image itself is the column matrix. Backward reuses the
//! same lowering: `dW += dY_n x cols_n^T`, `dcols = W^T x dY_n` scattered back by col2im, and
//! `dbias` sums `dY` over the batch and pixels. Columns are recomputed in backward rather than
//! kept from forward: they are `kh*kw` times the input, too much memory to hold per layer.
//!
//! Specialisations for the small images and few channels of a CPU-sized ResNet (each
//! checked against the general path it replaces, `conv_paths_tests.rs`):
//! - a "same" convolution (stride 1, output as large as the input: ResNet's 3x3) builds each
//!   column row in one masked pass per image over the group's channel laid out as one tall,
//!   zero-margined image (`phase_images`, `same_row`), not a copy and fills per 4-28-float
//!   row; a strided one whose output is the input divided by the stride (ResNet's 3x3 stride
//!   2) the same way over the input's stride phases (`phase_rows`), not a gather per row;
//! - the input gradient of a stride-1 convolution runs as the forward convolution of `dY` with
//!   the flipped weight (`transposed_geometry`): products of depth `O*kh*kw` and a gather,
//!   instead of depth `O` (8 for the demo's first stage) and the col2im scatter-add.
//!   `conv2d_backward_cpu_lowered` keeps the lowered input gradient as the oracle;
//! - the weight gradient of most 3x3 layers runs as `dW^T = cols x dY^T`, the column matrix
//!   read in place, instead of packing its transpose (`dw_by_columns_in_place`);
//! - with few filters (8-64 for the forward, 8-32 for the weight gradient) and AVX-512, no
//!   column matrix at all: the kernels of `conv_direct.rs` read the shifted, masked phase
//!   planes in place (`direct_forward_fits`, `direct_weight_gradient_fits`); the im2col
//!   product spends most of its time on the columns when each is used by so few filters;
//! - 3x3 stride-1 "same" convolutions of 64 or more channels and filters (ResNet's, full
//!   width) run by Winograd F(2,3) in `conv_winograd.rs`, forward, input gradient (as a
//!   forward) and weight gradient: 2.25x fewer multiply-adds (`winograd::fits`).
//!
//! Temporaries (columns, their gradients, gathered output gradients) come from the per-thread
//! pool of `backend::scratch`, not a fresh zeroed allocation per call.
//!
//! With bf16 weights (a frozen teacher's, or a student's computing in bf16) the forward runs
//! in bf16 products (`backend::gemm::gemm_bf16`, f32 accumulation) where the CPU has them,
//! and the backward in `backend::conv_bf16`.
//!
//! Three schedules (measured in docs/benchmarks.md and docs/benchmarks-steps.md), picked by
//! `ConvSchedule::auto`:
//! - `PerItem`: batch items spread over rayon threads, each product on one thread
//!   (`sgemm_serial`), and per-thread partial sums of `dW` added at the end. No
//!   synchronisation inside a step, so it is the fastest when the batch covers the threads.
//! - `Grouped { items }`: the same, but each single-thread product covers a group of `items`
//!   images, their columns side by side (`[C*kh*kw, items*OH*OW]`). For small images (ResNet's
//!   last stages: 7x7 and 4x4 pixels) a product per image is too narrow: the forward and the
//!   input gradient stream the whole weight matrix once per image, and `dW` reads and writes
//!   all of itself once per image (k = 16 for 4x4), so those products run at memory speed. A
//!   group of images reads the weight once and accumulates `dW` over `items * OH * OW` pixels
//!   at a time. `PerItem` is `Grouped { items: 1 }`.
//! - `Batched { items }`: a group of items' columns side by side, one threaded product per
//!   group. Used for batches smaller than the thread count.

//!
//! Storage types: the CPU arm reads f32 or bf16 and writes f32; the CUDA arm runs in the
//! input's dtype (the weight cast to it), writes the output, `dx` and `dweight` in it, and
//! `dbias` in f32 (its kernel sums in f32).

use std::cell::RefCell;

use rayon::prelude::*;

pub use super::conv_bf16::conv2d_forward_bf16_cpu;
use super::{scratch, Conv2dGeometry};
use crate::backend::gemm::{
    avx512_active, bf16_products_active, sgemm, sgemm_serial, SERIAL_GEMM_AVAILABLE,
};
use crate::{DType, Device, Error, Result, Tensor};

/// The operands of a convolution as the backend keeps them for its backward: the input and the
/// weight themselves on the CPU; on a GPU the weight in the input's dtype, and either copied
/// to a 16-byte aligned address when it was not (once per forward, not again per backward).
#[derive(Debug, Clone)]
pub struct ConvOperands {
    pub x: Tensor,
    pub weight: Tensor,
}

/// `conv2d(x [N, C, H, W], weight [O, C, kh, kw], bias [O]) -> [N, O, OH, OW]` for the geometry
/// `g` made from their shapes, on their device, and the operands its backward needs.
pub fn conv2d_fwd(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    g: &Conv2dGeometry,
) -> Result<(Tensor, ConvOperands)> {
    const OP: &str = "conv2d";
    x.expect_float(OP)?;
    weight.expect_float(OP)?;
    if x.shape() != [g.n, g.c, g.h, g.w] || weight.shape() != [g.o, g.c, g.kh, g.kw] {
        return Err(Error::shape(
            OP,
            format!(
                "input {:?} and weight {:?} are not the shapes their geometry was made for",
                x.shape(),
                weight.shape()
            ),
        ));
    }
    if let Some(b) = bias {
        b.expect_float(OP)?;
        if b.shape() != [g.o] {
            return Err(Error::shape(
                OP,
                format!(
                    "bias {:?} does not fit weight {:?} (expected [{}])",
                    b.shape(),
                    weight.shape(),
                    g.o
                ),
            ));
        }
    }
    let mut on: Vec<&Tensor> = vec![x, weight];
    on.extend(bias);
    match crate::cuda::common_device(OP, &on)? {
        Device::Cpu => {}
        d => return crate::on_cuda!(d, crate::cuda::conv::conv2d_fwd(x, weight, bias, g)),
    }
    let mut out = scratch::zeroed(g.n * g.o * g.pixels());
    {
        let bias_read = bias.map(|b| b.read_f32()).transpose()?;
        if weight.dtype() == DType::BF16 && bf16_products_active() {
            // bf16 weights (a frozen teacher's, or a student's computing in bf16): bf16
            // products, f32 accumulation.
            conv2d_forward_bf16_cpu(
                &x.read_f32()?,
                &weight.read_bf16()?,
                bias_read.as_deref(),
                g,
                &mut out,
            )?;
        } else {
            conv2d_forward_cpu(
                &x.read_f32()?,
                &weight.read_f32()?,
                bias_read.as_deref(),
                g,
                &mut out,
            )?;
        }
    }
    let operands = ConvOperands {
        x: x.clone(),
        weight: weight.clone(),
    };
    Ok((Tensor::f32(out, &[g.n, g.o, g.oh, g.ow])?, operands))
}

/// The gradients of [`conv2d_fwd`] from its kept operands and the output gradient `dy`
/// (`[N, O, OH, OW]`): `[dx, dweight, dbias]`, each only when `need` asks for it.
pub fn conv2d_bwd(
    operands: &ConvOperands,
    dy: &Tensor,
    g: &Conv2dGeometry,
    need: [bool; 3],
) -> Result<[Option<Tensor>; 3]> {
    const OP: &str = "conv2d";
    if dy.shape() != [g.n, g.o, g.oh, g.ow] {
        return Err(Error::shape(
            OP,
            format!(
                "the output gradient {:?} differs from the output {:?}",
                dy.shape(),
                [g.n, g.o, g.oh, g.ow]
            ),
        ));
    }
    let (x, w) = (&operands.x, &operands.weight);
    match crate::cuda::common_device(OP, &[x, w, dy])? {
        Device::Cpu => {
            let (xr, dyr) = (x.read_f32()?, dy.read_f32()?);
            let grads = if w.dtype() == DType::BF16 && bf16_products_active() {
                // bf16 weights (a student computing in bf16): bf16 products, as the forward.
                super::conv_bf16::conv2d_backward_bf16_cpu(&xr, &w.read_bf16()?, &dyr, g, need)?
            } else {
                conv2d_backward_cpu(&xr, &w.read_f32()?, &dyr, g, need)?
            };
            Ok([
                grads.x.map(|d| Tensor::f32(d, x.shape())).transpose()?,
                grads
                    .weight
                    .map(|d| Tensor::f32(d, w.shape()))
                    .transpose()?,
                grads.bias.map(|d| Tensor::f32(d, &[g.o])).transpose()?,
            ])
        }
        d => crate::on_cuda!(d, crate::cuda::conv::conv2d_bwd(x, w, dy, g, need)),
    }
}

// ---------------------------------------------------------------------------------------------
// The CPU arm
// ---------------------------------------------------------------------------------------------

/// How the batch is split into matrix products (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvSchedule {
    PerItem,
    Grouped { items: usize },
    Batched { items: usize },
}

/// Output pixels a `Grouped` product aims at (`items * OH * OW`): 256 makes the narrowest
/// products of a ResNet (4x4 images) as wide as a 16x16 image's, past the point where the
/// weight's traffic dominates.
const GROUP_PIXELS: usize = 256;

/// Column-matrix elements a `Batched` group aims at (16 MiB of f32): large enough to keep a
/// threaded product busy, small enough not to grow memory with the batch.
const BATCHED_COLS_BUDGET: usize = 4 << 20;

/// Elements of per-run partial weight gradients `PerItem` may hold at once (32 MiB of f32).
const PARTIAL_DW_BUDGET: usize = 8 << 20;

/// Fewest and most runs of images the backward of `PerItem` / `Grouped` splits a batch into.
/// Runs are shared dynamically (rayon work stealing), so more runs than threads let a thread
/// that other work slowed down leave runs to the others; each run holds a partial `dW`.
const BACKWARD_RUNS: (usize, usize) = (4, 16);

/// Groups `ConvSchedule::auto` leaves at least (when the batch allows): enough to share among
/// the threads dynamically, fixed so that the grouping never depends on the thread count.
const MIN_GROUPS: usize = 8;

impl ConvSchedule {
    pub fn auto(g: &Conv2dGeometry) -> ConvSchedule {
        let threads = rayon::current_num_threads().max(1);
        // Per-thread products need an sgemm that stays on its thread (not OpenBLAS).
        if SERIAL_GEMM_AVAILABLE && g.n >= threads {
            // Groups small enough to share among threads, of a size set by the shape and
            // the batch alone: the backward's sums then run in one order on any pool.
            let items = GROUP_PIXELS
                .div_ceil(g.pixels().max(1))
                .clamp(1, g.n.div_ceil(MIN_GROUPS));
            if items == 1 {
                ConvSchedule::PerItem
            } else {
                ConvSchedule::Grouped { items }
            }
        } else {
            let per_item = (g.patch() * g.pixels()).max(1);
            ConvSchedule::Batched {
                items: (BATCHED_COLS_BUDGET / per_item).clamp(1, g.n.max(1)),
            }
        }
    }

    /// Images per single-thread product of `PerItem` / `Grouped`.
    pub(super) fn group(self) -> usize {
        match self {
            ConvSchedule::Grouped { items } => items.max(1),
            _ => 1,
        }
    }
}

/// `[cnt, O, P]` -> `[O, cnt * P]`: a group's output gradient in the layout of its columns.
pub(super) fn gather_group(src: &[f32], cnt: usize, o: usize, p: usize, dst: &mut [f32]) {
    for (oc, row) in dst[..o * cnt * p].chunks_mut(cnt * p).enumerate() {
        for (b, d) in row.chunks_mut(p).enumerate() {
            copy_short(d, &src[(b * o + oc) * p..][..p]);
        }
    }
}

/// Valid output columns `[lo, hi)` of kernel column `j`: those whose input column
/// `ow * stride + j - padding` lies inside `[0, w)`.
fn valid_range(out_len: usize, in_len: usize, k: usize, g: &Conv2dGeometry) -> (usize, usize) {
    let (s, p) = (g.stride, g.padding);
    let lo = if p > k { (p - k).div_ceil(s) } else { 0 };
    let hi = if in_len + p > k {
        ((in_len + p - k - 1) / s + 1).min(out_len)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// Fills row `r = (c, i, j)` of the column matrix of `items` images (`x` holds them back to
/// back): `row[b * P + oh * OW + ow] = x[b, c, oh*s + i - p, ow*s + j - p]`, zero in the padding.
fn im2col_row(x: &[f32], g: &Conv2dGeometry, items: usize, r: usize, row: &mut [f32]) {
    let (c, i, j) = (r / (g.kh * g.kw), (r / g.kw) % g.kh, r % g.kw);
    let (lo, hi) = valid_range(g.ow, g.w, j, g);
    let (ih_lo, ih_hi) = valid_range(g.oh, g.h, i, g);
    for b in 0..items {
        let plane = &x[b * g.image() + c * g.h * g.w..][..g.h * g.w];
        let dst_img = &mut row[b * g.pixels()..(b + 1) * g.pixels()];
        // Rows are short (4-28 floats): one fill of the image, then the valid spans, rather
        // than a fill call per row margin.
        if lo > 0 || hi < g.ow || ih_lo > 0 || ih_hi < g.oh {
            dst_img.fill(0.0);
        }
        if lo >= hi {
            continue;
        }
        let first = lo * g.stride + j - g.padding;
        for (oh, dst) in dst_img.chunks_exact_mut(g.ow).enumerate() {
            if oh < ih_lo || oh >= ih_hi {
                continue;
            }
            let src = &plane[(oh * g.stride + i - g.padding) * g.w..][..g.w];
            match g.stride {
                1 => copy_short(&mut dst[lo..hi], &src[first..first + hi - lo]),
                2 => gather_strided::<2>(&mut dst[lo..hi], &src[first..]),
                s => gather_strided_any(&mut dst[lo..hi], &src[first..], s),
            }
        }
    }
}

/// `dst[k] = src[S * k]`, with the stride known to the compiler (it vectorises this).
fn gather_strided<const S: usize>(dst: &mut [f32], src: &[f32]) {
    let n = dst.len();
    if n == 0 {
        return;
    }
    let src = &src[..S * (n - 1) + 1];
    for (k, d) in dst.iter_mut().enumerate() {
        *d = src[S * k];
    }
}

fn gather_strided_any(dst: &mut [f32], src: &[f32], stride: usize) {
    for (d, s) in dst.iter_mut().zip(src.iter().step_by(stride)) {
        *d = *s;
    }
}

/// `dst.copy_from_slice(src)` for the short rows of small images, in fixed 8-float blocks the
/// compiler copies inline (a library `memmove` call costs more than moving 16-64 bytes).
fn copy_short(dst: &mut [f32], src: &[f32]) {
    if dst.len() >= 64 {
        dst.copy_from_slice(src);
        return;
    }
    let src = &src[..dst.len()];
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (d8, s8) in (&mut d).zip(&mut s) {
        let s8: [f32; 8] = s8.try_into().expect("8-float block");
        d8.copy_from_slice(&s8);
    }
    for (x, y) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *x = *y;
    }
}

/// Whether the rows of the column matrix are shifted copies of the input (`same_row`): stride
/// 1 and output images as large as input ones (a "same" convolution, ResNet's 3x3 ones).
fn shifts_rows(g: &Conv2dGeometry) -> bool {
    g.stride == 1 && g.ow == g.w && g.oh == g.h
}

/// Whether the rows of the column matrix are shifted, masked copies of the input's stride
/// phases (`phase_images`, `same_row`): a "same" convolution (`shifts_rows`), or a strided one
/// whose output is the input's size divided by the stride, rounded up (ResNet's 3x3 stride-2
/// ones), with a kernel at least the stride wide so that every phase is read. Gathering each
/// column row from the input instead moves 4-14 floats per call at stride 2.
fn phase_rows(g: &Conv2dGeometry) -> bool {
    let s = g.stride;
    shifts_rows(g)
        || (s > 1 && g.kh >= s && g.kw >= s && g.oh == g.h.div_ceil(s) && g.ow == g.w.div_ceil(s))
}

/// Where kernel offset `(i, j)` of a `phase_rows` convolution reads in `phase_images`: the
/// phase `((i - p) mod s, (j - p) mod s)` (as `pi * s + pj`) and the shift
/// `floor((i - p) / s) * OW + floor((j - p) / s)` from the output pixel's index.
fn phase_of(g: &Conv2dGeometry, i: usize, j: usize) -> (usize, isize) {
    let s = g.stride as isize;
    let (di, dj) = (
        i as isize - g.padding as isize,
        j as isize - g.padding as isize,
    );
    let phase = di.rem_euclid(s) * s + dj.rem_euclid(s);
    (
        phase as usize,
        di.div_euclid(s) * g.ow as isize + dj.div_euclid(s),
    )
}

/// The zeros `phase_images` puts before and after each plane: the largest backward and
/// forward shifts (`phase_of`, monotonic in `i` and `j`).
fn phase_margins(g: &Conv2dGeometry) -> (usize, usize) {
    let lo = phase_of(g, 0, 0).1;
    let hi = phase_of(g, g.kh - 1, g.kw - 1).1;
    ((-lo).max(0) as usize, hi.max(0) as usize)
}

/// Floats per plane of `phase_images`: the group's pixels and the margins.
fn phase_plane(g: &Conv2dGeometry, items: usize) -> usize {
    let (front, back) = phase_margins(g);
    front + items * g.pixels() + back
}

/// `[items, C, H, W]` -> `[C, s*s, items, OH, OW]` with zero margins, for a `phase_rows`
/// convolution of stride `s`: each channel's `s*s` stride phases
/// (`phase[pi*s + pj][oh, ow] = x[oh*s + pi, ow*s + pj]`, 0 past the image's edge), each over
/// the group of images as one tall image with `phase_margins` zeros around it, the planes
/// `plane` floats apart (returned). At stride 1 the one phase is the image itself. Kernel
/// offset `(i, j)` of the group's output pixel `q` reads
/// `planes[(c*s*s + phase) * plane + front + shift + q]` (`phase_of`), always inside the
/// buffer; where it falls in the padding, the masks of `inside_masks` zero it.
fn phase_images(x: &[f32], g: &Conv2dGeometry, items: usize, out: &mut [f32]) -> usize {
    let (s, hw, pix) = (g.stride, g.h * g.w, g.pixels());
    let (front, _) = phase_margins(g);
    let plane = phase_plane(g, items);
    // Only the margins are zeroed: the images overwrite the rest of a reused buffer.
    for (cp, dst) in out[..g.c * s * s * plane]
        .chunks_exact_mut(plane)
        .enumerate()
    {
        let (c, pi, pj) = (cp / (s * s), (cp / s) % s, cp % s);
        let (head, rest) = dst.split_at_mut(front);
        let (body, tail) = rest.split_at_mut(items * pix);
        head.fill(0.0);
        tail.fill(0.0);
        for (b, d) in body.chunks_exact_mut(pix).enumerate() {
            let src = &x[b * g.image() + c * hw..][..hw];
            if s == 1 {
                d.copy_from_slice(src);
                continue;
            }
            // Columns of this phase inside the image: `ow * s + pj < W`.
            let inside = if pj < g.w { (g.w - pj).div_ceil(s) } else { 0 };
            for (oh, row) in d.chunks_exact_mut(g.ow).enumerate() {
                let ih = oh * s + pi;
                let (head, rest) = row.split_at_mut(inside.min(g.ow));
                rest.fill(0.0);
                if ih >= g.h {
                    head.fill(0.0);
                    continue;
                }
                let src = &src[ih * g.w + pj.min(g.w)..(ih + 1) * g.w];
                match s {
                    2 => gather_strided::<2>(head, src),
                    _ => gather_strided_any(head, src, s),
                }
            }
        }
    }
    plane
}

/// Per kernel offset `(i, j)` (row `i * kw + j`), all bits set at the output pixels of an image
/// whose source lies inside it and none at those that fall in the padding.
fn inside_masks(g: &Conv2dGeometry, out: &mut Vec<u32>) {
    out.clear();
    out.resize(g.kh * g.kw * g.pixels(), 0);
    for (k, mask) in out.chunks_exact_mut(g.pixels()).enumerate() {
        let (lo, hi) = valid_range(g.ow, g.w, k % g.kw, g);
        let (ih_lo, ih_hi) = valid_range(g.oh, g.h, k / g.kw, g);
        for oh in ih_lo..ih_hi {
            mask[oh * g.ow + lo..oh * g.ow + hi].fill(u32::MAX);
        }
    }
}

/// The sizes [`inside_masks`] depends on: kernel, image, stride, padding.
type MaskKey = [usize; 6];

/// Mask tables a thread keeps: more than the distinct "same" shapes of a ResNet.
const MASK_SHAPES: usize = 16;

/// Per-shape tables of [`inside_masks`], made once per shape and thread and kept.
type MaskCache = Vec<(MaskKey, Vec<u32>)>;

thread_local! {
    /// Each thread's phase planes and mask tables of `same_rows`, kept from call to call (as
    /// the sgemm keeps its packing buffers): no allocation per call, and no temporary besides
    /// the columns themselves once a thread has run its largest convolution.
    static SAME_ROW_BUFS: RefCell<(Vec<f32>, MaskCache)> =
        const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The masks of `g` from `cache`, made (and the oldest table dropped when full) if missing.
fn cached_masks<'a>(g: &Conv2dGeometry, cache: &'a mut MaskCache) -> &'a [u32] {
    let key = [g.kh, g.kw, g.h, g.w, g.stride, g.padding];
    let at = match cache.iter().position(|(k, _)| *k == key) {
        Some(at) => at,
        None => {
            if cache.len() >= MASK_SHAPES {
                cache.remove(0);
            }
            let mut masks = Vec::new();
            inside_masks(g, &mut masks);
            cache.push((key, masks));
            cache.len() - 1
        }
    };
    &cache[at].1
}

/// `im2col_cpu` of a `phase_rows` convolution, row by row with `same_row`.
fn same_rows(
    x: &[f32],
    g: &Conv2dGeometry,
    items: usize,
    cols: &mut [f32],
    parallel: bool,
    (planes, masks): (&mut Vec<f32>, &mut MaskCache),
) {
    let need = g.c * g.stride * g.stride * phase_plane(g, items);
    if planes.len() < need {
        planes.resize(need, 0.0);
    }
    let plane = phase_images(x, g, items, planes);
    let (planes, masks) = (&planes[..], cached_masks(g, masks));
    let (k, row_len) = (g.kh * g.kw, items * g.pixels());
    let one = |(r, row): (usize, &mut [f32])| {
        let mask = &masks[(r % k) * g.pixels()..][..g.pixels()];
        same_row(planes, plane, g, r, mask, row)
    };
    if parallel {
        cols.par_chunks_mut(row_len).enumerate().for_each(one);
    } else {
        cols.chunks_mut(row_len).enumerate().for_each(one);
    }
}

/// Row `r = (c, i, j)` of the column matrix of a `phase_rows` convolution: per image, one pass
/// that copies the shifted phase plane (`phase_images`, `phase_of`) where `mask`
/// (`inside_masks`, offset `(i, j)`) is set and writes 0 in the padding, instead of a copy and
/// fills per image row (the rows of small images are 4-28 floats long).
fn same_row(
    planes: &[f32],
    plane: usize,
    g: &Conv2dGeometry,
    r: usize,
    mask: &[u32],
    row: &mut [f32],
) {
    let (k, s) = (g.kh * g.kw, g.stride);
    let (phase, shift) = phase_of(g, (r % k) / g.kw, r % g.kw);
    let src = &planes[((r / k) * s * s + phase) * plane..][..plane];
    let base = (phase_margins(g).0 as isize + shift) as usize;
    let pix = g.pixels();
    for (b, img) in row.chunks_exact_mut(pix).enumerate() {
        let src = &src[b * pix + base..][..pix];
        // A bitwise AND with all ones or zeros: exact for every value, and vectorised.
        for ((d, s), m) in img.iter_mut().zip(src).zip(mask) {
            *d = f32::from_bits(s.to_bits() & m);
        }
    }
}

/// The column matrix `[C*kh*kw, items*OH*OW]` of `items` images (`x` = `[items, C, H, W]`).
pub fn im2col_cpu(x: &[f32], g: &Conv2dGeometry, items: usize, cols: &mut [f32], parallel: bool) {
    let row_len = items * g.pixels();
    if row_len == 0 {
        return;
    }
    let cols = &mut cols[..g.patch() * row_len];
    if phase_rows(g) {
        // A thread that runs another convolution while this one's rows are built (work
        // stealing inside the parallel loop) finds the buffers taken and uses fresh ones.
        SAME_ROW_BUFS.with(|bufs| match bufs.try_borrow_mut() {
            Ok(mut b) => {
                let (tall, masks) = &mut *b;
                same_rows(x, g, items, cols, parallel, (tall, masks))
            }
            Err(_) => same_rows(
                x,
                g,
                items,
                cols,
                parallel,
                (&mut Vec::new(), &mut Vec::new()),
            ),
        });
        return;
    }
    if parallel {
        cols.par_chunks_mut(row_len)
            .enumerate()
            .for_each(|(r, row)| im2col_row(x, g, items, r, row));
    } else {
        for (r, row) in cols.chunks_mut(row_len).enumerate() {
            im2col_row(x, g, items, r, row);
        }
    }
}

/// Adds the column-matrix entries that came from plane `(b, c)` back onto it (`plane` is
/// overwritten): the adjoint of `im2col_row` for the `kh*kw` rows of channel `c`.
fn col2im_plane(
    cols: &[f32],
    g: &Conv2dGeometry,
    items: usize,
    b: usize,
    c: usize,
    plane: &mut [f32],
) {
    plane.fill(0.0);
    let row_len = items * g.pixels();
    for i in 0..g.kh {
        let (ih_lo, ih_hi) = valid_range(g.oh, g.h, i, g);
        for j in 0..g.kw {
            let (lo, hi) = valid_range(g.ow, g.w, j, g);
            if lo >= hi {
                continue;
            }
            let r = (c * g.kh + i) * g.kw + j;
            let src_img = &cols[r * row_len + b * g.pixels()..][..g.pixels()];
            for oh in ih_lo..ih_hi {
                let src = &src_img[oh * g.ow..][lo..hi];
                let dst = &mut plane[(oh * g.stride + i - g.padding) * g.w..][..g.w];
                let first = lo * g.stride + j - g.padding;
                if g.stride == 1 {
                    dst[first..first + hi - lo]
                        .iter_mut()
                        .zip(src)
                        .for_each(|(d, s)| *d += s);
                } else {
                    for (d, s) in dst[first..].iter_mut().step_by(g.stride).zip(src) {
                        *d += s;
                    }
                }
            }
        }
    }
}

/// `dx [items, C, H, W]` from the gradient of the column matrix (overwrites `dx`).
pub fn col2im_cpu(cols: &[f32], g: &Conv2dGeometry, items: usize, dx: &mut [f32], parallel: bool) {
    let plane = g.h * g.w;
    if plane == 0 || g.c == 0 {
        return;
    }
    let dx = &mut dx[..items * g.image()];
    let one = |(idx, p): (usize, &mut [f32])| col2im_plane(cols, g, items, idx / g.c, idx % g.c, p);
    if parallel {
        dx.par_chunks_mut(plane).enumerate().for_each(one);
    } else {
        dx.chunks_mut(plane).enumerate().for_each(one);
    }
}

fn add_bias(out_item: &mut [f32], bias: Option<&[f32]>, pixels: usize) {
    if let Some(bias) = bias {
        for (row, b) in out_item.chunks_mut(pixels).zip(bias) {
            row.iter_mut().for_each(|v| *v += b);
        }
    }
}

fn check_buffers(g: &Conv2dGeometry, x: usize, w: usize, out: usize, out_name: &str) -> Result<()> {
    let (want_x, want_w, want_out) = (g.n * g.image(), g.o * g.patch(), g.n * g.o * g.pixels());
    if x < want_x || w < want_w || out < want_out {
        return Err(Error::shape(
            "conv2d",
            format!(
                "buffers of {x}, {w}, {out} elements for input, weight, {out_name}; \
                 {g:?} needs {want_x}, {want_w}, {want_out}"
            ),
        ));
    }
    Ok(())
}

/// `out [N, O, OH, OW] = conv(x [N, C, H, W], weight [O, C, kh, kw]) + bias [O]`, with the
/// schedule `ConvSchedule::auto` picks.
pub fn conv2d_forward_cpu(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    g: &Conv2dGeometry,
    out: &mut [f32],
) -> Result<()> {
    conv2d_forward_cpu_with(x, weight, bias, g, out, ConvSchedule::auto(g))
}

/// `conv2d_forward_cpu` with an explicit schedule (benchmarks, tests).
pub fn conv2d_forward_cpu_with(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    g: &Conv2dGeometry,
    out: &mut [f32],
    schedule: ConvSchedule,
) -> Result<()> {
    check_buffers(g, x.len(), weight.len(), out.len(), "output")?;
    if let Some(b) = bias {
        if b.len() < g.o {
            return Err(Error::shape(
                "conv2d",
                format!("bias of {} elements for {} output channels", b.len(), g.o),
            ));
        }
    }
    let (ck, p, img, oimg) = (g.patch(), g.pixels(), g.image(), g.o * g.pixels());
    if g.n == 0 || oimg == 0 {
        return Ok(());
    }
    let out = &mut out[..g.n * oimg];
    if ck == 0 {
        // No input channels: the output is the bias alone.
        out.chunks_mut(oimg).for_each(|o| {
            o.fill(0.0);
            add_bias(o, bias, p);
        });
        return Ok(());
    }
    match schedule {
        ConvSchedule::PerItem | ConvSchedule::Grouped { .. } if winograd::fits(g) => {
            winograd::forward(x, weight, bias, g, out)
        }
        ConvSchedule::PerItem | ConvSchedule::Grouped { .. } if direct_forward_fits(g) => {
            direct_forward(x, weight, bias, g, out, schedule.group());
            Ok(())
        }
        ConvSchedule::PerItem | ConvSchedule::Grouped { .. } => {
            grouped_forward(x, bias, g, out, schedule.group(), |cols, columns, out| {
                sgemm_serial(false, false, g.o, columns, ck, 1.0, weight, cols, 0.0, out)
            })
        }
        ConvSchedule::Batched { items } => {
            let items = items.clamp(1, g.n);
            let mut cols = vec![
                0f32;
                if g.is_pointwise() && items == 1 {
                    0
                } else {
                    ck * items * p
                }
            ];
            let mut tmp = vec![0f32; if items == 1 { 0 } else { g.o * items * p }];
            for (gi, out_g) in out.chunks_mut(items * oimg).enumerate() {
                let cnt = out_g.len() / oimg;
                let x_g = &x[gi * items * img..][..cnt * img];
                let cols: &[f32] = if g.is_pointwise() && items == 1 {
                    x_g
                } else {
                    im2col_cpu(x_g, g, cnt, &mut cols, true);
                    &cols
                };
                if cnt == 1 {
                    sgemm(false, false, g.o, p, ck, 1.0, weight, cols, 0.0, out_g)?;
                    add_bias(out_g, bias, p);
                    continue;
                }
                let tmp = &mut tmp[..g.o * cnt * p];
                sgemm(false, false, g.o, cnt * p, ck, 1.0, weight, cols, 0.0, tmp)?;
                // [O, cnt*P] -> [cnt, O, P]
                out_g
                    .par_chunks_mut(oimg)
                    .enumerate()
                    .for_each(|(b, out_n)| {
                        for (o, dst) in out_n.chunks_mut(p).enumerate() {
                            copy_short(dst, &tmp[o * cnt * p + b * p..][..p]);
                        }
                        add_bias(out_n, bias, p);
                    });
            }
            Ok(())
        }
    }
}

/// The forward of `PerItem` / `Grouped { items }`: groups of `items` images spread over the
/// rayon threads, each group's columns side by side, `mm(cols, columns, out)` computing
/// `out [O, columns] = W x cols [C*kh*kw, columns]` on the calling thread.
pub(super) fn grouped_forward(
    x: &[f32],
    bias: Option<&[f32]>,
    g: &Conv2dGeometry,
    out: &mut [f32],
    items: usize,
    mm: impl Fn(&[f32], usize, &mut [f32]) -> Result<()> + Sync,
) -> Result<()> {
    let (ck, p, img, oimg) = (g.patch(), g.pixels(), g.image(), g.o * g.pixels());
    let items = items.clamp(1, g.n);
    // One pointwise image is its own column matrix.
    let direct = items == 1 && g.is_pointwise();
    out.par_chunks_mut(items * oimg)
        .zip(x.par_chunks(items * img.max(1)))
        .try_for_each_init(
            || {
                (
                    scratch::take(if direct { 0 } else { ck * items * p }),
                    scratch::take(if items == 1 { 0 } else { g.o * items * p }),
                )
            },
            |(cols, tmp), (out_g, x_g)| {
                let cnt = out_g.len() / oimg;
                let cols: &[f32] = if direct {
                    x_g
                } else {
                    im2col_cpu(x_g, g, cnt, cols, false);
                    &cols[..ck * cnt * p]
                };
                if cnt == 1 {
                    mm(cols, p, out_g)?;
                    add_bias(out_g, bias, p);
                    return Ok(());
                }
                let tmp = &mut tmp[..g.o * cnt * p];
                mm(cols, cnt * p, tmp)?;
                // [O, cnt*P] -> [cnt, O, P]
                for (b, out_n) in out_g.chunks_mut(oimg).enumerate() {
                    for (o, dst) in out_n.chunks_mut(p).enumerate() {
                        copy_short(dst, &tmp[o * cnt * p + b * p..][..p]);
                    }
                    add_bias(out_n, bias, p);
                }
                Ok(())
            },
        )
}

/// Whether the forward of `PerItem` / `Grouped` (and with it the input gradient of a stride-1
/// convolution, run as a forward) reads the input's stride phases directly in
/// `direct::forward` instead of an im2col product, where the CPU has AVX-512F: a `phase_rows`
/// convolution larger than 1x1 with a multiple of 8 filters, up to `DIRECT_FWD_MAX_FILTERS`.
/// A rule on the shape alone, from per-shape timings of ResNet-18's convolutions (one
/// thread): 1.1-1.6x faster with 8-32 filters (width 1/8, forward and stride-1 input
/// gradient), 1.1-1.2x for 64 -> 64 channels at 28x28, even at 4x4; with 128-512 filters (full
/// width) no faster than the im2col product, which keeps them.
fn direct_forward_fits(g: &Conv2dGeometry) -> bool {
    cfg!(target_arch = "x86_64")
        && avx512_active()
        && phase_rows(g)
        && !g.is_pointwise()
        && g.o.is_multiple_of(DIRECT_DW_FILTERS)
        && g.o <= DIRECT_FWD_MAX_FILTERS
}

/// Most filters `direct_forward_fits` takes.
const DIRECT_FWD_MAX_FILTERS: usize = 64;

/// Images per group of `direct_forward`: from the schedule's `items` (when above 1: single
/// images, of 256 pixels or more, write their output in place) up to four times as many, the
/// count whose pixels fill the kernel's blocks of 48 (3 vectors of 16) best; the least
/// filled block computes lanes that are thrown away (14% of them for six 7x7 images, 4% for
/// sixteen). Each output is one sum over the patch in a fixed order whatever the grouping,
/// so the choice changes the speed only.
fn direct_forward_items(g: &Conv2dGeometry, items: usize) -> usize {
    if items <= 1 {
        return 1;
    }
    let block = 48;
    let hi = (4 * items).min(g.n).max(items);
    (items..=hi)
        .min_by_key(|&m| {
            let nq = m * g.pixels();
            // Wasted lanes per 1,000 computed.
            let slots = nq.div_ceil(16).div_ceil(3) * block;
            (slots - nq) * 1000 / slots.max(1)
        })
        .unwrap_or(items)
}

/// The forward of `PerItem` / `Grouped { items }` by `direct::forward`: groups of
/// `direct_forward_items` images spread over the rayon threads, each group's phase planes
/// built once and read by the kernel for every block of filters.
fn direct_forward(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    g: &Conv2dGeometry,
    out: &mut [f32],
    items: usize,
) {
    let (p, img, oimg) = (g.pixels(), g.image(), g.o * g.pixels());
    let items = direct_forward_items(g, items.clamp(1, g.n));
    out.par_chunks_mut(items * oimg)
        .zip(x.par_chunks(items * img.max(1)))
        .for_each_init(
            || {
                let mut inside = Vec::new();
                inside_masks(g, &mut inside);
                (
                    scratch::take(g.c * g.stride * g.stride * phase_plane(g, items)),
                    scratch::take(if items == 1 { 0 } else { oimg * items }),
                    inside,
                    (Vec::new(), 0),
                )
            },
            |(planes, tmp, inside, (lanes, lanes_for)), (out_g, x_g)| {
                let cnt = out_g.len() / oimg;
                let plane = phase_images(x_g, g, cnt, planes);
                if *lanes_for != cnt {
                    lane_masks(inside, g, cnt * p, lanes);
                    *lanes_for = cnt;
                }
                let dst: &mut [f32] = if cnt == 1 {
                    out_g
                } else {
                    &mut tmp[..cnt * oimg]
                };
                direct_kernel(
                    Direct::Forward(weight),
                    planes,
                    plane,
                    g,
                    cnt * p,
                    lanes,
                    dst,
                );
                if cnt == 1 {
                    add_bias(out_g, bias, p);
                    return;
                }
                // [O, cnt*P] -> [cnt, O, P]
                for (b, out_n) in out_g.chunks_mut(oimg).enumerate() {
                    for (o, d) in out_n.chunks_mut(p).enumerate() {
                        copy_short(d, &tmp[o * cnt * p + b * p..][..p]);
                    }
                    add_bias(out_n, bias, p);
                }
            },
        );
}

/// Gradients of `conv2d`: input `[N, C, H, W]`, weight `[O, C, kh, kw]`, bias `[O]`, each
/// computed only when asked for.
#[derive(Debug, Default)]
pub struct Conv2dGrads {
    pub x: Option<Vec<f32>>,
    pub weight: Option<Vec<f32>>,
    pub bias: Option<Vec<f32>>,
}

/// Backward of `conv2d_forward_cpu` given `grad = dL/dout [N, O, OH, OW]`; `need` says which
/// of (input, weight, bias) to compute.
pub fn conv2d_backward_cpu(
    x: &[f32],
    weight: &[f32],
    grad: &[f32],
    g: &Conv2dGeometry,
    need: [bool; 3],
) -> Result<Conv2dGrads> {
    conv2d_backward_cpu_with(x, weight, grad, g, need, ConvSchedule::auto(g))
}

/// `conv2d_backward_cpu` with an explicit schedule (benchmarks, tests).
pub fn conv2d_backward_cpu_with(
    x: &[f32],
    weight: &[f32],
    grad: &[f32],
    g: &Conv2dGeometry,
    need: [bool; 3],
    schedule: ConvSchedule,
) -> Result<Conv2dGrads> {
    backward_cpu(x, weight, grad, g, need, schedule, true)
}

/// `conv2d_backward_cpu_with` lowering every gradient to products on the column matrix, the
/// input gradient included (`W^T x dY` scattered back by col2im): the oracle the other input
/// gradient path is checked against.
pub fn conv2d_backward_cpu_lowered(
    x: &[f32],
    weight: &[f32],
    grad: &[f32],
    g: &Conv2dGeometry,
    need: [bool; 3],
    schedule: ConvSchedule,
) -> Result<Conv2dGrads> {
    backward_cpu(x, weight, grad, g, need, schedule, false)
}

/// The geometry of the input gradient of a stride-1 convolution run as a forward one: `dx` is
/// the convolution of `dy [N, O, OH, OW]` with the weight flipped in space and its channel
/// axes swapped (`[C, O, kh, kw]`, [`flipped_weight`]) at padding `k - 1 - p`. As a forward it
/// is one product per group of images with depth `O*kh*kw` and a gather (im2col) instead of
/// products of depth `O` and a scatter-add (col2im): the products of few-channel layers are
/// as deep as the forward's, and the scatter goes. `None` where that does not hold (strided,
/// non-square kernels, padding of a kernel's size or more, 1x1 pointwise: already one product).
pub fn transposed_geometry(g: &Conv2dGeometry) -> Option<Conv2dGeometry> {
    if g.stride != 1 || g.kh != g.kw || g.padding >= g.kh || g.is_pointwise() {
        return None;
    }
    let opts = super::Conv2dOptions {
        stride: 1,
        padding: g.kh - 1 - g.padding,
    };
    let t = Conv2dGeometry::new(&[g.n, g.o, g.oh, g.ow], &[g.c, g.o, g.kh, g.kw], opts).ok()?;
    (t.oh == g.h && t.ow == g.w).then_some(t)
}

/// `w'[c, o, i, j] = w[o, c, kh-1-i, kw-1-j]`: the weight of [`transposed_geometry`].
pub fn flipped_weight(weight: &[f32], g: &Conv2dGeometry) -> Vec<f32> {
    let k = g.kh * g.kw;
    let mut out = scratch::zeroed(g.c * g.o * k);
    if k == 0 || g.o == 0 {
        return out;
    }
    // One input channel per task: the largest weights (512 x 512 x 3 x 3) are copied on all
    // threads, not on the one that called for the backward while the others wait.
    out.par_chunks_mut(g.o * k)
        .enumerate()
        .for_each(|(c, dst)| {
            for (o, dst) in dst.chunks_mut(k).enumerate() {
                let src = &weight[(o * g.c + c) * k..][..k];
                for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                    *d = *s;
                }
            }
        });
    out
}

#[allow(clippy::too_many_arguments)]
fn backward_cpu(
    x: &[f32],
    weight: &[f32],
    grad: &[f32],
    g: &Conv2dGeometry,
    need: [bool; 3],
    schedule: ConvSchedule,
    dx_by_forward: bool,
) -> Result<Conv2dGrads> {
    check_buffers(g, x.len(), weight.len(), grad.len(), "output gradient")?;
    let (ck, p, img, oimg) = (g.patch(), g.pixels(), g.image(), g.o * g.pixels());
    let [need_x, need_w, need_b] = need;
    let per_group = matches!(
        schedule,
        ConvSchedule::PerItem | ConvSchedule::Grouped { .. }
    );
    if need_w && dx_by_forward && per_group && winograd::fits(g) {
        let dw = winograd::weight_gradient(x, grad, g)?;
        let mut rest = backward_cpu(x, weight, grad, g, [need_x, false, need_b], schedule, true)?;
        rest.weight = Some(dw);
        return Ok(rest);
    }
    let transposed = if need_x && dx_by_forward && g.n > 0 && ck > 0 && oimg > 0 {
        transposed_geometry(g)
    } else {
        None
    };
    if let Some(t) = transposed {
        let mut dx = scratch::zeroed(g.n * img);
        conv2d_forward_cpu_with(
            grad,
            &flipped_weight(weight, g),
            None,
            &t,
            &mut dx,
            schedule,
        )?;
        let mut rest = backward_cpu(x, weight, grad, g, [false, need_w, need_b], schedule, false)?;
        rest.x = Some(dx);
        return Ok(rest);
    }
    let mut dx = need_x.then(|| scratch::zeroed(g.n * img));
    let mut dw = need_w.then(|| scratch::zeroed(g.o * ck));
    let db = need_b.then(|| bias_grad_cpu(grad, g.n, g.o, p));
    if g.n == 0 || oimg == 0 || ck == 0 || !(need_x || need_w) {
        return Ok(Conv2dGrads {
            x: dx,
            weight: dw,
            bias: db,
        });
    }
    let grad = &grad[..g.n * oimg];
    match schedule {
        ConvSchedule::PerItem | ConvSchedule::Grouped { .. } => {
            // Contiguous runs of items, each with its own column buffers and partial dW, so
            // threads never wait on each other until the final sum, taken by whichever
            // thread is free (work stealing). Within a run, one product per group of
            // `items` images. The runs depend on the shape and batch alone, and their
            // partial sums are added in run order: the same gradient on any thread count.
            let (per, items) = backward_runs(g, schedule);
            let direct = items == 1 && g.is_pointwise();
            let dw_direct = need_w && direct_weight_gradient_fits(g);
            let dw_transposed = need_w && !dw_direct && dw_by_columns_in_place(g);
            let run = |t: usize, dx_run: Option<&mut [f32]>| -> Result<Option<Vec<f32>>> {
                let first = t * per;
                let cnt = per.min(g.n - first);
                let cols_len = if direct { 0 } else { ck * items * p };
                let mut cols = scratch::take(if need_w && !dw_direct { cols_len } else { 0 });
                let mut dcols = scratch::take(if need_x { cols_len } else { 0 });
                let mut dyt = scratch::take(if items > 1 { oimg * items } else { 0 });
                let mut dw_part = need_w.then(|| vec![0f32; g.o * ck]);
                let mut dx_run = dx_run;
                if let (Some(dw_part), true) = (dw_part.as_mut(), dw_direct) {
                    direct_weight_gradient_run(x, grad, g, first, cnt, dw_part);
                }
                for (gi, b) in (0..cnt).step_by(items).enumerate() {
                    if !need_x && dw_direct {
                        break;
                    }
                    let c = items.min(cnt - b);
                    let x_g = &x[(first + b) * img..][..c * img];
                    let dy_g = &grad[(first + b) * oimg..][..c * oimg];
                    let dy: &[f32] = if c == 1 {
                        dy_g
                    } else {
                        gather_group(dy_g, c, g.o, p, &mut dyt);
                        &dyt[..c * oimg]
                    };
                    if let (Some(dw_part), false) = (dw_part.as_mut(), dw_direct) {
                        let cols: &[f32] = if direct {
                            x_g
                        } else {
                            im2col_cpu(x_g, g, c, &mut cols, false);
                            &cols[..ck * c * p]
                        };
                        let beta = if gi == 0 { 0.0 } else { 1.0 };
                        if dw_transposed {
                            // dW^T [C*kh*kw, O] = cols x dY^T: the columns read in place.
                            sgemm_serial(
                                false,
                                true,
                                ck,
                                g.o,
                                c * p,
                                1.0,
                                cols,
                                dy,
                                beta,
                                dw_part,
                            )?;
                        } else {
                            sgemm_serial(
                                false,
                                true,
                                g.o,
                                ck,
                                c * p,
                                1.0,
                                dy,
                                cols,
                                beta,
                                dw_part,
                            )?;
                        }
                    }
                    if let Some(dx_run) = dx_run.as_deref_mut() {
                        let dx_g = &mut dx_run[b * img..][..c * img];
                        if direct {
                            sgemm_serial(true, false, ck, p, g.o, 1.0, weight, dy, 0.0, dx_g)?;
                        } else {
                            let dcols = &mut dcols[..ck * c * p];
                            sgemm_serial(true, false, ck, c * p, g.o, 1.0, weight, dy, 0.0, dcols)?;
                            col2im_cpu(dcols, g, c, dx_g, false);
                        }
                    }
                }
                Ok(dw_part)
            };
            // Parts of `dW^T` are summed as they are, in run order, and the sum transposed
            // once: the same bits as transposing each part, without a transpose per run.
            let mut dw_t = scratch::take(if dw_transposed { ck * g.o } else { 0 });
            let dw_sum = if dw_transposed {
                Some(&mut dw_t[..])
            } else {
                dw.as_deref_mut()
            };
            backward_over_runs(dx.as_deref_mut(), dw_sum, per * img, g.n, per, run)?;
            if let (Some(dw), true) = (dw.as_deref_mut(), dw_transposed) {
                transpose_into(&dw_t, ck, g.o, dw);
            }
        }
        ConvSchedule::Batched { items } => {
            let items = items.clamp(1, g.n);
            let mut cols = vec![0f32; if need_w { ck * items * p } else { 0 }];
            let mut dcols = vec![0f32; if need_x { ck * items * p } else { 0 }];
            let mut dyt = vec![0f32; if items > 1 { oimg * items } else { 0 }];
            for (gi, dy_g) in grad.chunks(items * oimg).enumerate() {
                let cnt = dy_g.len() / oimg;
                let first = gi * items;
                // [cnt, O, P] -> [O, cnt*P], the layout of the columns.
                let dy: &[f32] = if cnt == 1 {
                    dy_g
                } else {
                    let dyt = &mut dyt[..oimg * cnt];
                    dyt.par_chunks_mut(cnt * p)
                        .enumerate()
                        .for_each(|(o, row)| {
                            for (b, dst) in row.chunks_mut(p).enumerate() {
                                copy_short(dst, &dy_g[b * oimg + o * p..][..p]);
                            }
                        });
                    dyt
                };
                if let Some(dw) = dw.as_mut() {
                    let x_g = &x[first * img..][..cnt * img];
                    let cols: &[f32] = if g.is_pointwise() && cnt == 1 {
                        x_g
                    } else {
                        im2col_cpu(x_g, g, cnt, &mut cols, true);
                        &cols
                    };
                    let beta = if gi == 0 { 0.0 } else { 1.0 };
                    sgemm(false, true, g.o, ck, cnt * p, 1.0, dy, cols, beta, dw)?;
                }
                if let Some(dx) = dx.as_mut() {
                    let dx_g = &mut dx[first * img..][..cnt * img];
                    if g.is_pointwise() && cnt == 1 {
                        sgemm(true, false, ck, p, g.o, 1.0, weight, dy, 0.0, dx_g)?;
                    } else {
                        let dcols = &mut dcols[..ck * cnt * p];
                        sgemm(true, false, ck, cnt * p, g.o, 1.0, weight, dy, 0.0, dcols)?;
                        col2im_cpu(dcols, g, cnt, dx_g, true);
                    }
                }
            }
        }
    }
    Ok(Conv2dGrads {
        x: dx,
        weight: dw,
        bias: db,
    })
}

/// `(images per run, images per product)` of the backward of `PerItem` / `Grouped`: runs as
/// many as memory for their partial weight gradients allows within `BACKWARD_RUNS`, each a
/// whole number of groups (but the last), from the shape, batch and schedule alone.
pub(super) fn backward_runs(g: &Conv2dGeometry, schedule: ConvSchedule) -> (usize, usize) {
    let (lo, hi) = BACKWARD_RUNS;
    let runs = (PARTIAL_DW_BUDGET / (g.o * g.patch()).max(1)).clamp(lo, hi);
    let items = schedule.group().clamp(1, g.n.max(1));
    let per = g.n.div_ceil(runs.min(g.n).max(1)).div_ceil(items) * items;
    (per.min(g.n).max(1), items)
}

/// `dst = parts[0] + parts[1] + ...`, each element summed in the order of `parts` (blocks of
/// `dst` in parallel): the same bits however the blocks are scheduled.
/// Runs `run(t, dx of run t)` for each run of `per` images (`chunk` floats of `dx` each), over
/// the rayon threads, and sums the runs' partial weight gradients into `dw` in run order, so
/// the result does not depend on the thread count.
pub(super) fn backward_over_runs<F>(
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    chunk: usize,
    n: usize,
    per: usize,
    run: F,
) -> Result<()>
where
    F: Fn(usize, Option<&mut [f32]>) -> Result<Option<Vec<f32>>> + Sync,
{
    let parts: Vec<Option<Vec<f32>>> = match dx {
        Some(dx) => dx
            .par_chunks_mut(chunk)
            .enumerate()
            .map(|(t, d)| run(t, Some(d)))
            .collect::<Result<_>>()?,
        None => (0..n.div_ceil(per))
            .into_par_iter()
            .map(|t| run(t, None))
            .collect::<Result<_>>()?,
    };
    if let Some(dw) = dw {
        let parts: Vec<Vec<f32>> = parts.into_iter().flatten().collect();
        sum_in_order(dw, &parts);
    }
    Ok(())
}

pub(super) fn sum_in_order(dst: &mut [f32], parts: &[Vec<f32>]) {
    const BLOCK: usize = 4096;
    dst.par_chunks_mut(BLOCK).enumerate().for_each(|(b, d)| {
        d.fill(0.0);
        for part in parts {
            let src = &part[b * BLOCK..][..d.len()];
            d.iter_mut().zip(src).for_each(|(d, s)| *d += s);
        }
    });
}

/// Whether the weight gradient of `PerItem` / `Grouped` runs as `dW^T = cols x dY^T` (the
/// column matrix read in place as the product's A, `dY` transposed into the packed B) rather
/// than `dW = dY x cols^T` (the whole column matrix transposed into packed B panels, `kh*kw`
/// times the size of `dY` for a 3x3 convolution). The product's columns are then the `O`
/// filters. A rule from per-shape timings of ResNet-18's convolutions at widths 1/8 and 1
/// (docs/results/2026-12-07-cpu-resnet18-intel.md): it wins 10-25% for kernels larger than 1x1 with a patch of 64 or
/// more and 16 to 256 filters; with fewer filters the product's 32-column tiles are mostly
/// empty, with more the packing it saves is amortised over enough rows of `dY` and streaming
/// the tall column matrix as A loses.
fn dw_by_columns_in_place(g: &Conv2dGeometry) -> bool {
    g.kh * g.kw > 1 && g.patch() >= 64 && (16..=256).contains(&g.o)
}

/// Whether the weight gradient of `PerItem` / `Grouped` runs in `direct::weight_gradient`
/// (from the input's stride phases, no column matrix) rather than as an im2col product, where
/// the CPU has AVX-512F: a `phase_rows` convolution larger than 1x1 with a multiple of 8
/// filters, few of them (the im2col product's cost per multiply-add beyond the kernel's
/// grows as the filters get fewer, the direct kernel's does not). A rule on the shape alone,
/// from per-shape timings of ResNet-18's convolutions at width 1/8 (one thread): 2.2-2.5x
/// faster with 8 filters, 1.2-1.5x for the stride-2 8 -> 16 and 16 -> 32 channels, about even
/// for 16 -> 16, 10-25% slower from 32 -> 32 channels on.
fn direct_weight_gradient_fits(g: &Conv2dGeometry) -> bool {
    cfg!(target_arch = "x86_64")
        && avx512_active()
        && phase_rows(g)
        && !g.is_pointwise()
        && g.o.is_multiple_of(DIRECT_DW_FILTERS)
        && g.o <= DIRECT_DW_MAX_FILTERS
        && g.o * g.c <= DIRECT_DW_MAX_FILTERS * 16
}

/// Pixels the direct weight gradient sums over per call at least (whole images of a run):
/// its 24 sums are added across their lanes once per call, a cost to spread over many pixels.
const DIRECT_DW_PIXELS: usize = 512;

/// `dw = dY x cols^T` over the images `first..first + cnt` by `direct::weight_gradient`, in
/// chunks of whole images of at least `DIRECT_DW_PIXELS` pixels (fixed by the shape).
fn direct_weight_gradient_run(
    x: &[f32],
    grad: &[f32],
    g: &Conv2dGeometry,
    first: usize,
    cnt: usize,
    dw: &mut [f32],
) {
    let (p, img, oimg) = (g.pixels(), g.image(), g.o * g.pixels());
    let chunk = DIRECT_DW_PIXELS.div_ceil(p.max(1)).clamp(1, cnt.max(1));
    let mut planes = scratch::take(g.c * g.stride * g.stride * phase_plane(g, chunk));
    let mut dyt = scratch::take(if chunk > 1 { oimg * chunk } else { 0 });
    let (mut inside, mut lanes, mut lanes_for) = (Vec::new(), Vec::new(), 0);
    inside_masks(g, &mut inside);
    for (ci, b) in (0..cnt).step_by(chunk).enumerate() {
        let c = chunk.min(cnt - b);
        let x_c = &x[(first + b) * img..][..c * img];
        let dy_c = &grad[(first + b) * oimg..][..c * oimg];
        let dy: &[f32] = if c == 1 {
            dy_c
        } else {
            gather_group(dy_c, c, g.o, p, &mut dyt);
            &dyt[..c * oimg]
        };
        let plane = phase_images(x_c, g, c, &mut planes);
        if lanes_for != c {
            lane_masks(&inside, g, c * p, &mut lanes);
            lanes_for = c;
        }
        let what = Direct::WeightGradient {
            dy,
            accumulate: ci > 0,
        };
        direct_kernel(what, &planes, plane, g, c * p, &lanes, dw);
    }
}

/// Per kernel offset `k` and 16-pixel vector `v` of a group of `items` images (`nq` pixels
/// in all), the lanes inside the image and before `nq`: bit `l` of `out[k * nv + v]` is set
/// where `masks` (`inside_masks`, per offset and pixel of one image) is set at pixel
/// `(16 v + l) mod pixels`. Returns `nv`.
fn lane_masks(masks: &[u32], g: &Conv2dGeometry, nq: usize, out: &mut Vec<u16>) -> usize {
    let (pix, k) = (g.pixels(), g.kh * g.kw);
    let nv = nq.div_ceil(16);
    out.clear();
    out.resize(k * nv, 0);
    for (kk, words) in out.chunks_exact_mut(nv).enumerate() {
        let mask = &masks[kk * pix..][..pix];
        for q0 in (0..nq).step_by(pix) {
            for (p, &m) in mask.iter().enumerate().take(nq - q0) {
                let q = q0 + p;
                words[q / 16] |= u16::from(m != 0) << (q % 16);
            }
        }
    }
    nv
}

/// Which kernel of `conv_direct.rs` `direct_kernel` runs, with its own operands.
enum Direct<'a> {
    /// `out [O, nq] = W x cols`, from the weight `[O, C*kh*kw]`.
    Forward(&'a [f32]),
    /// `out [O, C*kh*kw] (+)= dY x cols^T`, from the output gradient `[O, nq]`.
    WeightGradient { dy: &'a [f32], accumulate: bool },
}

/// Runs a kernel of `conv_direct.rs` over the phase planes of a group of `nq` output pixels.
/// Only called where `direct_forward_fits` / `direct_weight_gradient_fits` hold, which
/// requires x86-64 with AVX-512F.
fn direct_kernel(
    what: Direct,
    planes: &[f32],
    plane: usize,
    g: &Conv2dGeometry,
    nq: usize,
    lanes: &[u16],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is present (the rules above ask `avx512_active`); the kernels check
    // the lengths.
    unsafe {
        match what {
            Direct::Forward(w) => direct::forward(planes, plane, g, nq, w, lanes, out),
            Direct::WeightGradient { dy, accumulate } => {
                direct::weight_gradient(planes, plane, g, nq, dy, lanes, accumulate, out)
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (what, planes, plane, g, nq, lanes, out);
        unreachable!("the direct convolution kernels run on x86-64 only");
    }
}

/// Filters per block of `direct::weight_gradient` (a multiple of them is required).
const DIRECT_DW_FILTERS: usize = 8;

/// Most filters `direct_weight_gradient_fits` takes.
const DIRECT_DW_MAX_FILTERS: usize = 32;

/// `dst [cols, rows]` = `src [rows, cols]` transposed, in blocks of 16 `dst` rows over the
/// rayon threads (each `src` row then gives whole cache lines to one block).
fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const BLOCK: usize = 16;
    let (src, dst) = (&src[..rows * cols], &mut dst[..rows * cols]);
    if rows == 0 {
        return;
    }
    dst.par_chunks_mut(BLOCK * rows)
        .enumerate()
        .for_each(|(b, block)| {
            let c0 = b * BLOCK;
            for (r, row) in src.chunks_exact(cols).enumerate() {
                for (j, &v) in row[c0..].iter().take(block.len() / rows).enumerate() {
                    block[j * rows + r] = v;
                }
            }
        });
}

/// `dbias[o] = sum over n and pixels of grad[n, o, :]`.
pub fn bias_grad_cpu(grad: &[f32], n: usize, o: usize, pixels: usize) -> Vec<f32> {
    (0..o)
        .into_par_iter()
        .map(|oc| {
            (0..n)
                .map(|b| grad[(b * o + oc) * pixels..][..pixels].iter().sum::<f32>())
                .sum()
        })
        .collect()
}

#[cfg(target_arch = "x86_64")]
#[path = "conv_direct.rs"]
mod direct;

#[path = "conv_winograd.rs"]
mod winograd;

#[cfg(test)]
#[path = "conv_paths_tests.rs"]
mod paths_tests;
