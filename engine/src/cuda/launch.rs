//! A kernel call as data — family, kernel, launch shape, typed arguments — checked against the
//! kernel's parameter list in `recycle_kernels::abi` before `cuLaunchKernel`.
//!
//! The check is what makes the launchers testable without a GPU: every CUDA op builds its
//! calls with [`KernelCall`], and the tests build the same calls for sample shapes and check
//! them against the ABI table (which the kernels crate checks against the compiled PTX).

use std::ffi::c_void;

use cudarc::driver::result;
use recycle_kernels::kd::TeacherLogits;
use recycle_kernels::launch::{LaunchConfig, LaunchError};
use recycle_kernels::names;

use super::context::{driver_err, CudaContext};
use crate::{Error, Result};

/// One kernel argument, by the type its parameter has in the ABI table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Arg {
    /// A device pointer (0 for a null pointer the kernel accepts).
    Ptr(u64),
    U64(u64),
    U32(u32),
    I32(i32),
    F32(f32),
    Teachers(TeacherLogits),
}

impl Arg {
    /// The type word of the ABI table (`ptr`, `u64`, `u32`, `i32`, `f32`, `TeacherLogits`).
    pub(crate) fn abi_type(&self) -> &'static str {
        match self {
            Arg::Ptr(_) => "ptr",
            Arg::U64(_) => "u64",
            Arg::U32(_) => "u32",
            Arg::I32(_) => "i32",
            Arg::F32(_) => "f32",
            Arg::Teachers(_) => "TeacherLogits",
        }
    }

    /// A `u32` argument, or an error naming the kernel and the value when it does not fit.
    pub(crate) fn u32(kernel: &str, what: &str, v: usize) -> Result<Arg> {
        u32::try_from(v).map(Arg::U32).map_err(|_| {
            Error::invalid(
                "cuda launch",
                format!(
                    "{kernel}: {what} is {v}, the kernel takes at most {}",
                    u32::MAX
                ),
            )
        })
    }
}

/// The family (module) a kernel is in.
pub(crate) fn family_of(kernel: &str) -> Option<&'static str> {
    names::FAMILIES
        .iter()
        .find(|(_, ks)| ks.contains(&kernel))
        .map(|(f, _)| *f)
}

/// A launch shape error of `recycle_kernels::launch` as an engine error.
pub(crate) fn shape_err(e: LaunchError) -> Error {
    Error::invalid("cuda launch", e.to_string())
}

/// One kernel launch, not yet run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct KernelCall {
    pub kernel: &'static str,
    pub config: LaunchConfig,
    pub args: Vec<Arg>,
}

impl KernelCall {
    pub(crate) fn new(kernel: &'static str, config: LaunchConfig, args: Vec<Arg>) -> Self {
        KernelCall {
            kernel,
            config,
            args,
        }
    }

    /// Errors unless the arguments match the kernel's parameter list, type for type.
    pub(crate) fn check(&self) -> Result<()> {
        let bad = |msg: String| Error::invalid("cuda launch", format!("{}: {msg}", self.kernel));
        let params = recycle_kernels::abi::params(self.kernel)
            .ok_or_else(|| bad("not a kernel of recycle-kernels".to_string()))?;
        let want: Vec<(&str, &str)> = params
            .split(',')
            .map(|p| {
                let mut w = p.split_whitespace();
                (w.next().unwrap_or(""), w.next().unwrap_or(""))
            })
            .collect();
        if want.len() != self.args.len() {
            return Err(bad(format!(
                "{} arguments given, the kernel takes {} ({params})",
                self.args.len(),
                want.len()
            )));
        }
        for (i, ((ty, name), arg)) in want.iter().zip(&self.args).enumerate() {
            if *ty != arg.abi_type() {
                return Err(bad(format!(
                    "argument {i} (`{name}`) is {ty}, given {}",
                    arg.abi_type()
                )));
            }
        }
        let threads = self.config.block_threads();
        if threads == 0 || threads > recycle_kernels::launch::MAX_BLOCK {
            return Err(bad(format!("a block of {threads} threads")));
        }
        if self.config.grid_blocks() == 0 {
            return Err(bad("an empty grid".to_string()));
        }
        family_of(self.kernel).ok_or_else(|| bad("belongs to no family".to_string()))?;
        Ok(())
    }

