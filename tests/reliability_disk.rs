//! Full and read-only filesystems: a small tmpfs mounted by the test holds the run directory.
//! When a checkpoint, log or report write fails, the error names the path, the previous
//! checkpoint stays intact and loadable, no temporary file is left, nothing panics, and once
//! space is back the run resumes to the weights of an uninterrupted run.
//!
//! Mounting needs root (CI runs as root): without it these tests fail, saying so.

mod reliability_support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use recycle::recipe::Recipe;
use recycle::trainer::{self, RunOptions, Trainer};
use recycle_engine::checkpoint;
use reliability_support::*;

/// A tmpfs of `size` mounted on a fresh directory; unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
    _scratch: Scratch,
}

impl Tmpfs {
    fn mount(tag: &str, size: &str) -> Tmpfs {
        let scratch = Scratch::new(tag);
        let dir = scratch.path().join("mnt");
        std::fs::create_dir_all(&dir).unwrap();
        mount(
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
            &dir,
        );
        Tmpfs {
            dir,
            _scratch: scratch,
        }
    }

    fn path(&self) -> &Path {
        &self.dir
    }

    fn remount_read_only(&self) {
        mount(&["-o", "remount,ro"], &self.dir);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn mount(args: &[&str], dir: &Path) {
    let o = Command::new("mount")
        .args(args)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run mount (these tests need root and mount): {e}"));
    assert!(
        o.status.success(),
        "mount {args:?} {} failed: these tests need root (CI runs them as root): {}",
        dir.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Fills the filesystem holding `path` (a new file) until a write fails with "no space".
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    for chunk in [65536, 4096, 1] {
        let buf = vec![0u8; chunk];
        loop {
            match f.write(&buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    f.sync_all().ok();
}

fn tiny(out: &Path, name: &str) -> Recipe {
    Recipe::from_toml(&tiny_toml(out, name)).unwrap()
}

/// The final weights of the tiny recipe trained without interruption (on the normal disk).
fn uninterrupted(scratch: &Scratch) -> Vec<u8> {
    let r = tiny(scratch.path(), "whole");
    trainer::run(&r, &RunOptions::default()).unwrap();
    std::fs::read(scratch.path().join("whole/final.safetensors")).unwrap()
}

#[test]
fn a_full_disk_stops_the_run_with_the_path_and_keeps_the_last_checkpoint() {
    let scratch = Scratch::new("full-ref");
    let expected = uninterrupted(&scratch);
    let fs = Tmpfs::mount("full", "4m");
    let out = fs.path();
    let r = tiny(out, "full");
    let run = out.join("full");
    let ckpt = run.join("checkpoint.safetensors");

    let mut t = Trainer::new(&r, &RunOptions::default()).unwrap();
    t.run_steps(2).unwrap();
    assert_eq!(checkpoint_step(&ckpt), 2);
    let filler = out.join("filler");
    fill(&filler);

    // Training goes on until a write needs space: a log line or the next checkpoint.
    let err = loop {
        match t.step() {
            Ok(_) => assert!(!t.is_done(), "a whole run fitted in a full disk"),
            Err(e) => break e.to_string(),
        }
    };
    assert!(err.contains(&run.display().to_string()), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    let saved = checkpoint_step(&ckpt);
    assert!(saved >= 2 && saved <= t.current_step(), "{saved}");
    assert_eq!(temp_files(&run), Vec::<String>::new());

    // An explicit checkpoint on the full disk: an error naming it, the old one untouched.
    let before = std::fs::read(&ckpt).unwrap();
    let err = t.save_checkpoint(&ckpt).unwrap_err().to_string();
    assert!(err.contains(&ckpt.display().to_string()), "{err}");
    assert_eq!(std::fs::read(&ckpt).unwrap(), before);
    assert_eq!(temp_files(&run), Vec::<String>::new());
    drop(t);

    // Space back: the run resumes from its checkpoint to the uninterrupted weights.
    std::fs::remove_file(&filler).unwrap();
    let resume = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    trainer::run(&r, &resume).unwrap();
    assert!(std::fs::read(run.join("final.safetensors")).unwrap() == expected);

    // The report of the finished run on a full disk.
    fill(&filler);
    let report_dir = out.join("report");
    let o = run_recycle(&[
        "report",
        run.to_str().unwrap(),
        "--out",
        report_dir.to_str().unwrap(),
    ]);
    let text = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains(&report_dir.display().to_string()), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    assert_eq!(temp_files(&report_dir), Vec::<String>::new());
}

#[test]
fn a_read_only_directory_is_an_error_naming_the_path_and_nothing_is_lost() {
    let fs = Tmpfs::mount("ro", "4m");
    let out = fs.path();
    let recipe = write_recipe(out, "frozen");
    let r = tiny(out, "frozen");
    let stop = RunOptions {
        stop_after: Some(4),
        ..RunOptions::default()
    };
    assert!(trainer::run(&r, &stop).is_err());
    let done = tiny(out, "done");
    trainer::run(&done, &RunOptions::default()).unwrap();
    let run = out.join("frozen");
    let ckpt = run.join("checkpoint.safetensors");
    let before = std::fs::read(&ckpt).unwrap();
    fs.remount_read_only();

    let o = run_recycle(&["train", recipe.to_str().unwrap(), "--resume"]);
    let text = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains(&run.display().to_string()), "{text}");
    assert!(text.contains("Read-only file system"), "{text}");

    let t = trainer::run(
        &r,
        &RunOptions {
            resume: true,
            ..RunOptions::default()
        },
    );
    let err = t.unwrap_err().to_string();
    assert!(err.contains(&run.display().to_string()), "{err}");

    let c = checkpoint::load(&ckpt).unwrap();
    let err = checkpoint::save(&ckpt, &c.tensors, Some(c.metadata))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&ckpt.display().to_string()), "{err}");

    let report_dir = out.join("report");
    let o = run_recycle(&[
        "report",
        out.join("done").to_str().unwrap(),
        "--out",
        report_dir.to_str().unwrap(),
    ]);
    let text = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains(&report_dir.display().to_string()), "{text}");
    assert!(!text.contains("panicked"), "{text}");

    assert_eq!(std::fs::read(&ckpt).unwrap(), before);
    assert_eq!(checkpoint_step(&ckpt), 4);
    assert_eq!(temp_files(&run), Vec::<String>::new());
}
