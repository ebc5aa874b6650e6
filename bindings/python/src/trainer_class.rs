//! `recycle._native.Trainer`: the Rust `Trainer` driven from Python one caller batch at a time
//! (the Python class `recycle.Trainer` wraps it). Arrays arrive as NumPy arrays the Python side
//! has already checked (C-contiguous, the right dtype); they are read here in place, through
//! NumPy's array interface, straight into the engine's batch (the one copy a Rust caller makes
//! too), and the GIL is released while the step runs.

use std::sync::Mutex;
use std::time::Instant;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use recycle::recipe::Recipe;
use recycle::trainer::{Batch, RunOptions, StepReport, Trainer};

use crate::{engine_err, error, summary_json};

/// The element types the trainer reads.
#[derive(Clone, Copy, PartialEq)]
enum Elem {
    F32,
    I32,
    I64,
}

/// A checked NumPy array: its address, shape and element type. Valid while the array it was
/// read from is alive and not resized (the caller holds it for the call).
struct ArrayRef {
    addr: usize,
    shape: Vec<usize>,
    elem: Elem,
}

impl ArrayRef {
    fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// # Safety
    /// The array this was read from is alive and unchanged in size; its type is `F32`.
    unsafe fn to_f32(&self) -> Vec<f32> {
        if self.len() == 0 {
            return Vec::new();
        }
        std::slice::from_raw_parts(self.addr as *const f32, self.len()).to_vec()
    }

    /// # Safety
    /// As [`ArrayRef::to_f32`]; the type is `I32` or `I64`.
    unsafe fn to_i32(&self, py: Python<'_>, name: &str) -> PyResult<Vec<i32>> {
        if self.len() == 0 {
            return Ok(Vec::new());
        }
        match self.elem {
            Elem::I32 => {
                Ok(std::slice::from_raw_parts(self.addr as *const i32, self.len()).to_vec())
            }
            Elem::I64 => std::slice::from_raw_parts(self.addr as *const i64, self.len())
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    i32::try_from(v).map_err(|_| {
                        error(
                            py,
                            format!("{name}: element {i} is {v}, outside the int32 range"),
                        )
                    })
                })
                .collect(),
            Elem::F32 => Err(error(py, format!("{name}: integers expected, got float32"))),
        }
    }
}

/// Reads `a`'s array interface: it must be a `numpy.ndarray`, C-contiguous, aligned, of one
/// of `allowed` types and of rank `rank`. Anything else is a `RecycleError` naming `name`.
fn array_ref(
    py: Python<'_>,
    a: &Bound<'_, PyAny>,
    name: &str,
    allowed: &[Elem],
    rank: usize,
) -> PyResult<ArrayRef> {
    let ndarray = py.import("numpy")?.getattr("ndarray")?;
    if !a.get_type().is(&ndarray) {
        return Err(error(
            py,
            format!(
                "{name}: a numpy.ndarray expected, got {}",
                a.get_type().name()?
            ),
        ));
    }
    let flags = a.getattr("flags")?;
    if !flags.getattr("c_contiguous")?.extract::<bool>()?
        || !flags.getattr("aligned")?.extract::<bool>()?
    {
        return Err(error(
            py,
            format!("{name}: the array is not C-contiguous and aligned"),
        ));
    }
    let iface = a.getattr("__array_interface__")?;
    let typestr: String = iface.get_item("typestr")?.extract()?;
    let little = cfg!(target_endian = "little");
    let elem = match (typestr.as_str(), little) {
        ("<f4", true) | (">f4", false) => Elem::F32,
        ("<i4", true) | (">i4", false) => Elem::I32,
        ("<i8", true) | (">i8", false) => Elem::I64,
        (other, _) => {
            return Err(error(
                py,
                format!("{name}: dtype {other} is not one this call takes"),
            ))
        }
    };
    if !allowed.contains(&elem) {
        return Err(error(
            py,
            format!("{name}: dtype {typestr} is not one this call takes"),
        ));
    }
    let shape: Vec<usize> = iface.get_item("shape")?.extract()?;
    if shape.len() != rank {
        return Err(error(
            py,
            format!("{name}: {rank} dimensions expected, got shape {shape:?}"),
        ));
    }
    let (addr, _readonly): (usize, bool) = iface.get_item("data")?.extract()?;
    let len = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| error(py, format!("{name}: the shape {shape:?} overflows")))?;
    if addr == 0 && len > 0 {
        return Err(error(py, format!("{name}: the array has no data")));
    }
    Ok(ArrayRef { addr, shape, elem })
}

