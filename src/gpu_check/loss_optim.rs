//! Checks of a training step's tail: the optimizers (SGDW, AdamW) and the fused distillation
//! loss, each on the GPU against the CPU (cross-entropy is a family of the op table).

use recycle_engine::op_table::BF16_TOL;
use recycle_engine::optim::{AdamW, Optimizer, Sgdw};
use recycle_engine::{DType, Device, Error, FlatParams, Result, Tape, Tensor};

use super::checker::Checker;
use crate::distill::loss::{kd_loss, KdLoss};

pub(super) fn optimizer_checks(c: &mut Checker) -> Result<()> {
    let n = 100_003;
    let specs = vec![("w".to_string(), vec![n])];
    for which in ["sgdw", "adamw"] {
        let p_cpu = FlatParams::new(&specs, Device::Cpu)?;
        let p_gpu = FlatParams::new(&specs, c.device)?;
        let (w_cpu, _) = c.fresh(&[n], DType::F32)?;
        p_cpu.set("w", &w_cpu)?;
        p_gpu.set("w", &w_cpu)?;
        let mut opts: Vec<Box<dyn Optimizer>> = match which {
            "sgdw" => vec![
                Box::new(Sgdw::paper(n, 0.1)?),
                Box::new(Sgdw::paper(n, 0.1)?),
            ],
            _ => vec![
                Box::new(AdamW::torch_default(n)?),
                Box::new(AdamW::torch_default(n)?),
            ],
        };
        for step in 0..3 {
            let (g_cpu, _) = c.fresh(&[n], DType::F32)?;
            p_cpu.grads().copy_from(&g_cpu)?;
            p_gpu.grads().copy_from(&g_cpu)?;
            let lr = 0.1 / (step + 1) as f32;
            opts[0].step(&p_cpu, lr)?;
            opts[1].step(&p_gpu, lr)?;
        }
        let shapes = format!("[{n}] x 3 steps");
        c.record(
            &format!("{which} step: parameters"),
            shapes.clone(),
            DType::F32,
            p_gpu.values(),
            p_cpu.values(),
            1e-6,
        )?;
        let (s_cpu, s_gpu) = (opts[0].state(), opts[1].state());
        for ((name, sc), (_, sg)) in s_cpu.iter().zip(&s_gpu) {
            if sc.dtype() == DType::I32 {
                continue;
            }
            c.record(
                &format!("{which} step: {name}"),
                shapes.clone(),
                DType::F32,
                sg,
                sc,
                1e-6,
            )?;
        }
    }
    Ok(())
}

/// The fused distillation loss against its CPU twin at the vocabulary sizes of the issue: 10
/// (Fashion-MNIST classes), 1000 (ImageNet) and 30522 (BERT's WordPiece vocabulary, a row
/// longer than any block: the kernel strides over it).
pub(super) fn kd_loss_checks(c: &mut Checker) -> Result<()> {
    let cases = [
        (
            "kd_loss KL T=4, 2 teachers",
            KdLoss::kl(4.0, 0.7),
            2usize,
            false,
        ),
        (
            "kd_loss KL T=2, 3 teachers, mask",
            KdLoss::kl(2.0, 1.0),
            3,
            true,
        ),
        ("kd_loss MSE, 1 teacher", KdLoss::mse(0.5), 1, false),
        ("kd_loss CE only", KdLoss::kl(4.0, 0.5), 0, false),
    ];
    for (name, cfg, k, masked) in cases {
        for (rows, classes) in [(128usize, 10usize), (64, 1000), (16, 30_522)] {
            // f32 student logits with bf16 teacher logits: the trainer's default on a GPU (f32
            // activations, bf16 teachers), kernels `kd_loss_{kl,mse}_f32_bf16`.
            for (s_dt, t_dt) in [
                (DType::F32, DType::F32),
                (DType::BF16, DType::BF16),
                (DType::F32, DType::BF16),
            ] {
                if k == 0 && s_dt != t_dt {
                    continue; // no teacher logits: the (f32, f32) row already
                }
                let (s_cpu, s_gpu) = c.fresh(&[rows, classes], s_dt)?;
                let mut t_cpu = Vec::new();
                let mut t_gpu = Vec::new();
                for _ in 0..k {
                    let (tc, tg) = c.fresh(&[rows, classes], t_dt)?;
                    t_cpu.push(tc);
                    t_gpu.push(tg);
                }
                let labels: Vec<i32> = (0..rows)
                    .map(|r| {
                        if r % 5 == 2 {
                            -100
                        } else {
                            ((r * 7919 + c.seed as usize) % classes) as i32
                        }
                    })
                    .collect();
                let labels = Tensor::from_vec(labels, &[rows], Device::Cpu)?;
                let mask = if masked {
                    let m: Vec<i32> = (0..rows).map(|r| (r % 3 != 0) as i32).collect();
                    Some(Tensor::from_vec(m, &[rows], Device::Cpu)?)
                } else {
                    None
                };
                let run = |s: &Tensor, ts: &[Tensor]| -> Result<(Tensor, Tensor)> {
                    let tape = Tape::recording();
                    let sv = tape.watch(s.clone());
                    let out = kd_loss(&tape, &cfg, &sv, ts, &labels, mask.as_ref())?;
                    let g = tape.backward(&out.total)?;
                    let grad = g.get(&sv).cloned().ok_or_else(|| {
                        Error::Autograd("kd_loss: no gradient for the student".into())
                    })?;
                    let losses = Tensor::f32(
                        vec![out.ce, out.kd, out.total.tensor().to_scalar_f32()?],
                        &[3],
                    )?;
                    Ok((losses, grad))
                };
                let (l_gpu, g_gpu) = run(&s_gpu, &t_gpu)?;
                let (l_cpu, g_cpu) = run(&s_cpu, &t_cpu)?;
                let shapes = if s_dt == t_dt {
                    format!("[{rows}, {classes}] x {k} teachers")
                } else {
                    format!("[{rows}, {classes}] x {k} {t_dt} teachers")
                };
                c.record(
                    &format!("{name}: ce, kd, total"),
                    shapes.clone(),
                    s_dt,
                    &l_gpu,
                    &l_cpu,
                    1e-4,
                )?;
                c.record(
                    &format!("{name}: gradient"),
                    shapes,
                    s_dt,
                    &g_gpu,
                    &g_cpu,
                    if s_dt == DType::BF16 { BF16_TOL } else { 1e-4 },
                )?;
            }
        }
    }
    Ok(())
}
