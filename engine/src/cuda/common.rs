//! The helpers every CUDA op family file uses: the storage type of a launch, launch shapes,
//! device views and typed pointers, uninitialised outputs, dtype conversion, and i32 labels
//! and masks on the host and the GPU. No kernel family of its own (`as_dtype` casts through
//! `elementwise.rs`).
//!
//! Each backend function validates what the CPU arm validates, allocates its outputs and
//! launches its kernels through their generated typed launchers (`recycle_kernels::launchers`)
//! on the current stream (the student's, or a scope's): grid, block, typed arguments, checked
//! result. The ops' forwards and backwards, written once, are in `crate::ops`.
//!
//! Conventions that differ from the CPU ops: an op's output has its input's dtype (bf16
//! activations stay bf16; the CPU ops widen everything to f32), and the inputs of one kernel
//! share a dtype (a gradient of another dtype is cast first). Each family has its own file
//! (`elementwise.rs`, `softmax.rs`, `loss.rs`, `optim.rs`, `matmul.rs`, `conv.rs`, `norm.rs`,
//! `gather.rs`, `dropout.rs`, `pool.rs`, `layout.rs`; the fused distillation loss is in
//! `crate::kd_loss`); this file keeps the shared helpers.

use std::sync::Arc;

use recycle_kernels::launch::{self as kl, LaunchConfig};

use super::elementwise::cast;
use super::launch::{shape_err, Ptr};
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

/// A device pointer from an address.
pub(crate) fn p<T>(addr: u64) -> Ptr<T> {
    Ptr::new(addr)
}

/// `t`'s device address as a kernel's typed pointer parameter.
pub(crate) fn dptr<T>(t: &Tensor, op: &'static str) -> Result<Ptr<T>> {
    Ok(Ptr::new(t.cuda_view(op)?.ptr))
}

pub(crate) fn rows_cfg(
    kernel: &'static str,
    rows: usize,
    cols: usize,
) -> Result<Option<LaunchConfig>> {
    kl::rows(kernel, rows as u64, cols as u64).map_err(shape_err)
}

pub(crate) fn view(t: &Tensor, op: &'static str) -> Result<CudaView> {
    t.cuda_view(op)
}

/// An uninitialised tensor on `ctx`'s GPU (filled with NaN when poisoning is on).
pub(crate) fn empty(ctx: &Arc<CudaContext>, dtype: DType, shape: &[usize]) -> Result<Tensor> {
    let buf = DeviceBuffer::alloc(ctx, elem_count(shape) * dtype.size_in_bytes())?;
    Ok(Tensor::from_device_buffer(buf, dtype, shape))
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
