//! The run directory format: what a training run writes and what the report reads.
//!
//! A run directory holds two files:
//!
//! ## `log.jsonl` — one JSON object per line, appended as training goes
//!
//! Each line is a [`RunLogRecord`]:
//!
//! ```json
//! {"step":500,"samples":64000,"train_seconds":61.2,"wall_seconds":70.9,"lr":0.1,"ce":0.61,"kd":0.12,"loss":0.73,"teacher_forwards":500,"eval":0.8132,"validation":0.8215}
//! ```
//!
//! | field | type | meaning |
//! | --- | --- | --- |
//! | `step` | u64 | optimizer steps completed |
//! | `samples` | u64 | training samples seen (cumulative) |
//! | `train_seconds` | f64 | wall-clock spent **training**, cumulative, excluding evaluation and checkpoint time: the paper's clock, and the one the report uses |
//! | `wall_seconds` | f64 | wall-clock since the run started, everything included |
//! | `lr` | f32 | learning rate used at this step |
//! | `ce` | f32 | cross-entropy with the labels |
//! | `kd` | f32 or null | distillation loss (already weighted or not: the trainer documents which), null when no teacher ran at this step |
//! | `loss` | f32 | the loss that was back-propagated |
//! | `teacher_forwards` | u64 | teacher forward passes so far (cumulative; an ensemble of k counts k per step) |
//! | `eval` | f32 or null | evaluation metric in [0, 1] (accuracy, or masked-token accuracy for MLM) on the **test** split when an evaluation ran at this step, else null or absent: what reports show, never what anything is chosen on |
//! | `validation` | f32 or absent | the same metric, at the same evaluation, on the **validation** split held out of the training data (`data.validation_fraction`): what sweeps and searches choose on; absent when the run keeps no validation split (and in logs written before it existed) |
//!
//! Rules the reader enforces (a violation is an error naming the file and the line):
//! - every line parses as a record (blank lines are skipped);
//! - `step`, `samples`, `train_seconds` and `teacher_forwards` never decrease from one line to
//!   the next (equal is allowed, e.g. an evaluation record written after the training record
//!   of the same step). A resumed run must therefore restore them from its checkpoint;
//! - `train_seconds` and `wall_seconds` are finite and >= 0; `eval` and `validation`, when
//!   present, are finite and in [0, 1] (fractions, not percentages).
//!
//! JSON has no NaN: a diverged run's non-finite `lr`, `ce` or `loss` is written as `null` and
//! read back as NaN; a non-finite `kd` is written as `null` and reads back as "no KD".
//!
//! A process killed mid-write can leave a last line without its newline. The reader drops such
//! a torn final line when it does not parse (and says so in [`RunLog::dropped_torn_line`]);
//! a malformed line anywhere else is an error.
//!
//! The trainer writes with [`RunLogWriter`]: one `write` per record, flushed to the OS, so
//! the log is readable while the run goes on. On resume from a checkpoint at step S,
//! [`RunLogWriter::open_for_resume`] keeps the records with `step <= S` (rewriting the file
//! atomically: temp file + rename) and appends after them, so the steps redone after the
//! checkpoint are not logged twice.
//!
//! ## `summary.json` — written once, atomically, when the run finishes
//!
//! A [`RunSummary`]: name, method (`"baseline"` exactly for runs without distillation; free
//! text otherwise, e.g. `"kd-kl"`, `"kd-mse"`, `"random-one"`, `"ensemble-2"`), metric
//! (`"accuracy"` or `"mlm-accuracy"`), duration in samples, steps, final evaluation on the test
//! split (`final_eval`) and on the validation split (`final_validation`, absent without one),
//! the test metric of always predicting the most frequent label (`majority_floor`), training
//! seconds, teacher forwards, teacher names and the recipe as JSON. A directory with a
//! `log.jsonl` and no `summary.json` is a run still going or one that died.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use super::{Error, Result};

/// File name of the per-step log inside a run directory.
pub const LOG_FILE: &str = "log.jsonl";
/// File name of the end-of-run summary inside a run directory.
pub const SUMMARY_FILE: &str = "summary.json";
/// The method name that marks a run without distillation (a baseline).
pub const BASELINE_METHOD: &str = "baseline";
/// Metric name: classification accuracy.
pub const METRIC_ACCURACY: &str = "accuracy";
/// Metric name: masked-language-model accuracy on masked tokens.
pub const METRIC_MLM_ACCURACY: &str = "mlm-accuracy";