const INDEX: &[Elem] = &[Elem::I32, Elem::I64];

/// An image batch from `images` `[n, c, h, w]` float32 and `labels` `[n]` int32/int64.
fn image_batch(
    py: Python<'_>,
    images: &Bound<'_, PyAny>,
    labels: &Bound<'_, PyAny>,
) -> PyResult<Batch> {
    let x = array_ref(py, images, "images", &[Elem::F32], 4)?;
    let y = array_ref(py, labels, "labels", INDEX, 1)?;
    let shape = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
    // SAFETY: both arrays are alive (borrowed for this call, the GIL held) and were checked.
    let (pixels, labels) = unsafe { (x.to_f32(), y.to_i32(py, "labels")?) };
    Batch::images(pixels, shape, labels).map_err(engine_err)
}

/// A token batch from `[batch, seq_len]` int32/int64 ids, attention mask and labels.
fn token_batch(
    py: Python<'_>,
    input_ids: &Bound<'_, PyAny>,
    attention_mask: &Bound<'_, PyAny>,
    labels: &Bound<'_, PyAny>,
) -> PyResult<Batch> {
    let ids = array_ref(py, input_ids, "input_ids", INDEX, 2)?;
    let mask = array_ref(py, attention_mask, "attention_mask", INDEX, 2)?;
    let y = array_ref(py, labels, "labels", INDEX, 2)?;
    for (name, a) in [("attention_mask", &mask), ("labels", &y)] {
        if a.shape != ids.shape {
            return Err(error(
                py,
                format!("{name} has shape {:?}, input_ids {:?}", a.shape, ids.shape),
            ));
        }
    }
    let (b, s) = (ids.shape[0], ids.shape[1]);
    // SAFETY: as in `image_batch`.
    let (ids, mask, y) = unsafe {
        (
            ids.to_i32(py, "input_ids")?,
            mask.to_i32(py, "attention_mask")?,
            y.to_i32(py, "labels")?,
        )
    };
    Batch::mlm(ids, mask, y, b, s).map_err(engine_err)
}

fn step_dict<'py>(py: Python<'py>, r: &StepReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("step", r.step)?;
    d.set_item("lr", r.lr)?;
    d.set_item("ce", r.output.ce)?;
    d.set_item("kd", r.output.kd)?;
    d.set_item("loss", r.output.loss)?;
    d.set_item("teacher_forwards", r.output.teacher_forwards)?;
    d.set_item("skipped", r.output.skipped.map(|s| s.tag()))?;
    Ok(d)
}

fn parse_recipe(text: &str, is_json: bool) -> PyResult<Recipe> {
    if is_json {
        Recipe::from_json(text)
    } else {
        Recipe::from_toml(text)
    }
    .map_err(engine_err)
}

/// One run of a recipe fed the caller's batches. The lock is only ever tried: a second
/// thread calling while a step runs (the GIL released) gets an error, not a wait.
#[pyclass(module = "recycle._native", name = "Trainer")]
pub struct PyTrainer {
    inner: Mutex<Option<Trainer>>,
}

impl PyTrainer {
    fn with<R>(&self, py: Python<'_>, f: impl FnOnce(&mut Trainer) -> PyResult<R>) -> PyResult<R> {
        let mut guard = self.inner.try_lock().map_err(|_| {
            error(
                py,
                "the trainer is busy in another thread: drive a trainer from one thread at a time",
            )
        })?;
        let t = guard.as_mut().ok_or_else(|| {
            error(
                py,
                "the trainer is finished; create a new one to train again",
            )
        })?;
        f(t)
    }

