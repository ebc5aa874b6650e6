//! Fashion-MNIST: 28x28 grey images of 10 clothing classes, 60000 for training and 10000 for
//! testing, stored as gzip-compressed IDX files (found or downloaded by [`super::locate`]).
//!
//! IDX is a tiny format: a big-endian magic number (`0x0000_08NN`: unsigned bytes, `NN`
//! dimensions), then `NN` big-endian u32 dimensions, then the bytes row-major. We check every
//! part of it (magic, sizes, that images and labels agree, label range) so a damaged file is an
//! error naming that file rather than a silently wrong data set.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use super::loader::BatchSource;
use super::locate::locate;
use super::sources::FASHION_MNIST;
use super::{corrupt, io_error, missing};
use crate::engine::{Device, Error, Result, Tensor};
/// Mean and standard deviation of Fashion-MNIST's training pixels (scaled to [0, 1]).
pub const MEAN: f32 = 0.2860;
pub const STD: f32 = 0.3530;
/// Number of classes (T-shirt, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag,
/// ankle boot).
pub const CLASSES: usize = 10;

/// IDX magic numbers: unsigned bytes with 3 dimensions (images) or 1 (labels).
pub const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
pub const IDX_LABELS_MAGIC: u32 = 0x0000_0801;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    /// The file-name prefix Fashion-MNIST uses for the split.
    fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

/// An in-memory image classification data set, images normalised and laid out `N*C*H*W`.
#[derive(Debug, Clone)]
pub struct ImageDataset {
    /// `len() * channels * height * width` values, `(x / 255 - MEAN) / STD`.
    pub images: Vec<f32>,
    /// One class index in `0..classes` per image.
    pub labels: Vec<i32>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub classes: usize,
}

impl ImageDataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values per image (`channels * height * width`).
    pub fn image_size(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The normalised pixels of image `i`, or `None` past the end.
    pub fn image(&self, i: usize) -> Option<&[f32]> {
        let n = self.image_size();
        self.images.get(i * n..(i + 1) * n)
    }
}

/// A batch of images: `x` is `[B, C, H, W]` f32, `labels` is `[B]` i32.
#[derive(Debug, Clone)]
pub struct ImageBatch {
    pub x: Tensor,
    pub labels: Tensor,
}

impl BatchSource for ImageDataset {
    type Batch = ImageBatch;

    fn len(&self) -> usize {
        self.labels.len()
    }

    fn make_batch(&self, indices: &[usize], _step: u64) -> Result<ImageBatch> {
        let size = self.image_size();
        let mut x = Vec::with_capacity(indices.len() * size);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let image = self.image(i).ok_or_else(|| {
                Error::invalid(
                    "ImageDataset::make_batch",
                    format!("index {i} out of range for {} images", self.len()),
                )
            })?;
            x.extend_from_slice(image);
            labels.push(self.labels[i]);
        }
        let b = indices.len();
        Ok(ImageBatch {
            x: Tensor::f32(x, &[b, self.channels, self.height, self.width])?,
            labels: Tensor::from_vec(labels, &[b], Device::Cpu)?,
        })
    }
}

/// The contents of an IDX file: its dimensions and (the first items of) its bytes.
#[derive(Debug, Clone)]
pub struct IdxArray {
    /// All dimensions as the header declares them (`dims[0]` is the item count of the file).
    pub dims: Vec<usize>,
    /// The bytes of the first `items` items, row-major.
    pub data: Vec<u8>,
    /// How many items `data` holds (`dims[0]`, or fewer when a limit was given).
    pub items: usize,
}

