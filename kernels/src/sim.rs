//! The host simulator: the kernels' CUDA source, compiled by the host's C++ compiler and run on
//! the CPU, each CUDA thread a fiber (a coroutine that switches at barriers and shuffles), the
//! blocks of a launch in parallel on a pool of OS threads.
//!
//! Machines without a GPU can then run what a GPU would run: each kernel's parallel skeleton
//! (grid-stride loops, block and warp reductions through `__syncthreads` and real warp shuffles,
//! shared memory, the in-place writes), with the launch shapes of [`crate::launch`] and the
//! argument lists the engine builds, against the CPU twins. `sim/simt.hpp` says what is modelled
//! and what is not: the device's own `expf`/`logf`, its memory model and its speed are not, so a
//! GPU run is still the only check of those.
//!
//! The library is built on first use from the sources embedded in this crate (the `.cu` files,
//! `common.cuh`, `sim/*.{hpp,cpp}`) with `$CXX` (else `c++`), the CUDA headers next to the nvcc
//! that built the crate (for `cuda_bf16.h`), `-O1 -ffp-contract=off`, and cached in the system's
//! temporary directory under a hash of the sources and flags. It needs what the kernels need:
//! [`crate::available`] (nvcc was found at build time).
//!
//! Memory is host memory: a [`SimBuffer`] stands for a device allocation (256-byte aligned, as
//! `cuMemAlloc`), with guard bytes on both sides checked when it is read back, so a kernel that
//! writes past its buffer fails the test that launched it.

use std::alloc::{self, Layout};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::launch::LaunchConfig;

const COMMON_CUH: &str = include_str!("common.cuh");
const SIMT_HPP: &str = include_str!("../sim/simt.hpp");
const LAUNCH_CPP: &str = include_str!("../sim/launch.cpp");
const FIBER_HPP: &str = include_str!("../sim/fiber.hpp");

/// Kernels that test the simulator itself, in the library but no family.
const SELFTEST_CU: &str = include_str!("../sim/selftest.cu");

const CXX_FLAGS: &[&str] = &[
    "-std=c++17",
    "-O1",
    "-fPIC",
    "-pthread",
    // Round after every operation, as the CPU twins (Rust never contracts a * b + c).
    "-ffp-contract=off",
    // cuda_bf16.h and the kernels use attributes and pragmas g++ does not know.
    "-w",
];

/// Bytes of guard on each side of a [`SimBuffer`], and its alignment.
const GUARD: usize = 256;
const GUARD_BYTE: u8 = 0xa5;

/// A failure of the simulator: no toolkit, a build error, a rejected launch, a buffer overrun.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimError(pub String);

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kernel simulator: {}", self.0)
    }
}

impl std::error::Error for SimError {}

type LaunchFn = unsafe extern "C" fn(
    kernel: *const c_char,
    grid: *const u32,
    block: *const u32,
    shared_mem_bytes: u32,
    params: *mut *mut c_void,
    err: *mut c_char,
    err_len: usize,
) -> c_int;

extern "C" {
    fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn dlerror() -> *const c_char;
}

const RTLD_NOW: c_int = 2;

/// The loaded simulator library (one per process, never unloaded).
pub struct HostSim {
    launch: LaunchFn,
    library: PathBuf,
}

impl fmt::Debug for HostSim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostSim")
            .field("library", &self.library)
            .finish()
    }
}

