//! Data-parallel training across processes on MPI (`docs/distributed.md`), on one machine:
//! `mpirun --oversubscribe -np 2 recycle train` with distillation against one process with the
//! same global batch, a resume from a one-process checkpoint on two ranks, and a rank that
//! dies. Needs an MPI launcher (`mpirun`) and a build with `--features mpi`.
#![cfg(feature = "mpi")]

mod ranks_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use ranks_support::mpi::mpirun;
use ranks_support::{max_difference, temp_dir, text, weights};
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
    recipe_of_batch(out, name, teachers, strategy, 8)
}

/// [`recipe`] with a global batch of `batch` sequences (64 of them: 64 / `batch` steps).
fn recipe_of_batch(
    out: &Path,
    name: &str,
    teachers: &[PathBuf],
    strategy: &str,
    batch: usize,
) -> PathBuf {
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
batch_size = {batch}
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
        2,
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
        2,
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
        2,
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

/// Two ranks stopped mid-run (rank 0 dies after step 5, before that step's checkpoint, and
/// mpirun ends rank 1) resume on two ranks from the checkpoint of step 4 and end with the
/// weights of an uninterrupted two-rank run, bit for bit: the checkpoint holds the weights and
/// the optimizer's state exactly, the data order is a function of the step, and two ranks
/// reduce in the same order in both runs.
#[test]
fn two_ranks_stopped_mid_run_resume_on_two_ranks_bit_for_bit() {
    let out = temp_dir("distributed", "resume-same-n");
    let whole = recipe(&out, "whole", &[], "single");
    let (o, in_time) = mpirun(
        2,
        &["train", whole.to_str().unwrap()],
        &[],
        Duration::from_secs(60),
    );
    assert!(in_time && o.status.success(), "{}", text(&o));

    let split = recipe(&out, "split", &[], "single");
    let (o, in_time) = mpirun(
        2,
        &["train", split.to_str().unwrap()],
        &[("RECYCLE_TEST_EXIT_AT", "0:5")],
        Duration::from_secs(60),
    );
    let said = text(&o);
    assert!(in_time && !o.status.success(), "{said}");
    assert!(said.contains("rank 0 of 2: exiting after step 5"), "{said}");
    assert!(!out.join("split/final.safetensors").exists(), "{said}");
    let (o, in_time) = mpirun(
        2,
        &["train", split.to_str().unwrap(), "--resume"],
        &[],
        Duration::from_secs(60),
    );
    assert!(in_time && o.status.success(), "{}", text(&o));
    let log = std::fs::read_to_string(out.join("split/log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 8, "steps 1-4, then 5-8 again: {log}");
    let (a, b) = (weights(&out.join("whole")), weights(&out.join("split")));
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "{name} differs after the resume on two ranks");
    }
}

/// Three ranks, of which rank 2 dies after step 1: the run ends within the time limit with a
/// failure status, and the report names rank 2 (Open MPI's `[[job,1],2]`, MPICH's `rank 2`),
/// not one of the survivors.
#[test]
fn a_rank_that_dies_among_three_is_named() {
    let out = temp_dir("distributed", "dies-of-three");
    // A global batch of 6: two sequences per rank.
    let student = recipe_of_batch(&out, "student", &[], "single", 6);
    let (o, in_time) = mpirun(
        3,
        &["train", student.to_str().unwrap()],
        &[("RECYCLE_TEST_EXIT_AT", "2:1")],
        Duration::from_secs(60),
    );
    let said = text(&o);
    assert!(in_time, "the run hung after rank 2 died: {said}");
    assert!(!o.status.success(), "{said}");
    assert!(said.contains("rank 2 of 3: exiting after step 1"), "{said}");
    let names = |r: usize| {
        said.lines().any(|l| {
            let l = l.trim();
            (l.starts_with("Process name:") && l.ends_with(&format!(",{r}]")))
                || (l.contains(&format!("rank {r}")) && !l.contains("exiting after step"))
        })
    };
    assert!(names(2), "the report names rank 2: {said}");
    let reported = |r: usize| {
        said.lines()
            .any(|l| l.trim().starts_with("Process name:") && l.trim().ends_with(&format!(",{r}]")))
    };
    assert!(
        !reported(0) && !reported(1),
        "a survivor is reported as the one that died: {said}"
    );
}
