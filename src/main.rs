//! `recycle`: the command line. Runs the paper's experiments end to end: `sweep` trains the
//! teacher grid, `train` runs one recipe (baseline or distilled), `report` computes
//! time-to-accuracy and draws the Pareto curves, `demo` does all of it on a CPU-sized problem,
//! `bench` measures the per-step cost of distillation against a plain step.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use recycle::bench::{run_bench, BenchSpec, KdBench, Variant};
use recycle::distributed::world::finalize;
use recycle::distributed::World;
use recycle::experiments::demo::{run_demo, DemoKnobs, DemoPreset, DemoTask};
use recycle::experiments::sweep::run_sweep;
use recycle::experiments::{build_report, PlotOptions};
use recycle::recipe::{parse_device_name, Recipe};
use recycle::trainer::{self, RunOptions};
use recycle_engine::{Device, Error, Result};

#[derive(Parser)]
#[command(
    name = "recycle",
    version,
    about = "Same-architecture knowledge distillation: recycle the runs of a sweep as teachers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train one recipe (a baseline, or a student when the recipe has [distill]).
    Train {
        /// The recipe (TOML).
        recipe: PathBuf,
        /// Continue the run from its last checkpoint.
        #[arg(long)]
        resume: bool,
        /// Start again even if the run directory already holds a run.
        #[arg(long)]
        overwrite: bool,
        /// Train on this device instead of the recipe's `device`: cpu, cuda or cuda:N.
        #[arg(long)]
        device: Option<String>,
        /// The data set's root folder, in place of the recipe's `data.dir` (an image folder
        /// holds train/<class>/* and val/<class>/*).
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
    },
    /// Build the teacher cache of a recipe with `[distill] cache = "DIR"`: every teacher's
    /// top-k logits for every step of the first E epochs, for its students to replay.
    CacheTeacher {
        /// The recipe (TOML) of a student.
        recipe: PathBuf,
        /// Epochs of the recipe's batches to cover.
        #[arg(long)]
        epochs: f64,
        /// Logits kept per row [default: the recipe's distill.cache_k, else 10].
        #[arg(long)]
        k: Option<usize>,
        /// Run the teachers on this device instead of the recipe's `device`.
        #[arg(long)]
        device: Option<String>,
    },
    /// Train the recipe at several learning rates: the teachers of later runs.
    Sweep {
        recipe: PathBuf,
        /// Comma-separated learning rates.
        #[arg(long, value_delimiter = ',', default_value = "0.025,0.05,0.1,0.2")]
        lrs: Vec<f32>,
        #[arg(long)]
        overwrite: bool,
        /// Train on this device instead of the recipe's `device`: cpu, cuda or cuda:N.
        #[arg(long)]
        device: Option<String>,
    },
    /// Time-to-accuracy table and accuracy-vs-time plot for finished runs.
    Report {
        /// Run directories, or directories holding runs.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Where to write report.md, report.json and accuracy_vs_time.png.
        #[arg(long, default_value = "report")]
        out: PathBuf,
    },
    /// The whole pipeline on a CPU-sized problem: sweep, baselines, students, report.
    Demo {
        /// `image` (ResNet on Fashion-MNIST) or `mlm` (BERT on fortunes).
        #[arg(long, default_value = "image")]
        task: String,
        /// `quick` (minutes) or `long` (under an hour).
        #[arg(long, default_value = "quick")]
        preset: String,
        /// Output directory (runs and report) [default: runs/demo for image, runs/demo-mlm for
        /// mlm, so the two tasks' runs do not overwrite each other].
        #[arg(long)]
        out: Option<PathBuf>,
        /// KL temperature of the students.
        #[arg(long, default_value_t = DemoKnobs::default().temperature)]
        temperature: f32,
        /// λ, the weight of the distillation term.
        #[arg(long, default_value_t = DemoKnobs::default().weight)]
        weight: f32,
        /// Students' learning rate as a multiple of the best sweep learning rate
        /// [default: 1 / (1 + weight)].
        #[arg(long)]
        student_lr_scale: Option<f32>,
        /// Students' duration in epochs (default: the preset's).
        #[arg(long)]
        student_epochs: Option<f64>,
        /// Fraction of training after which the students stop distilling (1 = throughout).
        #[arg(long, default_value_t = DemoKnobs::default().kd_stop)]
        kd_stop: f32,
        /// Train every run again even when a finished run with the same recipe is there.
        #[arg(long)]
        fresh: bool,
        /// Where every run trains: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Check every CUDA op against its CPU twin on fresh random inputs, and one training step
    /// of a small ResNet and of BERT-tiny against the same step on the CPU (needs a GPU and a
    /// build with `--features cuda`); then measure the training-step throughput of ResNet-50
    /// and BERT-base. Exits non-zero when any check fails.
    GpuCheck {
        /// The GPU to check.
        #[arg(long, default_value = "cuda:0")]
        device: String,
        /// Also write the report to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Skip the throughput of ResNet-50 (batch 256) and BERT-base (batch 128), which needs
        /// a large GPU.
        #[arg(long)]
        no_throughput: bool,
        /// Untimed steps before the timed ones, per model.
        #[arg(long, default_value_t = 3)]
        warmup_steps: usize,
        /// Timed steps per model.
        #[arg(long, default_value_t = 10)]
        timed_steps: usize,
        /// Start no group of checks (nor the throughput) after this many seconds: the rest are
        /// reported as not run and the command fails.
        #[arg(long)]
        deadline_s: Option<f64>,
    },
    /// Per-step cost of distillation: plain, KD (KL, MSE), ensembles of 2 and 4, RandomOne of
    /// 4, an off-schedule step, a teacher forward and a step from a teacher cache (k = 10), as
    /// a table of ratios to the plain step and each variant's peak memory (device memory on a
    /// GPU, heap bytes on the CPU).
    Bench {
        /// resnet18-fmnist (full width), resnet18-fmnist-small (width 0.125), bert-tiny, or
        /// the GPU sizes resnet50-imagenet (batch 256, bf16) and bert-base (batch 128, bf16);
        /// repeat or separate with commas for several.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "resnet18-fmnist-small,bert-tiny"
        )]
        model: Vec<String>,
        /// Samples per step (default: 128 images, 32 sequences, as the PyTorch peer; 256 for
        /// resnet50-imagenet, 128 for bert-base).
        #[arg(long)]
        batch: Option<usize>,
        /// Tokens per sequence (BERT).
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Measured rounds; each runs every variant once, in alternation.
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Rounds run first and not measured.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Only these variants (plain, kd-kl, kd-mse, ensemble-2, ensemble-4, random-one-4,
        /// off-schedule, teacher-fwd, cached-k10), comma-separated.
        #[arg(long, value_delimiter = ',')]
        variants: Vec<String>,
        /// Also print each result as one JSON line (keys like the PyTorch peer's).
        #[arg(long)]
        json: bool,
        /// Instead, split a plain step into forward, backward and optimizer.
        #[arg(long)]
        phases: bool,
        /// Where to run: cpu or cuda:N (each timed step then sits between two device
        /// synchronisations).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// The compute dtype of student and teachers, f32 or bf16 (default: bf16 for
        /// resnet50-imagenet and bert-base, f32 otherwise).
        #[arg(long)]
        activations: Option<String>,
    },
}

