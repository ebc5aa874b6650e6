//! 2-D convolution (NCHW, groups 1, dilation 1): the op that dominates a ResNet step on the CPU.
//!
//! It is lowered to matrix products (im2col): the patches of one image form a column matrix
//! `cols [C*kh*kw, OH*OW]`, and `out = W [O, C*kh*kw] x cols`. A 1x1 stride-1 unpadded
//! convolution needs no lowering: the image itself is the column matrix. Backward reuses the
//! same lowering: `dW += dY_n x cols_n^T`, `dcols = W^T x dY_n` scattered back by col2im, and
//! `dbias` sums `dY` over the batch and pixels. Columns are recomputed in backward rather than
//! kept from forward: they are `kh*kw` times the input, too much memory to hold per layer.
//! With bf16 weights (a frozen teacher's) the forward runs in bf16 products
//! (`ops::gemm::gemm_bf16`, f32 accumulation) where the CPU has them.
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

use rayon::prelude::*;

use half::bf16;

use crate::ops::gemm::{
    bf16_products_active, gemm_bf16, sgemm, sgemm_serial, Half, SERIAL_GEMM_AVAILABLE,
};
use crate::{DType, Device, Error, Result, Tape, Tensor, Var};

/// Stride and zero padding of `conv2d`, the same on both spatial axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dOptions {
    pub stride: usize,
    pub padding: usize,
}

impl Default for Conv2dOptions {
    fn default() -> Self {
        Conv2dOptions {
            stride: 1,
            padding: 0,
        }
    }
}

/// Every size of one convolution, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dGeometry {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Conv2dGeometry {
    /// From an input shape `[N, C, H, W]` and a weight shape `[O, C, kh, kw]`.
    pub fn new(x: &[usize], weight: &[usize], opts: Conv2dOptions) -> Result<Self> {
        if x.len() != 4 || weight.len() != 4 {
            return Err(Error::shape(
                "conv2d",
                format!("input {x:?} must be [N, C, H, W] and weight {weight:?} [O, C, kh, kw]"),
            ));
        }
        if x[1] != weight[1] {
            return Err(Error::shape(
                "conv2d",
                format!(
                    "input {x:?} has {} channels, weight {weight:?} expects {}",
                    x[1], weight[1]
                ),
            ));
        }
        if opts.stride == 0 {
            return Err(Error::invalid("conv2d", "stride must be at least 1, got 0"));
        }
        if x[2] == 0 || x[3] == 0 {
            return Err(Error::shape(
                "conv2d",
                format!("input {x:?} has an empty image"),
            ));
        }
        let (kh, kw) = (weight[2], weight[3]);
        if kh == 0 || kw == 0 {
            return Err(Error::shape(
                "conv2d",
                format!("weight {weight:?} has an empty kernel"),
            ));
        }
        let (hp, wp) = (x[2] + 2 * opts.padding, x[3] + 2 * opts.padding);
        if hp < kh || wp < kw {
            return Err(Error::shape(
                "conv2d",
                format!(
                    "input {x:?} with padding {} is smaller than the kernel of weight {weight:?}",
                    opts.padding
                ),
            ));
        }
        Ok(Conv2dGeometry {
            n: x[0],
            c: x[1],
            h: x[2],
            w: x[3],
            o: weight[0],
            kh,
            kw,
            stride: opts.stride,
            padding: opts.padding,
            oh: (hp - kh) / opts.stride + 1,
            ow: (wp - kw) / opts.stride + 1,
        })
    }

    /// Rows of the column matrix: `C * kh * kw`.
    pub fn patch(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Output pixels per image: `OH * OW`.
    pub fn pixels(&self) -> usize {
        self.oh * self.ow
    }

    /// Elements of one input image `C * H * W`.
    pub fn image(&self) -> usize {
        self.c * self.h * self.w
    }

    /// A 1x1, stride-1, unpadded convolution: a plain product with the image.
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// Multiply-adds times two of the forward pass.
    pub fn forward_flops(&self) -> u64 {
        2 * (self.n * self.o * self.patch() * self.pixels()) as u64
    }
}

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

