//! Seed noise as part of the measurement: runs of one configuration that differ only in their
//! seed (and name) are seed replicas, and the spread of their times and samples to a target is
//! what chance alone moves. A speedup inside that spread is a tie, not a speedup.
//!
//! Replicas are found from the recipe each summary records (`config`): equal once the fields
//! that do not change the experiment are removed (name, seed, label, output directory). A sweep
//! point and a baseline with the same learning rate, duration and data are thus replicas even
//! though the report files them under different methods.

use serde::Serialize;

/// Recipe fields that name or place a run, or draw its randomness, without changing the
/// configuration being measured.
const NOT_CONFIGURATION: [&str; 4] = ["name", "seed", "label", "out_dir"];

/// The configuration of a recorded recipe, as a comparable string; `None` when the summary
/// recorded no recipe (then the run has no known replicas).
pub fn config_key(config: &serde_json::Value) -> Option<String> {
    let mut map = config.as_object()?.clone();
    for field in NOT_CONFIGURATION {
        map.remove(field);
    }
    serde_json::to_string(&map).ok()
}

/// The seed of a recorded recipe (a recipe without one trained with the default, 0).
pub fn seed_of(config: &serde_json::Value) -> u64 {
    config.get("seed").and_then(|s| s.as_u64()).unwrap_or(0)
}

/// The spread of one target over the seed replicas of the baseline that set it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeedSpread {
    /// The replicas (the baseline included), by name as the report shows them.
    pub runs: Vec<String>,
    /// Their distinct seeds, ascending (at least two).
    pub seeds: Vec<u64>,
    /// The soonest training time at which a replica reached the target.
    pub min_seconds: f64,
    /// The latest such time; `None` when a replica never reached it (the spread is open).
    pub max_seconds: Option<f64>,
    /// The fewest samples at which a replica reached the target (`None`: samples unknown).
    pub min_samples: Option<u64>,
    /// The most; `None` when a replica never reached it or its samples are unknown.
    pub max_samples: Option<u64>,
    /// Replicas that never reached the target.
    pub not_reached: usize,
}

/// One replica's result at a target: `None` when it never reached it, else the training time
/// and samples (`None` when unknown) at the evaluation that did.
pub type ReplicaPoint = Option<(f64, Option<u64>)>;

impl SeedSpread {
    /// The spread over `replicas` (`(name, seed, point)`), or `None` with fewer than two
    /// distinct seeds or no replica that reached the target.
    pub fn over(replicas: &[(String, u64, ReplicaPoint)]) -> Option<SeedSpread> {
        let mut seeds: Vec<u64> = replicas.iter().map(|r| r.1).collect();
        seeds.sort_unstable();
        seeds.dedup();
        if seeds.len() < 2 {
            return None;
        }
        let reached: Vec<(f64, Option<u64>)> = replicas.iter().filter_map(|r| r.2).collect();
        let not_reached = replicas.len() - reached.len();
        let min_seconds = reached.iter().map(|p| p.0).min_by(f64::total_cmp)?;
        let max_seconds = reached.iter().map(|p| p.0).max_by(f64::total_cmp);
        let samples: Option<Vec<u64>> = reached.iter().map(|p| p.1).collect();
        let (min_samples, max_samples) = match samples {
            Some(s) => (s.iter().copied().min(), s.iter().copied().max()),
            None => (None, None),
        };
        let open = not_reached > 0;
        Some(SeedSpread {
            runs: replicas.iter().map(|r| r.0.clone()).collect(),
            seeds,
            min_seconds,
            max_seconds: max_seconds.filter(|_| !open),
            min_samples,
            max_samples: max_samples.filter(|_| !open),
            not_reached,
        })
    }

    /// Whether a run that reached the target at `seconds` is inside the spread of time: no
    /// sooner than the soonest replica and no later than the latest (an open spread has no
    /// upper end).
    pub fn contains_seconds(&self, seconds: f64) -> bool {
        seconds >= self.min_seconds && self.max_seconds.is_none_or(|m| seconds <= m)
    }

    /// [`SeedSpread::contains_seconds`] for samples; `None` when the replicas' samples are
    /// unknown.
    pub fn contains_samples(&self, samples: u64) -> Option<bool> {
        let min = self.min_samples?;
        Some(samples >= min && self.max_samples.is_none_or(|m| samples <= m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ignores_name_seed_label_and_place_only() {
        let a = serde_json::json!({"name": "a", "seed": 0, "label": "sweep", "out_dir": "x",
            "optimizer": {"lr": 0.2}, "train": {"epochs": 16.0}});
        let b = serde_json::json!({"name": "b", "seed": 1, "out_dir": "y",
            "optimizer": {"lr": 0.2}, "train": {"epochs": 16.0}});
        let c = serde_json::json!({"name": "b", "seed": 1, "out_dir": "y",
            "optimizer": {"lr": 0.1}, "train": {"epochs": 16.0}});
        assert_eq!(config_key(&a), config_key(&b));
        assert_ne!(config_key(&b), config_key(&c));
        assert_eq!(config_key(&serde_json::Value::Null), None);
        assert_eq!((seed_of(&a), seed_of(&b)), (0, 1));
    }

    #[test]
    fn spread_needs_two_seeds_and_opens_when_a_replica_never_reached() {
        let one = [("a".to_string(), 1, Some((10.0, Some(100))))];
        assert_eq!(SeedSpread::over(&one), None);
        let two = [
            ("a".to_string(), 1, Some((10.0, Some(100)))),
            ("b".to_string(), 0, Some((12.2, Some(120)))),
        ];
        let s = SeedSpread::over(&two).unwrap();
        assert_eq!((s.min_seconds, s.max_seconds), (10.0, Some(12.2)));
        assert_eq!((s.min_samples, s.max_samples), (Some(100), Some(120)));
        assert_eq!(s.seeds, vec![0, 1]);
        assert!(s.contains_seconds(11.0) && s.contains_seconds(12.2));
        assert!(!s.contains_seconds(9.9) && !s.contains_seconds(12.3));
        assert_eq!(s.contains_samples(99), Some(false));
        let open = [
            ("a".to_string(), 1, Some((10.0, Some(100)))),
            ("b".to_string(), 2, None),
        ];
        let s = SeedSpread::over(&open).unwrap();
        assert_eq!((s.max_seconds, s.not_reached), (None, 1));
        assert!(s.contains_seconds(1e9) && !s.contains_seconds(9.0));
    }
}