fn run(cli: Cli) -> Result<()> {
    let progress = true;
    match cli.command {
        Command::Train {
            recipe,
            resume,
            overwrite,
            device,
            data,
        } => {
            // mpirun / srun / torchrun: this process is one rank of a data-parallel run (first,
            // so that every error names the rank).
            let world = World::init()?;
            let mut r = recipe_on_device(&recipe, device.as_deref())?;
            if let Some(dir) = data {
                r.data.dir = Some(dir);
            }
            let s = trainer::run(
                &r,
                &RunOptions {
                    resume,
                    overwrite,
                    progress,
                    ..RunOptions::default()
                },
            )
            // A recipe value found wrong once the data is loaded (a size): name the file too.
            .map_err(|e| match e {
                Error::Invalid { op: "recipe", msg } => {
                    Error::invalid("recipe", format!("{}: {msg}", recipe.display()))
                }
                e => e,
            })?;
            if world.rank() != 0 {
                return Ok(());
            }
            let ranks = match world.size() {
                1 => String::new(),
                n => format!(" ({n} ranks)"),
            };
            println!(
                "{}: {} {:.4} after {} steps, {:.1} s of training on {}{ranks}, {} teacher forwards",
                s.name,
                s.metric,
                s.final_eval,
                s.steps,
                s.train_seconds,
                s.device.as_deref().unwrap_or("cpu"),
                s.teacher_forwards
            );
        }
        Command::CacheTeacher {
            recipe,
            epochs,
            k,
            device,
        } => {
            let r = recipe_on_device(&recipe, device.as_deref())?;
            let b = trainer::cache_teacher(&r, epochs, k, progress)?;
            println!(
                "{}: {} teachers x {} steps at k = {}: {} forwards ({} already cached) in \
                 {:.1} s, {} bytes ({:.1} per sample and teacher)",
                r.name,
                b.teachers,
                b.steps,
                b.k,
                b.forwards,
                b.already_cached,
                b.seconds,
                b.bytes,
                b.bytes_per_sample()
            );
        }
        Command::Sweep {
            recipe,
            lrs,
            overwrite,
            device,
        } => {
            let r = recipe_on_device(&recipe, device.as_deref())?;
            let opts = RunOptions {
                overwrite,
                progress,
                ..RunOptions::default()
            };
            // Ranked on validation; the test metric is shown, never chosen on.
            println!("| lr | validation metric | test metric | run |");
            println!("|---|---|---|---|");
            for p in run_sweep(&r, &lrs, &opts)? {
                println!(
                    "| {} | {:.4} | {:.4} | {} |",
                    p.lr,
                    p.summary.final_validation.unwrap_or(f32::NAN),
                    p.summary.final_eval,
                    p.dir.display()
                );
            }
        }
        Command::Report { runs, out } => {
            let report = build_report(&runs)?;
            let files = report.write_to(&out, &PlotOptions::default())?;
            println!("{}", report.to_markdown());
            eprintln!(
                "wrote {}, {} and {}",
                files.markdown.display(),
                files.json.display(),
                files.plot.path.display()
            );
        }
        Command::Demo {
            task,
            preset,
            out,
            temperature,
            weight,
            student_lr_scale,
            student_epochs,
            kd_stop,
            fresh,
            device,
        } => {
            let task = match task.as_str() {
                "image" => DemoTask::Image,
                "mlm" => DemoTask::Mlm,
                other => {
                    return Err(Error::invalid(
                        "demo",
                        format!("unknown task `{other}`: use image or mlm"),
                    ))
                }
            };
            let preset = DemoPreset::parse(&preset)?;
            // Every flag is checked before the sweep trains (not when the students start).
            check_demo_flags(
                temperature,
                weight,
                student_lr_scale,
                student_epochs,
                kd_stop,
            )?;
            let out = out.unwrap_or_else(|| {
                PathBuf::from(match task {
                    DemoTask::Image => "runs/demo",
                    DemoTask::Mlm => "runs/demo-mlm",
                })
            });
            let opts = RunOptions {
                overwrite: true,
                progress,
                reuse_finished: !fresh,
                ..RunOptions::default()
            };
            let knobs = DemoKnobs {
                temperature,
                weight,
                student_lr_scale,
                student_epochs,
                kd_stop,
                device: parse_device_flag(&device)?,
            };
            let report = run_demo(task, preset, &out, knobs, &opts)?;
            println!("{}", report.to_markdown());
            eprintln!(
                "report and plot written to {}",
                out.join("report").display()
            );
        }
        Command::GpuCheck {
            device,
            out,
            no_throughput,
            warmup_steps,
            timed_steps,
            deadline_s,
        } => {
            let device = recycle_engine::Device::parse(&device)?;
            let deadline = match deadline_s {
                Some(s) if s.is_finite() && s >= 0.0 => {
                    Some(std::time::Instant::now() + std::time::Duration::from_secs_f64(s))
                }
                Some(s) => {
                    return Err(Error::invalid(
                        "--deadline-s",
                        format!("{s} is not a number of seconds (give one of 0 or more)"),
                    ))
                }
                None => None,
            };
            // Rows are printed as they are recorded and the file is rewritten after every
            // group, so a run cut short still leaves its table.
            let opts = recycle::gpu_check::RunOptions {
                echo: true,
                table_file: out.clone(),
                deadline,
            };
            let report = recycle::gpu_check::run_with(device, &opts)?;
            print!("{}", report.summary());
            let mut text = report.to_text();
            if let Some(path) = &out {
                recycle::gpu_check::write_report(path, &text)?;
            }
            let late = deadline.is_some_and(|d| std::time::Instant::now() >= d);
            if !no_throughput && late {
                let note = "\nthroughput: not run (the deadline had passed)\n";
                print!("{note}");
                text.push_str(note);
            } else if !no_throughput {
                let opts = recycle::gpu_check::ThroughputOptions {
                    warmup_steps,
                    timed_steps: timed_steps.max(1),
                };
                let rows = recycle::gpu_check::throughput(device, &opts)?;
                let table = format!("\n{}", recycle::gpu_check::format_throughput(&rows));
                print!("{table}");
                text.push_str(&table);
            }
            if let Some(path) = &out {
                recycle::gpu_check::write_report(path, &text)?;
            }
            if report.failures() > 0 {
                return Err(Error::invalid(
                    "gpu-check",
                    format!(
                        "{} of {} checks failed or did not run (see the table)",
                        report.failures(),
                        report.rows.len()
                    ),
                ));
            }
        }
        Command::Bench {
            model,
            batch,
            seq,
            iters,
            warmup,
            variants,
            json,
            phases,
            device,
            activations,
        } => {
            let device = recycle_engine::Device::parse(&device)?;
            let activations = activations
                .map(|a| match a.as_str() {
                    "f32" => Ok(recycle_engine::DType::F32),
                    "bf16" => Ok(recycle_engine::DType::BF16),
                    other => Err(recycle_engine::Error::invalid(
                        "bench",
                        format!("--activations {other}: use f32 or bf16"),
                    )),
                })
                .transpose()?;
            let variants = variants
                .iter()
                .map(|v| Variant::parse(v))
                .collect::<Result<Vec<_>>>()?;
            for m in model {
                let spec = BenchSpec {
                    model: m,
                    batch,
                    seq,
                    iters,
                    warmup,
                    variants: variants.clone(),
                    device,
                    activations,
                };
                if phases {
                    let report = KdBench::new(&spec)?.phases(iters, warmup)?;
                    println!("{}", report.to_markdown());
                    continue;
                }
                let report = run_bench(&spec)?;
                println!("{}", report.to_markdown());
                if json {
                    println!("{}\n", report.to_json());
                }
            }
        }
    }
    Ok(())
}