/// One line of `log.jsonl`. See the module documentation for each field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunLogRecord {
    pub step: u64,
    pub samples: u64,
    /// Cumulative wall-clock spent training, excluding evaluation and checkpoint time.
    pub train_seconds: f64,
    /// Wall-clock since the run started, everything included.
    pub wall_seconds: f64,
    #[serde(deserialize_with = "f32_or_nan")]
    pub lr: f32,
    #[serde(deserialize_with = "f32_or_nan")]
    pub ce: f32,
    #[serde(default)]
    pub kd: Option<f32>,
    #[serde(deserialize_with = "f32_or_nan")]
    pub loss: f32,
    /// Cumulative teacher forward passes.
    pub teacher_forwards: u64,
    /// Evaluation metric in [0, 1] on the test split when an evaluation ran at this step.
    #[serde(default)]
    pub eval: Option<f32>,
    /// The same evaluation on the validation split (absent without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<f32>,
    /// Set on a step skipped under `train.on_nonfinite = "skip"`: where its NaN or infinity
    /// was (`input`, `teacher-logits`, `weights`, `logits`, `loss`, `gradients`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Steps skipped so far (cumulative; absent while none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_steps: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// serde_json writes a non-finite float as `null`; read it back as NaN instead of failing, so a
/// diverged run's log stays readable.
fn f32_or_nan<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
}

