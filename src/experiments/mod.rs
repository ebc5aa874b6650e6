//! Experiments: what a training run leaves on disk, and the time-to-accuracy report built from it.
//!
//! - [`runlog`]: the run directory format (`log.jsonl` + `summary.json`), its writer (used by the
//!   trainer) and its reader (used by the report). The format is documented there.
//! - [`report`]: the paper's figure of merit. For each baseline run B, the target is B's final
//!   evaluation value and T_B the first training time at which B's own evaluation reached it;
//!   every other run R is timed to the same target, speedup = T_B / T_R. Printed as a Markdown
//!   table in the shape of the paper's tables 3, 5 and 6, with one plain sentence per method, and
//!   as JSON.
//! - [`seeds`]: seed replicas (runs of one configuration with different seeds) and the spread
//!   of their times to a target, inside which a speedup is a tie.
//! - [`plot`]: a PNG of evaluation metric against training wall-clock, every run's curve plus
//!   each method's Pareto frontier (the paper's figures 1, 4 and 5).
//!
//! "Time" is always `train_seconds`: wall-clock spent training, excluding evaluation and
//! checkpointing, which is the clock the paper reports.

pub mod demo;
pub mod plot;
pub mod report;
pub mod runlog;
pub mod seeds;
pub mod sweep;

use std::path::PathBuf;

pub use plot::{plot_accuracy_vs_time, PlotOptions, PlotOutcome};
pub use report::{build_report, find_runs, Report};
pub use runlog::{CacheReads, RunLog, RunLogRecord, RunLogWriter, RunSummary};

pub type Result<T> = std::result::Result<T, Error>;

/// Errors of the experiments module. Every message names the file it is about and, for a
/// malformed file, the line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure, with the path it happened on.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file that does not follow the run format: `line` is 1-based.
    #[error("{path}:{line}: {msg}")]
    Malformed {
        path: PathBuf,
        line: usize,
        msg: String,
    },

    /// A value the caller passed that the format does not accept (a record with a negative time,
    /// an evaluation outside [0, 1], a directory with no runs).
    #[error("{0}")]
    Invalid(String),

    /// Drawing or encoding a plot failed.
    #[error("plot {path}: {msg}")]
    Plot { path: PathBuf, msg: String },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn malformed(path: impl Into<PathBuf>, line: usize, msg: impl Into<String>) -> Self {
        Error::Malformed {
            path: path.into(),
            line,
            msg: msg.into(),
        }
    }
}

/// The trainer and the CLI speak the engine's error type; an experiments error keeps its
/// message (path and line included) when it crosses over.
impl From<Error> for recycle_engine::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io { path, source } => recycle_engine::Error::Io { path, source },
            other => recycle_engine::Error::invalid("experiments", other.to_string()),
        }
    }
}
