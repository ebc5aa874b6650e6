//! Downloading a data file into a folder, verified against its pinned size and SHA-256.
//!
//! The body is streamed into a temporary file next to the destination (hashed on the way),
//! and renamed into place only when size and checksum match, so the destination is either
//! absent or complete: an interrupted or refused download leaves nothing behind. A body that
//! is corrupt or cut short is fetched once more, then refused. A server that cannot be reached
//! is reported at once (retrying an offline machine only delays the message).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::sources::{DataSource, RemoteFile};
use crate::engine::{Error, Result};

/// How long to wait for a connection, and for each read of the body.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Fetches per file when the body is corrupt or truncated (the first and one retry).
pub const ATTEMPTS: usize = 2;

/// Why one fetch of a file failed.
#[derive(Debug)]
enum Failure {
    /// No response: the host cannot be resolved or reached, or answered with an HTTP error.
    /// Not retried.
    Unreachable(String),
    /// A response whose body is not the pinned file (short, long, or other bytes). Retried.
    Mismatch(String),
    /// The temporary file could not be written. Not retried.
    Local(Error),
}

/// The URL of `file` under `base` (a trailing `/` is added when missing).
pub fn file_url(base: &str, file: &RemoteFile) -> String {
    if base.ends_with('/') {
        format!("{base}{}", file.name)
    } else {
        format!("{base}/{}", file.name)
    }
}

/// A display size: "26.4 MB", "29.5 kB", "512 B".
pub fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        b if b >= 1_000 => format!("{:.1} kB", b as f64 / 1e3),
        b => format!("{b} B"),
    }
}

/// Downloads `file` from `base` into `dir` (which must exist), verified, and returns its
/// path. `source` names the data set and its environment variable in errors and messages.
pub fn download_file(
    source: &DataSource,
    base: &str,
    file: &RemoteFile,
    dir: &Path,
    progress: &indicatif::ProgressBar,
) -> Result<PathBuf> {
    let url = file_url(base, file);
    let dest = dir.join(file.name);
    let client: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_per_read(Some(READ_TIMEOUT))
        .max_redirects(5)
        .build()
        .new_agent();
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        let start = progress.position();
        match fetch_once(&client, &url, file, &dest, progress) {
            Ok(()) => return Ok(dest),
            Err(Failure::Local(e)) => return Err(e),
            Err(Failure::Unreachable(why)) => {
                return Err(refuse(
                    &dest,
                    format!(
                        "cannot download {url}: {why}. Without network access, put the {} \
                         files ({}) into a folder and set {} to it",
                        source.title,
                        file_names(source),
                        source.dir_env
                    ),
                ))
            }
            Err(Failure::Mismatch(why)) => {
                progress.set_position(start);
                if attempt < ATTEMPTS {
                    progress.suspend(|| {
                        eprintln!("{url}: {why}; downloading it again");
                    });
                }
                last = why;
            }
        }
    }
    Err(refuse(
        &dest,
        format!(
            "refused the download of {url} after {ATTEMPTS} tries: {last} (nothing was kept). \
             The file may have changed upstream or the connection alters it: get the {} \
             files ({}) by other means, put them into a folder and set {} to it",
            source.title,
            file_names(source),
            source.dir_env
        ),
    ))
}

fn refuse(dest: &Path, msg: String) -> Error {
    Error::io(dest, io::Error::other(msg))
}

fn file_names(source: &DataSource) -> String {
    let names: Vec<&str> = source.files.iter().map(|f| f.name).collect();
    if names.len() <= 6 {
        names.join(", ")
    } else {
        format!("{}, ... {} files", names[..3].join(", "), names.len())
    }
}

/// A temporary file next to the destination, removed on drop unless it was renamed.
struct Partial {
    path: PathBuf,
    kept: bool,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.kept {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// One GET of `url` into `dest`, through a temporary file.
fn fetch_once(
    client: &ureq::Agent,
    url: &str,
    file: &RemoteFile,
    dest: &Path,
    progress: &indicatif::ProgressBar,
) -> std::result::Result<(), Failure> {
    let response = client.get(url).call().map_err(|e| match e {
        // A body that fails mid-way surfaces from `read` below; here an I/O error is the
        // connection itself.
        ureq::Error::StatusCode(code) => {
            Failure::Unreachable(format!("the server answered HTTP {code}"))
        }
        other => Failure::Unreachable(other.to_string()),
    })?;
    let mut body = response.into_body().into_reader();

    // Hidden (a leading dot) and unique per process and call, so that concurrent downloads do
    // not collide and a reader of the folder never takes it for a data file.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = dest.parent().unwrap_or(Path::new("."));
    let mut partial = Partial {
        path: dir.join(format!(".{}.part-{}-{n}", file.name, std::process::id())),
        kept: false,
    };
    let local = |e: io::Error| Failure::Local(Error::io(&partial.path, e));
    let mut out = File::create(&partial.path).map_err(local)?;

    let mut hasher = Sha256::new();
    let mut got: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Failure::Mismatch(format!(
                    "the body broke off after {got} of {} bytes ({e})",
                    file.size
                )))
            }
        };
        got += n as u64;
        if got > file.size {
            return Err(Failure::Mismatch(format!(
                "the body is longer than the expected {} bytes",
                file.size
            )));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| Failure::Local(Error::io(&partial.path, e)))?;
        progress.inc(n as u64);
    }
    if got != file.size {
        return Err(Failure::Mismatch(format!(
            "the body ended after {got} of the expected {} bytes",
            file.size
        )));
    }
    let actual = hex(&hasher.finalize());
    if actual != file.sha256 {
        return Err(Failure::Mismatch(format!(
            "{got} bytes with SHA-256 {actual}, expected SHA-256 {}",
            file.sha256
        )));
    }
    out.sync_all()
        .map_err(|e| Failure::Local(Error::io(&partial.path, e)))?;
    drop(out);
    fs::rename(&partial.path, dest).map_err(|e| Failure::Local(Error::io(dest, e)))?;
    partial.kept = true;
    Ok(())
}

/// The SHA-256 of a file on disk, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    io::copy(&mut f, &mut hasher).map_err(|e| Error::io(path, e))?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
