//! `recycle cache-teacher`: a recipe's teacher cache built ahead of its students, every teacher
//! of the pool at every step of the first E epochs, each forward in inference as the trainer
//! runs it (bf16 weights; on a GPU, bf16 activations; on the CPU, the thread pool's cores).

use std::time::Instant;

use recycle_engine::{Error, Result, Tape};

use super::runner::{data_batches, teacher_activations};
use super::teacher_cache::PoolCache;
use super::{architecture, load_teachers, open_device, progress_bar, TaskData};
use crate::distill::cache::CacheMode;
use crate::recipe::Recipe;

/// What a cache build did.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheBuild {
    /// Steps covered (E epochs of the recipe's batches).
    pub steps: u64,
    pub teachers: usize,
    /// Teacher forwards run (steps already cached are not run again).
    pub forwards: u64,
    /// Steps × teachers found already cached.
    pub already_cached: u64,
    /// Logits kept per row.
    pub k: usize,
    pub seconds: f64,
    /// Bytes of the shards of every teacher.
    pub bytes: u64,
    /// Training samples the covered steps hold (per teacher).
    pub samples: u64,
}

impl CacheBuild {
    /// Bytes per training sample and teacher.
    pub fn bytes_per_sample(&self) -> f64 {
        self.bytes as f64 / (self.samples.max(1) * self.teachers.max(1) as u64) as f64
    }
}

/// Builds (or completes) the cache of `recipe`'s teachers for `epochs` epochs of its batches,
/// keeping `k` logits per row (the recipe's `cache_k` when `None`). A progress bar goes to
/// stderr when `progress`.
pub fn cache_teacher(
    recipe: &Recipe,
    epochs: f64,
    k: Option<usize>,
    progress: bool,
) -> Result<CacheBuild> {
    recipe.validate()?;
    let Some(d) = recipe.distill.as_ref().filter(|d| d.cache.is_some()) else {
        return Err(Error::invalid(
            "cache-teacher",
            format!(
                "recipe `{}` has no teacher cache: add `cache = \"DIR\"` to its [distill] section",
                recipe.name
            ),
        ));
    };
    if !(epochs > 0.0 && epochs.is_finite()) {
        return Err(Error::invalid(
            "cache-teacher",
            format!("--epochs {epochs} must be a positive number"),
        ));
    }
    let (device, _) = open_device(recipe)?;
    let data = TaskData::load(recipe)?;
    let train_len = data.train_len();
    if train_len == usize::MAX {
        return Err(Error::invalid(
            "cache-teacher",
            "a streamed text data set has no epochs to cache; let the first student record the \
             cache as it trains (cache_mode = \"record\")",
        ));
    }
    let batch = recipe.train.batch_size;
    let steps = (epochs * train_len as f64).round() as u64 / batch as u64;
    if steps == 0 {
        return Err(Error::invalid(
            "cache-teacher",
            format!("{epochs} epochs of {train_len} examples make no full batch of {batch}"),
        ));
    }
    let arch = architecture(recipe, &data)?;
    let mut cache = PoolCache::open(recipe, &arch, device, k, Some(CacheMode::Record))?
        .expect("the recipe has a cache (checked above)");
    let teachers = load_teachers(
        &d.teachers,
        &arch,
        device,
        teacher_activations(device, recipe.activations),
    )?;
    let bar = progress_bar(progress, steps, 0, &format!("cache {}", recipe.name));
    let t0 = Instant::now();
    let (mut forwards, mut already, mut samples) = (0u64, 0u64, 0u64);
    for (step, b) in (0..steps).zip(data_batches(&data, batch, recipe.seed, 0)?) {
        let b = b?;
        samples += b.samples() as u64;
        let mut on_device = None;
        for (i, t) in teachers.iter().enumerate() {
            if cache.contains(step, i)? {
                already += 1;
                continue;
            }
            if on_device.is_none() {
                on_device = Some(b.to_device(device)?);
            }
            let input = on_device.as_ref().expect("set just above");
            let logits = t.model.logits(&Tape::inference(), input, false, 0)?;
            forwards += 1;
            cache.record(step, i, logits.tensor())?;
        }
        if let Some(p) = &bar {
            p.set_position(step + 1);
        }
    }
    cache.flush()?;
    let seconds = t0.elapsed().as_secs_f64();
    if let Some(p) = &bar {
        p.finish_and_clear();
    }
    let mut bytes = 0;
    for dir in cache.dirs() {
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            if entry.file_name().to_string_lossy().ends_with(".shard") {
                bytes += entry
                    .metadata()
                    .map_err(|e| Error::io(entry.path(), e))?
                    .len();
            }
        }
    }
    Ok(CacheBuild {
        steps,
        teachers: teachers.len(),
        forwards,
        already_cached: already,
        k: cache.k(),
        seconds,
        bytes,
        samples,
    })
}
