//! The checks held to the CPU's bits, beside the op table's cases: the casts between f32 and
//! bf16 (plain and on the tape) and the SGDW/AdamW steps. A row's `err` is the number of
//! elements whose bits differ from the CPU's (any NaN equal to any NaN), its `tol` 0.

use crate::ops::elementwise::cast;
use crate::optim::{AdamW, Optimizer, Sgdw};
use crate::{DType, Device, Error, FlatParams, Result, Tape, Tensor};

use super::{draw, Compared};

/// f32 values of `t` as bits (any NaN as one NaN).
fn bits(t: &Tensor) -> Result<Vec<u32>> {
    let v = t
        .to_device(Device::Cpu)?
        .cast(DType::F32)?
        .to_vec::<f32>()?;
    Ok(v.iter()
        .map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })
        .collect())
}

/// The row `label` for `dev` against `cpu`, bit for bit.
fn bit_row(label: String, dev: &Tensor, cpu: &Tensor) -> Result<Compared> {
    let (d, c) = (bits(dev)?, bits(cpu)?);
    let differ = if d.len() == c.len() {
        d.iter().zip(&c).filter(|(a, b)| a != b).count()
    } else {
        d.len().max(c.len())
    };
    Ok(Compared {
        label,
        err: differ as f64,
        tol: 0.0,
    })
}

/// Casts on `device` against the CPU: every bf16 pattern widened to f32, and f32 values
/// rounded to bf16 to nearest even (ties both ways, subnormals, infinities, NaN); then the
/// tape's cast (`ops::elementwise::cast`) both ways, forward and its gradient cast back
/// (bf16 → f32 rounds the f32 upstream gradient to bf16 on the device).
pub fn compare_casts(device: Device) -> Result<Vec<Compared>> {
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
    let mut rows = Vec::new();
    for (values, from, to, what) in [
        (&widened, DType::BF16, DType::F32, "every bf16 pattern"),
        (
            &narrowed,
            DType::F32,
            DType::BF16,
            "ties, subnormals, inf, NaN",
        ),
    ] {
        let n = values.len();
        let x_cpu = Tensor::from_slice(values, &[n], Device::Cpu)?.cast(from)?;
        let x_dev = x_cpu.to_device(device)?;
        rows.push(bit_row(
            format!("cast {from} to {to}, {what}"),
            &x_dev.cast(to)?,
            &x_cpu.cast(to)?,
        )?);
        // The upstream gradient is f32 either way: the values that need rounding.
        let g_cpu = Tensor::from_slice(&narrowed[..n], &[n], Device::Cpu)?;
        let g_dev = g_cpu.to_device(device)?;
        let (y_dev, dx_dev) = cast_on_tape(&x_dev, &g_dev, to)?;
        let (y_cpu, dx_cpu) = cast_on_tape(&x_cpu, &g_cpu, to)?;
        let name = format!("cast op {from} to {to}");
        rows.push(bit_row(name.clone(), &y_dev, &y_cpu)?);
        rows.push(bit_row(format!("{name} backward"), &dx_dev, &dx_cpu)?);
    }
    Ok(rows)
}

/// The tape's cast of `x` to `to` and the gradient of `x` for the upstream gradient `g`.
fn cast_on_tape(x: &Tensor, g: &Tensor, to: DType) -> Result<(Tensor, Tensor)> {
    let tape = Tape::recording();
    let xv = tape.watch(x.clone());
    let y = cast(&tape, &xv, to)?;
    let grads = tape.backward_with(&y, g.clone())?;
    let dx = grads
        .get(&xv)
        .cloned()
        .ok_or_else(|| Error::Autograd("cast: no gradient for its input".to_string()))?;
    Ok((y.into_tensor(), dx))
}

/// A constructor of one optimizer configuration, for a buffer of `n` values.
type MakeOptimizer = Box<dyn Fn(usize) -> Result<Box<dyn Optimizer>>>;

/// The optimizer configurations: SGDW as (momentum, dampening, decay, nesterov), momentum 0
/// with no state; AdamW with PyTorch's defaults, then beta1 above and below one half (the two
/// branches of lerp).
fn optimizer_configs() -> Vec<(String, MakeOptimizer)> {
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
    let mut configs: Vec<(String, MakeOptimizer)> = Vec::new();
    for (m, d, wd, nesterov) in sgdw {
        configs.push((
            format!("sgdw momentum {m} dampening {d} decay {wd} nesterov {nesterov}"),
            Box::new(move |n| Ok(Box::new(Sgdw::new(n, m, d, wd, nesterov, 0.1)?) as _)),
        ));
    }
    for (b1, b2, eps, wd) in adamw {
        configs.push((
            format!("adamw betas ({b1}, {b2}) eps {eps} decay {wd}"),
            Box::new(move |n| Ok(Box::new(AdamW::new(n, b1, b2, eps, wd)?) as _)),
        ));
    }
    configs
}

