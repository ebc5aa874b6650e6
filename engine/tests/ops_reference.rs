//! Parity with PyTorch for the norm, softmax, attention and loss ops.
//!
//! The fixtures in `tests/fixtures/ops_*.json` are written by
//! `scripts/reference/ops_fixtures.py` (float64 PyTorch references from float32 inputs); CI
//! only reads them. Error measure: the largest absolute difference divided by the largest
//! reference magnitude, at most 1e-4 for forward values and 1e-3 for gradients.

use std::path::PathBuf;

use recycle_engine::ops::attention::{scaled_dot_product_attention, AttentionOptions};
use recycle_engine::ops::loss::{cross_entropy, CrossEntropyOptions};
use recycle_engine::ops::norm::{batch_norm2d, layer_norm, BatchNormOptions};
use recycle_engine::ops::softmax::{log_softmax, softmax};
use recycle_engine::{Device, Gradients, Tape, Tensor, Var};
use serde_json::Value;

const FORWARD_TOL: f64 = 1e-4;
const GRAD_TOL: f64 = 1e-3;

fn load(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn shape_of(v: &Value) -> Vec<usize> {
    v["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|d| d.as_u64().expect("dimension") as usize)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn f32_tensor(v: &Value) -> Tensor {
    Tensor::f32(floats(v), &shape_of(v)).unwrap()
}

fn i32_tensor(v: &Value) -> Tensor {
    let data: Vec<i32> = v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|x| x.as_i64().expect("integer") as i32)
        .collect();
    Tensor::from_vec(data, &shape_of(v), Device::Cpu).unwrap()
}

/// Asserts `got` matches the reference tensor `want` (shape and values) within `tol`.
fn assert_close(what: &str, got: &Tensor, want: &Value, tol: f64) {
    assert_eq!(got.shape(), shape_of(want).as_slice(), "{what}: shape");
    let got = got.to_vec_f32().unwrap();
    let want = floats(want);
    let scale = want.iter().fold(0f64, |m, &w| m.max(w.abs() as f64));
    let diff = got
        .iter()
        .zip(&want)
        .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()));
    let rel = diff / scale.max(1e-12);
    assert!(
        rel <= tol,
        "{what}: relative error {rel:.3e} > {tol:.0e}\n got  {got:?}\n want {want:?}"
    );
}

fn grad<'a>(grads: &'a Gradients, var: &Var, what: &str) -> &'a Tensor {
    grads
        .get(var)
        .unwrap_or_else(|| panic!("{what}: no gradient"))
}

#[test]
fn cross_entropy_matches_pytorch() {
    let fixture = load("ops_cross_entropy.json");
    for (i, case) in fixture["cases"].as_array().unwrap().iter().enumerate() {
        let what = format!("cross_entropy case {i}");
        let opts = CrossEntropyOptions {
            ignore_index: Some(case["ignore_index"].as_i64().unwrap() as i32),
            label_smoothing: case["label_smoothing"].as_f64().unwrap() as f32,
        };
        let tape = Tape::recording();
        let logits = tape.watch(f32_tensor(&case["logits"]));
        let loss = cross_entropy(&tape, &logits, &i32_tensor(&case["labels"]), opts).unwrap();
        let got = loss.tensor().to_scalar_f32().unwrap() as f64;
        let want = case["loss"].as_f64().unwrap();
        assert!(
            (got - want).abs() <= FORWARD_TOL * want.abs(),
            "{what}: loss {got} vs {want}"
        );
        let grads = tape.backward(&loss).unwrap();
        assert_close(
            &format!("{what} grad"),
            grad(&grads, &logits, &what),
            &case["grad_logits"],
            GRAD_TOL,
        );
    }
}

