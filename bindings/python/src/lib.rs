//! `recycle._native`: the Rust half of the Python package `recycle`. The Python half
//! (`python/recycle/__init__.py`) turns NumPy arrays and dicts into the plain values these
//! functions take; everything they compute is the `recycle` crate's.

use std::path::PathBuf;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyBytes, PyDict, PyTuple, PyType};

use recycle::distill::{kd_loss_cpu, KdLoss, KdSchedule, TeacherEntry, TeacherPool};
use recycle::experiments::{build_report, find_runs, PlotOptions};
use recycle::recipe::Recipe;
use recycle::trainer::{self, RunOptions};

mod trainer_class;

static RECYCLE_ERROR: GILOnceCell<Py<PyType>> = GILOnceCell::new();

/// `recycle.RecycleError`: a subclass of both RuntimeError and ValueError, so that either
/// `except` clause catches it.
fn error_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    RECYCLE_ERROR
        .get_or_try_init(py, || {
            let dict = PyDict::new(py);
            dict.set_item("__module__", "recycle")?;
            dict.set_item(
                "__doc__",
                "An error from Recycle's engine or a bad argument; the message says which.",
            )?;
            let bases = PyTuple::new(
                py,
                [
                    py.get_type::<PyRuntimeError>(),
                    py.get_type::<PyValueError>(),
                ],
            )?;
            let t = py
                .get_type::<PyType>()
                .call1(("RecycleError", bases, dict))?
                .downcast_into::<PyType>()?;
            Ok(t.unbind())
        })
        .map(|t| t.bind(py))
}

fn error(py: Python<'_>, msg: impl std::fmt::Display) -> PyErr {
    match error_type(py) {
        Ok(t) => PyErr::from_type(t.clone(), msg.to_string()),
        Err(e) => e,
    }
}

fn engine_err(e: recycle::engine::Error) -> PyErr {
    Python::with_gil(|py| error(py, e))
}

fn summary_json(summary: &recycle::experiments::RunSummary) -> PyResult<String> {
    serde_json::to_string(summary)
        .map_err(|e| Python::with_gil(|py| error(py, format!("run summary as JSON: {e}"))))
}

/// Trains a recipe given as TOML text (`is_json` false) or JSON text (a dict the Python side
/// serialised) and returns the run summary as JSON. The GIL is released while it trains.
#[pyfunction]
#[pyo3(signature = (text, is_json, overwrite=false, resume=false, reuse_finished=false))]
fn train(
    py: Python<'_>,
    text: &str,
    is_json: bool,
    overwrite: bool,
    resume: bool,
    reuse_finished: bool,
) -> PyResult<(String, String)> {
    let recipe = if is_json {
        Recipe::from_json(text)
    } else {
        Recipe::from_toml(text)
    }
    .map_err(engine_err)?;
    let opts = RunOptions {
        resume,
        overwrite,
        reuse_finished,
        ..RunOptions::default()
    };
    let summary = py
        .allow_threads(|| trainer::run(&recipe, &opts))
        .map_err(engine_err)?;
    let dir = recipe.out_dir.join(&recipe.name);
    Ok((summary_json(&summary)?, dir.display().to_string()))
}

/// Reads a recipe file (errors name the file); returns it as TOML text.
#[pyfunction]
fn read_recipe(path: PathBuf) -> PyResult<String> {
    Recipe::from_file(&path)
        .and_then(|r| r.to_toml())
        .map_err(engine_err)
}

/// A strategy of the teacher pool: `single`, `ensemble:K`, `random-subset:K`, `random-one`.
#[pyclass(module = "recycle", name = "TeacherStrategy", frozen)]
struct PyTeacherStrategy {
    inner: recycle::distill::TeacherStrategy,
    spec: String,
}

#[pymethods]
impl PyTeacherStrategy {
    #[new]
    fn new(spec: &str) -> PyResult<Self> {
        Ok(PyTeacherStrategy {
            inner: recycle::distill::TeacherStrategy::parse(spec).map_err(engine_err)?,
            spec: spec.to_string(),
        })
    }

    /// Teacher forwards per distilled step.
    #[getter]
    fn forwards_per_step(&self) -> usize {
        self.inner.forwards_per_step()
    }

