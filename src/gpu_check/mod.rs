//! `recycle gpu-check`: every op that has a CUDA arm, run on the GPU and on the CPU (the
//! oracle) on the same fresh random inputs, compared element by element.
//!
//! Method, per op: inputs drawn fresh (normal, scale 1.5, a new seed for every tensor: never
//! zeros, never the values of another check), in f32 and in bf16; every buffer the GPU
//! allocates during the check starts as NaN (`cuda::set_poison_allocations`), so an output
//! element a kernel fails to write cannot pass; the forward output and, for tape ops, the
//! gradient of every input (for a random upstream gradient) are copied back and compared with
//! the CPU op's. The error of an element is `|gpu - cpu| / max(|cpu|, 1e-3 · max|cpu|)` (near
//! zero, relative to the tensor's scale), a NaN or infinity where the CPU has a finite value
//! counts as infinite, and a check passes when the largest error is within its tolerance:
//! 1e-6 where the kernel promises the CPU's bits, 1e-5 to 1e-3 where it uses a different
//! `exp`/`erf` or summation order (one ulp of the tensor's scale at an element under the floor
//! is already 2^-23 / 1e-3 ≈ 1.2e-4; long sums and cancelling backward formulas get the
//! larger tolerances), 2e-2 for bf16 storage (8 bits of mantissa). A bf16 row measures each
//! element against the tensor's scale, `|gpu - cpu| / max|cpu|`: the GPU stores every
//! intermediate in bf16 while the CPU op keeps them in f32, so an element near zero carries
//! the rounding of the larger values it was computed from. The casts between f32 and bf16
//! (every bf16 pattern, rounding ties, subnormals, infinities, NaN; plain and on the tape) and
//! four SGDW/AdamW steps (`op_table::compare_casts`, `compare_optimizer_steps`, which the
//! engine's tests also run on `cuda:0`) are held to the CPU's bits: their error column is the
//! number of elements whose bits differ, their tolerance 0.
//!
//! Also measured: allocations per training step (a synthetic step through the ops that run on
//! CUDA), from the context's counters.
//!
//! Host copies (`host_copy_checks`): i32 tensors uploaded from the CPU are read back (whole,
//! as views, after `copy_from_i32`, `zero_` and `deep_copy`) without a download and equal to
//! what the device holds; the attention's padding mask is made into its additive form once and
//! again after a write into the mask. The model-step rows below also count the bytes each step
//! copies to the host ([`STEP_BYTES_TO_HOST`]).
//!
//! The teacher stream (`teacher_stream_checks`): a distillation step of each small model with
//! its teacher on the teacher stream equals, bit for bit, the same step with the teacher run
//! first on the student stream.
//!
//! The NCCL all-reduce group (`cuda::AllReduceGroup`) over the checked GPU: one rank, so the
//! mean must return the buffer bit for bit.
//!
//! Whole models: one training step (forward, loss, backward, then an SGDW update) of a small
//! ResNet-18 (small stem, width 1/8, batch 8 of 1x28x28) and of BERT-tiny (batch 4, sequence
//! 32, vocabulary 512), on the GPU and on the CPU from the same weights and batch (the GPU
//! model is `Model::to_device` of the CPU one), in f32 and again with bf16 activations and a
//! bf16 working copy of the weights. Rows of the same table: the loss, the norm of the flat
//! gradient, the flat gradient element by element (bf16: as a relative L2 error), and the
//! parameters after the update (bf16: the update, and the GPU's working copy against its
//! master rounded). Then (`throughput`; `recycle gpu-check` runs it after printing the table,
//! unless `--no-throughput`) the throughput of a plain training step of ResNet-50 (batch 256, 3x224x224, 1000 classes) and BERT-base (batch 128, sequence 128),
//! both computing in bf16 from a bf16 working copy of their f32 master weights, in samples per
//! second: warm-up steps, then timed steps closed by a device synchronisation.
//!
//! On a machine without a GPU the first step, opening the device, fails with the error that
//! says what is missing (no driver, no CUDA backend in this build, ...).
//!
//! The checks run as groups (`runner`): a group that fails (an error or a panic) becomes a
//! FAIL row with its message and the later groups still run; rows are printed as they are
//! recorded, the table file is rewritten after every group, and an overall deadline leaves the
//! groups not yet started as "not run" rows.
//!
//! Layout: the report and its table here, with [`run`]; the comparison machinery and the
//! error measures in `checker`; the ops through the op table (`recycle_engine::op_table`: the
//! same cases the engine's tests run on the CPU and on `cuda:0`, and its casts and optimizer
//! steps held to the CPU's bits), with the tensor copies and the batch-norm statistics in
//! `ops`; the host-copy rows in `host_copy`; the allocation count in `allocations`; the
//! whole-model steps and the teacher stream in `models`; the NCCL row in `nccl`; the
//! throughput measurement in `throughput`.

