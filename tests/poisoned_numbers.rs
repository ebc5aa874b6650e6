//! Poisoned numbers: a NaN or infinity in the input batch, a teacher's logits, the student's
//! weights (a loaded checkpoint), its bf16 activations or the gradients stops the step with an
//! error naming the step and the source, or is skipped and counted under
//! `train.on_nonfinite = "skip"`; gradient clipping by global norm (`train.clip_grad_norm`),
//! checked on a hand-computed case and off by default. Tiny models and data written here.

use std::io::Write;
use std::path::{Path, PathBuf};

use recycle::distill::{KdLoss, TeacherEntry, TeacherPool, TeacherStrategy};
use recycle::experiments::{RunLog, RunSummary};
use recycle::recipe::{OnNonFinite, Recipe};
use recycle::trainer::step::{clip_grad_norm, grad_norm};
use recycle::trainer::{
    self, train_step, train_step_guarded, Architecture, Batch, Model, NonFinite, RunOptions,
    StepGuard,
};
use recycle_engine::optim::{Optimizer, Sgdw};
use recycle_engine::{checkpoint, DType, Device, FlatParams, Tensor};
use recycle_models::ResNetConfig;

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("recycle-poison-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn arch() -> Architecture {
    Architecture::ResNet(ResNetConfig {
        depth: 18,
        num_classes: 10,
        in_channels: 1,
        small_stem: true,
        width: 0.0625,
    })
}

/// Four 8x8 images with labels 0..3; `poison` puts a NaN in one pixel.
fn batch(poison: bool) -> Batch {
    let mut x: Vec<f32> = (0..4 * 64)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    if poison {
        x[77] = f32::NAN;
    }
    Batch::Image {
        x: Tensor::f32(x, &[4, 1, 8, 8]).unwrap(),
        labels: Tensor::from_vec(vec![0i32, 1, 2, 3], &[4], Device::Cpu).unwrap(),
    }
}

/// Plain SGD: the update is exactly `-lr * grad`.
fn sgd(model: &Model) -> Sgdw {
    Sgdw::new(model.params().unwrap().len(), 0.0, 0.0, 0.0, false, 0.1).unwrap()
}

fn values(model: &Model) -> Vec<f32> {
    model.params().unwrap().values().to_vec_f32().unwrap()
}

/// Sets every element of parameter `name` to `v`.
fn fill(model: &Model, name: &str, v: f32) {
    let p = model.params().unwrap();
    let shape = p.get(name).unwrap().shape().to_vec();
    let n = shape.iter().product();
    p.set(name, &Tensor::f32(vec![v; n], &shape).unwrap())
        .unwrap();
}

fn guard(on_nonfinite: OnNonFinite) -> StepGuard {
    StepGuard {
        clip_grad_norm: None,
        on_nonfinite,
    }
}

