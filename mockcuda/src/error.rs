//! Errors of the mock, and the loud failure of an entry point it does not implement.

use std::fmt;

/// What went wrong inside the mock: a message naming the call and the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockError(pub String);

impl fmt::Display for MockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MockError {}

/// Stops the process: `function` was called but the mock does not implement (this use of) it.
/// A mock that answered silently would let a test pass on behaviour nobody checked.
pub fn unimplemented(function: &str, detail: &str) -> ! {
    eprintln!("mockcuda: {function} is not implemented by the mock ({detail})");
    std::process::abort()
}
