//! Parameter types of the backend-level functions, shared by the ops and both backends: a leaf
//! module, so that no import runs from a backend back up to the ops.

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
