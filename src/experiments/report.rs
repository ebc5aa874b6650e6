//! The time-to-accuracy report: the paper's figure of merit over a set of finished runs.
//!
//! For each baseline run B (method `"baseline"`; there may be several, at different
//! durations): target = B's final evaluation, T_B = the first `train_seconds` at which B's own
//! evaluation reached it. For every other run R with the same metric: T_R = the first
//! `train_seconds` at which R's evaluation is >= target (none if it never is), and
//! speedup = T_B / T_R. Times are read at evaluation points, without interpolation, as in the
//! paper; a run's final evaluation from its summary counts as an evaluation at the end of its
//! training (see [`Run::eval_curve`]).
//!
//! Baselines are also timed against each other's targets: a shorter baseline that reaches a
//! longer one's accuracy sooner is part of the honest picture of what distillation buys.
//!
//! Beside the wall-clock view, the same comparison in training samples, which machine load
//! does not move: S_B and S_R are the samples seen at those same evaluations, samples
//! speedup = S_B / S_R (what the speedup would be if a distilling step cost what a plain step
//! costs), and cost ratio = (R's training seconds per sample) / (B's), each over its whole run
//! from the log's last record: the teachers' extra work times any difference in load between
//! the two runs. speedup = samples speedup / cost ratio exactly when each run trained at a
//! steady rate (seconds proportional to samples); a gap says a run's rate changed partway (load
//! that came and went, distillation that stopped early). A cost ratio far from the benchmarked
//! cost of a distilling step is load skew, not distillation.
//!
//! Splits: every time and target is on the **test** split (the log's `eval`), which is
//! reported and never chosen on; the validation metric (what sweeps rank teachers by) is shown
//! beside each run's final test metric.
//!
//! Seed noise: where runs of a baseline's configuration with other seeds exist (see
//! [`super::seeds`]), the spread of their times and samples to the baseline's target is given,
//! and a run that reached the target inside that spread is a tie (within seed spread), not a
//! speedup, in the tables and the findings.
//!
//! A run whose final metric is within one point of its majority floor (always predicting the
//! most frequent label; for MLM the most frequent token) is named in the notes: it has not left
//! that floor, and its times say nothing about learning.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::plot::{plot_accuracy_vs_time, PlotOptions, PlotOutcome};
use super::runlog::{
    first_point_reaching, CacheReads, EvalPoint, Run, BASELINE_METHOD, LOG_FILE,
    METRIC_MLM_ACCURACY, SUMMARY_FILE,
};
use super::seeds::{config_key, seed_of, ReplicaPoint, SeedSpread};
use super::{Error, Result};

/// A baseline's final evaluation, the target every other run is timed to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    /// The baseline run's name (as shown in the rows).
    pub baseline: String,
    pub metric: String,
    pub duration_samples: u64,
    /// The baseline's final evaluation.
    pub value: f32,
    /// T_B: the first training time at which the baseline's own evaluation reached `value`.
    pub baseline_seconds: f64,
    /// S_B: training samples seen at that evaluation; `None` when the baseline's log holds no
    /// record to read them from.
    pub baseline_samples: Option<u64>,
    /// The baseline's training seconds per sample over its whole run; `None` when its log has
    /// no record or no sample.
    pub baseline_seconds_per_sample: Option<f64>,
    /// The spread of time and samples to `value` over the baseline's seed replicas; `None`
    /// when the report holds only one seed of its configuration.
    pub seed_spread: Option<SeedSpread>,
}

/// One run timed against one baseline's target.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimeToTarget {
    pub baseline: String,
    pub target: f32,
    /// T_B.
    pub baseline_seconds: f64,
    /// T_R: first training time at which this run's evaluation was >= target; `None`: never.
    pub seconds: Option<f64>,
    /// T_B / T_R; `None` when not reached (or reached at time 0, where the ratio is undefined).
    pub speedup: Option<f64>,
    /// S_B.
    pub baseline_samples: Option<u64>,
    /// S_R: training samples seen at the evaluation that reached the target; `None` when not
    /// reached, or reached at a point whose samples are unknown (a log with no record).
    pub samples: Option<u64>,
    /// S_B / S_R; `None` when either is unknown, not reached, or S_R is 0.
    pub samples_speedup: Option<f64>,
    /// This run's training seconds per sample / the baseline's, each over its whole run; given
    /// whether or not the target was reached. `None` when either is unknown or the baseline's
    /// is 0.
    pub cost_ratio: Option<f64>,
    /// True on the baseline's own row (T_R = T_B, speedup 1).
    pub own_target: bool,
    /// Whether T_R lies inside the baseline's seed spread (a tie: chance alone moves the time
    /// that much); `None` on the own row, when not reached, or when the spread is unknown.
    pub within_seed_spread: Option<bool>,
    /// The same for S_R and the spread of samples.
    pub samples_within_seed_spread: Option<bool>,
}

