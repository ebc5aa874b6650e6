//! Data-parallel training across processes on MPI (`docs/distributed.md`), on one machine:
//! `mpirun --oversubscribe -np 2 recycle train` with distillation against one process with the
//! same global batch, a resume from a one-process checkpoint on two ranks, and a rank that
//! dies. Needs an MPI launcher (`mpirun`) and a build with `--features mpi`.
#![cfg(feature = "mpi")]

mod ranks_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ranks_support::{max_difference, temp_dir, text};
use recycle::recipe::Recipe;
use recycle::trainer::{self, RunOptions};

/// A BERT small enough for a few steps in seconds, without dropout: a rank's shard then sees
/// exactly the computation the same rows see in one process.
fn write_config(dir: &Path) -> PathBuf {
    let path = dir.join("bert-config.json");
    std::fs::write(
        &path,
        r#"{"model_type": "bert", "hidden_act": "gelu", "vocab_size": 512, "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
            "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0}"#,
    )
    .unwrap();
    path
}

/// A recipe on the fixture fortunes: 8 steps of a global batch of 8 sequences; with
/// `teachers`, distilled from them with `strategy`.
fn recipe(out: &Path, name: &str, teachers: &[PathBuf], strategy: &str) -> PathBuf {
    let config = write_config(out);
    let distill = match teachers {
        [] => String::new(),
        t => format!(
            "[distill]\nteachers = [{}]\nstrategy = \"{strategy}\"\ntemperature = 2.0\nweight = 0.5\n",
            t.iter()
                .map(|p| format!("\"{}\"", p.display()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let text = format!(
        r#"
name = "{name}"
out_dir = "{out}"
[model]
kind = "bert"
config = "{config}"
[data]
dataset = "fortunes"
train_limit = 64
eval_limit = 16
seq_len = 32
vocab_size = 500
[train]
batch_size = 8
epochs = 1.0
evals = 2
checkpoint_every = 4
[optimizer]
kind = "adamw"
lr = 2e-3
warmup = 0.1
{distill}"#,
        out = out.display(),
        config = config.display()
    );
    let path = out.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// `mpirun -np 2 recycle ARGS`, killed after `limit`: its output, and whether it ended in time.
fn mpirun(args: &[&str], env: &[(&str, &str)], limit: Duration) -> (Output, bool) {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--oversubscribe", "-np", "2", env!("CARGO_BIN_EXE_recycle")])
        .args(args)
        // Open MPI refuses to start as root without these (CI containers run as root).
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        // One thread per rank: two ranks share the machine's cores.
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .expect("mpirun (Open MPI or MPICH) must be on PATH");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            return (child.wait_with_output().unwrap(), false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child.wait_with_output().unwrap(), true)
}

/// The summation order is the only difference between two ranks and one process here (no
/// dropout, no BatchNorm; each rank's loss is weighted by its share of the masked tokens): a
/// rank sums its half of the batch's gradient and the all-reduce adds the halves, where one
/// process sums the whole batch at once. Each step's gradients then differ in their last bits
/// (about 1e-7 relative); eight AdamW steps carried that to 1.6e-6 of the largest weight
/// (2026-12-07; 1.2e-7 for the resume below, 4 steps on two ranks). 1e-4 leaves room for other
/// CPUs' rounding while a step on the wrong rows or with the wrong weights (a change of the
/// gradient itself, not of its last bits) moves weights by about the learning rate, 2e-3.
const TOLERANCE: f32 = 1e-4;

/// A teacher, then a distilled student in one process and on two ranks: the two ranks end
/// every step with the same weights (checked by the ranks themselves at every step of this
/// debug build; a difference is an error and the run fails), and their final weights equal
/// the one-process run's within [`TOLERANCE`]; rank 0 alone wrote the run's files.
#[test]
fn two_ranks_distill_to_the_weights_of_one_process() {
    let out = temp_dir("distributed", "match");
    let teacher = recipe(&out, "teacher", &[], "single");
    trainer::run(
        &Recipe::from_file(&teacher).unwrap(),
        &RunOptions::default(),
    )
    .unwrap();
    let teachers = [out.join("teacher")];
    let one = recipe(&out, "one", &teachers, "single");
    trainer::run(&Recipe::from_file(&one).unwrap(), &RunOptions::default()).unwrap();

    let two = recipe(&out, "two", &teachers, "single");
    let (o, in_time) = mpirun(
        &["train", two.to_str().unwrap()],
        &[],
        Duration::from_secs(60),
    );
    assert!(in_time && o.status.success(), "{}", text(&o));
    let said = text(&o);
    assert!(said.contains("(2 ranks)"), "{said}");
    assert!(said.contains("data-parallel over 2 ranks"), "{said}");
    let log = std::fs::read_to_string(out.join("two/log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 8, "rank 0 alone logs: {log}");
    // The logged losses are the global batch's: those of one process, up to rounding.
    let losses = |run: &str| -> Vec<f64> {
        std::fs::read_to_string(out.join(run).join("log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let (l1, l2) = (losses("one"), losses("two"));
    assert_eq!(l1.len(), l2.len());
    for (a, b) in l1.iter().zip(&l2) {
        assert!(
            (a - b).abs() < 1e-4 * a.abs().max(1.0),
            "loss {a} in one process, {b} on two ranks"
        );
    }
    let d = max_difference(&out.join("one"), &out.join("two"));
    eprintln!("two ranks against one process: largest difference {d:e} of the largest weight");
    assert!(d < TOLERANCE, "two ranks differ from one process by {d}");
}

/// A one-process run stopped at step 4 resumes on two ranks (the same global batch) and ends
/// where the uninterrupted one-process run does, within [`TOLERANCE`].
#[test]
fn a_one_process_checkpoint_resumes_on_two_ranks() {
    let out = temp_dir("distributed", "resume");
    let whole = recipe(&out, "whole", &[], "single");
    trainer::run(&Recipe::from_file(&whole).unwrap(), &RunOptions::default()).unwrap();

    let split = recipe(&out, "split", &[], "single");
    let stopped = trainer::run(
        &Recipe::from_file(&split).unwrap(),
        &RunOptions {
            stop_after: Some(4),
            ..RunOptions::default()
        },
    );
    assert!(stopped.is_err(), "stopped after step 4 of 8");
    let (o, in_time) = mpirun(
        &["train", split.to_str().unwrap(), "--resume"],
        &[],
        Duration::from_secs(60),
    );
    assert!(in_time && o.status.success(), "{}", text(&o));
    let d = max_difference(&out.join("whole"), &out.join("split"));
    eprintln!("resumed on two ranks against one process: {d:e}");
    assert!(d < TOLERANCE, "resumed on two ranks: {d} from one process");
}

/// Rank 1 dies after step 2 (no MPI shutdown): the run ends within the time limit, not hung,
/// with a failure status and a report naming the rank. (Distilled with each rank drawing its
/// own teacher: the per-rank strategy runs under a launcher.)
#[test]
fn a_rank_that_dies_ends_the_run_naming_it() {
    let out = temp_dir("distributed", "dies");
    let teacher = recipe(&out, "teacher", &[], "single");
    trainer::run(
        &Recipe::from_file(&teacher).unwrap(),
        &RunOptions::default(),
    )
    .unwrap();
    let student = recipe(
        &out,
        "student",
        &[out.join("teacher")],
        "random-one-per-rank",
    );
    let (o, in_time) = mpirun(
        &["train", student.to_str().unwrap()],
        &[("RECYCLE_TEST_EXIT_AT", "1:2")],
        Duration::from_secs(60),
    );
    let said = text(&o);
    assert!(in_time, "the run hung after rank 1 died: {said}");
    assert!(!o.status.success(), "{said}");
    assert!(said.contains("rank 1 of 2: exiting after step 2"), "{said}");
    // The launcher's report of the process that ended without MPI's shutdown: Open MPI names
    // it `[[job,1],1]` (rank 1), MPICH `rank 1`.
    let named = said.lines().any(|l| {
        let l = l.trim();
        (l.starts_with("Process name:") && l.ends_with(",1]"))
            || (l.contains("rank 1") && !l.contains("exiting after step"))
    });
    assert!(named, "the launcher's report names rank 1: {said}");
}