/// Reads a gzip-compressed IDX file of unsigned bytes whose magic number must be `magic`.
///
/// With `limit`, only the first `limit` items are decompressed (quick loads for tests and
/// smoke runs); without it the whole file is read and checked to end exactly where its header
/// says (which also verifies the gzip checksum).
pub fn read_idx_gz(path: &Path, magic: u32, limit: Option<usize>) -> Result<IdxArray> {
    let file = File::open(path).map_err(|e| io_error(path, &FASHION_MNIST, e))?;
    let mut r = GzDecoder::new(BufReader::new(file));

    let mut word = [0u8; 4];
    read_header_word(&mut r, &mut word, path, "magic number")?;
    let got = u32::from_be_bytes(word);
    if got != magic {
        return Err(corrupt(
            path,
            format!("wrong IDX magic number 0x{got:08x}, expected 0x{magic:08x}"),
        ));
    }
    let rank = (magic & 0xff) as usize;
    let mut dims = Vec::with_capacity(rank);
    for d in 0..rank {
        read_header_word(&mut r, &mut word, path, &format!("dimension {d}"))?;
        dims.push(u32::from_be_bytes(word) as usize);
    }

    let item_size: usize = dims[1..].iter().product();
    let items = limit.map_or(dims[0], |l| l.min(dims[0]));
    let want = items
        .checked_mul(item_size)
        .ok_or_else(|| corrupt(path, format!("dimensions {dims:?} are too large")))?;
    // `take` + `read_to_end` grows the buffer as data arrives, so a header that lies about its
    // size cannot make us allocate gigabytes up front.
    let mut data = Vec::new();
    r.by_ref()
        .take(want as u64)
        .read_to_end(&mut data)
        .map_err(|e| corrupt(path, format!("cannot decompress: {e}")))?;
    if data.len() < want {
        return Err(corrupt(
            path,
            format!(
                "header declares dimensions {dims:?} but the data ends after {} of {want} bytes",
                data.len()
            ),
        ));
    }
    if items == dims[0] {
        let mut rest = Vec::new();
        r.read_to_end(&mut rest)
            .map_err(|e| corrupt(path, format!("cannot decompress: {e}")))?;
        if !rest.is_empty() {
            return Err(corrupt(
                path,
                format!(
                    "{} bytes past the end that its dimensions {dims:?} declare",
                    rest.len()
                ),
            ));
        }
    }
    Ok(IdxArray { dims, data, items })
}

fn read_header_word(r: &mut impl Read, word: &mut [u8; 4], path: &Path, what: &str) -> Result<()> {
    r.read_exact(word).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            corrupt(path, format!("file ends inside the IDX header ({what})"))
        } else {
            corrupt(path, format!("cannot read the IDX header ({what}): {e}"))
        }
    })
}

/// Loads one split of Fashion-MNIST from `dir` (by default the folder [`locate`] finds or
/// downloads), keeping the first `limit` images when given.
///
/// A missing directory or file is an error naming it and where the files can come from; a
/// damaged file (bad gzip, wrong magic, short data, image and label counts that disagree, a
/// label out of range) is an error naming that file.
pub fn load_fashion_mnist(
    dir: Option<&Path>,
    split: Split,
    limit: Option<usize>,
) -> Result<ImageDataset> {
    let dir: PathBuf = locate(&FASHION_MNIST, dir)?;
    if !dir.is_dir() {
        return Err(missing(&dir, &FASHION_MNIST));
    }
    let prefix = split.prefix();
    let images_path = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
    let labels_path = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));

    let images = read_idx_gz(&images_path, IDX_IMAGES_MAGIC, limit)?;
    let labels = read_idx_gz(&labels_path, IDX_LABELS_MAGIC, limit)?;
    if images.dims[0] != labels.dims[0] {
        return Err(corrupt(
            &labels_path,
            format!(
                "holds {} labels but {} holds {} images",
                labels.dims[0],
                images_path.display(),
                images.dims[0]
            ),
        ));
    }
    let (height, width) = (images.dims[1], images.dims[2]);
    if height == 0 || width == 0 {
        return Err(corrupt(
            &images_path,
            format!("images of size {height}x{width}"),
        ));
    }

    let labels: Vec<i32> = labels.data.iter().map(|&l| l as i32).collect();
    if let Some(i) = labels.iter().position(|&l| l as usize >= CLASSES) {
        return Err(corrupt(
            &labels_path,
            format!("label {} of item {i} is outside 0..{CLASSES}", labels[i]),
        ));
    }

    // 256 possible byte values: normalise through a table rather than per pixel.
    let table: Vec<f32> = (0..256).map(|v| (v as f32 / 255.0 - MEAN) / STD).collect();
    let images: Vec<f32> = images.data.iter().map(|&b| table[b as usize]).collect();

    Ok(ImageDataset {
        images,
        labels,
        channels: 1,
        height,
        width,
        classes: CLASSES,
    })
}