impl RunLogRecord {
    /// Checks one record on its own: finite, non-negative times and an evaluation in [0, 1].
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (name, v) in [
            ("train_seconds", self.train_seconds),
            ("wall_seconds", self.wall_seconds),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!(
                    "{name} must be a finite number >= 0, got {v} (step {})",
                    self.step
                ));
            }
        }
        for (name, v) in [("eval", self.eval), ("validation", self.validation)] {
            if let Some(e) = v {
                if !e.is_finite() || !(0.0..=1.0).contains(&e) {
                    return Err(format!(
                        "{name} must be a fraction in [0, 1], got {e} (step {}); write 0.8 for 80%",
                        self.step
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks that this record may follow `prev`: cumulative counters never decrease.
    pub fn validate_after(&self, prev: &RunLogRecord) -> std::result::Result<(), String> {
        let checks: [(&str, f64, f64); 4] = [
            ("step", prev.step as f64, self.step as f64),
            ("samples", prev.samples as f64, self.samples as f64),
            ("train_seconds", prev.train_seconds, self.train_seconds),
            (
                "teacher_forwards",
                prev.teacher_forwards as f64,
                self.teacher_forwards as f64,
            ),
        ];
        for (name, before, now) in checks {
            if now < before {
                return Err(format!(
                    "{name} went backwards: {now} after {before} on the previous record \
                     (a resumed run must restore its counters from the checkpoint)"
                ));
            }
        }
        Ok(())
    }
}

/// A parsed `log.jsonl`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunLog {
    pub path: PathBuf,
    pub records: Vec<RunLogRecord>,
    /// 1-based line number of a torn final line (no newline, does not parse) that was dropped.
    pub dropped_torn_line: Option<usize>,
}

/// One line of the file as read: its number, its text, and the record it holds.
struct ParsedLine<'a> {
    text: &'a str,
    record: RunLogRecord,
}

/// Parses the whole file, enforcing the rules in the module documentation. Returns the lines
/// (text kept verbatim, for resume) and the line number of a dropped torn tail.
fn parse_log<'a>(path: &Path, bytes: &'a [u8]) -> Result<(Vec<ParsedLine<'a>>, Option<usize>)> {
    let mut out: Vec<ParsedLine<'a>> = Vec::new();
    let mut torn = None;
    let ends_with_newline = bytes.last().is_none_or(|&b| b == b'\n');
    let segments: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    // `split` yields an empty last segment when the file ends with '\n'.
    let n = segments.len();
    for (i, seg) in segments.into_iter().enumerate() {
        let line_no = i + 1;
        let is_unterminated_tail = i + 1 == n && !ends_with_newline;
        let text = match std::str::from_utf8(seg) {
            Ok(t) => t.trim_end_matches('\r'),
            Err(_) if is_unterminated_tail => {
                torn = Some(line_no);
                break;
            }
            Err(e) => return Err(Error::malformed(path, line_no, format!("not UTF-8: {e}"))),
        };
        if text.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<RunLogRecord>(text)
            .map_err(|e| format!("not a run-log record: {e}"))
            .and_then(|r| r.validate().map(|()| r));
        let record = match parsed {
            Ok(r) => r,
            Err(_) if is_unterminated_tail => {
                torn = Some(line_no);
                break;
            }
            Err(msg) => return Err(Error::malformed(path, line_no, msg)),
        };
        if let Some(prev) = out.last() {
            record
                .validate_after(&prev.record)
                .map_err(|msg| Error::malformed(path, line_no, msg))?;
        }
        out.push(ParsedLine { text, record });
    }
    Ok((out, torn))
}

impl RunLog {
    /// Reads and checks a `log.jsonl`. Errors name the file and the 1-based line.
    pub fn read(path: impl AsRef<Path>) -> Result<RunLog> {
        let path = path.as_ref();
        let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
        let (lines, torn) = parse_log(path, &bytes)?;
        Ok(RunLog {
            path: path.to_path_buf(),
            records: lines.into_iter().map(|l| l.record).collect(),
            dropped_torn_line: torn,
        })
    }

    /// The evaluation points `(train_seconds, eval)` in log order.
    pub fn eval_points(&self) -> Vec<(f64, f32)> {
        self.records
            .iter()
            .filter_map(|r| r.eval.map(|e| (r.train_seconds, e)))
            .collect()
    }
}

/// Appends records to a `log.jsonl`, one `write` per record, flushed to the OS each time.
#[derive(Debug)]
pub struct RunLogWriter {
    path: PathBuf,
    file: File,
    last: Option<RunLogRecord>,
}

impl RunLogWriter {
    /// Starts a new log at `path` (creating its parent directories), truncating any existing
    /// file: use [`RunLogWriter::open_for_resume`] to continue a run.
    pub fn create(path: impl AsRef<Path>) -> Result<RunLogWriter> {
        let path = path.as_ref();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        Ok(RunLogWriter {
            path: path.to_path_buf(),
            file,
            last: None,
        })
    }

    /// Continues the log of a run resumed from a checkpoint taken at `step`: keeps the records
    /// with `step <= step` (verbatim), drops the later ones (they will be redone) and a torn
    /// final line, rewrites the file atomically (temp file + rename), and appends after it.
    /// A missing file starts an empty log. A malformed line before the torn tail is an error:
    /// nothing is dropped silently.
    pub fn open_for_resume(path: impl AsRef<Path>, step: u64) -> Result<RunLogWriter> {
        let path = path.as_ref();
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Self::create(path),
            Err(e) => return Err(Error::io(path, e)),
        };
        let (lines, _torn) = parse_log(path, &bytes)?;
        let kept: Vec<&ParsedLine<'_>> = lines.iter().filter(|l| l.record.step <= step).collect();
        let mut text = String::with_capacity(bytes.len());
        for l in &kept {
            text.push_str(l.text);
            text.push('\n');
        }
        write_atomic(path, text.as_bytes())?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(RunLogWriter {
            path: path.to_path_buf(),
            file,
            last: kept.last().map(|l| l.record.clone()),
        })
    }

    /// Appends one record. It must pass the same checks the reader makes (finite times, an
    /// evaluation in [0, 1], counters not going backwards), so a log this writer wrote always
    /// reads back.
    pub fn append(&mut self, record: &RunLogRecord) -> Result<()> {
        let invalid = |msg: String| Error::Invalid(format!("{}: {msg}", self.path.display()));
        record.validate().map_err(invalid)?;
        if let Some(prev) = &self.last {
            record.validate_after(prev).map_err(invalid)?;
        }
        let mut line = serde_json::to_string(record)
            .map_err(|e| Error::Invalid(format!("{}: {e}", self.path.display())))?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))?;
        self.last = Some(record.clone());
        Ok(())
    }

    /// The last record written or kept on resume.
    pub fn last(&self) -> Option<&RunLogRecord> {
        self.last.as_ref()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What a finished run records about itself, in `summary.json`.
/// What a run read from a teacher cache (`summary.json`'s `cache_reads`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheReads {
    /// Steps whose every selected teacher's rows came from the cache.
    pub steps: u64,
    /// Teacher forwards those steps replayed (one per teacher read at a step).
    pub forwards: u64,
    /// Rows of teacher logits read (images, or masked positions).
    pub rows: u64,
    /// Bytes of those rows as the cache's shards store them.
    pub bytes: u64,
}

