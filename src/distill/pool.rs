//! A pool of frozen teachers and the strategies of the paper's section 5.4 for choosing which
//! of them run at a step.
//!
//! - `Single`: the best teacher (by recorded accuracy) every step;
//! - `Ensemble { k }`: the k best, every step, their logits averaged (cost grows with k);
//! - `RandomSubset { k }`: k of the N drawn without replacement at each step, averaged;
//! - `RandomOne`: one of the N drawn at each step — the ensemble's benefit at O(1) cost.
//!
//! Draws are a pure function of `(seed, step)`, so a resumed run draws the same teachers as
//! an uninterrupted one without saving any sampler state.

use std::sync::atomic::{AtomicU64, Ordering};

use recycle_engine::rng::Rng;
use recycle_engine::{Error, Result, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TeacherStrategy {
    Single,
    Ensemble { k: usize },
    RandomSubset { k: usize },
    RandomOne,
}

impl TeacherStrategy {
    /// Parses `single`, `ensemble:K`, `random-subset:K` or `random-one`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                "TeacherStrategy",
                format!("`{s}`: use single, ensemble:K, random-subset:K or random-one"),
            )
        };
        let (name, k) = match s.split_once(':') {
            Some((n, k)) => (n, Some(k.parse::<usize>().map_err(|_| bad())?)),
            None => (s, None),
        };
        match (name, k) {
            ("single", None) => Ok(TeacherStrategy::Single),
            ("random-one", None) => Ok(TeacherStrategy::RandomOne),
            ("ensemble", Some(k)) => Ok(TeacherStrategy::Ensemble { k }),
            ("random-subset", Some(k)) => Ok(TeacherStrategy::RandomSubset { k }),
            _ => Err(bad()),
        }
    }

    /// Teacher forwards per distilled step.
    pub fn forwards_per_step(&self) -> usize {
        match *self {
            TeacherStrategy::Single | TeacherStrategy::RandomOne => 1,
            TeacherStrategy::Ensemble { k } | TeacherStrategy::RandomSubset { k } => k,
        }
    }
}

/// One frozen teacher and what is known about it.
#[derive(Debug, Clone)]
pub struct TeacherEntry<M> {
    pub name: String,
    /// Its recorded evaluation accuracy (ranks teachers for `Single` and `Ensemble`).
    pub accuracy: f32,
    pub model: M,
}

#[derive(Debug)]
pub struct TeacherPool<M> {
    teachers: Vec<TeacherEntry<M>>,
    strategy: TeacherStrategy,
    seed: u64,
    /// Indices sorted by accuracy, best first (ties keep the given order).
    ranked: Vec<usize>,
    forwards: AtomicU64,
}

impl<M> TeacherPool<M> {
    pub fn new(
        teachers: Vec<TeacherEntry<M>>,
        strategy: TeacherStrategy,
        seed: u64,
    ) -> Result<Self> {
        let n = teachers.len();
        if n == 0 {
            return Err(Error::invalid(
                "TeacherPool",
                "no teachers: give at least one teacher checkpoint".to_string(),
            ));
        }
        if let TeacherStrategy::Ensemble { k } | TeacherStrategy::RandomSubset { k } = strategy {
            if k == 0 || k > n {
                return Err(Error::invalid(
                    "TeacherPool",
                    format!("{strategy:?} needs 1 <= k <= {n} (the number of teachers)"),
                ));
            }
        }
        let mut ranked: Vec<usize> = (0..n).collect();
        ranked.sort_by(|&a, &b| teachers[b].accuracy.total_cmp(&teachers[a].accuracy));
        Ok(TeacherPool {
            teachers,
            strategy,
            seed,
            ranked,
            forwards: AtomicU64::new(0),
        })
    }

    pub fn len(&self) -> usize {
        self.teachers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.teachers.is_empty()
    }

    pub fn strategy(&self) -> TeacherStrategy {
        self.strategy
    }

    pub fn teachers(&self) -> &[TeacherEntry<M>] {
        &self.teachers
    }

    /// Indices of the teachers that run at `step`.
    pub fn select(&self, step: u64) -> Vec<usize> {
        let n = self.teachers.len();
        match self.strategy {
            TeacherStrategy::Single => vec![self.ranked[0]],
            TeacherStrategy::Ensemble { k } => self.ranked[..k].to_vec(),
            TeacherStrategy::RandomOne => {
                let mut rng = Rng::new(recycle_engine::rng::bits_at(self.seed, step));
                vec![rng.below(n as u64) as usize]
            }
            TeacherStrategy::RandomSubset { k } => {
                // A partial Fisher-Yates shuffle: the first k of a uniformly random permutation.
                let mut rng = Rng::new(recycle_engine::rng::bits_at(self.seed, step));
                let mut idx: Vec<usize> = (0..n).collect();
                for i in 0..k {
                    let j = i + rng.below((n - i) as u64) as usize;
                    idx.swap(i, j);
                }
                idx.truncate(k);
                idx
            }
        }
    }