    fn run<'py>(&self, py: Python<'py>, batch: Batch) -> PyResult<Bound<'py, PyDict>> {
        let r = self.with(py, |t| {
            py.allow_threads(move || t.step_batch(&batch))
                .map_err(engine_err)
        })?;
        step_dict(py, &r)
    }

    fn evaluate(&self, py: Python<'_>, batch: Batch) -> PyResult<(f32, usize, usize)> {
        let e = self.with(py, |t| {
            py.allow_threads(move || t.evaluate_batch(&batch))
                .map_err(engine_err)
        })?;
        Ok((e.loss, e.correct, e.rows))
    }

    fn logits<'py>(&self, py: Python<'py>, batch: Batch) -> PyResult<Logits<'py>> {
        let all = self.with(py, |t| {
            py.allow_threads(move || {
                t.teacher_logits(&batch)?
                    .iter()
                    .map(|l| Ok((l.shape().to_vec(), l.to_vec_f32()?)))
                    .collect::<recycle::engine::Result<Vec<_>>>()
            })
            .map_err(engine_err)
        })?;
        let (rows, classes) = all.first().map_or((0, 0), |(s, _)| (s[0], s[1]));
        let mut bytes = Vec::with_capacity(all.len() * rows * classes * 4);
        for (_, values) in &all {
            for v in values {
                bytes.extend_from_slice(&v.to_ne_bytes());
            }
        }
        Ok((PyBytes::new(py, &bytes), all.len(), rows, classes))
    }
}

/// Teacher logits as `(bytes of [k, rows, classes] f32, k, rows, classes)`.
type Logits<'py> = (Bound<'py, PyBytes>, usize, usize, usize);

#[pymethods]
impl PyTrainer {
    /// `text`: the recipe as TOML (or JSON when `is_json`).
    #[new]
    #[pyo3(signature = (text, is_json, overwrite=false, resume=false))]
    fn new(
        py: Python<'_>,
        text: &str,
        is_json: bool,
        overwrite: bool,
        resume: bool,
    ) -> PyResult<Self> {
        let recipe = parse_recipe(text, is_json)?;
        let opts = RunOptions {
            resume,
            overwrite,
            ..RunOptions::default()
        };
        let t = py
            .allow_threads(|| Trainer::new(&recipe, &opts))
            .map_err(engine_err)?;
        Ok(PyTrainer {
            inner: Mutex::new(Some(t)),
        })
    }

    fn step_images<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        labels: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        self.with(py, |_| Ok(()))?;
        let b = image_batch(py, images, labels)?;
        self.run(py, b)
    }

    fn step_tokens<'py>(
        &self,
        py: Python<'py>,
        input_ids: &Bound<'py, PyAny>,
        attention_mask: &Bound<'py, PyAny>,
        labels: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        self.with(py, |_| Ok(()))?;
        let b = token_batch(py, input_ids, attention_mask, labels)?;
        self.run(py, b)
    }

    /// `(loss, correct, rows)` of the student on images.
    fn evaluate_images(
        &self,
        py: Python<'_>,
        images: &Bound<'_, PyAny>,
        labels: &Bound<'_, PyAny>,
    ) -> PyResult<(f32, usize, usize)> {
        self.with(py, |_| Ok(()))?;
        let b = image_batch(py, images, labels)?;
        self.evaluate(py, b)
    }

    /// `(loss, correct, rows)` of the student on a token batch.
    fn evaluate_tokens(
        &self,
        py: Python<'_>,
        input_ids: &Bound<'_, PyAny>,
        attention_mask: &Bound<'_, PyAny>,
        labels: &Bound<'_, PyAny>,
    ) -> PyResult<(f32, usize, usize)> {
        self.with(py, |_| Ok(()))?;
        let b = token_batch(py, input_ids, attention_mask, labels)?;
        self.evaluate(py, b)
    }

    fn teacher_logits_images<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        labels: &Bound<'py, PyAny>,
    ) -> PyResult<Logits<'py>> {
        self.with(py, |_| Ok(()))?;
        let b = image_batch(py, images, labels)?;
        self.logits(py, b)
    }

    fn teacher_logits_tokens<'py>(
        &self,
        py: Python<'py>,
        input_ids: &Bound<'py, PyAny>,
        attention_mask: &Bound<'py, PyAny>,
        labels: &Bound<'py, PyAny>,
    ) -> PyResult<Logits<'py>> {
        self.with(py, |_| Ok(()))?;
        let b = token_batch(py, input_ids, attention_mask, labels)?;
        self.logits(py, b)
    }

    /// Writes a resumable checkpoint to `path`, atomically.
    fn save(&self, py: Python<'_>, path: std::path::PathBuf) -> PyResult<()> {
        self.with(py, |t| {
            py.allow_threads(move || t.save_checkpoint(&path))
                .map_err(engine_err)
        })
    }

    /// The trainer's metrics as JSON.
    fn metrics(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |t| {
            serde_json::to_string(&t.metrics())
                .map_err(|e| error(py, format!("metrics as JSON: {e}")))
        })
    }

    /// The run directory.
    fn run_dir(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |t| Ok(t.dir().display().to_string()))
    }

    /// Finishes the run: `(summary JSON, run directory)`. The trainer cannot train afterwards.
    fn finish(&self, py: Python<'_>) -> PyResult<(String, String)> {
        let t = self.with(py, |t| {
            if t.is_done() {
                Ok(())
            } else {
                Err(error(
                    py,
                    format!(
                        "the run has done {} of its {} steps; train the rest first",
                        t.current_step(),
                        t.total_steps()
                    ),
                ))
            }
        });
        t?;
        let taken = self.inner.try_lock().ok().and_then(|mut g| g.take());
        let t = taken.ok_or_else(|| error(py, "the trainer is busy or finished"))?;
        let dir = t.dir().display().to_string();
        let summary = py.allow_threads(move || t.finish()).map_err(engine_err)?;
        Ok((summary_json(&summary)?, dir))
    }
}

