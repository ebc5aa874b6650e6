//! Killed runs: `recycle train` is killed with SIGKILL at seeded random moments (plain random
//! delays, and moments the test waits for: a checkpoint written but not yet renamed, an
//! evaluation), then resumed, several times over each run. After every kill no file of the run
//! is partial (the checkpoint loads, the log reads), at most one checkpoint interval of steps
//! is lost, and every finished run's weights equal an uninterrupted run's bit for bit. SIGTERM
//! and SIGINT stop a run with a checkpoint and a clean exit.
//!
//! The killed processes run with `RECYCLE_TEST_SLOW_MS` set (see
//! `recycle_engine::checkpoint::test_pause`), which announces those moments on stderr and
//! stretches them so that a kill lands inside them.

mod reliability_support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use recycle::experiments::RunLog;
use reliability_support::*;

/// A small deterministic generator (xorshift64*), so that a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// When a trial kills the process.
#[derive(Debug, Clone, Copy)]
enum Moment {
    /// This long after it started.
    After(Duration),
    /// While its `n`-th checkpoint write of this process sits between write and rename.
    CheckpointWrite(u64),
    /// During its `n`-th evaluation.
    Evaluation(u64),
}

/// Starts `recycle train` slowed down, with its stderr lines forwarded to a channel.
fn spawn_slow(args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = recycle(args)
        .env("RECYCLE_TEST_SLOW_MS", "30")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits for `moment` and kills `child` then; returns whether the kill happened before the
/// process ended by itself.
fn kill_at(child: &mut Child, rx: &mpsc::Receiver<String>, moment: Moment) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (marker, mut n) = match moment {
        Moment::After(d) => {
            let until = Instant::now() + d;
            while Instant::now() < until {
                if child.try_wait().unwrap().is_some() {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            ("", 0)
        }
        Moment::CheckpointWrite(n) => ("recycle-test-pause: checkpoint write", n),
        Moment::Evaluation(n) => ("recycle-test-pause: evaluation", n),
    };
    while n > 0 {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(line) if line.starts_with(marker) => n -= 1,
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if child.try_wait().unwrap().is_some() {
                    return false;
                }
                assert!(Instant::now() < deadline, "no {marker} within a minute");
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return false,
        }
    }
    if child.try_wait().unwrap().is_some() {
        return false;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    true
}

/// What a kill left: every file reads whole, and the checkpoint is at most one checkpoint
/// interval behind the last logged step. Returns the checkpoint's step (0 without one).
fn check_after_kill(run: &Path, moment: Moment) -> u64 {
    let ckpt = run.join("checkpoint.safetensors");
    let saved = if ckpt.exists() {
        checkpoint_step(&ckpt)
    } else {
        0
    };
    let log = run.join("log.jsonl");
    let logged = if log.exists() {
        RunLog::read(&log)
            .unwrap_or_else(|e| panic!("after a kill at {moment:?} the log does not read: {e}"))
            .records
            .last()
            .map_or(0, |r| r.step)
    } else {
        0
    };
    assert!(
        logged <= saved + CHECKPOINT_EVERY,
        "kill at {moment:?}: logged step {logged}, checkpoint at {saved}: more than one \
         checkpoint interval ({CHECKPOINT_EVERY} steps) lost"
    );
    saved
}

#[test]
fn sigkill_at_random_moments_then_resume_loses_nothing() {
    let scratch = Scratch::new("kill");
    let out = scratch.path();
    let whole = write_recipe(out, "whole");
    let o = run_recycle(&["train", whole.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let expected = std::fs::read(out.join("whole/final.safetensors")).unwrap();

    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let (chains, kills_per_chain) = (6, 5);
    let (mut kills, mut at_checkpoint, mut at_eval) = (0, 0, 0);
    for chain in 0..chains {
        let name = format!("killed{chain}");
        let recipe = write_recipe(out, &name);
        let recipe = recipe.to_str().unwrap();
        let run = out.join(&name);
        for attempt in 0..kills_per_chain {
            let moment = match rng.below(3) {
                0 => Moment::After(Duration::from_millis(100 + rng.below(1200))),
                1 => Moment::CheckpointWrite(1 + rng.below(2)),
                _ => Moment::Evaluation(1 + rng.below(2)),
            };
            let args: &[&str] = if attempt == 0 {
                &["train", recipe]
            } else {
                &["train", recipe, "--resume"]
            };
            let (mut child, rx) = spawn_slow(args);
            if !kill_at(&mut child, &rx, moment) {
                // It finished before the moment came: nothing more to interrupt here.
                let status = child.wait().unwrap();
                assert!(status.success(), "chain {chain}: {status}");
                break;
            }
            kills += 1;
            match moment {
                Moment::CheckpointWrite(_) => at_checkpoint += 1,
                Moment::Evaluation(_) => at_eval += 1,
                Moment::After(_) => {}
            }
            check_after_kill(&run, moment);
        }
        if !run.join("final.safetensors").exists() {
            let o = run_recycle(&["train", recipe, "--resume"]);
            assert!(o.status.success(), "chain {chain}: {}", stderr(&o));
        }
        let got = std::fs::read(run.join("final.safetensors")).unwrap();
        assert!(got == expected, "chain {chain}: final weights differ");
        assert_eq!(temp_files(&run), Vec::<String>::new(), "chain {chain}");
        let log = RunLog::read(run.join("log.jsonl")).unwrap();
        let steps: Vec<u64> = log.records.iter().map(|r| r.step).collect();
        assert_eq!(steps, (1..=TINY_STEPS).collect::<Vec<_>>(), "chain {chain}");
    }
    eprintln!("{kills} kills survived ({at_checkpoint} during checkpoint writes, {at_eval} during evaluations)");
    assert!(kills >= 20, "only {kills} kills landed");
    assert!(
        at_checkpoint >= 3 && at_eval >= 3,
        "{at_checkpoint} / {at_eval}"
    );
}

#[test]
fn sigterm_and_sigint_write_a_checkpoint_and_exit_cleanly() {
    let scratch = Scratch::new("signal");
    let out = scratch.path();
    let whole = write_recipe(out, "whole");
    let o = run_recycle(&["train", whole.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let expected = std::fs::read(out.join("whole/final.safetensors")).unwrap();

    for (signal, name, code) in [
        (libc::SIGTERM, "SIGTERM", 143),
        (libc::SIGINT, "SIGINT", 130),
    ] {
        let run_name = format!("stopped-{}", name.to_lowercase());
        let recipe = write_recipe(out, &run_name);
        let (mut child, rx) = spawn_slow(&["train", recipe.to_str().unwrap()]);
        // Step 3 is not a checkpoint step: the checkpoint the signal writes is its own.
        let mut lines = Vec::new();
        loop {
            let line = rx.recv_timeout(Duration::from_secs(60)).unwrap();
            let seen = line.starts_with("recycle-test-pause: step 3 done");
            lines.push(line);
            if seen {
                break;
            }
        }
        // SAFETY: signalling a child process this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let status = child.wait().unwrap();
        lines.extend(rx.iter());
        let text = lines.join("\n");
        assert_eq!(status.code(), Some(code), "{name}: {text}");
        assert!(text.contains(&format!("interrupted by {name}")), "{text}");
        assert!(text.contains("--resume"), "{text}");
        let run = out.join(&run_name);
        let step = checkpoint_step(&run.join("checkpoint.safetensors"));
        assert!(
            (3..TINY_STEPS).contains(&step),
            "{name}: checkpoint at {step}"
        );
        assert!(
            text.contains(&format!("after step {step} of {TINY_STEPS}")),
            "{text}"
        );
        let log = RunLog::read(run.join("log.jsonl")).unwrap();
        assert_eq!(
            log.records.last().unwrap().step,
            step,
            "{name}: nothing lost"
        );
        let o = run_recycle(&["train", recipe.to_str().unwrap(), "--resume"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let got = std::fs::read(run.join("final.safetensors")).unwrap();
        assert!(got == expected, "{name}: resumed weights differ");
    }
}
