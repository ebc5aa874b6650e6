//! A replayable cache of teacher outputs: each teacher's forward is computed once per training
//! step's batch and replayed by every student distilled from it with the same data.
//!
//! - What: for each step, the rows of the teacher's logits the loss reads (one per image; for
//!   MLM, one per masked position), kept as their top-k logits and the log-sum-exp of the
//!   other classes at the loss's temperature, so that the mass of the rest is exact
//!   (`recycle_engine::kd_loss::CachedTargets`; the loss on them is `kd_loss_cached`).
//! - Addressed by step: a step's batch is a pure function of the data seed, the batch size and
//!   the step (epoch `step / steps_per_epoch`, its shuffled order, MLM masks drawn from
//!   `(seed, step)`), so `(key, step)` names the views the student sees.
//! - The key ([`CacheKey`], `key.json`): the teacher's checkpoint hash, architecture and
//!   compute type; every data field that changes a training batch; the seed and batch size;
//!   k, the value type, the loss and its temperature (the tail's log-sum-exp is taken at T, and
//!   the tail's mass at another T cannot be found from it). A mismatch is an error naming the
//!   field.
//! - The files ([`shard`]): one directory per teacher (`teacher-<hash>`), one shard per 256
//!   steps, each with a versioned header, the key's digest and a SHA-256 of its bytes; written
//!   then renamed. A truncated or corrupt shard is refused when reading only, and recorded
//!   again when recording.

pub mod key;
pub mod shard;
pub mod store;

pub use key::{teacher_dir, CacheKey, RowSpec, ValueType, KEY_FILE};
pub use store::{CacheMode, CacheStats, TeacherCache};

#[cfg(test)]
mod tests;