impl CacheReads {
    pub fn add(&mut self, other: &CacheReads) {
        self.steps += other.steps;
        self.forwards += other.forwards;
        self.rows += other.rows;
        self.bytes += other.bytes;
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Unique name of the run, shown in the report.
    pub name: String,
    /// `"baseline"` (exactly) for runs without distillation; free text otherwise.
    pub method: String,
    /// `"accuracy"` or `"mlm-accuracy"`; runs are only compared with baselines of the same metric.
    pub metric: String,
    /// Training duration the schedule was set for, in samples.
    pub duration_samples: u64,
    pub steps: u64,
    /// Final evaluation metric in [0, 1], on the test split: reported, never chosen on.
    pub final_eval: f32,
    /// Final evaluation metric on the validation split: what sweeps rank teachers by. Absent
    /// when the run kept no validation split, and in summaries written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_validation: Option<f32>,
    /// The test metric of always predicting the test split's most frequent label (for MLM, the
    /// most frequent masked token): a run at or near it has learnt nothing beyond that. Absent
    /// in summaries written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub majority_floor: Option<f32>,
    /// Total training seconds (the same clock as the log's `train_seconds`).
    pub train_seconds: f64,
    pub teacher_forwards: u64,
    /// Host seconds the run spent in its teachers' forwards: on the CPU the forwards
    /// themselves, on a GPU the time to queue them. Absent for a run without teachers, and in
    /// summaries written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_seconds: Option<f64>,
    /// What the run read from its teacher cache instead of running teachers; absent for a run
    /// without `[distill] cache`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_reads: Option<CacheReads>,
    /// Steps skipped under `train.on_nonfinite = "skip"` (absent when none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_steps: u64,
    /// The device the run trained on: `cpu`, or the GPU's ordinal and name
    /// (`cuda:0 NVIDIA H200`); absent in summaries written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Names (or checkpoint paths) of the teachers; empty for a baseline.
    #[serde(default)]
    pub teachers: Vec<String>,
    /// The recipe the run was trained with.
    #[serde(default)]
    pub config: serde_json::Value,
}

impl RunSummary {
    pub fn is_baseline(&self) -> bool {
        self.method == BASELINE_METHOD
    }

    /// Checks the values the report relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (field, v) in [
            ("name", &self.name),
            ("method", &self.method),
            ("metric", &self.metric),
        ] {
            if v.trim().is_empty() {
                return Err(format!("{field} must not be empty"));
            }
        }
        if !self.final_eval.is_finite() || !(0.0..=1.0).contains(&self.final_eval) {
            return Err(format!(
                "final_eval must be a fraction in [0, 1], got {}",
                self.final_eval
            ));
        }
        for (field, v) in [
            ("final_validation", self.final_validation),
            ("majority_floor", self.majority_floor),
        ] {
            if let Some(v) = v.filter(|v| !v.is_finite() || !(0.0..=1.0).contains(v)) {
                return Err(format!("{field} must be a fraction in [0, 1], got {v}"));
            }
        }
        if !self.train_seconds.is_finite() || self.train_seconds < 0.0 {
            return Err(format!(
                "train_seconds must be a finite number >= 0, got {}",
                self.train_seconds
            ));
        }
        Ok(())
    }

    /// Writes `run_dir/summary.json` atomically (temp file + rename), creating `run_dir`.
    pub fn write(&self, run_dir: impl AsRef<Path>) -> Result<PathBuf> {
        let run_dir = run_dir.as_ref();
        let path = run_dir.join(SUMMARY_FILE);
        self.validate()
            .map_err(|msg| Error::Invalid(format!("{}: {msg}", path.display())))?;
        fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
        let mut text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        text.push('\n');
        write_atomic(&path, text.as_bytes())?;
        Ok(path)
    }

    /// Reads `run_dir/summary.json`, or the file itself when given its path.
    pub fn read(path: impl AsRef<Path>) -> Result<RunSummary> {
        let path = path.as_ref();
        let path = if path.is_dir() {
            path.join(SUMMARY_FILE)
        } else {
            path.to_path_buf()
        };
        let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let summary: RunSummary = serde_json::from_str(&text)
            .map_err(|e| Error::malformed(&path, e.line(), format!("not a run summary: {e}")))?;
        summary
            .validate()
            .map_err(|msg| Error::Invalid(format!("{}: {msg}", path.display())))?;
        Ok(summary)
    }
}

