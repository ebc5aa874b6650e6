//! One teacher's cache directory: its key file and its shards, read a step at a time and, when
//! recording, written a shard at a time (written then renamed: no partial file is ever in
//! place).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use recycle_engine::kd_loss::CachedTargets;
use recycle_engine::{Error, Result};

use super::key::{CacheKey, RowSpec};
use super::shard::{encode, round_value, shard_name, Shard, STEPS_PER_SHARD};
use crate::experiments::runlog::write_atomic;

/// What a run may do with a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Read the steps the cache holds, and record the others (from the teacher's forward); a
    /// corrupt shard is recorded again.
    #[default]
    Record,
    /// Only read: a missing step or a corrupt shard is an error.
    Read,
}

/// What a cache did for a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Steps whose rows were read.
    pub reads: u64,
    /// Steps recorded.
    pub writes: u64,
    /// Corrupt shards found (and recorded again).
    pub rebuilt: u64,
}

/// One teacher's cache.
#[derive(Debug)]
pub struct TeacherCache {
    dir: PathBuf,
    digest: [u8; 32],
    rows: RowSpec,
    mode: CacheMode,
    /// The shard last looked up: its first step, and its contents (`None`: not on disk).
    loaded: Option<(u64, Option<Shard>)>,
    /// Recorded steps not yet written, with the first step of their shard.
    pending: Option<(u64, BTreeMap<u64, CachedTargets>)>,
    stats: CacheStats,
}

fn first_step(step: u64) -> u64 {
    step / STEPS_PER_SHARD * STEPS_PER_SHARD
}

impl TeacherCache {
    /// Opens the cache in `dir` for `key`: an existing key file must equal `key` (else an error
    /// naming the field); a missing one is written when recording and an error when reading.
    pub fn open(dir: &Path, key: &CacheKey, rows: RowSpec, mode: CacheMode) -> Result<Self> {
        match CacheKey::read(dir)? {
            Some(have) => have.check(key, dir)?,
            None if mode == CacheMode::Record => key.write(dir)?,
            None => {
                return Err(Error::invalid(
                    "teacher cache",
                    format!(
                        "{} holds no teacher cache (no key file): build it with `recycle \
                         cache-teacher RECIPE --epochs E`, or let the run record it \
                         ([distill] cache_mode = \"record\")",
                        dir.display()
                    ),
                ))
            }
        }
        Ok(TeacherCache {
            dir: dir.to_path_buf(),
            digest: key.digest(),
            rows,
            mode,
            loaded: None,
            pending: None,
            stats: CacheStats::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn mode(&self) -> CacheMode {
        self.mode
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Whether the rows of `step` are cached (in a verified shard, or recorded and pending).
    pub fn contains(&mut self, step: u64) -> Result<bool> {
        if let Some((first, p)) = &self.pending {
            if *first == first_step(step) && p.contains_key(&step) {
                return Ok(true);
            }
        }
        Ok(self.shard(step)?.is_some_and(|s| s.contains(step)))
    }

    /// The rows of `step`, when cached. Reading a corrupt shard is an error in
    /// [`CacheMode::Read`]; when recording, the shard counts as absent and is recorded again.
    pub fn get(&mut self, step: u64) -> Result<Option<CachedTargets>> {
        if let Some((first, p)) = &self.pending {
            if *first == first_step(step) {
                if let Some(t) = p.get(&step) {
                    self.stats.reads += 1;
                    return Ok(Some(t.clone()));
                }
            }
        }
        let got = self.shard(step)?.and_then(|s| s.get(step));
        self.stats.reads += got.is_some() as u64;
        Ok(got)
    }

    /// Records the rows of `step` (its values rounded as the cache stores them); they reach
    /// the disk when the run moves to another shard's steps, or at [`TeacherCache::flush`].
    pub fn put(&mut self, step: u64, mut targets: CachedTargets) -> Result<()> {
        if self.mode == CacheMode::Read {
            return Err(Error::invalid(
                "teacher cache",
                format!(
                    "{}: the cache is read-only for this run (cache_mode = \"read\"), step {step} \
                     cannot be recorded",
                    self.dir.display()
                ),
            ));
        }
        let want_k = self.rows.k.min(targets.classes);
        if targets.k != want_k {
            return Err(Error::invalid(
                "teacher cache",
                format!(
                    "step {step}: rows of k = {} for a cache of k = {want_k}",
                    targets.k
                ),
            ));
        }
        targets.validate()?;
        for v in &mut targets.values {
            *v = round_value(*v, self.rows.values);
        }
        let first = first_step(step);
        if self.pending.as_ref().map(|(f, _)| *f) != Some(first) {
            self.flush()?;
            // Keep what the shard on disk already holds (a run that stopped in its middle).
            let mut held = BTreeMap::new();
            if let Some(s) = self.shard(step)? {
                for st in s.steps().collect::<Vec<_>>() {
                    held.insert(st, s.get(st).expect("a step the shard lists"));
                }
            }
            self.pending = Some((first, held));
        }
        let (_, p) = self.pending.as_mut().expect("pending set just above");
        if let Some(other) = p.values().next() {
            if other.classes != targets.classes {
                return Err(Error::invalid(
                    "teacher cache",
                    format!(
                        "step {step}: rows of {} classes beside rows of {}",
                        targets.classes, other.classes
                    ),
                ));
            }
        }
        p.insert(step, targets);
        self.stats.writes += 1;
        Ok(())
    }

    /// Writes the recorded steps of the current shard (atomically).
    pub fn flush(&mut self) -> Result<()> {
        let Some((first, p)) = self.pending.take() else {
            return Ok(());
        };
        let Some(any) = p.values().next() else {
            return Ok(());
        };
        let bytes = encode(&self.digest, any.k, any.classes, self.rows.values, &p);
        write_atomic(self.dir.join(shard_name(first)), &bytes)?;
        if self.loaded.as_ref().is_some_and(|(f, _)| *f == first) {
            self.loaded = None;
        }
        Ok(())
    }

    /// The verified shard holding `step`, if there is one.
    fn shard(&mut self, step: u64) -> Result<Option<&Shard>> {
        let first = first_step(step);
        if self.loaded.as_ref().map(|(f, _)| *f) != Some(first) {
            let path = self.dir.join(shard_name(first));
            let shard = match std::fs::read(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(Error::io(&path, e)),
                Ok(bytes) => match Shard::decode(bytes, &self.digest) {
                    Ok(s) => Some(s),
                    Err(why) if self.mode == CacheMode::Read => {
                        return Err(Error::invalid(
                            "teacher cache",
                            format!(
                                "{}: {why}; the shard is not read: delete it and record it again \
                                 (cache_mode = \"record\", or `recycle cache-teacher`)",
                                path.display()
                            ),
                        ))
                    }
                    Err(why) => {
                        eprintln!(
                            "teacher cache: {}: {why}; recording its steps again",
                            path.display()
                        );
                        self.stats.rebuilt += 1;
                        None
                    }
                },
            };
            self.loaded = Some((first, shard));
        }
        Ok(self.loaded.as_ref().and_then(|(_, s)| s.as_ref()))
    }
}

impl Drop for TeacherCache {
    /// Writes what was recorded (a run that ends early keeps its steps); an error here has no
    /// one to go to, so [`TeacherCache::flush`] is what runs call.
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            eprintln!("teacher cache: {e}");
        }
    }
}