impl ConvSchedule {
    pub fn auto(g: &Conv2dGeometry) -> ConvSchedule {
        let threads = rayon::current_num_threads().max(1);
        // Per-thread products need an sgemm that stays on its thread (not OpenBLAS).
        if SERIAL_GEMM_AVAILABLE && g.n >= threads {
            // Groups never larger than one thread's share of the batch.
            let items = GROUP_PIXELS
                .div_ceil(g.pixels().max(1))
                .clamp(1, g.n.div_ceil(threads));
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
    fn group(self) -> usize {
        match self {
            ConvSchedule::Grouped { items } => items.max(1),
            _ => 1,
        }
    }
}

/// `[cnt, O, P]` -> `[O, cnt * P]`: a group's output gradient in the layout of its columns.
fn gather_group(src: &[f32], cnt: usize, o: usize, p: usize, dst: &mut [f32]) {
    for (oc, row) in dst[..o * cnt * p].chunks_mut(cnt * p).enumerate() {
        for (b, d) in row.chunks_mut(p).enumerate() {
            d.copy_from_slice(&src[(b * o + oc) * p..][..p]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CPU kernels
// ---------------------------------------------------------------------------------------------

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
        for (oh, dst) in dst_img.chunks_mut(g.ow).enumerate() {
            if oh < ih_lo || oh >= ih_hi {
                dst.fill(0.0);
                continue;
            }
            let src = &plane[(oh * g.stride + i - g.padding) * g.w..][..g.w];
            dst[..lo].fill(0.0);
            dst[hi..].fill(0.0);
            if lo < hi {
                let first = lo * g.stride + j - g.padding;
                if g.stride == 1 {
                    dst[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                } else {
                    for (d, s) in dst[lo..hi]
                        .iter_mut()
                        .zip(src[first..].iter().step_by(g.stride))
                    {
                        *d = *s;
                    }
                }
            }
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
                            dst.copy_from_slice(&tmp[o * cnt * p + b * p..][..p]);
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
fn grouped_forward(
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
                    vec![0f32; if direct { 0 } else { ck * items * p }],
                    vec![0f32; if items == 1 { 0 } else { g.o * items * p }],
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
                        dst.copy_from_slice(&tmp[o * cnt * p + b * p..][..p]);
                    }
                    add_bias(out_n, bias, p);
                }
                Ok(())
            },
        )
}

/// `conv2d_forward_cpu` for bf16 weights, in bf16 products with f32 accumulation (the input
/// rounded to bf16, see `gemm_bf16`): how `conv2d` runs a bf16 teacher where
/// `bf16_products_active()`. Groups images as `ConvSchedule::auto` would.
pub fn conv2d_forward_bf16_cpu(
    x: &[f32],
    weight: &[bf16],
    bias: Option<&[f32]>,
    g: &Conv2dGeometry,
    out: &mut [f32],
) -> Result<()> {
    if x.len() < g.n * g.image()
        || weight.len() < g.o * g.patch()
        || out.len() < g.n * g.o * g.pixels()
    {
        return Err(Error::shape(
            "conv2d",
            format!(
                "buffers of {}, {}, {} elements for input, weight, output; {g:?} needs {}, {}, {}",
                x.len(),
                weight.len(),
                out.len(),
                g.n * g.image(),
                g.o * g.patch(),
                g.n * g.o * g.pixels()
            ),
        ));
    }
    if let Some(b) = bias {
        if b.len() < g.o {
            return Err(Error::shape(
                "conv2d",
                format!("bias of {} elements for {} output channels", b.len(), g.o),
            ));
        }
    }
    let (ck, oimg) = (g.patch(), g.o * g.pixels());
    if g.n == 0 || oimg == 0 {
        return Ok(());
    }
    let out = &mut out[..g.n * oimg];
    if ck == 0 {
        out.chunks_mut(oimg).for_each(|o| {
            o.fill(0.0);
            add_bias(o, bias, g.pixels());
        });
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    let items = ConvSchedule::auto(g).group();
    // Fewer images than threads: spread each product over the threads instead.
    let parallel = g.n < threads;
    grouped_forward(x, bias, g, out, items, |cols, columns, out| {
        gemm_bf16(
            g.o,
            columns,
            ck,
            Half::Bf16(weight),
            Half::F32(cols),
            false,
            out,
            parallel,
        )
    })
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
    check_buffers(g, x.len(), weight.len(), grad.len(), "output gradient")?;
    let (ck, p, img, oimg) = (g.patch(), g.pixels(), g.image(), g.o * g.pixels());
    let [need_x, need_w, need_b] = need;
    let mut dx = need_x.then(|| vec![0f32; g.n * img]);
    let mut dw = need_w.then(|| vec![0f32; g.o * ck]);
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
            // threads never wait on each other until the final sum. A few runs per thread
            // (as memory for the partial sums allows) let a thread that other work slowed
            // down hand runs to the others. Within a run, one product per group of `items`
            // images.
            let threads = rayon::current_num_threads().max(1);
            let runs = (PARTIAL_DW_BUDGET / (g.o * ck)).clamp(threads, 4 * threads);
            let per = g.n.div_ceil(runs.min(g.n));
            let items = schedule.group().clamp(1, per);
            let direct = items == 1 && g.is_pointwise();
            let run = |t: usize, dx_run: Option<&mut [f32]>| -> Result<Option<Vec<f32>>> {
                let first = t * per;
                let cnt = per.min(g.n - first);
                let cols_len = if direct { 0 } else { ck * items * p };
                let mut cols = vec![0f32; if need_w { cols_len } else { 0 }];
                let mut dcols = vec![0f32; if need_x { cols_len } else { 0 }];
                let mut dyt = vec![0f32; if items > 1 { oimg * items } else { 0 }];
                let mut dw_part = need_w.then(|| vec![0f32; g.o * ck]);
                let mut dx_run = dx_run;
                for (gi, b) in (0..cnt).step_by(items).enumerate() {
                    let c = items.min(cnt - b);
                    let x_g = &x[(first + b) * img..][..c * img];
                    let dy_g = &grad[(first + b) * oimg..][..c * oimg];
                    let dy: &[f32] = if c == 1 {
                        dy_g
                    } else {
                        gather_group(dy_g, c, g.o, p, &mut dyt);
                        &dyt[..c * oimg]
                    };
                    if let Some(dw_part) = dw_part.as_mut() {
                        let cols: &[f32] = if direct {
                            x_g
                        } else {
                            im2col_cpu(x_g, g, c, &mut cols, false);
                            &cols[..ck * c * p]
                        };
                        let beta = if gi == 0 { 0.0 } else { 1.0 };
                        sgemm_serial(false, true, g.o, ck, c * p, 1.0, dy, cols, beta, dw_part)?;
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
            let parts: Vec<Option<Vec<f32>>> = match dx.as_mut() {
                Some(dx) => dx
                    .par_chunks_mut(per * img)
                    .enumerate()
                    .map(|(t, d)| run(t, Some(d)))
                    .collect::<Result<_>>()?,
                None => (0..g.n.div_ceil(per))
                    .into_par_iter()
                    .map(|t| run(t, None))
                    .collect::<Result<_>>()?,
            };
            if let Some(dw) = dw.as_mut() {
                for part in parts.into_iter().flatten() {
                    dw.par_iter_mut()
                        .zip(part.par_iter())
                        .for_each(|(d, s)| *d += s);
                }
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
                                dst.copy_from_slice(&dy_g[b * oimg + o * p..][..p]);
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

// ---------------------------------------------------------------------------------------------
// Tape op
// ---------------------------------------------------------------------------------------------

/// `conv2d(x [N, C, H, W], weight [O, C, kh, kw], bias [O]) -> [N, O, OH, OW]` with
/// `OH = (H + 2 padding - kh) / stride + 1` (PyTorch's `F.conv2d`, groups 1, dilation 1).
pub fn conv2d(
    tape: &Tape,
    x: &Var,
    weight: &Var,
    bias: Option<&Var>,
    opts: Conv2dOptions,
) -> Result<Var> {
    x.tensor().expect_float("conv2d")?;
    weight.tensor().expect_float("conv2d")?;
    let g = Conv2dGeometry::new(x.shape(), weight.shape(), opts)?;
    if let Some(b) = bias {
        b.tensor().expect_float("conv2d")?;
        if b.shape() != [g.o] {
            return Err(Error::shape(
                "conv2d",
                format!(
                    "bias {:?} does not fit weight {:?} (expected [{}])",
                    b.shape(),
                    weight.shape(),
                    g.o
                ),
            ));
        }
    }
    let mut on: Vec<&Tensor> = vec![x.tensor(), weight.tensor()];
    on.extend(bias.map(|b| b.tensor()));
    match crate::cuda::common_device("conv2d", &on)? {
        Device::Cpu => {}
        d => return crate::on_cuda!(d, crate::cuda::conv::conv2d(tape, x, weight, bias, g)),
    }
    let mut out = vec![0f32; g.n * g.o * g.pixels()];
    {
        let bias_read = bias.map(|b| b.tensor().read_f32()).transpose()?;
        if weight.tensor().dtype() == DType::BF16 && bf16_products_active() {
            // A frozen bf16 teacher: bf16 products, f32 accumulation.
            conv2d_forward_bf16_cpu(
                &x.tensor().read_f32()?,
                &weight.tensor().read_bf16()?,
                bias_read.as_deref(),
                &g,
                &mut out,
            )?;
        } else {
            conv2d_forward_cpu(
                &x.tensor().read_f32()?,
                &weight.tensor().read_f32()?,
                bias_read.as_deref(),
                &g,
                &mut out,
            )?;
        }
    }
    let out = Tensor::f32(out, &[g.n, g.o, g.oh, g.ow])?;
    let (tx, tw) = (x.tensor().clone(), weight.tensor().clone());
    let backward = Box::new(move |grad: &Tensor, needs: &[bool]| {
        let need_b = needs.get(2).copied().unwrap_or(false);
        let grads = conv2d_backward_cpu(
            &tx.read_f32()?,
            &tw.read_f32()?,
            &grad.read_f32()?,
            &g,
            [needs[0], needs[1], need_b],
        )?;
        let mut out = vec![
            grads.x.map(|d| Tensor::f32(d, tx.shape())).transpose()?,
            grads
                .weight
                .map(|d| Tensor::f32(d, tw.shape()))
                .transpose()?,
        ];
        if needs.len() == 3 {
            out.push(grads.bias.map(|d| Tensor::f32(d, &[g.o])).transpose()?);
        }
        Ok(out)
    });
    Ok(match bias {
        Some(b) => tape.record(out, &[x, weight, b], backward),
        None => tape.record(out, &[x, weight], backward),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::GradCheck;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        Tensor::randn(shape, 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap()
    }

    fn opts(stride: usize, padding: usize) -> Conv2dOptions {
        Conv2dOptions { stride, padding }
    }

    /// Direct seven-loop convolution in f64.
    fn naive_forward(x: &[f32], w: &[f32], b: Option<&[f32]>, g: &Conv2dGeometry) -> Vec<f32> {
        let mut out = vec![0f32; g.n * g.o * g.pixels()];
        for n in 0..g.n {
            for o in 0..g.o {
                for oh in 0..g.oh {
                    for ow in 0..g.ow {
                        let mut s = b.map_or(0.0, |b| b[o] as f64);
                        for c in 0..g.c {
                            for i in 0..g.kh {
                                for j in 0..g.kw {
                                    let ih = (oh * g.stride + i) as isize - g.padding as isize;
                                    let iw = (ow * g.stride + j) as isize - g.padding as isize;
                                    if ih < 0 || iw < 0 || ih >= g.h as isize || iw >= g.w as isize
                                    {
                                        continue;
                                    }
                                    let xv =
                                        x[((n * g.c + c) * g.h + ih as usize) * g.w + iw as usize];
                                    let wv = w[((o * g.c + c) * g.kh + i) * g.kw + j];
                                    s += xv as f64 * wv as f64;
                                }
                            }
                        }
                        out[((n * g.o + o) * g.oh + oh) * g.ow + ow] = s as f32;
                    }
                }
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

    /// (x shape, weight shape, stride, padding): 3x3 same, strided, padded strided, 1x1
    /// pointwise, 1x1 strided (ResNet downsample), 7x7 stride 2 (ResNet stem), non-square.
    const CASES: &[([usize; 4], [usize; 4], usize, usize)] = &[
        ([3, 4, 6, 6], [5, 4, 3, 3], 1, 1),
        ([3, 4, 7, 7], [5, 4, 3, 3], 2, 0),
        ([2, 3, 9, 8], [4, 3, 3, 3], 2, 1),
        ([3, 6, 5, 5], [4, 6, 1, 1], 1, 0),
        ([2, 6, 7, 7], [4, 6, 1, 1], 2, 0),
        ([2, 3, 15, 15], [4, 3, 7, 7], 2, 3),
        ([1, 2, 5, 7], [3, 2, 2, 3], 1, 2),
        // Small images in a larger batch: groups of several images, a partial last group.
        ([7, 3, 4, 4], [5, 3, 3, 3], 1, 1),
        ([9, 4, 3, 3], [6, 4, 1, 1], 1, 0),
    ];

    #[test]
    fn auto_groups_small_images_only() {
        let threads = rayon::current_num_threads();
        let g =
            |hw: usize| Conv2dGeometry::new(&[128, 8, hw, hw], &[8, 8, 3, 3], opts(1, 1)).unwrap();
        if SERIAL_GEMM_AVAILABLE && threads <= 128 {
            assert_eq!(ConvSchedule::auto(&g(28)), ConvSchedule::PerItem);
            let want = 16.min(128usize.div_ceil(threads));
            let want = if want == 1 {
                ConvSchedule::PerItem
            } else {
                ConvSchedule::Grouped { items: want }
            };
            assert_eq!(ConvSchedule::auto(&g(4)), want);
        }
    }

    #[test]
    fn forward_matches_naive_for_every_schedule() {
        for (k, &(xs, ws, s, p)) in CASES.iter().enumerate() {
            let (x, w, b) = (
                randn(&xs, 1 + k as u64),
                randn(&ws, 20),
                randn(&[ws[0]], 30),
            );
            let g = Conv2dGeometry::new(&xs, &ws, opts(s, p)).unwrap();
            let (xv, wv, bv) = (
                x.to_vec_f32().unwrap(),
                w.to_vec_f32().unwrap(),
                b.to_vec_f32().unwrap(),
            );
            let want = naive_forward(&xv, &wv, Some(&bv), &g);
            for sched in [
                ConvSchedule::PerItem,
                ConvSchedule::Grouped { items: 2 },
                ConvSchedule::Grouped { items: 3 },
                ConvSchedule::Batched { items: 1 },
                ConvSchedule::Batched { items: 2 },
            ] {
                let mut out = vec![f32::NAN; want.len()];
                conv2d_forward_cpu_with(&xv, &wv, Some(&bv), &g, &mut out, sched).unwrap();
                assert_close(&out, &want, 1e-4);
            }
            // Through the tape, without bias.
            let tape = Tape::inference();
            let y = conv2d(
                &tape,
                &tape.constant(x.clone()),
                &tape.constant(w.clone()),
                None,
                opts(s, p),
            )
            .unwrap();
            assert_eq!(y.shape(), &[g.n, g.o, g.oh, g.ow]);
            assert_close(
                &y.tensor().to_vec_f32().unwrap(),
                &naive_forward(&xv, &wv, None, &g),
                1e-4,
            );
        }
    }

    #[test]
    fn output_size_follows_pytorch() {
        let g = Conv2dGeometry::new(&[2, 3, 224, 224], &[64, 3, 7, 7], opts(2, 3)).unwrap();
        assert_eq!((g.oh, g.ow), (112, 112));
        let g = Conv2dGeometry::new(&[2, 64, 56, 56], &[128, 64, 1, 1], opts(2, 0)).unwrap();
        assert_eq!((g.oh, g.ow), (28, 28));
        let g = Conv2dGeometry::new(&[2, 64, 28, 28], &[64, 64, 3, 3], opts(1, 1)).unwrap();
        assert_eq!((g.oh, g.ow), (28, 28));
    }

    #[test]
    fn backward_schedules_agree() {
        // The tape uses one schedule; both must give the same gradients.
        for (k, &(xs, ws, s, p)) in CASES.iter().enumerate() {
            let (x, w, dy) = (randn(&xs, 40 + k as u64), randn(&ws, 50), {
                let g = Conv2dGeometry::new(&xs, &ws, opts(s, p)).unwrap();
                randn(&[g.n, g.o, g.oh, g.ow], 60)
            });
            let g = Conv2dGeometry::new(&xs, &ws, opts(s, p)).unwrap();
            let (xv, wv, dyv) = (
                x.to_vec_f32().unwrap(),
                w.to_vec_f32().unwrap(),
                dy.to_vec_f32().unwrap(),
            );
            let base =
                conv2d_backward_cpu_with(&xv, &wv, &dyv, &g, [true; 3], ConvSchedule::PerItem)
                    .unwrap();
            for sched in [
                ConvSchedule::Grouped { items: 2 },
                ConvSchedule::Grouped { items: 3 },
                ConvSchedule::Batched { items: 1 },
                ConvSchedule::Batched { items: 2 },
            ] {
                let other = conv2d_backward_cpu_with(&xv, &wv, &dyv, &g, [true; 3], sched).unwrap();
                assert_close(other.x.as_ref().unwrap(), base.x.as_ref().unwrap(), 1e-4);
                assert_close(
                    other.weight.as_ref().unwrap(),
                    base.weight.as_ref().unwrap(),
                    1e-4,
                );
                assert_close(
                    other.bias.as_ref().unwrap(),
                    base.bias.as_ref().unwrap(),
                    1e-4,
                );
            }
            let only_w = conv2d_backward_cpu_with(
                &xv,
                &wv,
                &dyv,
                &g,
                [false, true, false],
                ConvSchedule::PerItem,
            )
            .unwrap();
            assert!(only_w.x.is_none() && only_w.bias.is_none());
            assert_close(
                only_w.weight.as_ref().unwrap(),
                base.weight.as_ref().unwrap(),
                1e-5,
            );
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for (k, &(xs, ws, s, p)) in CASES.iter().enumerate() {
            let inputs = [
                randn(&xs, 70 + k as u64),
                randn(&ws, 80),
                randn(&[ws[0]], 90),
            ];
            GradCheck::default()
                .run(&inputs, &[0, 1, 2], |tape, v| {
                    conv2d(tape, &v[0], &v[1], Some(&v[2]), opts(s, p))
                })
                .unwrap_or_else(|e| panic!("case {k}: {e}"));
        }
        // Frozen input image (the first layer): only weight and bias.
        let (xs, ws, s, p) = CASES[0];
        let inputs = [randn(&xs, 95), randn(&ws, 96)];
        GradCheck::default()
            .run(&inputs, &[1], |tape, v| {
                conv2d(tape, &v[0], &v[1], None, opts(s, p))
            })
            .unwrap();
    }

    #[test]
    fn input_gradient_is_skipped_for_constant_input() {
        let tape = Tape::recording();
        let x = tape.constant(randn(&[2, 3, 5, 5], 1));
        let w = tape.watch(randn(&[4, 3, 3, 3], 2));
        let y = conv2d(&tape, &x, &w, None, opts(1, 1)).unwrap();
        let dy = randn(y.shape(), 3);
        let grads = tape.backward_with(&y, dy).unwrap();
        assert_eq!(grads.get(&w).unwrap().shape(), &[4, 3, 3, 3]);
    }

    #[test]
    fn rejects_bad_shapes_and_options() {
        let tape = Tape::inference();
        let c = |s: &[usize]| tape.constant(randn(s, 1));
        let err = conv2d(
            &tape,
            &c(&[2, 3, 8, 8]),
            &c(&[4, 5, 3, 3]),
            None,
            opts(1, 0),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("conv2d") && err.contains("[2, 3, 8, 8]") && err.contains("[4, 5, 3, 3]"),
            "{err}"
        );
        let err = conv2d(
            &tape,
            &c(&[2, 3, 8, 8]),
            &c(&[4, 3, 3, 3]),
            None,
            opts(0, 0),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("stride"), "{err}");
        assert!(conv2d(&tape, &c(&[3, 8, 8]), &c(&[4, 3, 3, 3]), None, opts(1, 0)).is_err());
        assert!(conv2d(&tape, &c(&[2, 3, 8, 8]), &c(&[4, 3, 3]), None, opts(1, 0)).is_err());
        assert!(conv2d(
            &tape,
            &c(&[2, 3, 2, 2]),
            &c(&[4, 3, 3, 3]),
            None,
            opts(1, 0)
        )
        .is_err());
        assert!(conv2d(
            &tape,
            &c(&[2, 3, 2, 2]),
            &c(&[4, 3, 3, 3]),
            None,
            opts(1, 1)
        )
        .is_ok());
        assert!(conv2d(
            &tape,
            &c(&[2, 3, 8, 8]),
            &c(&[4, 3, 3, 3]),
            Some(&c(&[3])),
            opts(1, 0)
        )
        .is_err());
        assert!(conv2d(
            &tape,
            &c(&[2, 3, 8, 8]),
            &c(&[4, 3, 0, 3]),
            None,
            opts(1, 0)
        )
        .is_err());
    }

    /// A bf16 weight (a teacher's): bf16 products on the input rounded to bf16 where the CPU
    /// has them, the widened weight otherwise; both close to the naive convolution of the
    /// operands that path uses. Small images in a batch: grouped products.
    #[test]
    fn forward_with_bf16_weights() {
        for (k, &(xs, ws, s, p)) in CASES.iter().enumerate() {
            let x = randn(&xs, 200 + k as u64);
            let w = randn(&ws, 210).cast(DType::BF16).unwrap();
            let b = randn(&[ws[0]], 220).cast(DType::BF16).unwrap();
            let g = Conv2dGeometry::new(&xs, &ws, opts(s, p)).unwrap();
            let tape = Tape::inference();
            let y = conv2d(
                &tape,
                &tape.constant(x.clone()),
                &tape.constant(w.clone()),
                Some(&tape.constant(b.clone())),
                opts(s, p),
            )
            .unwrap();
            let xv: Vec<f32> = x
                .to_vec_f32()
                .unwrap()
                .iter()
                .map(|&v| {
                    if bf16_products_active() {
                        bf16::from_f32(v).to_f32()
                    } else {
                        v
                    }
                })
                .collect();
            let want = naive_forward(
                &xv,
                &w.to_vec_f32().unwrap(),
                Some(&b.to_vec_f32().unwrap()),
                &g,
            );
            assert_close(&y.tensor().to_vec_f32().unwrap(), &want, 1e-4);
        }
        assert!(conv2d_forward_bf16_cpu(
            &[0.0; 3],
            &[bf16::ZERO; 4],
            None,
            &Conv2dGeometry::new(&[1, 1, 2, 2], &[1, 1, 2, 2], opts(1, 0)).unwrap(),
            &mut [0.0; 1],
        )
        .is_err());
    }
}
