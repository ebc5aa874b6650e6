//! Image folders in ImageNet's layout, on folders these tests write: small JPEGs (RGB, grey,
//! CMYK) and PNGs (RGB, grey, palette-free RGBA) of mixed sizes, and one corrupt file.
//! Listing and labels, decoding to RGB, the corrupt file named or skipped, training views
//! reproduced bit for bit from (seed, epoch, index), crop boxes against torchvision's, and
//! a few steps of `recycle train` with distillation, twice, to the same bytes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use recycle::data::image_decode::decode_rgb;
use recycle::data::image_folder::{
    open_splits, FolderIndex, FolderOptions, FolderRequest, FolderSplit, SkipLog, ViewKind,
};
use recycle::data::image_transform::{random_resized_crop, CropBox, CropDraws, RATIO, SCALE};
use recycle::data::BatchSource;
use recycle::recipe::Recipe;
use recycle::trainer::{self, RunOptions};

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("recycle-imgfolder-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A smooth pattern with a class-dependent tint, so classes differ and crops are not constant.
fn rgb_pixels(w: usize, h: usize, class: usize, k: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let base = ((x * 255) / w.max(1)) as u8;
            let v = ((y * 255) / h.max(1)) as u8;
            p.extend_from_slice(&[
                base.wrapping_add((class * 80) as u8),
                v.wrapping_add((k * 13) as u8),
                ((class * 60 + x + y) % 256) as u8,
            ]);
        }
    }
    p
}

fn jpeg(data: &[u8], w: usize, h: usize, color: jpeg_encoder::ColorType) -> Vec<u8> {
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 90)
        .encode(data, w as u16, h as u16, color)
        .unwrap();
    out
}

fn png_bytes(data: &[u8], w: usize, h: usize, color: png::ColorType) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut e = png::Encoder::new(&mut out, w as u32, h as u32);
        e.set_color(color);
        e.set_depth(png::BitDepth::Eight);
        let mut writer = e.write_header().unwrap();
        writer.write_image_data(data).unwrap();
    }
    out
}

/// The file of image `k` of class `class`: kinds and sizes cycle through RGB, grey and CMYK
/// JPEGs and RGB, grey and RGBA PNGs, from 9x13 to 61x40 pixels.
fn image_file(class: usize, k: usize) -> (String, Vec<u8>) {
    let sizes = [(24, 24), (40, 30), (30, 40), (9, 13), (61, 40), (16, 20)];
    let (w, h) = sizes[(class + k) % sizes.len()];
    let rgb = rgb_pixels(w, h, class, k);
    match k % 6 {
        0 => (
            format!("img{k:03}.JPEG"),
            jpeg(&rgb, w, h, jpeg_encoder::ColorType::Rgb),
        ),
        1 => {
            let grey: Vec<u8> = rgb.chunks(3).map(|p| p[0]).collect();
            (
                format!("img{k:03}.jpg"),
                jpeg(&grey, w, h, jpeg_encoder::ColorType::Luma),
            )
        }
        2 => {
            let cmyk: Vec<u8> = rgb
                .chunks(3)
                .flat_map(|p| [255 - p[0], 255 - p[1], 255 - p[2], 0])
                .collect();
            (
                format!("img{k:03}.jpeg"),
                jpeg(&cmyk, w, h, jpeg_encoder::ColorType::Cmyk),
            )
        }
        3 => (
            format!("img{k:03}.png"),
            png_bytes(&rgb, w, h, png::ColorType::Rgb),
        ),
        4 => {
            let grey: Vec<u8> = rgb.chunks(3).map(|p| p[1]).collect();
            (
                format!("img{k:03}.PNG"),
                png_bytes(&grey, w, h, png::ColorType::Grayscale),
            )
        }
        _ => {
            let rgba: Vec<u8> = rgb
                .chunks(3)
                .flat_map(|p| [p[0], p[1], p[2], 200])
                .collect();
            (
                format!("img{k:03}.png"),
                png_bytes(&rgba, w, h, png::ColorType::Rgba),
            )
        }
    }
}