/// The demo's numeric flags: each error names the flag, the value and what it accepts.
fn check_demo_flags(
    temperature: f32,
    weight: f32,
    student_lr_scale: Option<f32>,
    student_epochs: Option<f64>,
    kd_stop: f32,
) -> Result<()> {
    let bad = |flag: &str, value: String, want: &str| {
        Err(Error::invalid(
            "demo",
            format!("{flag} {value} must be {want}"),
        ))
    };
    if !(temperature > 0.0 && temperature.is_finite()) {
        return bad(
            "--temperature",
            temperature.to_string(),
            "a positive number",
        );
    }
    if !(weight >= 0.0 && weight.is_finite()) {
        return bad("--weight", weight.to_string(), "a number at least 0");
    }
    if let Some(s) = student_lr_scale.filter(|s| !(*s > 0.0 && s.is_finite())) {
        return bad("--student-lr-scale", s.to_string(), "a positive number");
    }
    if let Some(e) = student_epochs.filter(|e| !(*e > 0.0 && e.is_finite())) {
        return bad(
            "--student-epochs",
            e.to_string(),
            "a positive number of epochs",
        );
    }
    if !(kd_stop > 0.0 && kd_stop <= 1.0) {
        return bad("--kd-stop", kd_stop.to_string(), "a fraction in (0, 1]");
    }
    Ok(())
}

