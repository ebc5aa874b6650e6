//! A deterministic, resumable, shuffling batch loader with a background producer thread.
//!
//! Determinism: step `s` belongs to epoch `e = s / steps_per_epoch`; epoch `e`'s order is a
//! Fisher-Yates permutation drawn from `(seed, e)` alone, and the batch is the slice of that
//! order at `s % steps_per_epoch`. So the batch of a step is a pure function of
//! `(seed, step)`: a loader started at `start_step` yields exactly what an uninterrupted one
//! yields from that step on, and a resumed run only needs its step count.
//!
//! Overlap: a producer thread builds the next batches while the trainer computes, handing them
//! over through a bounded channel (`prefetch` deep), so memory stays bounded and a slow trainer
//! simply blocks the producer. A failing (or panicking) [`BatchSource::make_batch`] reaches the
//! consumer as an `Err` item, after which the loader ends. Dropping the loader stops and joins
//! the thread.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::engine::rng::{self, Rng};
use crate::engine::{Error, Result};

/// Anything the loader can batch: a data set of `len()` items that builds the batch of the
/// given item indices. `step` is the global step of the batch, for sources whose batches carry
/// randomness (MLM masking) that must be reproducible on resume.
pub trait BatchSource: Send + Sync + 'static {
    type Batch: Send + 'static;

    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn make_batch(&self, indices: &[usize], step: u64) -> Result<Self::Batch>;
}

/// How a [`Loader`] walks its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Seed of the shuffling (ignored without `shuffle`).
    pub seed: u64,
    /// Draw a fresh permutation each epoch; otherwise keep the source's order.
    pub shuffle: bool,
    /// Drop the last partial batch of each epoch (training: every step sees `batch_size`
    /// items); otherwise yield it (evaluation: every item is seen).
    pub drop_last: bool,
    /// Stop after this many epochs; `None` runs forever (the trainer decides when to stop).
    pub epochs: Option<u64>,
    /// How many prepared batches may wait in the channel.
    pub prefetch: usize,
}

impl LoaderConfig {
    /// Training: shuffled, full batches only, endless.
    pub fn train(batch_size: usize, seed: u64) -> Self {
        LoaderConfig {
            batch_size,
            seed,
            shuffle: true,
            drop_last: true,
            epochs: None,
            prefetch: 3,
        }
    }

    /// Evaluation: one pass in order, last partial batch kept.
    pub fn eval(batch_size: usize) -> Self {
        LoaderConfig {
            batch_size,
            seed: 0,
            shuffle: false,
            drop_last: false,
            epochs: Some(1),
            prefetch: 2,
        }
    }
}

/// Batches per epoch for `n` items.
pub fn steps_per_epoch(n: usize, batch_size: usize, drop_last: bool) -> usize {
    if batch_size == 0 {
        0
    } else if drop_last {
        n / batch_size
    } else {
        n.div_ceil(batch_size)
    }
}

/// The item order of epoch `epoch`: `0..n` shuffled by Fisher-Yates with a generator drawn from
/// `(seed, epoch)`, or `0..n` unshuffled.
pub fn epoch_order(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        // A fixed tag keeps the shuffling stream apart from other users of the same seed.
        let mut rng = Rng::new(rng::bits_at(seed ^ 0x5348_5546_464c_4521, epoch));
        for i in (1..n).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
    }
    order
}

/// The prefetching loader; iterate it for `Result<S::Batch>`.
pub struct Loader<S: BatchSource> {
    rx: Option<Receiver<Result<S::Batch>>>,
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    next_step: u64,
    steps_per_epoch: u64,
    end_step: Option<u64>,
    finished: bool,
}

