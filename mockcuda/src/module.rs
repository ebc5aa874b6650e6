//! Modules and launches: `cuModuleLoadData` keeps the engine's fatbin and the kernel names it
//! holds, `cuModuleGetFunction` resolves a name, and `cuLaunchKernel` copies the parameter
//! values, translates the device pointers among them to the kernel view, records what the
//! kernel reads and writes, and runs it on the stream's worker through the kernel simulator.
//!
//! Which parameters are pointers, and which pointers are read only (`const T*`), comes from
//! the kernels' signatures as `recycle_kernels` read them from the `.cu` files. Each pointer
//! stands for the whole allocation it points into (a sound, conservative range).

// The entry points' safety contracts are CUDA's documented ones.
#![allow(clippy::missing_safety_doc)]

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::{Mutex, OnceLock};

use recycle_kernels::call::Signature;
use recycle_kernels::launch::LaunchConfig;
use recycle_kernels::launchers::TeacherLogits;
use recycle_kernels::sim::HostSim;

use crate::driver::{
    fail, ready, CUresult, INVALID_HANDLE, INVALID_IMAGE, INVALID_VALUE, NOT_FOUND, SUCCESS,
};
use crate::error::{unimplemented, MockError};
use crate::memory;
use crate::stream::{self, Access};

/// One kernel parameter as the launch handles it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// A device pointer; `true` when the kernel only reads through it.
    Ptr(bool),
    /// A plain value of this many bytes.
    Value(usize),
    /// `TeacherLogits`: device pointers by value, read only.
    Teachers,
}

impl Param {
    fn size(self) -> usize {
        match self {
            Param::Ptr(_) => 8,
            Param::Value(n) => n,
            Param::Teachers => std::mem::size_of::<TeacherLogits>(),
        }
    }
}

/// The parameters of `kernel`, if the kernels crate knows it.
pub fn params(kernel: &str) -> Option<Vec<Param>> {
    Signature::of(kernel)?
        .params
        .iter()
        .map(|(_, ty)| match *ty {
            t if t.ends_with('*') => Some(Param::Ptr(t.starts_with("const "))),
            "uint64_t" => Some(Param::Value(8)),
            "uint32_t" | "int32_t" | "int" | "float" => Some(Param::Value(4)),
            "TeacherLogits" => Some(Param::Teachers),
            _ => None,
        })
        .collect()
}

/// A loaded module: the kernels its image holds.
struct Module {
    kernels: Vec<String>,
}

/// A function handle: the kernel's name and parameters.
pub struct Function {
    pub name: String,
    pub params: Vec<Param>,
}

