//! SGDW, AdamW and the learning-rate schedules against PyTorch.
//!
//! `fixtures/optim.json` is written by `scripts/reference/optim_fixtures.py` (torch.optim.SGD
//! plus Composer's decoupled decay, torch.optim.AdamW, and PyTorch's SequentialLR of LinearLR
//! and CosineAnnealingLR / LinearLR). Parameters must agree within 1e-6 relative (1e-5
//! absolute), learning rates within 1e-6 relative (1e-9 absolute near zero).

use recycle_engine::optim::{AdamW, LrSchedule, Optimizer, Sgdw};
use recycle_engine::{Device, FlatParams, Tensor};
use serde_json::Value;

const FIXTURE: &str = include_str!("fixtures/optim.json");

fn fixture() -> Value {
    serde_json::from_str(FIXTURE).expect("optim.json parses")
}

fn f64_of(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn u64_of(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not an integer: {v}"))
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("a list of numbers")
        .iter()
        .map(|x| f64_of(x) as f32)
        .collect()
}

fn entries(v: &Value) -> Vec<(String, Value)> {
    let mut out: Vec<_> = v
        .as_object()
        .expect("an object")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn assert_param_close(case: &str, step: usize, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = (1e-6 * w.abs()).max(1e-5);
        assert!(
            (g - w).abs() <= tol,
            "{case}, step {step}, element {i}: got {g}, PyTorch {w} (diff {})",
            (g - w).abs()
        );
    }
}

fn assert_lr_close(case: &str, step: u64, got: f32, want: f64) {
    let tol = (1e-6 * want.abs()).max(1e-9);
    assert!(
        (got as f64 - want).abs() <= tol,
        "{case}, step {step}: lr {got}, PyTorch {want}"
    );
}

/// The schedule a fixture case describes, built with the engine's constructors.
fn schedule_of(s: &Value) -> LrSchedule {
    let base = f64_of(&s["base_lr"]) as f32;
    let total = u64_of(&s["total_steps"]);
    let final_lr = match s.get("final_lr") {
        Some(v) => f64_of(v) as f32,
        None => base * f64_of(&s["final_lr_factor"]) as f32,
    };
    let fraction = s.get("warmup_fraction").and_then(Value::as_f64);
    let warmup = u64_of(&s["warmup_steps"]);
    let sched = match (s["kind"].as_str().unwrap(), fraction) {
        ("warmup_cosine", None) => LrSchedule::warmup_cosine(base, warmup, total, final_lr),
        ("warmup_cosine", Some(f)) => LrSchedule::warmup_cosine_fraction(base, f, total, final_lr),
        ("warmup_linear_decay", None) => {
            LrSchedule::warmup_linear_decay(base, warmup, total, final_lr)
        }
        ("warmup_linear_decay", Some(f)) => {
            LrSchedule::warmup_linear_decay_fraction(base, f, total, final_lr)
        }
        (k, _) => panic!("unknown schedule kind {k}"),
    }
    .unwrap();
    // A fractional warmup must round to the same number of steps as Composer's int().
    match sched {
        LrSchedule::WarmupCosine { warmup_steps, .. }
        | LrSchedule::WarmupLinearDecay { warmup_steps, .. } => {
            assert_eq!(warmup_steps, warmup, "warmup steps of {s}")
        }
        LrSchedule::Constant { .. } => unreachable!(),
    }
    sched
}

fn params_with(init: &[f32]) -> FlatParams {
    let n = init.len();
    // Two parameters, so the flat buffer really spans several views.
    let p = FlatParams::new(
        &[("a".to_string(), vec![5]), ("b".to_string(), vec![n - 5])],
        Device::Cpu,
    )
    .unwrap();
    p.values().write_f32().unwrap().copy_from_slice(init);
    p
}

/// Runs `opt` over the fixture's gradients at the fixture's learning rates and compares the
/// parameters after every step; also checks the engine's schedule gives the same rates.
fn check_run(case: &str, c: &Value, opt: &mut dyn Optimizer, init: &[f32], grads: &[Vec<f32>]) {
    let sched = schedule_of(&c["schedule"]);
    let lrs = f32s(&c["lrs"]);
    let p = params_with(init);
    for (step, g) in grads.iter().enumerate() {
        let want_lr = f64_of(&c["lrs"][step]);
        assert_lr_close(case, step as u64, sched.lr_at(step as u64), want_lr);
        p.grads().write_f32().unwrap().copy_from_slice(g);
        opt.step(&p, lrs[step]).unwrap();
        let want = f32s(&c["params"][step]);
        assert_param_close(case, step, &p.values().to_vec_f32().unwrap(), &want);
    }
    assert_eq!(opt.steps_taken(), grads.len() as u64);
}

fn inputs(fx: &Value) -> (Vec<f32>, Vec<Vec<f32>>) {
    let init = f32s(&fx["init"]);
    let grads = fx["grads"].as_array().unwrap().iter().map(f32s).collect();
    (init, grads)
}

#[test]
fn sgdw_matches_torch_sgd_with_composer_decay() {
    let fx = fixture();
    let (init, grads) = inputs(&fx);
    let cases = entries(&fx["sgdw"]);
    assert!(cases.len() >= 3);
    for (name, c) in cases {
        let mut opt = Sgdw::new(
            init.len(),
            f64_of(&c["momentum"]),
            f64_of(&c["dampening"]),
            f64_of(&c["weight_decay"]),
            c["nesterov"].as_bool().unwrap(),
            f64_of(&c["initial_lr"]),
        )
        .unwrap();
        check_run(&format!("sgdw/{name}"), &c, &mut opt, &init, &grads);
    }
}

#[test]
fn adamw_matches_torch_adamw() {
    let fx = fixture();
    let (init, grads) = inputs(&fx);
    let cases = entries(&fx["adamw"]);
    assert!(cases.len() >= 2);
    for (name, c) in cases {
        let mut opt = AdamW::new(
            init.len(),
            f64_of(&c["beta1"]),
            f64_of(&c["beta2"]),
            f64_of(&c["eps"]),
            f64_of(&c["weight_decay"]),
        )
        .unwrap();
        check_run(&format!("adamw/{name}"), &c, &mut opt, &init, &grads);
    }
    // The defaults case is what AdamW::torch_default builds.
    let d = &fx["adamw"]["torch_defaults"];
    let t = AdamW::torch_default(1).unwrap();
    assert_eq!(
        (t.beta1, t.beta2, t.eps, t.weight_decay),
        (
            f64_of(&d["beta1"]),
            f64_of(&d["beta2"]),
            f64_of(&d["eps"]),
            f64_of(&d["weight_decay"])
        )
    );
}

#[test]
fn schedules_match_torch_sequential_lr() {
    let fx = fixture();
    let cases = entries(&fx["schedules"]);
    assert!(cases.len() >= 4);
    for (name, c) in cases {
        let sched = schedule_of(&c);
        let lrs = c["lrs"].as_array().unwrap();
        let total = u64_of(&c["total_steps"]);
        let w = u64_of(&c["warmup_steps"]);
        assert_eq!(lrs.len() as u64, total + 1, "{name}: every step 0..=total");
        for (step, want) in lrs.iter().enumerate() {
            assert_lr_close(&name, step as u64, sched.lr_at(step as u64), f64_of(want));
        }
        // The boundaries, named: warmup start and end, decay start and end.
        for step in [0, w - 1, w, w + 1, total - 1, total] {
            assert_lr_close(&name, step, sched.lr_at(step), f64_of(&lrs[step as usize]));
        }
        assert_eq!(
            sched.lr_at(total + 5),
            sched.lr_at(total),
            "{name}: flat after total"
        );
    }
}

#[test]
fn resume_through_state_tensors_matches_an_uninterrupted_torch_run() {
    // Stop after 3 steps, rebuild the optimizer from its state, finish: same as PyTorch.
    let fx = fixture();
    let (init, grads) = inputs(&fx);
    let c = &fx["adamw"]["bert"];
    let make = || {
        AdamW::new(
            init.len(),
            f64_of(&c["beta1"]),
            f64_of(&c["beta2"]),
            f64_of(&c["eps"]),
            f64_of(&c["weight_decay"]),
        )
        .unwrap()
    };
    let lrs = f32s(&c["lrs"]);
    let p = params_with(&init);
    let mut opt = make();
    for (step, g) in grads.iter().enumerate() {
        if step == 3 {
            let state: Vec<(String, Tensor)> = opt.state();
            opt = make();
            opt.load_state(&state).unwrap();
        }
        p.grads().write_f32().unwrap().copy_from_slice(g);
        opt.step(&p, lrs[step]).unwrap();
    }
    let want = f32s(&c["params"][grads.len() - 1]);
    assert_param_close(
        "adamw/bert resumed",
        grads.len() - 1,
        &p.values().to_vec_f32().unwrap(),
        &want,
    );
}
