//! Data: the embedded default data sets and the loader that feeds them to the trainer.
//!
//! - [`fashion_mnist`]: Fashion-MNIST images from Debian's `dataset-fashion-mnist` (IDX, gzip).
//! - [`text`]: English text from Debian's `fortunes`, a WordPiece tokenizer (trained by the
//!   `tokenizers` crate or loaded from any `tokenizer.json`), packed MLM sequences and BERT's
//!   15% (80/10/10) masking.
//! - [`validation`]: the validation split, a fixed slice of the training data held out for
//!   choosing (the test split is only reported).
//! - [`loader`]: a deterministic, resumable, shuffling batch loader that prepares the next
//!   batches on a background thread; one loader serves any [`loader::BatchSource`].
//!
//! Data sets come from system packages, so the two failures a user meets are "not installed"
//! and "damaged". Both are reported as `Error::Io` naming the file: the first also names the
//! package to install, the second what is wrong with the file.

pub mod fashion_mnist;
pub mod loader;
pub mod text;
pub mod validation;

use std::path::Path;

use crate::engine::Error;

pub use fashion_mnist::{load_fashion_mnist, ImageBatch, ImageDataset, Split};
pub use loader::{BatchSource, Loader, LoaderConfig};
pub use text::{load_fortunes, mask_tokens, MlmBatch, MlmDataset, TextTokenizer};

/// A data file or directory that is not there: names the path and the Debian package that
/// provides it.
pub(crate) fn missing(path: &Path, package: &str) -> Error {
    Error::io(
        path,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("not found; install the data set with `apt-get install {package}`"),
        ),
    )
}

/// A data file that is there but damaged (truncated, bad compression, wrong format).
pub(crate) fn corrupt(path: &Path, msg: impl Into<String>) -> Error {
    Error::io(
        path,
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("corrupt or truncated: {}", msg.into()),
        ),
    )
}

/// Turns an I/O error on a data file into our error: "not found" becomes [`missing`] (with the
/// package to install), anything else keeps its cause and the path.
pub(crate) fn io_error(path: &Path, package: &str, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        missing(path, package)
    } else {
        Error::io(path, e)
    }
}