fn modules() -> std::sync::MutexGuard<'static, HashMap<usize, Module>> {
    static M: OnceLock<Mutex<HashMap<usize, Module>>> = OnceLock::new();
    M.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn functions() -> std::sync::MutexGuard<'static, HashMap<usize, &'static Function>> {
    static F: OnceLock<Mutex<HashMap<usize, &'static Function>>> = OnceLock::new();
    F.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// The kernel names in a fatbin image (its sm_90 entry, else its PTX).
fn image_kernels(image: *const c_void) -> Result<Vec<String>, MockError> {
    use recycle_kernels::fatbin;
    // A fatbin's header: magic, version, header size, then the size of what follows.
    // SAFETY: the caller passes a fatbin image; its header says how long it is.
    let head = unsafe { std::slice::from_raw_parts(image as *const u8, 16) };
    if !fatbin::is_fatbin(head) {
        return Err(MockError(
            "cuModuleLoadData: the image is not a fatbin (the mock loads the engine's fatbins only)"
                .into(),
        ));
    }
    let header = u16::from_le_bytes([head[6], head[7]]) as usize;
    let body = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default()) as usize;
    // SAFETY: the header's own sizes.
    let data = unsafe { std::slice::from_raw_parts(image as *const u8, header + body) };
    let entries = fatbin::entries(data).map_err(|e| MockError(format!("cuModuleLoadData: {e}")))?;
    let entry = fatbin::select(&entries, 90)
        .ok_or_else(|| MockError("cuModuleLoadData: the fatbin has nothing for sm_90".into()))?;
    fatbin::kernel_names(entry).map_err(|e| MockError(format!("cuModuleLoadData: {e}")))
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(
    module: *mut *mut c_void,
    image: *const c_void,
) -> CUresult {
    if let Err(c) = ready("cuModuleLoadData") {
        return c;
    }
    if module.is_null() || image.is_null() {
        return fail(
            INVALID_VALUE,
            MockError("cuModuleLoadData: a null pointer".into()),
        );
    }
    let kernels = match image_kernels(image) {
        Ok(k) => k,
        Err(e) => return fail(INVALID_IMAGE, e),
    };
    let handle = Box::into_raw(Box::new(0u8)) as *mut c_void;
    modules().insert(handle as usize, Module { kernels });
    *module = handle;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleUnload(module: *mut c_void) -> CUresult {
    if let Err(c) = ready("cuModuleUnload") {
        return c;
    }
    if modules().remove(&(module as usize)).is_none() {
        return fail(
            INVALID_HANDLE,
            MockError(format!("cuModuleUnload: {module:?} is not a module")),
        );
    }
    drop(Box::from_raw(module as *mut u8));
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(
    f: *mut *mut c_void,
    module: *mut c_void,
    name: *const c_char,
) -> CUresult {
    if let Err(c) = ready("cuModuleGetFunction") {
        return c;
    }
    if f.is_null() || name.is_null() {
        return fail(
            INVALID_VALUE,
            MockError("cuModuleGetFunction: a null pointer".into()),
        );
    }
    let name = CStr::from_ptr(name).to_string_lossy().into_owned();
    let found = modules()
        .get(&(module as usize))
        .map(|m| m.kernels.contains(&name));
    match found {
        None => {
            return fail(
                INVALID_HANDLE,
                MockError(format!(
                    "cuModuleGetFunction({name}): {module:?} is not a module"
                )),
            )
        }
        Some(false) => {
            return fail(
                NOT_FOUND,
                MockError(format!(
                    "cuModuleGetFunction: the module has no kernel {name}"
                )),
            )
        }
        Some(true) => {}
    }
    let Some(params) = params(&name) else {
        return fail(
            NOT_FOUND,
            MockError(format!(
                "cuModuleGetFunction: {name} has no parameter list in the kernels' abi"
            )),
        );
    };
    let func: &'static Function = Box::leak(Box::new(Function { name, params }));
    let handle = func as *const Function as *mut c_void;
    functions().insert(handle as usize, func);
    *f = handle;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetAttribute(
    v: *mut c_int,
    attr: c_int,
    f: *mut c_void,
) -> CUresult {
    if let Err(c) = ready("cuFuncGetAttribute") {
        return c;
    }
    if !functions().contains_key(&(f as usize)) || v.is_null() {
        return fail(
            INVALID_HANDLE,
            MockError(format!("cuFuncGetAttribute: {f:?} is not a function")),
        );
    }
    *v = match attr {
        0 => 1024,      // MAX_THREADS_PER_BLOCK
        1 => 0,         // SHARED_SIZE_BYTES (static shared memory is not reported)
        2 => 0,         // CONST_SIZE_BYTES
        3 => 0,         // LOCAL_SIZE_BYTES
        4 => 32,        // NUM_REGS
        5 => 90,        // PTX_VERSION
        6 => 90,        // BINARY_VERSION
        8 => 48 * 1024, // MAX_DYNAMIC_SHARED_SIZE_BYTES
        _ => unimplemented("cuFuncGetAttribute", &format!("attribute {attr}")),
    };
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncSetAttribute(f: *mut c_void, attr: c_int, value: c_int) -> CUresult {
    if let Err(c) = ready("cuFuncSetAttribute") {
        return c;
    }
    if !functions().contains_key(&(f as usize)) {
        return fail(
            INVALID_HANDLE,
            MockError(format!("cuFuncSetAttribute: {f:?} is not a function")),
        );
    }
    match attr {
        // MAX_DYNAMIC_SHARED_SIZE_BYTES up to the sm_90 opt-in limit.
        8 if (0..=227 * 1024).contains(&value) => SUCCESS,
        _ => unimplemented("cuFuncSetAttribute", &format!("attribute {attr} = {value}")),
    }
}

/// A pointer parameter's value translated to the kernel view, with the access it makes.
fn translate(ptr: u64, read_only: bool, what: &str) -> Result<(u64, Option<Access>), MockError> {
    if ptr == 0 {
        return Ok((0, None));
    }
    if !memory::in_device_range(ptr) {
        return Err(MockError(format!(
            "{what} is {ptr:#x}, not a device address (a host pointer passed to a kernel?)"
        )));
    }
    let a = memory::allocation_of(ptr)
        .ok_or_else(|| MockError(format!("{what} is {ptr:#x}, in no live device allocation")))?;
    let host = memory::host_range(a.ptr, a.len, what)? as u64;
    let access = if read_only {
        Access::Read(a.ptr, a.len)
    } else {
        Access::Write(a.ptr, a.len)
    };
    Ok((host + (ptr - a.ptr), Some(access)))
}

/// The parameter values of a launch, copied, with device pointers translated.
fn marshal(
    f: &Function,
    params: *mut *mut c_void,
) -> Result<(Vec<Vec<u8>>, Vec<Access>), MockError> {
    if params.is_null() && !f.params.is_empty() {
        return Err(MockError(format!(
            "cuLaunchKernel({}): no kernelParams",
            f.name
        )));
    }
    let mut values = Vec::with_capacity(f.params.len());
    let mut accesses = Vec::new();
    for (i, p) in f.params.iter().enumerate() {
        // SAFETY: cuLaunchKernel's contract: one pointer per parameter, to its value.
        let bytes = unsafe {
            let v = *params.add(i);
            if v.is_null() {
                return Err(MockError(format!(
                    "cuLaunchKernel({}): parameter {i} is null",
                    f.name
                )));
            }
            std::slice::from_raw_parts(v as *const u8, p.size()).to_vec()
        };
        let what = format!("cuLaunchKernel({}): parameter {i}", f.name);
        let value = match *p {
            Param::Ptr(ro) => {
                let v = u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default());
                let (t, a) = translate(v, ro, &what)?;
                accesses.extend(a);
                t.to_le_bytes().to_vec()
            }
            Param::Teachers => {
                let mut out = Vec::with_capacity(bytes.len());
                for (j, c) in bytes.chunks_exact(8).enumerate() {
                    let v = u64::from_le_bytes(c.try_into().unwrap_or_default());
                    let (t, a) = translate(v, true, &format!("{what} (teacher {j})"))?;
                    accesses.extend(a);
                    out.extend_from_slice(&t.to_le_bytes());
                }
                out
            }
            Param::Value(_) => bytes,
        };
        values.push(value);
    }
    Ok((values, accesses))
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel(
    f: *mut c_void,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared: c_uint,
    s: *mut c_void,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    if let Err(c) = ready("cuLaunchKernel") {
        return c;
    }
    let Some(func) = functions().get(&(f as usize)).copied() else {
        return fail(
            INVALID_HANDLE,
            MockError(format!("cuLaunchKernel: {f:?} is not a function")),
        );
    };
    if !extra.is_null() {
        unimplemented(
            "cuLaunchKernel",
            &format!("{}: the `extra` parameter buffer", func.name),
        );
    }
    let config = LaunchConfig {
        grid: [gx, gy, gz],
        block: [bx, by, bz],
        shared_mem_bytes: shared,
    };
    if let Err(e) = config.check(&func.name) {
        return fail(INVALID_VALUE, MockError(format!("cuLaunchKernel: {e}")));
    }
    let (values, accesses) = match marshal(func, params) {
        Ok(v) => v,
        Err(e) => return fail(INVALID_VALUE, e),
    };
    let name = format!(
        "kernel {} (grid {:?}, block {:?})",
        func.name, config.grid, config.block
    );
    let kernel = func.name.clone();
    let r = stream::enqueue(
        s,
        name,
        accesses,
        Box::new(move || {
            let sim = HostSim::get().map_err(|e| MockError(e.to_string()))?;
            let mut values = values;
            let mut ptrs: Vec<*mut c_void> = values
                .iter_mut()
                .map(|v| v.as_mut_ptr() as *mut c_void)
                .collect();
            // SAFETY: the values match the kernel's parameter list (from its abi); pointers
            // are translated into live allocations the detector has recorded.
            unsafe { sim.launch(&kernel, &config, &mut ptrs) }
                .map_err(|e| MockError(format!("{kernel}: {e}")))
        }),
    );
    match r {
        Ok(()) => SUCCESS,
        Err(e) => fail(INVALID_VALUE, e),
    }
}
