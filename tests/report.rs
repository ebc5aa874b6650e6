//! The time-to-accuracy report end to end: synthetic runs written with the run-log writer,
//! read back, timed against baselines, printed, plotted; malformed logs and resume.

use std::fs;
use std::path::{Path, PathBuf};

use recycle::experiments::plot::PlotOptions;
use recycle::experiments::report::{build_report, find_runs};
use recycle::experiments::runlog::{RunLog, RunLogRecord, RunLogWriter, RunSummary, LOG_FILE};
use recycle::experiments::{plot_accuracy_vs_time, Error};

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("report-{name}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn record(step: u64, t: f64, eval: Option<f32>, kd: bool) -> RunLogRecord {
    RunLogRecord {
        step,
        samples: step * 100,
        train_seconds: t,
        wall_seconds: t * 1.2,
        lr: 0.1,
        ce: 1.0 / (step as f32 + 1.0),
        kd: kd.then_some(0.5),
        loss: 1.0,
        teacher_forwards: if kd { step } else { 0 },
        eval,
        validation: eval.map(|e| (e - 0.01).max(0.0)),
        skipped: None,
        skipped_steps: 0,
    }
}

/// Writes a finished run: a training record every 5 s, an evaluation at each `(t, eval)`.
fn write_run(dir: &Path, name: &str, method: &str, duration_samples: u64, evals: &[(f64, f32)]) {
    let config = serde_json::json!({ "lr": 0.1, "duration_samples": duration_samples });
    write_run_with(dir, name, method, duration_samples, evals, config);
}

/// [`write_run`] with the recipe the summary records (seed replicas share it but the seed).
fn write_run_with(
    dir: &Path,
    name: &str,
    method: &str,
    duration_samples: u64,
    evals: &[(f64, f32)],
    config: serde_json::Value,
) {
    let kd = method != "baseline";
    let run = dir.join(name);
    let mut w = RunLogWriter::create(run.join(LOG_FILE)).unwrap();
    let end = evals.last().unwrap().0;
    let mut times: Vec<f64> = (1..)
        .map(|i| 5.0 * i as f64)
        .take_while(|&t| t < end)
        .collect();
    times.extend(evals.iter().map(|e| e.0));
    times.sort_by(f64::total_cmp);
    times.dedup();
    for (i, &t) in times.iter().enumerate() {
        let eval = evals.iter().find(|e| e.0 == t).map(|e| e.1);
        w.append(&record(i as u64 + 1, t, eval, kd)).unwrap();
    }
    let step = times.len() as u64;
    RunSummary {
        name: name.to_string(),
        method: method.to_string(),
        metric: "accuracy".to_string(),
        duration_samples,
        steps: step,
        final_eval: evals.last().unwrap().1,
        final_validation: Some((evals.last().unwrap().1 - 0.01).max(0.0)),
        majority_floor: Some(0.1),
        train_seconds: end,
        teacher_forwards: if kd { step } else { 0 },
        teacher_seconds: None,
        cache_reads: None,
        skipped_steps: 0,
        device: Some("cpu".to_string()),
        teachers: if kd { vec!["b90".to_string()] } else { vec![] },
        config,
    }
    .write(&run)
    .unwrap();
}

/// Two baselines (b90 reaches 0.80 at t=100, b45 reaches 0.78 at t=50), a KD run reaching 0.80
/// at t=60 and another that never reaches either target.
fn write_experiment(dir: &Path) {
    write_run(
        dir,
        "b90",
        "baseline",
        9000,
        &[(25.0, 0.60), (50.0, 0.70), (75.0, 0.78), (100.0, 0.80)],
    );
    write_run(
        dir,
        "b45",
        "baseline",
        4500,
        &[(20.0, 0.60), (40.0, 0.70), (50.0, 0.78)],
    );
    write_run(
        dir,
        "kd45",
        "kd-kl",
        4500,
        &[(30.0, 0.70), (60.0, 0.80), (80.0, 0.82)],
    );
    write_run(dir, "never", "kd-mse", 4500, &[(40.0, 0.60), (90.0, 0.75)]);
}