impl HostSim {
    /// The simulator, built on first use (seconds to a minute: every family is compiled once
    /// per machine and source version, then cached). Errors name what is missing.
    pub fn get() -> Result<&'static HostSim, SimError> {
        static SIM: OnceLock<Result<HostSim, SimError>> = OnceLock::new();
        SIM.get_or_init(HostSim::load)
            .as_ref()
            .map_err(Clone::clone)
    }

    /// For tests: the simulator, or None (with a note on stderr) when this build embeds no
    /// kernels, so there is nothing to simulate. A simulator that cannot be built where the
    /// kernels were panics with the reason: that is a failure, not a skip.
    pub fn for_tests() -> Option<&'static HostSim> {
        if !crate::available() {
            eprintln!("built without nvcc: the kernel simulator checks do nothing");
            return None;
        }
        Some(HostSim::get().unwrap_or_else(|e| panic!("{e}")))
    }

    fn load() -> Result<HostSim, SimError> {
        if !crate::available() {
            return Err(SimError(
                "this build embeds no kernels (nvcc was not found when recycle-kernels was \
                 built), so there is no CUDA toolkit to take cuda_bf16.h from"
                    .into(),
            ));
        }
        let library = build_library()?;
        let path = CString::new(library.as_os_str().as_encoded_bytes())
            .map_err(|_| SimError(format!("{}: a path with a NUL byte", library.display())))?;
        // SAFETY: dlopen/dlsym/dlerror are called with NUL-terminated strings; the library's
        // static constructors only fill its kernel table.
        unsafe {
            let handle = dlopen(path.as_ptr(), RTLD_NOW);
            if handle.is_null() {
                return Err(SimError(format!(
                    "loading {}: {}",
                    library.display(),
                    last_dl_error()
                )));
            }
            let sym = dlsym(handle, c"rk_sim_launch".as_ptr());
            if sym.is_null() {
                return Err(SimError(format!(
                    "{} has no rk_sim_launch: {}",
                    library.display(),
                    last_dl_error()
                )));
            }
            Ok(HostSim {
                launch: std::mem::transmute::<*mut c_void, LaunchFn>(sym),
                library,
            })
        }
    }

    /// Runs one launch to completion, as `cuLaunchKernel(kernel, grid, block, shared memory,
    /// params)` followed by a synchronise, after the shape's check ([`LaunchConfig::check`]).
    /// Callable from any thread; launches from several threads run one at a time (each spreads
    /// its blocks over the simulator's OS threads, `RECYCLE_SIM_THREADS` of them, default the
    /// machine's cores). `params` holds one pointer per kernel parameter, to its value (a
    /// pointer parameter's value being a [`SimBuffer::ptr`]).
    ///
    /// # Safety
    ///
    /// `params` must match the kernel's parameter list (count and types; the engine checks its
    /// calls with the generated launchers, [`crate::launchers`]), and every pointer value in it must address live memory
    /// large enough for what the kernel reads and writes with that shape.
    pub unsafe fn launch(
        &self,
        kernel: &str,
        config: &LaunchConfig,
        params: &mut [*mut c_void],
    ) -> Result<(), SimError> {
        config.check(kernel).map_err(|e| SimError(e.0))?;
        let name = CString::new(kernel).map_err(|_| SimError(format!("kernel name {kernel:?}")))?;
        let mut err = vec![0 as c_char; 1024];
        let rc = (self.launch)(
            name.as_ptr(),
            config.grid.as_ptr(),
            config.block.as_ptr(),
            config.shared_mem_bytes,
            params.as_mut_ptr(),
            err.as_mut_ptr(),
            err.len(),
        );
        if rc == 0 {
            Ok(())
        } else {
            Err(SimError(
                CStr::from_ptr(err.as_ptr()).to_string_lossy().into_owned(),
            ))
        }
    }

    /// Runs one call of a generated launcher to completion (see [`HostSim::launch`]).
    ///
    /// # Safety
    ///
    /// Every pointer argument must be null where the kernel accepts it, or the address of a
    /// live buffer ([`SimBuffer::ptr`]) large enough for what the kernel does with this shape.
    pub unsafe fn run(&self, call: &crate::call::KernelCall) -> Result<(), SimError> {
        call.with_params(|params| self.launch(call.kernel, &call.config, params))
    }
}

