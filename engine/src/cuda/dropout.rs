//! The CUDA arm of `dropout` (kernel `dropout.cu`). **Compiled, not run on a GPU.**
//!
//! The mask is the engine's counter-based rule (`rng::uniform_at(seed, i) >= p` for element `i`
//! of the tensor in row-major order; the kernels share the hash with `rng.rs`, checked bit for
//! bit by the kernels crate's host parity test), so the GPU drops exactly the elements the CPU
//! drops for the same seed, whatever the launch shape. Nothing is stored: the backward applies
//! the same kernel, with the same seed, to the gradient.

use super::common::{as_dtype, empty, grid_stride, kernel, run, view};
use super::kernel_suffix;
use super::launch::{Arg, KernelCall};
use crate::ops::dropout::keep_scale;
use crate::{DType, Result, Tape, Tensor, Var};

pub(crate) fn dropout_plan(
    x: u64,
    y: u64,
    n: usize,
    p: f32,
    seed: u64,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let k = kernel("dropout", kernel_suffix("dropout", dtype)?)?;
    let args = vec![
        Arg::Ptr(x),
        Arg::Ptr(y),
        Arg::U64(n as u64),
        Arg::F32(p),
        // The scale the CPU computes (in f32, on the host).
        Arg::F32(keep_scale(p)),
        Arg::U64(seed),
        Arg::U64(0), // the whole tensor: element 0 is index 0 of the mask
    ];
    Ok(grid_stride(k, n, args).into_iter().collect())
}

fn apply(t: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    let xv = view(t, "dropout")?;
    let out = empty(&xv.ctx, t.dtype(), t.shape())?;
    run(
        &xv.ctx,
        &dropout_plan(
            xv.ptr,
            view(&out, "dropout")?.ptr,
            xv.len,
            p,
            seed,
            t.dtype(),
        )?,
    )?;
    Ok(out)
}

/// The CUDA arm of `dropout` in training with `0 < p < 1` (validated by the caller).
pub(crate) fn dropout(tape: &Tape, x: &Var, p: f32, seed: u64) -> Result<Var> {
    let dtype = x.tensor().dtype();
    let out = apply(x.tensor(), p, seed)?;
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            let gx = needs[0]
                .then(|| apply(&as_dtype(g, dtype)?, p, seed))
                .transpose()?;
            Ok(vec![gx])
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_plans_match_the_kernel_abi() {
        for dt in [DType::F32, DType::BF16] {
            let plan = dropout_plan(1, 2, 1 << 20, 0.1, 42, dt).unwrap();
            assert_eq!(plan.len(), 1);
            plan[0].check().unwrap();
            assert_eq!(plan[0].args[4], Arg::F32(keep_scale(0.1)));
        }
        assert!(dropout_plan(1, 2, 0, 0.1, 42, DType::F32)
            .unwrap()
            .is_empty());
    }
}
