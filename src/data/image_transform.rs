//! The views of an image folder's images, as torchvision's ImageNet recipe makes them:
//!
//! - training: `RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))` with bilinear
//!   resampling, then `RandomHorizontalFlip()`;
//! - evaluation: `Resize(size * 256 / 224)` (the short side), then `CenterCrop(size)`;
//!
//! then `ToTensor()` and `Normalize` with ImageNet's mean and standard deviation, into a
//! `3 x size x size` f32 tensor (channels first).
//!
//! The crop box follows torchvision's `RandomResizedCrop.get_params` step for step (ten tries,
//! then the centre-crop fallback; Python's round-half-to-even), with our counter-based
//! generator in place of torch's. Resampling is Pillow's: a separable triangle filter whose
//! support widens with the downscaling factor (antialiased), over exactly the crop's pixels.

use recycle_engine::rng::Rng;

use super::image_decode::RgbImage;

/// ImageNet's per-channel mean and standard deviation (of pixels scaled to [0, 1]).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// RandomResizedCrop's defaults.
pub const SCALE: (f64, f64) = (0.08, 1.0);
pub const RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

/// A crop box in pixels: top row `i`, left column `j`, height `h`, width `w`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub i: usize,
    pub j: usize,
    pub h: usize,
    pub w: usize,
}

/// The random choices of one training view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainView {
    pub crop: CropBox,
    pub flip: bool,
}

/// The two kinds of draw RandomResizedCrop makes (torch's `uniform_` and `randint`), so the
/// algorithm can run on our generator or, in tests, on draws recorded from torchvision.
pub trait CropDraws {
    /// A uniform value in `[lo, hi)`.
    fn uniform(&mut self, lo: f64, hi: f64) -> f64;
    /// A uniform integer in `[0, n)`.
    fn below(&mut self, n: usize) -> usize;
}

impl CropDraws for Rng {
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        // 53 bits of the generator.
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        lo + (hi - lo) * u
    }

    fn below(&mut self, n: usize) -> usize {
        Rng::below(self, n as u64) as usize
    }
}

/// torchvision's `RandomResizedCrop.get_params` for an image of `width x height`: up to ten
/// random boxes of area `scale` and aspect `ratio` (log-uniform), the first that fits;
/// otherwise the whole image cropped to the nearest allowed aspect, centred.
pub fn random_resized_crop(
    draws: &mut impl CropDraws,
    width: usize,
    height: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
) -> CropBox {
    let area = (width * height) as f64;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * CropDraws::uniform(draws, scale.0, scale.1);
        let aspect = CropDraws::uniform(draws, log_lo, log_hi).exp();
        let w = (target_area * aspect).sqrt().round_ties_even() as usize;
        let h = (target_area / aspect).sqrt().round_ties_even() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let i = CropDraws::below(draws, height - h + 1);
            let j = CropDraws::below(draws, width - w + 1);
            return CropBox { i, j, h, w };
        }
    }
    centre_fallback(width, height, ratio)
}

/// RandomResizedCrop's fallback: the largest centred box whose aspect is within `ratio`.
pub fn centre_fallback(width: usize, height: usize, ratio: (f64, f64)) -> CropBox {
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio.0 {
        (
            width,
            ((width as f64 / ratio.0).round_ties_even() as usize).max(1),
        )
    } else if in_ratio > ratio.1 {
        (
            ((height as f64 * ratio.1).round_ties_even() as usize).max(1),
            height,
        )
    } else {
        (width, height)
    };
    let (w, h) = (w.min(width), h.min(height));
    CropBox {
        i: (height - h) / 2,
        j: (width - w) / 2,
        h,
        w,
    }
}

/// The random choices of a training view: the crop box, then the flip (`rand() < 0.5`).
pub fn train_view(rng: &mut Rng, width: usize, height: usize) -> TrainView {
    let crop = random_resized_crop(rng, width, height, SCALE, RATIO);
    let flip = CropDraws::uniform(rng, 0.0, 1.0) < 0.5;
    TrainView { crop, flip }
}

/// The short side evaluation resizes to: 256 for a 224 crop, scaled the same for other sizes.
pub fn eval_resize(size: usize) -> usize {
    (size * 256 + 112) / 224
}

/// A training view of `image`: the crop resized to `size x size`, flipped when asked,
/// normalised, channels first.
pub fn train_tensor(image: &RgbImage, view: TrainView, size: usize) -> Vec<f32> {
    let c = view.crop;
    let xs = Axis::new(c.j, c.w, 0.0, c.w as f64, size);
    let ys = Axis::new(c.i, c.h, 0.0, c.h as f64, size);
    let hwc = resample(image, &xs, &ys);
    normalise_chw(&hwc, size, size, view.flip)
}