    /// Runs `forward` on each teacher selected for `step` and returns their logits (the loss
    /// averages them). Counts every forward.
    pub fn logits<F>(&self, step: u64, mut forward: F) -> Result<Vec<Tensor>>
    where
        F: FnMut(&M) -> Result<Tensor>,
    {
        self.select(step)
            .into_iter()
            .map(|i| {
                self.forwards.fetch_add(1, Ordering::Relaxed);
                forward(&self.teachers[i].model).map_err(|e| {
                    Error::invalid(
                        "TeacherPool",
                        format!("teacher `{}` failed: {e}", self.teachers[i].name),
                    )
                })
            })
            .collect()
    }

    /// Teacher forwards run so far.
    pub fn forwards(&self) -> u64 {
        self.forwards.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize, strategy: TeacherStrategy, seed: u64) -> TeacherPool<usize> {
        let teachers = (0..n)
            .map(|i| TeacherEntry {
                name: format!("t{i}"),
                accuracy: [0.7, 0.9, 0.8, 0.6, 0.85][i % 5],
                model: i,
            })
            .collect();
        TeacherPool::new(teachers, strategy, seed).unwrap()
    }

    #[test]
    fn single_and_ensemble_pick_the_best_by_accuracy() {
        assert_eq!(pool(4, TeacherStrategy::Single, 0).select(5), vec![1]);
        assert_eq!(
            pool(5, TeacherStrategy::Ensemble { k: 3 }, 0).select(9),
            vec![1, 4, 2]
        );
    }

    #[test]
    fn random_one_runs_exactly_one_teacher_per_step_uniformly() {
        let p = pool(4, TeacherStrategy::RandomOne, 11);
        let mut counts = [0usize; 4];
        let steps = 20_000u64;
        for step in 0..steps {
            let out = p
                .logits(step, |&m| Tensor::f32(vec![m as f32], &[1]))
                .unwrap();
            assert_eq!(out.len(), 1);
            counts[out[0].to_scalar_f32().unwrap() as usize] += 1;
        }
        assert_eq!(p.forwards(), steps);
        // Chi-square with 3 degrees of freedom; 16.27 is the 0.001 critical value.
        let e = steps as f64 / 4.0;
        let chi2: f64 = counts.iter().map(|&c| (c as f64 - e).powi(2) / e).sum();
        assert!(chi2 < 16.27, "{counts:?} chi2 {chi2}");
    }

    #[test]
    fn random_subset_draws_k_distinct_teachers_reproducibly() {
        let p = pool(5, TeacherStrategy::RandomSubset { k: 3 }, 2);
        let q = pool(5, TeacherStrategy::RandomSubset { k: 3 }, 2);
        let other = pool(5, TeacherStrategy::RandomSubset { k: 3 }, 3);
        let mut pair_counts = [0usize; 5];
        let mut differs = false;
        for step in 0..5000 {
            let s = p.select(step);
            assert_eq!(s, q.select(step), "same seed, same draw");
            differs |= s != other.select(step);
            let mut d = s.clone();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), 3, "without replacement: {s:?}");
            for i in s {
                pair_counts[i] += 1;
            }
        }
        assert!(differs);
        for c in pair_counts {
            assert!((c as i64 - 3000).abs() < 200, "{pair_counts:?}");
        }
    }

    #[test]
    fn bad_strategies_are_errors() {
        let t = vec![TeacherEntry {
            name: "a".into(),
            accuracy: 0.5,
            model: (),
        }];
        assert!(TeacherPool::new(t.clone(), TeacherStrategy::Ensemble { k: 2 }, 0).is_err());
        assert!(TeacherPool::<()>::new(vec![], TeacherStrategy::Single, 0).is_err());
        assert_eq!(
            TeacherStrategy::parse("random-subset:2").unwrap(),
            TeacherStrategy::RandomSubset { k: 2 }
        );
        assert!(TeacherStrategy::parse("ensemble").is_err());
        assert!(TeacherStrategy::parse("bogus").is_err());
    }
}