#[test]
fn speedups_against_each_baseline() {
    let dir = scratch("speedups");
    write_experiment(&dir);
    let report = build_report(std::slice::from_ref(&dir)).unwrap();

    let targets: Vec<(&str, f32, f64)> = report
        .targets
        .iter()
        .map(|t| (t.baseline.as_str(), t.value, t.baseline_seconds))
        .collect();
    assert_eq!(targets, vec![("b45", 0.78, 50.0), ("b90", 0.80, 100.0)]);

    let order: Vec<&str> = report.rows.iter().map(|r| r.run.as_str()).collect();
    assert_eq!(order, vec!["b45", "b90", "kd45", "never"]);

    let row = |name: &str| report.rows.iter().find(|r| r.run == name).unwrap();
    let vs = |name: &str, baseline: &str| {
        row(name)
            .vs_baselines
            .iter()
            .find(|v| v.baseline == baseline)
            .unwrap()
            .clone()
    };

    let kd_b90 = vs("kd45", "b90");
    assert_eq!(kd_b90.seconds, Some(60.0));
    assert!((kd_b90.speedup.unwrap() - 100.0 / 60.0).abs() < 1e-9);
    let kd_b45 = vs("kd45", "b45");
    assert_eq!(kd_b45.seconds, Some(60.0));
    assert!((kd_b45.speedup.unwrap() - 50.0 / 60.0).abs() < 1e-9);

    for b in ["b90", "b45"] {
        let v = vs("never", b);
        assert_eq!((v.seconds, v.speedup), (None, None), "never vs {b}");
    }

    let own = vs("b90", "b90");
    assert!(own.own_target);
    assert_eq!((own.seconds, own.speedup), (Some(100.0), Some(1.0)));
    // Baselines against each other: b90 reaches b45's 0.78 at 75 s; b45 never reaches 0.80.
    assert_eq!(vs("b90", "b45").seconds, Some(75.0));
    assert_eq!(vs("b45", "b90").seconds, None);

    let kd = row("kd45");
    assert_eq!(
        (kd.final_eval, kd.train_seconds, kd.duration_samples),
        (0.82, 80.0, 4500)
    );
    assert_eq!(kd.teacher_forwards, kd.steps);
    assert_eq!(kd.curve.len(), 3);
    assert!(report.incomplete.is_empty() && report.notes.is_empty());
}

#[test]
fn markdown_table_and_findings() {
    let dir = scratch("markdown");
    write_experiment(&dir);
    let md = build_report(&[dir]).unwrap().to_markdown();
    assert!(
        md.contains("### Baseline b90: final accuracy 80.00% (9000 samples), reached at 100.0 s"),
        "{md}"
    );
    assert!(
        md.contains(
            "| Method | Run | Duration (samples) | Final accuracy | Time to 80.00% (s) | Speedup |"
        ),
        "{md}"
    );
    // Every run here trains at 0.05 s per sample (a record every 5 s, 100 samples a step), so
    // the samples speedup equals the wall-clock one and the cost ratio is 1.
    assert!(
        md.contains("| kd-kl | kd45 | 4500 | 82.00% | 60.0 | 1.67× | 1200 | 1.67× | 1.00× |\n"),
        "{md}"
    );
    assert!(
        md.contains("| kd-kl | kd45 | 4500 | 82.00% | 60.0 | 0.83× | 1200 | 0.83× | 1.00× |\n"),
        "{md}"
    );
    assert!(
        md.contains(
            "| kd-mse | never | 4500 | 75.00% | not reached | not reached | not reached | \
             not reached | 1.00× |\n"
        ),
        "{md}"
    );
    assert!(
        md.contains(
            "| baseline | b90 | 9000 | 80.00% | 100.0 | 1.00× (own target) | 2000 | \
             1.00× (own target) | 1.00× |\n"
        ),
        "{md}"
    );
    assert!(md.contains("reached at 100.0 s and 2000 samples\n"), "{md}");

    let findings: Vec<&str> = md
        .lines()
        .skip_while(|l| *l != "## Findings")
        .filter(|l| l.starts_with("- "))
        .collect();
    assert_eq!(findings.len(), 3, "{md}");
    let kd = findings.iter().find(|l| l.starts_with("- kd-kl")).unwrap();
    assert_eq!(
        *kd,
        "- kd-kl (1 run) reached the final accuracy of 1 of 2 baselines sooner than the \
         baseline itself (b90): b45's 78.00% reached in 60.0 s (run kd45) vs 50.0 s for b45 \
         itself, 0.83×, not sooner; b90's 80.00% reached in 60.0 s (run kd45) vs 100.0 s for \
         b90 itself, 1.67×."
    );
    let mse = findings.iter().find(|l| l.starts_with("- kd-mse")).unwrap();
    assert_eq!(
        *mse,
        "- kd-mse (1 run) did not reach any baseline's final accuracy sooner than that baseline \
         itself: b45's 78.00% never reached; b90's 80.00% never reached."
    );
    let base = findings
        .iter()
        .find(|l| l.starts_with("- Baseline runs"))
        .unwrap();
    assert!(
        base.contains("none reached another baseline's final accuracy sooner"),
        "{base}"
    );
    assert!(
        base.contains("b45's 78.00% reached in 75.0 s (run b90)"),
        "{base}"
    );
}

