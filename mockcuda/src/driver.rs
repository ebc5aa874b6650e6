//! The driver API's entry points (`cu*`), exported under cudarc's exact symbol names: device
//! and context queries, memory, streams, events. Modules and launches are in `module`.
//!
//! Every call returns a `CUresult`; a failure prints what went wrong (the call, the value) to
//! stderr first, since a code alone says little. An error of queued work is sticky: every later
//! call returns `CUDA_ERROR_LAUNCH_FAILED`, as after a failed kernel on a GPU.

// The entry points' safety contracts are CUDA's documented ones (valid handles, output
// pointers and sizes); the mock checks what it can and reports the rest.
#![allow(clippy::missing_safety_doc)]

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::error::{unimplemented, MockError};
use crate::memory::{self, DevicePtr};
use crate::stream::{self, Access, Event};

pub type CUresult = c_uint;
pub const SUCCESS: CUresult = 0;
pub const INVALID_VALUE: CUresult = 1;
pub const OUT_OF_MEMORY: CUresult = 2;
pub const NOT_INITIALIZED: CUresult = 3;
pub const INVALID_DEVICE: CUresult = 101;
pub const INVALID_IMAGE: CUresult = 200;
pub const INVALID_CONTEXT: CUresult = 201;
pub const INVALID_HANDLE: CUresult = 400;
pub const NOT_FOUND: CUresult = 500;
pub const NOT_READY: CUresult = 600;
pub const LAUNCH_FAILED: CUresult = 719;

/// The name a run on the mock shows (the binary tells the mock from a GPU by it).
pub const DEVICE_NAME: &str = "Recycle mock CUDA device (CPU)";
/// What `cuDriverGetVersion` reports (CUDA 13.0).
pub const DRIVER_VERSION: c_int = 13000;

static INITIALISED: AtomicBool = AtomicBool::new(false);

/// The primary context's handle: the address of a static, so never null and never freed.
static PRIMARY: u8 = 0;
fn primary() -> *mut c_void {
    &PRIMARY as *const u8 as *mut c_void
}

thread_local! {
    static CURRENT: Cell<*mut c_void> = const { Cell::new(std::ptr::null_mut()) };
}

/// Prints `e` and returns `code`.
pub(crate) fn fail(code: CUresult, e: MockError) -> CUresult {
    eprintln!("mockcuda: {e}");
    code
}

/// The code of a call's result: `code` for its error.
pub(crate) fn result(r: Result<(), MockError>, code: CUresult) -> CUresult {
    match r {
        Ok(()) => SUCCESS,
        Err(e) => fail(code, e),
    }
}

/// Checks the call may run: the driver is initialised and no sticky error is pending.
pub(crate) fn ready(call: &str) -> Result<(), CUresult> {
    if !INITIALISED.load(Ordering::SeqCst) {
        return Err(fail(
            NOT_INITIALIZED,
            MockError(format!("{call}: cuInit has not been called")),
        ));
    }
    if let Some(e) = stream::sticky() {
        return Err(fail(
            LAUNCH_FAILED,
            MockError(format!("{call}: an earlier error is sticky: {e}")),
        ));
    }
    Ok(())
}

macro_rules! ready {
    ($call:expr) => {
        if let Err(code) = ready($call) {
            return code;
        }
    };
}

unsafe fn out<T>(p: *mut T, v: T, call: &str) -> CUresult {
    if p.is_null() {
        return fail(
            INVALID_VALUE,
            MockError(format!("{call}: a null output pointer")),
        );
    }
    p.write(v);
    SUCCESS
}

fn device_ok(dev: c_int, call: &str) -> Result<(), CUresult> {
    if dev == 0 {
        Ok(())
    } else {
        Err(fail(
            INVALID_DEVICE,
            MockError(format!("{call}: device {dev} (the mock has one device, 0)")),
        ))
    }
}

macro_rules! device_ok {
    ($dev:expr, $call:expr) => {
        if let Err(code) = device_ok($dev, $call) {
            return code;
        }
    };
}

// ---- Initialisation, version, errors ----

#[no_mangle]
pub extern "C" fn cuInit(flags: c_uint) -> CUresult {
    if flags != 0 {
        return fail(
            INVALID_VALUE,
            MockError(format!("cuInit: flags {flags} (must be 0)")),
        );
    }
    INITIALISED.store(true, Ordering::SeqCst);
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    out(version, DRIVER_VERSION, "cuDriverGetVersion")
}