#[test]
fn batch_norm2d_matches_pytorch_in_training_and_eval() {
    let fixture = load("ops_batch_norm2d.json");
    for case in fixture["cases"].as_array().unwrap() {
        let training = case["training"].as_bool().unwrap();
        let what = format!("batch_norm2d training={training}");
        let opts = BatchNormOptions {
            training,
            momentum: case["momentum"].as_f64().unwrap() as f32,
            eps: case["eps"].as_f64().unwrap() as f32,
        };
        let tape = Tape::recording();
        let x = tape.watch(f32_tensor(&case["x"]));
        let w = tape.watch(f32_tensor(&case["weight"]));
        let b = tape.watch(f32_tensor(&case["bias"]));
        let rm = f32_tensor(&case["running_mean"]);
        let rv = f32_tensor(&case["running_var"]);
        let y = batch_norm2d(&tape, &x, &w, &b, &rm, &rv, opts).unwrap();
        assert_close(
            &format!("{what} output"),
            y.tensor(),
            &case["output"],
            FORWARD_TOL,
        );
        assert_close(
            &format!("{what} running_mean"),
            &rm,
            &case["running_mean_after"],
            FORWARD_TOL,
        );
        assert_close(
            &format!("{what} running_var"),
            &rv,
            &case["running_var_after"],
            FORWARD_TOL,
        );
        let grads = tape
            .backward_with(&y, f32_tensor(&case["grad_output"]))
            .unwrap();
        for (var, key) in [(&x, "grad_x"), (&w, "grad_weight"), (&b, "grad_bias")] {
            let name = format!("{what} {key}");
            assert_close(&name, grad(&grads, var, &name), &case[key], GRAD_TOL);
        }
    }
}

#[test]
fn layer_norm_matches_pytorch() {
    let fixture = load("ops_layer_norm.json");
    for case in fixture["cases"].as_array().unwrap() {
        let tape = Tape::recording();
        let x = tape.watch(f32_tensor(&case["x"]));
        let w = tape.watch(f32_tensor(&case["weight"]));
        let b = tape.watch(f32_tensor(&case["bias"]));
        let eps = case["eps"].as_f64().unwrap() as f32;
        let y = layer_norm(&tape, &x, &w, &b, eps).unwrap();
        assert_close(
            "layer_norm output",
            y.tensor(),
            &case["output"],
            FORWARD_TOL,
        );
        let grads = tape
            .backward_with(&y, f32_tensor(&case["grad_output"]))
            .unwrap();
        for (var, key) in [(&x, "grad_x"), (&w, "grad_weight"), (&b, "grad_bias")] {
            let name = format!("layer_norm {key}");
            assert_close(&name, grad(&grads, var, &name), &case[key], GRAD_TOL);
        }
    }
}

#[test]
fn softmax_and_log_softmax_match_pytorch() {
    let fixture = load("ops_softmax.json");
    for case in fixture["cases"].as_array().unwrap() {
        let op = case["op"].as_str().unwrap();
        let tape = Tape::recording();
        let x = tape.watch(f32_tensor(&case["x"]));
        let y = match op {
            "softmax" => softmax(&tape, &x),
            "log_softmax" => log_softmax(&tape, &x),
            other => panic!("unknown op {other} in ops_softmax.json"),
        }
        .unwrap();
        assert_close(
            &format!("{op} output"),
            y.tensor(),
            &case["output"],
            FORWARD_TOL,
        );
        let grads = tape
            .backward_with(&y, f32_tensor(&case["grad_output"]))
            .unwrap();
        let name = format!("{op} grad_x");
        assert_close(&name, grad(&grads, &x, &name), &case["grad_x"], GRAD_TOL);
    }
}

#[test]
fn attention_with_padding_mask_matches_pytorch() {
    let fixture = load("ops_attention.json");
    for case in fixture["cases"].as_array().unwrap() {
        let tape = Tape::recording();
        let q = tape.watch(f32_tensor(&case["q"]));
        let k = tape.watch(f32_tensor(&case["k"]));
        let v = tape.watch(f32_tensor(&case["v"]));
        let mask = i32_tensor(&case["key_padding_mask"]);
        let opts = AttentionOptions {
            dropout: case["dropout"].as_f64().unwrap() as f32,
            seed: 0,
            training: false,
        };
        let y = scaled_dot_product_attention(&tape, &q, &k, &v, Some(&mask), opts).unwrap();
        assert_close("attention output", y.tensor(), &case["output"], FORWARD_TOL);
        let grads = tape
            .backward_with(&y, f32_tensor(&case["grad_output"]))
            .unwrap();
        for (var, key) in [(&q, "grad_q"), (&k, "grad_k"), (&v, "grad_v")] {
            let name = format!("attention {key}");
            assert_close(&name, grad(&grads, var, &name), &case[key], GRAD_TOL);
        }
    }
}
