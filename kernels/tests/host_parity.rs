//! The kernels' shared math, run on the CPU, against the engine's CPU twins.
//!
//! `tests/host/parity.cu` includes the kernel sources and calls their `__host__ __device__`
//! functions (the counter-based RNG and dropout rule, bf16 rounding, the SGDW and AdamW element
//! updates, the online log-sum-exp, the fused loss's per-element terms and an emulation of its
//! per-row structure). This test compiles it with the nvcc that built the crate, as an
//! ordinary host program, and compares its output with `recycle-engine`:
//! bit for bit where the kernels promise the CPU's bits, within a tolerance elsewhere.
//!
//! Not covered here (it needs a GPU): the kernels' parallel skeletons and the device's own
//! `expf`/`logf`. Without nvcc the crate embeds no kernels and these tests do nothing.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use half::bf16;
use recycle_engine::backend::dropout;
use recycle_engine::backend::loss::log_sum_exp_row_cpu;
use recycle_engine::kd_loss::{self as kd, KdKind, KdScalars};
use recycle_engine::optim::{adamw_update_cpu, sgdw_update_cpu, AdamWStep, SgdwStep};
use recycle_engine::rng::{self, Rng};

/// The compiled harness, built once per test run (cached by a hash of its sources).
fn harness() -> Option<&'static PathBuf> {
    static EXE: OnceLock<Option<PathBuf>> = OnceLock::new();
    EXE.get_or_init(|| {
        if !recycle_kernels::available() {
            eprintln!("built without nvcc: skipping the host parity tests");
            return None;
        }
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let src = root.join("src");
        let main = root.join("tests/host/parity.cu");
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for f in [
            main.clone(),
            src.join("common.cuh"),
            src.join("optimizers.cu"),
            src.join("kd_loss.cu"),
        ] {
            for b in std::fs::read(&f).unwrap() {
                hash = (hash ^ b as u64).wrapping_mul(0x100_0000_01b3);
            }
        }
        let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("parity-{hash:016x}"));
        if !exe.is_file() {
            let tmp = exe.with_extension("partial");
            let out = Command::new(recycle_kernels::NVCC_PATH)
                .args(["-std=c++17", "-O2", "-arch=sm_90"])
                // Host code must not fuse multiply-adds either (x86-64 without -mfma does not).
                .args(["-Xcompiler", "-ffp-contract=off"])
                .arg("-I")
                .arg(&src)
                .arg("-o")
                .arg(&tmp)
                .arg(&main)
                .output()
                .expect("run nvcc");
            assert!(
                out.status.success(),
                "nvcc failed to build the parity harness:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::rename(&tmp, &exe).unwrap();
        }
        Some(exe)
    })
    .as_ref()
}

/// Runs the harness in `mode` on `input`; its output lines.
fn run(mode: &str, input: &str) -> Option<Vec<String>> {
    let exe = harness()?;
    let mut child = Command::new(exe)
        .arg(mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "parity {mode}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

fn hx(f: f32) -> String {
    format!("{:08x}", f.to_bits())
}

fn f_hex(s: &str) -> f32 {
    f32::from_bits(u32::from_str_radix(s, 16).unwrap())
}

/// Random f32 values: normals scaled by `scale`.
fn randn(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| rng::normal_at(rng.next_u64(), 0) * scale)
        .collect()
}

#[test]
fn rng_and_dropout_mask_are_the_engines_bit_for_bit() {
    let mut cases = Vec::new();
    let seeds = [0u64, 1, 42, u64::MAX, 0x9e37_79b9_7f4a_7c15];
    let indices = [0u64, 1, 2, 1000, (1 << 32) + 7, u64::MAX];
    for &s in &seeds {
        for &i in &indices {
            cases.push((s, i));
        }
    }
    let mut r = Rng::new(5);
    for _ in 0..2000 {
        cases.push((r.next_u64(), r.next_u64() >> (r.next_u64() % 64)));
    }
    let ps = [0.0f32, 0.1, 0.5, 0.9, 0.999_999];
    let input: String = cases
        .iter()
        .enumerate()
        .map(|(k, (s, i))| format!("{s:x} {i:x} {}\n", hx(ps[k % ps.len()])))
        .collect();
    let Some(out) = run("rng", &input) else {
        return;
    };
    assert_eq!(out.len(), cases.len());
    for (k, ((s, i), line)) in cases.iter().zip(&out).enumerate() {
        let f: Vec<&str> = line.split(' ').collect();
        let p = ps[k % ps.len()];
        assert_eq!(
            u64::from_str_radix(f[0], 16).unwrap(),
            rng::bits_at(*s, *i),
            "bits_at({s}, {i})"
        );
        assert_eq!(
            f_hex(f[1]).to_bits(),
            rng::uniform_at(*s, *i).to_bits(),
            "uniform_at({s}, {i})"
        );
        assert_eq!(f[2] == "1", dropout::keep(*s, *i, p), "keep({s}, {i}, {p})");
    }
}

#[test]
fn bf16_rounding_is_halfs() {
    let mut vals: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-40,                       // subnormal
        f32::from_bits(0x3f80_8000), // a tie: rounds to even (down)
        f32::from_bits(0x3f81_8000), // a tie: rounds to even (up)
        f32::from_bits(0x3f80_8001),
        f32::from_bits(0x7f7f_ffff), // rounds up to infinity
        f32::NAN,
    ];
    let mut r = Rng::new(11);
    vals.extend((0..5000).map(|_| f32::from_bits(r.next_u64() as u32)));
    let input: String = vals.iter().map(|v| format!("{}\n", hx(*v))).collect();
    let Some(out) = run("bf16", &input) else {
        return;
    };
    for (v, line) in vals.iter().zip(&out) {
        let (h, w) = line.split_once(' ').unwrap();
        let got = bf16::from_bits(u16::from_str_radix(h, 16).unwrap());
        let want = bf16::from_f32(*v);
        if v.is_nan() {
            // NaN stays NaN; CUDA returns its canonical NaN where half keeps the payload.
            assert!(got.is_nan() && f_hex(w).is_nan(), "{v:?}");
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "{v:e} ({:#x})", v.to_bits());
            assert_eq!(f_hex(w).to_bits(), want.to_f32().to_bits());
        }
    }
}

