//! The whole pipeline on a small subset: sweep → distill → report, with the report's numbers
//! checked against the logs the trainer wrote; resume to bit-identical weights; schedules and
//! strategies counted in teacher forwards; a diverging run stopped with a clear error.
//! The data are small generated stand-ins for Fashion-MNIST and the fortunes, written once by
//! `use_fixture_data` and found through `RECYCLE_FASHION_MNIST_DIR` and `RECYCLE_TEXT_DIR`, as
//! a user's data would be.

use std::path::{Path, PathBuf};

use recycle::data::test_support::use_fixture_data;
use recycle::experiments::demo::{run_demo, DemoKnobs, DemoPreset, DemoTask};
use recycle::experiments::{RunLog, RunSummary};
use recycle::recipe::Recipe;
use recycle::trainer::{self, RunOptions, Trainer};
use recycle_engine::Device;

/// A fresh output folder; first (once per process) the fixture data sets, which every test
/// here reads through the recipe's default data location.
fn temp_dir(tag: &str) -> PathBuf {
    use_fixture_data(Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap();
    let d = std::env::temp_dir().join(format!("recycle-pipeline-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tiny_recipe(out: &Path, name: &str) -> Recipe {
    Recipe::from_toml(&tiny_toml(out, name)).unwrap()
}

fn tiny_toml(out: &Path, name: &str) -> String {
    format!(
        r#"
name = "{name}"
out_dir = "{}"
[model]
kind = "resnet"
width = 0.0625
[data]
dataset = "fashion-mnist"
train_limit = 288
eval_limit = 128
[train]
batch_size = 32
epochs = 1.0
evals = 2
checkpoint_every = 2
[optimizer]
kind = "sgdw"
lr = 0.1
weight_decay = 5e-4
warmup = 0.1
"#,
        out.display()
    )
}

#[test]
fn sweep_distill_report_numbers_match_the_logs() {
    let out = temp_dir("demo");
    let opts = RunOptions {
        overwrite: true,
        ..RunOptions::default()
    };
    let report = run_demo(
        DemoTask::Image,
        DemoPreset::Tiny,
        &out,
        DemoKnobs::default(),
        &opts,
    )
    .unwrap();
    assert!(out.join("report/report.md").exists());
    assert!(out.join("report/accuracy_vs_time.png").exists());
    assert_eq!(
        report.rows.len(),
        2 + 2 + 3,
        "2 sweep points, 2 baselines, 3 students"
    );
    // The single teacher is the sweep point best on validation (the test metric plays no part).
    let sweep: Vec<_> = report.rows.iter().filter(|r| r.method == "sweep").collect();
    let best = sweep
        .iter()
        .max_by(|a, b| {
            a.final_validation
                .unwrap()
                .total_cmp(&b.final_validation.unwrap())
        })
        .unwrap();
    let kl = report.rows.iter().find(|r| r.method == "kd-kl-t1").unwrap();
    assert_eq!(kl.teachers, vec![best.dir.display().to_string()]);
    for row in &report.rows {
        let validations = RunLog::read(row.dir.join("log.jsonl"))
            .unwrap()
            .records
            .iter()
            .filter(|r| r.eval.is_some())
            .map(|r| r.validation)
            .collect::<Vec<_>>();
        assert!(validations.iter().all(Option::is_some), "{}", row.run);
        assert_eq!(row.final_validation, *validations.last().unwrap());
    }
    for row in &report.rows {
        let log = RunLog::read(row.dir.join("log.jsonl")).unwrap();
        let last = log.records.last().unwrap();
        let evals: Vec<(f64, f32)> = log
            .records
            .iter()
            .filter_map(|r| r.eval.map(|e| (r.train_seconds, e)))
            .collect();
        assert_eq!(row.final_eval, evals.last().unwrap().1, "{}", row.run);
        assert_eq!(row.train_seconds, last.train_seconds, "{}", row.run);
        assert_eq!(row.steps, last.step);
        assert_eq!(row.teacher_forwards, last.teacher_forwards);
        // One teacher forward per step for every distilled method here (single, random-one),
        // run or replayed from the KL students' shared cache: the KL student records every
        // step, RandomOne replays those where it draws the same teacher.
        let replayed = row.cache_reads.map_or(0, |c| c.forwards);
        let expected_forwards = if row.method.starts_with("kd-") {
            row.steps
        } else {
            0
        };
        assert_eq!(
            row.teacher_forwards + replayed,
            expected_forwards,
            "{}",
            row.run
        );
        if row.method == "kd-kl-t1" {
            assert_eq!(replayed, 0, "the first KL student records");
        }
        if row.method.starts_with("kd-random-one") {
            assert!(replayed > 0, "RandomOne replays the best teacher's steps");
        }
        assert_eq!(
            row.cache_reads.is_some(),
            !row.method.starts_with("kd-mse") && row.method.starts_with("kd-"),
            "{}",
            row.run
        );
        for t in &row.vs_baselines {
            let first = evals.iter().find(|(_, e)| *e >= t.target).map(|(s, _)| *s);
            assert_eq!(t.seconds, first, "{} vs {}", row.run, t.baseline);
            if let (Some(s), Some(speedup)) = (t.seconds, t.speedup) {
                assert!((speedup - t.baseline_seconds / s).abs() < 1e-9);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_trainer_stepped_in_chunks_matches_run_and_its_checkpoints_resume() {
    let out = temp_dir("stepped");
    let whole = trainer::run(&tiny_recipe(&out, "whole"), &RunOptions::default()).unwrap();

    let recipe = tiny_recipe(&out, "stepped");
    let mut t = Trainer::new(&recipe, &RunOptions::default()).unwrap();
    assert_eq!((t.current_step(), t.total_steps()), (0, 8));
    let m = t.metrics();
    assert!(m.ce.is_none() && m.last_eval.is_none() && m.lr.is_none());
    assert_eq!(t.run_steps(3).unwrap(), 3);
    let m = t.metrics();
    assert_eq!((m.step, m.samples), (3, 96));
    assert!(m.ce.unwrap() > 0.0 && m.loss == m.ce && m.kd.is_none());
    assert!(m.wall_seconds >= m.train_seconds && m.train_seconds > 0.0);
    let manual = out.join("manual.safetensors");
    t.save_checkpoint(&manual).unwrap();
    assert_eq!(t.run_steps(100).unwrap(), 5, "only the 5 steps left run");
    assert!(t.is_done() && t.step().is_err());
    assert_eq!(t.metrics().last_eval, Some(whole.final_eval));
    let summary = t.finish().unwrap();
    assert_eq!(summary.final_eval, whole.final_eval);
    let a = std::fs::read(out.join("whole/final.safetensors")).unwrap();
    let b = std::fs::read(out.join("stepped/final.safetensors")).unwrap();
    assert!(a == b, "stepped weights differ from run()'s");

    // The checkpoint saved at step 3, put in place of the run's own, resumes from step 3 to
    // the same weights.
    let resumed = tiny_recipe(&out, "resumed");
    std::fs::create_dir_all(out.join("resumed")).unwrap();
    std::fs::copy(&manual, out.join("resumed/checkpoint.safetensors")).unwrap();
    std::fs::copy(out.join("stepped/log.jsonl"), out.join("resumed/log.jsonl")).unwrap();
    let opts = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    let t = Trainer::new(&resumed, &opts).unwrap();
    assert_eq!(t.current_step(), 3);
    drop(t);
    trainer::run(&resumed, &opts).unwrap();
    let c = std::fs::read(out.join("resumed/final.safetensors")).unwrap();
    assert!(a == c, "weights resumed from save_checkpoint differ");
}

#[test]
fn resume_reaches_bit_identical_weights() {
    let out = temp_dir("resume");
    let whole = tiny_recipe(&out, "whole");
    trainer::run(&whole, &RunOptions::default()).unwrap();

    let split = tiny_recipe(&out, "split");
    let stopped = trainer::run(
        &split,
        &RunOptions {
            stop_after: Some(3),
            ..RunOptions::default()
        },
    );
    let err = stopped.unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
    trainer::run(
        &split,
        &RunOptions {
            resume: true,
            ..RunOptions::default()
        },
    )
    .unwrap();
    let a = std::fs::read(out.join("whole/final.safetensors")).unwrap();
    let b = std::fs::read(out.join("split/final.safetensors")).unwrap();
    assert!(
        a == b,
        "resumed weights differ from the uninterrupted run's"
    );
    let la = RunLog::read(out.join("whole/log.jsonl")).unwrap();
    let lb = RunLog::read(out.join("split/log.jsonl")).unwrap();
    assert_eq!(la.records.len(), lb.records.len());
    for (x, y) in la.records.iter().zip(&lb.records) {
        assert_eq!(
            (x.step, x.loss, x.eval, x.validation),
            (y.step, y.loss, y.eval, y.validation)
        );
        assert_eq!(x.eval.is_some(), x.validation.is_some(), "step {}", x.step);
    }
    // The resumed run rebuilt the same validation split: same final validation metric.
    let (sa, sb) = (
        RunSummary::read(out.join("whole")).unwrap(),
        RunSummary::read(out.join("split")).unwrap(),
    );
    assert!(sa.final_validation.is_some());
    assert_eq!(sa.final_validation, sb.final_validation);
    // A second start without --resume refuses to clobber the run.
    let err = trainer::run(&whole, &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--resume") && err.contains("--overwrite"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn off_schedule_steps_run_no_teacher_and_ensembles_run_k() {
    let out = temp_dir("schedule");
    let teacher = tiny_recipe(&out, "teacher");
    trainer::run(&teacher, &RunOptions::default()).unwrap();
    let mut other = tiny_recipe(&out, "teacher2");
    other.seed = 5;
    trainer::run(&other, &RunOptions::default()).unwrap();
    let teachers = format!(
        "[\"{}\", \"{}\"]",
        out.join("teacher").display(),
        out.join("teacher2").display()
    );
    for (name, extra, expected) in [
        ("half", "stop = 0.5", 4u64), // 8 steps, distilling the first 4
        ("every2", "every = 2", 4),   // steps 0, 2, 4, 6
        ("ensemble", "strategy = \"ensemble:2\"", 16),
    ] {
        let mut text = tiny_recipe(&out, name).to_toml().unwrap();
        text.push_str(&format!("\n[distill]\nteachers = {teachers}\n{extra}\n"));
        let r = Recipe::from_toml(&text).unwrap();
        let s = trainer::run(&r, &RunOptions::default()).unwrap();
        assert_eq!(s.steps, 8);
        assert_eq!(s.teacher_forwards, expected, "{name}");
    }
    let summary = RunSummary::read(out.join("ensemble")).unwrap();
    assert_eq!(summary.teachers.len(), 2);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_diverging_run_stops_with_an_error_naming_the_step() {
    let out = temp_dir("nan");
    let mut r = tiny_recipe(&out, "diverge");
    r.optimizer.lr = 1e30;
    r.optimizer.warmup = 0.0;
    let err = trainer::run(&r, &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("stopped at step"), "{err}");
    assert!(err.contains("checkpoint"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn mlm_demo_runs_end_to_end_with_early_stopped_distillation() {
    let out = temp_dir("mlm");
    let opts = RunOptions {
        overwrite: true,
        ..RunOptions::default()
    };
    let report = run_demo(
        DemoTask::Mlm,
        DemoPreset::Tiny,
        &out,
        DemoKnobs::default(),
        &opts,
    )
    .unwrap();
    assert_eq!(
        report.rows.len(),
        2 + 2 + 4,
        "2 sweep points, 2 baselines, 4 students"
    );
    let early = report
        .rows
        .iter()
        .find(|r| r.method.contains("until0.3"))
        .expect("the early-stopped student");
    let (first, end) = recycle::distill::KdSchedule {
        start: 0.0,
        stop: 0.3,
        every: 1,
    }
    .window(early.steps);
    // The early student shares the KL student's cache: it replays every step it distils and
    // runs no teacher forward.
    assert_eq!(early.teacher_forwards, 0, "every distilled step replayed");
    let reads = early
        .cache_reads
        .expect("the early student reads the cache");
    assert_eq!(
        (reads.steps, reads.forwards),
        (end - first, end - first),
        "teachers only in the first 30%"
    );
    assert!(reads.rows > 0 && reads.bytes > reads.rows);
    assert!(report.rows.iter().all(|r| r.metric == "mlm-accuracy"));

    // The report's account of the cache, from the runs' summary.json files: the replays of
    // every reader, priced at the recorders' measured teacher seconds per forward.
    let summaries: Vec<RunSummary> = report
        .rows
        .iter()
        .map(|r| {
            let text = std::fs::read_to_string(r.dir.join("summary.json")).unwrap();
            serde_json::from_str(&text).unwrap()
        })
        .collect();
    let early_summary = summaries.iter().find(|s| s.name == early.run).unwrap();
    assert_eq!(early_summary.cache_reads, Some(reads));
    let (mut replayed, mut recorded_forwards, mut recorded_seconds) = (0, 0, 0.0);
    for s in &summaries {
        if let Some(c) = s.cache_reads {
            replayed += c.forwards;
            if s.teacher_forwards > 0 {
                recorded_forwards += s.teacher_forwards;
                recorded_seconds += s.teacher_seconds.expect("a recorder's teacher time");
            }
        }
    }
    let saving = report.teacher_cache.as_ref().expect("the cache's account");
    assert_eq!(saving.reads.forwards, replayed);
    assert_eq!(saving.recorded_forwards, recorded_forwards);
    assert!(recorded_forwards > 0 && recorded_seconds > 0.0);
    let saved = replayed as f64 * recorded_seconds / recorded_forwards as f64;
    assert!((saving.seconds_saved.unwrap() - saved).abs() <= 1e-9 * saved);
    let md = std::fs::read_to_string(out.join("report/report.md")).unwrap();
    assert!(md.contains("## Teacher cache"), "{md}");
    assert!(
        md.contains(&format!("{replayed} teacher forwards replayed")),
        "{md}"
    );
    assert!(
        md.contains(&format!("the cache saved {saved:.1} s of teacher time")),
        "{md}"
    );
    assert!(
        md.contains(&format!("{} (teacher cache)", early.run)),
        "{md}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// `device = "cuda:0"` where the GPU cannot be used (this machine and CI: no driver, or a build
/// without the CUDA backend) fails before anything is written, with the engine's account of
/// what is missing, the run and the setting; the same run then trains on the CPU without
/// `--overwrite`. Where a GPU is usable, the run trains there, its summary names the GPU, and a
/// run stopped and resumed there reaches the same weights.
#[test]
fn a_gpu_recipe_without_a_usable_gpu_fails_before_writing_anything() {
    let out = temp_dir("gpu");
    let mut r = tiny_recipe(&out, "gpu");
    r.device = Device::Cuda(0);
    let result = trainer::run(&r, &RunOptions::default());
    match recycle_engine::cuda::device_info(0) {
        Ok(info) => {
            let s = result.unwrap();
            assert_eq!(s.device, Some(format!("cuda:0 {}", info.name)));
            assert!((0.0..=1.0).contains(&s.final_eval));
            // No op adds with atomics: a run resumed on the GPU repeats the uninterrupted one.
            let mut split = tiny_recipe(&out, "gpu-split");
            split.device = Device::Cuda(0);
            let stop = RunOptions {
                stop_after: Some(3),
                ..RunOptions::default()
            };
            assert!(trainer::run(&split, &stop).is_err());
            let resume = RunOptions {
                resume: true,
                ..RunOptions::default()
            };
            trainer::run(&split, &resume).unwrap();
            let a = std::fs::read(out.join("gpu/final.safetensors")).unwrap();
            let b = std::fs::read(out.join("gpu-split/final.safetensors")).unwrap();
            assert!(a == b, "weights resumed on the GPU differ");
        }
        Err(engine) => {
            let err = result.unwrap_err().to_string();
            let engine = match engine {
                recycle_engine::Error::Device(m) => m,
                e => panic!("the probe's error is not a device error: {e}"),
            };
            // The engine's message, whole: what is missing and what to do.
            assert!(err.contains(&engine), "{err}\nvs {engine}");
            assert!(
                ["no CUDA backend", "no NVIDIA driver found", "sees no GPU"]
                    .iter()
                    .any(|m| engine.contains(m)),
                "{engine}"
            );
            assert!(
                err.contains("run `gpu`") && err.contains("device = \"cuda:0\""),
                "{err}"
            );
            assert!(
                !out.join("gpu").exists(),
                "a run that could not open its device wrote its directory"
            );
            r.device = Device::Cpu;
            let s = trainer::run(&r, &RunOptions::default()).unwrap();
            assert_eq!(s.device.as_deref(), Some("cpu"));
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// `device = "cpu"` spelled out trains to the same bytes as a recipe without it, and the
/// summary records the device.
#[test]
fn an_explicit_cpu_device_equals_the_default_bit_for_bit() {
    let out = temp_dir("cpu");
    let default = tiny_recipe(&out, "default");
    assert_eq!(default.device, Device::Cpu);
    let s = trainer::run(&default, &RunOptions::default()).unwrap();
    assert_eq!(s.device.as_deref(), Some("cpu"));
    let text = tiny_toml(&out, "explicit");
    assert!(!text.contains("device"), "{text}");
    let explicit = Recipe::from_toml(&format!("device = \"cpu\"\n{text}")).unwrap();
    let e = trainer::run(&explicit, &RunOptions::default()).unwrap();
    assert_eq!(e.final_eval, s.final_eval);
    let a = std::fs::read(out.join("default/final.safetensors")).unwrap();
    let b = std::fs::read(out.join("explicit/final.safetensors")).unwrap();
    assert!(
        a == b,
        "device = \"cpu\" trained other weights than the default"
    );
    let la = RunLog::read(out.join("default/log.jsonl")).unwrap();
    let lb = RunLog::read(out.join("explicit/log.jsonl")).unwrap();
    for (x, y) in la.records.iter().zip(&lb.records) {
        assert_eq!((x.step, x.loss, x.eval), (y.step, y.loss, y.eval));
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// `activations = "bf16"` on the CPU (ops widen bf16 to f32, so only the values cast to bf16
/// are rounded): a plain run and a student distilled from an f32 teacher both train (the loss
/// falls), the rounding shows in the losses, and the weights written stay f32.
#[test]
fn bf16_activations_train_on_the_cpu() {
    let out = temp_dir("bf16");
    let long = |name: &str, extra: &str| {
        Recipe::from_toml(&format!(
            "activations = \"bf16\"\n{}{extra}",
            tiny_toml(&out, name).replace("epochs = 1.0", "epochs = 2.0")
        ))
        .unwrap()
    };
    let mut f32_run = long("f32", "");
    f32_run.activations = recycle::recipe::Activations::F32;
    trainer::run(&f32_run, &RunOptions::default()).unwrap();
    let teacher = format!(
        "\n[distill]\nteachers = [\"{}\"]\n",
        out.join("f32").display()
    );
    for (name, extra) in [("bf16", ""), ("bf16-kd", teacher.as_str())] {
        let r = long(name, extra);
        assert_eq!(r.activations.dtype(), recycle_engine::DType::BF16);
        let s = trainer::run(&r, &RunOptions::default()).unwrap();
        assert!((0.0..=1.0).contains(&s.final_eval), "{name}");
        let log = RunLog::read(out.join(name).join("log.jsonl")).unwrap();
        let losses: Vec<f32> = log.records.iter().map(|r| r.loss).collect();
        assert_eq!(losses.len(), 16);
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        assert!(
            mean(&losses[12..]) < mean(&losses[..4]) - 0.1,
            "{name}: the loss did not fall: {losses:?}"
        );
        if extra.is_empty() {
            let f32_log = RunLog::read(out.join("f32/log.jsonl")).unwrap();
            assert!(
                f32_log
                    .records
                    .iter()
                    .zip(&log.records)
                    .any(|(a, b)| a.loss != b.loss),
                "bf16 activations changed nothing"
            );
        } else {
            assert_eq!(s.teacher_forwards, 16);
        }
        let ckpt =
            recycle_engine::checkpoint::load(&out.join(name).join("final.safetensors")).unwrap();
        assert!(ckpt
            .tensors
            .iter()
            .all(|(_, t)| t.dtype() != recycle_engine::DType::BF16));
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// The validation split comes out of the training data: the train set shrinks by the recipe's
/// fraction, and a fraction of 0 keeps no validation split (and the run logs none).
#[test]
fn the_validation_split_is_held_out_of_the_training_data() {
    let out = temp_dir("validation");
    let recipe = tiny_recipe(&out, "held-out");
    assert_eq!(recipe.data.validation_fraction, 0.1, "the default");
    let data = trainer::TaskData::load(&recipe).unwrap();
    assert_eq!((data.train_len(), data.validation_len()), (259, 29));

    let mut none = recipe.clone();
    none.data.validation_fraction = 0.0;
    let data = trainer::TaskData::load(&none).unwrap();
    assert_eq!((data.train_len(), data.validation_len()), (288, 0));
    none.name = "no-validation".into();
    let s = trainer::run(&none, &RunOptions::default()).unwrap();
    assert_eq!(s.final_validation, None);
    assert_eq!(s.majority_floor.map(|f| f > 0.0 && f < 0.5), Some(true));

    let bad = tiny_toml(&out, "bad").replace(
        "eval_limit = 128",
        "eval_limit = 128\nvalidation_fraction = 0.7",
    );
    let err = Recipe::from_toml(&bad).unwrap_err().to_string();
    assert!(err.contains("data.validation_fraction 0.7"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}