/// Writes `root/train/<class>/*` (`per_class` images each) and `root/val/<class>/*` (4 each,
/// one class left out), a text file the listing ignores, and, when `corrupt`, one damaged JPEG
/// in training class `b`. Returns the corrupt file's path.
fn write_folder(root: &Path, classes: &[&str], per_class: usize, corrupt: bool) -> PathBuf {
    for (c, name) in classes.iter().enumerate() {
        let dir = root.join("train").join(name);
        std::fs::create_dir_all(dir.join("nested")).unwrap();
        for k in 0..per_class {
            let (file, bytes) = image_file(c, k);
            // Some files one folder down: torchvision's walk finds them too.
            let sub = if k % 5 == 4 {
                dir.join("nested")
            } else {
                dir.clone()
            };
            std::fs::write(sub.join(file), bytes).unwrap();
        }
        std::fs::write(dir.join("README.txt"), "not an image").unwrap();
        if c + 1 < classes.len() {
            let val = root.join("val").join(name);
            std::fs::create_dir_all(&val).unwrap();
            for k in 0..4 {
                let (file, bytes) = image_file(c, k + 100);
                std::fs::write(val.join(file), bytes).unwrap();
            }
        }
    }
    let bad = root.join("train").join(classes[1]).join("broken.jpg");
    if corrupt {
        let (_, good) = image_file(1, 0);
        // The header of a JPEG, then noise: no decoder can make an image of it.
        let mut bytes = good[..20].to_vec();
        bytes.extend((0..200u32).map(|i| (i * 37 % 251) as u8));
        std::fs::write(&bad, bytes).unwrap();
    }
    bad
}

fn options(skip_bad: bool) -> FolderOptions {
    FolderOptions {
        image_size: 16,
        skip_bad,
        decode_threads: 2,
    }
}

fn request(root: &Path, skip_bad: bool, seed: u64) -> FolderRequest<'_> {
    FolderRequest {
        root,
        options: options(skip_bad),
        seed,
        batch_size: 8,
        train_limit: None,
        eval_limit: None,
        validation_fraction: 0.1,
    }
}