#[test]
fn sgdw_is_the_cpu_update_bit_for_bit() {
    let n = 3000;
    let mut r = Rng::new(21);
    let param = randn(&mut r, n, 1.0);
    let grad = randn(&mut r, n, 0.01);
    let buf = randn(&mut r, n, 0.01);
    let steps = [
        (0.1, 0.9995, 0.875, 1.0, false, true),
        (0.1, 0.9995, 0.875, 1.0, false, false),
        (0.05, 0.99, 0.9, 0.9, true, false),
        (0.3, 1.0, 0.0, 1.0, false, false),
        (1e-3, 0.999_999, 0.875, 1.0, false, false),
    ];
    for (lr, decay, momentum, grad_weight, nesterov, first) in steps {
        let s = SgdwStep {
            lr,
            decay,
            momentum,
            grad_weight,
            nesterov,
            first,
        };
        let head = format!(
            "{} {} {} {} {} {}\n",
            hx(lr),
            hx(decay),
            hx(momentum),
            hx(grad_weight),
            nesterov as i32,
            first as i32
        );
        let body: String = (0..n)
            .map(|i| format!("{} {} {}\n", hx(param[i]), hx(grad[i]), hx(buf[i])))
            .collect();
        let Some(out) = run("sgdw", &(head + &body)) else {
            return;
        };
        let (mut p, mut b) = (param.clone(), buf.clone());
        sgdw_update_cpu(&mut p, &grad, &mut b, &s).unwrap();
        for i in 0..n {
            let (gp, gb) = out[i].split_once(' ').unwrap();
            assert_eq!(f_hex(gp).to_bits(), p[i].to_bits(), "{s:?} param {i}");
            assert_eq!(f_hex(gb).to_bits(), b[i].to_bits(), "{s:?} buffer {i}");
        }
    }
}

