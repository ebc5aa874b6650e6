//! Data: the embedded default data sets and the loader that feeds them to the trainer.
//!
//! - [`fashion_mnist`]: Fashion-MNIST images (IDX, gzip).
//! - [`text`]: English text from fortune-mod's fortunes, a WordPiece tokenizer (trained by the
//!   `tokenizers` crate or loaded from any `tokenizer.json`), packed MLM sequences and BERT's
//!   15% (80/10/10) masking.
//! - [`text_shards`] / [`text_stream`]: a text data set of one's own (JSON lines or plain text,
//!   gzip or not, C4's layout), streamed, tokenised on a thread pool, packed and masked.
//! - [`image_folder`]: folders of JPEG and PNG files in ImageNet's layout, decoded
//!   ([`image_decode`]) and cropped, flipped and normalised ([`image_transform`]) batch by batch
//!   on a pool of threads; [`image_source`] puts them and Fashion-MNIST behind one source.
//! - [`validation`]: the validation split, a fixed slice of the training data held out for
//!   choosing (the test split is only reported).
//! - [`loader`]: a deterministic, resumable, shuffling batch loader that prepares the next
//!   batches on a background thread; one loader serves any [`loader::BatchSource`].
//!
//! - [`locate`]: where a data set is found (a folder given, an environment variable, the
//!   Debian package, the cache) or [`download`]ed to, from the pinned [`sources`].
//!
//! A missing file and a damaged one are reported as `Error::Io` naming the file: the first
//! also says where the data set can come from, the second what is wrong with the file.

pub mod download;
pub mod fashion_mnist;
pub mod image_decode;
pub mod image_folder;
pub mod image_source;
pub mod image_transform;
pub mod loader;
pub mod locate;
pub mod sources;
#[doc(hidden)]
pub mod test_support;
pub mod text;
pub mod text_shards;
pub mod text_stream;
pub mod validation;
pub mod wordpiece;

use std::path::Path;

use crate::engine::Error;
use sources::DataSource;

pub use fashion_mnist::{load_fashion_mnist, ImageBatch, ImageDataset, Split};
pub use image_source::ImageSource;
pub use loader::{BatchSource, Loader, LoaderConfig};
pub use text::{load_fortunes, mask_tokens, MlmBatch, MlmDataset, TextTokenizer};

/// A data file or directory that is not there: names the path and where the data set can
/// come from.
pub(crate) fn missing(path: &Path, source: &DataSource) -> Error {
    Error::io(
        path,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "not found; point {} (or the recipe's data.dir) at a folder holding the {} \
                 files, or leave both unset to use Debian's {} or a download into the cache",
                source.dir_env, source.title, source.system_package
            ),
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

/// Turns an I/O error on a data file into our error: "not found" becomes [`missing`], anything
/// else keeps its cause and the path.
pub(crate) fn io_error(path: &Path, source: &DataSource, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        missing(path, source)
    } else {
        Error::io(path, e)
    }
}
