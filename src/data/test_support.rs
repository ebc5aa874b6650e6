//! Small stand-ins for the data sets, written on the fly, so that tests (here, in the
//! bindings and in the pipeline) need neither the Debian packages nor the network.
//!
//! - [`write_fashion_mnist`]: a Fashion-MNIST-shaped folder (the four gzip IDX files, 28x28
//!   images, 10 balanced classes) whose classes are easy to learn: each class is a bright
//!   square at its own place on a noisy background.
//! - [`write_fortunes`]: a fortune-style folder (entries between `%` lines) of generated
//!   English-like sentences over a vocabulary of a few hundred words.
//! - [`use_fixture_data`]: both, written once per process under a given folder, and the
//!   environment variables of [`super::sources`] pointed at them.
//!
//! The contents are a pure function of the sizes, and every file is written to a temporary
//! name and renamed, so processes writing the same folder at once agree.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use flate2::write::GzEncoder;
use flate2::Compression;

use super::fashion_mnist::{IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC};
use super::sources::{FASHION_MNIST, FORTUNES};
use crate::engine::{Error, Result};

/// Images per split written by [`use_fixture_data`]: enough for the tiny demo preset.
pub const FIXTURE_TRAIN_IMAGES: usize = 600;
pub const FIXTURE_TEST_IMAGES: usize = 300;
/// Fortunes written by [`use_fixture_data`]: enough for the tiny MLM demo preset.
pub const FIXTURE_FORTUNES: usize = 2400;

/// Writes `bytes` to `path` through a temporary file in the same folder, named by process and
/// by call, so that tests of one binary writing the same fixture at once do not share it.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp-{}-{call}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// A small deterministic generator (a 64-bit LCG, high bits out).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    fn below(&mut self, n: usize) -> usize {
        self.next() as usize % n
    }
}

/// The gzip-compressed IDX encoding of unsigned bytes with dimensions `dims`.
pub fn idx_gz(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut raw = magic.to_be_bytes().to_vec();
    for d in dims {
        raw.extend_from_slice(&d.to_be_bytes());
    }
    raw.extend_from_slice(data);
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    // Writing to a Vec cannot fail.
    let _ = enc.write_all(&raw);
    enc.finish().unwrap_or_default()
}

/// One 28x28 image of class `class`: noise in 0..48, and a 7x7 square of 180..255 at the
/// class' place on a 4x3 grid.
fn image(class: usize, rng: &mut Lcg) -> Vec<u8> {
    let (top, left) = (2 + (class / 4) * 8, 1 + (class % 4) * 6);
    let mut px = vec![0u8; 28 * 28];
    for (i, p) in px.iter_mut().enumerate() {
        let (r, c) = (i / 28, i % 28);
        let inside = (top..top + 7).contains(&r) && (left..left + 7).contains(&c);
        *p = if inside {
            180 + rng.below(76) as u8
        } else {
            rng.below(48) as u8
        };
    }
    px
}

/// Writes a Fashion-MNIST-shaped folder: `train` and `test` images of 28x28 with labels
/// cycling through the 10 classes in a scrambled order.
pub fn write_fashion_mnist(dir: &Path, train: usize, test: usize) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for (prefix, n, seed) in [("train", train, 1u64), ("t10k", test, 2)] {
        let mut rng = Lcg(seed);
        let labels: Vec<u8> = (0..n).map(|i| ((i * 7 + 3) % 10) as u8).collect();
        let pixels: Vec<u8> = labels
            .iter()
            .flat_map(|&l| image(l as usize, &mut rng))
            .collect();
        write_atomic(
            &dir.join(format!("{prefix}-images-idx3-ubyte.gz")),
            &idx_gz(IDX_IMAGES_MAGIC, &[n as u32, 28, 28], &pixels),
        )?;
        write_atomic(
            &dir.join(format!("{prefix}-labels-idx1-ubyte.gz")),
            &idx_gz(IDX_LABELS_MAGIC, &[n as u32], &labels),
        )?;
    }
    Ok(())
}