/// One evaluation point of a run's curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CurvePoint {
    pub train_seconds: f64,
    /// Training samples seen at this evaluation (`None`: unknown, the log has no record).
    pub samples: Option<u64>,
    pub eval: f32,
}

/// One run in the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportRow {
    /// The run's name from its summary (with its directory added when two runs share a name).
    pub run: String,
    pub dir: PathBuf,
    pub method: String,
    pub metric: String,
    pub duration_samples: u64,
    pub steps: u64,
    /// Final metric on the test split.
    pub final_eval: f32,
    /// Final metric on the validation split (what teachers are ranked by); `None` without one.
    pub final_validation: Option<f32>,
    /// The test metric of always predicting the most frequent label; `None` when not recorded.
    pub majority_floor: Option<f32>,
    pub train_seconds: f64,
    /// Training samples seen over the run (the log's last record); `None` for an empty log.
    pub samples_seen: Option<u64>,
    /// Training seconds per sample over the run, from the log's last record.
    pub seconds_per_sample: Option<f64>,
    pub teacher_forwards: u64,
    /// Host seconds in teacher forwards (the summary's `teacher_seconds`).
    pub teacher_seconds: Option<f64>,
    /// What the run read from a teacher cache (the summary's `cache_reads`).
    pub cache_reads: Option<CacheReads>,
    pub teachers: Vec<String>,
    /// Evaluation curve: logged evaluations, then the final one if it was not logged.
    pub curve: Vec<CurvePoint>,
    /// One entry per baseline with the same metric, in the order of [`Report::targets`].
    pub vs_baselines: Vec<TimeToTarget>,
}

impl ReportRow {
    pub fn is_baseline(&self) -> bool {
        self.method == BASELINE_METHOD
    }

    /// Whether the run replayed teacher forwards from a teacher cache (its training time then
    /// lacks their cost, which the run that recorded them paid).
    pub fn read_cache(&self) -> bool {
        self.cache_reads.is_some_and(|c| c.forwards > 0)
    }
}

/// The teacher time a teacher cache saved the runs of a report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CacheSaving {
    /// Runs that replayed teacher forwards from a cache.
    pub readers: Vec<String>,
    /// Their reads, summed.
    pub reads: CacheReads,
    /// Runs with a cache that ran (and so recorded) teacher forwards, whose teacher time gives
    /// the rate.
    pub recorders: Vec<String>,
    /// Their teacher forwards and the host seconds those took.
    pub recorded_forwards: u64,
    pub recorded_seconds: f64,
    /// `reads.forwards × recorded_seconds / recorded_forwards`: the teacher time the replayed
    /// forwards would have cost at the recorders' measured rate; `None` without a recorder.
    pub seconds_saved: Option<f64>,
}

/// The report over a set of runs. Build it with [`build_report`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// One target per baseline run, ordered by metric, duration, name.
    pub targets: Vec<Target>,
    /// Baselines first, then the other methods by name; within a method by duration, name.
    pub rows: Vec<ReportRow>,
    /// One plain sentence per method (the baseline method only when there are several
    /// baselines to compare with each other).
    pub findings: Vec<String>,
    /// Directories with a `log.jsonl` but no `summary.json` (running or died), not included.
    pub incomplete: Vec<PathBuf>,
    /// What the teacher cache replayed and saved; `None` when no run read one.
    pub teacher_cache: Option<CacheSaving>,
    /// Anything else the reader should know (a torn last log line that was dropped, ...).
    pub notes: Vec<String>,
}

/// The files [`Report::write_to`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportFiles {
    pub markdown: PathBuf,
    pub json: PathBuf,
    pub plot: PlotOutcome,
}

/// Finds the finished runs (directories holding a `summary.json`) under `dir`, at any depth,
/// sorted by path; `dir` itself counts when it is a run. Hidden directories and symbolic links
/// to directories are not entered.
pub fn find_runs(dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let mut complete = Vec::new();
    let mut incomplete = Vec::new();
    walk_runs(dir.as_ref(), &mut complete, &mut incomplete)?;
    Ok(complete)
}

