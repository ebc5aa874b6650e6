//! Finding the driver, the GPU and a kernel image for it, without letting cudarc panic.
//!
//! cudarc (with `dynamic-loading`) opens `libcuda.so` the first time a driver function is
//! called and panics when it cannot; its `is_culib_present` says only yes or no. So the
//! library is opened here first, with `libloading`, keeping the loader's message for the
//! error; cudarc is touched only once that succeeded. Then, in order: `cuInit`, the driver's
//! CUDA version, the number of GPUs, the GPU's architecture against the embedded fatbins.

use std::ffi::c_int;
use std::sync::OnceLock;

use cudarc::driver::{result, sys};
use recycle_kernels::fatbin::{self, EntryKind};

/// The driver library the NVIDIA driver installs on Linux (what cudarc also finds).
pub(crate) const DRIVER_LIBRARY: &str = "libcuda.so.1";

/// The oldest driver whose CUDA version runs the cubins of a 13.x toolkit (CUDA 13.0, driver
/// 580): cubins keep minor-version compatibility within a major version, PTX does not.
pub(crate) const MIN_DRIVER_VERSION: u32 = 13_000;

/// What `probe` found out about a GPU.
#[derive(Debug, Clone)]
pub(crate) struct Probe {
    pub name: String,
    pub compute_capability: (u32, u32),
    pub driver_version: u32,
    pub total_memory: u64,
    pub kernel_image: String,
}

/// Opens the driver library once per process: `Ok` when cudarc will find it too, else the
/// loader's message.
pub(crate) fn driver_library() -> Result<(), String> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            // SAFETY: loading libcuda runs its initialisers; that is what using the driver
            // means, and nothing else in the process depends on it not being loaded.
            match unsafe { libloading::Library::new(DRIVER_LIBRARY) } {
                Err(e) => {
                    // libloading keeps the loader's own words (dlerror) in the source.
                    let mut msg = e.to_string();
                    let mut source = std::error::Error::source(&e);
                    while let Some(s) = source {
                        msg = format!("{msg}: {s}");
                        source = s.source();
                    }
                    Err(msg)
                }
                Ok(lib) => {
                    // Keep it mapped for the life of the process, as cudarc does with its own
                    // handle: unloading a driver while contexts exist is never wanted.
                    std::mem::forget(lib);
                    // SAFETY: only tries to open the library under cudarc's candidate names.
                    if unsafe { sys::is_culib_present() } {
                        Ok(())
                    } else {
                        Err(format!(
                            "{DRIVER_LIBRARY} opened, but not under the names cudarc looks for"
                        ))
                    }
                }
            }
        })
        .clone()
}

pub(crate) fn no_driver_message(ordinal: usize, loader: &str) -> String {
    format!(
        "cuda:{ordinal}: no NVIDIA driver found ({DRIVER_LIBRARY} not loadable: {loader}); \
         install the NVIDIA driver (CUDA 13.0 or newer: driver 580+) and make sure \
         {DRIVER_LIBRARY} is on the loader's path (ldconfig or LD_LIBRARY_PATH), or use the CPU \
         (`cpu`)"
    )
}

