//! Image folders in ImageNet's layout: `DIR/train/<class>/...` and `DIR/val/<class>/...`.
//!
//! Classes are the sub-folders of `train/`, sorted by name, numbered from 0 (torchvision's
//! `ImageFolder`); a class's files are found in its folder and below it, in sorted order, by
//! their extension (`.jpg`, `.jpeg`, `.png`, any case; other files are ignored). `val/` may
//! hold a subset of the classes; a class there that `train/` lacks is an error.
//!
//! Nothing is decoded when a folder is opened: the list of files is all that is kept, and each
//! batch decodes its own images on a pool of decoding threads while the loader's bounded
//! prefetch queue holds the batches made ahead (see [`super::loader`]), so memory does not grow
//! with the data set.
//!
//! Views ([`super::image_transform`]): a training view's random choices are drawn from
//! `(seed, epoch, item index)` alone, so any view can be made again ([`FolderSplit::view`]);
//! evaluation views have none.
//!
//! A file that cannot be read or decoded is an error naming it, or, with `skip_bad`, is
//! skipped: said once on stderr with the count so far; a training batch takes the next
//! readable item in its place (the batch keeps its size), an evaluation batch leaves it out.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;
use recycle_engine::rng::{self, Rng};

use super::image_decode::decode_rgb;
use super::image_transform::{eval_tensor, train_tensor, train_view};
use super::loader::BatchSource;
use super::{corrupt, ImageBatch};
use crate::engine::{Device, Error, Result, Tensor};

/// One decoded, transformed view (CHW floats) and its label.
type LabelledView = (Vec<f32>, i32);

/// Extensions of the files taken as images (compared without case).
pub const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// How a folder's views are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderOptions {
    /// Side of the square views (224 for ImageNet).
    pub image_size: usize,
    /// Skip unreadable files (counted) instead of failing on the first.
    pub skip_bad: bool,
    /// Decoding threads (0: one per core).
    pub decode_threads: usize,
}

/// One file of a split and its class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub path: PathBuf,
    pub label: i32,
}