#[test]
fn adamw_is_the_cpu_update_bit_for_bit() {
    let n = 3000;
    let mut r = Rng::new(22);
    let param = randn(&mut r, n, 1.0);
    let grad = randn(&mut r, n, 0.01);
    let m0 = randn(&mut r, n, 0.001);
    let v0: Vec<f32> = randn(&mut r, n, 0.001).iter().map(|x| x * x).collect();
    // (lr, beta1, beta2, eps, weight decay, step): beta1 0.3 takes lerp's other branch.
    for (lr, beta1, beta2, eps, wd, t) in [
        (1e-3f64, 0.9f64, 0.999f64, 1e-8f64, 0.01f64, 1i32),
        (1e-3, 0.9, 0.999, 1e-8, 0.01, 1000),
        (5e-4, 0.3, 0.98, 1e-6, 0.0, 7),
    ] {
        let s = AdamWStep {
            decay: (1.0 - lr * wd) as f32,
            grad_weight: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            sq_weight: (1.0 - beta2) as f32,
            neg_step_size: (-lr / (1.0 - beta1.powi(t))) as f32,
            bias_correction2_sqrt: (1.0 - beta2.powi(t)).sqrt() as f32,
            eps: eps as f32,
        };
        let head = format!(
            "{} {} {} {} {} {} {}\n",
            hx(s.decay),
            hx(s.grad_weight),
            hx(s.beta2),
            hx(s.sq_weight),
            hx(s.neg_step_size),
            hx(s.bias_correction2_sqrt),
            hx(s.eps)
        );
        let body: String = (0..n)
            .map(|i| {
                format!(
                    "{} {} {} {}\n",
                    hx(param[i]),
                    hx(grad[i]),
                    hx(m0[i]),
                    hx(v0[i])
                )
            })
            .collect();
        let Some(out) = run("adamw", &(head + &body)) else {
            return;
        };
        let (mut p, mut m, mut v) = (param.clone(), m0.clone(), v0.clone());
        adamw_update_cpu(&mut p, &grad, &mut m, &mut v, &s).unwrap();
        for i in 0..n {
            let f: Vec<f32> = out[i].split(' ').map(f_hex).collect();
            assert_eq!(f[0].to_bits(), p[i].to_bits(), "{s:?} param {i}");
            assert_eq!(f[1].to_bits(), m[i].to_bits(), "{s:?} exp_avg {i}");
            assert_eq!(f[2].to_bits(), v[i].to_bits(), "{s:?} exp_avg_sq {i}");
        }
    }
}

#[test]
fn online_log_sum_exp_matches_the_two_pass_cpu() {
    let mut r = Rng::new(31);
    let mut rows: Vec<(u32, Vec<f32>)> = vec![
        (32, vec![f32::NEG_INFINITY; 5]),
        (32, vec![1000.0, 1001.0, 999.0, 1000.5]),
        (64, vec![-3.0]),
        (32, vec![f32::NEG_INFINITY, 2.0, f32::NEG_INFINITY]),
    ];
    for (threads, n, scale) in [
        (32, 10, 1.0),
        (128, 768, 3.0),
        (1024, 30_522, 5.0),
        (256, 1000, 30.0),
    ] {
        rows.push((threads, randn(&mut r, n, scale)));
    }
    let input: String = rows
        .iter()
        .map(|(t, v)| {
            let vals: Vec<String> = v.iter().map(|x| hx(*x)).collect();
            format!("{t} {} {}\n", v.len(), vals.join(" "))
        })
        .collect();
    let Some(out) = run("lse", &input) else {
        return;
    };
    for ((threads, v), line) in rows.iter().zip(&out) {
        let got = f_hex(line);
        if v.iter().all(|&x| x == f32::NEG_INFINITY) {
            // No defined distribution. The online form gives -inf (as the distillation loss's
            // logsumexp); the engine's two passes give NaN (exp(-inf + inf)). Either way the
            // softmax and the cross-entropy built on it are NaN, as on the CPU.
            assert_eq!(got, f32::NEG_INFINITY);
            continue;
        }
        // The engine's twin sums exp() in one sequential f32 pass: its own error grows with
        // the row (about sqrt(n) ulp of the sum); the online form sums ~n / threads values per
        // thread, then a tree. Both are held to the exact value (f64), each within its bound.
        let cpu = log_sum_exp_row_cpu(v) as f64;
        let m = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let exact = m + v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        let ulp = f32::EPSILON as f64 * exact.abs().max(1.0);
        let n = v.len() as f64;
        assert!(
            (got as f64 - exact).abs() <= 8.0 * ulp,
            "{threads} threads, {} values: online {got} vs exact {exact}",
            v.len()
        );
        assert!(
            (cpu - exact).abs() <= (8.0 + n.sqrt()) * ulp,
            "{} values: CPU {cpu} vs exact {exact}",
            v.len()
        );
    }
}

#[test]
fn reference_gradient_is_the_derivative_of_the_reference_loss() {
    // Pins the formulas the kernel is compared with: d(ce_w * ce + lkw * kd)/ds.
    let mut r = Rng::new(41);
    let s = randn(&mut r, 7, 2.0);
    let t = randn(&mut r, 7, 2.0);
    for term in [
        Some(KdKind::Kl { temperature: 2.5 }),
        Some(KdKind::Mse),
        None,
    ] {
        let (cw, lkw) = (0.25, 0.6);
        let (_, _, g) = kd::reference_row(term, &s, &t, Some(3), cw, lkw);
        for j in 0..s.len() {
            let h = 1e-3f32;
            let mut sp = s.clone();
            sp[j] += h;
            let mut sm = s.clone();
            sm[j] -= h;
            let loss = |x: &[f32]| {
                let (ce, kdv, _) = kd::reference_row(term, x, &t, Some(3), cw, lkw);
                cw * ce + lkw * kdv
            };
            let fd = (loss(&sp) - loss(&sm)) / (sp[j] as f64 - sm[j] as f64);
            assert!(
                (fd - g[j]).abs() < 1e-5,
                "{term:?} class {j}: {fd} vs {}",
                g[j]
            );
        }
    }
}

