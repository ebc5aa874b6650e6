//! Runs the check's groups so that one failure costs one group, not the run: a group that
//! returns an error or panics becomes a FAIL row with the message and the next group runs;
//! every row is printed (and flushed) as it is recorded; the table file is rewritten, whole,
//! after every group; past the deadline the remaining groups become "not run" rows.

use std::io::Write;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use recycle_engine::{DType, Error, Result};

use super::checker::Checker;
use super::{format_row, format_table, CheckRow};

/// The body of a group: records rows on the checker, or fails.
type GroupRun<'a> = Box<dyn FnOnce(&mut Checker) -> Result<()> + 'a>;

/// One group of checks: rows recorded on the checker, or an error.
pub(super) struct Group<'a> {
    pub(super) name: &'static str,
    pub(super) run: GroupRun<'a>,
}

impl<'a> Group<'a> {
    pub(super) fn new(
        name: &'static str,
        run: impl FnOnce(&mut Checker) -> Result<()> + 'a,
    ) -> Group<'a> {
        Group {
            name,
            run: Box::new(run),
        }
    }
}

/// Where the progress goes: the table file (rewritten after each group, with `header` above
/// the table) and the deadline.
pub(super) struct Progress {
    pub(super) header: String,
    pub(super) table_file: Option<PathBuf>,
    pub(super) deadline: Option<Instant>,
}

/// How the groups ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupsOutcome {
    /// Groups that returned an error or panicked.
    pub failed: Vec<String>,
    /// Groups not started because the deadline had passed.
    pub not_run: Vec<String>,
}

/// The text of a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// A row that stands for a whole group: failed (with the message) or not run.
pub(super) fn group_row(group: &str, note: String) -> CheckRow {
    CheckRow {
        op: group.to_string(),
        shapes: String::new(),
        dtype: DType::F32,
        max_rel_err: f64::INFINITY,
        tolerance: 0.0,
        pass: false,
        note: Some(note),
    }
}

/// Writes `text` to `path` through a temporary file and a rename, so that a reader (or a
/// run cut short) sees the previous table or the new one, never a part.
pub(super) fn write_whole(path: &Path, text: &str) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// The table file's text while groups are still running.
fn progress_text(header: &str, rows: &[CheckRow], done: usize, total: usize) -> String {
    format!(
        "{header}{}{done} of {total} groups done\n",
        format_table(rows)
    )
}

/// Runs `groups` in order on `c` (see the module doc). Errors only when the table file cannot
/// be written.
pub(super) fn run_groups(
    c: &mut Checker,
    groups: Vec<Group<'_>>,
    progress: &Progress,
) -> Result<GroupsOutcome> {
    let mut outcome = GroupsOutcome::default();
    let total = groups.len();
    for (i, group) in groups.into_iter().enumerate() {
        if progress.deadline.is_some_and(|d| Instant::now() >= d) {
            let note = "not run: the deadline had passed".to_string();
            c.push(group_row(group.name, note));
            outcome.not_run.push(group.name.to_string());
        } else {
            let run = group.run;
            let result = panic::catch_unwind(AssertUnwindSafe(|| run(c)));
            let failure = match result {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("error: {e}")),
                Err(payload) => Some(format!("panic: {}", panic_message(payload.as_ref()))),
            };
            if let Some(note) = failure {
                c.push(group_row(group.name, note));
                outcome.failed.push(group.name.to_string());
            }
        }
        if let Some(path) = &progress.table_file {
            write_whole(
                path,
                &progress_text(&progress.header, &c.rows, i + 1, total),
            )?;
        }
    }
    Ok(outcome)
}