fn ne_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn ne_i32(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4)
        .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Per step of [`replay_steps`]: `(loss, ce, kd, lr, seconds)`.
type Replayed = (f32, f32, Option<f32>, f32, f64);

/// The Rust `Trainer` fed batches given as raw bytes, with no Python in between: the
/// reference the binding is checked and timed against. `kind` is `images` (each batch: f32
/// pixels and i32 labels, `shape` `[n, c, h, w]`) or `tokens` (i32 ids, attention mask and
/// labels, `shape` `[batch, seq_len]`). Returns, per step, `(loss, ce, kd, lr, seconds in
/// the step)`, and writes the checkpoint to `checkpoint` at the end.
#[pyfunction]
#[pyo3(signature = (text, is_json, kind, batches, shape, checkpoint))]
pub fn replay_steps(
    py: Python<'_>,
    text: &str,
    is_json: bool,
    kind: &str,
    batches: Vec<Vec<Vec<u8>>>,
    shape: Vec<usize>,
    checkpoint: std::path::PathBuf,
) -> PyResult<Vec<Replayed>> {
    let recipe = parse_recipe(text, is_json)?;
    let make = |parts: &[Vec<u8>]| -> recycle::engine::Result<Batch> {
        let wrong = || {
            recycle::engine::Error::invalid(
                "replay_steps",
                format!(
                    "kind {kind:?} with {} buffers and shape {shape:?}",
                    parts.len()
                ),
            )
        };
        match (kind, parts, shape.as_slice()) {
            ("images", [x, y], &[n, c, h, w]) => Batch::images(ne_f32(x), [n, c, h, w], ne_i32(y)),
            ("tokens", [ids, mask, y], &[b, s]) => {
                Batch::mlm(ne_i32(ids), ne_i32(mask), ne_i32(y), b, s)
            }
            _ => Err(wrong()),
        }
    };
    let opts = RunOptions {
        overwrite: true,
        ..RunOptions::default()
    };
    py.allow_threads(|| {
        let mut t = Trainer::new(&recipe, &opts)?;
        let mut out = Vec::with_capacity(batches.len());
        for parts in &batches {
            let batch = make(parts)?;
            let t0 = Instant::now();
            let r = t.step_batch(&batch)?;
            let secs = t0.elapsed().as_secs_f64();
            out.push((r.output.loss, r.output.ce, r.output.kd, r.lr, secs));
        }
        t.save_checkpoint(&checkpoint)?;
        Ok(out)
    })
    .map_err(engine_err)
}
