//! Parity with PyTorch: fixtures written by scripts/reference/model_fixtures.py (torchvision
//! names, Hugging Face's BertForMaskedLM) hold weights, inputs, logits, loss and every parameter
//! gradient. Logits must match to 1e-4 and gradients to 1e-3 (relative to the largest value).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use recycle_engine::ops::loss::{cross_entropy, CrossEntropyOptions};
use recycle_engine::{checkpoint, DType, Tape, Tensor};
use recycle_models::bert::BertForwardOptions;
use recycle_models::{Bert, BertConfig, MlmBatch, ResNet, ResNetConfig};

fn fixture(name: &str) -> (PathBuf, HashMap<String, Tensor>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let ckpt = checkpoint::load(&path).expect("fixture loads");
    (path, ckpt.tensors.into_iter().collect())
}

fn with_prefix(all: &HashMap<String, Tensor>, prefix: &str) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = all
        .iter()
        .filter_map(|(k, t)| k.strip_prefix(prefix).map(|n| (n.to_string(), t.clone())))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// max |a - b| / max |b|
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    rel_err_floor(a, b, 1e-12)
}

/// max |a - b| / max(max |b|, floor): for gradients that are exactly zero in theory (BERT's
/// attention key bias: softmax is invariant to a shift shared by all keys), where the
/// reference is rounding noise and only an absolute bound means anything.
fn rel_err_floor(a: &Tensor, b: &Tensor, floor: f32) -> f32 {
    assert_eq!(
        a.elem_count(),
        b.elem_count(),
        "{:?} vs {:?}",
        a.shape(),
        b.shape()
    );
    let (a, b) = (a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
    let scale = b.iter().fold(floor, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn check_resnet(file: &str, config: ResNetConfig) {
    let (path, fx) = fixture(file);
    let mut state = with_prefix(&fx, "param.");
    state.extend(with_prefix(&fx, "buffer."));
    let model = ResNet::from_state_dict(config, state, &path).unwrap();
    let x = &fx["input.x"];
    let labels = &fx["input.labels"];
    // Evaluation first, as the script did: training mode updates the running statistics.
    for mode in ["eval", "train"] {
        let params = model.params().unwrap();
        params.zero_grad().unwrap();
        let tape = Tape::recording();
        let logits = model.forward(&tape, x, mode == "train").unwrap();
        let loss = cross_entropy(&tape, &logits, labels, CrossEntropyOptions::default()).unwrap();
        let e = rel_err(logits.tensor(), &fx[&format!("{mode}.logits")]);
        assert!(e <= 1e-4, "{file} {mode}: logits relative error {e:.2e}");
        let e = rel_err(loss.tensor(), &fx[&format!("{mode}.loss")]);
        assert!(e <= 1e-4, "{file} {mode}: loss relative error {e:.2e}");
        tape.backward(&loss).unwrap();
        let mut checked = 0;
        for (name, want) in with_prefix(&fx, &format!("{mode}.grad.")) {
            let e = rel_err(&params.grad(&name).unwrap(), &want);
            assert!(
                e <= 1e-3,
                "{file} {mode}: gradient of {name}: relative error {e:.2e}"
            );
            checked += 1;
        }
        assert_eq!(
            checked,
            params.entries().len(),
            "every parameter has a reference gradient"
        );
    }
    let state: HashMap<String, Tensor> = model.state_dict().unwrap().into_iter().collect();
    for (name, want) in with_prefix(&fx, "train.buffer_after.") {
        let e = rel_err(&state[&name], &want);
        assert!(
            e <= 1e-4,
            "{file}: {name} after a training step: relative error {e:.2e}"
        );
    }
}

#[test]
fn resnet18_small_stem_matches_pytorch() {
    check_resnet(
        "resnet18_fmnist.safetensors",
        ResNetConfig {
            depth: 18,
            num_classes: 10,
            in_channels: 1,
            small_stem: true,
            width: 1.0 / 8.0,
        },
    );
}

#[test]
fn resnet50_imagenet_stem_matches_pytorch() {
    check_resnet(
        "resnet50_64.safetensors",
        ResNetConfig {
            depth: 50,
            num_classes: 10,
            in_channels: 3,
            small_stem: false,
            width: 1.0 / 16.0,
        },
    );
}

fn bert_fixture_config() -> BertConfig {
    BertConfig {
        vocab_size: 256,
        hidden_size: 128,
        num_layers: 2,
        num_heads: 2,
        intermediate_size: 512,
        max_position_embeddings: 64,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_dropout: 0.0,
        attention_dropout: 0.0,
    }
}

fn bert_fixture_batch(fx: &HashMap<String, Tensor>) -> MlmBatch {
    MlmBatch::from_position_labels(
        fx["input.input_ids"].clone(),
        Some(fx["input.token_type_ids"].clone()),
        fx["input.attention_mask"].clone(),
        &fx["input.labels"],
    )
    .unwrap()
}

#[test]
fn bert_tiny_mlm_matches_hugging_face() {
    let (path, fx) = fixture("bert_tiny.safetensors");
    let model =
        Bert::from_state_dict(bert_fixture_config(), with_prefix(&fx, "param."), &path).unwrap();
    let batch = bert_fixture_batch(&fx);
    let tape = Tape::recording();
    let opts = BertForwardOptions {
        training: true,
        seed: 1,
    };
    let (logits, loss) = model.mlm_loss(&tape, &batch, opts).unwrap();
    assert_eq!(
        logits.shape()[0],
        batch.labels.elem_count(),
        "logits only at masked rows"
    );
    let e = rel_err(logits.tensor(), &fx["train.logits"]);
    assert!(e <= 1e-4, "logits relative error {e:.2e}");
    let e = rel_err(loss.tensor(), &fx["train.loss"]);
    assert!(e <= 1e-4, "loss relative error {e:.2e}");
    tape.backward(&loss).unwrap();
    let params = model.params().unwrap();
    let mut checked = 0;
    for (name, want) in with_prefix(&fx, "train.grad.") {
        if name.starts_with("cls.predictions.decoder.") {
            continue; // tied: the same tensor as the word embeddings / cls.predictions.bias
        }
        let e = rel_err_floor(&params.grad(&name).unwrap(), &want, 1e-4);
        assert!(e <= 1e-3, "gradient of {name}: relative error {e:.2e}");
        checked += 1;
    }
    assert_eq!(checked, params.entries().len());
}

#[test]
fn folded_resnet_teacher_matches_the_student_in_evaluation_mode() {
    let (path, fx) = fixture("resnet50_64.safetensors");
    let mut state = with_prefix(&fx, "param.");
    state.extend(with_prefix(&fx, "buffer."));
    let config = ResNetConfig {
        depth: 50,
        num_classes: 10,
        in_channels: 3,
        small_stem: false,
        width: 1.0 / 16.0,
    };
    let student = ResNet::from_state_dict(config, state, &path).unwrap();
    let x = &fx["input.x"];
    let want = student.forward(&Tape::inference(), x, false).unwrap();

    let f32_teacher = student.teacher(DType::F32).unwrap();
    assert!(f32_teacher.params().is_none());
    let tape = Tape::inference();
    let got = f32_teacher.forward(&tape, x, false).unwrap();
    assert!(tape.is_empty(), "a teacher records nothing");
    let e = rel_err(got.tensor(), want.tensor());
    assert!(e <= 1e-4, "folded f32 teacher: relative error {e:.2e}");

    let bf16_teacher = student.teacher(DType::BF16).unwrap();
    let names = bf16_teacher.state_dict().unwrap();
    assert!(names.iter().all(|(_, t)| t.dtype() == DType::BF16));
    assert!(names
        .iter()
        .all(|(n, _)| !n.contains("bn") && !n.contains("downsample.1")));
    let got = bf16_teacher.forward(&Tape::inference(), x, false).unwrap();
    let e = rel_err(got.tensor(), want.tensor());
    assert!(e <= 3e-2, "folded bf16 teacher: relative error {e:.2e}");
    assert!(bf16_teacher.forward(&Tape::inference(), x, true).is_err());
}

#[test]
fn bert_teacher_in_bf16_matches_the_student() {
    let (path, fx) = fixture("bert_tiny.safetensors");
    let student =
        Bert::from_state_dict(bert_fixture_config(), with_prefix(&fx, "param."), &path).unwrap();
    let teacher = student.teacher(DType::BF16).unwrap();
    let batch = bert_fixture_batch(&fx);
    let want = student
        .mlm_logits(&Tape::inference(), &batch, BertForwardOptions::eval())
        .unwrap();
    let got = teacher
        .mlm_logits(&Tape::inference(), &batch, BertForwardOptions::eval())
        .unwrap();
    let e = rel_err(got.tensor(), want.tensor());
    assert!(e <= 3e-2, "bf16 teacher: relative error {e:.2e}");
    assert!(e > 0.0, "bf16 weights really are rounded");
}
