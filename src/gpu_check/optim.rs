//! The optimizers (SGDW, AdamW): three steps on the GPU against the CPU, parameters and
//! state. (The losses, cross-entropy and the fused distillation loss, are op table cases.)

use recycle_engine::optim::{AdamW, Optimizer, Sgdw};
use recycle_engine::{DType, Device, FlatParams, Result};

use super::checker::Checker;

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