/// A finished run read back from its directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub dir: PathBuf,
    pub summary: RunSummary,
    pub log: RunLog,
}

impl Run {
    /// Reads `dir/summary.json` and `dir/log.jsonl`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Run> {
        let dir = dir.as_ref();
        let summary = RunSummary::read(dir.join(SUMMARY_FILE))?;
        let log = RunLog::read(dir.join(LOG_FILE))?;
        Ok(Run {
            dir: dir.to_path_buf(),
            summary,
            log,
        })
    }

    /// The run's evaluation curve `(train_seconds, eval)`: the logged evaluations, plus the
    /// summary's final evaluation at the end of training when the log's last evaluation is not
    /// that value (a final evaluation that was not logged still counts).
    pub fn eval_curve(&self) -> Vec<(f64, f32)> {
        self.eval_curve_with_samples()
            .into_iter()
            .map(|p| (p.train_seconds, p.eval))
            .collect()
    }

    /// [`Run::eval_curve`] with the training samples seen at each point. An appended final
    /// evaluation is placed at the log's last record (the end of training): its samples are
    /// that record's, unknown only when the log holds no record at all.
    pub fn eval_curve_with_samples(&self) -> Vec<EvalPoint> {
        let mut points: Vec<EvalPoint> = self
            .log
            .records
            .iter()
            .filter_map(|r| {
                r.eval.map(|eval| EvalPoint {
                    train_seconds: r.train_seconds,
                    samples: Some(r.samples),
                    eval,
                })
            })
            .collect();
        if points.last().map(|p| p.eval) != Some(self.summary.final_eval) {
            let end = points.last().map_or(self.summary.train_seconds, |p| {
                p.train_seconds.max(self.summary.train_seconds)
            });
            points.push(EvalPoint {
                train_seconds: end,
                samples: self.samples_seen(),
                eval: self.summary.final_eval,
            });
        }
        points
    }

    /// Training samples seen over the whole run: the log's last record (the counter is
    /// cumulative and never decreases). `None` for a log with no record.
    pub fn samples_seen(&self) -> Option<u64> {
        self.log.records.last().map(|r| r.samples)
    }

    /// The run's training seconds per sample over the whole run, both read from the log's last
    /// record (one line, so the two counters describe the same moment). `None` when the log has
    /// no record or no sample was seen (the ratio would be undefined).
    pub fn seconds_per_sample(&self) -> Option<f64> {
        let last = self.log.records.last()?;
        (last.samples > 0).then(|| last.train_seconds / last.samples as f64)
    }

    /// The first training time at which the evaluation reached `target` (>=), if it did.
    pub fn time_to_reach(&self, target: f32) -> Option<f64> {
        first_time_reaching(&self.eval_curve(), target)
    }
}

/// One point of a run's evaluation curve, as [`Run::eval_curve_with_samples`] gives it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalPoint {
    /// Training seconds at the evaluation (the log's clock).
    pub train_seconds: f64,
    /// Training samples seen at the evaluation; `None` only for a final evaluation of a run
    /// whose log holds no record.
    pub samples: Option<u64>,
    pub eval: f32,
}

/// The first point in `curve` (in order) whose value is >= `target`.
pub fn first_point_reaching(curve: &[EvalPoint], target: f32) -> Option<&EvalPoint> {
    curve.iter().find(|p| p.eval >= target)
}

/// The first time in `curve` (in order) whose value is >= `target`.
pub fn first_time_reaching(curve: &[(f64, f32)], target: f32) -> Option<f64> {
    curve.iter().find(|&&(_, e)| e >= target).map(|&(t, _)| t)
}

