//! `recycle train` on GPU ranks launched by `mpirun` (`docs/distributed.md`): MPI hands rank
//! 0's NCCL id to every rank and carries the run's small host collectives, NCCL averages the
//! gradients. A student distilled on two ranks against the same recipe in one process, and a
//! rank that dies. Needs `mpirun` and a build with `--features mpi,cuda`.
//!
//! Under the mock CUDA (`docs/mockcuda.md`: each process sees one device, so both ranks train
//! on `cuda:0` although Open MPI gives them local ranks 0 and 1):
//! `LD_LIBRARY_PATH=$PWD/target/mockcuda RECYCLE_EXPECT_CUDA=1 RECYCLE_REQUIRE_NVCC=1 cargo test
//! -p recycle --features mpi,cuda --test train_ranks_mpi_cuda`. Where `cuda:0` does not open,
//! each test checks that the launch fails at once with the engine's account of what is missing
//! and writes nothing; `RECYCLE_EXPECT_CUDA=1` turns a missing device into a failure.
#![cfg(all(feature = "mpi", feature = "cuda"))]

mod ranks_support;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use ranks_support::gpu::{cuda_opens, recipe, train_teacher, TOLERANCE};
use ranks_support::mpi::mpirun;
use ranks_support::{max_difference, temp_dir, text};
use recycle::recipe::Recipe;
use recycle::trainer::{self, RunOptions};

/// `mpirun -np 2 recycle train RECIPE` with `env`, within `limit`.
fn train_on_two(recipe: &Path, env: &[(&str, &str)], limit: Duration) -> (Output, bool) {
    let mut all = vec![
        ("RECYCLE_COLLECTIVE_TIMEOUT", "30"),
        // A rank gone mid-collective is noticed at once (its socket closes); this bounds the
        // wait for one that hangs instead.
        ("RECYCLE_MOCK_NCCL_TIMEOUT_S", "20"),
    ];
    all.extend_from_slice(env);
    mpirun(2, &["train", recipe.to_str().unwrap()], &all, limit)
}

/// Where `cuda:0` does not open: the launch fails within seconds (no rank waits for another)
/// with the engine's message, and writes no run.
fn check_clean_failure(engine: &str, out: &Path) {
    let student = recipe(out, "student", "cuda:0", None);
    let (o, in_time) = train_on_two(&student, &[], Duration::from_secs(30));
    let said = text(&o);
    assert!(in_time, "the launch hung without a device: {said}");
    assert!(!o.status.success(), "trained without a device: {said}");
    // Rank 1 may name cuda:1 (its local rank) where no driver says how many GPUs there are.
    let tail = engine.split_once(": ").map_or(engine, |(_, t)| t);
    assert!(said.contains(tail), "{said}\nvs {engine}");
    assert!(said.contains(" of 2: "), "no rank named itself: {said}");
    assert!(!out.join("student").exists(), "a failed rank wrote the run");
}

/// A teacher (on the CPU), then a student distilled from it on `cuda:0` in one process and on
/// two ranks under mpirun. The ranks compare a hash of their weights (over MPI) after every
/// step of this debug build and fail on a difference, so a run that succeeds ended with the
/// same bits on both; rank 0 alone wrote the run, whose final weights equal the one-process
/// run's within [`TOLERANCE`].
#[test]
fn two_gpu_ranks_under_mpirun_distill_to_the_weights_of_one_process() {
    let out = temp_dir("mpi-gpu-ranks", "match");
    if let Err(engine) = cuda_opens() {
        return check_clean_failure(&engine, &out);
    }
    let teacher = train_teacher(&out);
    let one = recipe(&out, "one", "cuda:0", Some(&teacher));
    trainer::run(&Recipe::from_file(&one).unwrap(), &RunOptions::default()).unwrap();

    let two = recipe(&out, "two", "cuda:0", Some(&teacher));
    let (o, in_time) = train_on_two(&two, &[], Duration::from_secs(60));
    let said = text(&o);
    assert!(in_time && o.status.success(), "{said}");
    assert!(said.contains("(2 ranks)"), "{said}");
    assert!(said.contains("data-parallel over 2 ranks"), "{said}");
    assert!(said.contains("on cuda:0"), "{said}");
    let log = std::fs::read_to_string(out.join("two/log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 4, "rank 0 alone logs: {log}");
    let d = max_difference(&out.join("one"), &out.join("two"));
    eprintln!(
        "two GPU ranks under mpirun against one process: largest difference {d:e} of the \
         largest weight"
    );
    assert!(d < TOLERANCE, "two ranks differ from one process by {d}");
}

/// Rank 1 exits abruptly after step 1 (no MPI shutdown): the run ends within the time limit,
/// well before the collective timeout, with a failure status, and rank 0's error or the
/// launcher's report names rank 1.
#[test]
fn a_gpu_rank_under_mpirun_that_dies_ends_the_run_naming_it() {
    let out = temp_dir("mpi-gpu-ranks", "dies");
    if let Err(engine) = cuda_opens() {
        return check_clean_failure(&engine, &out);
    }
    let teacher = train_teacher(&out);
    let student = recipe(&out, "student", "cuda:0", Some(&teacher));
    let started = Instant::now();
    let (o, in_time) = train_on_two(
        &student,
        &[("RECYCLE_TEST_EXIT_AT", "1:1")],
        Duration::from_secs(60),
    );
    let said = text(&o);
    assert!(in_time, "the run hung after rank 1 died: {said}");
    assert!(!o.status.success(), "{said}");
    assert!(said.contains("rank 1 of 2: exiting after step 1"), "{said}");
    // Rank 0's NCCL error (the mock notices the closed connection at once), or, when mpirun
    // ended rank 0 first, its report of the process that left without MPI's shutdown.
    let named = said.lines().any(|l| {
        let l = l.trim();
        l.contains("the one that stopped is rank 1")
            || (l.starts_with("Process name:") && l.ends_with(",1]"))
    });
    assert!(
        named,
        "neither rank 0 nor the launcher names rank 1: {said}"
    );
    assert!(started.elapsed() < Duration::from_secs(29), "{said}");
}