impl<S: BatchSource> Loader<S> {
    /// Starts a loader whose first batch is the one of step `start_step` (0 for a fresh run).
    pub fn new(source: Arc<S>, config: LoaderConfig, start_step: u64) -> Result<Self> {
        const OP: &str = "Loader::new";
        if config.batch_size == 0 {
            return Err(Error::invalid(OP, "batch_size must be at least 1"));
        }
        if config.prefetch == 0 {
            return Err(Error::invalid(OP, "prefetch must be at least 1"));
        }
        let n = source.len();
        let spe = steps_per_epoch(n, config.batch_size, config.drop_last) as u64;
        if spe == 0 {
            return Err(Error::invalid(
                OP,
                format!(
                    "a data set of {n} items gives no batch of {}{}",
                    config.batch_size,
                    if config.drop_last {
                        " (the last partial batch is dropped)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        let end_step = config.epochs.map(|e| e.saturating_mul(spe));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = sync_channel(config.prefetch);
        let thread_stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name("recycle-loader".into())
            .spawn(move || {
                let mut order: Vec<usize> = Vec::new();
                let mut order_epoch = None;
                let mut step = start_step;
                while end_step.is_none_or(|end| step < end) && !thread_stop.load(Ordering::Relaxed)
                {
                    let (epoch, b) = (step / spe, (step % spe) as usize);
                    if order_epoch != Some(epoch) {
                        order = epoch_order(n, config.seed, epoch, config.shuffle);
                        order_epoch = Some(epoch);
                    }
                    let lo = b * config.batch_size;
                    let hi = (lo + config.batch_size).min(n);
                    let indices = &order[lo..hi];
                    // A panicking source must not leave the trainer waiting on a dead channel
                    // without a reason: turn the panic into an error item.
                    let batch = catch_unwind(AssertUnwindSafe(|| source.make_batch(indices, step)))
                        .unwrap_or_else(|panic| {
                            Err(Error::invalid(
                                "Loader",
                                format!(
                                    "batch source panicked at step {step}: {}",
                                    panic_message(&panic)
                                ),
                            ))
                        });
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        // The loader was dropped, or the consumer now holds the error.
                        break;
                    }
                    step += 1;
                }
            })
            .map_err(|e| Error::io("<loader thread>", e))?;
        Ok(Loader {
            rx: Some(rx),
            handle: Some(handle),
            stop,
            next_step: start_step,
            steps_per_epoch: spe,
            end_step,
            finished: false,
        })
    }

    /// The step of the next batch this loader yields.
    pub fn step(&self) -> u64 {
        self.next_step
    }

    /// The epoch of the next batch.
    pub fn epoch(&self) -> u64 {
        self.next_step / self.steps_per_epoch
    }

    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }

    /// The step after the last batch, when the loader is finite.
    pub fn end_step(&self) -> Option<u64> {
        self.end_step
    }

    fn shut_down(&mut self) -> std::thread::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver wakes a producer blocked on a full channel (its send fails).
        self.rx = None;
        match self.handle.take() {
            Some(h) => h.join(),
            None => Ok(()),
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

impl<S: BatchSource> Iterator for Loader<S> {
    type Item = Result<S::Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        let received = self.rx.as_ref()?.recv();
        match received {
            Ok(Ok(batch)) => {
                self.next_step += 1;
                Some(Ok(batch))
            }
            Ok(Err(e)) => {
                self.finished = true;
                let _ = self.shut_down();
                Some(Err(e))
            }
            // The producer is gone: the end of a finite loader, or a thread that died.
            Err(_) => {
                self.finished = true;
                let early = self.end_step.is_none_or(|end| self.next_step < end);
                match self.shut_down() {
                    Err(panic) => Some(Err(Error::invalid(
                        "Loader",
                        format!("loader thread panicked: {}", panic_message(&panic)),
                    ))),
                    Ok(()) if early => Some(Err(Error::invalid(
                        "Loader",
                        format!("loader thread stopped early at step {}", self.next_step),
                    ))),
                    Ok(()) => None,
                }
            }
        }
    }
}

impl<S: BatchSource> Drop for Loader<S> {
    fn drop(&mut self) {
        let _ = self.shut_down();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_orders_are_permutations() {
        for n in [0, 1, 2, 17, 1000] {
            let mut order = epoch_order(n, 3, 5, true);
            order.sort_unstable();
            assert_eq!(order, (0..n).collect::<Vec<_>>());
        }
        assert_eq!(epoch_order(5, 3, 5, false), vec![0, 1, 2, 3, 4]);
        assert_eq!(epoch_order(50, 3, 5, true), epoch_order(50, 3, 5, true));
        // Every position takes every value about equally often over many epochs.
        let mut first = [0usize; 4];
        for e in 0..4000 {
            first[epoch_order(4, 1, e, true)[0]] += 1;
        }
        assert!(first.iter().all(|&c| (850..1150).contains(&c)), "{first:?}");
    }

    #[test]
    fn steps_per_epoch_rounding() {
        assert_eq!(steps_per_epoch(10, 3, true), 3);
        assert_eq!(steps_per_epoch(10, 3, false), 4);
        assert_eq!(steps_per_epoch(9, 3, false), 3);
        assert_eq!(steps_per_epoch(2, 3, true), 0);
        assert_eq!(steps_per_epoch(10, 0, false), 0);
    }
}
