//! What the reliability tests share: a scratch directory, the tiny recipe they train (a
//! ResNet-18 at width 1/16 on 256 Fashion-MNIST images, 16 steps), the data it reads, and a way
//! to run the `recycle` binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// A fresh directory for one test, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("recycle-rel-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `[data]` table of the tests' recipes: the one place that says where the images come
/// from (a small Fashion-MNIST-shaped set the tests write, once per process). No validation
/// split, so that 256 images make the 16 steps of two epochs.
pub fn data_table() -> String {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("recycle-rel-data-{}", std::process::id()));
        recycle::data::test_support::fixture_data(&base)
            .expect("writing the fixture data")
            .0
    });
    format!(
        "[data]\ndataset = \"fashion-mnist\"\ndir = \"{}\"\ntrain_limit = 256\neval_limit = 128\n\
         validation_fraction = 0.0\n",
        dir.display()
    )
}

/// The tiny recipe: 16 steps of batch 32, an evaluation every 4 steps, a checkpoint every 2.
pub fn tiny_toml(out: &Path, name: &str) -> String {
    format!(
        r#"name = "{name}"
out_dir = "{}"
[model]
kind = "resnet"
width = 0.0625
{}
[train]
batch_size = 32
epochs = 2.0
evals = 4
checkpoint_every = 2
[optimizer]
kind = "sgdw"
lr = 0.1
weight_decay = 5e-4
warmup = 0.1
"#,
        out.display(),
        data_table()
    )
}

/// Steps of the tiny recipe, and the most steps a kill may lose (one checkpoint interval).
pub const TINY_STEPS: u64 = 16;
pub const CHECKPOINT_EVERY: u64 = 2;

/// Writes the tiny recipe to `<out>/<name>.toml` and returns its path.
pub fn write_recipe(out: &Path, name: &str) -> PathBuf {
    let path = out.join(format!("{name}.toml"));
    std::fs::write(&path, tiny_toml(out, name)).unwrap();
    path
}

/// The `recycle` binary with `args`.
pub fn recycle(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_recycle"));
    c.args(args);
    c.env_remove("RECYCLE_TEST_SLOW_MS");
    c
}

/// Runs `recycle` to completion.
pub fn run_recycle(args: &[&str]) -> Output {
    recycle(args).output().unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Temporary files left in `dir` by writes that never reached their rename.
pub fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.') && (n.contains(".tmp-") || n.ends_with(".tmp")))
                .collect()
        })
        .unwrap_or_default()
}

/// The step a checkpoint file records (it must load: a partial file is a failure).
pub fn checkpoint_step(path: &Path) -> u64 {
    let c = recycle_engine::checkpoint::load(path)
        .unwrap_or_else(|e| panic!("{} does not load: {e}", path.display()));
    c.metadata["step"].parse().unwrap()
}
