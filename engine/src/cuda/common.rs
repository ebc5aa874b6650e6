//! The helpers every CUDA op family file uses: the storage type of a launch, launch shapes,
//! running a plan, device views, uninitialised outputs, dtype conversion, and i32 labels and
//! masks on the host and the GPU. No kernel family of its own (`as_dtype` casts through
//! `elementwise.rs`).
//!
//! Each op comes in two layers:
//! - a *plan*: the kernel calls for given device addresses and shapes (pure data, built by
//!   the kernels' typed launchers; the tests build them for sample shapes on the CPU);
//! - the tensor-level function, which validates inputs as the CPU op does, allocates the
//!   outputs, launches the plan on the current stream (the student's, or a scope's) and, for
//!   tape ops, records a backward that launches the backward kernels.
//!
//! Conventions that differ from the CPU ops: an op's output has its input's dtype (bf16
//! activations stay bf16; the CPU ops widen everything to f32), and the inputs of one kernel
//! share a dtype (a gradient of another dtype is cast first). Each family has its own file
//! (`elementwise.rs`, `softmax.rs`, `loss.rs`, `kd_loss.rs`, `optim.rs`, `matmul.rs`, `conv.rs`, `norm.rs`,
//! `gather.rs`, `dropout.rs`, `pool.rs`, `layout.rs`); this file keeps the shared helpers.

use std::sync::Arc;

use recycle_kernels::launch::{self as kl, LaunchConfig};

use super::elementwise::cast;
use super::launch::{launch, shape_err, KernelCall};
use super::{CudaContext, CudaView, DeviceBuffer};
use crate::tensor::elem_count;
use crate::{DType, Device, Result, Tensor};

/// Runs `$body` with the type `$T` standing for the storage type of `$dtype` (`f32` or
/// `half::bf16`), the `T` of a generic launcher; an i32 `$dtype` is an error naming `$op`.
macro_rules! with_float {
    ($op:expr, $dtype:expr, |$T:ident| $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            got => Err($crate::Error::DType {
                op: $op,
                expected: $crate::DType::F32,
                got,
            }),
        }
    };
}
pub(crate) use with_float;

/// A grid-stride launch shape over `n` elements; `None` when there is nothing to do.
pub(crate) fn grid_stride(n: usize) -> Option<LaunchConfig> {
    kl::elementwise(n as u64)
}

/// The one launch `call` makes on [`grid_stride`]'s shape over `n` elements; none for `n` 0.
pub(crate) fn grid_stride_call(
    n: usize,
    call: impl FnOnce(LaunchConfig) -> KernelCall,
) -> Vec<KernelCall> {
    grid_stride(n).map(call).into_iter().collect()
}

/// A device pointer from an address.
pub(crate) fn p<T>(addr: u64) -> super::launch::Ptr<T> {
    super::launch::Ptr::new(addr)
}

pub(crate) fn rows_cfg(
    kernel: &'static str,
    rows: usize,
    cols: usize,
) -> Result<Option<LaunchConfig>> {
    kl::rows(kernel, rows as u64, cols as u64).map_err(shape_err)
}

pub(crate) fn run(ctx: &CudaContext, calls: &[KernelCall]) -> Result<()> {
    calls.iter().try_for_each(|c| launch(ctx, c))
}

pub(crate) fn view(t: &Tensor, op: &'static str) -> Result<CudaView> {
    t.cuda_view(op)
}

/// An uninitialised tensor on `ctx`'s GPU (filled with NaN when poisoning is on).
pub(crate) fn empty(ctx: &Arc<CudaContext>, dtype: DType, shape: &[usize]) -> Result<Tensor> {
    let buf = DeviceBuffer::alloc(ctx, elem_count(shape) * dtype.size_in_bytes())?;
    Ok(Tensor::from_device_buffer(buf, dtype, shape))
}

/// A new `dtype` tensor of `shape` on `ctx`'s GPU, written by the calls `plan` builds for its
/// address.
pub(crate) fn output(
    ctx: &Arc<CudaContext>,
    dtype: DType,
    shape: &[usize],
    plan: impl FnOnce(u64) -> Result<Vec<KernelCall>>,
) -> Result<Tensor> {
    let out = empty(ctx, dtype, shape)?;
    run(ctx, &plan(out.cuda_view("output")?.ptr)?)?;
    Ok(out)
}

/// `t` in `dtype` (a cast on the device when it differs); the CUDA arm of
/// [`crate::backend::elementwise::to_compute_dtype`].
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

/// Checks the launch shape of every call of a plan (the family files' tests).
#[cfg(test)]
pub(crate) fn check_all(calls: &[KernelCall]) {
    assert!(!calls.is_empty());
    for c in calls {
        c.check().unwrap_or_else(|e| panic!("{}: {e}", c.kernel));
    }
}
