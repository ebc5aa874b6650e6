//! One error type for the whole engine. Every message names what failed (the op, the tensor,
//! the file) and, where there is one, what the user can do about it.

use std::path::PathBuf;

use crate::DType;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Shapes that do not fit together: `op` is the operation, `msg` names both shapes.
    #[error("{op}: shape mismatch: {msg}")]
    Shape { op: &'static str, msg: String },

    /// A tensor of the wrong element type.
    #[error("{op}: expected dtype {expected:?}, got {got:?}")]
    DType {
        op: &'static str,
        expected: DType,
        got: DType,
    },

    /// A value outside what an op or a config accepts (a negative probability, an index out of
    /// range, a zero stride).
    #[error("{op}: invalid argument: {msg}")]
    Invalid { op: &'static str, msg: String },

    /// A device that is not there or not built in.
    #[error("device unavailable: {0}")]
    Device(String),

    /// Misuse of the autograd tape (backward on a non-scalar, twice, ...).
    #[error("autograd: {0}")]
    Autograd(String),

    /// A checkpoint that does not match the model it is loaded into.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },

    /// An I/O failure, with the path it happened on.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            op,
            msg: msg.into(),
        }
    }

    pub fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Invalid {
            op,
            msg: msg.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// Fails with a shape error unless `a == b`; the message shows both shapes.
pub fn check_same_shape(op: &'static str, a: &[usize], b: &[usize]) -> Result<()> {
    if a != b {
        return Err(Error::shape(op, format!("{a:?} vs {b:?}")));
    }
    Ok(())
}