/// The files of `DIR/train` and `DIR/val` and the class names.
#[derive(Debug, Clone)]
pub struct FolderIndex {
    pub classes: Vec<String>,
    pub train: Vec<Item>,
    pub val: Vec<Item>,
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>> {
    let mut entries = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let path = e.path();
        // Follows links, as torchvision's walk does.
        let is_dir = path.is_dir();
        entries.push((e.file_name().to_string_lossy().into_owned(), path, is_dir));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// The image files under `dir`, recursively, in sorted order.
fn walk(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) -> Result<()> {
    if depth > 32 {
        return Err(Error::invalid(
            "image folder",
            format!(
                "{}: folders nested over 32 deep (a link loop?)",
                dir.display()
            ),
        ));
    }
    for (_, path, is_dir) in read_dir_sorted(dir)? {
        if is_dir {
            walk(&path, out, depth + 1)?;
        } else if is_image(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// The class folders of a split and their files, in order.
fn scan_split(dir: &Path) -> Result<Vec<(String, Vec<PathBuf>)>> {
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not found: an image folder holds train/<class>/* and val/<class>/* \
                 (ImageNet's layout); point data.dir (or --data) at its root",
            ),
        ));
    }
    let mut classes = Vec::new();
    for (name, path, is_dir) in read_dir_sorted(dir)? {
        if !is_dir {
            continue;
        }
        let mut files = Vec::new();
        walk(&path, &mut files, 0)?;
        classes.push((name, files));
    }
    Ok(classes)
}

impl FolderIndex {
    /// Lists `root/train` and `root/val`. Errors name the folder: a split missing, no class, a
    /// class without images, a validation class that training lacks.
    pub fn scan(root: &Path) -> Result<FolderIndex> {
        let train_dir = root.join("train");
        let train = scan_split(&train_dir)?;
        if train.is_empty() {
            return Err(Error::io(
                &train_dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "holds no class folder: put each class's images in train/<class>/",
                ),
            ));
        }
        let classes: Vec<String> = train.iter().map(|(n, _)| n.clone()).collect();
        let mut items = Vec::new();
        for (label, (name, files)) in train.into_iter().enumerate() {
            if files.is_empty() {
                return Err(Error::io(
                    train_dir.join(&name),
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("class `{name}` holds no .jpg, .jpeg or .png file"),
                    ),
                ));
            }
            items.extend(files.into_iter().map(|path| Item {
                path,
                label: label as i32,
            }));
        }
        let val_dir = root.join("val");
        let mut val = Vec::new();
        for (name, files) in scan_split(&val_dir)? {
            let Ok(label) = classes.binary_search(&name) else {
                return Err(Error::io(
                    val_dir.join(&name),
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("class `{name}` is not a class of {}", train_dir.display()),
                    ),
                ));
            };
            val.extend(files.into_iter().map(|path| Item {
                path,
                label: label as i32,
            }));
        }
        if val.is_empty() {
            return Err(Error::io(
                &val_dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "holds no image: put the test images in val/<class>/",
                ),
            ));
        }
        Ok(FolderIndex {
            classes,
            train: items,
            val,
        })
    }
}

/// `n` items spread evenly over `items` (all when `n` is `None` or not smaller), so a limited
/// split still covers every class of a sorted list.
pub fn spread(items: Vec<Item>, n: Option<usize>) -> Vec<Item> {
    match n {
        Some(n) if n < items.len() => {
            let len = items.len();
            (0..n).map(|k| items[k * len / n].clone()).collect()
        }
        _ => items,
    }
}

/// Whether a split's views are random training views or fixed evaluation views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewKind {
    /// Random views from `(seed, epoch, index)`; the epoch of a batch is its step divided by
    /// `steps_per_epoch` (the loader's, for the training batch size).
    Train {
        seed: u64,
        steps_per_epoch: u64,
    },
    Eval,
}

/// Counts and names the files skipped with `skip_bad`.
#[derive(Debug, Default)]
pub struct SkipLog {
    skipped: AtomicU64,
    seen: Mutex<BTreeSet<PathBuf>>,
}

impl SkipLog {
    /// Distinct files skipped so far.
    pub fn count(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    fn record(&self, path: &Path, why: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.insert(path.to_path_buf()) {
            let n = self.skipped.fetch_add(1, Ordering::Relaxed) + 1;
            eprintln!(
                "image folder: skipping {} ({why}); {n} unreadable file{} skipped so far \
                 (data.skip_bad = true)",
                path.display(),
                if n == 1 { "" } else { "s" }
            );
        }
    }
}

/// One split of an image folder as a [`BatchSource`] of `3 x size x size` views.
pub struct FolderSplit {
    pub items: Vec<Item>,
    pub classes: usize,
    pub kind: ViewKind,
    pub options: FolderOptions,
    pub skips: Arc<SkipLog>,
    pool: Arc<rayon::ThreadPool>,
}

/// Tag of the view stream, apart from other users of the run's seed.
const VIEW_TAG: u64 = 0x5649_4557_5f52_5243;

impl FolderSplit {
    pub fn new(
        items: Vec<Item>,
        classes: usize,
        kind: ViewKind,
        options: FolderOptions,
        pool: Arc<rayon::ThreadPool>,
        skips: Arc<SkipLog>,
    ) -> FolderSplit {
        FolderSplit {
            items,
            classes,
            kind,
            options,
            skips,
            pool,
        }
    }

    /// A pool of `threads` decoding threads (0: one per core).
    pub fn decode_pool(threads: usize) -> Result<Arc<rayon::ThreadPool>> {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("recycle-decode-{i}"))
            .build()
            .map(Arc::new)
            .map_err(|e| Error::invalid("image folder", format!("decoding threads: {e}")))
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The generator of item `index`'s training view in `epoch`.
    pub fn view_rng(seed: u64, epoch: u64, index: usize) -> Rng {
        Rng::new(rng::bits_at(
            rng::bits_at(seed ^ VIEW_TAG, epoch),
            index as u64,
        ))
    }

    /// The view of item `index` (in `epoch` for a training split): decoded and transformed,
    /// `3 * size * size` values. The error names the file.
    pub fn view(&self, index: usize, epoch: u64) -> Result<Vec<f32>> {
        let item = self.items.get(index).ok_or_else(|| {
            Error::invalid(
                "image folder",
                format!("item {index} out of range for {} images", self.len()),
            )
        })?;
        let bytes = std::fs::read(&item.path).map_err(|e| Error::io(&item.path, e))?;
        let image = decode_rgb(&bytes).map_err(|why| corrupt(&item.path, why))?;
        let size = self.options.image_size;
        Ok(match self.kind {
            ViewKind::Train { seed, .. } => {
                let mut rng = Self::view_rng(seed, epoch, index);
                let v = train_view(&mut rng, image.width, image.height);
                train_tensor(&image, v, size)
            }
            ViewKind::Eval => eval_tensor(&image, size),
        })
    }

    /// The view of `index`, or with `skip_bad` of the first readable item from it on
    /// (training) or nothing (evaluation).
    fn view_or_skip(&self, index: usize, epoch: u64) -> Result<Option<LabelledView>> {
        let n = self.len();
        let tries = match self.kind {
            ViewKind::Train { .. } if self.options.skip_bad => n,
            _ => 1,
        };
        let mut last = None;
        for k in 0..tries {
            let i = (index + k) % n;
            match self.view(i, epoch) {
                Ok(v) => return Ok(Some((v, self.items[i].label))),
                Err(e) if self.options.skip_bad => {
                    self.skips.record(&self.items[i].path, &short_reason(&e));
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        match (self.kind, last) {
            (ViewKind::Train { .. }, Some(e)) => Err(Error::invalid(
                "image folder",
                format!("no readable image in the training split; the last error: {e}"),
            )),
            _ => Ok(None),
        }
    }
}

/// The part of an error worth a log line: its message without the path (said beside it).
fn short_reason(e: &Error) -> String {
    match e {
        Error::Io { source, .. } => source.to_string(),
        e => e.to_string(),
    }
}

impl BatchSource for FolderSplit {
    type Batch = ImageBatch;

    fn len(&self) -> usize {
        self.items.len()
    }

    fn make_batch(&self, indices: &[usize], step: u64) -> Result<ImageBatch> {
        let epoch = match self.kind {
            ViewKind::Train {
                steps_per_epoch, ..
            } => step / steps_per_epoch.max(1),
            ViewKind::Eval => 0,
        };
        let views: Vec<Result<Option<LabelledView>>> = self.pool.install(|| {
            indices
                .par_iter()
                .map(|&i| self.view_or_skip(i, epoch))
                .collect()
        });
        let size = self.options.image_size;
        let mut x = Vec::with_capacity(indices.len() * 3 * size * size);
        let mut labels = Vec::with_capacity(indices.len());
        for v in views {
            if let Some((pixels, label)) = v? {
                x.extend_from_slice(&pixels);
                labels.push(label);
            }
        }
        if labels.is_empty() {
            return Err(Error::invalid(
                "image folder",
                format!(
                    "every image of the batch at step {step} was unreadable ({} skipped so far)",
                    self.skips.count()
                ),
            ));
        }
        let b = labels.len();
        Ok(ImageBatch {
            x: Tensor::f32(x, &[b, 3, size, size])?,
            labels: Tensor::from_vec(labels, &[b], Device::Cpu)?,
        })
    }
}

/// The three splits of an image-folder run: training (random views) and validation (carved
/// from `train/` by [`super::validation::validation_indices`], as the other data sets do), and
/// the test split `val/`, both with evaluation views.
pub struct FolderSplits {
    pub train: FolderSplit,
    pub validation: FolderSplit,
    pub test: FolderSplit,
    pub classes: Vec<String>,
}

/// What [`open_splits`] needs from a recipe.
#[derive(Debug, Clone)]
pub struct FolderRequest<'a> {
    pub root: &'a Path,
    pub options: FolderOptions,
    pub seed: u64,
    pub batch_size: usize,
    pub train_limit: Option<usize>,
    pub eval_limit: Option<usize>,
    pub validation_fraction: f64,
}

/// Lists the folder and makes its splits. `train_limit` keeps that many training images spread
/// over `train/` (before the validation split is carved); `eval_limit` caps the validation and
/// test splits the same way.
pub fn open_splits(r: &FolderRequest) -> Result<FolderSplits> {
    if r.options.image_size < 8 {
        return Err(Error::invalid(
            "recipe",
            format!(
                "data.image_size {} must be at least 8 (224 for ImageNet)",
                r.options.image_size
            ),
        ));
    }
    let index = FolderIndex::scan(r.root)?;
    let all = spread(index.train, r.train_limit);
    let held = super::validation::validation_indices(all.len(), r.validation_fraction);
    let mut is_held = vec![false; all.len()];
    held.iter().for_each(|&i| is_held[i] = true);
    let (mut train, mut validation) = (Vec::new(), Vec::new());
    for (item, held) in all.into_iter().zip(is_held) {
        if held {
            validation.push(item);
        } else {
            train.push(item);
        }
    }
    let validation = spread(validation, r.eval_limit);
    let test = spread(index.val, r.eval_limit);
    let pool = FolderSplit::decode_pool(r.options.decode_threads)?;
    let skips = Arc::new(SkipLog::default());
    let classes = index.classes.len();
    let steps_per_epoch = (train.len() / r.batch_size.max(1)) as u64;
    let split = |items, kind| {
        FolderSplit::new(
            items,
            classes,
            kind,
            r.options.clone(),
            pool.clone(),
            skips.clone(),
        )
    };
    Ok(FolderSplits {
        train: split(
            train,
            ViewKind::Train {
                seed: r.seed,
                steps_per_epoch,
            },
        ),
        validation: split(validation, ViewKind::Eval),
        test: split(test, ViewKind::Eval),
        classes: index.classes,
    })
}
