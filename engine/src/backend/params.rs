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
