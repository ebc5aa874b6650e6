//! What a hostile probe of the command line found, each fixed and held here: two runs in one
//! directory, checkpoints that lie (integer weights, a step beyond the run), a resume with an
//! edited recipe, run names that escape the output directory, values that failed late or by
//! internal type names, sizes that cannot be allocated, a failure before the first checkpoint,
//! temporary files of killed writes, and sweeps whose points share a directory.

mod reliability_support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;

use recycle::experiments::sweep::run_sweep;
use recycle::experiments::RunLog;
use recycle::recipe::Recipe;
use recycle::trainer::{self, RunOptions, Trainer};
use recycle_engine::{checkpoint, DType, Tensor};
use reliability_support::*;

#[test]
fn a_second_train_into_a_busy_directory_is_refused_and_the_first_finishes() {
    let scratch = Scratch::new("lock");
    let out = scratch.path();
    let recipe = write_recipe(out, "busy");
    let recipe = recipe.to_str().unwrap();
    let mut first = recycle(&["train", recipe])
        .env("RECYCLE_TEST_SLOW_MS", "40")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(first.stderr.take().unwrap()).lines();
    // Once it has trained a step it holds the lock.
    for line in lines.by_ref() {
        if line.unwrap().starts_with("recycle-test-pause: step 1 done") {
            break;
        }
    }
    let run = out.join("busy");
    let pid = first.id().to_string();
    for extra in [&[][..], &["--overwrite"][..], &["--resume"][..]] {
        let args: Vec<&str> = ["train", recipe].iter().chain(extra).copied().collect();
        let o = run_recycle(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains(&run.display().to_string()), "{extra:?}: {err}");
        assert!(err.contains(&format!("process {pid}")), "{extra:?}: {err}");
    }
    lines.for_each(drop);
    assert!(first.wait().unwrap().success());
    // The first run's log is its own: every step once, in order.
    let steps: Vec<u64> = RunLog::read(run.join("log.jsonl"))
        .unwrap()
        .records
        .iter()
        .map(|r| r.step)
        .collect();
    assert_eq!(steps, (1..=TINY_STEPS).collect::<Vec<_>>());
    // A finished (or crashed) run leaves no lock behind.
    let o = run_recycle(&["train", recipe, "--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_killed_run_does_not_leave_its_directory_locked() {
    let scratch = Scratch::new("stale-lock");
    let out = scratch.path();
    let recipe = write_recipe(out, "crashed");
    let recipe = recipe.to_str().unwrap();
    let mut child = recycle(&["train", recipe])
        .env("RECYCLE_TEST_SLOW_MS", "40")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines {
        if line.unwrap().starts_with("recycle-test-pause: step 2 done") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let lock = out.join("crashed/run.lock");
    assert!(lock.exists(), "the lock file stays; the lock does not");
    let o = run_recycle(&["train", recipe, "--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

fn tiny(out: &std::path::Path, name: &str) -> Recipe {
    Recipe::from_toml(&tiny_toml(out, name)).unwrap()
}

/// Trains `name` for 4 of its 16 steps and leaves its checkpoint.
fn stopped_run(out: &std::path::Path, name: &str) -> Recipe {
    let r = tiny(out, name);
    let opts = RunOptions {
        stop_after: Some(4),
        ..RunOptions::default()
    };
    let err = trainer::run(&r, &opts).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
    r
}

fn resume() -> RunOptions {
    RunOptions {
        resume: true,
        ..RunOptions::default()
    }
}

/// Rewrites the checkpoint at `path` with `edit` applied to its tensors and metadata.
fn rewrite(
    path: &std::path::Path,
    edit: impl FnOnce(&mut Vec<(String, Tensor)>, &mut HashMap<String, String>),
) {
    let mut c = checkpoint::load(path).unwrap();
    edit(&mut c.tensors, &mut c.metadata);
    checkpoint::save(path, &c.tensors, Some(c.metadata)).unwrap();
}

#[test]
fn integer_tagged_weights_are_refused_on_resume_and_as_a_teacher() {
    let scratch = Scratch::new("dtype");
    let out = scratch.path();
    let r = stopped_run(out, "student");
    let ckpt = out.join("student/checkpoint.safetensors");
    let victim = "model.conv1.weight";
    rewrite(&ckpt, |tensors, _| {
        let t = tensors.iter_mut().find(|(n, _)| n == victim).unwrap();
        t.1 = t.1.cast(DType::I32).unwrap();
    });
    let err = Trainer::new(&r, &resume()).err().unwrap().to_string();
    assert!(err.contains("`conv1.weight` (i32)"), "{err}");
    assert!(err.contains(&ckpt.display().to_string()), "{err}");

    // The same weights as a teacher (a final-weights file: the names without `model.`).
    let teacher = out.join("teacher.safetensors");
    let mut c = checkpoint::load(&ckpt).unwrap();
    c.tensors.retain(|(n, _)| n.starts_with("model."));
    for (n, _) in c.tensors.iter_mut() {
        *n = n.trim_start_matches("model.").to_string();
    }
    checkpoint::save(&teacher, &c.tensors, None).unwrap();
    let text = format!(
        "{}[distill]\nteachers = [{:?}]\n",
        tiny_toml(out, "distilled"),
        teacher.display().to_string()
    );
    let s = Recipe::from_toml(&text).unwrap();
    let err = Trainer::new(&s, &RunOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("`conv1.weight` (i32)"), "{err}");
    assert!(err.contains(&teacher.display().to_string()), "{err}");
    assert!(
        !out.join("distilled").exists(),
        "nothing written for a bad teacher"
    );
}

#[test]
fn a_checkpoint_whose_step_lies_beyond_the_run_is_refused() {
    let scratch = Scratch::new("step");
    let out = scratch.path();
    let r = stopped_run(out, "liar");
    let ckpt = out.join("liar/checkpoint.safetensors");
    rewrite(&ckpt, |_, meta| {
        meta.insert("step".into(), "1000".into());
        meta.insert("samples".into(), "32000".into());
    });
    let err = Trainer::new(&r, &resume()).err().unwrap().to_string();
    assert!(err.contains("`step` is 1000"), "{err}");
    assert!(err.contains("16 steps"), "{err}");
    rewrite(&ckpt, |_, meta| {
        meta.insert("step".into(), "4".into());
        meta.insert("samples".into(), "4000".into());
    });
    let err = Trainer::new(&r, &resume()).err().unwrap().to_string();
    assert!(err.contains("`samples` is 4000"), "{err}");
}

#[test]
fn resume_with_an_edited_recipe_is_refused_and_the_recorded_one_kept() {
    let scratch = Scratch::new("edited");
    let out = scratch.path();
    let r = stopped_run(out, "edited");
    let recorded = std::fs::read_to_string(out.join("edited/recipe.toml")).unwrap();
    let mut changed = r.clone();
    changed.train.batch_size = 64;
    changed.optimizer.lr = 0.2;
    let err = Trainer::new(&changed, &resume()).err().unwrap().to_string();
    assert!(err.contains("train.batch_size is 32"), "{err}");
    assert!(err.contains("optimizer.lr is 0.1"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("edited/recipe.toml")).unwrap(),
        recorded
    );
    // The device may change on resume; the same recipe resumes.
    let mut t = Trainer::new(&r, &resume()).unwrap();
    assert_eq!(t.current_step(), 4);
    t.run_steps(1).unwrap();
}

#[test]
fn bad_values_fail_before_anything_is_written_naming_file_and_field() {
    let scratch = Scratch::new("values");
    let out = scratch.path();
    let good = tiny_toml(out, "v");
    let cases: Vec<(String, &str)> = vec![
        (good.replace("name = \"v\"", "name = \".\""), "name `.`"),
        (good.replace("name = \"v\"", "name = \"..\""), "name `..`"),
        (
            good.replace("eval_limit = 128", "eval_limit = 0"),
            "data.eval_limit",
        ),
        (
            good.replace("train_limit = 256", "train_limit = 0"),
            "data.train_limit",
        ),
        (good.replace("width = 0.0625", "width = 0.0"), "model.width"),
        (
            good.replace("kind = \"resnet\"", "kind = \"resnet\"\ndepth = 19"),
            "model.depth",
        ),
        (
            good.replace("lr = 0.1", "lr = 0.1\nmomentum = 1.5"),
            "optimizer.momentum",
        ),
        (
            good.replace("weight_decay = 5e-4", "weight_decay = -1.0"),
            "optimizer.weight_decay",
        ),
        (
            good.replace("lr = 0.1", "lr = 0.1\nbetas = [0.9, 1.0]"),
            "optimizer.betas[1]",
        ),
        (
            good.replace("lr = 0.1", "lr = 0.1\neps = 0.0"),
            "optimizer.eps",
        ),
        (
            good.replace("lr = 0.1", "lr = 0.1\nfinal_lr = -0.1"),
            "optimizer.final_lr",
        ),
        (
            format!("{good}[distill]\nteachers = [\"t\"]\ntemperature = 0.0\n"),
            "distill.temperature",
        ),
        (
            format!("{good}[distill]\nteachers = [\"t\"]\nstart = 0.5\nstop = 0.2\n"),
            "distill.start",
        ),
        (
            format!("{good}[distill]\nteachers = [\"t\"]\nstrategy = \"best\"\n"),
            "distill.strategy",
        ),
    ];
    for (i, (text, field)) in cases.iter().enumerate() {
        let path = out.join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let o = run_recycle(&["train", path.to_str().unwrap()]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{field}: {err}");
        assert!(err.contains(field), "{field}: {err}");
        assert!(err.contains(&path.display().to_string()), "{field}: {err}");
        assert!(
            !err.contains("Config") && !err.contains("KdSchedule"),
            "{err}"
        );
    }
    // Nothing but the recipes: no run directory, no lock, no log.
    let left: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".toml"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_model_too_large_to_allocate_is_an_error_not_an_abort() {
    let scratch = Scratch::new("huge");
    let out = scratch.path();
    let path = out.join("huge.toml");
    std::fs::write(
        &path,
        tiny_toml(out, "huge").replace("width = 0.0625", "width = 100000.0"),
    )
    .unwrap();
    let o = run_recycle(&["train", path.to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("model.width"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(!out.join("huge").exists());
}

#[test]
fn a_failure_before_the_first_checkpoint_says_so_and_resume_starts_again() {
    let scratch = Scratch::new("early");
    let out = scratch.path();
    let mut r = tiny(out, "diverge");
    r.optimizer.lr = 1e30;
    r.optimizer.warmup = 0.0;
    let err = trainer::run(&r, &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no checkpoint was written yet"), "{err}");
    assert!(!out.join("diverge/checkpoint.safetensors").exists());
    // --resume with the same recipe starts from step 0 (and fails the same way).
    let t = Trainer::new(&r, &resume()).unwrap();
    assert_eq!(t.current_step(), 0);
}

#[test]
fn temporary_files_of_killed_writes_are_removed_on_the_next_start() {
    let scratch = Scratch::new("temps");
    let out = scratch.path();
    let r = stopped_run(out, "temps");
    let dir = out.join("temps");
    for name in [
        ".checkpoint.safetensors.tmp-99999-0",
        ".recipe.toml.99999.tmp",
    ] {
        std::fs::write(dir.join(name), b"partial").unwrap();
    }
    assert_eq!(temp_files(&dir).len(), 2);
    let t = Trainer::new(&r, &resume()).unwrap();
    assert_eq!(t.current_step(), 4);
    assert_eq!(temp_files(&dir), Vec::<String>::new());
}

#[test]
fn a_sweep_whose_points_would_share_a_directory_is_refused_before_training() {
    let scratch = Scratch::new("sweep");
    let out = scratch.path();
    let base = tiny(out, "grid");
    let err = run_sweep(&base, &[0.1, 0.2, 0.10], &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("grid-lr0.1"), "{err}");
    let err = run_sweep(&base, &[0.1, -0.2], &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("optimizer.lr"), "{err}");
    assert!(
        std::fs::read_dir(out).unwrap().next().is_none(),
        "nothing trained"
    );
}
