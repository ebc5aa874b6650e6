//! Checkpoints as safetensors files: the format PyTorch and Hugging Face use, so a teacher
//! trained in PyTorch loads here and a student trained here loads in PyTorch.
//!
//! - [`save`] writes atomically: the bytes go to a temporary file in the target's directory,
//!   which is fsynced and then renamed over the target (and the directory fsynced), so a crash
//!   or a failed write never leaves a partial checkpoint and never harms the previous one.
//!   Tensors are serialised one at a time, so saving needs memory for one tensor, not the file.
//! - [`load`] returns every tensor with its name (sorted by name) and the file's metadata,
//!   converting element types: f32, bf16 and i32 are kept, f16 is widened to f32, i64 (PyTorch's
//!   `num_batches_tracked`) is narrowed to i32 when it fits; anything else is an error naming
//!   the tensor and its dtype. A truncated or corrupt file is an error naming the file.
//! - [`load_matching`] checks a file against the names and shapes a model expects and reports
//!   every missing, unexpected and mis-shaped tensor in one error.
//! - [`save_params`] / [`load_params`] do the same for a model's [`FlatParams`].

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use half::{bf16, f16};
use safetensors::tensor::{Dtype, SafeTensors, View};
use safetensors::SafeTensorError;

use crate::{DType, Device, Error, FlatParams, Result, Tensor};

/// Metadata key that safetensors reserves for the metadata itself.
const RESERVED_NAME: &str = "__metadata__";

/// How many names of each kind an error message lists before summarising the rest.
const LIST_LIMIT: usize = 10;

/// The contents of a checkpoint file.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The file it was read from.
    pub path: PathBuf,
    /// Every tensor with its name, sorted by name.
    pub tensors: Vec<(String, Tensor)>,
    /// The file's string metadata (empty when it has none).
    pub metadata: HashMap<String, String>,
}

impl Checkpoint {
    /// The tensor named `name`, if the file has one.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| &self.tensors[i].1)
    }

    /// The tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|(n, _)| n.as_str())
    }
}

/// A tensor as safetensors sees it while writing: bytes are produced only when the writer
/// reaches this tensor. A failure to read them is recorded in `error` (the `View` trait cannot
/// fail) and `save` then abandons the temporary file.
struct LazyView<'a> {
    name: &'a str,
    tensor: &'a Tensor,
    dtype: Dtype,
    error: &'a RefCell<Option<String>>,
}

impl View for LazyView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        self.tensor.shape()
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let len = self.data_len();
        match self.tensor.to_bytes() {
            Ok(mut bytes) if bytes.len() == len => {
                if cfg!(target_endian = "big") {
                    let size = self.tensor.dtype().size_in_bytes();
                    bytes.chunks_exact_mut(size).for_each(|c| c.reverse());
                }
                Cow::Owned(bytes)
            }
            Ok(bytes) => {
                self.error.borrow_mut().get_or_insert(format!(
                    "tensor `{}` produced {} bytes, expected {len}",
                    self.name,
                    bytes.len()
                ));
                Cow::Owned(vec![0; len])
            }
            Err(e) => {
                self.error
                    .borrow_mut()
                    .get_or_insert(format!("tensor `{}`: {e}", self.name));
                Cow::Owned(vec![0; len])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.tensor.elem_count() * self.tensor.dtype().size_in_bytes()
    }
}

fn file_dtype(dtype: DType) -> Dtype {
    match dtype {
        DType::F32 => Dtype::F32,
        DType::BF16 => Dtype::BF16,
        DType::I32 => Dtype::I32,
    }
}

/// Removes the temporary file unless the save went through.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A temporary name next to `path`, unique within this process and across processes.
fn temp_path(path: &Path) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::checkpoint(path, "the path does not name a file".to_string()))?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp-{}-{n}", std::process::id()));
    Ok(path.with_file_name(tmp_name))
}