#[test]
fn json_carries_the_numbers() {
    let dir = scratch("json");
    write_experiment(&dir);
    let json = build_report(&[dir]).unwrap().to_json().unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    let kd = rows.iter().find(|r| r["run"] == "kd45").unwrap();
    let vs_b90 = kd["vs_baselines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["baseline"] == "b90")
        .unwrap();
    assert!((vs_b90["speedup"].as_f64().unwrap() - 1.6667).abs() < 1e-3);
    let never = rows.iter().find(|r| r["run"] == "never").unwrap();
    assert!(never["vs_baselines"][0]["seconds"].is_null());
    assert_eq!(v["findings"].as_array().unwrap().len(), 3);
}

/// Decodes a PNG and returns its size, failing on anything that is not a valid PNG.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    // Something other than the white background was drawn.
    assert!(buf[..info.buffer_size()].iter().any(|&b| b < 200));
    (info.width, info.height)
}

#[test]
fn plot_is_a_png_with_or_without_text() {
    let dir = scratch("plot");
    write_experiment(&dir);
    let report = build_report(std::slice::from_ref(&dir)).unwrap();

    let out = report
        .write_to(dir.join("out"), &PlotOptions::default())
        .unwrap();
    assert!(out.markdown.is_file() && out.json.is_file());
    assert_eq!(png_size(&out.plot.path), (1200, 800));
    // A system font or, failing those, the embedded one: the default plot always has text.
    assert!(out.plot.text, "{:?}", out.plot.note);

    let opts = PlotOptions {
        width: 640,
        height: 400,
        font: Some(dir.join("no-such-font.ttf")),
        title: None,
        system_fonts: true,
    };
    let path = dir.join("no-text.png");
    let outcome = plot_accuracy_vs_time(&report, &path, &opts).unwrap();
    assert!(!outcome.text);
    assert!(
        outcome
            .note
            .as_deref()
            .unwrap()
            .contains("no-such-font.ttf"),
        "{:?}",
        outcome.note
    );
    assert_eq!(png_size(&path), (640, 400));
}

