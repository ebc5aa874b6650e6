//! The CUDA arm of dropout's backend-level functions (`crate::backend::dropout`): kernel
//! `dropout.cu`. No tape here: the op and its one backward are in `crate::ops::dropout`.
//!
//! The mask is the engine's counter-based rule (`rng::uniform_at(seed, i) >= p` for element `i`
//! of the tensor in row-major order; the kernels share the hash with `rng.rs`, checked bit for
//! bit by the kernels crate's host parity test), so the GPU drops exactly the elements the CPU
//! drops for the same seed, whatever the launch shape. Nothing is stored: the backward applies
//! the same kernel, with the same seed, to the gradient.

use recycle_kernels::launchers as k;

use super::common::{as_dtype, grid_stride, output, p as ptr, view};
use super::launch::KernelCall;
use crate::backend::dropout::keep_scale;
use crate::{DType, Error, Result, Tensor};

pub(crate) fn dropout_plan(
    x: u64,
    y: u64,
    n: usize,
    p: f32,
    seed: u64,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let Some(cfg) = grid_stride(n) else {
        return Ok(vec![]);
    };
    // The scale the CPU computes (in f32, on the host); index base 0: the whole tensor, its
    // element 0 is index 0 of the mask.
    let (n, scale) = (n as u64, keep_scale(p));
    Ok(vec![match dtype {
        DType::F32 => k::dropout_f32(cfg, ptr(x), ptr(y), n, p, scale, seed, 0),
        DType::BF16 => k::dropout_bf16(cfg, ptr(x), ptr(y), n, p, scale, seed, 0),
        got => {
            return Err(Error::DType {
                op: "dropout",
                expected: DType::F32,
                got,
            })
        }
    }])
}

/// The CUDA arm of [`crate::backend::dropout::dropout_fwd`] and, applied to the gradient, of
/// its backward (`0 < p < 1`): the output in `t`'s dtype.
pub(crate) fn dropout(t: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    let xv = view(t, "dropout")?;
    output(&xv.ctx, t.dtype(), t.shape(), |y| {
        dropout_plan(xv.ptr, y, xv.len, p, seed, t.dtype())
    })
}

/// The CUDA arm of [`crate::backend::dropout::dropout_bwd`]: the mask of the forward on `dy`
/// read in `dtype`.
pub(crate) fn dropout_bwd(dy: &Tensor, p: f32, seed: u64, dtype: DType) -> Result<Tensor> {
    dropout(&as_dtype(dy, dtype)?, p, seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_plans_pass_the_cpu_scale() {
        for dt in [DType::F32, DType::BF16] {
            let plan = dropout_plan(1, 2, 1 << 20, 0.1, 42, dt).unwrap();
            assert_eq!(plan.len(), 1);
            plan[0].check().unwrap();
            assert_eq!(
                plan[0].args[4],
                recycle_kernels::call::Value::F32(keep_scale(0.1))
            );
        }
        assert!(dropout_plan(1, 2, 0, 0.1, 42, DType::F32)
            .unwrap()
            .is_empty());
    }

    /// The kernel keeps exactly the elements the CPU keeps (same seed, same flat indices,
    /// whatever the launch shape) and scales them by the CPU's f32 factor: the outputs are the
    /// CPU's bits (in bf16: the CPU's f32 product rounded once), forward and backward.
    #[test]
    fn plans_on_the_simulator_match_the_cpu_twins() {
        use crate::backend::dropout as cpu;
        use crate::cuda::sim_check::{
            as_stored, assert_close, download, host_sim, run_plan, sample, upload,
        };
        let Some(sim) = host_sim() else { return };
        for n in [3usize, 1000, 4099] {
            for dt in [DType::F32, DType::BF16] {
                for (p, seed) in [(0.1f32, 42u64), (0.5, 7), (0.9, u64::MAX)] {
                    let what = format!("dropout n={n} p={p} seed={seed} {dt:?}");
                    let x = sample(n, 1, 3.0);
                    let g = sample(n, 2, 1.0);
                    // The grid as planned, then cut to 2 blocks: each thread then handles
                    // several elements, and must still use their flat indices for the mask.
                    for blocks in [u32::MAX, 2] {
                        let (bx, by) = (upload(&x, dt), upload(&vec![f32::NAN; n], dt));
                        let mut plan = dropout_plan(bx.ptr(), by.ptr(), n, p, seed, dt).unwrap();
                        plan[0].config.grid[0] = plan[0].config.grid[0].min(blocks);
                        run_plan(sim, &plan);
                        let y = download(&by, dt);
                        for (i, &v) in y.iter().enumerate() {
                            assert_eq!(
                                v != 0.0,
                                cpu::keep(seed, i as u64, p),
                                "{what}: the mask at element {i}"
                            );
                        }
                        let want =
                            as_stored(&cpu::dropout_forward_cpu(&as_stored(&x, dt), p, seed), dt);
                        assert_close(&format!("{what} forward"), &y, &want, 0.0, 0.0);

                        let (bg, bdx) = (upload(&g, dt), upload(&vec![f32::NAN; n], dt));
                        let mut plan = dropout_plan(bg.ptr(), bdx.ptr(), n, p, seed, dt).unwrap();
                        plan[0].config.grid[0] = plan[0].config.grid[0].min(blocks);
                        run_plan(sim, &plan);
                        let want =
                            as_stored(&cpu::dropout_backward_cpu(&as_stored(&g, dt), p, seed), dt);
                        assert_close(
                            &format!("{what} backward"),
                            &download(&bdx, dt),
                            &want,
                            0.0,
                            0.0,
                        );
                    }
                }
            }
        }
        // A tensor in two pieces (index_base = the second piece's first flat index) gets the
        // whole tensor's mask.
        let (n, split, p, seed) = (1000usize, 389usize, 0.3f32, 5u64);
        let x = sample(n, 3, 3.0);
        let (bx, by) = (
            upload(&x, DType::F32),
            upload(&vec![f32::NAN; n], DType::F32),
        );
        for (start, len) in [(0, split), (split, n - split)] {
            let mut plan = dropout_plan(
                bx.ptr() + 4 * start as u64,
                by.ptr() + 4 * start as u64,
                len,
                p,
                seed,
                DType::F32,
            )
            .unwrap();
            plan[0].args[6] = recycle_kernels::call::Value::U64(start as u64);
            run_plan(sim, &plan);
        }
        let want = cpu::dropout_forward_cpu(&x, p, seed);
        assert_close(
            "dropout in two pieces",
            &download(&by, DType::F32),
            &want,
            0.0,
            0.0,
        );
    }
}