#[test]
fn a_folder_lists_sorted_classes_and_maps_val_by_name() {
    let root = temp_dir("list");
    write_folder(&root, &["zebra", "ant", "moth"], 7, false);
    let index = FolderIndex::scan(&root).unwrap();
    assert_eq!(index.classes, ["ant", "moth", "zebra"]);
    assert_eq!(index.train.len(), 21);
    // Sorted by class, then by path; the nested files are found; the text file is not.
    let labels: Vec<i32> = index.train.iter().map(|i| i.label).collect();
    assert_eq!(labels, [[0; 7], [1; 7], [2; 7]].concat());
    assert!(index
        .train
        .iter()
        .any(|i| i.path.to_string_lossy().contains("nested")));
    assert!(index
        .train
        .windows(2)
        .all(|w| w[0].label < w[1].label || w[0].path < w[1].path));
    // val/ holds `zebra` and `ant` (the last class written, `moth`, is left out), numbered
    // as in train/.
    let mut val_labels: Vec<i32> = index.val.iter().map(|i| i.label).collect();
    val_labels.dedup();
    assert_eq!(val_labels, [0, 2]);

    // A validation class training lacks, a class without images, no split: errors naming it.
    std::fs::create_dir_all(root.join("val/wasp")).unwrap();
    std::fs::write(root.join("val/wasp/a.png"), b"x").unwrap();
    let err = FolderIndex::scan(&root).unwrap_err().to_string();
    assert!(err.contains("wasp") && err.contains("not a class"), "{err}");
    std::fs::remove_dir_all(root.join("val/wasp")).unwrap();
    std::fs::create_dir_all(root.join("train/empty")).unwrap();
    let err = FolderIndex::scan(&root).unwrap_err().to_string();
    assert!(
        err.contains("train/empty") && err.contains("no .jpg"),
        "{err}"
    );
    let err = FolderIndex::scan(&root.join("nowhere"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nowhere/train") && err.contains("--data"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn every_kind_of_file_decodes_to_rgb() {
    for k in 0..6 {
        let (name, bytes) = image_file(0, k);
        let img = decode_rgb(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(img.pixels.len(), img.width * img.height * 3, "{name}");
        let want = rgb_pixels(img.width, img.height, 0, k);
        // Mean absolute difference from the pixels written (JPEG is lossy; grey files hold one
        // channel, copied to all three).
        let channel =
            |p: &[u8], c: usize| -> Vec<i32> { p.chunks(3).map(|q| q[c] as i32).collect() };
        let compare = |got_c: usize, want_c: usize| -> f64 {
            let (g, w) = (channel(&img.pixels, got_c), channel(&want, want_c));
            g.iter()
                .zip(&w)
                .map(|(a, b)| (a - b).abs() as f64)
                .sum::<f64>()
                / g.len() as f64
        };
        let err = match k % 6 {
            1 => compare(0, 0).max(compare(2, 0)),
            4 => compare(0, 1).max(compare(1, 1)),
            _ => (0..3).map(|c| compare(c, c)).fold(0.0, f64::max),
        };
        assert!(err < 12.0, "{name}: mean error {err}");
    }
}

#[test]
fn a_corrupt_file_is_an_error_naming_it_or_skipped_and_counted() {
    let root = temp_dir("corrupt");
    let bad = write_folder(&root, &["a", "b"], 6, true);
    let splits = open_splits(&FolderRequest {
        validation_fraction: 0.0,
        ..request(&root, false, 0)
    })
    .unwrap();
    let at = splits
        .train
        .items
        .iter()
        .position(|i| i.path == bad)
        .unwrap();
    let err = splits.train.view(at, 0).unwrap_err().to_string();
    assert!(err.contains(&bad.display().to_string()), "{err}");
    let err = splits
        .train
        .make_batch(&[0, at], 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("broken.jpg"), "{err}");

    // skip_bad: the training batch keeps its size (the next item stands in), counted once.
    let skipping = open_splits(&FolderRequest {
        validation_fraction: 0.0,
        ..request(&root, true, 0)
    })
    .unwrap();
    let b = skipping.train.make_batch(&[0, at, 1], 0).unwrap();
    assert_eq!(b.x.shape(), &[3, 3, 16, 16]);
    let labels = b.labels.to_vec::<i32>().unwrap();
    assert_eq!(labels[1], skipping.train.items[at + 1].label);
    skipping.train.make_batch(&[at], 1).unwrap();
    assert_eq!(skipping.train.skips.count(), 1);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn training_views_are_a_function_of_seed_epoch_and_index() {
    let root = temp_dir("views");
    write_folder(&root, &["a", "b", "c"], 8, false);
    let batch = |seed: u64, step: u64| -> Vec<f32> {
        // A fresh listing and pool each time: nothing carries over but the folder.
        let s = open_splits(&request(&root, false, seed)).unwrap();
        let idx: Vec<usize> = (0..s.train.len()).collect();
        s.train
            .make_batch(&idx, step)
            .unwrap()
            .x
            .to_vec_f32()
            .unwrap()
    };
    let first = batch(7, 0);
    assert!(first.iter().all(|v| v.is_finite()));
    let again = batch(7, 0);
    assert!(
        first
            .iter()
            .zip(&again)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "the same (seed, epoch, index) made another view"
    );
    // Steps of one epoch (batch 8 of 22 training items: 2 steps) share its views.
    assert_eq!(batch(7, 1), first);
    assert_ne!(batch(7, 2), first, "a new epoch drew the same views");
    assert_ne!(batch(8, 0), first, "another seed drew the same views");

    // One view alone equals its place in a batch, and eval views have no randomness.
    let s = open_splits(&request(&root, false, 7)).unwrap();
    let n = 3 * 16 * 16;
    assert_eq!(s.train.view(5, 0).unwrap(), first[5 * n..6 * n].to_vec());
    let pool = FolderSplit::decode_pool(1).unwrap();
    let eval = FolderSplit::new(
        s.test.items.clone(),
        3,
        ViewKind::Eval,
        options(false),
        pool,
        Arc::new(SkipLog::default()),
    );
    assert_eq!(eval.view(0, 0).unwrap(), eval.view(0, 9).unwrap());
    assert_eq!(eval.view(0, 0).unwrap(), s.test.view(0, 3).unwrap());
    let _ = std::fs::remove_dir_all(&root);
}

/// Draws recorded from the reference script: uniforms and integers by its two rules.
struct Recorded<'a> {
    values: &'a [f64],
    used: usize,
}

impl CropDraws for Recorded<'_> {
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        self.used += 1;
        lo + (hi - lo) * self.values[self.used - 1]
    }

    fn below(&mut self, n: usize) -> usize {
        self.used += 1;
        (self.values[self.used - 1] * n as f64).floor() as usize
    }
}

#[test]
fn crop_boxes_match_torchvision_draw_for_draw() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/crop_boxes.json"),
    )
    .unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 100);
    let mut fallbacks = 0;
    for case in cases {
        let values: Vec<f64> = case["draws"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let (w, h) = (
            case["width"].as_u64().unwrap() as usize,
            case["height"].as_u64().unwrap() as usize,
        );
        let b: Vec<usize> = case["box"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let mut draws = Recorded {
            values: &values,
            used: 0,
        };
        let got = random_resized_crop(&mut draws, w, h, SCALE, RATIO);
        let want = CropBox {
            i: b[0],
            j: b[1],
            h: b[2],
            w: b[3],
        };
        assert_eq!(got, want, "{w}x{h} with draws {values:?}");
        assert_eq!(draws.used as u64, case["used"].as_u64().unwrap());
        fallbacks += usize::from(draws.used == 20);
    }
    assert!(fallbacks > 0, "no case reached the fallback");
}

fn tiny_recipe(out: &Path, data: &Path, name: &str, distill: &str) -> String {
    format!(
        r#"
name = "{name}"
out_dir = "{}"
[model]
kind = "resnet"
width = 0.0625
[data]
dataset = "image-folder"
dir = "{}"
image_size = 16
skip_bad = true
decode_threads = 2
[train]
batch_size = 8
epochs = 2.0
evals = 2
[optimizer]
kind = "sgdw"
lr = 0.1
warmup = 0.1
{distill}
"#,
        out.display(),
        data.display()
    )
}

#[test]
fn distilled_training_on_a_folder_repeats_bit_for_bit() {
    let root = temp_dir("train");
    let data = root.join("data");
    write_folder(&data, &["a", "b", "c"], 10, true);
    let out = root.join("runs");
    let teacher = Recipe::from_toml(&tiny_recipe(&out, &data, "teacher", "")).unwrap();
    let t = trainer::run(&teacher, &RunOptions::default()).unwrap();
    assert!((0.0..=1.0).contains(&t.final_eval));
    assert!(t.final_validation.is_some());
    let student = |name: &str| {
        let distill = format!(
            "[distill]\nteachers = [\"{}\"]\nloss = \"kl\"\n",
            out.join("teacher").display()
        );
        Recipe::from_toml(&tiny_recipe(&out, &data, name, &distill)).unwrap()
    };
    let a = trainer::run(&student("student-a"), &RunOptions::default()).unwrap();
    let b = trainer::run(&student("student-b"), &RunOptions::default()).unwrap();
    assert!(a.teacher_forwards > 0);
    assert_eq!(a.final_eval, b.final_eval);
    let wa = std::fs::read(out.join("student-a/final.safetensors")).unwrap();
    let wb = std::fs::read(out.join("student-b/final.safetensors")).unwrap();
    assert!(wa == wb, "two runs of one recipe on a folder differ");
    let _ = std::fs::remove_dir_all(&root);
}

/// The shipped ResNet-50 recipe and its variants read; the base recipe, shrunk to fit a CPU
/// test (smaller views, batch and width, on the CPU), trains through `recycle train --data`.
#[test]
fn the_shipped_imagenet_recipe_starts_training_with_data_given_on_the_command_line() {
    let recipes = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    for name in [
        "resnet50-imagenet",
        "resnet50-imagenet-kd-kl",
        "resnet50-imagenet-kd-mse",
        "resnet50-imagenet-kd-kl-stop30",
        "resnet50-imagenet-random-one",
    ] {
        let r = Recipe::from_file(&recipes.join(format!("{name}.toml"))).unwrap();
        assert_eq!(r.name, name);
        assert_eq!((r.train.batch_size, r.train.epochs), (2048, Some(90.0)));
        assert_eq!(r.data.dataset, "image-folder");
    }
    let root = temp_dir("shipped");
    let data = root.join("data");
    write_folder(&data, &["a", "b"], 6, false);
    let text = std::fs::read_to_string(recipes.join("resnet50-imagenet.toml")).unwrap();
    let mut doc: toml::Table = toml::from_str(&text).unwrap();
    doc.insert("device".into(), "cpu".into());
    doc.insert(
        "out_dir".into(),
        root.join("runs").display().to_string().into(),
    );
    let mut set = |table: &str, key: &str, value: toml::Value| {
        doc.get_mut(table)
            .and_then(|t| t.as_table_mut())
            .unwrap()
            .insert(key.into(), value);
    };
    set("model", "width", toml::Value::Float(0.03125));
    set("data", "image_size", toml::Value::Integer(32));
    set("data", "validation_fraction", toml::Value::Float(0.2));
    set("train", "batch_size", toml::Value::Integer(4));
    set("train", "epochs", toml::Value::Float(1.0));
    set("train", "evals", toml::Value::Integer(1));
    let path = root.join("small.toml");
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_recycle"))
        .args([
            "train",
            path.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("resnet50-imagenet: accuracy"), "{stdout}");
    assert!(root
        .join("runs/resnet50-imagenet/final.safetensors")
        .exists());
    // Without --data (and no data.dir) the error says what to give.
    let run = Command::new(env!("CARGO_BIN_EXE_recycle"))
        .args(["train", path.to_str().unwrap(), "--overwrite"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("--data") && stderr.contains("train/<class>"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&root);
}