pub mod alignment;
mod allocations;
mod checker;
mod host_copy;
mod models;
mod nccl;
mod ops;
mod runner;
mod throughput;

// The model-step tolerances, for the pipeline tests that compare whole runs on `cuda:0` with
// the CPU.
pub use models::{bf16_step_tolerances, F32_STEP_TOLERANCES};

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use recycle_engine::cuda::{self, AllocStats};
use recycle_engine::op_table;
use recycle_engine::{DType, Device, Error, Result};

use checker::Checker;
pub use checker::{l2_norm, max_rel_err, max_scaled_err, rel_l2_err, scalar_rel_err};
pub use models::{small_step_cases, STEP_BYTES_TO_HOST};
pub use runner::GroupsOutcome;
use runner::{Group, Progress};
pub use throughput::{format_throughput, throughput, ThroughputOptions, ThroughputRow};

/// One line of the report.
#[derive(Debug, Clone)]
pub struct CheckRow {
    pub op: String,
    pub shapes: String,
    pub dtype: DType,
    pub max_rel_err: f64,
    pub tolerance: f64,
    pub pass: bool,
    /// For a row that stands for a whole group: why it failed, or that it did not run.
    pub note: Option<String>,
}

/// The line under the device on the mock CUDA: its timings are the CPU's.
pub const MOCK_NOTE: &str = "MOCK: the mock CUDA on the CPU (mockcuda), not a GPU: timings and \
     throughput here are the simulator's and are never GPU figures\n";

/// What `run` found.
#[derive(Debug, Clone)]
pub struct GpuCheckReport {
    pub device: cuda::DeviceInfo,
    pub rows: Vec<CheckRow>,
    /// Allocations (`cuMemAllocAsync` calls) of one synthetic training step, after warm-up.
    pub allocations_per_step: u64,
    pub step_description: String,
    pub stats: AllocStats,
    /// Groups that failed or did not run (each also a row).
    pub groups: GroupsOutcome,
}

impl GpuCheckReport {
    pub fn failures(&self) -> usize {
        self.rows.iter().filter(|r| !r.pass).count()
    }

    /// The report as text: the device, the table, the allocation count, the verdict.
    pub fn to_text(&self) -> String {
        format!(
            "{}{}{}",
            device_line(&self.device),
            format_table(&self.rows),
            self.summary()
        )
    }

    /// The lines after the table: allocations, device memory, the verdict.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "allocations per training step: {} ({}; stream-ordered cuMemAllocAsync from the \
             driver's pool, release threshold: never)",
            self.allocations_per_step, self.step_description
        );
        let _ = writeln!(
            s,
            "device memory: {} allocations, {} frees, peak {:.1} MiB in use; {:.1} MiB to the \
             device, {:.1} MiB to the host",
            self.stats.allocations,
            self.stats.frees,
            self.stats.peak_bytes_in_use as f64 / (1 << 20) as f64,
            self.stats.bytes_to_device as f64 / (1 << 20) as f64,
            self.stats.bytes_to_host as f64 / (1 << 20) as f64
        );
        let _ = writeln!(
            s,
            "{} passed, {} failed",
            self.rows.len() - self.failures(),
            self.failures()
        );
        if !self.groups.failed.is_empty() {
            let _ = writeln!(s, "groups that failed: {}", self.groups.failed.join(", "));
        }
        if !self.groups.not_run.is_empty() {
            let _ = writeln!(
                s,
                "groups not run (deadline): {}",
                self.groups.not_run.join(", ")
            );
        }
        s
    }
}

