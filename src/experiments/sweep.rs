//! `recycle sweep`: the teacher grid of the paper — the same recipe trained at several
//! learning rates. The runs are the leftovers that later runs recycle as teachers; each
//! records its accuracy in its `summary.json`. They are ranked on the validation split held out
//! of the training data, never on the test split, which is only reported.

use std::path::PathBuf;

use recycle_engine::{Error, Result};

use crate::experiments::runlog::RunSummary;
use crate::recipe::Recipe;
use crate::trainer::{self, RunOptions};

/// One trained point of the sweep.
#[derive(Debug, Clone)]
pub struct SweepPoint {
    pub lr: f32,
    pub dir: PathBuf,
    pub summary: RunSummary,
}

/// The recipe of the sweep point at `lr`: the base recipe without distillation, named
/// `<name>-lr<lr>` and labelled `sweep`.
pub fn sweep_recipe(base: &Recipe, lr: f32) -> Recipe {
    let mut r = base.clone();
    r.name = format!("{}-lr{lr}", base.name);
    r.optimizer.lr = lr;
    r.distill = None;
    r.label = Some("sweep".into());
    r
}

/// Trains `base` at each learning rate of `lrs`; returns the points, best validation accuracy
/// first (see [`rank_by_validation`]).
pub fn run_sweep(base: &Recipe, lrs: &[f32], opts: &RunOptions) -> Result<Vec<SweepPoint>> {
    if lrs.is_empty() {
        return Err(Error::invalid(
            "sweep",
            "no learning rates: give at least one, e.g. --lrs 0.1,0.2,0.4".to_string(),
        ));
    }
    // Every point is checked before the first trains, and no two may share a run directory.
    let recipes: Vec<Recipe> = lrs.iter().map(|&lr| sweep_recipe(base, lr)).collect();
    for (i, r) in recipes.iter().enumerate() {
        r.validate()?;
        if let Some(first) = recipes[..i].iter().find(|q| q.name == r.name) {
            return Err(Error::invalid(
                "sweep",
                format!(
                    "learning rates {} and {} both name run `{}`: give each rate once",
                    first.optimizer.lr, r.optimizer.lr, r.name
                ),
            ));
        }
    }
    let mut points = Vec::new();
    for (&lr, r) in lrs.iter().zip(recipes) {
        eprintln!("sweep: training {} (lr {lr})", r.name);
        let summary = trainer::run(&r, opts)?;
        points.push(SweepPoint {
            lr,
            dir: r.out_dir.join(&r.name),
            summary,
        });
    }
    rank_by_validation(&mut points)?;
    Ok(points)
}

/// Orders sweep points by their final validation metric, best first (ties keep the given
/// order). The test metric plays no part. A point without a validation metric (trained with
/// `data.validation_fraction = 0`) is an error: ranking it would mean choosing on test.
pub fn rank_by_validation(points: &mut [SweepPoint]) -> Result<()> {
    if let Some(p) = points.iter().find(|p| p.summary.final_validation.is_none()) {
        return Err(Error::invalid(
            "sweep",
            format!(
                "{}: the run has no validation metric to rank it by (its recipe keeps no \
                 validation split); set data.validation_fraction above 0, e.g. 0.1, and train \
                 it again",
                p.dir.display()
            ),
        ));
    }
    let key = |p: &SweepPoint| p.summary.final_validation.unwrap_or(0.0);
    points.sort_by(|a, b| key(b).total_cmp(&key(a)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(lr: f32, validation: Option<f32>, test: f32) -> SweepPoint {
        SweepPoint {
            lr,
            dir: PathBuf::from(format!("runs/fmnist-lr{lr}")),
            summary: RunSummary {
                name: format!("fmnist-lr{lr}"),
                method: "sweep".into(),
                metric: "accuracy".into(),
                duration_samples: 1000,
                steps: 10,
                final_eval: test,
                final_validation: validation,
                majority_floor: Some(0.1),
                train_seconds: 1.0,
                teacher_forwards: 0,
                teacher_seconds: None,
                cache_reads: None,
                skipped_steps: 0,
                device: None,
                teachers: vec![],
                config: serde_json::Value::Null,
            },
        }
    }

    /// Validation and test disagree: lr 0.2 is best on test, lr 0.1 on validation. The sweep
    /// picks lr 0.1.
    #[test]
    fn teachers_are_ranked_on_validation_not_test() {
        let mut points = vec![
            point(0.05, Some(0.70), 0.71),
            point(0.2, Some(0.78), 0.83),
            point(0.1, Some(0.81), 0.80),
        ];
        rank_by_validation(&mut points).unwrap();
        let order: Vec<f32> = points.iter().map(|p| p.lr).collect();
        assert_eq!(order, vec![0.1, 0.2, 0.05]);

        let mut unranked = vec![point(0.1, Some(0.8), 0.8), point(0.2, None, 0.9)];
        let err = rank_by_validation(&mut unranked).unwrap_err().to_string();
        assert!(
            err.contains("runs/fmnist-lr0.2") && err.contains("validation_fraction"),
            "{err}"
        );
    }
}
