//! The cache format: round trip, each key field's mismatch, a truncated and a corrupt shard.

use std::path::{Path, PathBuf};

use recycle_engine::kd_loss::CachedTargets;
use recycle_engine::rng::normal_at;

use super::shard::{shard_name, STEPS_PER_SHARD};
use super::*;
use crate::distill::KdKind;
use crate::recipe::Recipe;

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("recycle-cache-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn recipe(extra_data: &str, seed: u64, batch: usize) -> Recipe {
    Recipe::from_toml(&format!(
        r#"
name = "r"
seed = {seed}
[model]
kind = "resnet"
[data]
dataset = "fashion-mnist"
train_limit = 512
{extra_data}
[train]
batch_size = {batch}
epochs = 1.0
[optimizer]
kind = "sgdw"
lr = 0.1
"#
    ))
    .unwrap()
}

fn rows(k: usize, values: ValueType) -> RowSpec {
    RowSpec {
        k,
        term: KdKind::Kl { temperature: 4.0 },
        values,
    }
}

fn teacher_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn targets(seed: u64, rows: usize, classes: usize, k: usize) -> CachedTargets {
    let logits: Vec<f32> = (0..rows * classes)
        .map(|i| 3.0 * normal_at(seed, i as u64))
        .collect();
    CachedTargets::from_logits(&logits, classes, k, 4.0).unwrap()
}