    /// Checks, then queues the kernel on the calling thread's current stream (`compute_stream`).
    pub(crate) fn launch(&self, ctx: &CudaContext) -> Result<()> {
        self.check()?;
        let family = family_of(self.kernel).expect("checked");
        let f = ctx.function(family, self.kernel)?;
        let c = &self.config;
        ctx.bind()?;
        let mut values = self.args.clone();
        let mut ptrs = param_pointers(&mut values);
        // SAFETY: the argument list matches the kernel's parameters (checked above against the
        // ABI table, which the kernels crate checks against the PTX); pointers come from live
        // device buffers whose frees are ordered after this launch on the same stream.
        unsafe {
            result::launch_kernel(
                f,
                (c.grid[0], c.grid[1], c.grid[2]),
                (c.block[0], c.block[1], c.block[2]),
                c.shared_mem_bytes,
                ctx.compute_stream(),
                &mut ptrs,
            )
        }
        .map_err(|e| driver_err(ctx.ordinal(), &format!("launching {}", self.kernel), e))
    }

    /// Checks, then runs the call to completion on the host simulator
    /// (`recycle_kernels::sim`), its pointer arguments being addresses of `SimBuffer`s: the
    /// launchers' plans and the kernels' source, run on CPU threads, in tests without a GPU.
    ///
    /// # Safety
    ///
    /// Every pointer argument must be null where the kernel accepts it, or the address of a
    /// live host buffer large enough for what the kernel does with this shape.
    #[cfg(test)]
    pub(crate) unsafe fn run_on_host_sim(&self, sim: &recycle_kernels::sim::HostSim) -> Result<()> {
        self.check()?;
        let mut values = self.args.clone();
        let mut ptrs = param_pointers(&mut values);
        sim.launch(self.kernel, &self.config, &mut ptrs)
            .map_err(|e| Error::invalid("kernel simulator", e.to_string()))
    }
}

/// `cuLaunchKernel`'s parameter array: one pointer per argument, to its value. The values must
/// not move until the launch call has returned.
fn param_pointers(values: &mut [Arg]) -> Vec<*mut c_void> {
    values
        .iter_mut()
        .map(|a| match a {
            Arg::Ptr(v) | Arg::U64(v) => v as *mut u64 as *mut c_void,
            Arg::U32(v) => v as *mut u32 as *mut c_void,
            Arg::I32(v) => v as *mut i32 as *mut c_void,
            Arg::F32(v) => v as *mut f32 as *mut c_void,
            Arg::Teachers(v) => v as *mut TeacherLogits as *mut c_void,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use recycle_kernels::launch;

    #[test]
    fn calls_are_checked_against_the_abi() {
        let cfg = launch::elementwise(10).unwrap();
        let ok = KernelCall::new(
            "add_f32",
            cfg,
            vec![Arg::Ptr(1), Arg::Ptr(2), Arg::Ptr(3), Arg::U64(10)],
        );
        ok.check().unwrap();
        let short = KernelCall::new("add_f32", cfg, vec![Arg::Ptr(1), Arg::Ptr(2), Arg::U64(3)]);
        let e = short.check().unwrap_err().to_string();
        assert!(e.contains("3 arguments given, the kernel takes 4"), "{e}");
        let wrong = KernelCall::new(
            "scale_f32",
            cfg,
            vec![Arg::Ptr(1), Arg::Ptr(2), Arg::U64(3), Arg::U32(1)],
        );
        let e = wrong.check().unwrap_err().to_string();
        assert!(e.contains("argument 3 (`s`) is f32, given u32"), "{e}");
        let unknown = KernelCall::new("conv2d_f32", cfg, vec![]);
        assert!(unknown.check().is_err());
        assert_eq!(family_of("kd_loss_reduce"), Some("kd_loss"));
        assert_eq!(family_of("relu_fwd_bf16"), Some("elementwise"));
        assert!(Arg::u32("k", "rows", 1 << 33).is_err());
    }
}