/// Four SGDW and AdamW steps on `device` against the CPU's (the kernels round every operation
/// in the CPU's order, without fused multiply-adds), over a buffer that is not a multiple of
/// the block, with and without a bf16 working copy. One row per configuration and working
/// copy: the differing elements of the parameters, the optimizer state and the working copy,
/// summed over the steps; a failing row names the first step and quantity that differ.
pub fn compare_optimizer_steps(device: Device) -> Result<Vec<Compared>> {
    let n = 1037;
    let specs = vec![("w".to_string(), vec![n])];
    let w0 = draw(&[n], DType::F32, 900)?;
    let mut rows = Vec::new();
    for (what, make) in optimizer_configs() {
        for working in [false, true] {
            let mut sides = Vec::new();
            for dev in [Device::Cpu, device] {
                let mut p = FlatParams::new(&specs, dev)?;
                p.set("w", &w0)?;
                if working {
                    p.enable_working_copy()?;
                }
                sides.push((p, make(n)?));
            }
            let mut differ = 0.0;
            let mut first = None;
            for (t, lr) in [0.1f32, 0.07, 0.03, 0.01].into_iter().enumerate() {
                // Some zero gradients: AdamW's moments stay zero there on the first step.
                let mut g = draw(&[n], DType::F32, 910 + t as u64)?.to_vec::<f32>()?;
                g.iter_mut().step_by(7).for_each(|x| *x = 0.0);
                let g = Tensor::from_slice(&g, &[n], Device::Cpu)?;
                for (p, opt) in &mut sides {
                    p.grads().copy_from(&g)?;
                    opt.step(p, lr)?;
                }
                let [(cpu, cpu_opt), (dev, dev_opt)] = &sides[..] else {
                    unreachable!("two sides: the CPU and the device")
                };
                let mut pairs = vec![("values".to_string(), dev.values(), cpu.values())];
                if working {
                    let (Some(d), Some(c)) = (dev.working(), cpu.working()) else {
                        return Err(Error::Invalid {
                            op: "compare_optimizer_steps",
                            msg: format!("{what}: a side has no working copy after enabling it"),
                        });
                    };
                    pairs.push(("working copy".to_string(), d, c));
                }
                let (cpu_state, dev_state) = (cpu_opt.state(), dev_opt.state());
                for ((name, c), (_, d)) in cpu_state.iter().zip(&dev_state) {
                    if c.dtype() != DType::I32 {
                        pairs.push((name.to_string(), d, c));
                    }
                }
                for (name, d, c) in pairs {
                    let row = bit_row(String::new(), d, c)?;
                    if row.err > 0.0 && first.is_none() {
                        first = Some(format!("step {}: {name}", t + 1));
                    }
                    differ += row.err;
                }
            }
            let mut label = format!("{what}, working copy {working}, 4 steps");
            if let Some(first) = first {
                label.push_str(&format!(" (first differs at {first})"));
            }
            rows.push(Compared {
                label,
                err: differ,
                tol: 0.0,
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bit_row_counts_the_elements_that_differ() {
        let a = Tensor::from_slice(&[1.0f32, f32::NAN, 0.0, 2.0], &[4], Device::Cpu).unwrap();
        let b =
            Tensor::from_slice(&[1.0f32, f32::NAN, -0.0, 2.000_001], &[4], Device::Cpu).unwrap();
        assert_eq!(bit_row("a".into(), &a, &a).unwrap().err, 0.0);
        let row = bit_row("b".into(), &a, &b).unwrap();
        assert_eq!(row.err, 2.0);
        assert!(!row.pass());
    }

    #[test]
    fn on_the_cpu_every_exact_row_passes() {
        let casts = compare_casts(Device::Cpu).unwrap();
        let steps = compare_optimizer_steps(Device::Cpu).unwrap();
        assert_eq!((casts.len(), steps.len()), (6, 14));
        for r in casts.iter().chain(&steps) {
            assert!(r.pass(), "{}: {}", r.label, r.err);
        }
    }
}
