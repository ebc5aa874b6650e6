//! Sending a kernel call to the driver. The calls are built by the typed launchers that
//! `recycle-kernels` generates from the `.cu` signatures (`recycle_kernels::launchers`), so an
//! argument list always matches its kernel; what is left to check here is the launch shape.

use cudarc::driver::result;
use recycle_kernels::launch::LaunchError;

pub(crate) use recycle_kernels::call::{KernelCall, Ptr};

use super::context::{driver_err, CudaContext};
use crate::{Error, Result};

/// `v` as a kernel's `uint32_t` parameter, or an error naming the kernel and the value.
pub(crate) fn fit_u32(kernel: &str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        Error::invalid(
            "cuda launch",
            format!(
                "{kernel}: {what} is {v}, the kernel takes at most {}",
                u32::MAX
            ),
        )
    })
}

/// A launch shape error of `recycle_kernels::launch` as an engine error.
pub(crate) fn shape_err(e: LaunchError) -> Error {
    Error::invalid("cuda launch", e.to_string())
}

/// Checks the shape, then queues the kernel on the calling thread's current stream
/// (`compute_stream`).
pub(crate) fn launch(ctx: &CudaContext, call: &KernelCall) -> Result<()> {
    call.check()
        .map_err(|e| Error::invalid("cuda launch", e.to_string()))?;
    let f = ctx.function(call.family, call.kernel)?;
    let c = &call.config;
    ctx.bind()?;
    call.with_params(|params| {
        // SAFETY: the argument list matches the kernel's parameters (the call was built by the
        // kernel's generated launcher); pointers come from live device buffers whose frees are
        // ordered after this launch on the same stream.
        unsafe {
            result::launch_kernel(
                f,
                (c.grid[0], c.grid[1], c.grid[2]),
                (c.block[0], c.block[1], c.block[2]),
                c.shared_mem_bytes,
                ctx.compute_stream(),
                params,
            )
        }
    })
    .map_err(|e| driver_err(ctx.ordinal(), &format!("launching {}", call.kernel), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_that_do_not_fit_a_u32_are_errors() {
        assert_eq!(fit_u32("k", "rows", 7).unwrap(), 7);
        let e = fit_u32("k", "rows", 1 << 33).unwrap_err().to_string();
        assert!(e.contains("k: rows is 8589934592"), "{e}");
    }
}