const SUBJECTS: &[&str] = &[
    "the cat",
    "a dog",
    "my neighbour",
    "the old man",
    "every child",
    "the computer",
    "a wise woman",
    "the teacher",
    "our captain",
    "the farmer",
    "a stranger",
    "the king",
    "the little bird",
    "your brother",
    "the programmer",
    "a good friend",
    "the river",
    "the moon",
    "an honest lawyer",
    "the doctor",
];
const VERBS: &[&str] = &[
    "sees",
    "likes",
    "forgets",
    "remembers",
    "finds",
    "loses",
    "builds",
    "breaks",
    "reads",
    "writes",
    "carries",
    "follows",
    "watches",
    "answers",
    "keeps",
    "sells",
    "buys",
    "cooks",
    "paints",
    "counts",
];
const ADJECTIVES: &[&str] = &[
    "red", "quiet", "strange", "heavy", "bright", "small", "broken", "golden", "lazy", "quick",
    "ancient", "empty", "green", "happy", "careful", "wooden", "famous", "cold", "secret",
    "simple", "brown",
];
const OBJECTS: &[&str] = &[
    "house", "letter", "garden", "machine", "song", "story", "bridge", "window", "apple",
    "question", "mountain", "book", "lamp", "road", "boat", "coin", "map", "clock", "door",
    "problem", "fox",
];
const ENDINGS: &[&str] = &[
    "in the morning",
    "before dinner",
    "without a word",
    "every day",
    "after the rain",
    "at night",
    "with great care",
    "for no reason",
    "on a sunday",
    "in the end",
];

fn sentence(rng: &mut Lcg) -> String {
    let mut s = format!(
        "{} {} the {} {}",
        SUBJECTS[rng.below(SUBJECTS.len())],
        VERBS[rng.below(VERBS.len())],
        ADJECTIVES[rng.below(ADJECTIVES.len())],
        OBJECTS[rng.below(OBJECTS.len())]
    );
    if rng.below(2) == 0 {
        s.push(' ');
        s.push_str(ENDINGS[rng.below(ENDINGS.len())]);
    }
    let mut c = s.chars();
    let first = c.next().map(|f| f.to_uppercase().collect::<String>());
    format!("{}{}.", first.unwrap_or_default(), c.as_str())
}

/// Writes a fortune-style folder of `entries` generated entries (one to three sentences
/// each), 200 to a file, in files named `generated-NN`.
pub fn write_fortunes(dir: &Path, entries: usize) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut rng = Lcg(3);
    let mut file = 0;
    let mut text = String::new();
    for i in 0..entries {
        let n = 1 + rng.below(3);
        let entry: Vec<String> = (0..n).map(|_| sentence(&mut rng)).collect();
        text.push_str(&entry.join(" "));
        text.push_str("\n%\n");
        if (i + 1) % 200 == 0 || i + 1 == entries {
            write_atomic(&dir.join(format!("generated-{file:02}")), text.as_bytes())?;
            text.clear();
            file += 1;
        }
    }
    Ok(())
}

/// The folders [`use_fixture_data`] writes under `base`: (Fashion-MNIST, fortunes).
pub fn fixture_dirs(base: &Path) -> (PathBuf, PathBuf) {
    let root = base.join("recycle-fixture-data");
    (root.join("fashion-mnist"), root.join("fortunes"))
}

/// Writes the fixture data sets under `base` (the same bytes every time) and returns their
/// folders: (Fashion-MNIST, fortunes).
pub fn fixture_data(base: &Path) -> Result<(PathBuf, PathBuf)> {
    let (images, text) = fixture_dirs(base);
    write_fashion_mnist(&images, FIXTURE_TRAIN_IMAGES, FIXTURE_TEST_IMAGES)?;
    write_fortunes(&text, FIXTURE_FORTUNES)?;
    Ok((images, text))
}

/// Writes the fixture data sets under `base` (once per process) and points
/// `RECYCLE_FASHION_MNIST_DIR` and `RECYCLE_TEXT_DIR` at them; `RECYCLE_DATA_CACHE` is
/// pointed at an empty folder next to them, so nothing from a real cache is used. Returns the
/// two folders.
///
/// Call it at the start of every test of a binary that loads data without naming a folder:
/// the environment is set once, before any of those tests reads it.
pub fn use_fixture_data(base: &Path) -> Result<(PathBuf, PathBuf)> {
    static DONE: OnceLock<std::result::Result<(PathBuf, PathBuf), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let (images, text) = fixture_data(base).map_err(|e| e.to_string())?;
        let cache = base.join("recycle-fixture-data").join("empty-cache");
        std::fs::create_dir_all(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
        std::env::set_var(FASHION_MNIST.dir_env, &images);
        std::env::set_var(FORTUNES.dir_env, &text);
        std::env::set_var(super::locate::CACHE_ENV, &cache);
        Ok((images, text))
    })
    .clone()
    .map_err(|e| Error::invalid("use_fixture_data", e))
}