fn walk_runs(dir: &Path, complete: &mut Vec<PathBuf>, incomplete: &mut Vec<PathBuf>) -> Result<()> {
    if dir.join(SUMMARY_FILE).is_file() {
        complete.push(dir.to_path_buf());
        return Ok(());
    }
    if dir.join(LOG_FILE).is_file() {
        incomplete.push(dir.to_path_buf());
    }
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut subdirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let file_type = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if file_type.is_dir() && !hidden {
            subdirs.push(entry.path());
        }
    }
    subdirs.sort();
    for sub in subdirs {
        walk_runs(&sub, complete, incomplete)?;
    }
    Ok(())
}

/// Builds the report. Each path is a run directory (it holds `summary.json`) or a directory
/// searched for runs with [`find_runs`]. Fails on an unreadable or malformed run (the error
/// names the file and line) and when no run is found at all.
pub fn build_report(run_dirs: &[PathBuf]) -> Result<Report> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut incomplete = Vec::new();
    for path in run_dirs {
        if path.join(SUMMARY_FILE).is_file() {
            dirs.push(path.clone());
        } else if path.is_dir() {
            let before = dirs.len();
            walk_runs(path, &mut dirs, &mut incomplete)?;
            if dirs.len() == before && incomplete.is_empty() {
                return Err(Error::Invalid(format!(
                    "{}: no run found (a run directory holds {SUMMARY_FILE} and {LOG_FILE})",
                    path.display()
                )));
            }
        } else {
            return Err(Error::Invalid(format!(
                "{}: not a directory (give a run directory or a directory of runs)",
                path.display()
            )));
        }
    }
    let mut seen = BTreeSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    if dirs.is_empty() {
        return Err(Error::Invalid(format!(
            "no finished run (with {SUMMARY_FILE}) among {}",
            run_dirs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let runs = dirs.iter().map(Run::load).collect::<Result<Vec<_>>>()?;
    let mut report = report_from_runs(&runs);
    report.incomplete = incomplete;
    Ok(report)
}

/// Run names as shown: the summary's name, with the directory added when names collide.
fn display_names(runs: &[Run]) -> Vec<String> {
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for r in runs {
        *count.entry(r.summary.name.as_str()).or_default() += 1;
    }
    runs.iter()
        .map(|r| {
            if count[r.summary.name.as_str()] > 1 {
                format!("{} ({})", r.summary.name, r.dir.display())
            } else {
                r.summary.name.clone()
            }
        })
        .collect()
}

/// The report over runs already loaded.
pub fn report_from_runs(runs: &[Run]) -> Report {
    let names = display_names(runs);
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (&runs[a].summary, &runs[b].summary);
        (
            !ra.is_baseline(),
            &ra.method,
            ra.duration_samples,
            &names[a],
        )
            .cmp(&(
                !rb.is_baseline(),
                &rb.method,
                rb.duration_samples,
                &names[b],
            ))
    });
    let curves: Vec<Vec<EvalPoint>> = runs.iter().map(Run::eval_curve_with_samples).collect();
    let costs: Vec<Option<f64>> = runs.iter().map(Run::seconds_per_sample).collect();

    let mut targets: Vec<(usize, Target)> = order
        .iter()
        .filter(|&&i| runs[i].summary.is_baseline())
        .map(|&i| {
            let s = &runs[i].summary;
            let reached = first_point_reaching(&curves[i], s.final_eval);
            // The curve ends with the final evaluation, so `reached` is always found; keep
            // defined values (the end of the run) rather than a panic all the same.
            let seconds = reached.map_or(s.train_seconds, |p| p.train_seconds);
            let samples = reached.map_or_else(|| runs[i].samples_seen(), |p| p.samples);
            let target = Target {
                baseline: names[i].clone(),
                metric: s.metric.clone(),
                duration_samples: s.duration_samples,
                value: s.final_eval,
                baseline_seconds: seconds,
                baseline_samples: samples,
                baseline_seconds_per_sample: costs[i],
                seed_spread: None,
            };
            (i, target)
        })
        .collect();
    targets.sort_by(|(_, a), (_, b)| {
        (&a.metric, a.duration_samples, &a.baseline).cmp(&(
            &b.metric,
            b.duration_samples,
            &b.baseline,
        ))
    });

    let keys: Vec<Option<String>> = runs.iter().map(|r| config_key(&r.summary.config)).collect();
    for (bi, t) in targets.iter_mut() {
        let Some(key) = keys[*bi].as_ref() else {
            continue;
        };
        let replicas: Vec<(String, u64, ReplicaPoint)> = order
            .iter()
            .filter(|&&j| keys[j].as_ref() == Some(key) && runs[j].summary.metric == t.metric)
            .map(|&j| {
                let point = if j == *bi {
                    Some((t.baseline_seconds, t.baseline_samples))
                } else {
                    first_point_reaching(&curves[j], t.value).map(|p| (p.train_seconds, p.samples))
                };
                (names[j].clone(), seed_of(&runs[j].summary.config), point)
            })
            .collect();
        t.seed_spread = SeedSpread::over(&replicas);
    }

    let mut notes = Vec::new();
    let rows: Vec<ReportRow> = order
        .iter()
        .map(|&i| {
            let run = &runs[i];
            let s = &run.summary;
            if let Some(line) = run.log.dropped_torn_line {
                notes.push(format!(
                    "{}: line {line} was cut off mid-write (the run was killed while logging) \
                     and was ignored",
                    run.log.path.display()
                ));
            }
            let vs_baselines = targets
                .iter()
                .filter(|(_, t)| t.metric == s.metric)
                .map(|&(bi, ref t)| {
                    let own = bi == i;
                    let (seconds, samples) = if own {
                        (Some(t.baseline_seconds), t.baseline_samples)
                    } else {
                        first_point_reaching(&curves[i], t.value)
                            .map_or((None, None), |p| (Some(p.train_seconds), p.samples))
                    };
                    let samples_speedup = match (t.baseline_samples, samples) {
                        (Some(sb), Some(sr)) if sr > 0 => Some(sb as f64 / sr as f64),
                        _ => None,
                    };
                    let cost_ratio = match (costs[i], t.baseline_seconds_per_sample) {
                        (Some(cr), Some(cb)) if cb > 0.0 => Some(cr / cb),
                        _ => None,
                    };
                    let spread = t.seed_spread.as_ref().filter(|_| !own);
                    TimeToTarget {
                        within_seed_spread: spread
                            .zip(seconds)
                            .map(|(sp, s)| sp.contains_seconds(s)),
                        samples_within_seed_spread: spread
                            .zip(samples)
                            .and_then(|(sp, n)| sp.contains_samples(n)),
                        baseline: t.baseline.clone(),
                        target: t.value,
                        baseline_seconds: t.baseline_seconds,
                        seconds,
                        speedup: seconds
                            .filter(|&tr| tr > 0.0)
                            .map(|tr| t.baseline_seconds / tr),
                        baseline_samples: t.baseline_samples,
                        samples,
                        samples_speedup,
                        cost_ratio,
                        own_target: own,
                    }
                })
                .collect();
            ReportRow {
                run: names[i].clone(),
                dir: run.dir.clone(),
                method: s.method.clone(),
                metric: s.metric.clone(),
                duration_samples: s.duration_samples,
                steps: s.steps,
                final_eval: s.final_eval,
                final_validation: s.final_validation,
                majority_floor: s.majority_floor,
                train_seconds: s.train_seconds,
                samples_seen: run.samples_seen(),
                seconds_per_sample: costs[i],
                teacher_forwards: s.teacher_forwards,
                teacher_seconds: s.teacher_seconds,
                cache_reads: s.cache_reads,
                teachers: s.teachers.clone(),
                curve: curves[i]
                    .iter()
                    .map(|p| CurvePoint {
                        train_seconds: p.train_seconds,
                        samples: p.samples,
                        eval: p.eval,
                    })
                    .collect(),
                vs_baselines,
            }
        })
        .collect();
    let targets: Vec<Target> = targets.into_iter().map(|(_, t)| t).collect();
    notes.extend(floor_notes(&rows));
    let findings = findings(&rows, &targets);
    let teacher_cache = cache_saving(&rows);
    Report {
        targets,
        rows,
        findings,
        incomplete: Vec::new(),
        teacher_cache,
        notes,
    }
}

/// The teacher cache's account over `rows`: the forwards the readers replayed, priced at the
/// teacher seconds per forward the recording runs measured.
fn cache_saving(rows: &[ReportRow]) -> Option<CacheSaving> {
    let readers: Vec<&ReportRow> = rows.iter().filter(|r| r.read_cache()).collect();
    if readers.is_empty() {
        return None;
    }
    let mut reads = CacheReads::default();
    for r in &readers {
        reads.add(&r.cache_reads.unwrap_or_default());
    }
    let recorders: Vec<&ReportRow> = rows
        .iter()
        .filter(|r| r.cache_reads.is_some() && r.teacher_forwards > 0)
        .filter(|r| r.teacher_seconds.is_some())
        .collect();
    let recorded_forwards: u64 = recorders.iter().map(|r| r.teacher_forwards).sum();
    let recorded_seconds: f64 = recorders.iter().filter_map(|r| r.teacher_seconds).sum();
    let seconds_saved = (recorded_forwards > 0)
        .then(|| reads.forwards as f64 * recorded_seconds / recorded_forwards as f64);
    Some(CacheSaving {
        readers: readers.iter().map(|r| r.run.clone()).collect(),
        reads,
        recorders: recorders.iter().map(|r| r.run.clone()).collect(),
        recorded_forwards,
        recorded_seconds,
        seconds_saved,
    })
}

/// The run's name in a table, marked when its time lacks the teachers' cost.
fn run_cell(r: &ReportRow) -> String {
    if r.read_cache() {
        cell(&format!("{} (teacher cache)", r.run))
    } else {
        cell(&r.run)
    }
}

impl CacheSaving {
    /// The report's paragraph on the cache.
    fn markdown(&self) -> String {
        let mut md = format!(
            "{} read teacher outputs from a teacher cache instead of running the teachers \
             ({}): {} teacher forwards replayed at {} steps, {} rows of teacher logits \
             ({}) read. ",
            plural(self.readers.len(), "run", "runs"),
            self.readers.join(", "),
            self.reads.forwards,
            self.reads.steps,
            self.reads.rows,
            bytes_text(self.reads.bytes),
        );
        match self.seconds_saved {
            Some(saved) => md.push_str(&format!(
                "The runs that ran the teachers and recorded the cache ({}) spent {:.1} s in {} \
                 teacher forwards ({:.1} ms each, measured around the forwards on the host \
                 clock); at that rate the cache saved {saved:.1} s of teacher time. ",
                self.recorders.join(", "),
                self.recorded_seconds,
                self.recorded_forwards,
                1e3 * self.recorded_seconds / self.recorded_forwards as f64,
            )),
            None => md.push_str(
                "No run here recorded the cache with its teachers' time measured, so the \
                 teacher time saved is not known. ",
            ),
        }
        md.push_str(
            "A run marked \"(teacher cache)\" in the tables trained without the teachers' \
             forwards: its wall-clock does not include their cost, which the recording runs \
             paid.\n\n",
        );
        md
    }
}

fn bytes_text(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MB", b as f64 / (1u64 << 20) as f64)
    } else if b >= 1 << 10 {
        format!("{:.1} KB", b as f64 / 1024.0)
    } else {
        format!("{b} bytes")
    }
}

