//! The fused distillation loss against PyTorch (tests/fixtures/kd_loss.json, written by
//! scripts/reference/kd_fixtures.py) and against finite differences.

use recycle::distill::{kd_loss, kd_loss_cpu, KdLoss};
use recycle::engine::gradcheck::GradCheck;
use recycle::engine::{DType, Device, Tape, Tensor};
use serde_json::Value;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn close(got: f32, want: f32, what: &str) {
    let err = (got - want).abs() / want.abs().max(1.0);
    assert!(err < 2e-5, "{what}: {got} vs PyTorch {want}");
}

#[test]
fn matches_pytorch_fixtures() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kd_loss.json"),
    )
    .unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let classes = c["classes"].as_u64().unwrap() as usize;
        let t = c["temperature"].as_f64().unwrap() as f32;
        let w = c["weight"].as_f64().unwrap() as f32;
        let cfg = if c["kind"] == "mse" {
            KdLoss::mse(w)
        } else {
            KdLoss::kl(t, w)
        };
        let student = floats(&c["student"]);
        let teachers: Vec<Vec<f32>> = c["teachers"]
            .as_array()
            .unwrap()
            .iter()
            .map(floats)
            .collect();
        let t_refs: Vec<&[f32]> = teachers.iter().map(|v| v.as_slice()).collect();
        let labels: Vec<i32> = c["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap() as i32)
            .collect();
        let mask: Option<Vec<bool>> = c["mask"]
            .as_array()
            .map(|m| m.iter().map(|v| v.as_i64().unwrap() != 0).collect());
        let out = kd_loss_cpu(&cfg, &student, &t_refs, &labels, mask.as_deref(), classes).unwrap();
        close(
            out.ce,
            c["ce"].as_f64().unwrap() as f32,
            &format!("{name}: ce"),
        );
        close(
            out.kd,
            c["kd"].as_f64().unwrap() as f32,
            &format!("{name}: kd"),
        );
        close(
            out.total,
            c["total"].as_f64().unwrap() as f32,
            &format!("{name}: total"),
        );
        let want = floats(&c["grad"]);
        let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in out.grad.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() / scale < 1e-4,
                "{name}: grad[{i}] {g} vs PyTorch {w}"
            );
        }
    }
}

fn logits(n: usize, c: usize, seed: u64) -> Tensor {
    Tensor::randn(&[n, c], 0.0, 2.0, seed, DType::F32, Device::Cpu).unwrap()
}

#[test]
fn gradient_matches_finite_differences() {
    let (n, c) = (5, 7);
    let labels = Tensor::from_vec(vec![0, 3, -100, 6, 2], &[n], Device::Cpu).unwrap();
    let mask = Tensor::from_vec(vec![1, 1, 1, 0, 1], &[n], Device::Cpu).unwrap();
    let teachers = vec![logits(n, c, 2), logits(n, c, 3).cast(DType::BF16).unwrap()];
    for cfg in [KdLoss::kl(3.0, 1.5), KdLoss::kl(1.0, 0.5), KdLoss::mse(0.8)] {
        let worst = GradCheck::default()
            .run(&[logits(n, c, 1)], &[0], |tape, v| {
                Ok(kd_loss(tape, &cfg, &v[0], &teachers, &labels, Some(&mask))?.total)
            })
            .unwrap();
        assert!(worst < 1e-2, "{cfg:?}: {worst}");
    }
}

#[test]
fn ce_only_without_teachers_and_zero_gradient_on_masked_rows() {
    let (n, c) = (4, 5);
    let labels = Tensor::from_vec(vec![1, 2, 3, 4], &[n], Device::Cpu).unwrap();
    let mask = Tensor::from_vec(vec![1, 0, 1, 1], &[n], Device::Cpu).unwrap();
    let tape = Tape::recording();
    let s = tape.watch(logits(n, c, 7));
    let out = kd_loss(&tape, &KdLoss::kl(2.0, 1.0), &s, &[], &labels, Some(&mask)).unwrap();
    assert_eq!(out.kd, 0.0);
    assert_eq!(out.total.tensor().to_scalar_f32().unwrap(), out.ce);
    // The host copy of the total is the tensor's value.
    assert_eq!(out.total_value, out.ce);
    let g = tape.backward(&out.total).unwrap();
    let g = g.get(&s).unwrap().to_vec_f32().unwrap();
    assert!(
        g[c..2 * c].iter().all(|&v| v == 0.0),
        "masked row has no gradient"
    );
    // Each counted row's CE gradient sums to zero (softmax minus one-hot).
    assert!(g[..c].iter().sum::<f32>().abs() < 1e-6);
}

#[test]
fn bad_inputs_are_errors() {
    let s = logits(3, 4, 1);
    let tape = Tape::inference();
    let sv = tape.constant(s);
    let labels = Tensor::from_vec(vec![0, 9, 1], &[3], Device::Cpu).unwrap();
    let err = kd_loss(&tape, &KdLoss::kl(1.0, 1.0), &sv, &[], &labels, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("label 9 in row 1"), "{err}");
    let ok_labels = Tensor::from_vec(vec![0, 1, 2], &[3], Device::Cpu).unwrap();
    let err = kd_loss(
        &tape,
        &KdLoss::kl(1.0, 1.0),
        &sv,
        &[logits(3, 5, 2)],
        &ok_labels,
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("[3, 5]") && err.contains("[3, 4]"), "{err}");
    assert!(kd_loss(&tape, &KdLoss::kl(0.0, 1.0), &sv, &[], &ok_labels, None).is_err());
    assert!(kd_loss(&tape, &KdLoss::mse(-1.0), &sv, &[], &ok_labels, None).is_err());
}