/// An echo that prints each row to stdout as a line of the table and flushes it.
pub(super) fn stdout_echo() -> Box<dyn FnMut(&CheckRow)> {
    Box::new(|row: &CheckRow| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", format_row(row));
        let _ = out.flush();
    })
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::time::Duration;

    use recycle_engine::Device;

    use super::*;

    fn ok_group(name: &'static str, err: f64) -> Group<'static> {
        Group::new(name, move |c: &mut Checker| {
            c.record_err(name, "[2]".into(), DType::F32, err, 1e-6);
            Ok(())
        })
    }

    fn temp_table(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "recycle-gpu-check-runner-{}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("table.md")
    }

    /// A group that errors and one that panics become FAIL rows with their messages, the
    /// groups after them still run, every row reaches the echo in order, and the table file
    /// is whole after the run.
    #[test]
    fn failing_groups_become_rows_and_later_groups_run() {
        let echoed = Rc::new(RefCell::new(Vec::<String>::new()));
        let mut c = Checker::new(Device::Cpu);
        let sink = echoed.clone();
        c.echo = Some(Box::new(move |r: &CheckRow| {
            sink.borrow_mut().push(format_row(r))
        }));
        let table = temp_table("failures");
        let groups = vec![
            ok_group("first", 0.0),
            Group::new("broken", |c: &mut Checker| {
                c.record_err("before the error", "[1]".into(), DType::F32, 0.0, 1e-6);
                Err(Error::invalid("broken", "an injected failure".to_string()))
            }),
            Group::new("panicking", |_: &mut Checker| {
                panic!("an injected panic in the group")
            }),
            ok_group("last", 0.0),
        ];
        let progress = Progress {
            header: "device: test\n".into(),
            table_file: Some(table.clone()),
            deadline: None,
        };
        let outcome = run_groups(&mut c, groups, &progress).unwrap();
        assert_eq!(outcome.failed, vec!["broken", "panicking"]);
        assert!(outcome.not_run.is_empty());
        let ops: Vec<&str> = c.rows.iter().map(|r| r.op.as_str()).collect();
        assert_eq!(
            ops,
            ["first", "before the error", "broken", "panicking", "last"]
        );
        assert!(c.rows[2]
            .note
            .as_deref()
            .unwrap()
            .contains("an injected failure"));
        assert!(c.rows[3]
            .note
            .as_deref()
            .unwrap()
            .contains("an injected panic"));
        assert!(!c.rows[2].pass && !c.rows[3].pass && c.rows[4].pass);
        let echoed = echoed.borrow();
        assert_eq!(echoed.len(), 5);
        assert!(echoed[2].contains("FAIL") && echoed[2].contains("an injected failure"));
        let text = std::fs::read_to_string(&table).unwrap();
        assert!(text.starts_with("device: test\n"), "{text}");
        assert!(text.contains("| last |"), "{text}");
        assert!(text.contains("4 of 4 groups done"), "{text}");
        assert!(!table.with_extension("md.partial").exists());
        let _ = std::fs::remove_dir_all(table.parent().unwrap());
    }

    /// The table file is rewritten after every group: a group sees the rows of the groups
    /// before it on disk.
    #[test]
    fn the_table_file_is_rewritten_after_every_group() {
        let table = temp_table("rewrite");
        let seen = Rc::new(RefCell::new(String::new()));
        let (path, sink) = (table.clone(), seen.clone());
        let groups = vec![
            ok_group("one", 0.0),
            Group::new("two", move |_: &mut Checker| {
                *sink.borrow_mut() = std::fs::read_to_string(&path).unwrap();
                Ok(())
            }),
        ];
        let progress = Progress {
            header: String::new(),
            table_file: Some(table.clone()),
            deadline: None,
        };
        run_groups(&mut Checker::new(Device::Cpu), groups, &progress).unwrap();
        let seen = seen.borrow();
        assert!(
            seen.contains("| one |") && seen.contains("1 of 2 groups done"),
            "{seen}"
        );
        let _ = std::fs::remove_dir_all(table.parent().unwrap());
    }

    /// Past the deadline the remaining groups are not started: each becomes a "not run" row.
    #[test]
    fn the_deadline_stops_before_the_next_group() {
        let ran = Rc::new(RefCell::new(0));
        let counter = ran.clone();
        let groups = vec![
            Group::new("slow", move |_: &mut Checker| {
                *counter.borrow_mut() += 1;
                std::thread::sleep(Duration::from_millis(600));
                Ok(())
            }),
            ok_group("late", 0.0),
            ok_group("later", 0.0),
        ];
        let progress = Progress {
            header: String::new(),
            table_file: None,
            deadline: Some(Instant::now() + Duration::from_millis(500)),
        };
        let mut c = Checker::new(Device::Cpu);
        let outcome = run_groups(&mut c, groups, &progress).unwrap();
        assert_eq!(*ran.borrow(), 1);
        assert_eq!(outcome.not_run, vec!["late", "later"]);
        assert_eq!(c.rows.len(), 2);
        assert!(c.rows.iter().all(|r| !r.pass));
        let table = format_table(&c.rows);
        assert!(
            table.contains("| late | not run: the deadline had passed |"),
            "{table}"
        );
        assert!(table.contains("NOT RUN"), "{table}");
    }
}