/// The RGB pixels of the top `rows` rows of a PNG (where the title is drawn).
fn top_rows(path: &Path, rows: usize) -> Vec<u8> {
    let decoder = png::Decoder::new(std::io::Cursor::new(fs::read(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(rows * info.line_size);
    buf
}

#[test]
fn without_system_fonts_the_plot_is_labelled_with_the_embedded_font() {
    let dir = scratch("embedded-font");
    write_experiment(&dir);
    let report = build_report(std::slice::from_ref(&dir)).unwrap();
    // The variable would name a font file; unset, the embedded font is all there is.
    std::env::remove_var(recycle::experiments::plot::FONT_ENV);
    let draw = |name: &str, title: &str, font: Option<PathBuf>| {
        let opts = PlotOptions {
            width: 640,
            height: 400,
            font,
            title: Some(title.to_string()),
            system_fonts: false,
        };
        let path = dir.join(name);
        (plot_accuracy_vs_time(&report, &path, &opts).unwrap(), path)
    };
    let (a, a_path) = draw("a.png", "Short", None);
    let (b, b_path) = draw("b.png", "A much longer title, in words", None);
    assert!(a.text && b.text, "{:?}", a.note);
    assert_eq!(a.font, None, "the embedded font, not a file");
    // The titles differ, so the title bands do: the text is really drawn.
    let (top_a, top_b) = (top_rows(&a_path, 40), top_rows(&b_path, 40));
    let differ = top_a.iter().zip(&top_b).filter(|(x, y)| x != y).count();
    assert!(differ > 300, "{differ} bytes differ between the titles");
    // Without a font the title is not drawn: two titles, one picture.
    let missing = Some(dir.join("no-such-font.ttf"));
    let (c, c_path) = draw("c.png", "Short", missing.clone());
    let (_, d_path) = draw("d.png", "A much longer title, in words", missing);
    assert!(!c.text);
    assert_eq!(fs::read(&c_path).unwrap(), fs::read(&d_path).unwrap());
}

#[test]
fn malformed_log_names_file_and_line() {
    let dir = scratch("malformed");
    write_experiment(&dir);
    let log = dir.join("kd45").join(LOG_FILE);
    let text = fs::read_to_string(&log).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[2] = "{\"step\": 3, \"samples\": oops}".to_string();
    fs::write(&log, lines.join("\n") + "\n").unwrap();

    let err = build_report(std::slice::from_ref(&dir)).unwrap_err();
    assert!(matches!(err, Error::Malformed { line: 3, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("{}:3: ", log.display())), "{msg}");

    // A percentage where a fraction belongs.
    lines[2] = serde_json::to_string(&record(3, 15.0, Some(80.0), true)).unwrap();
    fs::write(&log, lines.join("\n") + "\n").unwrap();
    let msg = RunLog::read(&log).unwrap_err().to_string();
    assert!(
        msg.contains(":3: eval must be a fraction in [0, 1]"),
        "{msg}"
    );

    // Time going backwards (a resumed run that forgot to restore its clock).
    lines[2] = serde_json::to_string(&record(3, 1.0, None, true)).unwrap();
    fs::write(&log, lines.join("\n") + "\n").unwrap();
    let msg = RunLog::read(&log).unwrap_err().to_string();
    assert!(msg.contains(":3: train_seconds went backwards"), "{msg}");

    // A malformed summary names its file and line.
    let summary = dir.join("b90").join("summary.json");
    fs::write(&summary, "{\n  \"name\": \"b90\",\n  \"method\": 3\n}\n").unwrap();
    let msg = build_report(&[dir.join("b90")]).unwrap_err().to_string();
    assert!(
        msg.starts_with(&format!("{}:3: ", summary.display())),
        "{msg}"
    );
}

#[test]
fn torn_last_line_is_ignored_and_noted() {
    let dir = scratch("torn");
    write_experiment(&dir);
    let log = dir.join("never").join(LOG_FILE);
    let mut text = fs::read_to_string(&log).unwrap();
    let n = text.lines().count();
    text.push_str("{\"step\":99,\"samples\":");
    fs::write(&log, text).unwrap();
    let report = build_report(&[dir]).unwrap();
    assert_eq!(report.notes.len(), 1);
    assert!(
        report.notes[0].contains(&format!("line {}", n + 1)),
        "{:?}",
        report.notes
    );
    assert!(report.to_markdown().contains("cut off mid-write"));
}

#[test]
fn resume_truncates_after_the_checkpoint_step() {
    let dir = scratch("resume");
    let log = dir.join("run").join(LOG_FILE);
    let mut w = RunLogWriter::create(&log).unwrap();
    for step in 1..=6 {
        let eval = (step % 2 == 0).then_some(0.1 * step as f32);
        w.append(&record(step, step as f64, eval, false)).unwrap();
    }
    drop(w);
    // A torn line from the crash.
    let mut text = fs::read_to_string(&log).unwrap();
    text.push_str("{\"step\":7,");
    fs::write(&log, text).unwrap();

    // Resume from a checkpoint at step 4: steps 5, 6 and the torn line go.
    let mut w = RunLogWriter::open_for_resume(&log, 4).unwrap();
    assert_eq!(w.last().map(|r| r.step), Some(4));
    // The writer refuses a record that would go back in time.
    assert!(w.append(&record(5, 3.0, None, false)).is_err());
    w.append(&record(5, 5.5, Some(0.55), false)).unwrap();
    drop(w);

    let read = RunLog::read(&log).unwrap();
    assert_eq!(read.dropped_torn_line, None);
    let steps: Vec<u64> = read.records.iter().map(|r| r.step).collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5]);
    assert_eq!(read.records[4].train_seconds, 5.5);
    assert_eq!(
        read.eval_points(),
        vec![(2.0, 0.2), (4.0, 0.4), (5.5, 0.55)]
    );
    // No temp file left behind.
    let leftovers: Vec<_> = fs::read_dir(log.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Resuming a run whose log is missing starts an empty one.
    let fresh = dir.join("fresh").join(LOG_FILE);
    let w = RunLogWriter::open_for_resume(&fresh, 10).unwrap();
    assert!(w.last().is_none() && fresh.is_file());
}

#[test]
fn finds_nested_runs_and_lists_incomplete_ones() {
    let dir = scratch("nested");
    write_run(
        &dir.join("sweep"),
        "b90",
        "baseline",
        9000,
        &[(50.0, 0.7), (100.0, 0.8)],
    );
    write_run(&dir.join("kd"), "kd45", "kd-kl", 4500, &[(60.0, 0.8)]);
    // A run that died before writing its summary.
    let mut w = RunLogWriter::create(dir.join("kd").join("crashed").join(LOG_FILE)).unwrap();
    w.append(&record(1, 1.0, None, true)).unwrap();

    let runs = find_runs(&dir).unwrap();
    assert_eq!(runs, vec![dir.join("kd/kd45"), dir.join("sweep/b90")]);
    let report = build_report(std::slice::from_ref(&dir)).unwrap();
    assert_eq!(report.rows.len(), 2);
    assert_eq!(report.incomplete, vec![dir.join("kd/crashed")]);
    assert!(report
        .to_markdown()
        .contains("kd/crashed: log.jsonl without summary.json"));

    // A run directory given directly, and a directory with nothing in it.
    let one = build_report(&[dir.join("sweep/b90")]).unwrap();
    assert_eq!(one.rows.len(), 1);
    assert!(one.findings.is_empty());
    let empty = scratch("nested-empty");
    let msg = build_report(&[empty]).unwrap_err().to_string();
    assert!(msg.contains("no run found"), "{msg}");
}

#[test]
fn no_baseline_is_said_plainly() {
    let dir = scratch("no-baseline");
    write_run(&dir, "kd45", "kd-kl", 4500, &[(60.0, 0.8)]);
    let report = build_report(&[dir]).unwrap();
    assert!(report.targets.is_empty());
    let md = report.to_markdown();
    assert!(md.contains("No baseline run"), "{md}");
    assert!(
        report.findings[0].starts_with("kd-kl (1 run, accuracy): no baseline run"),
        "{:?}",
        report.findings
    );
}

/// Writes a finished run that logs every step: `batch` samples a step, `seconds(step)` the
/// cumulative training seconds after `step`, an evaluation at each `(step, eval)`.
fn write_stepped_run(
    dir: &Path,
    name: &str,
    method: &str,
    batch: u64,
    steps: u64,
    seconds: impl Fn(u64) -> f64,
    evals: &[(u64, f32)],
) {
    let kd = method != "baseline";
    let run = dir.join(name);
    let mut w = RunLogWriter::create(run.join(LOG_FILE)).unwrap();
    for step in 1..=steps {
        let eval = evals.iter().find(|e| e.0 == step).map(|e| e.1);
        let mut r = record(step, seconds(step), eval, kd);
        r.samples = step * batch;
        w.append(&r).unwrap();
    }
    RunSummary {
        name: name.to_string(),
        method: method.to_string(),
        metric: "accuracy".to_string(),
        duration_samples: steps * batch,
        steps,
        final_eval: evals.last().map_or(0.6, |e| e.1),
        final_validation: None,
        majority_floor: None,
        train_seconds: seconds(steps),
        teacher_forwards: if kd { steps } else { 0 },
        teacher_seconds: None,
        cache_reads: None,
        skipped_steps: 0,
        device: Some("cpu".to_string()),
        teachers: if kd { vec!["base".to_string()] } else { vec![] },
        config: serde_json::Value::Null,
    }
    .write(&run)
    .unwrap();
}

/// A baseline at 1 s a step, a student whose distilling steps cost 1.25 s (steady), one that
/// never reaches the target, and one whose machine got three times slower after it reached
/// the target. 100 samples a step, 40 steps, evaluations every 10 steps.
fn write_samples_experiment(dir: &Path) {
    let evals = |v: [f32; 4]| [(10, v[0]), (20, v[1]), (30, v[2]), (40, v[3])];
    write_stepped_run(
        dir,
        "base",
        "baseline",
        100,
        40,
        |s| s as f64,
        &evals([0.50, 0.60, 0.70, 0.75]),
    );
    write_stepped_run(
        dir,
        "kd",
        "kd-kl",
        100,
        40,
        |s| 1.25 * s as f64,
        &evals([0.55, 0.70, 0.76, 0.78]),
    );
    write_stepped_run(
        dir,
        "slow",
        "kd-mse",
        100,
        40,
        |s| 1.25 * s as f64,
        &evals([0.50, 0.60, 0.70, 0.74]),
    );
    write_stepped_run(
        dir,
        "loaded",
        "random-one",
        100,
        40,
        |s| {
            if s <= 30 {
                s as f64
            } else {
                30.0 + 3.0 * (s - 30) as f64
            }
        },
        &evals([0.55, 0.70, 0.76, 0.78]),
    );
}

#[test]
fn samples_to_target_and_cost_per_sample() {
    let dir = scratch("samples");
    write_samples_experiment(&dir);
    let report = build_report(std::slice::from_ref(&dir)).unwrap();
    assert_eq!(report.targets.len(), 1);
    let t = &report.targets[0];
    assert_eq!((t.value, t.baseline_seconds), (0.75, 40.0));
    assert_eq!(t.baseline_samples, Some(4000));
    assert_eq!(t.baseline_seconds_per_sample, Some(0.01));

    let row = |name: &str| report.rows.iter().find(|r| r.run == name).unwrap();
    let vs = |name: &str| row(name).vs_baselines[0].clone();

    // The student reaches 75% at step 30: 3000 samples, 37.5 s.
    let kd = vs("kd");
    assert_eq!((kd.seconds, kd.samples), (Some(37.5), Some(3000)));
    assert_eq!(kd.baseline_samples, Some(4000));
    assert!((kd.speedup.unwrap() - 40.0 / 37.5).abs() < 1e-12);
    assert!((kd.samples_speedup.unwrap() - 4.0 / 3.0).abs() < 1e-12);
    assert!((kd.cost_ratio.unwrap() - 1.25).abs() < 1e-12);
    assert_eq!(row("kd").samples_seen, Some(4000));
    assert!((row("kd").seconds_per_sample.unwrap() - 0.0125).abs() < 1e-15);
    // The curve carries the samples of each evaluation.
    let curve: Vec<Option<u64>> = row("kd").curve.iter().map(|p| p.samples).collect();
    assert_eq!(curve, vec![Some(1000), Some(2000), Some(3000), Some(4000)]);

    // Never reached: no samples, no samples speedup, no division by zero; the cost ratio is a
    // property of the two runs and is still given.
    let slow = vs("slow");
    assert_eq!(
        (
            slow.seconds,
            slow.samples,
            slow.speedup,
            slow.samples_speedup
        ),
        (None, None, None, None)
    );
    assert!((slow.cost_ratio.unwrap() - 1.25).abs() < 1e-12);

    let own = vs("base");
    assert!(own.own_target);
    assert_eq!(
        (own.samples, own.samples_speedup, own.cost_ratio),
        (Some(4000), Some(1.0), Some(1.0))
    );

    let md = report.to_markdown();
    assert!(
        md.contains(
            "| Method | Run | Duration (samples) | Final accuracy | Time to 75.00% (s) | Speedup | \
             Samples to 75.00% | Samples speedup | Cost per sample vs baseline |\n"
        ),
        "{md}"
    );
    assert!(
        md.contains("| kd-kl | kd | 4000 | 78.00% | 37.5 | 1.07× | 3000 | 1.33× | 1.25× |\n"),
        "{md}"
    );
    assert!(
        md.contains(
            "| kd-mse | slow | 4000 | 74.00% | not reached | not reached | not reached | \
             not reached | 1.25× |\n"
        ),
        "{md}"
    );
    assert!(
        md.contains(
            "| baseline | base | 4000 | 75.00% | 40.0 | 1.00× (own target) | 4000 | \
             1.00× (own target) | 1.00× |\n"
        ),
        "{md}"
    );
    // The runs table: samples seen and the cost per sample in microseconds.
    assert!(md.contains("| 4000 | 12500.0 |\n"), "{md}");
    assert!(md.contains("| 4000 | 10000.0 |\n"), "{md}");

    let json: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
    let kd_json = json["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["run"] == "kd")
        .unwrap();
    assert_eq!(kd_json["vs_baselines"][0]["samples"], 3000);
    assert!((kd_json["vs_baselines"][0]["cost_ratio"].as_f64().unwrap() - 1.25).abs() < 1e-12);
    assert_eq!(json["targets"][0]["baseline_samples"], 4000);
    let slow_json = json["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["run"] == "slow")
        .unwrap();
    assert!(slow_json["vs_baselines"][0]["samples_speedup"].is_null());
}

#[test]
fn wall_speedup_is_samples_speedup_over_cost_at_steady_rates() {
    let dir = scratch("identity");
    write_samples_experiment(&dir);
    let report = build_report(std::slice::from_ref(&dir)).unwrap();
    let vs = |name: &str| {
        report
            .rows
            .iter()
            .find(|r| r.run == name)
            .unwrap()
            .vs_baselines[0]
            .clone()
    };
    // Steady rates (base, kd): seconds are proportional to samples, so the wall-clock speedup
    // splits exactly into the samples speedup and the cost ratio.
    for name in ["base", "kd"] {
        let v = vs(name);
        let predicted = v.samples_speedup.unwrap() / v.cost_ratio.unwrap();
        assert!(
            (v.speedup.unwrap() - predicted).abs() < 1e-12,
            "{name}: {v:?}"
        );
    }
    // The existing experiment: every run at 0.05 s per sample.
    let dir = scratch("identity-steady");
    write_experiment(&dir);
    let steady = build_report(std::slice::from_ref(&dir)).unwrap();
    let mut checked = 0;
    for r in &steady.rows {
        for v in &r.vs_baselines {
            if let (Some(x), Some(xs), Some(c)) = (v.speedup, v.samples_speedup, v.cost_ratio) {
                assert!((x - xs / c).abs() < 1e-12, "{}: {v:?}", r.run);
                checked += 1;
            }
        }
    }
    // kd45 and b90 against both targets, b45 against its own (never reaches b90's).
    assert_eq!(checked, 5);

    // A machine that got three times slower after the target was reached: the wall-clock
    // speedup (40 s / 30 s) is the samples speedup (4000 / 3000), but the whole-run cost ratio
    // (60 s / 4000 against 40 s / 4000 = 1.5) no longer explains it. This gap is what tells
    // the reader a run's rate changed partway.
    let v = vs("loaded");
    assert_eq!((v.seconds, v.samples), (Some(30.0), Some(3000)));
    assert!((v.speedup.unwrap() - 4.0 / 3.0).abs() < 1e-12);
    assert!((v.samples_speedup.unwrap() - 4.0 / 3.0).abs() < 1e-12);
    assert!((v.cost_ratio.unwrap() - 1.5).abs() < 1e-12);
    let predicted = v.samples_speedup.unwrap() / v.cost_ratio.unwrap();
    assert!((v.speedup.unwrap() - predicted).abs() > 0.4, "{v:?}");
}

#[test]
fn baseline_without_evaluations_or_records() {
    // A baseline that logged training but no evaluation: its final evaluation (summary only)
    // counts at the end of its run, at the samples of its last record.
    let dir = scratch("no-evals");
    write_stepped_run(&dir, "base", "baseline", 100, 10, |s| s as f64, &[]);
    write_stepped_run(
        &dir,
        "kd",
        "kd-kl",
        100,
        10,
        |s| 1.25 * s as f64,
        &[(5, 0.6), (10, 0.7)],
    );
    let report = build_report(std::slice::from_ref(&dir)).unwrap();
    let t = &report.targets[0];
    assert_eq!(
        (t.value, t.baseline_seconds, t.baseline_samples),
        (0.6, 10.0, Some(1000))
    );
    let kd = report.rows.iter().find(|r| r.run == "kd").unwrap();
    let v = &kd.vs_baselines[0];
    assert_eq!((v.seconds, v.samples), (Some(6.25), Some(500)));
    assert_eq!(v.samples_speedup, Some(2.0));
    assert!((v.cost_ratio.unwrap() - 1.25).abs() < 1e-12);
    assert!(
        report
            .to_markdown()
            .contains("| kd-kl | kd | 1000 | 70.00% | 6.2 | 1.60× | 500 | 2.00× | 1.25× |\n"),
        "{}",
        report.to_markdown()
    );

    // A baseline whose log holds no record at all: its samples and cost are unknown, which the
    // table says instead of dividing by nothing.
    let base_log = dir.join("base").join(LOG_FILE);
    fs::write(&base_log, "").unwrap();
    let report = build_report(std::slice::from_ref(&dir)).unwrap();
    let t = &report.targets[0];
    assert_eq!(
        (t.baseline_samples, t.baseline_seconds_per_sample),
        (None, None)
    );
    let kd = report.rows.iter().find(|r| r.run == "kd").unwrap();
    let v = &kd.vs_baselines[0];
    assert_eq!(
        (v.samples, v.samples_speedup, v.cost_ratio),
        (Some(500), None, None)
    );
    let base = report.rows.iter().find(|r| r.run == "base").unwrap();
    assert_eq!((base.samples_seen, base.seconds_per_sample), (None, None));
    let md = report.to_markdown();
    assert!(
        md.contains("reached at 10.0 s (samples unknown: its log has no record)\n"),
        "{md}"
    );
    assert!(
        md.contains(
            "| kd-kl | kd | 1000 | 70.00% | 6.2 | 1.60× | 500 | unknown (baseline's samples) | \
             unknown |\n"
        ),
        "{md}"
    );
    assert!(
        md.contains(
            "| baseline | base | 1000 | 60.00% | 10.0 | 1.00× (own target) | unknown | unknown | \
             unknown |\n"
        ),
        "{md}"
    );
}

/// The recipe of a long-preset baseline at `lr` and `seed`, as a summary records it.
fn recipe_json(name: &str, seed: u64, label: Option<&str>, lr: f64) -> serde_json::Value {
    let mut r = serde_json::json!({
        "name": name, "seed": seed, "out_dir": "runs/demo",
        "optimizer": {"kind": "sgdw", "lr": lr}, "train": {"epochs": 16.0, "batch_size": 128},
    });
    if let Some(l) = label {
        r["label"] = serde_json::json!(l);
    }
    r
}

/// The long preset's case: a sweep point (seed 0) and `baseline-e16` (seed 1) of the same
/// configuration reach the same accuracy, one 1.22x sooner. That is the seed spread: a student
/// inside it ties, one sooner than both seeds is a speedup, and the findings say so.
#[test]
fn a_speedup_inside_the_seed_spread_is_a_tie() {
    let dir = scratch("seed-spread");
    let curve = |t: f64| [(t / 2.0, 0.70), (t * 0.9, 0.79), (t, 0.80)];
    write_run_with(
        &dir,
        "baseline-e16",
        "baseline",
        9000,
        &curve(100.0),
        recipe_json("baseline-e16", 1, None, 0.2),
    );
    write_run_with(
        &dir,
        "fmnist-lr0.2",
        "sweep",
        9000,
        &curve(82.0),
        recipe_json("fmnist-lr0.2", 0, Some("sweep"), 0.2),
    );
    // Another learning rate: another configuration, not a replica.
    write_run_with(
        &dir,
        "fmnist-lr0.1",
        "sweep",
        9000,
        &curve(70.0),
        recipe_json("fmnist-lr0.1", 0, Some("sweep"), 0.1),
    );
    let student = |name: &str| {
        let mut r = recipe_json(name, 1, None, 0.1);
        r["distill"] = serde_json::json!({"loss": "kl"});
        r
    };
    write_run_with(
        &dir,
        "kd-tie",
        "kd-kl",
        9000,
        &[(50.0, 0.70), (90.0, 0.80)],
        student("kd-tie"),
    );
    write_run_with(
        &dir,
        "kd-fast",
        "kd-mse",
        9000,
        &[(30.0, 0.70), (60.0, 0.80)],
        student("kd-fast"),
    );
    let report = build_report(std::slice::from_ref(&dir)).unwrap();
    assert_eq!(report.targets.len(), 1);
    let spread = report.targets[0].seed_spread.clone().expect("two seeds");
    assert_eq!(spread.seeds, vec![0, 1]);
    assert_eq!(
        (spread.min_seconds, spread.max_seconds),
        (82.0, Some(100.0))
    );
    let samples = |name: &str| {
        let row = report.rows.iter().find(|r| r.run == name).unwrap();
        row.vs_baselines[0].samples.unwrap()
    };
    assert_eq!(
        (spread.min_samples, spread.max_samples),
        (Some(samples("fmnist-lr0.2")), Some(samples("baseline-e16")))
    );
    let vs = |name: &str| {
        report
            .rows
            .iter()
            .find(|r| r.run == name)
            .unwrap()
            .vs_baselines[0]
            .clone()
    };
    // The sweep replica is 100 / 82 = 1.22x "sooner": inside the spread, a tie.
    let replica = vs("fmnist-lr0.2");
    assert!((replica.speedup.unwrap() - 100.0 / 82.0).abs() < 1e-9);
    assert_eq!(replica.within_seed_spread, Some(true));
    assert_eq!(replica.samples_within_seed_spread, Some(true));
    assert_eq!(vs("kd-tie").within_seed_spread, Some(true));
    assert_eq!(vs("kd-fast").within_seed_spread, Some(false));
    assert_eq!(vs("fmnist-lr0.1").within_seed_spread, Some(false));
    assert_eq!(vs("baseline-e16").within_seed_spread, None, "own row");

    let md = report.to_markdown();
    assert!(md.contains("1.22× — tie (within seed spread)"), "{md}");
    assert!(md.contains("82.0–100.0 s over seeds 0, 1"), "{md}");
    let finding = |method: &str| {
        report
            .findings
            .iter()
            .find(|f| f.starts_with(method))
            .unwrap()
            .clone()
    };
    let tie = finding("kd-kl");
    assert!(
        tie.contains("did not reach") && tie.contains("a tie (within seed spread"),
        "{tie}"
    );
    let fast = finding("kd-mse");
    assert!(
        fast.contains("reached the final accuracy of the baseline sooner"),
        "{fast}"
    );
    assert!(!md.contains("One seed of this configuration"), "{md}");
}

/// Without a second seed there is no spread: nothing is called a tie, and the notes say the
/// speedup cannot be told from seed noise.
#[test]
fn one_seed_means_no_spread_and_a_note_saying_so() {
    let dir = scratch("one-seed");
    write_experiment(&dir);
    let report = build_report(std::slice::from_ref(&dir)).unwrap();
    assert!(report.targets.iter().all(|t| t.seed_spread.is_none()));
    assert!(report
        .rows
        .iter()
        .flat_map(|r| &r.vs_baselines)
        .all(|v| v.within_seed_spread.is_none()));
    let md = report.to_markdown();
    assert_eq!(
        md.matches("One seed of this configuration: no seed spread")
            .count(),
        2,
        "{md}"
    );
    let kd = report
        .findings
        .iter()
        .find(|f| f.starts_with("kd-kl"))
        .unwrap();
    assert!(
        kd.contains("reached the final accuracy of 1 of 2 baselines sooner"),
        "{kd}"
    );
}

/// Runs that end at their majority floor (an MLM model predicting the most frequent token) are
/// named in the notes; the validation metric is shown beside the test metric.
#[test]
fn runs_at_the_majority_floor_are_named_and_validation_is_shown() {
    let dir = scratch("floor");
    write_run(
        &dir,
        "base",
        "baseline",
        100,
        &[(10.0, 0.0401), (20.0, 0.0401)],
    );
    write_run(&dir, "kd", "kd-kl", 100, &[(10.0, 0.05), (20.0, 0.30)]);
    let mut s = RunSummary::read(dir.join("base")).unwrap();
    s.majority_floor = Some(0.0401);
    s.write(dir.join("base")).unwrap();
    let mut s = RunSummary::read(dir.join("kd")).unwrap();
    s.majority_floor = Some(0.0401);
    s.write(dir.join("kd")).unwrap();
    let report = build_report(std::slice::from_ref(&dir)).unwrap();
    let note = report
        .notes
        .iter()
        .find(|n| n.contains("not left the floor"))
        .expect("a floor note");
    assert!(note.starts_with("1 of 2 runs has"), "{note}");
    assert!(
        note.contains("base (4.01% vs floor 4.01%)") && !note.contains("kd ("),
        "{note}"
    );
    let md = report.to_markdown();
    assert!(md.contains("| Final metric (test) | Validation |"), "{md}");
    assert!(md.contains("| 30.00% accuracy | 29.00% |"), "{md}");
}
