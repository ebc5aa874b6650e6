//! The teacher cache in training: a student distilled from the cache at k = C ends with the
//! weights of the same student distilled online, bit for bit; the first student records and
//! later ones read without any teacher forward; `recycle cache-teacher` builds it ahead;
//! RandomOne and schedules replay from it; a mismatched key is refused with the field named.
//! Tiny ResNets on the generated Fashion-MNIST stand-in (see tests/pipeline.rs).

use std::path::{Path, PathBuf};

use recycle::data::test_support::use_fixture_data;
use recycle::recipe::Recipe;
use recycle::trainer::{self, cache_teacher, Model, RunOptions, TaskData, Trainer};

fn temp_dir(tag: &str) -> PathBuf {
    use_fixture_data(Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap();
    let d = std::env::temp_dir().join(format!("recycle-tcache-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A student of `teachers` (checkpoint files); `distill_extra` adds lines to `[distill]`.
fn student(out: &Path, name: &str, teachers: &[PathBuf], distill_extra: &str) -> Recipe {
    let teachers: Vec<String> = teachers
        .iter()
        .map(|t| format!("\"{}\"", t.display()))
        .collect();
    Recipe::from_toml(&format!(
        r#"
name = "{name}"
seed = 3
out_dir = "{}"
[model]
kind = "resnet"
width = 0.0625
[data]
dataset = "fashion-mnist"
train_limit = 288
eval_limit = 64
[train]
batch_size = 32
epochs = 1.0
evals = 1
[optimizer]
kind = "sgdw"
lr = 0.1
[distill]
teachers = [{}]
temperature = 2.0
weight = 0.5
{distill_extra}
"#,
        out.display(),
        teachers.join(", ")
    ))
    .unwrap()
}

/// Freshly initialised teachers (their outputs are as good as trained ones for these checks),
/// saved as checkpoint files.
fn teachers(out: &Path, n: usize) -> Vec<PathBuf> {
    let r = student(out, "probe", &[out.join("none")], "");
    let arch = trainer::architecture(&r, &TaskData::load(&r).unwrap()).unwrap();
    (0..n)
        .map(|i| {
            let p = out.join(format!("teacher{i}.safetensors"));
            let m = Model::new(&arch, 100 + i as u64).unwrap();
            recycle_engine::checkpoint::save(&p, &m.state_dict().unwrap(), None).unwrap();
            p
        })
        .collect()
}

fn train(r: &Recipe) -> (u64, recycle::distill::cache::CacheStats) {
    let opts = RunOptions {
        overwrite: true,
        ..RunOptions::default()
    };
    let mut t = Trainer::new(r, &opts).unwrap();
    while !t.is_done() {
        t.step().unwrap();
    }
    let stats = t.cache_stats().unwrap_or_default();
    let s = t.finish().unwrap();
    (s.teacher_forwards, stats)
}

fn weights(out: &Path, name: &str) -> Vec<u8> {
    std::fs::read(out.join(name).join("final.safetensors")).unwrap()
}

#[test]
fn cached_student_at_k_c_matches_online_and_reads_without_teachers() {
    let out = temp_dir("exact");
    let t = teachers(&out, 1);
    let cache = format!(
        "cache = \"{}\"\ncache_k = 10\ncache_values = \"f32\"",
        out.join("cache").display()
    );
    let (online_forwards, _) = train(&student(&out, "online", &t, ""));
    assert_eq!(
        online_forwards, 8,
        "8 steps (259 training images), one teacher"
    );

    // The first student records as it distils online: the same run, and the cache's rows.
    let (fw, rec) = train(&student(&out, "recorder", &t, &cache));
    assert_eq!(fw, 8);
    assert_eq!((rec.reads, rec.writes), (0, 8));
    assert_eq!(weights(&out, "recorder"), weights(&out, "online"));

    // The second reads every step: no teacher forward, the same weights bit for bit.
    let (fw, read) = train(&student(
        &out,
        "reader",
        &t,
        &format!("{cache}\ncache_mode = \"read\""),
    ));
    assert_eq!(fw, 0, "no teacher forward");
    assert_eq!((read.reads, read.writes), (8, 0));
    assert_eq!(weights(&out, "reader"), weights(&out, "online"));

    // Another temperature is another key: refused, naming the field and both values.
    let mut hot = student(&out, "hot", &t, &cache);
    hot.distill.as_mut().unwrap().temperature = 3.0;
    let e = match Trainer::new(&hot, &RunOptions::default()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a mismatched key must be refused"),
    };
    assert!(
        e.contains("`distill.temperature` is 2 in the cache but 3 for this run"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// `cache-teacher` ahead of the students (two teachers, k = 3 < C, bf16): a RandomOne student
/// and a scheduled Single student then read every distilled step and run no teacher; an
/// ensemble below k = C is refused; a second build finds everything cached.
#[test]
fn cache_teacher_then_random_one_and_schedules_read_it() {
    let out = temp_dir("build");
    let t = teachers(&out, 2);
    let cache = format!(
        "cache = \"{}\"\ncache_k = 3\ncache_mode = \"read\"",
        out.join("cache").display()
    );
    let one = student(
        &out,
        "random-one",
        &t,
        &format!("{cache}\nstrategy = \"random-one\""),
    );
    // Half an epoch first: a student that only reads stops where the cache ends.
    let half = cache_teacher(&one, 0.5, None, false).unwrap();
    assert_eq!((half.steps, half.forwards), (4, 8));
    let mut partial = Trainer::new(&one, &RunOptions::default()).unwrap();
    for _ in 0..4 {
        partial.step().unwrap();
    }
    let e = partial.step().unwrap_err().to_string();
    assert!(
        e.contains("stopped at step 4") && e.contains("does not hold step 4"),
        "{e}"
    );
    drop(partial);
    let built = cache_teacher(&one, 1.0, None, false).unwrap();
    assert_eq!(
        (
            built.steps,
            built.teachers,
            built.forwards,
            built.already_cached
        ),
        (8, 2, 8, 8)
    );
    assert_eq!(built.k, 3);
    // 32 rows a step, each 3 × (2-byte index + 2-byte value) + 4 bytes, plus headers.
    let rows = 8 * 32 * 2;
    assert!(
        built.bytes >= rows * 16 && built.bytes < rows * 16 + 4096,
        "{built:?}"
    );
    let again = cache_teacher(&one, 1.0, None, false).unwrap();
    assert_eq!((again.forwards, again.already_cached), (0, 16));

    let (fw, stats) = train(&one);
    assert_eq!(fw, 0);
    assert_eq!((stats.reads, stats.writes), (8, 0));

    // Distil every other step of the first half: only those steps read the cache.
    let sched = student(
        &out,
        "scheduled",
        &t[1..],
        &format!("{cache}\nstop = 0.5\nevery = 2"),
    );
    let (fw, stats) = train(&sched);
    let active = (0..8u64).filter(|s| *s < 4 && s % 2 == 0).count() as u64;
    assert_eq!((fw, stats.reads), (0, active));

    let ens = student(
        &out,
        "ensemble",
        &t,
        &format!("{cache}\nstrategy = \"ensemble:2\""),
    );
    let e = match Trainer::new(&ens, &RunOptions::default()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("an ensemble below k = C must be refused"),
    };
    assert!(e.contains("cache_k to at least 10"), "{e}");
    let _ = std::fs::remove_dir_all(&out);
}

/// An ensemble of two teachers cached at k = C replays to the online ensemble's weights.
#[test]
fn ensemble_from_a_full_cache_matches_online() {
    let out = temp_dir("ensemble");
    let t = teachers(&out, 2);
    let extra = "strategy = \"ensemble:2\"";
    let cache = format!(
        "{extra}\ncache = \"{}\"\ncache_k = 10\ncache_values = \"f32\"",
        out.join("cache").display()
    );
    train(&student(&out, "online", &t, extra));
    let s = student(&out, "cached", &t, &cache);
    cache_teacher(&s, 1.0, None, false).unwrap();
    let (fw, stats) = train(&s);
    assert_eq!((fw, stats.reads), (0, 16));
    assert_eq!(weights(&out, "cached"), weights(&out, "online"));
    let _ = std::fs::remove_dir_all(&out);
}

/// BERT-tiny (masked language modelling): the cache holds the rows of the masked positions
/// only; at k = C a reading student ends where the online one does, bit for bit, and at k = 5
/// one reads every step without a teacher forward.
#[test]
fn mlm_student_replays_its_masked_positions() {
    let out = temp_dir("mlm");
    let mlm = |name: &str, teacher: &Path, extra: &str| {
        Recipe::from_toml(&format!(
            "name = \"{name}\"\nout_dir = \"{}\"\n\
             [model]\nkind = \"bert\"\nsize = \"tiny\"\n\
             [data]\ndataset = \"fortunes\"\nseq_len = 16\nvocab_size = 200\ntrain_limit = 64\n\
             eval_limit = 16\n\
             [train]\nbatch_size = 4\nsamples = 24\nevals = 1\n\
             [optimizer]\nkind = \"adamw\"\nlr = 3e-3\nweight_decay = 0.0\n\
             [distill]\nteachers = [\"{}\"]\ntemperature = 2.0\n{extra}\n",
            out.display(),
            teacher.display()
        ))
        .unwrap()
    };
    let probe = mlm("probe", &out.join("none"), "");
    let arch = trainer::architecture(&probe, &TaskData::load(&probe).unwrap()).unwrap();
    let teacher = out.join("bert-teacher.safetensors");
    let m = Model::new(&arch, 5).unwrap();
    recycle_engine::checkpoint::save(&teacher, &m.state_dict().unwrap(), None).unwrap();

    let full = format!(
        "cache = \"{}\"\ncache_k = 100000\ncache_values = \"f32\"",
        out.join("full").display()
    );
    let (fw, _) = train(&mlm("online", &teacher, ""));
    assert_eq!(fw, 6);
    train(&mlm("recorder", &teacher, &full));
    let (fw, stats) = train(&mlm("reader", &teacher, &full));
    assert_eq!((fw, stats.reads), (0, 6));
    assert_eq!(weights(&out, "reader"), weights(&out, "online"));

    let top5 = format!("cache = \"{}\"\ncache_k = 5", out.join("top5").display());
    let r = mlm("top5", &teacher, &top5);
    // A quarter epoch ahead (fewer than the run's 6 steps): the student reads those and
    // records the rest from its teacher's forwards (cache_mode "record", the default).
    let built = cache_teacher(&r, 0.25, None, false).unwrap();
    assert_eq!(built.k, 5);
    assert!(built.steps > 0 && built.steps < 6, "{built:?}");
    let (fw, stats) = train(&r);
    assert_eq!(
        (fw, stats.reads, stats.writes),
        (6 - built.steps, built.steps, 6 - built.steps)
    );
    let _ = std::fs::remove_dir_all(&out);
}