#[test]
fn round_trip_over_two_shards() {
    let dir = scratch("round-trip");
    let t = teacher_file(&dir, "t.safetensors", b"weights");
    for values in [ValueType::F32, ValueType::Bf16] {
        let spec = rows(3, values);
        let key = CacheKey::new(&recipe("", 0, 32), &t, "resnet18", "f32", &spec).unwrap();
        let cdir = dir.join(values.name());
        let steps = [0u64, 1, 5, STEPS_PER_SHARD + 2];
        let written: Vec<CachedTargets> = steps
            .iter()
            .map(|&s| targets(s, 4 + s as usize % 3, 10, 3))
            .collect();
        {
            let mut c = TeacherCache::open(&cdir, &key, spec, CacheMode::Record).unwrap();
            for (&s, t) in steps.iter().zip(&written) {
                assert!(c.get(s).unwrap().is_none());
                c.put(s, t.clone()).unwrap();
            }
            c.flush().unwrap();
            assert_eq!(c.stats().writes, 4);
        }
        assert!(cdir.join(shard_name(0)).exists());
        assert!(cdir.join(shard_name(STEPS_PER_SHARD)).exists());
        let mut c = TeacherCache::open(&cdir, &key, spec, CacheMode::Read).unwrap();
        for (&s, want) in steps.iter().zip(&written) {
            let got = c.get(s).unwrap().expect("a recorded step");
            assert_eq!(got.indices, want.indices);
            assert_eq!(got.tail_lse, want.tail_lse);
            for (g, w) in got.values.iter().zip(&want.values) {
                match values {
                    ValueType::F32 => assert_eq!(g.to_bits(), w.to_bits()),
                    ValueType::Bf16 => {
                        assert_eq!(*g, half::bf16::from_f32(*w).to_f32());
                        assert!((g - w).abs() <= w.abs() / 256.0);
                    }
                }
            }
        }
        assert!(c.get(2).unwrap().is_none(), "a step never recorded");
        assert_eq!(c.stats().reads, 4);
        let e = c.put(9, written[0].clone()).unwrap_err();
        assert!(e.to_string().contains("read-only"), "{e}");
    }
    // A run that stopped inside a shard: a later one adds steps and keeps the earlier ones.
    let spec = rows(3, ValueType::F32);
    let key = CacheKey::new(&recipe("", 0, 32), &t, "resnet18", "f32", &spec).unwrap();
    let cdir = dir.join("f32");
    let mut c = TeacherCache::open(&cdir, &key, spec, CacheMode::Record).unwrap();
    c.put(7, targets(7, 2, 10, 3)).unwrap();
    drop(c);
    let mut c = TeacherCache::open(&cdir, &key, spec, CacheMode::Read).unwrap();
    assert!(c.get(0).unwrap().is_some() && c.get(7).unwrap().is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn each_key_field_mismatch_is_named() {
    let dir = scratch("keys");
    let t = teacher_file(&dir, "t.safetensors", b"weights");
    let t2 = teacher_file(&dir, "u.safetensors", b"other weights");
    let base_rows = rows(10, ValueType::Bf16);
    let base = CacheKey::new(&recipe("", 0, 32), &t, "resnet18", "f32", &base_rows).unwrap();
    let cdir = dir.join("c");
    drop(TeacherCache::open(&cdir, &base, base_rows, CacheMode::Record).unwrap());
    let mse = RowSpec {
        term: KdKind::Mse,
        ..base_rows
    };
    let hot = RowSpec {
        term: KdKind::Kl { temperature: 2.0 },
        ..base_rows
    };
    let cases: Vec<(&str, CacheKey)> = vec![
        (
            "teacher.checkpoint_sha256",
            CacheKey::new(&recipe("", 0, 32), &t2, "resnet18", "f32", &base_rows).unwrap(),
        ),
        (
            "teacher.architecture",
            CacheKey::new(&recipe("", 0, 32), &t, "resnet34", "f32", &base_rows).unwrap(),
        ),
        (
            "teacher.compute",
            CacheKey::new(&recipe("", 0, 32), &t, "resnet18", "bf16", &base_rows).unwrap(),
        ),
        (
            "data.validation_fraction",
            CacheKey::new(
                &recipe("validation_fraction = 0.2", 0, 32),
                &t,
                "resnet18",
                "f32",
                &base_rows,
            )
            .unwrap(),
        ),
        (
            "data.image_size",
            CacheKey::new(
                &recipe("image_size = 32", 0, 32),
                &t,
                "resnet18",
                "f32",
                &base_rows,
            )
            .unwrap(),
        ),
        (
            "seed",
            CacheKey::new(&recipe("", 1, 32), &t, "resnet18", "f32", &base_rows).unwrap(),
        ),
        (
            "train.batch_size",
            CacheKey::new(&recipe("", 0, 64), &t, "resnet18", "f32", &base_rows).unwrap(),
        ),
        (
            "cache_k",
            CacheKey::new(
                &recipe("", 0, 32),
                &t,
                "resnet18",
                "f32",
                &rows(5, ValueType::Bf16),
            )
            .unwrap(),
        ),
        (
            "cache_values",
            CacheKey::new(
                &recipe("", 0, 32),
                &t,
                "resnet18",
                "f32",
                &rows(10, ValueType::F32),
            )
            .unwrap(),
        ),
        (
            "distill.loss",
            CacheKey::new(&recipe("", 0, 32), &t, "resnet18", "f32", &mse).unwrap(),
        ),
        (
            "distill.temperature",
            CacheKey::new(&recipe("", 0, 32), &t, "resnet18", "f32", &hot).unwrap(),
        ),
    ];
    for (field, key) in cases {
        let e = TeacherCache::open(&cdir, &key, base_rows, CacheMode::Record).unwrap_err();
        let msg = e.to_string();
        let (have, want) = (&base.fields[field], &key.fields[field]);
        assert!(
            msg.contains(&format!(
                "`{field}` is {have} in the cache but {want} for this run"
            )),
            "{field}: {msg}"
        );
        assert!(msg.contains("delete"), "{msg}");
    }
    // data.train_limit: the recipe's limit, checked through the same path.
    let mut r = recipe("", 0, 32);
    r.data.train_limit = Some(1024);
    let key = CacheKey::new(&r, &t, "resnet18", "f32", &base_rows).unwrap();
    let e = TeacherCache::open(&cdir, &key, base_rows, CacheMode::Read).unwrap_err();
    assert!(
        e.to_string()
            .contains("`data.train_limit` is 512 in the cache but 1024"),
        "{e}"
    );
    // Fields that do not change a batch are not in the key.
    let mut r = recipe("", 0, 32);
    r.data.eval_limit = Some(7);
    r.data.decode_threads = 3;
    let key = CacheKey::new(&r, &t, "resnet18", "f32", &base_rows).unwrap();
    assert_eq!(key, base);
    // No cache to read.
    let e = TeacherCache::open(&dir.join("none"), &base, base_rows, CacheMode::Read).unwrap_err();
    assert!(e.to_string().contains("cache-teacher"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A truncated shard and a shard with one flipped byte: refused when reading only (the error
/// names the file and what is wrong), recorded again when recording, never read.
#[test]
fn damaged_shards_are_refused_or_rebuilt() {
    let dir = scratch("damaged");
    let t = teacher_file(&dir, "t.safetensors", b"weights");
    let spec = rows(4, ValueType::Bf16);
    let key = CacheKey::new(&recipe("", 0, 32), &t, "resnet18", "f32", &spec).unwrap();
    let good = targets(1, 6, 20, 4);
    type Damage = fn(&mut Vec<u8>);
    let damages: [(&str, Damage, &str); 3] = [
        (
            "truncated",
            |b| b.truncate(b.len() - 9),
            "checksum mismatch",
        ),
        ("flipped", |b| b[100] ^= 0x10, "checksum mismatch"),
        (
            "too short",
            |b| b.truncate(40),
            "shorter than a shard's header",
        ),
    ];
    for (name, damage, why) in damages {
        let cdir = dir.join(name.replace(' ', "-"));
        {
            let mut c = TeacherCache::open(&cdir, &key, spec, CacheMode::Record).unwrap();
            c.put(3, good.clone()).unwrap();
        }
        let path = cdir.join(shard_name(3));
        let mut bytes = std::fs::read(&path).unwrap();
        damage(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();

        let mut c = TeacherCache::open(&cdir, &key, spec, CacheMode::Read).unwrap();
        let e = c.get(3).unwrap_err().to_string();
        assert!(e.contains(why) && e.contains(&shard_name(3)), "{name}: {e}");

        let mut c = TeacherCache::open(&cdir, &key, spec, CacheMode::Record).unwrap();
        assert!(
            c.get(3).unwrap().is_none(),
            "{name}: a damaged shard is not read"
        );
        assert_eq!(c.stats().rebuilt, 1);
        c.put(3, good.clone()).unwrap();
        c.flush().unwrap();
        let mut c = TeacherCache::open(&cdir, &key, spec, CacheMode::Read).unwrap();
        assert_eq!(c.get(3).unwrap().unwrap().indices, good.indices, "{name}");
    }
    // A shard of another key (copied in by hand) is refused too.
    let other = CacheKey::new(&recipe("", 5, 32), &t, "resnet18", "f32", &spec).unwrap();
    let odir = dir.join("other");
    {
        let mut c = TeacherCache::open(&odir, &other, spec, CacheMode::Record).unwrap();
        c.put(3, good.clone()).unwrap();
    }
    std::fs::copy(
        odir.join(shard_name(3)),
        dir.join("flipped").join(shard_name(3)),
    )
    .unwrap();
    let mut c = TeacherCache::open(&dir.join("flipped"), &key, spec, CacheMode::Read).unwrap();
    let e = c.get(3).unwrap_err().to_string();
    assert!(e.contains("another key"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
