//! The gradient reduction of one step, fed by the backward pass.
//!
//! [`GradReducer`] is what a transport implements: `begin` a step on the flat gradient buffer
//! with this rank's weight, `start` a bucket (a range of the buffer whose gradients are all
//! final), `finish` (every bucket summed over the ranks, weighted). MPI implements it on a
//! communication thread (`mpi_group`); a NCCL implementation would enqueue each bucket's
//! all-reduce on the communication stream in `start` and join it in `finish`.
//!
//! [`GradSync`] is what the trainer holds: the reducer and the [`BucketPlan`], turned by the
//! tape's hook ([`recycle_engine::Tape::backward_hooked`]) into a `start` per bucket as soon as
//! its last parameter is final.

use std::ops::Range;
use std::time::Instant;

use recycle_engine::params::ParamEntry;
use recycle_engine::{Error, Result, Tensor};

use super::buckets::BucketPlan;

/// Averages one step's gradients over the ranks, bucket by bucket.
pub trait GradReducer: Send {
    /// Starts a step on `grads` (the flat f32 gradient buffer, the same length on every rank).
    /// This rank's gradients count with `weight`: its share of the global batch's loss terms
    /// (1/N for N equal shards); the weights of all ranks sum to 1.
    fn begin(&mut self, grads: &Tensor, weight: f32) -> Result<()>;
    /// Starts reducing `range` of the buffer: every gradient in it is final. May return
    /// before the reduction is done; the range is not written by the caller until `finish`.
    fn start(&mut self, range: Range<usize>) -> Result<()>;
    /// Waits for every started range: the buffer then holds `sum over ranks of weight * grad`,
    /// the same bits on every rank.
    fn finish(&mut self) -> Result<()>;
    /// Seconds the reductions themselves took so far (on whatever thread runs them).
    fn reduce_seconds(&self) -> f64;
}

/// One process: the weighted sum over one rank is the gradient times its weight (1).
#[derive(Default)]
pub struct SingleProcess {
    grads: Option<(Tensor, f32)>,
    started: Vec<Range<usize>>,
}

impl GradReducer for SingleProcess {
    fn begin(&mut self, grads: &Tensor, weight: f32) -> Result<()> {
        self.grads = Some((grads.clone(), weight));
        self.started.clear();
        Ok(())
    }

    fn start(&mut self, range: Range<usize>) -> Result<()> {
        self.started.push(range);
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        let Some((grads, weight)) = self.grads.take() else {
            return Err(not_begun());
        };
        if weight != 1.0 {
            let mut g = grads.write_f32()?;
            for r in self.started.drain(..) {
                g[r].iter_mut().for_each(|v| *v *= weight);
            }
        }
        Ok(())
    }

    fn reduce_seconds(&self) -> f64 {
        0.0
    }
}

pub(crate) fn not_begun() -> Error {
    Error::invalid(
        "GradReducer",
        "a bucket was reduced outside a step (begin was not called)".to_string(),
    )
}

/// What a run's reductions cost, for the end-of-run report.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReduceTimes {
    pub steps: u64,
    /// Seconds from the start of backward to the end of `finish`: the backward and whatever
    /// of the reduction it did not hide.
    pub backward_seconds: f64,
    /// Seconds `finish` waited for reductions after backward ended (the exposed part).
    pub wait_seconds: f64,
    /// Seconds the reductions took where they ran.
    pub reduce_seconds: f64,
}

/// The trainer's side of the reduction: the reducer and the bucket plan of its model.
pub struct GradSync {
    reducer: Box<dyn GradReducer>,
    plan: BucketPlan,
    /// Start buckets during backward (`true`), or all of them after it (to measure overlap).
    overlap: bool,
    step_started: Option<Instant>,
    times: ReduceTimes,
}

impl GradSync {
    /// A reduction of the buffer laid out as `entries` (`len` gradients) in buckets of about
    /// `bucket_elems` gradients.
    pub fn new(
        reducer: Box<dyn GradReducer>,
        entries: &[ParamEntry],
        len: usize,
        bucket_elems: usize,
        overlap: bool,
    ) -> GradSync {
        GradSync {
            reducer,
            plan: BucketPlan::new(entries, len, bucket_elems),
            overlap,
            step_started: None,
            times: ReduceTimes::default(),
        }
    }

    pub fn plan(&self) -> &BucketPlan {
        &self.plan
    }

    /// Before backward: a new step on `grads`, this rank counting with `weight`.
    pub fn begin(&mut self, grads: &Tensor, weight: f32) -> Result<()> {
        self.plan.reset();
        self.step_started = Some(Instant::now());
        self.reducer.begin(grads, weight)
    }

