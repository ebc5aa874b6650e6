//! The op table (`recycle_engine::op_table`) on every device: each case's gradient check on
//! the CPU, and each case on `cuda:0` against the CPU where `cuda:0` opens (a GPU, or the mock
//! CUDA of `docs/mockcuda.md`, whose kernels run on the kernel simulator:
//! `LD_LIBRARY_PATH=<mock> RECYCLE_EXPECT_CUDA=1 cargo test -p recycle-engine --features cuda
//! --test op_table`). Where it does not open, the device case checks that the failure is the
//! engine's account of what is missing; `RECYCLE_EXPECT_CUDA=1` makes it a failure instead.

use std::collections::HashSet;

use recycle_engine::op_table::{self, FAMILIES};
use recycle_engine::optim::{AdamW, Optimizer, Sgdw};
use recycle_engine::{DType, Device, FlatParams, Result, Tensor};

#[test]
fn every_case_passes_its_gradient_check_on_the_cpu() {
    let mut failures = Vec::new();
    for case in op_table::cases() {
        if let Err(e) = op_table::grad_check(&case) {
            failures.push(e.to_string());
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_family_has_cases_and_names_are_unique() {
    let cases = op_table::cases();
    for family in FAMILIES {
        assert!(
            cases.iter().any(|c| c.family == family),
            "no case in {family}"
        );
    }
    let mut seen = HashSet::new();
    for c in &cases {
        assert!(FAMILIES.contains(&c.family), "{c:?}: unknown family");
        assert!(
            seen.insert((c.name.clone(), c.shape_text())),
            "{c:?} appears twice"
        );
    }
}

/// Whether `cuda:0` opens; where it does not, checks that the failure is the engine's account
/// of what is missing (a failure under `RECYCLE_EXPECT_CUDA`).
fn cuda0_opens() -> bool {
    if let Err(e) = recycle_engine::cuda::device_info(0) {
        assert!(
            matches!(e, recycle_engine::Error::Device(_)),
            "the probe's error is not a device error: {e}"
        );
        assert!(
            std::env::var_os("RECYCLE_EXPECT_CUDA").is_none(),
            "RECYCLE_EXPECT_CUDA is set, but cuda:0 does not open: {e} (build with `--features \
             cuda` and put a driver, or the mock CUDA's folder, on LD_LIBRARY_PATH)"
        );
        return false;
    }
    true
}

#[test]
fn on_cuda0_every_case_matches_the_cpu() {
    if !cuda0_opens() {
        return;
    }
    let mut draws = 0;
    let mut misses = Vec::new();
    let mut compared = 0;
    for dtype in op_table::DTYPES {
        for case in op_table::cases() {
            for row in op_table::compare(&case, dtype, Device::Cuda(0), &mut draws).unwrap() {
                compared += 1;
                if !row.pass() {
                    misses.push(format!(
                        "{} {dtype}: error {:.3e} > {:.0e}",
                        row.label, row.err, row.tol
                    ));
                }
            }
        }
    }
    assert!(compared > 100, "only {compared} quantities compared");
    assert!(misses.is_empty(), "{}", misses.join("\n"));
}

/// f32 values as bits (any NaN as one NaN): what "the CPU's bits" compares.
fn bits(t: &Tensor) -> Result<Vec<u32>> {
    let v = t
        .to_device(Device::Cpu)?
        .cast(DType::F32)?
        .to_vec::<f32>()?;
    Ok(v.iter()
        .map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })
        .collect())
}

/// Casts on cuda:0 are the CPU's bits: every bf16 pattern widened, and f32 values rounded to
/// nearest even (ties both ways, subnormals, infinities, NaN).
#[test]
fn on_cuda0_casts_are_the_cpus_bits() {
    if !cuda0_opens() {
        return;
    }
    let widened: Vec<f32> = (0..=u16::MAX as u32)
        .map(|b| f32::from_bits(b << 16))
        .collect();
    let mut narrowed: Vec<f32> = widened.iter().map(|x| x * 1.003_906_2).collect();
    narrowed.extend([
        f32::from_bits(0x3f80_8000), // a tie, rounded to even (down)
        f32::from_bits(0x3f81_8000), // a tie, rounded to even (up)
        1e-40,
        -1e-40,
        f32::INFINITY,
        f32::NAN,
    ]);
    for (values, from, to) in [
        (&widened, DType::BF16, DType::F32),
        (&narrowed, DType::F32, DType::BF16),
    ] {
        let cpu = Tensor::from_slice(values, &[values.len()], Device::Cpu)
            .unwrap()
            .cast(from)
            .unwrap();
        let gpu = cpu.to_device(Device::Cuda(0)).unwrap().cast(to).unwrap();
        let want = bits(&cpu.cast(to).unwrap()).unwrap();
        assert_eq!(bits(&gpu).unwrap(), want, "cast {from} -> {to}");
    }
}

/// Four SGDW and AdamW steps on cuda:0 give the CPU update's bits (the kernels round every
/// operation in the CPU's order, without fused multiply-adds): the parameters, the optimizer
/// state and the bf16 working copy, over a buffer that is not a multiple of the block.
#[test]
fn on_cuda0_optimizer_steps_are_the_cpus_bits() {
    if !cuda0_opens() {
        return;
    }
    let n = 1037;
    let specs = vec![("w".to_string(), vec![n])];
    // SGDW: (momentum, dampening, decay, nesterov), momentum 0 with no state; AdamW: PyTorch's
    // defaults, then beta1 above and below one half (the two branches of lerp).
    let sgdw = [
        (0.0, 0.0, 0.0, false),
        (0.875, 0.0, 5e-4, false),
        (0.875, 0.0, 5e-4, true),
        (0.9, 0.1, 1e-2, false),
    ];
    let adamw = [
        (0.9, 0.999, 1e-8, 0.01),
        (0.6, 0.98, 1e-3, 0.0),
        (0.3, 0.95, 1e-6, 0.1),
    ];
    type Make = Box<dyn Fn() -> Box<dyn Optimizer>>;
    let mut makers: Vec<(String, Make)> = Vec::new();
    for (m, d, wd, nesterov) in sgdw {
        makers.push((
            format!("sgdw momentum {m} dampening {d} decay {wd} nesterov {nesterov}"),
            Box::new(move || Box::new(Sgdw::new(n, m, d, wd, nesterov, 0.1).unwrap())),
        ));
    }
    for (b1, b2, eps, wd) in adamw {
        makers.push((
            format!("adamw betas ({b1}, {b2}) eps {eps} decay {wd}"),
            Box::new(move || Box::new(AdamW::new(n, b1, b2, eps, wd).unwrap())),
        ));
    }
    let w0 = op_table::draw(&[n], DType::F32, 900).unwrap();
    for (what, make) in &makers {
        for working in [false, true] {
            let what = format!("{what}, working copy {working}");
            let mut sides = Vec::new();
            for device in [Device::Cpu, Device::Cuda(0)] {
                let mut p = FlatParams::new(&specs, device).unwrap();
                p.set("w", &w0).unwrap();
                if working {
                    p.enable_working_copy().unwrap();
                }
                sides.push((p, make()));
            }
            for (t, lr) in [0.1f32, 0.07, 0.03, 0.01].into_iter().enumerate() {
                // Some zero gradients: AdamW's moments stay zero there on the first step.
                let mut g = op_table::draw(&[n], DType::F32, 910 + t as u64)
                    .unwrap()
                    .to_vec::<f32>()
                    .unwrap();
                g.iter_mut().step_by(7).for_each(|x| *x = 0.0);
                let g = Tensor::from_slice(&g, &[n], Device::Cpu).unwrap();
                for (p, opt) in &mut sides {
                    p.grads().copy_from(&g).unwrap();
                    opt.step(p, lr).unwrap();
                }
                let step = format!("{what}, step {}", t + 1);
                let [(cpu, cpu_opt), (gpu, gpu_opt)] = &sides[..] else {
                    unreachable!()
                };
                assert_eq!(
                    bits(gpu.values()).unwrap(),
                    bits(cpu.values()).unwrap(),
                    "{step}: values"
                );
                if working {
                    let (w_gpu, w_cpu) = (gpu.working().unwrap(), cpu.working().unwrap());
                    assert_eq!(
                        bits(w_gpu).unwrap(),
                        bits(w_cpu).unwrap(),
                        "{step}: working copy"
                    );
                }
                for ((name, s_cpu), (_, s_gpu)) in cpu_opt.state().iter().zip(gpu_opt.state()) {
                    if s_cpu.dtype() != DType::I32 {
                        assert_eq!(
                            bits(&s_gpu).unwrap(),
                            bits(s_cpu).unwrap(),
                            "{step}: {name}"
                        );
                    }
                }
            }
        }
    }
}