    /// Indices of the teachers that run at `step` in a pool of `num_teachers` (or of teachers
    /// with these `accuracies`, which rank them for `single` and `ensemble`) drawn with `seed`.
    #[pyo3(signature = (step, num_teachers=None, seed=0, accuracies=None))]
    fn select(
        &self,
        py: Python<'_>,
        step: u64,
        num_teachers: Option<usize>,
        seed: u64,
        accuracies: Option<Vec<f32>>,
    ) -> PyResult<Vec<usize>> {
        let accuracies = match (num_teachers, accuracies) {
            (None, Some(a)) => a,
            (Some(n), None) => vec![0.0; n],
            (Some(n), Some(a)) if a.len() == n => a,
            (Some(n), Some(a)) => {
                return Err(error(
                    py,
                    format!(
                        "num_teachers is {n} but accuracies has {} values: pass one of them",
                        a.len()
                    ),
                ))
            }
            (None, None) => {
                return Err(error(
                    py,
                    "pass num_teachers (or accuracies, one per teacher)",
                ))
            }
        };
        let entries = accuracies
            .into_iter()
            .enumerate()
            .map(|(i, accuracy)| TeacherEntry {
                name: format!("teacher {i}"),
                accuracy,
                model: (),
            })
            .collect();
        let pool = TeacherPool::new(entries, self.inner, seed).map_err(engine_err)?;
        Ok(pool.select(step))
    }

    fn __repr__(&self) -> String {
        format!("TeacherStrategy({:?})", self.spec)
    }

    fn __str__(&self) -> String {
        self.spec.clone()
    }
}

/// When to distill: from `start` to `stop` (fractions of training), every `every`-th step.
#[pyclass(module = "recycle", name = "KdSchedule", frozen)]
struct PyKdSchedule {
    inner: KdSchedule,
}

#[pymethods]
impl PyKdSchedule {
    #[new]
    #[pyo3(signature = (start=0.0, stop=1.0, every=1))]
    fn new(start: f32, stop: f32, every: u64) -> PyResult<Self> {
        let inner = KdSchedule { start, stop, every };
        inner.validate().map_err(engine_err)?;
        Ok(PyKdSchedule { inner })
    }

    #[getter]
    fn start(&self) -> f32 {
        self.inner.start
    }

    #[getter]
    fn stop(&self) -> f32 {
        self.inner.stop
    }

    #[getter]
    fn every(&self) -> u64 {
        self.inner.every
    }

    /// Whether step `step` (0-based) of `total_steps` distills.
    fn is_active(&self, step: u64, total_steps: u64) -> bool {
        self.inner.is_active(step, total_steps)
    }

    /// `(first step, end step)` of the distillation window for `total_steps`.
    fn window(&self, total_steps: u64) -> (u64, u64) {
        self.inner.window(total_steps)
    }

    fn __repr__(&self) -> String {
        format!(
            "KdSchedule(start={}, stop={}, every={})",
            self.inner.start, self.inner.stop, self.inner.every
        )
    }
}

/// Paths of report.md, report.json and the plot, and whether the plot has text.
type ReportPaths = (String, String, String, bool);

/// The time-to-accuracy report over the finished runs found under each of `paths` (a run
/// directory, or a directory holding runs at any depth), as JSON; with `out_dir`, also writes
/// report.md, report.json and accuracy_vs_time.png there and returns their paths.
#[pyfunction]
#[pyo3(signature = (paths, out_dir=None))]
fn report(
    py: Python<'_>,
    paths: Vec<PathBuf>,
    out_dir: Option<PathBuf>,
) -> PyResult<(String, Option<ReportPaths>)> {
    py.allow_threads(|| {
        let mut runs = Vec::new();
        for p in &paths {
            if !p.is_dir() {
                return Err(recycle::engine::Error::invalid(
                    "report",
                    format!("{} is not a directory: pass run directories", p.display()),
                ));
            }
            runs.extend(find_runs(p)?);
        }
        let report = build_report(&runs)?;
        let files = match &out_dir {
            Some(d) => {
                let f = report.write_to(d, &PlotOptions::default())?;
                Some((
                    f.markdown.display().to_string(),
                    f.json.display().to_string(),
                    f.plot.path.display().to_string(),
                    f.plot.text,
                ))
            }
            None => None,
        };
        Ok((report.to_json()?, files))
    })
    .map_err(engine_err)
}

