//! The helpers every CUDA op family file uses: kernel names, launch shapes, running a plan,
//! device views, uninitialised outputs, dtype conversion, and i32 labels and masks on the host
//! and the GPU. No kernel family of its own (`as_dtype` casts through `elementwise.rs`).
//!
//! Each op comes in two layers:
//! - a *plan*: the kernel calls for given device addresses and shapes (pure data, checked
//!   against the kernels' ABI; the tests build them for sample shapes on the CPU);
//! - the tensor-level function, which validates inputs as the CPU op does, allocates the
//!   outputs, launches the plan on the current stream (the student's, or a scope's) and, for
//!   tape ops, records a backward that launches the backward kernels.
//!
//! Conventions that differ from the CPU ops: an op's output has its input's dtype (bf16
//! activations stay bf16; the CPU ops widen everything to f32), and the inputs of one kernel
//! share a dtype (a gradient of another dtype is cast first). Each family has its own file
//! (`elementwise.rs`, `softmax.rs`, `loss.rs`, `optim.rs`, `matmul.rs`, `conv.rs`, `norm.rs`,
//! `gather.rs`, `dropout.rs`, `pool.rs`, `layout.rs`); this file keeps the shared helpers.

use std::sync::Arc;

use recycle_kernels::launch::{self as kl, LaunchConfig};
use recycle_kernels::names;

use super::elementwise::cast;
use super::launch::{shape_err, Arg, KernelCall};
use super::{CudaContext, CudaView, DeviceBuffer};
use crate::tensor::elem_count;
use crate::{DType, Device, Error, Result, Tensor};

/// The kernel `{base}_{suffix}` as the `'static` name of the kernels crate.
pub(crate) fn kernel(base: &str, suffix: &str) -> Result<&'static str> {
    let want = format!("{base}_{suffix}");
    names::FAMILIES
        .iter()
        .flat_map(|(_, ks)| ks.iter())
        .find(|k| **k == want)
        .copied()
        .ok_or_else(|| Error::invalid("cuda launch", format!("no kernel named {want}")))
}

/// A grid-stride call over `n` elements; `None` when there is nothing to do.
pub(crate) fn grid_stride(kernel: &'static str, n: usize, args: Vec<Arg>) -> Option<KernelCall> {
    kl::elementwise(n as u64).map(|cfg| KernelCall::new(kernel, cfg, args))
}

pub(crate) fn rows_cfg(
    kernel: &'static str,
    rows: usize,
    cols: usize,
) -> Result<Option<LaunchConfig>> {
    kl::rows(kernel, rows as u64, cols as u64).map_err(shape_err)
}

pub(crate) fn run(ctx: &CudaContext, calls: &[KernelCall]) -> Result<()> {
    calls.iter().try_for_each(|c| c.launch(ctx))
}

pub(crate) fn view(t: &Tensor, op: &'static str) -> Result<CudaView> {
    t.cuda_view(op)
}

/// An uninitialised tensor on `ctx`'s GPU (filled with NaN when poisoning is on).
pub(crate) fn empty(ctx: &Arc<CudaContext>, dtype: DType, shape: &[usize]) -> Result<Tensor> {
    let buf = DeviceBuffer::alloc(ctx, elem_count(shape) * dtype.size_in_bytes())?;
    Ok(Tensor::from_device_buffer(buf, dtype, shape))
}

/// `t` in `dtype` (a cast on the device when it differs).
pub(crate) fn as_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        Ok(t.clone())
    } else {
        cast(t, dtype)
    }
}

/// The i32 values of `t` on the host (labels, masks): on a GPU, the host copy it was uploaded
/// with (no copy, no wait), or a download when a kernel computed it.
pub(crate) fn host_i32(t: &Tensor) -> Result<Vec<i32>> {
    match t.device() {
        Device::Cpu => Ok(t.read_i32()?.to_vec()),
        Device::Cuda(_) => t.to_vec::<i32>(),
    }
}

/// `t` (i32) on `ctx`'s GPU: itself when already there.
pub(crate) fn on_gpu_i32(ctx: &Arc<CudaContext>, t: &Tensor, host: &[i32]) -> Result<Tensor> {
    if t.device() == Device::Cuda(ctx.ordinal()) {
        return Ok(t.clone());
    }
    Tensor::from_slice(host, t.shape(), Device::Cuda(ctx.ordinal()))
}

/// Checks every call of a plan against the kernels' ABI (the family files' tests).
#[cfg(test)]
pub(crate) fn check_all(calls: &[KernelCall]) {
    assert!(!calls.is_empty());
    for c in calls {
        c.check().unwrap_or_else(|e| panic!("{}: {e}", c.kernel));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_are_the_kernels_crates() {
        assert_eq!(kernel("relu_fwd", "bf16").unwrap(), "relu_fwd_bf16");
        assert!(kernel("relu_fwd", "f16").is_err());
    }
}