/// The directory that holds `path` (`.` for a bare file name).
#[cfg_attr(not(unix), allow(dead_code))]
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `tensors` (and optional string `metadata`) to `path` as a safetensors file,
/// atomically: either the complete new file is in place afterwards, or the error names what
/// failed and whatever was at `path` before is untouched.
pub fn save(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut seen = BTreeSet::new();
    for (name, _) in tensors {
        if name == RESERVED_NAME {
            return Err(Error::checkpoint(
                path,
                format!("`{RESERVED_NAME}` is reserved by safetensors and cannot name a tensor"),
            ));
        }
        if !seen.insert(name.as_str()) {
            return Err(Error::checkpoint(
                path,
                format!("tensor name `{name}` appears twice"),
            ));
        }
    }

    let tmp = temp_path(path)?;
    let mut guard = TempFile {
        path: tmp.clone(),
        keep: false,
    };
    let error = RefCell::new(None);
    let views = tensors.iter().map(|(name, t)| {
        (
            name.as_str(),
            LazyView {
                name,
                tensor: t,
                dtype: file_dtype(t.dtype()),
                error: &error,
            },
        )
    });
    safetensors::serialize_to_file(views, &metadata, &tmp).map_err(|e| {
        let msg = match e {
            SafeTensorError::IoError(io) => io.to_string(),
            other => format!("{other:?}"),
        };
        Error::checkpoint(
            path,
            format!("cannot write temporary file {}: {msg}", tmp.display()),
        )
    })?;
    if let Some(msg) = error.into_inner() {
        return Err(Error::checkpoint(path, format!("not saved: {msg}")));
    }
    test_pause(&format!("checkpoint write {}", path.display()));
    // The data must be on disk before the rename makes it the checkpoint.
    File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| {
        Error::checkpoint(
            path,
            format!("cannot sync temporary file {}: {e}", tmp.display()),
        )
    })?;
    fs::rename(&tmp, path).map_err(|e| {
        Error::checkpoint(
            path,
            format!(
                "cannot move temporary file {} into place: {e}",
                tmp.display()
            ),
        )
    })?;
    guard.keep = true;
    // Make the rename itself durable. Only unix lets a directory be opened and synced.
    #[cfg(unix)]
    File::open(parent_dir(path))
        .and_then(|d| d.sync_all())
        .map_err(|e| {
            Error::checkpoint(
                path,
                format!("written, but syncing its directory failed: {e}"),
            )
        })?;
    Ok(())
}

/// For the kill tests: when the environment variable `RECYCLE_TEST_SLOW_MS` holds a number,
/// prints `recycle-test-pause: <what>` to stderr and sleeps that many milliseconds, so that a
/// test can kill the process at a moment that is otherwise too short to hit (a checkpoint
/// written but not yet renamed, an evaluation). Unset (always, outside those tests), it does
/// nothing.
pub fn test_pause(what: &str) {
    static MS: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let ms = MS.get_or_init(|| {
        std::env::var("RECYCLE_TEST_SLOW_MS")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if let Some(ms) = *ms {
        eprintln!("recycle-test-pause: {what}");
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

fn le_chunks<const N: usize>(data: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    data.chunks_exact(N)
        .map(|c| c.try_into().expect("chunks_exact yields N bytes"))
}

/// Converts one tensor of a file to an engine tensor (see the module doc for the rules).
fn convert(path: &Path, name: &str, dtype: Dtype, shape: &[usize], data: &[u8]) -> Result<Tensor> {
    let t = match dtype {
        Dtype::F32 => {
            let v: Vec<f32> = le_chunks::<4>(data).map(f32::from_le_bytes).collect();
            Tensor::from_vec(v, shape, Device::Cpu)
        }
        Dtype::BF16 => {
            let v: Vec<bf16> = le_chunks::<2>(data).map(bf16::from_le_bytes).collect();
            Tensor::from_vec(v, shape, Device::Cpu)
        }
        Dtype::F16 => {
            let v: Vec<f32> = le_chunks::<2>(data)
                .map(|b| f16::from_le_bytes(b).to_f32())
                .collect();
            Tensor::from_vec(v, shape, Device::Cpu)
        }
        Dtype::I32 => {
            let v: Vec<i32> = le_chunks::<4>(data).map(i32::from_le_bytes).collect();
            Tensor::from_vec(v, shape, Device::Cpu)
        }
        Dtype::I64 => {
            let mut v = Vec::with_capacity(data.len() / 8);
            for x in le_chunks::<8>(data).map(i64::from_le_bytes) {
                let x = i32::try_from(x).map_err(|_| {
                    Error::checkpoint(
                        path,
                        format!(
                            "tensor `{name}` is i64 and holds {x}, outside the i32 range this engine stores"
                        ),
                    )
                })?;
                v.push(x);
            }
            Tensor::from_vec(v, shape, Device::Cpu)
        }
        other => {
            return Err(Error::checkpoint(
                path,
                format!(
                    "tensor `{name}` has dtype {other:?}; supported are F32, BF16, F16 (widened to f32), I32 and I64 (narrowed to i32)"
                ),
            ))
        }
    };
    t.map_err(|e| Error::checkpoint(path, format!("tensor `{name}`: {e}")))
}

/// What a safetensors parse error means for someone holding the file.
fn describe(e: &SafeTensorError) -> String {
    match e {
        SafeTensorError::HeaderTooSmall => {
            "shorter than the 8-byte header length (empty or truncated)".to_string()
        }
        SafeTensorError::HeaderTooLarge => {
            "the header length field is implausibly large (not a safetensors file?)".to_string()
        }
        SafeTensorError::InvalidHeaderLength => {
            "the header runs past the end of the file (truncated)".to_string()
        }
        SafeTensorError::InvalidHeader
        | SafeTensorError::InvalidHeaderStart
        | SafeTensorError::InvalidHeaderDeserialization => {
            "the header is not valid safetensors JSON (corrupt)".to_string()
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            "the tensor data does not fill the file exactly (truncated, or trailing bytes)"
                .to_string()
        }
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor `{name}` has invalid data offsets (corrupt)")
        }
        SafeTensorError::TensorInvalidInfo | SafeTensorError::ValidationOverflow => {
            "a tensor's shape and dtype do not match its bytes (corrupt)".to_string()
        }
        other => format!("{other:?}"),
    }
}

/// Reads a safetensors file: every tensor (sorted by name) and the metadata.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let (header_len, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| {
        Error::checkpoint(
            path,
            format!("not a valid safetensors file: {}", describe(&e)),
        )
    })?;
    // read_metadata checked that the offsets tile the data section exactly.
    let data = &bytes[8 + header_len..];
    let mut tensors = Vec::new();
    for (name, info) in meta.tensors() {
        let (start, end) = info.data_offsets;
        let t = convert(path, &name, info.dtype, &info.shape, &data[start..end])?;
        tensors.push((name, t));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Checkpoint {
        path: path.to_path_buf(),
        tensors,
        metadata: meta.metadata().clone().unwrap_or_default(),
    })
}

