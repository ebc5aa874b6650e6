//! The CUDA arm of the optimizers: one fused SGDW or AdamW step over a flat parameter buffer,
//! rewriting the bf16 working copy in the same pass (the `optimizers` kernel family,
//! `optimizers.cu`).

use recycle_kernels::launchers as k;

use super::common::{grid_stride_call, p, run, view, with_float};
use super::common_device;
use super::launch::KernelCall;
use crate::optim::{AdamWStep, SgdwStep};
use crate::{DType, Error, Result, Tensor};

/// `working`: the bf16 working copy the kernel rewrites in the same pass (0: none).
fn sgdw_plan(
    param: u64,
    grad: u64,
    momentum_buf: u64,
    working: u64,
    n: usize,
    s: &SgdwStep,
    grad_dtype: DType,
) -> Result<Vec<KernelCall>> {
    with_float!("Sgdw::step", grad_dtype, |T| Ok(grid_stride_call(n, |c| {
        k::sgdw_step::<T>(
            c,
            p(param),
            p(grad),
            p(momentum_buf),
            p(working),
            n as u64,
            s.lr,
            s.decay,
            s.momentum,
            s.grad_weight,
            s.nesterov as i32,
            s.first as i32,
        )
    })))
}

/// `moments`: the state buffers `[exp_avg, exp_avg_sq]`; `working` as for [`sgdw_plan`].
fn adamw_plan(
    param: u64,
    grad: u64,
    [exp_avg, exp_avg_sq]: [u64; 2],
    working: u64,
    n: usize,
    s: &AdamWStep,
    grad_dtype: DType,
) -> Result<Vec<KernelCall>> {
    with_float!("AdamW::step", grad_dtype, |T| Ok(grid_stride_call(
        n,
        |c| k::adamw_step::<T>(
            c,
            p(param),
            p(grad),
            p(exp_avg),
            p(exp_avg_sq),
            p(working),
            n as u64,
            s.decay,
            s.grad_weight,
            s.beta2,
            s.sq_weight,
            s.neg_step_size,
            s.bias_correction2_sqrt,
            s.eps,
        )
    )))
}

/// The device address of the bf16 working copy the optimizer kernels rewrite (0 without
/// one), after checking that it is bf16, as long as the master and on its GPU.
fn working_ptr(op: &'static str, values: &Tensor, working: Option<&Tensor>) -> Result<u64> {
    let Some(w) = working else {
        return Ok(0);
    };
    w.expect_dtype(op, DType::BF16)?;
    common_device(op, &[values, w])?;
    if w.elem_count() != values.elem_count() {
        return Err(Error::shape(
            op,
            format!(
                "the bf16 working copy has {} elements, the parameter buffer {}",
                w.elem_count(),
                values.elem_count()
            ),
        ));
    }
    Ok(w.cuda_view_mut(op)?.ptr)
}

/// One fused SGDW step over a flat buffer on a GPU; `momentum` is the f32 state on the same
/// GPU (checked by the optimizer); `working`, the bf16 working copy, is rewritten from the
/// updated master in the same launch.
pub(crate) fn sgdw_step(
    values: &Tensor,
    grads: &Tensor,
    momentum: &Tensor,
    working: Option<&Tensor>,
    s: &SgdwStep,
) -> Result<()> {
    const OP: &str = "Sgdw::step";
    common_device(OP, &[values, grads, momentum])?;
    let w = working_ptr(OP, values, working)?;
    // Parameters and state are written in place (`cuda_view_mut`); the gradient is read.
    let (p, g, m) = (
        values.cuda_view_mut(OP)?,
        view(grads, OP)?,
        momentum.cuda_view_mut(OP)?,
    );
    run(
        &p.ctx,
        &sgdw_plan(p.ptr, g.ptr, m.ptr, w, p.len, s, grads.dtype())?,
    )
}