#[test]
fn clip_grad_norm_scales_a_hand_computed_case() {
    let p = FlatParams::new(&[("w".to_string(), vec![2])], Device::Cpu).unwrap();
    p.grads()
        .copy_from(&Tensor::f32(vec![3.0, 4.0], &[2]).unwrap())
        .unwrap();
    assert_eq!(grad_norm(&p).unwrap(), 5.0);
    // Below the limit: untouched.
    assert_eq!(clip_grad_norm(&p, 10.0).unwrap(), 5.0);
    assert_eq!(p.grads().to_vec_f32().unwrap(), vec![3.0, 4.0]);
    // Above it: scaled by 1 / (5 + 1e-6), as PyTorch's clip_grad_norm_.
    assert_eq!(clip_grad_norm(&p, 1.0).unwrap(), 5.0);
    let g = p.grads().to_vec_f32().unwrap();
    let coef = 1.0f32 / (5.0 + 1e-6);
    assert_eq!(g, vec![3.0 * coef, 4.0 * coef]);
    assert!(
        (g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6,
        "{g:?}"
    );
    assert!((grad_norm(&p).unwrap() - 1.0).abs() < 1e-6);
    // A non-finite norm leaves the gradients for the caller to refuse.
    p.grads()
        .copy_from(&Tensor::f32(vec![f32::INFINITY, 1.0], &[2]).unwrap())
        .unwrap();
    assert!(!clip_grad_norm(&p, 1.0).unwrap().is_finite());
    assert_eq!(p.grads().to_vec_f32().unwrap()[1], 1.0);
}

#[test]
fn a_clipped_step_moves_the_weights_by_the_clipped_norm_and_clipping_is_off_by_default() {
    let (a, b, c) = (
        Model::new(&arch(), 3).unwrap(),
        Model::new(&arch(), 3).unwrap(),
        Model::new(&arch(), 3).unwrap(),
    );
    let loss = KdLoss::kl(1.0, 0.0);
    let before = values(&a);
    let lr = 0.1;
    let plain = train_step(&a, None, &loss, &batch(false), &mut sgd(&a), lr, 0, 1).unwrap();
    let norm = plain.grad_norm.unwrap();
    assert!(norm > 0.01, "{norm}");
    // The default guard (no clipping) and a limit above the norm change no bit.
    let loose = StepGuard {
        clip_grad_norm: Some(norm * 2.0),
        ..StepGuard::default()
    };
    train_step_guarded(
        &b,
        None,
        &loss,
        &batch(false),
        &mut sgd(&b),
        lr,
        0,
        1,
        &loose,
    )
    .unwrap();
    assert_eq!(values(&a), values(&b));
    // A limit of a tenth of the norm: the update's norm is lr * limit.
    let tight = StepGuard {
        clip_grad_norm: Some(norm / 10.0),
        ..StepGuard::default()
    };
    let out = train_step_guarded(
        &c,
        None,
        &loss,
        &batch(false),
        &mut sgd(&c),
        lr,
        0,
        1,
        &tight,
    )
    .unwrap();
    assert_eq!(out.grad_norm, Some(norm), "the norm before clipping");
    let moved: f64 = values(&c)
        .iter()
        .zip(&before)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let want = (lr * norm / 10.0) as f64;
    assert!((moved - want).abs() < 1e-3 * want, "{moved} vs {want}");

    // Recipes: off and `stop` unless asked, neither written back when default.
    let toml = |extra: &str| {
        format!(
            "name = \"r\"\n[model]\nkind = \"resnet\"\n[data]\ndataset = \"fashion-mnist\"\n\
             [train]\nbatch_size = 4\nsamples = 8\n{extra}\n[optimizer]\nkind = \"sgdw\"\nlr = 0.1\n"
        )
    };
    let r = Recipe::from_toml(&toml("")).unwrap();
    assert_eq!(r.train.clip_grad_norm, None);
    assert_eq!(r.train.on_nonfinite, OnNonFinite::Stop);
    let written = r.to_toml().unwrap();
    assert!(!written.contains("clip_grad_norm") && !written.contains("on_nonfinite"));
    let r = Recipe::from_toml(&toml("clip_grad_norm = 1.0\non_nonfinite = \"skip\"")).unwrap();
    assert_eq!(r.train.clip_grad_norm, Some(1.0));
    assert_eq!(r.train.on_nonfinite, OnNonFinite::Skip);
    assert_eq!(Recipe::from_toml(&r.to_toml().unwrap()).unwrap(), r);
    for bad in [
        "clip_grad_norm = 0.0",
        "clip_grad_norm = -1.0",
        "clip_grad_norm = nan",
    ] {
        let err = Recipe::from_toml(&toml(bad)).unwrap_err().to_string();
        assert!(err.contains("train.clip_grad_norm"), "{bad}: {err}");
    }
    let err = Recipe::from_toml(&toml("on_nonfinite = \"ignore\""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("ignore") && err.contains("skip"), "{err}");
}

#[test]
fn a_nan_in_the_input_batch_stops_the_step_or_is_skipped() {
    let m = Model::new(&arch(), 1).unwrap();
    let loss = KdLoss::kl(1.0, 0.0);
    let mut opt = sgd(&m);
    let before = values(&m);
    let err = train_step_guarded(
        &m,
        None,
        &loss,
        &batch(true),
        &mut opt,
        0.1,
        5,
        1,
        &guard(OnNonFinite::Stop),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("step 5") && err.contains("input batch"),
        "{err}"
    );
    assert!(err.contains("on_nonfinite"), "{err}");

    let out = train_step_guarded(
        &m,
        None,
        &loss,
        &batch(true),
        &mut opt,
        0.1,
        5,
        1,
        &guard(OnNonFinite::Skip),
    )
    .unwrap();
    assert_eq!(out.skipped, Some(NonFinite::InputBatch));
    assert_eq!(values(&m), before, "a skipped step changes no weight");
    assert_eq!(opt.steps_taken(), 0, "nor the optimizer's state");
    let grads = m.params().unwrap().grads().to_vec_f32().unwrap();
    assert!(grads.iter().all(|&g| g == 0.0));
    // The next, clean step trains as usual.
    let out = train_step(&m, None, &loss, &batch(false), &mut opt, 0.1, 6, 1).unwrap();
    assert!(out.skipped.is_none() && out.loss.is_finite());
    assert_eq!(opt.steps_taken(), 1);
}

#[test]
fn a_teacher_with_nan_logits_is_named() {
    let student = Model::new(&arch(), 1).unwrap();
    let poisoned = Model::new(&arch(), 2).unwrap();
    fill(&poisoned, "fc.bias", f32::NAN);
    let teachers = vec![TeacherEntry {
        name: "runs/poisoned-teacher".to_string(),
        accuracy: 0.5,
        model: poisoned.teacher(DType::BF16).unwrap(),
    }];
    let pool = TeacherPool::new(teachers, TeacherStrategy::Single, 0).unwrap();
    let loss = KdLoss::kl(4.0, 1.0);
    let before = values(&student);
    let err = train_step(
        &student,
        Some(&pool),
        &loss,
        &batch(false),
        &mut sgd(&student),
        0.1,
        2,
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("step 2"), "{err}");
    assert!(
        err.contains("logits of teacher 0") && err.contains("runs/poisoned-teacher"),
        "{err}"
    );
    assert_eq!(values(&student), before);
}

/// Every BatchNorm buffer's bytes, to compare before and after a step.
fn buffer_bytes(model: &Model) -> Vec<(String, Vec<u8>)> {
    model
        .buffers()
        .iter()
        .map(|(n, t)| (n.clone(), t.to_bytes().unwrap()))
        .collect()
}

#[test]
fn a_skipped_step_leaves_batchnorm_statistics_as_they_were() {
    // The teacher's NaN is only found after the student's training forward has moved its
    // running statistics and counters: skipping must put them back.
    let student = Model::new(&arch(), 1).unwrap();
    let poisoned = Model::new(&arch(), 2).unwrap();
    fill(&poisoned, "fc.bias", f32::NAN);
    let teachers = vec![TeacherEntry {
        name: "poisoned".to_string(),
        accuracy: 0.5,
        model: poisoned.teacher(DType::F32).unwrap(),
    }];
    let pool = TeacherPool::new(teachers, TeacherStrategy::Single, 0).unwrap();
    let loss = KdLoss::kl(4.0, 1.0);
    let mut opt = sgd(&student);
    let before = buffer_bytes(&student);
    assert!(before.len() > 3, "the test model has BatchNorm buffers");
    let out = train_step_guarded(
        &student,
        Some(&pool),
        &loss,
        &batch(false),
        &mut opt,
        0.1,
        3,
        1,
        &guard(OnNonFinite::Skip),
    )
    .unwrap();
    assert_eq!(out.skipped, Some(NonFinite::TeacherLogits { index: 0 }));
    assert_eq!(buffer_bytes(&student), before);

    // A clean step does move them (so the comparison above can fail).
    train_step(&student, None, &loss, &batch(false), &mut opt, 0.1, 4, 1).unwrap();
    let after = buffer_bytes(&student);
    for ((name, b), (_, a)) in before.iter().zip(&after) {
        assert_ne!(a, b, "`{name}` moved by a trained step");
    }
}

#[test]
fn nan_weights_and_bf16_overflow_are_told_apart() {
    let loss = KdLoss::kl(1.0, 0.0);
    let m = Model::new(&arch(), 1).unwrap();
    fill(&m, "fc.weight", f32::NAN);
    let out = train_step_guarded(
        &m,
        None,
        &loss,
        &batch(false),
        &mut sgd(&m),
        0.1,
        0,
        1,
        &guard(OnNonFinite::Skip),
    )
    .unwrap();
    assert_eq!(out.skipped, Some(NonFinite::StudentWeights));

    // Finite weights at the top of bf16's range: the logits overflow.
    let m = Model::new(&arch(), 1)
        .unwrap()
        .with_activations(DType::BF16)
        .unwrap();
    fill(&m, "fc.weight", 3.0e38);
    let err = train_step(&m, None, &loss, &batch(false), &mut sgd(&m), 0.1, 9, 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("step 9") && err.contains("student's logits") && err.contains("bf16"),
        "{err}"
    );
}

#[test]
fn a_checkpoint_holding_nan_is_refused_when_loaded() {
    let dir = temp_dir("ckpt");
    let m = Model::new(&arch(), 1).unwrap();
    let mut state = m.state_dict().unwrap();
    let (name, t) = state
        .iter_mut()
        .find(|(n, _)| n == "fc.weight")
        .expect("fc.weight");
    let mut v = t.to_vec_f32().unwrap();
    v[3] = f32::INFINITY;
    *t = Tensor::f32(v, t.shape()).unwrap();
    let name = name.clone();
    let path = dir.join("poisoned.safetensors");
    checkpoint::save(&path, &state, None).unwrap();
    for err in [
        Model::load(&arch(), &path).map(|_| ()),
        trainer::load_teachers(std::slice::from_ref(&path), &arch(), Device::Cpu, None).map(|_| ()),
        m.load_state_dict(state.clone(), &path),
    ] {
        let err = err.unwrap_err().to_string();
        assert!(
            err.contains("poisoned.safetensors") && err.contains(&format!("`{name}`")),
            "{err}"
        );
        assert!(err.contains("inf") && err.contains("element 3"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes a tiny Fashion-MNIST-shaped data set (8x8 images, gzip IDX) to `dir`.
fn write_tiny_idx(dir: &Path) {
    fn idx(path: PathBuf, magic: u32, dims: &[u32], data: &[u8]) {
        let mut bytes = magic.to_be_bytes().to_vec();
        dims.iter().for_each(|d| bytes.extend(d.to_be_bytes()));
        bytes.extend_from_slice(data);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&bytes).unwrap();
        std::fs::write(path, gz.finish().unwrap()).unwrap();
    }
    for (prefix, n) in [("train", 64u32), ("t10k", 32)] {
        let pixels: Vec<u8> = (0..n * 64).map(|i| (i * 31 % 256) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        idx(
            dir.join(format!("{prefix}-images-idx3-ubyte.gz")),
            0x803,
            &[n, 8, 8],
            &pixels,
        );
        idx(
            dir.join(format!("{prefix}-labels-idx1-ubyte.gz")),
            0x801,
            &[n],
            &labels,
        );
    }
}

fn diverging_recipe(out: &Path, data: &Path, name: &str, on_nonfinite: &str) -> Recipe {
    Recipe::from_toml(&format!(
        r#"
name = "{name}"
out_dir = "{}"
[model]
kind = "resnet"
width = 0.0625
[data]
dataset = "fashion-mnist"
dir = "{}"
[train]
batch_size = 16
samples = 96
evals = 1
checkpoint_every = 1
on_nonfinite = "{on_nonfinite}"
[optimizer]
kind = "sgdw"
lr = 1e30
schedule = "constant"
"#,
        out.display(),
        data.display()
    ))
    .unwrap()
}

#[test]
fn a_diverging_run_stops_keeping_a_finite_checkpoint_or_skips_and_counts() {
    let out = temp_dir("run");
    let data = out.join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_tiny_idx(&data);

    let stop = diverging_recipe(&out, &data, "stop", "stop");
    let err = trainer::run(&stop, &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("stopped at step") && err.contains("a NaN or infinity at step"),
        "{err}"
    );
    // Whatever checkpoint the run wrote before it stopped holds finite weights.
    let ckpt = out.join("stop").join(trainer::CHECKPOINT_FILE);
    if ckpt.exists() {
        let c = checkpoint::load(&ckpt).unwrap();
        for (name, t) in c.tensors.iter().filter(|(n, _)| n.starts_with("model.")) {
            if t.dtype().is_float() {
                let v = t.to_vec_f32().unwrap();
                assert!(
                    v.iter().all(|x| x.is_finite()),
                    "{name} in the last checkpoint"
                );
            }
        }
    }

    let skip = diverging_recipe(&out, &data, "skip", "skip");
    let summary = trainer::run(&skip, &RunOptions::default()).unwrap();
    assert!(summary.skipped_steps > 0, "{summary:?}");
    assert!(
        summary.skipped_steps < summary.steps,
        "the first step trains"
    );
    let log = RunLog::read(out.join("skip").join(trainer::LOG_FILE)).unwrap();
    let marked = log.records.iter().filter(|r| r.skipped.is_some()).count() as u64;
    assert_eq!(marked, summary.skipped_steps);
    assert_eq!(
        log.records.last().unwrap().skipped_steps,
        summary.skipped_steps
    );
    assert_eq!(
        RunSummary::read(out.join("skip")).unwrap().skipped_steps,
        summary.skipped_steps
    );
    let c = checkpoint::load(&out.join("skip").join(trainer::CHECKPOINT_FILE)).unwrap();
    assert_eq!(
        c.metadata.get("skipped_steps").map(String::as_str),
        Some(summary.skipped_steps.to_string().as_str())
    );
    let _ = std::fs::remove_dir_all(&out);
}