/// `names`, backquoted, at most `LIST_LIMIT` of them, then a count of the rest.
fn list(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(LIST_LIMIT)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > LIST_LIMIT {
        s.push_str(&format!(" and {} more", names.len() - LIST_LIMIT));
    }
    s
}

/// Loads `path` and checks it holds exactly the `expected` names with the expected shapes;
/// returns the tensors in the order of `expected`. One error reports every missing,
/// unexpected and mis-shaped tensor (with both shapes).
pub fn load_matching(path: &Path, expected: &[(String, Vec<usize>)]) -> Result<Vec<Tensor>> {
    let ckpt = load(path)?;
    let mut wanted = BTreeSet::new();
    for (name, _) in expected {
        if !wanted.insert(name.as_str()) {
            return Err(Error::invalid(
                "checkpoint::load_matching",
                format!("expected name `{name}` appears twice"),
            ));
        }
    }
    let mut missing = Vec::new();
    let mut misshaped = Vec::new();
    let mut out = Vec::with_capacity(expected.len());
    for (name, shape) in expected {
        match ckpt.get(name) {
            None => missing.push(name.clone()),
            Some(t) if t.shape() != shape.as_slice() => misshaped.push(format!(
                "`{name}` is {:?} in the file, expected {shape:?}",
                t.shape()
            )),
            Some(t) => out.push(t.clone()),
        }
    }
    let unexpected: Vec<String> = ckpt
        .names()
        .filter(|n| !wanted.contains(n))
        .map(str::to_string)
        .collect();
    if missing.is_empty() && unexpected.is_empty() && misshaped.is_empty() {
        return Ok(out);
    }
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("{} missing: {}", missing.len(), list(&missing)));
    }
    if !unexpected.is_empty() {
        parts.push(format!(
            "{} unexpected: {}",
            unexpected.len(),
            list(&unexpected)
        ));
    }
    if !misshaped.is_empty() {
        let mut s = misshaped
            .iter()
            .take(LIST_LIMIT)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if misshaped.len() > LIST_LIMIT {
            s.push_str(&format!(" and {} more", misshaped.len() - LIST_LIMIT));
        }
        parts.push(format!("{} with the wrong shape: {s}", misshaped.len()));
    }
    Err(Error::checkpoint(
        path,
        format!("does not match the expected tensors: {}", parts.join("; ")),
    ))
}

/// Saves every parameter of `params` under its name (f32), atomically.
pub fn save_params(
    path: &Path,
    params: &FlatParams,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    save(path, &params.named_tensors()?, metadata)
}

/// Loads every parameter of `params` from `path`, strictly: the file must hold exactly these
/// names and shapes (see [`load_matching`]) in a float dtype; bf16 and f16 values are widened
/// into the f32 buffer. On error nothing is written.
pub fn load_params(path: &Path, params: &FlatParams) -> Result<()> {
    let expected: Vec<(String, Vec<usize>)> = params
        .entries()
        .iter()
        .map(|e| (e.name.clone(), e.shape.clone()))
        .collect();
    let tensors = load_matching(path, &expected)?;
    let not_float: Vec<String> = expected
        .iter()
        .zip(&tensors)
        .filter(|(_, t)| !t.dtype().is_float())
        .map(|((name, _), t)| format!("`{name}` ({})", t.dtype()))
        .collect();
    if !not_float.is_empty() {
        return Err(Error::checkpoint(
            path,
            format!(
                "parameters must be floats, these are integers: {}",
                not_float.join(", ")
            ),
        ));
    }
    for ((name, _), t) in expected.iter().zip(&tensors) {
        params.set(name, t)?;
    }
    Ok(())
}