unsafe fn last_dl_error() -> String {
    let e = dlerror();
    if e.is_null() {
        "unknown error".into()
    } else {
        CStr::from_ptr(e).to_string_lossy().into_owned()
    }
}

/// The include directory of the toolkit whose nvcc built this crate (`<toolkit>/bin/nvcc`).
fn cuda_include_dir() -> Result<PathBuf, SimError> {
    let nvcc = Path::new(crate::NVCC_PATH);
    let dir = nvcc
        .parent()
        .and_then(Path::parent)
        .map(|t| t.join("include"))
        .ok_or_else(|| SimError(format!("nvcc at {} is not in a toolkit", nvcc.display())))?;
    if !dir.join("cuda_bf16.h").is_file() {
        return Err(SimError(format!(
            "{} has no cuda_bf16.h (the CUDA headers of the nvcc that built the kernels); \
             install nvidia-cuda-runtime next to nvidia-cuda-nvcc",
            dir.display()
        )));
    }
    Ok(dir)
}

fn compiler() -> String {
    std::env::var("CXX")
        .ok()
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "c++".into())
}

/// The `extern "C" __global__` kernels of a source (the self-test's: the families' are
/// read by the build, `launchers::FAMILIES`).
fn entry_points(src: &str) -> Vec<&str> {
    src.split("extern \"C\" __global__ void")
        .skip(1)
        .filter_map(|rest| Some(rest.split('(').next()?.trim()))
        .collect()
}

/// The translation unit of one family: the CUDA model, the family's source, its kernel table.
fn family_unit(family: &str, kernels: &[&str]) -> String {
    let entries: Vec<String> = kernels
        .iter()
        .map(|k| format!("    RK_SIM_KERNEL({k}),\n"))
        .collect();
    format!(
        "#include \"simt.hpp\"\n#include \"{family}.cu\"\n\n\
         static const RkSimKernel rk_sim_kernels[] = {{\n{}}};\n\
         static const int rk_sim_registered = (rk_sim_register(rk_sim_kernels, \
         sizeof rk_sim_kernels / sizeof rk_sim_kernels[0]), 0);\n",
        entries.concat()
    )
}