#[test]
fn fused_loss_row_math_matches_the_definition() {
    let mut r = Rng::new(51);
    let kl = |temperature| Some(KdKind::Kl { temperature });
    // (term, classes, teachers, label, threads)
    let cases: Vec<(Option<KdKind>, usize, usize, i32, u32)> = vec![
        (kl(1.0), 10, 1, 3, 32),
        (kl(2.0), 1000, 3, 999, 128),
        (kl(4.0), 30_522, 2, 17, 1024),
        (kl(2.0), 300, 1, -100, 64), // no label: KD only
        (Some(KdKind::Mse), 1000, 1, 0, 128),
        (Some(KdKind::Mse), 257, 4, -100, 64),
        (None, 1000, 0, 5, 128),
        (None, 50, 0, -100, 32), // neither: a zero row
    ];
    let (ce_rows, kd_rows, lambda) = (12usize, 20usize, 0.9f32);
    for (term, c, k, label, threads) in cases {
        let scale = if c > 5000 { 6.0 } else { 3.0 };
        let s = randn(&mut r, c, scale);
        let teachers: Vec<Vec<f32>> = (0..k).map(|_| randn(&mut r, c, scale)).collect();
        // The teachers' mean as the CPU loss forms it: summed in order, divided by k, in f32.
        let t: Vec<f32> = (0..c)
            .map(|j| teachers.iter().map(|tq| tq[j]).sum::<f32>() / k.max(1) as f32)
            .collect();
        let sc = KdScalars::new(term, lambda, ce_rows, kd_rows, c, 1.0).unwrap();
        let kind = match term {
            None => 0,
            Some(KdKind::Kl { .. }) => 1,
            Some(KdKind::Mse) => 2,
        };
        let mut input = format!(
            "{kind} {c} {k} {label} -100 {threads}\n{} {} {} {}\n",
            hx(sc.inv_t),
            hx(sc.t_sq),
            hx(sc.grad_ce_weight),
            hx(sc.grad_kd_scale)
        );
        for row in std::iter::once(&s).chain(&teachers) {
            let v: Vec<String> = row.iter().map(|x| hx(*x)).collect();
            input += &v.join(" ");
            input.push('\n');
        }
        let Some(out) = run("kd", &input) else { return };
        let (ce_h, kd_h) = out[0].split_once(' ').unwrap();
        let (got_ce, got_kd) = (f_hex(ce_h) as f64, f_hex(kd_h) as f64);
        let grad: Vec<f64> = out[1].split(' ').map(|h| f_hex(h) as f64).collect();
        let lab = (label >= 0).then_some(label as usize);
        let (ce, kdv, g) = kd::reference_row(
            term,
            &s,
            &t,
            lab,
            sc.grad_ce_weight as f64,
            (lambda * sc.kd_weight) as f64,
        );
        let what = format!("{term:?}, C = {c}, k = {k}, label {label}");
        let close = |a: f64, b: f64, rel: f64| (a - b).abs() <= rel * b.abs().max(1.0);
        assert!(close(got_ce, ce, 2e-6), "{what}: row CE {got_ce} vs {ce}");
        assert!(close(got_kd, kdv, 2e-5), "{what}: row KD {got_kd} vs {kdv}");
        // Gradient entries are O(weight / C) to O(weight): compare against the weights.
        let gscale = (sc.grad_ce_weight + sc.grad_kd_scale.abs() * scale) as f64;
        let worst = g
            .iter()
            .zip(&grad)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= 2e-6 * gscale,
            "{what}: gradient off by {worst} (scale {gscale})"
        );
        if term.is_none() && label < 0 {
            assert!(grad.iter().all(|&v| v == 0.0));
        }
    }
    // The host-side counts feed the normalisers exactly as the CPU loss counts.
    assert_eq!(
        kd::row_counts(&[1, -100, 2], Some(&[1, 1, 0]), 3, -100, true).unwrap(),
        (1, 2)
    );
}
