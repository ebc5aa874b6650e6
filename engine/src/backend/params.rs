//! Parameter types of the backend-level functions, shared by the ops and both backends: a leaf
//! module, so that no import runs from a backend back up to the ops.

use crate::{Error, Result};

/// Which of the two row normalisations of the softmax family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SoftmaxKind {
    /// `softmax(x)`; its backward needs the output `y`: `dx = y * (dy - <dy, y>)`.
    Softmax,
    /// `log_softmax(x)`; its backward needs the output `y`: `dx = dy - exp(y) * sum(dy)`.
    LogSoftmax,
}

impl SoftmaxKind {
    /// The op's name, for errors.
    pub fn op_name(self) -> &'static str {
        match self {
            SoftmaxKind::Softmax => "softmax",
            SoftmaxKind::LogSoftmax => "log_softmax",
        }
    }
}

/// Options of `batch_norm2d`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNormOptions {
    /// Batch statistics and running-statistics update (true) or running statistics (false).
    pub training: bool,
    /// Weight of the batch statistics in the running-statistics update.
    pub momentum: f32,
    /// Added to the variance before the square root.
    pub eps: f32,
}

impl Default for BatchNormOptions {
    /// PyTorch's defaults.
    fn default() -> Self {
        BatchNormOptions {
            training: true,
            momentum: 0.1,
            eps: 1e-5,
        }
    }
}

/// Sizes of one max-pooling, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool2dGeometry {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Pool2dGeometry {
    pub fn new(x: &[usize], kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        if x.len() != 4 {
            return Err(Error::shape(
                "max_pool2d",
                format!("input {x:?} must be [N, C, H, W]"),
            ));
        }
        if kernel == 0 || stride == 0 {
            return Err(Error::invalid(
                "max_pool2d",
                format!("kernel ({kernel}) and stride ({stride}) must be at least 1"),
            ));
        }
        if 2 * padding > kernel {
            return Err(Error::invalid(
                "max_pool2d",
                format!("padding {padding} must be at most half the kernel size {kernel}"),
            ));
        }
        let (hp, wp) = (x[2] + 2 * padding, x[3] + 2 * padding);
        if hp < kernel || wp < kernel {
            return Err(Error::shape(
                "max_pool2d",
                format!("input {x:?} with padding {padding} is smaller than the kernel {kernel}"),
            ));
        }
        Ok(Pool2dGeometry {
            n: x[0],
            c: x[1],
            h: x[2],
            w: x[3],
            kernel,
            stride,
            padding,
            oh: (hp - kernel) / stride + 1,
            ow: (wp - kernel) / stride + 1,
        })
    }
}

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

/// The sizes of one product `D = op(A) op(B)` (`[m, k] x [k, n]`), or of `batch` such products
/// stored back to back, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductDims {
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// `A` is stored `[k, m]`.
    pub trans_a: bool,
    /// `B` is stored `[n, k]`.
    pub trans_b: bool,
    /// The output's shape: the batch dimensions, then `[m, n]`.
    pub out_shape: Vec<usize>,
}

impl ProductDims {
    /// From the stored shapes of `A` and `B`: both 2-D (one product), or of one rank >= 3 with
    /// identical leading (batch) dimensions (no broadcasting).
    pub fn new(
        op: &'static str,
        a: &[usize],
        b: &[usize],
        trans_a: bool,
        trans_b: bool,
    ) -> Result<Self> {
        if a.len() < 2 || b.len() != a.len() || a[..a.len() - 2] != b[..b.len() - 2] {
            return Err(Error::shape(
                op,
                format!(
                    "needs operands of the same rank >= 2 with identical leading (batch) dims, \
                     got a {a:?} and b {b:?}"
                ),
            ));
        }
        let op_dims = |r: usize, c: usize, trans: bool| if trans { (c, r) } else { (r, c) };
        let (m, k) = op_dims(a[a.len() - 2], a[a.len() - 1], trans_a);
        let (k2, n) = op_dims(b[b.len() - 2], b[b.len() - 1], trans_b);
        if k != k2 {
            return Err(Error::shape(
                op,
                format!(
                    "a {a:?}{} and b {b:?}{}: inner dimensions {k} and {k2} differ",
                    if trans_a { " (transposed)" } else { "" },
                    if trans_b { " (transposed)" } else { "" },
                ),
            ));
        }
        let lead = &a[..a.len() - 2];
        let mut out_shape = lead.to_vec();
        out_shape.extend([m, n]);
        Ok(ProductDims {
            batch: lead.iter().product(),
            m,
            k,
            n,
            trans_a,
            trans_b,
            out_shape,
        })
    }

    /// A dense layer's product `x [rows, in_f] W^T` (`W` stored `[out_f, in_f]`), with the
    /// output shape `out_shape` (`x`'s leading dimensions, then `out_f`).
    pub fn linear(rows: usize, in_f: usize, out_f: usize, out_shape: Vec<usize>) -> Self {
        ProductDims {
            batch: 1,
            m: rows,
            k: in_f,
            n: out_f,
            trans_a: false,
            trans_b: true,
            out_shape,
        }
    }
}

/// Options of `cross_entropy`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossEntropyOptions {
    /// Rows whose label equals this value contribute neither loss nor gradient.
    pub ignore_index: Option<i32>,
    /// Weight `eps` in [0, 1] of the uniform distribution mixed into the target.
    pub label_smoothing: f32,
}

impl Default for CrossEntropyOptions {
    /// PyTorch's defaults: `ignore_index = -100`, no smoothing.
    fn default() -> Self {
        CrossEntropyOptions {
            ignore_index: Some(-100),
            label_smoothing: 0.0,
        }
    }
}

/// The three broadcasting binary ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
}

impl BinaryOp {
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
        }
    }

    #[inline]
    pub fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
        }
    }
}

/// The pointwise activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `max(x, 0)`; its backward reads the output.
    Relu,
    /// Exact (erf) GELU; its backward reads the input.
    Gelu,
    /// `tanh(x)`; its backward reads the output.
    Tanh,
}

impl Activation {
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Gelu => "gelu",
            Activation::Tanh => "tanh",
        }
    }

    /// Whether the backward reads the output (else the input): saving the output lets relu
    /// and tanh skip recomputation.
    pub fn backward_reads_output(self) -> bool {
        matches!(self, Activation::Relu | Activation::Tanh)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionOptions {
    /// Probability of dropping an attention weight (used only when `training`).
    pub dropout: f32,
    /// Stream of the dropout mask; use a fresh one per step and layer.
    pub seed: u64,
    pub training: bool,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        AttentionOptions {
            dropout: 0.0,
            seed: 0,
            training: false,
        }
    }
}

/// Sizes of one attention call: q is `[b, h, sq, dh]`, k `[b, h, sk, dh]`, v `[b, h, sk, dv]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    pub b: usize,
    pub h: usize,
    pub sq: usize,
    pub sk: usize,
    pub dh: usize,
    pub dv: usize,
}

/// Dropout of the attention probabilities: `Some((p, seed))` when active.
pub type ProbDropout = Option<(f32, u64)>;
