//! Starting a run again in its directory: what `--resume` checks before it trusts a
//! checkpoint (the recipe it was started with, counters that fit the run, floats where the
//! model holds floats), the temporary files killed writes leave, and sizes that cannot be
//! allocated (refused before anything is).

use std::path::{Path, PathBuf};

use recycle_engine::optim::Optimizer;
use recycle_engine::{checkpoint, Device, Error, Result, Tensor};

use super::model::check_float_tensors;
use super::runner::Progress;
use super::{Architecture, Model, CHECKPOINT_FILE};
use crate::experiments::CacheReads;
use crate::recipe::{ModelRecipe, Recipe};

/// The step a run directory's checkpoint records, when it has a readable one.
pub(super) fn checkpoint_step(path: &Path) -> Option<u64> {
    if !path.exists() {
        return None;
    }
    checkpoint::load(path)
        .ok()
        .and_then(|c| c.metadata.get("step").and_then(|s| s.parse().ok()))
}

/// Refuses sizes this machine cannot allocate before anything is allocated: the parameters,
/// their gradients and up to two optimizer buffers (an allocation that fails later aborts the
/// process rather than returning an error).
pub(super) fn check_allocatable(recipe: &Recipe, arch: &Architecture) -> Result<()> {
    let specs = match arch {
        Architecture::ResNet(c) => c.param_specs(),
        Architecture::Bert(c) => c.param_specs(),
    };
    let params = specs.iter().try_fold(0usize, |n, (_, shape)| {
        shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|k| n.checked_add(k))
    });
    let bytes = params.and_then(|n| n.checked_mul(4 * 4));
    let fits = bytes.is_some_and(|b| Vec::<u8>::new().try_reserve_exact(b).is_ok());
    if fits {
        return Ok(());
    }
    let field = match recipe.model {
        ModelRecipe::Resnet { .. } => "model.width",
        ModelRecipe::Bert { .. } => "data.seq_len and model.size",
    };
    Err(Error::invalid(
        "recipe",
        format!(
            "run `{}`: {} has {} parameters, which with their gradients and optimizer state \
             need more memory than this machine can allocate: reduce {field}",
            recipe.name,
            arch.name(),
            params.map_or("more than 2^64".to_string(), |n| n.to_string())
        ),
    ))
}

/// Removes the temporary files that writes killed before their rename leave behind
/// (`.<file>.tmp-<pid>-<n>` from checkpoints, `.<file>.<pid>.tmp` from the other files). Only
/// called with the directory's lock held, so no other process is writing them.
pub(super) fn remove_temp_files(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && (name.contains(".tmp-") || name.ends_with(".tmp")) {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Refuses to resume with a recipe other than the one the run was started with (a changed
/// batch size or learning rate would mix two runs in one). The device may change.
pub(super) fn check_same_recipe(recorded: &Path, recipe: &Recipe) -> Result<()> {
    let text = std::fs::read_to_string(recorded).map_err(|e| Error::io(recorded, e))?;
    let before = Recipe::from_toml(&text).map_err(|e| {
        Error::invalid(
            "train",
            format!("--resume: the recorded recipe {}: {e}", recorded.display()),
        )
    })?;
    let json = |r: &Recipe| -> Result<serde_json::Value> {
        let mut r = r.clone();
        r.device = Device::Cpu;
        r.out_dir = PathBuf::new();
        serde_json::to_value(&r).map_err(|e| Error::invalid("train", format!("recipe: {e}")))
    };
    let mut diffs = Vec::new();
    json_diff("", &json(&before)?, &json(recipe)?, &mut diffs);
    if diffs.is_empty() {
        return Ok(());
    }
    Err(Error::invalid(
        "train",
        format!(
            "--resume: the recipe differs from the one run `{}` was started with ({}): {}; \
             resume with the recorded recipe, or start again with --overwrite",
            recipe.name,
            recorded.display(),
            diffs.join(", ")
        ),
    ))
}

/// The fields (dotted paths) whose values differ between `a` (recorded) and `b` (given).
fn json_diff(at: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                let (va, vb) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                json_diff(&path, va, vb, out);
            }
        }
        _ if a != b => out.push(format!("{at} is {a} in the recorded recipe and {b} now")),
        _ => {}
    }
}

