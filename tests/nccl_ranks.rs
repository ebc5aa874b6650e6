//! GPU ranks in separate processes, launched torchrun-style: `recycle-allreduce-check` started
//! N times with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`. The ranks
//! meet over TCP, rank 0's NCCL id reaches every rank, each makes its communicator and they
//! average a buffer in buckets; every rank must hold the mean, bit for bit the same.
//!
//! Under the mock CUDA (`docs/mockcuda.md`: one device per process, so every rank is
//! `LOCAL_RANK=0`, as on N machines of one GPU each) the ranks' NCCL meets across processes:
//! `LD_LIBRARY_PATH=$PWD/target/mockcuda RECYCLE_EXPECT_CUDA=1 RECYCLE_REQUIRE_NVCC=1 cargo test
//! -p recycle --features cuda --test nccl_ranks`. Where `cuda:0` does not open, each test checks
//! that every rank fails with the engine's account of what is missing;
//! `RECYCLE_EXPECT_CUDA=1` turns a missing device into a failure.

mod ranks_support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use ranks_support::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_recycle-allreduce-check");

/// Whether `cuda:0` opens; when it does not, the engine's message (and `RECYCLE_EXPECT_CUDA`
/// must be unset).
fn cuda_opens() -> Result<(), String> {
    match recycle_engine::cuda::device_info(0) {
        Ok(_) => Ok(()),
        Err(e) => {
            assert!(
                std::env::var_os("RECYCLE_EXPECT_CUDA").is_none(),
                "RECYCLE_EXPECT_CUDA is set, but cuda:0 does not open: {e} (build with \
                 `--features cuda` and put a driver, or the mock CUDA's folder, on LD_LIBRARY_PATH)"
            );
            Err(e.to_string())
        }
    }
}

/// A rank: its process, its stdout lines as they come, and its stderr when it ends.
struct Rank {
    child: Child,
    lines: mpsc::Receiver<String>,
    stdout: Vec<String>,
    stderr: thread::JoinHandle<String>,
}

fn start(rank: usize, world: usize, port: u16, args: &[&str]) -> Rank {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", "0")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        // A rank gone mid-collective is noticed at once (its socket closes); this bounds
        // the wait for one that hangs instead.
        .env("RECYCLE_MOCK_NCCL_TIMEOUT_S", "15")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut err = child.stderr.take().unwrap();
    let stderr = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    Rank {
        child,
        lines,
        stdout: Vec::new(),
        stderr,
    }
}

