//! Test support: the CUDA launchers' plans run on the host simulator (`recycle_kernels::sim`)
//! against the CPU twins, on machines without a GPU.
//!
//! A plan built by a launcher (`*_plan`) is exactly what `run` queues on a GPU: kernel names,
//! launch shapes, argument lists. Running it on the simulator, with `SimBuffer` addresses as
//! device pointers, checks the launcher and the kernel's source together — indexing, grid and
//! block shapes, reductions, in-place writes — everything but the device's own `expf`/`logf`,
//! its memory model and its speed, which only gpu-check on a real GPU sees.

use half::bf16;
use recycle_kernels::sim::{HostSim, SimBuffer};

use super::launch::KernelCall;
use crate::DType;

/// The simulator, or None when this build embeds no kernels (`HostSim::for_tests`).
pub(crate) fn host_sim() -> Option<&'static HostSim> {
    HostSim::for_tests()
}

/// Runs every call of a plan, in order, to completion.
pub(crate) fn run_plan(sim: &HostSim, plan: &[KernelCall]) {
    for call in plan {
        // SAFETY: the tests pass addresses of SimBuffers sized for the plan's shapes.
        unsafe { sim.run(call) }.unwrap_or_else(|e| panic!("{}: {e}", call.kernel));
    }
}

/// A buffer holding `values` stored as `dtype` (f32, or bf16 rounded to nearest even).
pub(crate) fn upload(values: &[f32], dtype: DType) -> SimBuffer {
    match dtype {
        DType::BF16 => {
            let bits: Vec<u16> = values
                .iter()
                .map(|&v| bf16::from_f32(v).to_bits())
                .collect();
            SimBuffer::from_slice(&bits)
        }
        DType::F32 => SimBuffer::from_slice(values),
        other => panic!("upload of {other:?}: f32 or bf16 only"),
    }
}

/// The values the CPU twin sees for an input stored as `dtype` (bf16 inputs are rounded).
pub(crate) fn as_stored(values: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::BF16 => values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        _ => values.to_vec(),
    }
}

/// A buffer's contents as f32, reading `dtype` storage; fails on a guard overwritten.
pub(crate) fn download(buf: &SimBuffer, dtype: DType) -> Vec<f32> {
    match dtype {
        DType::BF16 => buf
            .read::<u16>()
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .map(|b| bf16::from_bits(b).to_f32())
            .collect(),
        DType::F32 => buf.read::<f32>().unwrap_or_else(|e| panic!("{e}")),
        other => panic!("download of {other:?}: f32 or bf16 only"),
    }
}

/// Asserts |got - want| <= abs + rel * |want| element by element, naming the first miss.
pub(crate) fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32, abs: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = (g - w).abs() <= abs + rel * w.abs() || (g.is_nan() && w.is_nan());
        assert!(ok, "{what}: element {i} is {g}, the CPU twin gives {w}");
    }
}

/// Asserts equal f32 bits element by element (any NaN matching any NaN).
pub(crate) fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan());
        assert!(ok, "{what}: element {i} is {g:e}, the CPU twin gives {w:e}");
    }
}

/// Deterministic values in about [-scale, scale].
pub(crate) fn sample(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = crate::rng::Rng::new(seed);
    (0..n)
        .map(|_| (rng.uniform() * 2.0 - 1.0) * scale)
        .collect()
}