fn bf16_or_f32(py: Python<'_>, data: &[u8], bf16: bool, what: &str) -> PyResult<Vec<f32>> {
    let width = if bf16 { 2 } else { 4 };
    if !data.len().is_multiple_of(width) {
        return Err(error(
            py,
            format!("{what}: {} bytes are not whole values", data.len()),
        ));
    }
    Ok(if bf16 {
        data.chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_ne_bytes([b[0], b[1]]) as u32) << 16))
            .collect()
    } else {
        data.chunks_exact(4)
            .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    })
}

/// The fused loss on raw buffers: `student` and each of `teachers` are `[rows, classes]`
/// row-major f32 (or bf16 bits when `bf16`), `labels` int64, `mask` one byte per row.
/// Returns `(ce, kd, total, ce_rows, kd_rows, grad)`, the gradient as f32 bytes.
#[pyfunction]
#[pyo3(signature = (student, teachers, labels, classes, bf16, kind, temperature, weight, ignore_index, mask=None))]
#[allow(clippy::too_many_arguments)]
#[allow(clippy::type_complexity)]
fn kd_loss_raw<'py>(
    py: Python<'py>,
    student: &[u8],
    teachers: Vec<Bound<'py, PyBytes>>,
    labels: &[u8],
    classes: usize,
    bf16: bool,
    kind: &str,
    temperature: f32,
    weight: f32,
    ignore_index: i64,
    mask: Option<&[u8]>,
) -> PyResult<(f32, f32, f32, usize, usize, Bound<'py, PyBytes>)> {
    let ignore_index = i32::try_from(ignore_index).map_err(|_| {
        error(
            py,
            format!("ignore_index {ignore_index} does not fit in 32 bits"),
        )
    })?;
    let cfg = match kind {
        "kl" => KdLoss::kl(temperature, weight),
        "mse" => KdLoss::mse(weight),
        other => {
            return Err(error(
                py,
                format!("kind={other:?} is unknown: use \"kl\" or \"mse\""),
            ))
        }
    };
    let cfg = KdLoss {
        ignore_index,
        ..cfg
    };
    let s = bf16_or_f32(py, student, bf16, "student_logits")?;
    let t: Vec<Vec<f32>> = teachers
        .iter()
        .map(|b| bf16_or_f32(py, b.as_bytes(), bf16, "teacher_logits"))
        .collect::<PyResult<_>>()?;
    let mut y = Vec::with_capacity(labels.len() / 8);
    for (r, b) in labels.chunks_exact(8).enumerate() {
        let v = i64::from_ne_bytes(b.try_into().expect("chunks of 8"));
        y.push(i32::try_from(v).map_err(|_| {
            error(
                py,
                format!("kd_loss: label {v} in row {r} is outside [0, {classes})"),
            )
        })?);
    }
    let mask: Option<Vec<bool>> = mask.map(|m| m.iter().map(|&b| b != 0).collect());
    let out = py
        .allow_threads(|| {
            let refs: Vec<&[f32]> = t.iter().map(|v| v.as_slice()).collect();
            kd_loss_cpu(&cfg, &s, &refs, &y, mask.as_deref(), classes)
        })
        .map_err(engine_err)?;
    let grad: Vec<u8> = out.grad.iter().flat_map(|g| g.to_ne_bytes()).collect();
    Ok((
        out.ce,
        out.kd,
        out.total,
        out.ce_rows,
        out.kd_rows,
        PyBytes::new(py, &grad),
    ))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("RecycleError", error_type(m.py())?)?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(read_recipe, m)?)?;
    m.add_function(wrap_pyfunction!(report, m)?)?;
    m.add_function(wrap_pyfunction!(kd_loss_raw, m)?)?;
    m.add_class::<PyTeacherStrategy>()?;
    m.add_class::<PyKdSchedule>()?;
    m.add_class::<trainer_class::PyTrainer>()?;
    m.add_function(wrap_pyfunction!(trainer_class::replay_steps, m)?)?;
    Ok(())
}
