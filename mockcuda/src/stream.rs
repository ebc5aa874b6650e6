//! Streams and events.
//!
//! INTERFACE (used by the libraries and the driver; keep these signatures):
//! - [`Access`]: a byte range an operation reads or writes.
//! - [`enqueue`]: queues an operation on a stream, after everything queued on it before; the
//!   race detector checks its accesses against other streams' unordered ones.

use std::ffi::c_void;

use crate::error::MockError;
use crate::memory::DevicePtr;

/// A byte range an operation touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read(DevicePtr, usize),
    Write(DevicePtr, usize),
}

/// The work of one queued operation; its error becomes the stream's (sticky) error.
pub type Work = Box<dyn FnOnce() -> Result<(), MockError> + Send>;

/// Queues `work` on `stream` (a `CUstream`; null is the legacy default stream). `name` names
/// the operation in race reports and errors.
pub fn enqueue(
    stream: *mut c_void,
    name: String,
    accesses: Vec<Access>,
    work: Work,
) -> Result<(), MockError> {
    let _ = (stream, accesses);
    let _ = work;
    Err(MockError(format!("{name}: streams are not built yet")))
}
