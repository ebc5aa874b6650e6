//! The three directions of a 2-d convolution as cuDNN defines them, on dense fp32 NCHW
//! values: forward `y = x * w`, backward-data `dx` (the adjoint of forward in `x`) and
//! backward-filter `dw` (its adjoint in `w`), with padding, stride, dilation, groups, and the
//! flipped filter of `CUDNN_CONVOLUTION` (cross-correlation does not flip).

use crate::libcommon::{round_tf32, Elem};

/// A 4-d tensor as a descriptor states it: logical dims and per-dim strides (elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tensor4 {
    pub elem: Elem,
    pub dims: [usize; 4],
    pub strides: [usize; 4],
}

impl Tensor4 {
    /// Packed NCHW (or for a filter KCRS).
    pub fn nchw(elem: Elem, dims: [usize; 4]) -> Tensor4 {
        let [_, c, h, w] = dims;
        Tensor4 {
            elem,
            dims,
            strides: [c * h * w, h * w, w, 1],
        }
    }

    /// Packed NHWC (for a filter KRSC).
    pub fn nhwc(elem: Elem, dims: [usize; 4]) -> Tensor4 {
        let [_, c, h, w] = dims;
        Tensor4 {
            elem,
            dims,
            strides: [h * w * c, 1, w * c, c],
        }
    }

    pub fn count(&self) -> usize {
        self.dims.iter().product()
    }

    fn index(&self, i: [usize; 4]) -> usize {
        (0..4).map(|d| i[d] * self.strides[d]).sum()
    }

    /// The bytes from the base to the end of the last element.
    pub fn span_bytes(&self) -> usize {
        if self.count() == 0 {
            return 0;
        }
        (self.index(self.dims.map(|d| d - 1)) + 1) * self.elem.size()
    }

    /// The values, densely in NCHW order (rounded to TF32 when asked).
    pub fn gather(&self, bytes: &[u8], tf32: bool) -> Vec<f32> {
        let [n, c, h, w] = self.dims;
        let mut out = Vec::with_capacity(self.count());
        for a in 0..n {
            for b in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        let v = self.elem.load(bytes, self.index([a, b, y, x]));
                        out.push(if tf32 { round_tf32(v) } else { v });
                    }
                }
            }
        }
        out
    }

    /// `out = alpha * result + beta * out` element by element (`out` not read when beta is
    /// 0, as documented), `result` dense NCHW.
    pub fn blend(&self, result: &[f32], alpha: f32, beta: f32, bytes: &mut [u8]) {
        let [n, c, h, w] = self.dims;
        let mut i = 0;
        for a in 0..n {
            for b in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        let at = self.index([a, b, y, x]);
                        let mut v = alpha * result[i];
                        if beta != 0.0 {
                            v += beta * self.elem.load(bytes, at);
                        }
                        self.elem.store(bytes, at, v);
                        i += 1;
                    }
                }
            }
        }
    }
}

/// The convolution's geometry: `x` is `[N, C, H, W]`, `w` `[K, C / groups, R, S]`, `y`
/// `[N, K, P, Q]` with `P = (H + 2 pad - ((R - 1) dilation + 1)) / stride + 1` (same for Q).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub x: [usize; 4],
    pub w: [usize; 4],
    pub y: [usize; 4],
    pub pad: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
    /// `CUDNN_CONVOLUTION`: the filter is applied flipped in both spatial axes.
    pub flip: bool,
}

impl Geometry {
    /// The output size of one spatial axis, `None` when the dilated filter does not fit in
    /// the padded input.
    pub fn out_size(
        input: usize,
        filter: usize,
        pad: usize,
        stride: usize,
        dil: usize,
    ) -> Option<usize> {
        let span = (filter - 1) * dil + 1;
        (input + 2 * pad).checked_sub(span).map(|d| d / stride + 1)
    }

    /// The input position of output position `o` and filter tap `t` on axis `a`, if inside.
    fn input_at(&self, a: usize, o: usize, t: usize, size: usize) -> Option<usize> {
        let pos = (o * self.stride[a] + t * self.dilation[a]) as isize - self.pad[a] as isize;
        (pos >= 0 && (pos as usize) < size).then_some(pos as usize)
    }

    /// The filter tap stored for tap `(r, s)` (flipped for true convolution).
    fn tap(&self, r: usize, s: usize) -> (usize, usize) {
        if self.flip {
            (self.w[2] - 1 - r, self.w[3] - 1 - s)
        } else {
            (r, s)
        }
    }

    /// Calls `f(x index, w index, y index)` for every product term of the convolution, all
    /// dense NCHW. `rotate` starts the image and output-channel loops elsewhere (a
    /// non-deterministic algorithm's run-dependent summation order).
    fn terms(&self, rotate: usize, mut f: impl FnMut(usize, usize, usize)) {
        let [n, c, h, wd] = self.x;
        let [k, cg, r, s] = self.w;
        let [_, _, p, q] = self.y;
        let kg = k / self.groups;
        for ni in 0..n {
            let img = (ni + rotate) % n.max(1);
            for kk in 0..k {
                let ki = (kk + rotate) % k;
                let g = ki / kg;
                for ci in 0..cg {
                    let xc = g * cg + ci;
                    for ri in 0..r {
                        for si in 0..s {
                            let (rr, ss) = self.tap(ri, si);
                            let wi = ((ki * cg + ci) * r + rr) * s + ss;
                            for pi in 0..p {
                                let Some(hi) = self.input_at(0, pi, ri, h) else {
                                    continue;
                                };
                                for qi in 0..q {
                                    let Some(wj) = self.input_at(1, qi, si, wd) else {
                                        continue;
                                    };
                                    let xi = ((img * c + xc) * h + hi) * wd + wj;
                                    let yi = ((img * k + ki) * p + pi) * q + qi;
                                    f(xi, wi, yi);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `y` (dense NCHW) from `x` and `w`.
pub fn forward(g: &Geometry, x: &[f32], w: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; g.y.iter().product()];
    g.terms(0, |xi, wi, yi| y[yi] += x[xi] * w[wi]);
    y
}

/// `dx` (dense NCHW) from `w` and `dy`.
pub fn backward_data(g: &Geometry, w: &[f32], dy: &[f32], rotate: usize) -> Vec<f32> {
    let mut dx = vec![0f32; g.x.iter().product()];
    g.terms(rotate, |xi, wi, yi| dx[xi] += dy[yi] * w[wi]);
    dx
}

/// `dw` (dense KCRS) from `x` and `dy`.
pub fn backward_filter(g: &Geometry, x: &[f32], dy: &[f32], rotate: usize) -> Vec<f32> {
    let mut dw = vec![0f32; g.w.iter().product()];
    g.terms(rotate, |xi, wi, yi| dw[wi] += dy[yi] * x[xi]);
    dw
}