/// The evaluation view of `image`: short side resized to [`eval_resize`]`(size)` (the long
/// side scaled and truncated, as torchvision's `Resize`), the centre `size x size` of it.
pub fn eval_tensor(image: &RgbImage, size: usize) -> Vec<f32> {
    let (w, h) = (image.width, image.height);
    let short = eval_resize(size);
    let (rw, rh) = if w <= h {
        (short, (short as f64 * h as f64 / w as f64) as usize)
    } else {
        ((short as f64 * w as f64 / h as f64) as usize, short)
    };
    let (rw, rh) = (rw.max(size), rh.max(size));
    // CenterCrop's offsets: int(round((resized - crop) / 2)).
    let top = ((rh - size) as f64 / 2.0).round_ties_even() as usize;
    let left = ((rw - size) as f64 / 2.0).round_ties_even() as usize;
    let (sx, sy) = (w as f64 / rw as f64, h as f64 / rh as f64);
    let xs = Axis::new(0, w, left as f64 * sx, (left + size) as f64 * sx, size);
    let ys = Axis::new(0, h, top as f64 * sy, (top + size) as f64 * sy, size);
    let hwc = resample(image, &xs, &ys);
    normalise_chw(&hwc, size, size, false)
}

/// The filter taps of one axis: for each output pixel, the first input index and its weights.
struct Axis {
    starts: Vec<usize>,
    taps: Vec<Vec<f32>>,
}

impl Axis {
    /// Pillow's `precompute_coeffs` for the bilinear filter: `out` pixels covering the source
    /// interval `[box0, box1)` (relative to `lo`), reading only input pixels `lo..lo + len`.
    fn new(lo: usize, len: usize, box0: f64, box1: f64, out: usize) -> Axis {
        let scale = (box1 - box0) / out as f64;
        let filterscale = scale.max(1.0);
        let support = filterscale; // the triangle's support is 1, widened when downscaling
        let mut starts = Vec::with_capacity(out);
        let mut taps = Vec::with_capacity(out);
        for x in 0..out {
            let center = box0 + (x as f64 + 0.5) * scale;
            // Truncation toward zero, as the C cast in Pillow.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = (((center + support + 0.5) as i64).max(0) as usize).min(len);
            let xmin = xmin.min(xmax.saturating_sub(1));
            let mut w: Vec<f32> = Vec::with_capacity(xmax - xmin);
            let mut total = 0.0f64;
            let mut ws = Vec::with_capacity(xmax - xmin);
            for k in xmin..xmax {
                let t = ((k as f64 - center + 0.5) / filterscale).abs();
                let v = if t < 1.0 { 1.0 - t } else { 0.0 };
                ws.push(v);
                total += v;
            }
            if total <= 0.0 {
                // A degenerate interval: take the nearest pixel.
                ws.iter_mut().for_each(|v| *v = 0.0);
                if let Some(first) = ws.first_mut() {
                    *first = 1.0;
                }
                total = 1.0;
            }
            w.extend(ws.iter().map(|v| (v / total) as f32));
            starts.push(lo + xmin);
            taps.push(w);
        }
        Axis { starts, taps }
    }

    fn rows_needed(&self) -> (usize, usize) {
        let lo = self.starts.iter().copied().min().unwrap_or(0);
        let hi = self
            .starts
            .iter()
            .zip(&self.taps)
            .map(|(s, t)| s + t.len())
            .max()
            .unwrap_or(0);
        (lo, hi)
    }
}

/// Resamples `image` through the two axes' taps: rows first (only the rows the columns pass
/// reads), then columns. Returns `ys.len() x xs.len() x 3` values in [0, 255].
fn resample(image: &RgbImage, xs: &Axis, ys: &Axis) -> Vec<f32> {
    let (ow, oh) = (xs.starts.len(), ys.starts.len());
    let (r0, r1) = ys.rows_needed();
    let stride = image.width * 3;
    let mut rows = vec![0.0f32; (r1 - r0) * ow * 3];
    for r in r0..r1 {
        let src = &image.pixels[r * stride..(r + 1) * stride];
        let dst = &mut rows[(r - r0) * ow * 3..(r - r0 + 1) * ow * 3];
        for (x, (start, taps)) in xs.starts.iter().zip(&xs.taps).enumerate() {
            let mut acc = [0.0f32; 3];
            for (k, &t) in taps.iter().enumerate() {
                let p = &src[(start + k) * 3..(start + k) * 3 + 3];
                acc[0] += t * p[0] as f32;
                acc[1] += t * p[1] as f32;
                acc[2] += t * p[2] as f32;
            }
            dst[x * 3..x * 3 + 3].copy_from_slice(&acc);
        }
    }
    let mut out = vec![0.0f32; oh * ow * 3];
    let row_len = ow * 3;
    for (y, (start, taps)) in ys.starts.iter().zip(&ys.taps).enumerate() {
        let dst = &mut out[y * row_len..(y + 1) * row_len];
        for (k, &t) in taps.iter().enumerate() {
            let src = &rows[(start + k - r0) * row_len..(start + k - r0 + 1) * row_len];
            for (d, s) in dst.iter_mut().zip(src) {
                *d += t * s;
            }
        }
    }
    out
}