/// "accuracy" / "MLM accuracy" / the metric's own name.
fn metric_words(metric: &str) -> String {
    if metric == METRIC_MLM_ACCURACY {
        "MLM accuracy".to_string()
    } else {
        metric.to_string()
    }
}

fn pct(v: f32) -> String {
    format!("{:.2}%", f64::from(v) * 100.0)
}

fn secs(t: f64) -> String {
    format!("{t:.1} s")
}

fn speedup_text(x: f64) -> String {
    format!("{x:.2}×")
}

/// Seconds per sample as microseconds: a CPU run is hundreds, a GPU run a few or less, so
/// keep three decimals below one.
fn micros_text(seconds: f64) -> String {
    let us = seconds * 1e6;
    if us >= 1.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.3}")
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// One sentence per (method, metric): did any of the method's runs reach a baseline's final
/// value sooner than that baseline did, and for which baselines.
fn findings(rows: &[ReportRow], targets: &[Target]) -> Vec<String> {
    let mut groups: BTreeMap<(bool, &str, &str), Vec<&ReportRow>> = BTreeMap::new();
    for r in rows {
        groups
            .entry((!r.is_baseline(), r.method.as_str(), r.metric.as_str()))
            .or_default()
            .push(r);
    }
    let mut out = Vec::new();
    for ((_, method, metric), group) in groups {
        let is_baseline = method == BASELINE_METHOD;
        let metric_targets: Vec<&Target> = targets.iter().filter(|t| t.metric == metric).collect();
        let runs = plural(group.len(), "run", "runs");
        if metric_targets.is_empty() {
            out.push(format!(
                "{method} ({runs}, {}): no baseline run with this metric, so there is no time \
                 to compare against.",
                metric_words(metric)
            ));
            continue;
        }
        if is_baseline && metric_targets.len() < 2 {
            // A single baseline compared with itself says nothing.
            continue;
        }
        let words = metric_words(metric);
        let mut sooner = Vec::new();
        let mut clauses = Vec::new();
        for t in &metric_targets {
            // The fastest of this method's runs to this target (a baseline is not timed against
            // its own target here).
            let best = group
                .iter()
                .filter_map(|r| {
                    let vs = r.vs_baselines.iter().find(|v| v.baseline == t.baseline)?;
                    if vs.own_target {
                        return None;
                    }
                    vs.seconds
                        .map(|s| (s, vs.speedup, r.run.as_str(), vs.within_seed_spread))
                })
                .min_by(|a, b| a.0.total_cmp(&b.0));
            let what = format!("{}'s {}", t.baseline, pct(t.value));
            let ratio = |x: Option<f64>| x.map_or("undefined ratio".to_string(), speedup_text);
            clauses.push(match best {
                None => format!("{what} never reached"),
                Some((s, x, run, within)) => {
                    let tie = within == Some(true);
                    let faster = s < t.baseline_seconds && !tie;
                    if faster {
                        sooner.push(t.baseline.clone());
                    }
                    let verdict = if tie {
                        format!(
                            ", a tie (within seed spread {})",
                            t.seed_spread
                                .as_ref()
                                .map_or(String::new(), spread_seconds_text)
                        )
                    } else if faster {
                        String::new()
                    } else {
                        ", not sooner".to_string()
                    };
                    format!(
                        "{what} reached in {} (run {run}) vs {} for {} itself, {}{verdict}",
                        secs(s),
                        secs(t.baseline_seconds),
                        t.baseline,
                        ratio(x),
                    )
                }
            });
        }
        let n = metric_targets.len();
        let out_of = if n == 1 {
            "the baseline".to_string()
        } else {
            format!("{} of {n} baselines", sooner.len())
        };
        let sentence = match (is_baseline, sooner.is_empty()) {
            (false, true) => format!(
                "{method} ({runs}) did not reach any baseline's final {words} sooner than that \
                 baseline itself"
            ),
            (false, false) => format!(
                "{method} ({runs}) reached the final {words} of {out_of} sooner than the baseline \
                 itself ({})",
                sooner.join(", ")
            ),
            (true, true) => format!(
                "Baseline runs against each other ({runs}): none reached another baseline's final \
                 {words} sooner than that baseline itself"
            ),
            (true, false) => format!(
                "Baseline runs against each other ({runs}): another baseline run reached the \
                 final {words} of {out_of} sooner than that baseline itself ({})",
                sooner.join(", ")
            ),
        };
        out.push(format!("{sentence}: {}.", clauses.join("; ")));
    }
    out
}

