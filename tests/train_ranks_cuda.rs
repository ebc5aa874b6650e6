//! `recycle train` on GPU ranks in separate processes, launched torchrun-style (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`; `docs/distributed.md`): a student
//! distilled on two ranks against the same recipe in one process, and a rank that dies.
//!
//! Under the mock CUDA (`docs/mockcuda.md`: one device per process, so both ranks are
//! `LOCAL_RANK=0`, as on two machines of one GPU each):
//! `LD_LIBRARY_PATH=$PWD/target/mockcuda RECYCLE_EXPECT_CUDA=1 RECYCLE_REQUIRE_NVCC=1 cargo test
//! -p recycle --features cuda --test train_ranks_cuda`. Where `cuda:0` does not open, each
//! test checks that every rank fails at once with the engine's account of what is missing;
//! `RECYCLE_EXPECT_CUDA=1` turns a missing device into a failure.
#![cfg(feature = "cuda")]

mod ranks_support;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ranks_support::gpu::{cuda_opens, recipe, train_teacher, TOLERANCE};
use ranks_support::{free_port, max_difference, temp_dir, text};
use recycle::recipe::Recipe;
use recycle::trainer::{self, RunOptions};

/// Rank `rank` of 2 of `recycle train RECIPE`, torchrun-style.
fn start(rank: usize, port: u16, recipe: &Path, env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_recycle"));
    cmd.args(["train", recipe.to_str().unwrap()])
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", "0")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RECYCLE_COLLECTIVE_TIMEOUT", "30")
        // A rank gone mid-collective is noticed at once (its socket closes); this bounds the
        // wait for one that hangs instead.
        .env("RECYCLE_MOCK_NCCL_TIMEOUT_S", "20")
        // Two ranks share the machine's cores.
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// Both ranks' output, in rank order. A rank still running at the deadline is killed and the
/// test fails: no rank may hang.
fn finish(ranks: Vec<Child>, limit: Duration) -> Vec<Output> {
    let deadline = Instant::now() + limit;
    let mut ranks: Vec<Option<Child>> = ranks.into_iter().map(Some).collect();
    loop {
        let mut running = 0;
        for c in ranks.iter_mut().flatten() {
            running += c.try_wait().unwrap().is_none() as usize;
        }
        if running == 0 {
            break;
        }
        if Instant::now() > deadline {
            for c in ranks.iter_mut().flatten() {
                let _ = c.kill();
            }
            let said: Vec<String> = ranks
                .iter_mut()
                .map(|c| text(&c.take().unwrap().wait_with_output().unwrap()))
                .collect();
            panic!("a rank was still running after {limit:?}: {said:#?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ranks
        .iter_mut()
        .map(|c| c.take().unwrap().wait_with_output().unwrap())
        .collect()
}

/// Where `cuda:0` does not open: both ranks fail at once (before they would wait for each
/// other) with the engine's message, each naming itself.
fn check_clean_failure(engine: &str, out: &Path) {
    let student = recipe(out, "student", "cuda:0", None);
    let port = free_port();
    let ranks = (0..2).map(|r| start(r, port, &student, &[])).collect();
    for (r, o) in finish(ranks, Duration::from_secs(20)).iter().enumerate() {
        let said = text(o);
        assert!(
            !o.status.success(),
            "rank {r} trained without a device: {said}"
        );
        assert!(said.contains(engine), "rank {r}: {said}\nvs {engine}");
        assert!(said.contains(&format!("rank {r} of 2")), "rank {r}: {said}");
    }
    assert!(!out.join("student").exists(), "a failed rank wrote the run");
}

/// A teacher (on the CPU), then a student distilled from it on `cuda:0` in one process and on
/// two ranks. The ranks compare a hash of their weights after every step of this debug build
/// and fail on a difference, so a run that succeeds ended with the same bits on both; rank 0
/// alone wrote the run, whose final weights equal the one-process run's within [`TOLERANCE`].
#[test]
fn two_gpu_ranks_distill_to_the_weights_of_one_process() {
    let out = temp_dir("gpu-ranks", "match");
    if let Err(engine) = cuda_opens() {
        return check_clean_failure(&engine, &out);
    }
    let teacher = train_teacher(&out);
    let one = recipe(&out, "one", "cuda:0", Some(&teacher));
    trainer::run(&Recipe::from_file(&one).unwrap(), &RunOptions::default()).unwrap();

    let two = recipe(&out, "two", "cuda:0", Some(&teacher));
    let port = free_port();
    let ranks = (0..2).map(|r| start(r, port, &two, &[])).collect();
    let outputs = finish(ranks, Duration::from_secs(90));
    for (r, o) in outputs.iter().enumerate() {
        assert!(o.status.success(), "rank {r} failed: {}", text(o));
    }
    let said = text(&outputs[0]);
    assert!(said.contains("(2 ranks)"), "{said}");
    assert!(said.contains("data-parallel over 2 ranks"), "{said}");
    assert!(
        !text(&outputs[1]).contains("(2 ranks)"),
        "rank 1 printed the summary"
    );
    let log = std::fs::read_to_string(out.join("two/log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 4, "rank 0 alone logs: {log}");
    let d = max_difference(&out.join("one"), &out.join("two"));
    eprintln!("two GPU ranks against one process: largest difference {d:e} of the largest weight");
    assert!(d < TOLERANCE, "two ranks differ from one process by {d}");
}

/// Rank 1 exits abruptly after step 1: rank 0, waiting in the next step's all-reduce, fails
/// within the time limit (not at a timeout) with an error that names rank 1.
#[test]
fn a_gpu_rank_that_dies_ends_the_other_naming_it() {
    let out = temp_dir("gpu-ranks", "dies");
    if let Err(engine) = cuda_opens() {
        return check_clean_failure(&engine, &out);
    }
    let teacher = train_teacher(&out);
    let student = recipe(&out, "student", "cuda:0", Some(&teacher));
    let port = free_port();
    let exit = [("RECYCLE_TEST_EXIT_AT", "1:1")];
    let started = Instant::now();
    let ranks = (0..2).map(|r| start(r, port, &student, &exit)).collect();
    let outputs = finish(ranks, Duration::from_secs(60));
    let (zero, one) = (text(&outputs[0]), text(&outputs[1]));
    assert!(one.contains("rank 1 of 2: exiting after step 1"), "{one}");
    assert!(!outputs[0].status.success(), "rank 0 went on: {zero}");
    assert!(zero.contains("rank 0 of 2"), "{zero}");
    let error = zero
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or("");
    assert!(
        error.contains("rank 0 of 2") && error.contains("the one that stopped is rank 1"),
        "rank 0's error does not name rank 1: {zero}"
    );
    // Noticed when the connection closed, well before the collective timeout (30 s).
    assert!(started.elapsed() < Duration::from_secs(29), "{zero}");
}
