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