/// "10.0–12.2 s over seeds 0, 1" (an open spread: "from 10.0 s, 1 of 2 seeds never reached").
fn spread_seconds_text(sp: &SeedSpread) -> String {
    let seeds = sp
        .seeds
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    match sp.max_seconds {
        Some(max) => format!("{:.1}–{:.1} s over seeds {seeds}", sp.min_seconds, max),
        None => format!(
            "from {:.1} s over seeds {seeds}, {} never reached",
            sp.min_seconds,
            plural(sp.not_reached, "run", "runs")
        ),
    }
}

/// Samples spread, as [`spread_seconds_text`]; `None` when the replicas' samples are unknown.
fn spread_samples_text(sp: &SeedSpread) -> Option<String> {
    let min = sp.min_samples?;
    Some(match sp.max_samples {
        Some(max) => format!("{min}–{max}"),
        None => format!("from {min} ({} never reached)", sp.not_reached),
    })
}

/// How far above its majority floor a final metric must be for the run to have left it.
pub const FLOOR_MARGIN: f32 = 0.01;

/// One note per run whose final test metric is within [`FLOOR_MARGIN`] of its majority floor.
fn floor_notes(rows: &[ReportRow]) -> Vec<String> {
    let stuck: Vec<&ReportRow> = rows
        .iter()
        .filter(|r| {
            r.majority_floor
                .is_some_and(|f| r.final_eval < f + FLOOR_MARGIN)
        })
        .collect();
    if stuck.is_empty() {
        return Vec::new();
    }
    let list = stuck
        .iter()
        .map(|r| {
            format!(
                "{} ({} vs floor {})",
                r.run,
                pct(r.final_eval),
                pct(r.majority_floor.unwrap_or(0.0))
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    vec![format!(
        "{} of {} runs {} not left the floor of always predicting the most frequent label \
         (they end within {} point of it): {list}. Their times to a target measure noise, not \
         learning.",
        stuck.len(),
        rows.len(),
        if stuck.len() == 1 { "has" } else { "have" },
        FLOOR_MARGIN * 100.0
    )]
}

/// Escapes a table cell: a `|` would end the cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

impl Report {
    /// The report as Markdown: a table of runs, one time-to-accuracy table per baseline (the
    /// shape of the paper's tables 3, 5 and 6) and the findings, one sentence per method.
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let n_base = self.rows.iter().filter(|r| r.is_baseline()).count();
        md.push_str("# Time-to-accuracy report\n\n");
        md.push_str(&format!(
            "{} ({}). Time is training wall-clock (`train_seconds`): evaluation and \
             checkpointing excluded. A run's time to a target is the training time of its first \
             evaluation at or above the target; speedup = baseline's time to its own final \
             value / run's time to that value. The same in training samples, which machine \
             load does not move: samples to a target are those seen at that evaluation; \
             samples speedup = baseline's samples to its own final value / run's samples to it \
             (the speedup if a distilling step cost what a plain step costs); cost per sample = \
             run's training seconds per sample / the baseline's, each over its whole run \
             (teacher work times any difference in load between the runs). Speedup = samples \
             speedup / cost per sample when both runs trained at a steady rate; a cost far from \
             a distilling step's benchmarked cost is load, not distillation. Every metric, time \
             and target is on the test split, which nothing is chosen on; the validation metric \
             (held out of the training data, what teachers are ranked by) is shown beside the \
             final one. Where a baseline's configuration was trained with several seeds, a run \
             that reached its target inside the seeds' spread is a tie (within seed spread), \
             not a speedup.\n\n",
            plural(self.rows.len(), "run", "runs"),
            plural(n_base, "baseline", "baselines"),
        ));

        md.push_str("## Runs\n\n");
        md.push_str(
            "| Method | Run | Duration (samples) | Steps | Final metric (test) | Validation | \
             Train time (s) | Teacher forwards | Teachers | Samples seen | Train µs / sample |\n",
        );
        md.push_str(
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |\n",
        );
        for r in &self.rows {
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} {} | {} | {:.1} | {} | {} | {} | {} |\n",
                cell(&r.method),
                run_cell(r),
                r.duration_samples,
                r.steps,
                pct(r.final_eval),
                cell(&metric_words(&r.metric)),
                r.final_validation.map_or("—".to_string(), pct),
                r.train_seconds,
                r.teacher_forwards,
                if r.teachers.is_empty() {
                    "—".to_string()
                } else {
                    cell(&r.teachers.join(", "))
                },
                r.samples_seen
                    .map_or("unknown".to_string(), |n| n.to_string()),
                r.seconds_per_sample
                    .map_or("unknown".to_string(), micros_text),
            ));
        }
        md.push('\n');

        md.push_str("## Time to baseline accuracy\n\n");
        if self.targets.is_empty() {
            md.push_str(&format!(
                "No baseline run (method \"{BASELINE_METHOD}\") among these runs: no \
                 time-to-accuracy comparison is possible.\n\n"
            ));
        }
        for t in &self.targets {
            let words = metric_words(&t.metric);
            md.push_str(&format!(
                "### Baseline {}: final {} {} ({} samples), reached at {:.1} s{}\n\n",
                t.baseline,
                words,
                pct(t.value),
                t.duration_samples,
                t.baseline_seconds,
                t.baseline_samples.map_or(
                    " (samples unknown: its log has no record)".to_string(),
                    |n| format!(" and {n} samples")
                ),
            ));
            match &t.seed_spread {
                Some(sp) => md.push_str(&format!(
                    "Seed spread of this configuration ({}): time to {} {}{}. A run inside it \
                     is a tie (within seed spread).\n\n",
                    sp.runs.join(", "),
                    pct(t.value),
                    spread_seconds_text(sp),
                    spread_samples_text(sp).map_or(String::new(), |s| format!(", samples {s}")),
                )),
                None => md.push_str(
                    "One seed of this configuration: no seed spread, so a speedup against this \
                     baseline cannot be told from seed noise (train it with another seed to \
                     measure the spread).\n\n",
                ),
            }
            md.push_str(&format!(
                "| Method | Run | Duration (samples) | Final {words} | Time to {pct} (s) | \
                 Speedup | Samples to {pct} | Samples speedup | Cost per sample vs baseline |\n",
                pct = pct(t.value)
            ));
            md.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
            for r in &self.rows {
                let Some(vs) = r.vs_baselines.iter().find(|v| v.baseline == t.baseline) else {
                    continue;
                };
                let (time, speedup) = match (vs.seconds, vs.speedup) {
                    (None, _) => ("not reached".to_string(), "not reached".to_string()),
                    (Some(s), Some(x)) if vs.own_target => (
                        format!("{s:.1}"),
                        format!("{} (own target)", speedup_text(x)),
                    ),
                    (Some(s), Some(x)) if vs.within_seed_spread == Some(true) => (
                        format!("{s:.1}"),
                        format!("{} — tie (within seed spread)", speedup_text(x)),
                    ),
                    (Some(s), Some(x)) => (format!("{s:.1}"), speedup_text(x)),
                    (Some(s), None) => (format!("{s:.1}"), "undefined (time 0)".to_string()),
                };
                let (samples, samples_speedup) = match (vs.seconds, vs.samples) {
                    (None, _) => ("not reached".to_string(), "not reached".to_string()),
                    // Reached at the appended final evaluation of a run whose log is empty.
                    (Some(_), None) => ("unknown".to_string(), "unknown".to_string()),
                    (Some(_), Some(n)) => (
                        n.to_string(),
                        match vs.samples_speedup {
                            Some(x) if vs.own_target => {
                                format!("{} (own target)", speedup_text(x))
                            }
                            Some(x) if vs.samples_within_seed_spread == Some(true) => {
                                format!("{} — tie (within seed spread)", speedup_text(x))
                            }
                            Some(x) => speedup_text(x),
                            None if n == 0 => "undefined (0 samples)".to_string(),
                            None => "unknown (baseline's samples)".to_string(),
                        },
                    ),
                };
                md.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    cell(&r.method),
                    run_cell(r),
                    r.duration_samples,
                    pct(r.final_eval),
                    time,
                    speedup,
                    samples,
                    samples_speedup,
                    vs.cost_ratio.map_or("unknown".to_string(), speedup_text),
                ));
            }
            md.push('\n');
        }

        if let Some(c) = &self.teacher_cache {
            md.push_str("## Teacher cache\n\n");
            md.push_str(&c.markdown());
        }

        md.push_str("## Findings\n\n");
        for f in &self.findings {
            md.push_str(&format!("- {f}\n"));
        }
        if self.findings.is_empty() {
            md.push_str("- Only baseline runs: nothing to compare.\n");
        }
        md.push('\n');

        if !self.incomplete.is_empty() || !self.notes.is_empty() {
            md.push_str("## Not included, and notes\n\n");
            for d in &self.incomplete {
                md.push_str(&format!(
                    "- {}: {LOG_FILE} without {SUMMARY_FILE} (still running, or stopped before \
                     finishing): not included.\n",
                    d.display()
                ));
            }
            for n in &self.notes {
                md.push_str(&format!("- {n}\n"));
            }
            md.push('\n');
        }
        md
    }

    /// The report as pretty-printed JSON (targets, rows with curves and comparisons, findings).
    /// `null` for a time or speedup means "not reached"; `null` samples, samples speedup or
    /// cost ratio with a time present means "unknown" (a log with no record) or, for a
    /// ratio, undefined (a zero denominator). See [`TimeToTarget`].
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| Error::Invalid(format!("report to JSON: {e}")))
    }

    /// Writes `report.md`, `report.json` and `accuracy_vs_time.png` into `out_dir` (created if
    /// needed). The plot is drawn without text if no font is found; see [`PlotOutcome`].
    pub fn write_to(&self, out_dir: impl AsRef<Path>, plot: &PlotOptions) -> Result<ReportFiles> {
        let out_dir = out_dir.as_ref();
        fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
        let markdown = out_dir.join("report.md");
        super::runlog::write_atomic(&markdown, self.to_markdown().as_bytes())?;
        let json = out_dir.join("report.json");
        super::runlog::write_atomic(&json, self.to_json()?.as_bytes())?;
        let plot = plot_accuracy_vs_time(self, out_dir.join("accuracy_vs_time.png"), plot)?;
        Ok(ReportFiles {
            markdown,
            json,
            plot,
        })
    }
}