/// The report's first line: the device, its driver, memory and kernel image.
pub fn device_line(d: &cuda::DeviceInfo) -> String {
    let mut line = format!(
        "device: cuda:{} {} (sm_{}{}), driver CUDA {}.{}, {:.1} GiB, kernels: {}\n",
        d.ordinal,
        d.name,
        d.compute_capability.0,
        d.compute_capability.1,
        d.driver_version / 1000,
        (d.driver_version % 1000) / 10,
        d.total_memory as f64 / (1u64 << 30) as f64,
        d.kernel_image
    );
    if d.is_mock() {
        line.push_str(MOCK_NOTE);
    }
    line
}

/// The table's header lines.
pub const TABLE_HEADER: &str =
    "| op | shapes | dtype | max rel err | tolerance | pass |\n|---|---|---|---:|---:|---|\n";

/// The table: op, shapes, dtype, max relative error, tolerance, pass.
pub fn format_table(rows: &[CheckRow]) -> String {
    let mut s = String::from(TABLE_HEADER);
    for r in rows {
        s.push_str(&format_row(r));
        s.push('\n');
    }
    s
}

/// One line of the table (no newline). A group's row has its note in the shapes column, with
/// the characters that would break the table replaced.
pub fn format_row(r: &CheckRow) -> String {
    match &r.note {
        Some(note) => {
            let note: String = note
                .chars()
                .map(|ch| match ch {
                    '|' => '/',
                    '\n' | '\r' => ' ',
                    c => c,
                })
                .collect();
            let verdict = if note.starts_with("not run") {
                "NOT RUN"
            } else {
                "FAIL"
            };
            format!("| {} | {note} | - | - | - | {verdict} |", r.op)
        }
        None => format!(
            "| {} | {} | {} | {:.3e} | {:.0e} | {} |",
            r.op,
            r.shapes,
            r.dtype,
            r.max_rel_err,
            r.tolerance,
            if r.pass { "pass" } else { "FAIL" }
        ),
    }
}

/// How `run_with` reports while it runs.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Print each row to stdout (flushed) as it is recorded, after the device line and the
    /// table's header.
    pub echo: bool,
    /// Rewrite this file with the table so far after every group.
    pub table_file: Option<PathBuf>,
    /// Start no group after this instant (the rest become "not run" rows).
    pub deadline: Option<Instant>,
}

/// The GPU behind `device` (`cuda:N`).
fn ordinal_of(device: Device) -> Result<usize> {
    match device {
        Device::Cuda(n) => Ok(n),
        Device::Cpu => Err(Error::invalid(
            "gpu-check",
            "compares a GPU with the CPU: give a CUDA device (cuda:N)".to_string(),
        )),
    }
}

/// Runs every check on `device` (a GPU) and returns the report; the first error is opening
/// the device when there is none.
pub fn run(device: Device) -> Result<GpuCheckReport> {
    run_with(device, &RunOptions::default())
}