/// `--device`, spelled as a recipe's `device` (checked, not opened: the trainer opens it).
fn parse_device_flag(s: &str) -> Result<Device> {
    parse_device_name(s).map_err(|e| match e {
        Error::Invalid { msg, .. } => Error::invalid("--device", msg),
        e => e,
    })
}

/// Reads the recipe at `path`, puts `device` (the `--device` flag) in place of its own, and
/// opens the device, so that a GPU that is not there is reported with the recipe's path before
/// anything is written.
fn recipe_on_device(path: &Path, device: Option<&str>) -> Result<Recipe> {
    let mut r = Recipe::from_file(path)?;
    if let Some(d) = device {
        r.device = parse_device_flag(d)?;
    }
    trainer::open_device(&r).map_err(|e| match e {
        Error::Device(msg) => Error::Device(format!("{}: {msg}", path.display())),
        e => e,
    })?;
    Ok(r)
}

/// Counts heap bytes so that `recycle bench` on the CPU reports each variant's peak, as the
/// GPU's allocator does on a device (`recycle_engine::memory`). Only the bench switches the
/// counting on; every other command pays one relaxed load per allocation.
#[global_allocator]
static HEAP: recycle_engine::memory::CountingAllocator = recycle_engine::memory::CountingAllocator;

fn main() -> ExitCode {
    // Reuse freed step buffers instead of faulting fresh pages in every step (see the doc of
    // `keep_freed_memory`: a fifth of a BERT-tiny step on the CPU). `RECYCLE_MALLOC=default`
    // leaves the allocator alone, to measure the difference.
    if std::env::var("RECYCLE_MALLOC").as_deref() != Ok("default") {
        recycle_engine::memory::keep_freed_memory();
    }
    let cli = Cli::parse();
    // SIGINT / SIGTERM stop a training run between steps, after a checkpoint.
    if let Err(e) = trainer::interrupt::install_signal_handlers() {
        eprintln!("warning: SIGINT/SIGTERM will end runs without a checkpoint: {e}");
    }
    let result = run(cli);
    let world = World::current();
    match result {
        Ok(()) => {
            finalize();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}{e}", world.prefix());
            // The other ranks may be waiting for this one in a collective: end them all.
            if let Some(g) = world.group.as_ref() {
                g.abort(1);
            }
            // Interrupted: the shell's convention, 128 + the signal's number.
            match trainer::interrupt::stop_requested() {
                Some(signal) => ExitCode::from(128u8.saturating_add(signal as u8)),
                None => ExitCode::FAILURE,
            }
        }
    }
}