/// One fused AdamW step over a flat buffer on a GPU, rewriting the bf16 working copy (when
/// there is one) in the same launch.
pub(crate) fn adamw_step(
    values: &Tensor,
    grads: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    working: Option<&Tensor>,
    s: &AdamWStep,
) -> Result<()> {
    const OP: &str = "AdamW::step";
    common_device(OP, &[values, grads, exp_avg, exp_avg_sq])?;
    let w = working_ptr(OP, values, working)?;
    let (p, g, m, v) = (
        values.cuda_view_mut(OP)?,
        view(grads, OP)?,
        exp_avg.cuda_view_mut(OP)?,
        exp_avg_sq.cuda_view_mut(OP)?,
    );
    run(
        &p.ctx,
        &adamw_plan(p.ptr, g.ptr, [m.ptr, v.ptr], w, p.len, s, grads.dtype())?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use recycle_kernels::call::Value;
    /// Several SGDW and AdamW steps in a row on the kernel simulator give the CPU update's
    /// exact bits (the kernels round every operation, without fused multiply-adds, in the CPU's
    /// order): parameters, optimizer state and the bf16 working copy (round to nearest even),
    /// for f32 and bf16 gradients, n not a multiple of the block.
    #[test]
    fn plans_on_the_simulator_match_the_cpu_twins() {
        use crate::cuda::sim_check::{as_stored, host_sim, run_plan, sample, upload};
        use crate::optim::{adamw_update_cpu, sgdw_update_cpu, AdamW};
        use crate::params::round_to_working_cpu;
        use half::bf16;
        use recycle_kernels::sim::SimBuffer;
        let Some(sim) = host_sim() else { return };
        // Five blocks of 256 threads, the last one partly idle.
        let n = 1037;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        let same = |what: &str, got: &SimBuffer, want: &[f32]| {
            let got = got.read::<f32>().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(bits(&got), bits(want), "{what}: not the CPU's bits");
        };
        let same_working = |what: &str, got: &Option<SimBuffer>, master: &[f32]| {
            if let Some(w) = got {
                let mut want = vec![bf16::ZERO; master.len()];
                round_to_working_cpu(master, &mut want);
                let want: Vec<u16> = want.iter().map(|b| b.to_bits()).collect();
                let got = w.read::<u16>().unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(got, want, "{what}: working copy not the rounded master");
            }
        };
        let lrs = [0.1f32, 0.07, 0.03, 0.01];
        for gdt in [DType::F32, DType::BF16] {
            for with_working in [false, true] {
                // SGDW: (momentum, dampening, weight decay, nesterov); momentum 0 passes no
                // state buffer (null, as the kernel allows).
                for (mom, damp, wd, nesterov) in [
                    (0.0f64, 0.0f64, 0.0f64, false),
                    (0.875, 0.0, 5e-4, false),
                    (0.875, 0.0, 5e-4, true),
                    (0.9, 0.1, 1e-2, false),
                ] {
                    let what = format!(
                        "sgdw momentum {mom} dampening {damp} decay {wd} nesterov {nesterov}, \
                         {gdt:?} grads, working copy {with_working}"
                    );
                    let mut p = sample(n, 1, 1.0);
                    let mut m = vec![0.0f32; n];
                    let bp = SimBuffer::from_slice(&p);
                    let bm = (mom != 0.0).then(|| SimBuffer::from_slice(&m));
                    let bw = with_working.then(|| SimBuffer::zeros::<u16>(n));
                    let initial_lr = lrs[0] as f64;
                    for (t, &lr) in lrs.iter().enumerate() {
                        let g = sample(n, 10 + t as u64, 2.0);
                        let bg = upload(&g, gdt);
                        let decay = if wd != 0.0 {
                            1.0 - (lr as f64 / initial_lr) * wd
                        } else {
                            1.0
                        };
                        let s = SgdwStep {
                            lr,
                            decay: decay as f32,
                            momentum: mom as f32,
                            grad_weight: (1.0 - damp) as f32,
                            nesterov,
                            first: t == 0,
                        };
                        let plan = sgdw_plan(
                            bp.ptr(),
                            bg.ptr(),
                            bm.as_ref().map_or(0, |b| b.ptr()),
                            bw.as_ref().map_or(0, |b| b.ptr()),
                            n,
                            &s,
                            gdt,
                        )
                        .unwrap();
                        run_plan(sim, &plan);
                        sgdw_update_cpu(&mut p, &as_stored(&g, gdt), &mut m, &s).unwrap();
                        let step = format!("{what}, step {}", t + 1);
                        same(&format!("{step}: params"), &bp, &p);
                        if let Some(bm) = &bm {
                            same(&format!("{step}: momentum"), bm, &m);
                        }
                        same_working(&step, &bw, &p);
                    }
                }
                // AdamW: PyTorch's defaults, then a large epsilon and beta1 above one half
                // (the other branch of lerp), both with weight decay.
                for (beta1, beta2, eps, wd) in [
                    (0.9f64, 0.999f64, 1e-8f64, 0.01f64),
                    (0.6, 0.98, 1e-3, 0.0),
                    (0.3, 0.95, 1e-6, 0.1),
                ] {
                    let what = format!(
                        "adamw betas ({beta1}, {beta2}) eps {eps} decay {wd}, {gdt:?} grads, \
                         working copy {with_working}"
                    );
                    let opt = AdamW::new(n, beta1, beta2, eps, wd).unwrap();
                    let mut p = sample(n, 2, 1.0);
                    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
                    let bp = SimBuffer::from_slice(&p);
                    let (bm, bv) = (SimBuffer::from_slice(&m), SimBuffer::from_slice(&v));
                    let bw = with_working.then(|| SimBuffer::zeros::<u16>(n));
                    for (t, &lr) in lrs.iter().enumerate() {
                        // Some zero gradients: m and v stay zero there on the first step.
                        let mut g = sample(n, 20 + t as u64, 0.5);
                        g.iter_mut().step_by(7).for_each(|x| *x = 0.0);
                        let bg = upload(&g, gdt);
                        let s = opt.step_scalars(t as u64 + 1, lr);
                        let plan = adamw_plan(
                            bp.ptr(),
                            bg.ptr(),
                            [bm.ptr(), bv.ptr()],
                            bw.as_ref().map_or(0, |b| b.ptr()),
                            n,
                            &s,
                            gdt,
                        )
                        .unwrap();
                        run_plan(sim, &plan);
                        adamw_update_cpu(&mut p, &as_stored(&g, gdt), &mut m, &mut v, &s).unwrap();
                        let step = format!("{what}, step {}", t + 1);
                        same(&format!("{step}: params"), &bp, &p);
                        same(&format!("{step}: exp_avg"), &bm, &m);
                        same(&format!("{step}: exp_avg_sq"), &bv, &v);
                        same_working(&step, &bw, &p);
                    }
                }
            }
        }
    }

    /// The optimizer plans hand the kernels the bf16 working copy's address in the parameter
    /// the ABI table calls `working`, and null without one; the pointers before it are the
    /// master, the gradient and the state, in order.
    #[test]
    fn optimizer_plans_pass_the_working_copy() {
        let sg = SgdwStep {
            lr: 0.1,
            decay: 1.0,
            momentum: 0.875,
            grad_weight: 1.0,
            nesterov: false,
            first: false,
        };
        let ad = AdamWStep {
            decay: 1.0,
            grad_weight: 0.1,
            beta2: 0.999,
            sq_weight: 0.001,
            neg_step_size: -0.01,
            bias_correction2_sqrt: 0.5,
            eps: 1e-8,
        };
        for dt in [DType::F32, DType::BF16] {
            for working in [0u64, 0xbf16_0000] {
                let s = &sgdw_plan(1, 2, 3, working, 100, &sg, dt).unwrap()[0];
                let a = &adamw_plan(1, 2, [3, 4], working, 100, &ad, dt).unwrap()[0];
                for (call, before) in [(s, vec![1, 2, 3]), (a, vec![1, 2, 3, 4])] {
                    let slot = recycle_kernels::call::Signature::of(call.kernel)
                        .unwrap()
                        .params
                        .iter()
                        .position(|(name, ty)| *name == "working" && *ty == "bf16*")
                        .unwrap();
                    assert_eq!(slot, before.len(), "{}", call.kernel);
                    assert_eq!(call.args[slot], Value::U64(working), "{}", call.kernel);
                    let want: Vec<Value> = before.into_iter().map(Value::U64).collect();
                    assert_eq!(call.args[..slot], want[..], "{}", call.kernel);
                }
            }
        }
    }
}