pub(crate) fn version_string(v: u32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

pub(crate) fn driver_too_old_message(ordinal: usize, version: u32) -> String {
    format!(
        "cuda:{ordinal}: the NVIDIA driver supports CUDA {}, but recycle's kernels are cubins \
         built by CUDA 13 (nvcc {}) and need a driver for CUDA {} or newer (580+); update the \
         driver, or use the CPU (`cpu`)",
        version_string(version),
        recycle_kernels::NVCC_VERSION,
        version_string(MIN_DRIVER_VERSION)
    )
}

pub(crate) fn no_such_device_message(ordinal: usize, count: usize) -> String {
    match count {
        0 => format!("cuda:{ordinal}: the NVIDIA driver is installed but sees no GPU"),
        1 => format!("cuda:{ordinal} does not exist: this machine has one GPU, cuda:0"),
        n => format!(
            "cuda:{ordinal} does not exist: this machine has {n} GPUs, cuda:0 to cuda:{}",
            n - 1
        ),
    }
}

pub(crate) fn no_kernels_message(ordinal: usize) -> String {
    format!(
        "cuda:{ordinal}: this build has no CUDA kernels (nvcc was not found when \
         recycle-kernels was built); install nvcc (`pip install nvidia-cuda-nvcc \
         nvidia-cuda-runtime nvidia-cuda-cccl`) and rebuild (RECYCLE_REQUIRE_NVCC=1 turns a \
         missing nvcc into a build error)"
    )
}

/// Which image of `fatbin_bytes` a GPU of compute capability `sm` (e.g. 90) runs, as text
/// (`sm_90`, `compute_90 PTX (JIT)`), or the reason none does.
pub(crate) fn kernel_image(fatbin_bytes: &[u8], sm: u32) -> Result<String, String> {
    let entries = fatbin::entries(fatbin_bytes).map_err(|e| e.to_string())?;
    let available = || {
        let mut names: Vec<String> = entries
            .iter()
            .map(|e| match e.kind {
                EntryKind::Cubin => format!("sm_{}", e.arch),
                EntryKind::Ptx => format!("compute_{} PTX", e.arch),
                EntryKind::Other(k) => format!("kind {k} for {}", e.arch),
            })
            .collect();
        names.dedup();
        names.join(", ")
    };
    match fatbin::select(&entries, sm) {
        Some(e) if e.kind == EntryKind::Cubin => Ok(format!("sm_{}", e.arch)),
        Some(e) => Ok(format!("compute_{} PTX (JIT)", e.arch)),
        None => Err(format!(
            "the kernels have no image for sm_{sm} (built for {}); recycle needs an Ampere \
             (sm_80) or newer GPU",
            available()
        )),
    }
}

fn driver_error(ordinal: usize, call: &str, e: result::DriverError) -> String {
    format!("cuda:{ordinal}: {call} failed: {e}")
}

/// How many GPUs the driver shows this process (after `CUDA_VISIBLE_DEVICES`); 0 without a
/// driver.
pub(crate) fn device_count() -> usize {
    if driver_library().is_err() || result::init().is_err() {
        return 0;
    }
    result::device::get_count().map_or(0, |n| n.max(0) as usize)
}

/// Everything that must hold before a context is made on `cuda:ordinal`; the error says
/// what is missing.
pub(crate) fn probe(ordinal: usize) -> Result<Probe, String> {
    driver_library().map_err(|e| no_driver_message(ordinal, &e))?;
    if let Err(e) = result::init() {
        return Err(if e.0 == sys::cudaError_enum::CUDA_ERROR_NO_DEVICE {
            no_such_device_message(ordinal, 0)
        } else {
            driver_error(ordinal, "cuInit (starting the NVIDIA driver)", e)
        });
    }
    let mut version: c_int = 0;
    // SAFETY: writes one int.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| driver_error(ordinal, "cuDriverGetVersion", e))?;
    let version = version.max(0) as u32;
    if version < MIN_DRIVER_VERSION {
        return Err(driver_too_old_message(ordinal, version));
    }
    let count = result::device::get_count()
        .map_err(|e| driver_error(ordinal, "cuDeviceGetCount", e))?
        .max(0) as usize;
    if ordinal >= count {
        return Err(no_such_device_message(ordinal, count));
    }
    let dev = result::device::get(ordinal as c_int)
        .map_err(|e| driver_error(ordinal, "cuDeviceGet", e))?;
    let attr = |a: sys::CUdevice_attribute| {
        // SAFETY: `dev` is a valid device handle.
        unsafe { result::device::get_attribute(dev, a) }
            .map(|v| v.max(0) as u32)
            .map_err(|e| driver_error(ordinal, "cuDeviceGetAttribute", e))
    };
    let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let name =
        result::device::get_name(dev).map_err(|e| driver_error(ordinal, "cuDeviceGetName", e))?;
    // SAFETY: `dev` is a valid device handle.
    let total_memory = unsafe { result::device::total_mem(dev) }
        .map_err(|e| driver_error(ordinal, "cuDeviceTotalMem", e))? as u64;
    if !recycle_kernels::available() {
        return Err(no_kernels_message(ordinal));
    }
    let sm = major * 10 + minor;
    let kernel_image = kernel_image(recycle_kernels::ELEMENTWISE, sm)
        .map_err(|e| format!("cuda:{ordinal} is {name} (sm_{sm}): {e}"))?;
    Ok(Probe {
        name,
        compute_capability: (major, minor),
        driver_version: version,
        total_memory,
        kernel_image,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_is_missing() {
        let m = no_driver_message(0, "libcuda.so.1: cannot open shared object file");
        assert!(m.starts_with("cuda:0: no NVIDIA driver found (libcuda.so.1 not loadable:"));
        assert!(
            m.contains("cannot open shared object file") && m.contains("cpu"),
            "{m}"
        );
        let m = driver_too_old_message(0, 12_080);
        assert!(
            m.contains("supports CUDA 12.8") && m.contains("13.0 or newer"),
            "{m}"
        );
        assert_eq!(version_string(13_000), "13.0");
        assert!(no_such_device_message(2, 2).contains("cuda:0 to cuda:1"));
        assert!(no_such_device_message(1, 1).contains("one GPU"));
        assert!(no_such_device_message(0, 0).contains("sees no GPU"));
        assert!(no_kernels_message(0).contains("nvcc"));
    }

    #[test]
    fn kernel_images_for_each_architecture() {
        if !recycle_kernels::available() {
            assert!(kernel_image(recycle_kernels::ELEMENTWISE, 90).is_err());
            return;
        }
        let fb = recycle_kernels::ELEMENTWISE;
        assert_eq!(kernel_image(fb, 90).unwrap(), "sm_90");
        assert_eq!(kernel_image(fb, 80).unwrap(), "sm_80");
        assert_eq!(kernel_image(fb, 87).unwrap(), "sm_86");
        assert_eq!(kernel_image(fb, 89).unwrap(), "sm_89");
        // Blackwell: only the PTX, JIT-compiled by the driver.
        assert_eq!(kernel_image(fb, 100).unwrap(), "compute_90 PTX (JIT)");
        // Turing and older: nothing runs; the error names what there is.
        let e = kernel_image(fb, 75).unwrap_err();
        assert!(
            e.contains("sm_75") && e.contains("sm_80") && e.contains("Ampere"),
            "{e}"
        );
    }

    #[test]
    fn no_driver_here_is_an_error_not_a_panic() {
        // This machine (and CI) has no NVIDIA driver; where one exists the probe goes further.
        if driver_library().is_ok() {
            return;
        }
        let e = probe(0).unwrap_err();
        assert!(
            e.contains("no NVIDIA driver found (libcuda.so.1 not loadable"),
            "{e}"
        );
    }
}