fn error_text(code: CUresult) -> Option<(&'static str, &'static str)> {
    Some(match code {
        SUCCESS => ("CUDA_SUCCESS", "no error"),
        INVALID_VALUE => ("CUDA_ERROR_INVALID_VALUE", "invalid argument"),
        OUT_OF_MEMORY => ("CUDA_ERROR_OUT_OF_MEMORY", "out of memory"),
        NOT_INITIALIZED => ("CUDA_ERROR_NOT_INITIALIZED", "initialization error"),
        INVALID_DEVICE => ("CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"),
        INVALID_IMAGE => ("CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"),
        INVALID_CONTEXT => ("CUDA_ERROR_INVALID_CONTEXT", "invalid device context"),
        INVALID_HANDLE => ("CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"),
        NOT_FOUND => ("CUDA_ERROR_NOT_FOUND", "named symbol not found"),
        NOT_READY => ("CUDA_ERROR_NOT_READY", "device not ready"),
        LAUNCH_FAILED => (
            "CUDA_ERROR_LAUNCH_FAILED",
            "unspecified launch failure (the mock printed the cause on stderr)",
        ),
        _ => return None,
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(code: CUresult, s: *mut *const c_char) -> CUresult {
    static NAMES: OnceLock<Mutex<HashMap<CUresult, std::ffi::CString>>> = OnceLock::new();
    let Some((name, _)) = error_text(code) else {
        return INVALID_VALUE;
    };
    let mut m = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let c = m
        .entry(code)
        .or_insert_with(|| std::ffi::CString::new(name).unwrap_or_default());
    out(s, c.as_ptr(), "cuGetErrorName")
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(code: CUresult, s: *mut *const c_char) -> CUresult {
    static TEXTS: OnceLock<Mutex<HashMap<CUresult, std::ffi::CString>>> = OnceLock::new();
    let Some((_, text)) = error_text(code) else {
        return INVALID_VALUE;
    };
    let mut m = TEXTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let c = m
        .entry(code)
        .or_insert_with(|| std::ffi::CString::new(text).unwrap_or_default());
    out(s, c.as_ptr(), "cuGetErrorString")
}

// ---- Devices ----

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    ready!("cuDeviceGetCount");
    out(count, 1, "cuDeviceGetCount")
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(device: *mut c_int, ordinal: c_int) -> CUresult {
    ready!("cuDeviceGet");
    device_ok!(ordinal, "cuDeviceGet");
    out(device, 0, "cuDeviceGet")
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: c_int) -> CUresult {
    ready!("cuDeviceGetName");
    device_ok!(dev, "cuDeviceGetName");
    if name.is_null() || len <= 0 {
        return fail(
            INVALID_VALUE,
            MockError("cuDeviceGetName: no buffer".into()),
        );
    }
    let bytes = DEVICE_NAME.as_bytes();
    let n = bytes.len().min(len as usize - 1);
    std::ptr::copy_nonoverlapping(bytes.as_ptr(), name as *mut u8, n);
    *name.add(n) = 0;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: c_int) -> CUresult {
    ready!("cuDeviceTotalMem_v2");
    device_ok!(dev, "cuDeviceTotalMem_v2");
    out(bytes, memory::DEVICE_BYTES as usize, "cuDeviceTotalMem_v2")
}

/// The attributes of an sm_90 device with H100-like limits.
fn attribute(attr: c_int) -> Option<c_int> {
    Some(match attr {
        1 => 1024,              // MAX_THREADS_PER_BLOCK
        2 | 3 => 1024,          // MAX_BLOCK_DIM_X, _Y
        4 => 64,                // MAX_BLOCK_DIM_Z
        5 => i32::MAX,          // MAX_GRID_DIM_X
        6 | 7 => 65535,         // MAX_GRID_DIM_Y, _Z
        8 => 48 * 1024,         // MAX_SHARED_MEMORY_PER_BLOCK
        9 => 64 * 1024,         // TOTAL_CONSTANT_MEMORY
        10 => 32,               // WARP_SIZE
        12 => 65536,            // MAX_REGISTERS_PER_BLOCK
        13 => 1_755_000,        // CLOCK_RATE (kHz)
        16 => 132,              // MULTIPROCESSOR_COUNT
        18 => 0,                // INTEGRATED
        19 => 1,                // CAN_MAP_HOST_MEMORY
        31 => 1,                // CONCURRENT_KERNELS
        32 => 0,                // ECC_ENABLED
        33 => 0,                // PCI_BUS_ID
        36 => 2_619_000,        // MEMORY_CLOCK_RATE (kHz)
        37 => 5120,             // GLOBAL_MEMORY_BUS_WIDTH
        38 => 50 * 1024 * 1024, // L2_CACHE_SIZE
        39 => 2048,             // MAX_THREADS_PER_MULTIPROCESSOR
        40 => 2,                // ASYNC_ENGINE_COUNT
        41 => 1,                // UNIFIED_ADDRESSING
        75 => 9,                // COMPUTE_CAPABILITY_MAJOR
        76 => 0,                // COMPUTE_CAPABILITY_MINOR
        81 => 228 * 1024,       // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        82 => 65536,            // MAX_REGISTERS_PER_MULTIPROCESSOR
        97 => 227 * 1024,       // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        111 => 1024,            // RESERVED_SHARED_MEMORY_PER_BLOCK
        115 => 1,               // MEMORY_POOLS_SUPPORTED
        _ => return None,
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(pi: *mut c_int, attr: c_int, dev: c_int) -> CUresult {
    ready!("cuDeviceGetAttribute");
    device_ok!(dev, "cuDeviceGetAttribute");
    match attribute(attr) {
        Some(v) => out(pi, v, "cuDeviceGetAttribute"),
        None => unimplemented("cuDeviceGetAttribute", &format!("attribute {attr}")),
    }
}

// ---- Contexts (one primary context) ----

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut *mut c_void, dev: c_int) -> CUresult {
    ready!("cuDevicePrimaryCtxRetain");
    device_ok!(dev, "cuDevicePrimaryCtxRetain");
    out(ctx, primary(), "cuDevicePrimaryCtxRetain")
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: c_int) -> CUresult {
    ready!("cuDevicePrimaryCtxRelease_v2");
    device_ok!(dev, "cuDevicePrimaryCtxRelease_v2");
    SUCCESS
}

fn ctx_ok(ctx: *mut c_void, call: &str) -> Result<(), CUresult> {
    if ctx == primary() {
        Ok(())
    } else {
        Err(fail(
            INVALID_CONTEXT,
            MockError(format!("{call}: {ctx:?} is not the primary context")),
        ))
    }
}

#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(ctx: *mut c_void) -> CUresult {
    ready!("cuCtxSetCurrent");
    if !ctx.is_null() {
        if let Err(c) = ctx_ok(ctx, "cuCtxSetCurrent") {
            return c;
        }
    }
    CURRENT.with(|c| c.set(ctx));
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(ctx: *mut *mut c_void) -> CUresult {
    ready!("cuCtxGetCurrent");
    out(ctx, CURRENT.with(Cell::get), "cuCtxGetCurrent")
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(dev: *mut c_int) -> CUresult {
    ready!("cuCtxGetDevice");
    if CURRENT.with(Cell::get).is_null() {
        return fail(
            INVALID_CONTEXT,
            MockError("cuCtxGetDevice: no current context".into()),
        );
    }
    out(dev, 0, "cuCtxGetDevice")
}

fn current(call: &str) -> Result<(), CUresult> {
    if CURRENT.with(Cell::get).is_null() {
        Err(fail(
            INVALID_CONTEXT,
            MockError(format!("{call}: no context is current on this thread")),
        ))
    } else {
        Ok(())
    }
}

macro_rules! current {
    ($call:expr) => {
        if let Err(code) = current($call) {
            return code;
        }
    };
}

#[no_mangle]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    ready!("cuCtxSynchronize");
    current!("cuCtxSynchronize");
    result(stream::synchronize_all(), LAUNCH_FAILED)
}

// ---- Memory ----

fn alloc_code(e: &MockError) -> CUresult {
    if e.0.contains("out of device memory") {
        OUT_OF_MEMORY
    } else {
        INVALID_VALUE
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut DevicePtr, bytes: usize) -> CUresult {
    ready!("cuMemAlloc_v2");
    current!("cuMemAlloc_v2");
    if bytes == 0 {
        return fail(INVALID_VALUE, MockError("cuMemAlloc_v2: 0 bytes".into()));
    }
    match memory::alloc(bytes, "cuMemAlloc_v2") {
        Ok(a) => out(dptr, a.ptr, "cuMemAlloc_v2"),
        Err(e) => fail(alloc_code(&e), e),
    }
}

#[no_mangle]
pub extern "C" fn cuMemFree_v2(dptr: DevicePtr) -> CUresult {
    ready!("cuMemFree_v2");
    current!("cuMemFree_v2");
    // cuMemFree waits for the device: queued work that uses the allocation finishes first.
    if let Err(e) = stream::synchronize_all() {
        return fail(LAUNCH_FAILED, e);
    }
    let r = memory::allocation_of(dptr)
        .filter(|a| a.ptr == dptr && !a.freeing)
        .ok_or_else(|| MockError(format!("cuMemFree_v2: {dptr:#x} is not a live allocation")))
        .and_then(|a| {
            stream::forget(a.id);
            memory::free(dptr, "cuMemFree_v2").map_err(stream::fault)
        });
    result(r, INVALID_VALUE)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync(
    dptr: *mut DevicePtr,
    bytes: usize,
    s: *mut c_void,
) -> CUresult {
    ready!("cuMemAllocAsync");
    current!("cuMemAllocAsync");
    alloc_async(dptr, bytes, s, "cuMemAllocAsync")
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync(
    dptr: *mut DevicePtr,
    bytes: usize,
    pool: *mut c_void,
    s: *mut c_void,
) -> CUresult {
    ready!("cuMemAllocFromPoolAsync");
    current!("cuMemAllocFromPoolAsync");
    if pool != default_pool() {
        return fail(
            INVALID_HANDLE,
            MockError(format!(
                "cuMemAllocFromPoolAsync: {pool:?} is not the default pool"
            )),
        );
    }
    alloc_async(dptr, bytes, s, "cuMemAllocFromPoolAsync")
}

/// A stream-ordered allocation: valid from its point in `s`'s order, which the detector sees as
/// a write of the whole allocation on `s` (a use on another stream must be ordered after it).
unsafe fn alloc_async(
    dptr: *mut DevicePtr,
    bytes: usize,
    s: *mut c_void,
    call: &'static str,
) -> CUresult {
    if bytes == 0 {
        return fail(INVALID_VALUE, MockError(format!("{call}: 0 bytes")));
    }
    let a = match memory::alloc(bytes, call) {
        Ok(a) => a,
        Err(e) => return fail(alloc_code(&e), e),
    };
    let r = stream::enqueue(
        s,
        format!("{call} of allocation #{} ({bytes} bytes)", a.id),
        vec![Access::Write(a.ptr, bytes)],
        Box::new(|| Ok(())),
    );
    if let Err(e) = r {
        let _ = memory::free(a.ptr, call);
        return fail(INVALID_VALUE, e);
    }
    out(dptr, a.ptr, call)
}

#[no_mangle]
pub extern "C" fn cuMemFreeAsync(dptr: DevicePtr, s: *mut c_void) -> CUresult {
    ready!("cuMemFreeAsync");
    current!("cuMemFreeAsync");
    result(
        stream::enqueue_free(s, dptr, "cuMemFreeAsync"),
        INVALID_VALUE,
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    ready!("cuMemGetInfo_v2");
    current!("cuMemGetInfo_v2");
    let (f, t) = memory::info();
    let r = out(free, f as usize, "cuMemGetInfo_v2");
    if r != SUCCESS {
        return r;
    }
    out(total, t as usize, "cuMemGetInfo_v2")
}

// ---- The default memory pool ----

static POOL: u8 = 0;
fn default_pool() -> *mut c_void {
    &POOL as *const u8 as *mut c_void
}

/// The pool's settable attributes (1..=4) and the high-water marks.
fn pool_attrs() -> std::sync::MutexGuard<'static, HashMap<c_int, u64>> {
    static A: OnceLock<Mutex<HashMap<c_int, u64>>> = OnceLock::new();
    A.get_or_init(|| {
        // CUDA's defaults: follow event dependencies, opportunistic and internal reuse on,
        // release threshold 0.
        Mutex::new(HashMap::from([(1, 1), (2, 1), (3, 1), (4, 0)]))
    })
    .lock()
    .unwrap_or_else(|e| e.into_inner())
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetDefaultMemPool(pool: *mut *mut c_void, dev: c_int) -> CUresult {
    ready!("cuDeviceGetDefaultMemPool");
    device_ok!(dev, "cuDeviceGetDefaultMemPool");
    out(pool, default_pool(), "cuDeviceGetDefaultMemPool")
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetMemPool(pool: *mut *mut c_void, dev: c_int) -> CUresult {
    ready!("cuDeviceGetMemPool");
    device_ok!(dev, "cuDeviceGetMemPool");
    out(pool, default_pool(), "cuDeviceGetMemPool")
}

#[no_mangle]
pub unsafe extern "C" fn cuMemPoolSetAttribute(
    pool: *mut c_void,
    attr: c_int,
    value: *mut c_void,
) -> CUresult {
    ready!("cuMemPoolSetAttribute");
    if pool != default_pool() || value.is_null() {
        return fail(
            INVALID_VALUE,
            MockError(format!(
                "cuMemPoolSetAttribute: pool {pool:?}, value {value:?}"
            )),
        );
    }
    match attr {
        1..=3 => {
            pool_attrs().insert(attr, (*(value as *const c_int) != 0) as u64);
        }
        4 => {
            pool_attrs().insert(attr, *(value as *const u64));
        }
        // The high-water marks can only be reset to 0.
        6 | 8 if *(value as *const u64) == 0 => {
            memory::reset_high_water();
        }
        _ => unimplemented("cuMemPoolSetAttribute", &format!("attribute {attr}")),
    }
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemPoolGetAttribute(
    pool: *mut c_void,
    attr: c_int,
    value: *mut c_void,
) -> CUresult {
    ready!("cuMemPoolGetAttribute");
    if pool != default_pool() || value.is_null() {
        return fail(
            INVALID_VALUE,
            MockError(format!(
                "cuMemPoolGetAttribute: pool {pool:?}, value {value:?}"
            )),
        );
    }
    let (used, high) = memory::usage();
    match attr {
        1..=3 => *(value as *mut c_int) = pool_attrs()[&attr] as c_int,
        4 => *(value as *mut u64) = pool_attrs()[&attr],
        5 | 7 => *(value as *mut u64) = used,
        6 | 8 => *(value as *mut u64) = high,
        _ => unimplemented("cuMemPoolGetAttribute", &format!("attribute {attr}")),
    }
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuMemPoolTrimTo(pool: *mut c_void, _keep: usize) -> CUresult {
    ready!("cuMemPoolTrimTo");
    if pool != default_pool() {
        return fail(
            INVALID_VALUE,
            MockError(format!("cuMemPoolTrimTo: pool {pool:?}")),
        );
    }
    // Freed memory goes back at once in the mock: there is nothing held to trim.
    SUCCESS
}

// ---- Pinned host memory ----

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocHost_v2(p: *mut *mut c_void, bytes: usize) -> CUresult {
    ready!("cuMemAllocHost_v2");
    current!("cuMemAllocHost_v2");
    match memory::host_alloc(bytes) {
        Ok(h) => out(p, h as *mut c_void, "cuMemAllocHost_v2"),
        Err(e) => fail(OUT_OF_MEMORY, e),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemHostAlloc(
    p: *mut *mut c_void,
    bytes: usize,
    flags: c_uint,
) -> CUresult {
    ready!("cuMemHostAlloc");
    current!("cuMemHostAlloc");
    // PORTABLE (1), DEVICEMAP (2), WRITECOMBINED (4): all are plain host memory here.
    if flags & !7 != 0 {
        return fail(
            INVALID_VALUE,
            MockError(format!("cuMemHostAlloc: flags {flags:#x}")),
        );
    }
    match memory::host_alloc(bytes) {
        Ok(h) => out(p, h as *mut c_void, "cuMemHostAlloc"),
        Err(e) => fail(OUT_OF_MEMORY, e),
    }
}

#[no_mangle]
pub extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    ready!("cuMemFreeHost");
    result(
        memory::host_free(p as usize, "cuMemFreeHost"),
        INVALID_VALUE,
    )
}

// ---- Copies and memset ----

/// A host address carried into a worker (the caller keeps pinned memory alive until the copy
/// has run, as CUDA requires).
#[derive(Clone, Copy)]
struct HostAddr(usize);

/// Queues a host-to-device copy. Pageable sources are taken now (CUDA stages them before the
/// call returns); pinned ones are read when the copy runs.
unsafe fn htod(
    dst: DevicePtr,
    src: *const c_void,
    bytes: usize,
    s: *mut c_void,
    call: &str,
) -> Result<(), MockError> {
    if bytes == 0 {
        return Ok(());
    }
    if src.is_null() || memory::in_device_range(src as u64) {
        return Err(MockError(format!(
            "{call}: source {src:?} is not host memory"
        )));
    }
    let name = format!("{call} of {bytes} bytes to {dst:#x}");
    let what = name.clone();
    let work: stream::Work = if memory::is_pinned(src as *const u8, bytes) {
        let a = HostAddr(src as usize);
        Box::new(move || {
            let d = memory::host_range(dst, bytes, &what)?;
            // SAFETY: pinned memory the caller keeps until the copy ran; d checked above.
            std::ptr::copy_nonoverlapping(a.0 as *const u8, d, bytes);
            Ok(())
        })
    } else {
        let data = std::slice::from_raw_parts(src as *const u8, bytes).to_vec();
        Box::new(move || {
            let d = memory::host_range(dst, bytes, &what)?;
            // SAFETY: d is checked to hold `bytes` bytes.
            std::ptr::copy_nonoverlapping(data.as_ptr(), d, bytes);
            Ok(())
        })
    };
    stream::enqueue(s, name, vec![Access::Write(dst, bytes)], work)
}

/// Queues a device-to-host copy; into pageable memory the call waits for it (as CUDA does).
unsafe fn dtoh(
    dst: *mut c_void,
    src: DevicePtr,
    bytes: usize,
    s: *mut c_void,
    call: &str,
    sync: bool,
) -> Result<(), MockError> {
    if bytes == 0 {
        return Ok(());
    }
    if dst.is_null() || memory::in_device_range(dst as u64) {
        return Err(MockError(format!(
            "{call}: destination {dst:?} is not host memory"
        )));
    }
    let name = format!("{call} of {bytes} bytes from {src:#x}");
    let what = name.clone();
    let a = HostAddr(dst as usize);
    let pinned = memory::is_pinned(dst as *const u8, bytes);
    stream::enqueue(
        s,
        name,
        vec![Access::Read(src, bytes)],
        Box::new(move || {
            let sp = memory::host_range(src, bytes, &what)?;
            // SAFETY: the caller keeps the destination until the copy ran (pinned) or waits
            // for it (pageable); sp is checked.
            std::ptr::copy_nonoverlapping(sp, a.0 as *mut u8, bytes);
            Ok(())
        }),
    )?;
    if sync || !pinned {
        stream::synchronize(s)?;
    }
    Ok(())
}

fn dtod(
    dst: DevicePtr,
    src: DevicePtr,
    bytes: usize,
    s: *mut c_void,
    call: &str,
) -> Result<(), MockError> {
    if bytes == 0 {
        return Ok(());
    }
    let name = format!("{call} of {bytes} bytes {src:#x} -> {dst:#x}");
    let what = name.clone();
    stream::enqueue(
        s,
        name,
        vec![Access::Read(src, bytes), Access::Write(dst, bytes)],
        Box::new(move || {
            let sp = memory::host_range(src, bytes, &what)?;
            let dp = memory::host_range(dst, bytes, &what)?;
            // SAFETY: both ranges are checked; they may overlap only if the caller made them.
            unsafe { std::ptr::copy(sp, dp, bytes) };
            Ok(())
        }),
    )
}

fn memset(
    dst: DevicePtr,
    value: u32,
    width: usize,
    n: usize,
    s: *mut c_void,
    call: &str,
) -> Result<(), MockError> {
    let bytes = n * width;
    if bytes == 0 {
        return Ok(());
    }
    if !dst.is_multiple_of(width as u64) {
        return Err(MockError(format!(
            "{call}: {dst:#x} is not aligned to {width} bytes"
        )));
    }
    let name = format!("{call} of {bytes} bytes at {dst:#x}");
    let what = name.clone();
    stream::enqueue(
        s,
        name,
        vec![Access::Write(dst, bytes)],
        Box::new(move || {
            let d = memory::host_range(dst, bytes, &what)?;
            // SAFETY: d holds `bytes` bytes.
            let d = unsafe { std::slice::from_raw_parts_mut(d, bytes) };
            let v = value.to_le_bytes();
            for c in d.chunks_exact_mut(width) {
                c.copy_from_slice(&v[..width]);
            }
            Ok(())
        }),
    )
}

fn legacy() -> *mut c_void {
    std::ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(
    dst: DevicePtr,
    src: *const c_void,
    bytes: usize,
) -> CUresult {
    ready!("cuMemcpyHtoD_v2");
    current!("cuMemcpyHtoD_v2");
    let r = htod(dst, src, bytes, legacy(), "cuMemcpyHtoD_v2")
        .and_then(|()| stream::synchronize(legacy()));
    result(r, INVALID_VALUE)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: DevicePtr,
    src: *const c_void,
    bytes: usize,
    s: *mut c_void,
) -> CUresult {
    ready!("cuMemcpyHtoDAsync_v2");
    current!("cuMemcpyHtoDAsync_v2");
    result(
        htod(dst, src, bytes, s, "cuMemcpyHtoDAsync_v2"),
        INVALID_VALUE,
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(
    dst: *mut c_void,
    src: DevicePtr,
    bytes: usize,
) -> CUresult {
    ready!("cuMemcpyDtoH_v2");
    current!("cuMemcpyDtoH_v2");
    result(
        dtoh(dst, src, bytes, legacy(), "cuMemcpyDtoH_v2", true),
        INVALID_VALUE,
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: DevicePtr,
    bytes: usize,
    s: *mut c_void,
) -> CUresult {
    ready!("cuMemcpyDtoHAsync_v2");
    current!("cuMemcpyDtoHAsync_v2");
    result(
        dtoh(dst, src, bytes, s, "cuMemcpyDtoHAsync_v2", false),
        INVALID_VALUE,
    )
}

#[no_mangle]
pub extern "C" fn cuMemcpyDtoD_v2(dst: DevicePtr, src: DevicePtr, bytes: usize) -> CUresult {
    ready!("cuMemcpyDtoD_v2");
    current!("cuMemcpyDtoD_v2");
    let r = dtod(dst, src, bytes, legacy(), "cuMemcpyDtoD_v2")
        .and_then(|()| stream::synchronize(legacy()));
    result(r, INVALID_VALUE)
}

#[no_mangle]
pub extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: DevicePtr,
    src: DevicePtr,
    bytes: usize,
    s: *mut c_void,
) -> CUresult {
    ready!("cuMemcpyDtoDAsync_v2");
    current!("cuMemcpyDtoDAsync_v2");
    result(
        dtod(dst, src, bytes, s, "cuMemcpyDtoDAsync_v2"),
        INVALID_VALUE,
    )
}

#[no_mangle]
pub extern "C" fn cuMemsetD8Async(dst: DevicePtr, v: u8, n: usize, s: *mut c_void) -> CUresult {
    ready!("cuMemsetD8Async");
    current!("cuMemsetD8Async");
    result(
        memset(dst, v as u32, 1, n, s, "cuMemsetD8Async"),
        INVALID_VALUE,
    )
}

#[no_mangle]
pub extern "C" fn cuMemsetD8_v2(dst: DevicePtr, v: u8, n: usize) -> CUresult {
    ready!("cuMemsetD8_v2");
    current!("cuMemsetD8_v2");
    let r = memset(dst, v as u32, 1, n, legacy(), "cuMemsetD8_v2")
        .and_then(|()| stream::synchronize(legacy()));
    result(r, INVALID_VALUE)
}

#[no_mangle]
pub extern "C" fn cuMemsetD32Async(
    dst: DevicePtr,
    v: c_uint,
    n: usize,
    s: *mut c_void,
) -> CUresult {
    ready!("cuMemsetD32Async");
    current!("cuMemsetD32Async");
    result(memset(dst, v, 4, n, s, "cuMemsetD32Async"), INVALID_VALUE)
}

// ---- Streams and events ----

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(s: *mut *mut c_void, flags: c_uint) -> CUresult {
    ready!("cuStreamCreate");
    current!("cuStreamCreate");
    if flags > 1 {
        return fail(
            INVALID_VALUE,
            MockError(format!("cuStreamCreate: flags {flags:#x}")),
        );
    }
    out(s, stream::create(flags == 1), "cuStreamCreate")
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    s: *mut *mut c_void,
    flags: c_uint,
    _priority: c_int,
) -> CUresult {
    // Priorities only change scheduling, which the mock does not model.
    cuStreamCreate(s, flags)
}

#[no_mangle]
pub extern "C" fn cuStreamDestroy_v2(s: *mut c_void) -> CUresult {
    ready!("cuStreamDestroy_v2");
    result(stream::destroy(s), INVALID_HANDLE)
}

#[no_mangle]
pub extern "C" fn cuStreamSynchronize(s: *mut c_void) -> CUresult {
    ready!("cuStreamSynchronize");
    result(stream::synchronize(s), LAUNCH_FAILED)
}

#[no_mangle]
pub extern "C" fn cuStreamQuery(s: *mut c_void) -> CUresult {
    ready!("cuStreamQuery");
    match stream::query(s) {
        Ok(true) => SUCCESS,
        Ok(false) => NOT_READY,
        Err(e) => fail(LAUNCH_FAILED, e),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamWaitEvent(
    s: *mut c_void,
    ev: *mut c_void,
    flags: c_uint,
) -> CUresult {
    ready!("cuStreamWaitEvent");
    if flags != 0 {
        return fail(
            INVALID_VALUE,
            MockError(format!("cuStreamWaitEvent: flags {flags:#x}")),
        );
    }
    match event(ev, "cuStreamWaitEvent") {
        Ok(e) => result(stream::stream_wait_event(s, e), INVALID_HANDLE),
        Err(c) => c,
    }
}

fn events() -> std::sync::MutexGuard<'static, std::collections::HashSet<usize>> {
    static E: OnceLock<Mutex<std::collections::HashSet<usize>>> = OnceLock::new();
    E.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

unsafe fn event<'a>(ev: *mut c_void, call: &str) -> Result<&'a Event, CUresult> {
    if events().contains(&(ev as usize)) {
        Ok(&*(ev as *const Event))
    } else {
        Err(fail(
            INVALID_HANDLE,
            MockError(format!("{call}: {ev:?} is not a live event")),
        ))
    }
}

macro_rules! event {
    ($ev:expr, $call:expr) => {
        match event($ev, $call) {
            Ok(e) => e,
            Err(code) => return code,
        }
    };
}

#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(ev: *mut *mut c_void, flags: c_uint) -> CUresult {
    ready!("cuEventCreate");
    current!("cuEventCreate");
    // DEFAULT 0, BLOCKING_SYNC 1, DISABLE_TIMING 2; INTERPROCESS (4) is not modelled.
    if flags & !3 != 0 {
        unimplemented("cuEventCreate", &format!("flags {flags:#x}"));
    }
    let e = Box::into_raw(stream::event_create(flags & 2 == 0)) as *mut c_void;
    events().insert(e as usize);
    out(ev, e, "cuEventCreate")
}

#[no_mangle]
pub unsafe extern "C" fn cuEventDestroy_v2(ev: *mut c_void) -> CUresult {
    ready!("cuEventDestroy_v2");
    if !events().remove(&(ev as usize)) {
        return fail(
            INVALID_HANDLE,
            MockError(format!("cuEventDestroy_v2: {ev:?} is not a live event")),
        );
    }
    // Queued records and waits hold their own share of the event's state.
    drop(Box::from_raw(ev as *mut Event));
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventRecord(ev: *mut c_void, s: *mut c_void) -> CUresult {
    ready!("cuEventRecord");
    let e = event!(ev, "cuEventRecord");
    result(stream::event_record(e, s), INVALID_HANDLE)
}

#[no_mangle]
pub unsafe extern "C" fn cuEventRecordWithFlags(
    ev: *mut c_void,
    s: *mut c_void,
    flags: c_uint,
) -> CUresult {
    if flags != 0 {
        unimplemented("cuEventRecordWithFlags", &format!("flags {flags:#x}"));
    }
    cuEventRecord(ev, s)
}

#[no_mangle]
pub unsafe extern "C" fn cuEventSynchronize(ev: *mut c_void) -> CUresult {
    ready!("cuEventSynchronize");
    let e = event!(ev, "cuEventSynchronize");
    result(stream::event_synchronize(e), LAUNCH_FAILED)
}

#[no_mangle]
pub unsafe extern "C" fn cuEventQuery(ev: *mut c_void) -> CUresult {
    ready!("cuEventQuery");
    let e = event!(ev, "cuEventQuery");
    match stream::event_query(e) {
        Ok(true) => SUCCESS,
        Ok(false) => NOT_READY,
        Err(err) => fail(LAUNCH_FAILED, err),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(
    ms: *mut f32,
    start: *mut c_void,
    end: *mut c_void,
) -> CUresult {
    ready!("cuEventElapsedTime");
    let a = event!(start, "cuEventElapsedTime");
    let b = event!(end, "cuEventElapsedTime");
    match stream::event_elapsed_ms(a, b) {
        Ok(v) => out(ms, v, "cuEventElapsedTime"),
        Err(e) => fail(INVALID_HANDLE, e),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    ms: *mut f32,
    start: *mut c_void,
    end: *mut c_void,
) -> CUresult {
    cuEventElapsedTime(ms, start, end)
}