fn build_library() -> Result<PathBuf, SimError> {
    let include = cuda_include_dir()?;
    let cxx = compiler();
    let mut units: Vec<(String, String)> = vec![
        ("common.cuh".into(), COMMON_CUH.into()),
        ("simt.hpp".into(), SIMT_HPP.into()),
        ("launch.cpp".into(), LAUNCH_CPP.into()),
        ("fiber.hpp".into(), FIBER_HPP.into()),
        ("selftest.cu".into(), SELFTEST_CU.into()),
        (
            "sim_selftest.cpp".into(),
            family_unit("selftest", &entry_points(SELFTEST_CU)),
        ),
    ];
    for (family, source) in crate::generated::SOURCES {
        let kernels = crate::launchers::FAMILIES
            .iter()
            .find(|(f, _)| f == family)
            .map(|(_, k)| *k)
            .ok_or_else(|| SimError(format!("family {family} is not in launchers::FAMILIES")))?;
        units.push((format!("{family}.cu"), (*source).into()));
        units.push((format!("sim_{family}.cpp"), family_unit(family, kernels)));
    }
    // FNV-1a over everything that decides the library's contents.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |b: &[u8]| {
        for &x in b {
            hash = (hash ^ x as u64).wrapping_mul(0x100_0000_01b3);
        }
        hash = (hash ^ 0xff).wrapping_mul(0x100_0000_01b3);
    };
    for (name, text) in &units {
        feed(name.as_bytes());
        feed(text.as_bytes());
    }
    feed(cxx.as_bytes());
    feed(include.as_os_str().as_encoded_bytes());
    for f in CXX_FLAGS {
        feed(f.as_bytes());
    }
    let cache = std::env::temp_dir().join(format!("recycle-kernel-sim-{hash:016x}"));
    let library = cache.join("libkernelsim.so");
    if library.is_file() {
        return Ok(library);
    }

    // Build in a directory of our own, then rename it into place: a concurrent build (another
    // test process) either wins the rename or finds the finished library.
    let work = std::env::temp_dir().join(format!(
        "recycle-kernel-sim-{hash:016x}.partial-{}",
        std::process::id()
    ));
    let io =
        |what: &str, p: &Path, e: std::io::Error| SimError(format!("{what} {}: {e}", p.display()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| io("creating", &work, e))?;
    for (name, text) in &units {
        let p = work.join(name);
        std::fs::write(&p, text).map_err(|e| io("writing", &p, e))?;
    }
    let cpps: Vec<&String> = units
        .iter()
        .map(|(n, _)| n)
        .filter(|n| n.ends_with(".cpp"))
        .collect();
    // One compiler per unit, all at once (the units are independent), then one link.
    let mut jobs = Vec::new();
    for cpp in &cpps {
        let obj = work.join(format!("{cpp}.o"));
        let child = Command::new(&cxx)
            .args(CXX_FLAGS)
            .arg("-I")
            .arg(&include)
            .arg("-I")
            .arg(&work)
            .arg("-c")
            .arg(work.join(cpp))
            .arg("-o")
            .arg(&obj)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| {
                SimError(format!(
                    "running the C++ compiler `{cxx}` (set CXX to another): {e}"
                ))
            })?;
        jobs.push((cpp, obj, child));
    }
    let mut objects = Vec::new();
    let mut failures = Vec::new();
    for (cpp, obj, child) in jobs {
        let out = child
            .wait_with_output()
            .map_err(|e| SimError(format!("waiting for `{cxx}` on {cpp}: {e}")))?;
        if !out.status.success() {
            failures.push(format!("{cpp}:\n{}", String::from_utf8_lossy(&out.stderr)));
        }
        objects.push(obj);
    }
    if !failures.is_empty() {
        return Err(SimError(format!(
            "compiling the kernels for the host failed ({cxx}, in {}):\n{}",
            work.display(),
            failures.join("\n")
        )));
    }
    let so = work.join("libkernelsim.so");
    let out = Command::new(&cxx)
        .args(["-shared", "-pthread", "-o"])
        .arg(&so)
        .args(&objects)
        .output()
        .map_err(|e| SimError(format!("running `{cxx}` to link: {e}")))?;
    if !out.status.success() {
        return Err(SimError(format!(
            "linking {}: {}",
            so.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    match std::fs::rename(&work, &cache) {
        Ok(()) => {}
        // Another process finished first: use its library, drop ours.
        Err(_) if library.is_file() => {
            let _ = std::fs::remove_dir_all(&work);
        }
        Err(e) => return Err(io("renaming into place", &cache, e)),
    }
    Ok(library)
}

/// A plain value a [`SimBuffer`] can hold (its bytes are its value).
pub trait SimElement: Copy + 'static {}
impl SimElement for u8 {}
impl SimElement for u16 {}
impl SimElement for i32 {}
impl SimElement for u32 {}
impl SimElement for u64 {}
impl SimElement for f32 {}
impl SimElement for f64 {}

/// Host memory standing for one device allocation: `len` bytes, 256-byte aligned, between two
/// guards of 256 bytes that a kernel must not touch.
pub struct SimBuffer {
    base: *mut u8,
    len: usize,
}

// SAFETY: the buffer owns its allocation; nothing else holds the pointer except kernels run
// through `HostSim::launch`, which returns only when they are done.
unsafe impl Send for SimBuffer {}
unsafe impl Sync for SimBuffer {}

impl SimBuffer {
    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len + 2 * GUARD, GUARD).expect("a buffer size that fits memory")
    }

    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> SimBuffer {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size (two guards).
        let base = unsafe { alloc::alloc_zeroed(layout) };
        if base.is_null() {
            alloc::handle_alloc_error(layout);
        }
        // SAFETY: both guards are inside the allocation.
        unsafe {
            std::ptr::write_bytes(base, GUARD_BYTE, GUARD);
            std::ptr::write_bytes(base.add(GUARD + len), GUARD_BYTE, GUARD);
        }
        SimBuffer { base, len }
    }

    /// A buffer holding `values`.
    pub fn from_slice<T: SimElement>(values: &[T]) -> SimBuffer {
        let bytes = std::mem::size_of_val(values);
        let b = SimBuffer::zeroed(bytes);
        // SAFETY: the data region holds `bytes` bytes; T is plain data.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr() as *const u8, b.data(), bytes) };
        b
    }

    /// Zeroed room for `n` values of `T`.
    pub fn zeros<T: SimElement>(n: usize) -> SimBuffer {
        SimBuffer::zeroed(n * std::mem::size_of::<T>())
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: GUARD bytes into an allocation of len + 2 * GUARD.
        unsafe { self.base.add(GUARD) }
    }

    /// The address kernels see (a `CUdeviceptr` in the engine's argument lists).
    pub fn ptr(&self) -> u64 {
        self.data() as u64
    }

    /// Bytes of data.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Errors when a kernel wrote into a guard (past either end of the buffer).
    pub fn check_guards(&self) -> Result<(), SimError> {
        // SAFETY: both guards are inside the allocation.
        let (before, after) = unsafe {
            (
                std::slice::from_raw_parts(self.base, GUARD),
                std::slice::from_raw_parts(self.data().add(self.len), GUARD),
            )
        };
        for (side, guard) in [("before", before), ("after", after)] {
            if let Some(i) = guard.iter().position(|&b| b != GUARD_BYTE) {
                let off = if side == "before" { GUARD - i } else { i + 1 };
                return Err(SimError(format!(
                    "a kernel wrote {off} byte(s) {side} a buffer of {} bytes",
                    self.len
                )));
            }
        }
        Ok(())
    }

    /// The contents as values of `T`, after checking the guards.
    pub fn read<T: SimElement>(&self) -> Result<Vec<T>, SimError> {
        self.check_guards()?;
        let size = std::mem::size_of::<T>();
        if !self.len.is_multiple_of(size) {
            return Err(SimError(format!(
                "a buffer of {} bytes read as {}-byte values",
                self.len, size
            )));
        }
        let mut out = Vec::<T>::with_capacity(self.len / size);
        // SAFETY: copies len bytes into room for len / size values of plain data.
        unsafe {
            std::ptr::copy_nonoverlapping(self.data(), out.as_mut_ptr() as *mut u8, self.len);
            out.set_len(self.len / size);
        }
        Ok(out)
    }
}

impl Drop for SimBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { alloc::dealloc(self.base, Self::layout(self.len)) }
    }
}

impl fmt::Debug for SimBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SimBuffer({} bytes at {:#x})", self.len, self.ptr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_catch_writes_past_either_end() {
        let b = SimBuffer::from_slice(&[1.0f32, 2.0, 3.0]);
        assert_eq!(b.ptr() % GUARD as u64, 0, "aligned as cuMemAlloc");
        assert_eq!(b.read::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
        // SAFETY: inside the allocation (the guard after the data).
        unsafe { *b.data().add(12) = 0 };
        let e = b.check_guards().unwrap_err().to_string();
        assert!(e.contains("1 byte(s) after a buffer of 12 bytes"), "{e}");
        let c = SimBuffer::zeros::<u32>(2);
        // SAFETY: inside the allocation (the guard before the data).
        unsafe { *c.data().sub(4) = 0 };
        let e = c.read::<u32>().unwrap_err().to_string();
        assert!(e.contains("4 byte(s) before"), "{e}");
        assert!(SimBuffer::zeros::<u8>(3).read::<u16>().is_err());
    }
}
