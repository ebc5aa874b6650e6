//! The trainer fed the caller's batches (`Trainer::step_batch`, `evaluate_batch`,
//! `teacher_logits`): the same step as a data-set step, bit for bit; resume from a checkpoint
//! to the same weights; distillation from a teacher; and the checks that refuse a batch the
//! model cannot take. Tiny ResNet on generated Fashion-MNIST, BERT-tiny on generated fortunes.

use std::path::{Path, PathBuf};

use recycle::data::test_support::use_fixture_data;
use recycle::data::{Loader, LoaderConfig};
use recycle::engine::checkpoint;
use recycle::recipe::Recipe;
use recycle::trainer::{Batch, RunOptions, TaskData, Trainer, IGNORE_LABEL};

fn temp_dir(tag: &str) -> PathBuf {
    use_fixture_data(Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap();
    let d = std::env::temp_dir().join(format!("recycle-caller-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn image_recipe(out: &Path, name: &str, extra: &str) -> Recipe {
    Recipe::from_toml(&format!(
        "name = \"{name}\"\nout_dir = \"{}\"\nseed = 5\n{extra}\n\
         [model]\nkind = \"resnet\"\nwidth = 0.0625\n\
         [data]\ndataset = \"fashion-mnist\"\ntrain_limit = 192\neval_limit = 64\n\
         [train]\nbatch_size = 16\nsamples = 96\nevals = 1\ncheckpoint_every = 2\n\
         [optimizer]\nkind = \"sgdw\"\nlr = 0.1\nweight_decay = 5e-4\nwarmup = 0.2\n",
        out.display()
    ))
    .unwrap()
}

fn fresh() -> RunOptions {
    RunOptions {
        overwrite: true,
        ..RunOptions::default()
    }
}

/// A generated image batch for step `step`: `n` 28x28 images with labels `(3 step + i) % 10`.
fn made_batch(step: u64, n: usize) -> Batch {
    let labels: Vec<i32> = (0..n)
        .map(|i| ((3 * step as usize + i) % 10) as i32)
        .collect();
    let mut pixels = Vec::with_capacity(n * 784);
    for (i, &y) in labels.iter().enumerate() {
        for j in 0..784usize {
            let v = (j * 31 + i * 13 + step as usize * 7 + y as usize * 97) % 251;
            pixels.push(v as f32 / 250.0);
        }
    }
    Batch::images(pixels, [n, 1, 28, 28], labels).unwrap()
}

/// The model tensors of a checkpoint, as bytes.
fn weights(path: &Path) -> Vec<(String, Vec<u8>)> {
    checkpoint::load(path)
        .unwrap()
        .tensors
        .into_iter()
        .filter(|(n, _)| n.starts_with("model."))
        .map(|(n, t)| (n, t.to_bytes().unwrap()))
        .collect()
}

fn loss_bits(out: &recycle::trainer::StepOutput) -> (u32, u32, Option<u32>) {
    (
        out.loss.to_bits(),
        out.ce.to_bits(),
        out.kd.map(f32::to_bits),
    )
}

/// The data set's batches handed over by the caller give the data-set steps' losses and
/// weights bit for bit; interleaving the two kinds of step changes nothing either.
#[test]
fn caller_batches_take_the_data_set_steps_path() {
    let out = temp_dir("same-path");
    let recipe = image_recipe(&out, "pulled", "");
    let mut pulled = Trainer::new(&recipe, &fresh()).unwrap();
    let mut want = Vec::new();
    while !pulled.is_done() {
        want.push(loss_bits(&pulled.step().unwrap()));
    }
    pulled
        .save_checkpoint(out.join("pulled.safetensors"))
        .unwrap();

    let data = TaskData::load(&recipe).unwrap();
    let TaskData::Images { train, .. } = &data else {
        panic!("an image recipe")
    };
    let loader = Loader::new(train.clone(), LoaderConfig::train(16, recipe.seed), 0).unwrap();
    let batches: Vec<Batch> = loader
        .map(|b| {
            let b = b.unwrap();
            Batch::Image {
                x: b.x,
                labels: b.labels,
            }
        })
        .take(want.len())
        .collect();
    let mut fed = Trainer::new(&image_recipe(&out, "fed", ""), &fresh()).unwrap();
    let mut mixed = Trainer::new(&image_recipe(&out, "mixed", ""), &fresh()).unwrap();
    for (i, b) in batches.iter().enumerate() {
        let r = fed.step_batch(b).unwrap();
        assert_eq!(r.step, i as u64);
        assert_eq!(loss_bits(&r.output), want[i], "step {i}");
        assert_eq!(r.lr, fed.metrics().lr.unwrap());
        // Every other step pulled from the data set: the loader catches up with the caller.
        let m = if i % 2 == 0 {
            mixed.step_batch(b).unwrap().output
        } else {
            mixed.step().unwrap()
        };
        assert_eq!(loss_bits(&m), want[i], "mixed, step {i}");
    }
    fed.save_checkpoint(out.join("fed.safetensors")).unwrap();
    mixed
        .save_checkpoint(out.join("mixed.safetensors"))
        .unwrap();
    let reference = weights(&out.join("pulled.safetensors"));
    assert!(!reference.is_empty());
    assert_eq!(weights(&out.join("fed.safetensors")), reference);
    assert_eq!(weights(&out.join("mixed.safetensors")), reference);
    assert_eq!(fed.metrics().samples, pulled.metrics().samples);
    let _ = std::fs::remove_dir_all(&out);
}

/// Caller batches (of their own size) from a checkpoint: the resumed run, fed the batches
/// after it, ends with the uninterrupted run's weights bit for bit; a finished run refuses
/// another step and says so.
#[test]
fn a_resumed_caller_fed_run_ends_with_the_same_weights() {
    let out = temp_dir("resume");
    let mut whole = Trainer::new(&image_recipe(&out, "whole", ""), &fresh()).unwrap();
    let steps = whole.total_steps();
    assert_eq!(steps, 6);
    for s in 0..steps {
        whole.step_batch(&made_batch(s, 12)).unwrap();
    }
    let err = whole.step_batch(&made_batch(steps, 12)).unwrap_err();
    assert!(
        err.to_string().contains("has done all its 6 steps"),
        "{err}"
    );
    assert_eq!(whole.metrics().samples, 72);
    whole
        .save_checkpoint(out.join("whole.safetensors"))
        .unwrap();

    let recipe = image_recipe(&out, "cut", "");
    let mut cut = Trainer::new(&recipe, &fresh()).unwrap();
    for s in 0..3 {
        cut.step_batch(&made_batch(s, 12)).unwrap();
    }
    drop(cut); // killed after step 3: the run's checkpoint holds step 2
    let resume = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    let mut resumed = Trainer::new(&recipe, &resume).unwrap();
    assert_eq!(resumed.current_step(), 2);
    for s in 2..steps {
        resumed.step_batch(&made_batch(s, 12)).unwrap();
    }
    resumed
        .save_checkpoint(out.join("resumed.safetensors"))
        .unwrap();
    assert_eq!(
        weights(&out.join("resumed.safetensors")),
        weights(&out.join("whole.safetensors"))
    );
    let summary = resumed.finish().unwrap();
    assert!((0.0..=1.0).contains(&summary.final_eval));
    let _ = std::fs::remove_dir_all(&out);
}

/// A student distilled from a teacher on caller batches: every step runs the teacher, the
/// targets `teacher_logits` returns are the teacher's own logits (the same as evaluating the
/// teacher's weights as a student would give), and `evaluate_batch` counts what it says.
#[test]
fn a_distilled_student_on_caller_batches() {
    let out = temp_dir("distill");
    let mut teacher = Trainer::new(&image_recipe(&out, "teacher", ""), &fresh()).unwrap();
    for s in 0..teacher.total_steps() {
        teacher.step_batch(&made_batch(s, 16)).unwrap();
    }
    assert!(teacher.teacher_logits(&made_batch(0, 4)).is_err());
    let teacher_eval = teacher.evaluate_batch(&made_batch(50, 20)).unwrap();
    teacher.finish().unwrap();

    let distill = format!(
        "[distill]\nteachers = [\"{}\"]\ntemperature = 4.0\nweight = 0.5\n",
        out.join("teacher").display()
    );
    let mut student = Trainer::new(&image_recipe(&out, "student", &distill), &fresh()).unwrap();
    let probe = made_batch(50, 20);
    let targets = student.teacher_logits(&probe).unwrap();
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0].shape(), [20, 10]);
    let t = targets[0].to_vec_f32().unwrap();
    let labels = probe.labels().to_vec::<i32>().unwrap();
    let agree = t
        .chunks_exact(10)
        .zip(&labels)
        .filter(|(row, &y)| {
            let best = (0..10).fold(0, |b, c| if row[c] > row[b] { c } else { b });
            best as i32 == y
        })
        .count();
    // The teacher's weights were bf16-rounded and its BatchNorm folded: a few rows may move.
    assert!(
        agree.abs_diff(teacher_eval.correct) <= 3,
        "{agree} vs {}",
        teacher_eval.correct
    );
    for s in 0..student.total_steps() {
        let r = student.step_batch(&made_batch(s, 16)).unwrap();
        assert_eq!(r.output.teacher_forwards, 1);
        let kd = r.output.kd.unwrap();
        assert!(kd.is_finite() && kd >= 0.0);
        let total = r.output.ce + 0.5 * kd;
        assert!((r.output.loss - total).abs() <= 1e-6 * total, "{r:?}");
    }
    assert_eq!(student.metrics().teacher_forwards, 6);
    let e = student.evaluate_batch(&probe).unwrap();
    assert_eq!(e.rows, 20);
    assert!(e.loss.is_finite() && e.loss > 0.0);
    assert_eq!(e.accuracy(), e.correct as f32 / 20.0);
    let _ = std::fs::remove_dir_all(&out);
}

/// Batches the student cannot take are refused before anything trains, with the tensor, the
/// value and the model named.
#[test]
fn bad_caller_batches_are_refused_with_a_reason() {
    let out = temp_dir("refused");
    let mut t = Trainer::new(&image_recipe(&out, "refused", ""), &fresh()).unwrap();
    let cases: Vec<(Batch, &str)> = vec![
        (
            Batch::images(vec![0.5; 2 * 3 * 4 * 4], [2, 3, 4, 4], vec![0, 1]).unwrap(),
            "takes [n, 1, height, width]",
        ),
        (
            Batch::images(vec![0.5; 2 * 16], [2, 1, 4, 4], vec![0, 10]).unwrap(),
            "labels[1] is 10, outside [0, 10)",
        ),
        (
            Batch::mlm(vec![1; 4], vec![1; 4], vec![2; 4], 1, 4).unwrap(),
            "a text batch for a ResNet student",
        ),
    ];
    for (b, want) in cases {
        let err = t.step_batch(&b).unwrap_err().to_string();
        assert!(
            err.contains(want) && err.contains("nothing was trained"),
            "{err}"
        );
        assert!(t.evaluate_batch(&b).is_err());
    }
    assert_eq!(t.current_step(), 0);
    for (err, want) in [
        (
            Batch::images(vec![0.0; 3], [1, 1, 2, 2], vec![0]).unwrap_err(),
            "images hold 3 values; the shape [1, 1, 2, 2] needs 4",
        ),
        (
            Batch::images(vec![], [0, 1, 2, 2], vec![]).unwrap_err(),
            "has a zero",
        ),
        (
            Batch::images(vec![0.0; 4], [1, 1, 2, 2], vec![0, 1]).unwrap_err(),
            "2 labels for 1 images",
        ),
        (
            Batch::images(vec![], [usize::MAX, 2, 2, 2], vec![]).unwrap_err(),
            "overflows",
        ),
        (
            Batch::mlm(vec![1; 4], vec![1; 3], vec![2; 4], 2, 2).unwrap_err(),
            "attention_mask holds 3 values; [2, 2] needs 4",
        ),
    ] {
        assert!(err.to_string().contains(want), "{err}");
    }
    // A NaN pixel is the step's business: the recipe stops the run (by default).
    let mut x = vec![0.5f32; 16];
    x[3] = f32::NAN;
    let err = t
        .step_batch(&Batch::images(x, [1, 1, 4, 4], vec![0]).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("the input batch"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}

/// BERT-tiny fed the caller's token batches: steps train (the loss falls on a repeated
/// batch), evaluation reports masked-token accuracy over the labelled positions, and token
/// ids, labels and masks outside their ranges are refused.
#[test]
fn bert_on_caller_token_batches() {
    let out = temp_dir("mlm");
    let recipe = Recipe::from_toml(&format!(
        "name = \"mlm\"\nout_dir = \"{}\"\n\
         [model]\nkind = \"bert\"\nsize = \"tiny\"\n\
         [data]\ndataset = \"fortunes\"\nseq_len = 16\nvocab_size = 200\ntrain_limit = 64\n\
         eval_limit = 16\n\
         [train]\nbatch_size = 4\nsamples = 40\nevals = 1\n\
         [optimizer]\nkind = \"adamw\"\nlr = 3e-3\nweight_decay = 0.0\n",
        out.display()
    ))
    .unwrap();
    let mut t = Trainer::new(&recipe, &fresh()).unwrap();
    let (b, s) = (4, 16);
    let ids: Vec<i32> = (0..b * s).map(|i| 5 + (i as i32 * 7) % 100).collect();
    let labels: Vec<i32> = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| if i % 5 == 2 { id } else { IGNORE_LABEL })
        .collect();
    let mut mask = vec![1; b * s];
    mask[b * s - 1] = 0;
    let batch = Batch::mlm(ids.clone(), mask.clone(), labels.clone(), b, s).unwrap();
    let before = t.evaluate_batch(&batch).unwrap();
    assert_eq!(
        before.rows,
        labels.iter().filter(|&&l| l != IGNORE_LABEL).count()
    );
    let mut losses = Vec::new();
    for _ in 0..t.total_steps() {
        losses.push(t.step_batch(&batch).unwrap().output.loss);
    }
    assert!(losses[losses.len() - 1] < losses[0], "{losses:?}");
    let after = t.evaluate_batch(&batch).unwrap();
    assert!(after.loss < before.loss, "{before:?} -> {after:?}");

    let mut t2 = Trainer::new(&image_recipe(&out, "unused", ""), &fresh()).unwrap();
    assert!(t2.step_batch(&batch).is_err());
    let vocab = 200;
    let mut bad_ids = ids.clone();
    bad_ids[5] = vocab + 1000;
    let mut bad_mask = mask.clone();
    bad_mask[0] = 2;
    for (b, want) in [
        (
            Batch::mlm(bad_ids, mask.clone(), labels.clone(), b, s).unwrap(),
            "input_ids[5]",
        ),
        (
            Batch::mlm(ids.clone(), bad_mask, labels.clone(), b, s).unwrap(),
            "attention_mask[0] is 2",
        ),
        (
            Batch::mlm(ids.clone(), mask.clone(), vec![IGNORE_LABEL; b * s], b, s).unwrap(),
            "at least one labelled position",
        ),
    ] {
        let err = t.evaluate_batch(&b).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