pub(super) fn load_checkpoint(
    dir: &Path,
    model: &Model,
    optimizer: &mut dyn Optimizer,
    total: u64,
    recipe: &Recipe,
) -> Result<Progress> {
    let path = dir.join(CHECKPOINT_FILE);
    let ckpt = checkpoint::load(&path)?;
    let meta = |k: &str| -> Result<String> {
        ckpt.metadata
            .get(k)
            .cloned()
            .ok_or_else(|| Error::checkpoint(&path, format!("metadata `{k}` is missing")))
    };
    let num = |k: &str| -> Result<u64> {
        meta(k)?
            .parse()
            .map_err(|_| Error::checkpoint(&path, format!("metadata `{k}` is not a number")))
    };
    let state: Vec<(String, Tensor)> = ckpt
        .tensors
        .iter()
        .filter_map(|(n, t)| n.strip_prefix("model.").map(|n| (n.to_string(), t.clone())))
        .collect();
    check_float_tensors(&path, &state)?;
    let progress = Progress {
        step: num("step")?,
        samples: num("samples")?,
        train_seconds: meta("train_seconds")?
            .parse()
            .ok()
            .filter(|s: &f64| s.is_finite() && *s >= 0.0)
            .ok_or_else(|| {
                Error::checkpoint(&path, "metadata `train_seconds` is not a number of seconds")
            })?,
        teacher_forwards: num("teacher_forwards")?,
        // Checkpoints written before these were recorded: none measured, none read.
        teacher_seconds: ckpt
            .metadata
            .get("teacher_seconds")
            .map(|s| {
                s.parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                    .ok_or_else(|| {
                        Error::checkpoint(
                            &path,
                            "metadata `teacher_seconds` is not a number of seconds",
                        )
                    })
            })
            .transpose()?
            .unwrap_or(0.0),
        cache_reads: {
            let opt = |k: &str| -> Result<u64> {
                if ckpt.metadata.contains_key(k) {
                    num(k)
                } else {
                    Ok(0)
                }
            };
            CacheReads {
                steps: opt("cache_steps_read")?,
                forwards: opt("cache_forwards_replayed")?,
                rows: opt("cache_rows_read")?,
                bytes: opt("cache_bytes_read")?,
            }
        },
        // Checkpoints written before steps could be skipped have no count: none were.
        skipped_steps: if ckpt.metadata.contains_key("skipped_steps") {
            num("skipped_steps")?
        } else {
            0
        },
        // Checkpoints written before caller-fed steps existed have none.
        caller_steps: if ckpt.metadata.contains_key("caller_steps") {
            num("caller_steps")?
        } else {
            0
        },
        caller_samples: if ckpt.metadata.contains_key("caller_samples") {
            num("caller_samples")?
        } else {
            0
        },
    };
    // A checkpoint whose counters do not fit this run would make the summary report steps or
    // samples never trained.
    let batch = recipe.train.batch_size as u64;
    if progress.step > total {
        return Err(Error::checkpoint(
            &path,
            format!(
                "metadata `step` is {}, beyond the {total} steps of run `{}`: the file is not \
                 this run's checkpoint; start again with --overwrite",
                progress.step, recipe.name
            ),
        ));
    }
    // Data-set steps bring `batch` samples each; caller-fed steps what they brought.
    let (caller_steps, caller_samples) = (progress.caller_steps, progress.caller_samples);
    let expected = progress
        .step
        .checked_sub(caller_steps)
        .and_then(|own| own.checked_mul(batch))
        .and_then(|s| s.checked_add(caller_samples));
    if Some(progress.samples) != expected || caller_samples < caller_steps {
        return Err(Error::checkpoint(
            &path,
            format!(
                "metadata `samples` is {}, but {} steps of batch {batch} ({caller_steps} of them \
                 fed by the caller, with {caller_samples} samples) are {} samples: the file is \
                 not this run's checkpoint; start again with --overwrite",
                progress.samples,
                progress.step,
                expected.map_or("more than counted".to_string(), |e| e.to_string())
            ),
        ));
    }
    model.load_state_dict(state, &path)?;
    optimizer.load_state(&ckpt.tensors)?;
    Ok(progress)
}