/// [`run`], reporting as `opts` says. Errors: no GPU (opening the device), the table file
/// cannot be written; a failing group is a row of the report, not an error.
pub fn run_with(device: Device, opts: &RunOptions) -> Result<GpuCheckReport> {
    let ordinal = ordinal_of(device)?;
    let info = cuda::device_info(ordinal)?;
    let header = device_line(&info);
    let mut c = Checker::new(device);
    if opts.echo {
        print!("{header}{TABLE_HEADER}");
        c.echo = Some(runner::stdout_echo());
    }
    cuda::set_poison_allocations(ordinal, true)?;
    let mut per_step = None;
    let mut groups = vec![
        Group::new("tensors", ops::tensor_checks),
        Group::new("host copies", host_copy::host_copy_checks),
    ];
    // The op table, one group per family (`recycle_engine::op_table`).
    for family in op_table::FAMILIES {
        groups.push(Group::new(family, move |c: &mut Checker| c.table(family)));
    }
    groups.extend([
        Group::new("batch-norm statistics", ops::batch_norm_stats_checks),
        Group::new("casts", |c: &mut Checker| {
            let rows = op_table::compare_casts(c.device)?;
            c.exact(DType::BF16, rows);
            Ok(())
        }),
        Group::new("optimizers", |c: &mut Checker| {
            let rows = op_table::compare_optimizer_steps(c.device)?;
            c.exact(DType::F32, rows);
            Ok(())
        }),
        Group::new("allocations per step", |c: &mut Checker| {
            per_step = Some(allocations::allocation_check(c)?);
            Ok(())
        }),
        Group::new("model steps", models::model_step_checks),
        Group::new("teacher stream", models::teacher_stream_checks),
        Group::new("nccl", nccl::all_reduce_checks),
    ]);
    let progress = Progress {
        header,
        table_file: opts.table_file.clone(),
        deadline: opts.deadline,
    };
    let outcome = runner::run_groups(&mut c, groups, &progress)?;
    // A failed group may leave work queued or the device in error: the report still comes.
    let synced = cuda::synchronize(device);
    let unpoisoned = cuda::set_poison_allocations(ordinal, false);
    if let Err(e) = synced.and(unpoisoned) {
        c.push(runner::group_row(
            "device at the end",
            format!("error: {e}"),
        ));
    }
    let (allocations_per_step, step_description) =
        per_step.unwrap_or((0, "not measured: its group failed or did not run".into()));
    Ok(GpuCheckReport {
        device: info,
        rows: c.rows,
        allocations_per_step,
        step_description,
        stats: cuda::alloc_stats(ordinal)?,
        groups: outcome,
    })
}

/// Writes `text` to `path` whole (a temporary file, then a rename).
pub fn write_report(path: &std::path::Path, text: &str) -> Result<()> {
    runner::write_whole(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_every_column() {
        let rows = vec![CheckRow {
            op: "relu".into(),
            shapes: "[2, 3]".into(),
            dtype: DType::BF16,
            max_rel_err: 1.5e-3,
            tolerance: 2e-2,
            pass: true,
            note: None,
        }];
        let t = format_table(&rows);
        assert!(t.contains("| op | shapes | dtype | max rel err | tolerance | pass |"));
        assert!(
            t.contains("| relu | [2, 3] | bf16 | 1.500e-3 | 2e-2 | pass |"),
            "{t}"
        );
    }

    #[test]
    fn a_report_from_the_mock_cuda_is_labelled() {
        let info = |name: &str| cuda::DeviceInfo {
            ordinal: 0,
            name: name.into(),
            compute_capability: (9, 0),
            driver_version: 13000,
            total_memory: 16 << 30,
            kernel_image: "sm_90".into(),
        };
        assert!(device_line(&info(cuda::MOCK_DEVICE_NAME)).contains("MOCK: the mock CUDA"));
        assert!(!device_line(&info("NVIDIA H100 80GB HBM3")).contains("MOCK"));
    }

    #[test]
    fn without_a_gpu_the_check_says_what_is_missing() {
        if cuda::device_info(0).is_ok() {
            return; // a GPU machine: scripts/gpu-check.sh runs the check itself
        }
        let e = run(Device::Cuda(0)).unwrap_err().to_string();
        assert!(
            e.contains("no CUDA backend") || e.contains("no NVIDIA driver found"),
            "{e}"
        );
        assert!(run(Device::Cpu).is_err());
        let opts = ThroughputOptions::default();
        let e = throughput(Device::Cuda(0), &opts).unwrap_err().to_string();
        assert!(
            e.contains("no CUDA backend") || e.contains("no NVIDIA driver found"),
            "{e}"
        );
        assert!(throughput(Device::Cpu, &opts).is_err());
    }
}
