//! Finding a data set on this machine, or downloading it once into a cache.
//!
//! The folder of a data set is, in order:
//! 1. the one the caller names (a recipe's `data.dir`, a command-line flag), used as is;
//! 2. the one the data set's environment variable names (`RECYCLE_FASHION_MNIST_DIR`,
//!    `RECYCLE_TEXT_DIR`), used as is;
//! 3. the Debian package's folder, when the package is installed;
//! 4. `<cache>/<name>`, where `<cache>` is `RECYCLE_DATA_CACHE`, else
//!    `$XDG_CACHE_HOME/recycle`, else `~/.cache/recycle`: the files there are used when
//!    complete, and the missing ones are downloaded from their canonical source, verified
//!    against pinned checksums (see [`super::sources`] and [`super::download`]).
//!
//! Folders named by the caller or an environment variable are never downloaded into: they
//! are the user's, and a missing file there is an error naming it.

use std::path::{Path, PathBuf};

use super::download::{download_file, file_url, human_size};
use super::sources::DataSource;
use crate::engine::{Error, Result};

/// Environment variable naming the cache directory (default `$XDG_CACHE_HOME/recycle` or
/// `~/.cache/recycle`).
pub const CACHE_ENV: &str = "RECYCLE_DATA_CACHE";

/// Where to look for a data set and where to fetch it from: [`Places::from_env`] for the
/// real machine, or built by hand (tests point every entry at folders and servers they own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Places {
    /// The folder named by the data set's environment variable.
    pub env_dir: Option<PathBuf>,
    /// The Debian package's folder.
    pub system_dir: Option<PathBuf>,
    /// The cache directory (the data set goes into a sub-folder); `None` when none can be
    /// determined (no `HOME`).
    pub cache: Option<PathBuf>,
    /// Where the files are downloaded from.
    pub base_url: String,
    /// Show a progress bar on a terminal (messages go to stderr either way).
    pub progress: bool,
}

impl Places {
    /// The places of `source` on this machine, from the environment.
    pub fn from_env(source: &DataSource) -> Places {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        Places {
            env_dir: var(source.dir_env).map(PathBuf::from),
            system_dir: Some(PathBuf::from(source.system_dir)),
            cache: cache_dir(),
            base_url: var(source.base_url_env)
                .map(|v| v.to_string_lossy().into_owned())
                .unwrap_or_else(|| source.base_url.to_string()),
            progress: true,
        }
    }
}

/// The cache directory: `RECYCLE_DATA_CACHE`, else `$XDG_CACHE_HOME/recycle` (when absolute),
/// else `$HOME/.cache/recycle`.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var(CACHE_ENV) {
        return Some(PathBuf::from(dir));
    }
    if let Some(xdg) = var("XDG_CACHE_HOME").map(PathBuf::from) {
        if xdg.is_absolute() {
            return Some(xdg.join("recycle"));
        }
    }
    var("HOME").map(|home| PathBuf::from(home).join(".cache").join("recycle"))
}

/// The folder holding `source` on this machine (see the module documentation for the
/// order), downloading into the cache when it is nowhere else.
pub fn locate(source: &DataSource, explicit: Option<&Path>) -> Result<PathBuf> {
    locate_in(source, explicit, &Places::from_env(source))
}

/// [`locate`] with the places given.
pub fn locate_in(source: &DataSource, explicit: Option<&Path>, places: &Places) -> Result<PathBuf> {
    if let Some(dir) = explicit {
        return Ok(dir.to_path_buf());
    }
    if let Some(dir) = &places.env_dir {
        return Ok(dir.clone());
    }
    if let Some(dir) = &places.system_dir {
        if source.system_markers.iter().all(|m| dir.join(m).is_file()) {
            return Ok(dir.clone());
        }
    }
    let Some(cache) = &places.cache else {
        return Err(Error::io(
            Path::new(source.cache_name),
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "{} is not installed and there is no cache directory to download it \
                     into (HOME is not set): set {CACHE_ENV} to a writable folder, or {} to \
                     a folder holding the files",
                    source.title, source.dir_env
                ),
            ),
        ));
    };
    let dir = cache.join(source.cache_name);
    fill_cache(source, &dir, places)?;
    Ok(dir)
}

/// Makes `dir` hold every file of `source`: a file already there with the pinned size is
/// kept (it was verified when it was downloaded, and renamed into place only then); the
/// others are downloaded.
fn fill_cache(source: &DataSource, dir: &Path, places: &Places) -> Result<()> {
    let missing: Vec<_> = source
        .files
        .iter()
        .filter(|f| !std::fs::metadata(dir.join(f.name)).is_ok_and(|m| m.len() == f.size))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let total: u64 = missing.iter().map(|f| f.size).sum();
    let progress = if places.progress {
        progress_bar(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    // A line per file for a few large files; one for the set when there are many small ones.
    let per_file = source.files.len() <= 4;
    if !per_file {
        progress.suspend(|| {
            eprintln!(
                "downloading {} ({} files, {}) from {} into {}",
                source.title,
                missing.len(),
                human_size(total),
                places.base_url,
                dir.display()
            )
        });
    }
    for file in missing {
        if per_file {
            progress.suspend(|| {
                eprintln!(
                    "downloading {} {} ({}) from {} into {}",
                    source.title,
                    file.name,
                    human_size(file.size),
                    file_url(&places.base_url, file),
                    dir.display()
                )
            });
        }
        let result = download_file(source, &places.base_url, file, dir, &progress);
        if let Err(e) = result {
            progress.finish_and_clear();
            return Err(with_cache_hint(e, dir));
        }
    }
    progress.finish_and_clear();
    eprintln!("{} is in {}", source.title, dir.display());
    Ok(())
}

/// Adds where downloads go (and how to move them) to a download error.
fn with_cache_hint(e: Error, dir: &Path) -> Error {
    match e {
        Error::Io { path, source } => Error::io(
            path,
            std::io::Error::new(
                source.kind(),
                format!(
                    "{source}; downloads go to {} (set {CACHE_ENV} to use another cache)",
                    dir.display()
                ),
            ),
        ),
        other => other,
    }
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    // Drawn only when stderr is a terminal.
    let p = indicatif::ProgressBar::new(total);
    p.set_style(
        indicatif::ProgressStyle::with_template(
            "  {bytes}/{total_bytes} [{bar:30}] {bytes_per_sec}, {eta} left",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    p
}
