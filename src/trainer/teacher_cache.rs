//! The trainer's side of the teacher cache (`distill::cache`): one cache per teacher of the
//! pool, opened under the key of the recipe, read at the steps it holds and recorded at the
//! others from the teachers' forwards.

use std::path::Path;

use recycle_engine::kd_loss::CachedTargets;
use recycle_engine::{DType, Device, Error, Result, Tensor};

use super::runner::teacher_activations;
use super::{teacher_checkpoint, Architecture};
use crate::distill::cache::shard::row_bytes;
use crate::distill::cache::{teacher_dir, CacheKey, CacheMode, CacheStats, RowSpec, TeacherCache};
use crate::distill::TeacherStrategy;
use crate::recipe::Recipe;

/// One [`TeacherCache`] per teacher of the recipe, in the recipe's order (the pool's indices).
#[derive(Debug)]
pub struct PoolCache {
    caches: Vec<TeacherCache>,
    rows: RowSpec,
    classes: usize,
}

/// Classes of a model's logits rows (the vocabulary for BERT).
pub fn classes(arch: &Architecture) -> usize {
    match arch {
        Architecture::ResNet(c) => c.num_classes,
        Architecture::Bert(c) => c.vocab_size,
    }
}

impl PoolCache {
    /// The caches of `recipe`'s teachers (`None` without `[distill] cache`), `k` and `mode`
    /// overriding the recipe's. The teachers compute as the trainer makes them on `device`.
    pub fn open(
        recipe: &Recipe,
        arch: &Architecture,
        device: Device,
        k: Option<usize>,
        mode: Option<CacheMode>,
    ) -> Result<Option<PoolCache>> {
        let Some(d) = &recipe.distill else {
            return Ok(None);
        };
        let Some(root) = &d.cache else {
            return Ok(None);
        };
        let classes = classes(arch);
        let rows = RowSpec {
            k: k.unwrap_or(d.cache_k()),
            term: d.kind()?,
            values: d.cache_values,
        };
        if rows.k == 0 {
            return Err(Error::invalid("teacher cache", "k must be at least 1"));
        }
        let strategy = d.strategy()?;
        if let TeacherStrategy::Ensemble { .. } | TeacherStrategy::RandomSubset { .. } = strategy {
            if rows.k < classes {
                return Err(Error::invalid(
                    "teacher cache",
                    format!(
                        "distill.strategy {} distills from the mean of several teachers' logits, \
                         which top-{} rows cannot rebuild: set distill.cache_k to at least {classes} \
                         (every class), or use strategy single or random-one",
                        d.strategy, rows.k
                    ),
                ));
            }
        }
        let compute = match teacher_activations(device, recipe.activations) {
            Some(DType::BF16) => "bf16",
            _ => "f32",
        };
        let mode = mode.unwrap_or(d.cache_mode);
        let caches = d
            .teachers
            .iter()
            .map(|t| {
                let key =
                    CacheKey::new(recipe, &teacher_checkpoint(t), &arch.name(), compute, &rows)?;
                TeacherCache::open(&teacher_dir(root, &key), &key, rows, mode)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(PoolCache {
            caches,
            rows,
            classes,
        }))
    }

    /// k as the rows hold it (at most the number of classes).
    pub fn k(&self) -> usize {
        self.rows.k.min(self.classes)
    }

    pub fn mode(&self) -> CacheMode {
        self.caches.first().map_or(CacheMode::Record, |c| c.mode())
    }

    pub fn dirs(&self) -> Vec<&Path> {
        self.caches.iter().map(|c| c.dir()).collect()
    }

    /// The shard bytes of `targets` (rows of this cache).
    pub fn bytes_of(&self, targets: &CachedTargets) -> u64 {
        (targets.rows * row_bytes(targets.k, targets.classes, self.rows.values)) as u64
    }

    /// The targets of the `selected` teachers at `step`, when the cache holds all of them.
    /// In [`CacheMode::Read`] a missing one is an error.
    pub fn read(&mut self, step: u64, selected: &[usize]) -> Result<Option<Vec<CachedTargets>>> {
        let mut out = Vec::with_capacity(selected.len());
        for &i in selected {
            match self.caches[i].get(step)? {
                Some(t) => out.push(t),
                None if self.caches[i].mode() == CacheMode::Read => {
                    return Err(Error::invalid(
                        "teacher cache",
                        format!(
                            "{} does not hold step {step}: build it for more epochs (`recycle \
                             cache-teacher RECIPE --epochs E`), or let the run record it \
                             ([distill] cache_mode = \"record\")",
                            self.caches[i].dir().display()
                        ),
                    ))
                }
                None => return Ok(None),
            }
        }
        Ok(Some(out))
    }

    /// Whether teacher `teacher`'s cache holds `step`.
    pub fn contains(&mut self, step: u64, teacher: usize) -> Result<bool> {
        self.caches[teacher].contains(step)
    }

    /// Records teacher `teacher`'s `logits` (`[rows, classes]`) at `step`.
    pub fn record(&mut self, step: u64, teacher: usize, logits: &Tensor) -> Result<()> {
        let (rows, classes) = (logits.shape()[0], logits.shape()[1]);
        let values = logits.to_vec_f32()?;
        let t = CachedTargets::from_logits(
            &values,
            classes,
            self.rows.k.min(classes),
            self.rows.tail_temperature(),
        )?;
        debug_assert_eq!(t.rows, rows);
        self.caches[teacher].put(step, t)
    }

    /// Writes what was recorded.
    pub fn flush(&mut self) -> Result<()> {
        self.caches.iter_mut().try_for_each(|c| c.flush())
    }

    /// Reads, writes and rebuilt shards, summed over the teachers.
    pub fn stats(&self) -> CacheStats {
        self.caches.iter().fold(CacheStats::default(), |a, c| {
            let s = c.stats();
            CacheStats {
                reads: a.reads + s.reads,
                writes: a.writes + s.writes,
                rebuilt: a.rebuilt + s.rebuilt,
            }
        })
    }
}