    /// The tape's hook: `grad` (a parameter's view of the buffer) is final.
    pub fn param_ready(&mut self, grad: &Tensor) -> Result<()> {
        if !self.overlap {
            return Ok(());
        }
        for range in self.plan.ready(grad.offset(), grad.elem_count()) {
            self.reducer.start(range)?;
        }
        Ok(())
    }

    /// After backward: starts the buckets not started yet and waits for all of them.
    pub fn finish(&mut self) -> Result<()> {
        let waited = Instant::now();
        for range in self.plan.take_rest() {
            self.reducer.start(range)?;
        }
        self.reducer.finish()?;
        let t = &mut self.times;
        t.steps += 1;
        t.wait_seconds += waited.elapsed().as_secs_f64();
        if let Some(s) = self.step_started.take() {
            t.backward_seconds += s.elapsed().as_secs_f64();
        }
        t.reduce_seconds = self.reducer.reduce_seconds();
        Ok(())
    }

    pub fn times(&self) -> ReduceTimes {
        self.times
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use recycle_engine::ops::elementwise::{mul, sum};
    use recycle_engine::{FlatParams, Tape};

    /// The buckets a reducer saw, in order, with what they held.
    type Seen = std::sync::Arc<std::sync::Mutex<Vec<(Range<usize>, Vec<f32>)>>>;

    /// A reducer that records the order buckets arrive in and what they held when they did.
    struct Recording {
        grads: Option<Tensor>,
        seen: Seen,
    }

    impl GradReducer for Recording {
        fn begin(&mut self, grads: &Tensor, _: f32) -> Result<()> {
            self.grads = Some(grads.clone());
            Ok(())
        }
        fn start(&mut self, range: Range<usize>) -> Result<()> {
            let g = self.grads.as_ref().ok_or_else(not_begun)?.read_f32()?;
            self.seen
                .lock()
                .unwrap()
                .push((range.clone(), g[range].to_vec()));
            Ok(())
        }
        fn finish(&mut self) -> Result<()> {
            Ok(())
        }
        fn reduce_seconds(&self) -> f64 {
            0.0
        }
    }

    /// loss = sum(a * a) + sum(b * c): buckets [a], [b, c] of 4 gradients; backward finishes
    /// `b` and `c` first, so the last bucket starts first, already holding its final values.
    #[test]
    fn buckets_start_in_backward_with_their_final_gradients() {
        let specs = vec![
            ("a".to_string(), vec![4]),
            ("b".to_string(), vec![2]),
            ("c".to_string(), vec![2]),
        ];
        let p = FlatParams::new(&specs, recycle_engine::Device::Cpu).unwrap();
        p.values()
            .write_f32()
            .unwrap()
            .copy_from_slice(&[1., 2., 3., 4., 5., 6., 7., 8.]);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let reducer = Recording {
            grads: None,
            seen: seen.clone(),
        };
        let mut sync = GradSync::new(Box::new(reducer), p.entries(), p.len(), 4, true);
        assert_eq!(sync.plan().ranges(), &[0..4, 4..8]);
        let tape = Tape::recording();
        let (a, b, c) = (
            p.var(&tape, "a").unwrap(),
            p.var(&tape, "b").unwrap(),
            p.var(&tape, "c").unwrap(),
        );
        let la = sum(&tape, &mul(&tape, &a, &a).unwrap()).unwrap();
        let lbc = sum(&tape, &mul(&tape, &b, &c).unwrap()).unwrap();
        let loss = recycle_engine::ops::elementwise::add(&tape, &la, &lbc).unwrap();
        sync.begin(p.grads(), 1.0).unwrap();
        tape.backward_hooked(&loss, &mut |g| sync.param_ready(g))
            .unwrap();
        sync.finish().unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(
            *seen,
            vec![(4..8, vec![7., 8., 5., 6.]), (0..4, vec![2., 4., 6., 8.]),]
        );
        assert_eq!(sync.times().steps, 1);
    }

    #[test]
    fn one_process_scales_by_its_weight_and_refuses_a_bucket_outside_a_step() {
        let g = Tensor::f32(vec![2.0, 4.0, 6.0], &[3]).unwrap();
        let mut r = SingleProcess::default();
        assert!(r.finish().is_err());
        r.begin(&g, 1.0).unwrap();
        r.start(0..3).unwrap();
        r.finish().unwrap();
        assert_eq!(g.to_vec_f32().unwrap(), vec![2.0, 4.0, 6.0]);
        r.begin(&g, 0.5).unwrap();
        r.start(1..3).unwrap();
        r.finish().unwrap();
        assert_eq!(g.to_vec_f32().unwrap(), vec![2.0, 2.0, 3.0]);
    }
}
