//! What the generated launchers ([`crate::launchers`]) build: a [`KernelCall`] — kernel, family,
//! launch shape and the argument values, typed as the `.cu` signature declares them — and the
//! types their parameters take ([`Ptr`], [`Float`]). A call is data until it is sent: the
//! engine sends it to the driver (`cuLaunchKernel`), the tests to the host simulator; both
//! take the same parameter array ([`KernelCall::with_params`]).

use std::ffi::c_void;
use std::fmt;
use std::marker::PhantomData;

use crate::launch::LaunchConfig;
pub use crate::launch::ShapeError;
use crate::launchers::TeacherLogits;

/// A device pointer to `T` values (`CUdeviceptr`; 0 is a null pointer, which only the
/// parameters a kernel's file calls nullable accept).
pub struct Ptr<T> {
    addr: u64,
    _t: PhantomData<fn() -> T>,
}

impl<T> Ptr<T> {
    pub const fn new(addr: u64) -> Self {
        Ptr {
            addr,
            _t: PhantomData,
        }
    }

    pub const fn null() -> Self {
        Ptr::new(0)
    }

    pub const fn addr(&self) -> u64 {
        self.addr
    }
}

impl<T> Clone for Ptr<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Ptr<T> {}

impl<T> fmt::Debug for Ptr<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ptr({:#x})", self.addr)
    }
}

impl<T> PartialEq for Ptr<T> {
    fn eq(&self, other: &Self) -> bool {
        self.addr == other.addr
    }
}

/// A storage type of activations, the `T` of a kernel family's `(float, f32)` / `(bf16, bf16)`
/// instantiations: picks the kernel of a generic launcher.
pub trait Float: Copy + 'static {
    /// The f32 kernel or the bf16 one.
    fn pick(f32_kernel: &'static str, bf16_kernel: &'static str) -> &'static str;
}

impl Float for f32 {
    fn pick(f32_kernel: &'static str, _: &'static str) -> &'static str {
        f32_kernel
    }
}

impl Float for half::bf16 {
    fn pick(_: &'static str, bf16_kernel: &'static str) -> &'static str {
        bf16_kernel
    }
}

/// One argument value, as the kernel's parameter stores it (pointers are `U64`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    U64(u64),
    U32(u32),
    I32(i32),
    F32(f32),
    Teachers(TeacherLogits),
}

/// A kernel name that a by-name launch (`launchers::*_call`) does not dispatch over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKernel {
    pub kernel: String,
    /// The macro and file whose kernels the launch takes.
    pub family: &'static str,
}

impl fmt::Display for UnknownKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is not one of the {} kernels",
            self.kernel, self.family
        )
    }
}

impl std::error::Error for UnknownKernel {}

/// A kernel's parameters as its `.cu` file declares them: `(name, C type)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature {
    pub kernel: &'static str,
    pub family: &'static str,
    pub params: &'static [(&'static str, &'static str)],
}

impl Signature {
    /// The signature of `kernel`, if it is a kernel of this crate.
    pub fn of(kernel: &str) -> Option<&'static Signature> {
        crate::launchers::SIGNATURES
            .iter()
            .find(|s| s.kernel == kernel)
    }
}

/// One kernel launch, not yet sent: built by a generated launcher, so its arguments match the
/// kernel's parameters in number, order and type.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelCall {
    pub kernel: &'static str,
    pub family: &'static str,
    pub config: LaunchConfig,
    pub args: Vec<Value>,
}

impl KernelCall {
    /// For the generated launchers.
    pub fn new(
        kernel: &'static str,
        family: &'static str,
        config: LaunchConfig,
        args: Vec<Value>,
    ) -> Self {
        KernelCall {
            kernel,
            family,
            config,
            args,
        }
    }

    /// The launch shape's check ([`LaunchConfig::check`]).
    pub fn check(&self) -> Result<(), ShapeError> {
        self.config.check(self.kernel)
    }

    /// Calls `send` with `cuLaunchKernel`'s parameter array: one pointer per argument, to a
    /// copy of its value that lives until `send` returns.
    pub fn with_params<R>(&self, send: impl FnOnce(&mut [*mut c_void]) -> R) -> R {
        let mut values = self.args.clone();
        let mut ptrs: Vec<*mut c_void> = values
            .iter_mut()
            .map(|a| match a {
                Value::U64(v) => v as *mut u64 as *mut c_void,
                Value::U32(v) => v as *mut u32 as *mut c_void,
                Value::I32(v) => v as *mut i32 as *mut c_void,
                Value::F32(v) => v as *mut f32 as *mut c_void,
                Value::Teachers(v) => v as *mut TeacherLogits as *mut c_void,
            })
            .collect();
        send(&mut ptrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launchers as k;

    #[test]
    fn a_generated_launcher_passes_its_arguments_in_the_kernels_order() {
        let cfg = crate::launch::elementwise(10).unwrap();
        let c = k::scale::<half::bf16>(cfg, Ptr::new(1), Ptr::new(2), 10, 0.5);
        assert_eq!(c.kernel, "scale_bf16");
        assert_eq!(c.family, "elementwise");
        assert_eq!(
            c.args,
            [
                Value::U64(1),
                Value::U64(2),
                Value::U64(10),
                Value::F32(0.5)
            ]
        );
        c.check().unwrap();
        let sig = Signature::of("scale_bf16").unwrap();
        assert_eq!(sig.params[0], ("x", "const bf16*"));
        assert_eq!(
            Signature::of("kd_loss_kl_bf16_bf16").unwrap().params[2],
            ("teachers", "TeacherLogits")
        );
        assert!(Signature::of("add_f16").is_none());
        let mut bad = c.clone();
        bad.config.block = [2048, 1, 1];
        assert!(bad.check().unwrap_err().0.contains("2048 threads"));
        c.with_params(|p| {
            assert_eq!(p.len(), 4);
            // SAFETY: the fourth parameter is the f32 scale.
            assert_eq!(unsafe { *(p[3] as *const f32) }, 0.5);
        });
    }

    #[test]
    fn every_kernel_has_one_signature_in_its_family() {
        let mut seen = std::collections::HashSet::new();
        for (family, kernels) in crate::launchers::FAMILIES {
            for kernel in *kernels {
                assert!(seen.insert(*kernel), "{kernel} is listed twice");
                assert_eq!(Signature::of(kernel).unwrap().family, *family);
            }
        }
        assert_eq!(seen.len(), crate::launchers::SIGNATURES.len());
    }
}