/// `h x w x 3` values in [0, 255] to normalised `3 x h x w`, mirrored left-right when `flip`.
fn normalise_chw(hwc: &[f32], h: usize, w: usize, flip: bool) -> Vec<f32> {
    let mut out = vec![0.0f32; 3 * h * w];
    for c in 0..3 {
        let (scale, shift) = (
            1.0 / (255.0 * IMAGENET_STD[c]),
            IMAGENET_MEAN[c] / IMAGENET_STD[c],
        );
        let plane = &mut out[c * h * w..(c + 1) * h * w];
        for y in 0..h {
            for x in 0..w {
                let sx = if flip { w - 1 - x } else { x };
                // Pillow rounds each resampled value to a byte before ToTensor sees it.
                let v = hwc[(y * w + sx) * 3 + c].round().clamp(0.0, 255.0);
                plane[y * w + x] = v * scale - shift;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(width: usize, height: usize) -> RgbImage {
        let pixels = (0..width * height * 3)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        RgbImage {
            width,
            height,
            pixels,
        }
    }

    #[test]
    fn crops_fit_and_follow_the_fallback() {
        let mut rng = Rng::new(3);
        for (w, h) in [(1, 1), (5, 300), (300, 5), (64, 48), (500, 375)] {
            for _ in 0..200 {
                let c = random_resized_crop(&mut rng, w, h, SCALE, RATIO);
                assert!(
                    c.w >= 1 && c.h >= 1 && c.j + c.w <= w && c.i + c.h <= h,
                    "{c:?}"
                );
            }
        }
        // A very tall image never fits a box of allowed aspect: the fallback crops it to 3/4.
        assert_eq!(
            centre_fallback(30, 300, RATIO),
            CropBox {
                i: 130,
                j: 0,
                h: 40,
                w: 30
            }
        );
        assert_eq!(
            centre_fallback(400, 300, RATIO),
            CropBox {
                i: 0,
                j: 0,
                h: 300,
                w: 400
            }
        );
    }

    #[test]
    fn a_constant_image_resamples_to_its_constant() {
        let img = RgbImage {
            width: 37,
            height: 23,
            pixels: [10u8, 128, 250].repeat(37 * 23),
        };
        let t = eval_tensor(&img, 16);
        assert_eq!(t.len(), 3 * 16 * 16);
        for (c, v) in [10.0f32, 128.0, 250.0].iter().enumerate() {
            let want = (v / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            for &got in &t[c * 256..(c + 1) * 256] {
                assert!((got - want).abs() < 1e-5, "{got} {want}");
            }
        }
    }

    #[test]
    fn an_identity_crop_keeps_the_pixels_and_the_flip_mirrors() {
        let img = image(8, 8);
        let whole = CropBox {
            i: 0,
            j: 0,
            h: 8,
            w: 8,
        };
        let plain = train_tensor(
            &img,
            TrainView {
                crop: whole,
                flip: false,
            },
            8,
        );
        let flipped = train_tensor(
            &img,
            TrainView {
                crop: whole,
                flip: true,
            },
            8,
        );
        for y in 0..8 {
            for x in 0..8 {
                let v = img.pixels[(y * 8 + x) * 3] as f32;
                let want = (v / 255.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0];
                assert!((plain[y * 8 + x] - want).abs() < 1e-5);
                assert_eq!(flipped[y * 8 + (7 - x)], plain[y * 8 + x]);
            }
        }
    }

    #[test]
    fn eval_sizes_follow_torchvision() {
        assert_eq!(eval_resize(224), 256);
        assert_eq!(eval_resize(32), 37);
        // A 500x375 photo: resized to 341x256, centre 224 from (16, 58).
        let t = eval_tensor(&image(500, 375), 224);
        assert_eq!(t.len(), 3 * 224 * 224);
        assert!(t.iter().all(|v| v.is_finite()));
    }
}
