//! `recycle sweep`: the teacher grid of the paper — the same recipe trained at several
//! learning rates. The runs are the leftovers that later runs recycle as teachers; each
//! records its accuracy in its `summary.json`, which ranks it in a teacher pool.

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

/// Trains `base` at each learning rate of `lrs`; returns the points, best accuracy first.
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
    points.sort_by(|a, b| b.summary.final_eval.total_cmp(&a.summary.final_eval));
    Ok(points)
}