/// What a rank did: whether it exited 0, its stdout and stderr. Killed (and the test failed)
/// past the deadline: no rank may hang.
fn finish(mut r: Rank, deadline: Instant) -> (bool, String, String) {
    let status = loop {
        if let Some(s) = r.child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = r.child.kill();
            let _ = r.child.wait();
            panic!(
                "a rank was still running at the deadline; stdout: {:?}",
                r.stdout
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    r.stdout.extend(r.lines.try_iter());
    let err = r.stderr.join().unwrap();
    (status.success(), r.stdout.join("\n"), err)
}

/// Every rank fails cleanly where `cuda:0` does not open: rank 0 with the engine's message,
/// the others when rank 0 never serves them (unreachable, or gone while they waited for its
/// answer: a rank may connect between rank 0's failure and its exit).
fn check_clean_failure(engine: &str, world: usize) {
    let port = free_port();
    let args = ["--timeout-s", "1"];
    let ranks: Vec<Rank> = (0..world).map(|r| start(r, world, port, &args)).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    for (r, rank) in ranks.into_iter().enumerate() {
        let (ok, _, err) = finish(rank, deadline);
        assert!(!ok, "rank {r} succeeded without a device");
        if r == 0 {
            assert!(err.contains(engine), "rank 0: {err}\nvs {engine}");
        } else {
            assert!(
                err.contains(&format!("rank {r} could not reach rank 0"))
                    || err.contains(&format!("rank {r}: waiting for the answer")),
                "rank {r}: {err}"
            );
        }
    }
}

#[test]
fn ranks_in_processes_hold_the_same_mean() {
    if let Err(engine) = cuda_opens() {
        check_clean_failure(&engine, 2);
        return;
    }
    for (world, dtype, elements) in [(2, "f32", "300000"), (3, "bf16", "200001")] {
        let port = free_port();
        let args = [
            "--dtype",
            dtype,
            "--elements",
            elements,
            "--bucket",
            "65536",
            "--iters",
            "2",
            "--timeout-s",
            "20",
        ];
        let ranks: Vec<Rank> = (0..world).map(|r| start(r, world, port, &args)).collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut sums = Vec::new();
        for (r, rank) in ranks.into_iter().enumerate() {
            let (ok, out, err) = finish(rank, deadline);
            assert!(ok, "rank {r} of {world} ({dtype}) failed: {err}\n{out}");
            let line = out
                .lines()
                .find(|l| l.starts_with(&format!("rank {r} of {world}: mean ok")))
                .unwrap_or_else(|| panic!("rank {r}: no result line in {out}"));
            sums.push(line.rsplit(' ').next().unwrap().to_string());
        }
        assert!(
            sums.iter().all(|s| s == &sums[0]),
            "{world} ranks ({dtype}) hold different bits: checksums {sums:?}"
        );
    }
}

#[test]
fn a_killed_rank_makes_the_others_fail_naming_it() {
    if let Err(engine) = cuda_opens() {
        check_clean_failure(&engine, 3);
        return;
    }
    let (world, port) = (3, free_port());
    // Enough iterations that the others are still reducing when rank 2 is killed.
    let args = [
        "--elements",
        "4096",
        "--bucket",
        "1024",
        "--iters",
        "1000000",
        "--timeout-s",
        "20",
    ];
    let mut ranks: Vec<Rank> = (0..world).map(|r| start(r, world, port, &args)).collect();
    let mut victim = ranks.pop().unwrap();
    let seen = Instant::now() + Duration::from_secs(30);
    loop {
        match victim
            .lines
            .recv_timeout(seen.saturating_duration_since(Instant::now()))
        {
            Ok(l) if l.contains("iteration 1 ok") => break,
            Ok(l) => victim.stdout.push(l),
            Err(_) => {
                let _ = victim.child.kill();
                panic!(
                    "rank 2 never finished its first iteration: {:?}",
                    victim.stdout
                );
            }
        }
    }
    let killed_at = Instant::now();
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    for (r, rank) in ranks.into_iter().enumerate() {
        let (ok, out, err) = finish(rank, deadline);
        assert!(!ok, "rank {r} went on after rank 2 was killed: {out}");
        assert!(err.contains("rank 2 is gone"), "rank {r}: {err}");
        assert!(
            err.contains(&format!("rank {r} of 3")) && err.contains("aborted"),
            "rank {r}: {err}"
        );
    }
    // Noticed when the connection closed, not at a timeout.
    assert!(killed_at.elapsed() < Duration::from_secs(10));
}

/// A rank that passes the rendezvous but never makes its communicator (this test is rank 1 of
/// 2: it takes the NCCL id and stops there): rank 0's non-blocking `ncclCommInitRankConfig`
/// stays in progress, and rank 0 gives up at its own timeout (3 s, before the mock's 15 s),
/// aborts the half-made communicator and says why, naming itself.
#[test]
fn a_rank_that_never_joins_the_communicator_fails_rank_0_at_its_timeout() {
    let port = free_port();
    let rank0 = start(0, 2, port, &["--timeout-s", "3"]);
    let id = recycle::distributed::rendezvous::exchange(
        &format!("127.0.0.1:{port}"),
        1,
        2,
        Duration::from_secs(8),
        || Err("only rank 0 makes the id".to_string()),
    );
    let started = Instant::now();
    let (ok, out, err) = finish(rank0, started + Duration::from_secs(30));
    assert!(!ok, "rank 0 went on without rank 1: {out}");
    if let Err(engine) = cuda_opens() {
        // No id to hand out: rank 0 fails with the engine's message and tells rank 1.
        assert!(id.is_err(), "rank 1 received an id without a device");
        assert!(err.contains(&engine), "rank 0: {err}\nvs {engine}");
        return;
    }
    assert_eq!(id.unwrap().len(), 128);
    assert!(
        err.contains("rank 0 of 2") && err.contains("never joined") && err.contains("aborted"),
        "rank 0: {err}"
    );
    // Its own timeout, not the mock's.
    assert!(started.elapsed() < Duration::from_secs(12), "rank 0: {err}");
}