/// Writes `bytes` to `path` so that a reader sees either the old file or the new one, never a
/// partial write: a temp file beside it, fsync, rename over, then fsync the directory
/// (best effort: not every file system allows it).
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?;
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64, t: f64, eval: Option<f32>) -> RunLogRecord {
        RunLogRecord {
            step,
            samples: step * 32,
            train_seconds: t,
            wall_seconds: t * 1.1,
            lr: 0.1,
            ce: 1.0,
            kd: None,
            loss: 1.0,
            teacher_forwards: 0,
            eval,
            validation: None,
            skipped: None,
            skipped_steps: 0,
        }
    }

    #[test]
    fn nan_losses_round_trip_as_nan() {
        let mut r = rec(1, 1.0, None);
        r.loss = f32::NAN;
        r.kd = Some(f32::INFINITY);
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.contains("\"loss\":null"), "{line}");
        let back: RunLogRecord = serde_json::from_str(&line).unwrap();
        assert!(back.loss.is_nan());
        assert_eq!(back.kd, None);
    }

    #[test]
    fn absent_optional_fields_read_as_none() {
        let line = r#"{"step":3,"samples":96,"train_seconds":1.5,"wall_seconds":2.0,"lr":0.1,"ce":0.5,"loss":0.5,"teacher_forwards":0}"#;
        let r: RunLogRecord = serde_json::from_str(line).unwrap();
        assert_eq!((r.kd, r.eval), (None, None));
    }

    #[test]
    fn validation_rejects_percentages_and_backwards_time() {
        assert!(rec(1, 1.0, Some(80.0))
            .validate()
            .unwrap_err()
            .contains("[0, 1]"));
        assert!(rec(1, -1.0, None).validate().is_err());
        let err = rec(2, 1.0, None)
            .validate_after(&rec(1, 5.0, None))
            .unwrap_err();
        assert!(err.contains("train_seconds went backwards"), "{err}");
        assert!(rec(1, 5.0, None).validate_after(&rec(1, 5.0, None)).is_ok());
    }

    #[test]
    fn torn_tail_is_dropped_other_garbage_is_not() {
        let p = Path::new("x/log.jsonl");
        let good = serde_json::to_string(&rec(1, 1.0, Some(0.5))).unwrap();
        let torn = format!("{good}\n{{\"step\":2,\"sam");
        let (lines, t) = parse_log(p, torn.as_bytes()).unwrap();
        assert_eq!((lines.len(), t), (1, Some(2)));
        let bad = format!("{{\"step\":2,\"sam\n{good}\n");
        let err = parse_log(p, bad.as_bytes()).err().unwrap().to_string();
        assert!(err.starts_with("x/log.jsonl:1: "), "{err}");
    }

    #[test]
    fn eval_curve_appends_unlogged_final_eval() {
        let run = Run {
            dir: PathBuf::from("r"),
            summary: RunSummary {
                name: "r".into(),
                method: "baseline".into(),
                metric: METRIC_ACCURACY.into(),
                duration_samples: 100,
                steps: 3,
                final_eval: 0.7,
                final_validation: None,
                majority_floor: None,
                train_seconds: 30.0,
                teacher_forwards: 0,
                teacher_seconds: None,
                cache_reads: None,
                skipped_steps: 0,
                device: None,
                teachers: vec![],
                config: serde_json::Value::Null,
            },
            log: RunLog {
                path: PathBuf::from("r/log.jsonl"),
                records: vec![rec(1, 10.0, Some(0.5)), rec(2, 20.0, Some(0.6))],
                dropped_torn_line: None,
            },
        };
        assert_eq!(
            run.eval_curve(),
            vec![(10.0, 0.5), (20.0, 0.6), (30.0, 0.7)]
        );
        assert_eq!(run.time_to_reach(0.6), Some(20.0));
        assert_eq!(run.time_to_reach(0.7), Some(30.0));
        assert_eq!(run.time_to_reach(0.71), None);

        // The appended final evaluation sits at the last record's samples (step 2: 64), not at
        // the last logged evaluation's; the cost per sample is that record's seconds / samples.
        let samples: Vec<Option<u64>> = run
            .eval_curve_with_samples()
            .iter()
            .map(|p| p.samples)
            .collect();
        assert_eq!(samples, vec![Some(32), Some(64), Some(64)]);
        assert_eq!(run.samples_seen(), Some(64));
        assert_eq!(run.seconds_per_sample(), Some(20.0 / 64.0));

        // No record at all: the final evaluation is still a point, its samples unknown, and
        // there is no cost per sample rather than a division by zero.
        let mut empty = run.clone();
        empty.log.records.clear();
        let curve = empty.eval_curve_with_samples();
        assert_eq!(curve.len(), 1);
        assert_eq!(
            (curve[0].train_seconds, curve[0].samples, curve[0].eval),
            (30.0, None, 0.7)
        );
        assert_eq!(empty.seconds_per_sample(), None);
        let mut zero = run.clone();
        zero.log.records = vec![rec(0, 0.0, Some(0.7))];
        assert_eq!(zero.seconds_per_sample(), None);
    }
}
