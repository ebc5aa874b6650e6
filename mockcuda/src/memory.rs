//! The device address space.
//!
//! INTERFACE (used by the libraries and the driver; keep these signatures):
//! - [`DevicePtr`]: a device address as the driver API hands it out (`CUdeviceptr`).
//! - [`host_range`]: the host address of `len` bytes at a device address, checked to lie
//!   inside one live allocation.
//!
//! One reservation of `2 * SPACE` bytes: the lower half is the device view (what `cuMemAlloc`
//! returns), mapped `PROT_NONE`, so host code that dereferences a device pointer faults; the
//! upper half is the kernel view (read/write), `SPACE` bytes above, which the simulator, the
//! copies and the libraries use after [`host_range`] has checked the bounds. Every allocation
//! is 256-byte aligned (as `cuMemAlloc`) and sits between guard bytes that are checked when it
//! is freed. Pinned host memory is ordinary host memory the mock keeps a list of.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, OnceLock};

use crate::error::MockError;

/// A device address (`CUdeviceptr`).
pub type DevicePtr = u64;

/// Bytes of device memory the mock reports and hands out (`cuDeviceTotalMem`).
pub const DEVICE_BYTES: u64 = 16 << 30;
/// Alignment of every allocation, and the guard on each side of it.
pub const ALIGN: u64 = 256;
const GUARD_BYTE: u8 = 0xa5;
/// How many of the last operations that wrote an allocation a guard failure names.
const WRITERS_KEPT: usize = 4;

/// One live device allocation.
#[derive(Debug, Clone)]
pub struct Allocation {
    /// Unique over the process (addresses are reused, ids are not).
    pub id: u64,
    pub ptr: DevicePtr,
    pub len: usize,
    /// The call that made it (`cuMemAlloc_v2`, `cuMemAllocAsync`).
    pub made_by: &'static str,
    /// A `cuMemFreeAsync` is queued: any later use is a use after free.
    pub freeing: bool,
    writers: VecDeque<String>,
}

struct Space {
    /// Start of the device view.
    base: u64,
}

struct Heap {
    live: BTreeMap<DevicePtr, Allocation>,
    /// Free spans of the device view: start -> length (coalesced).
    free: BTreeMap<u64, u64>,
    used: u64,
    high: u64,
    next_id: u64,
    /// Pinned host allocations: address -> length.
    pinned: HashMap<usize, usize>,
}

fn space() -> Result<&'static Space, MockError> {
    static SPACE: OnceLock<Result<Space, MockError>> = OnceLock::new();
    SPACE
        .get_or_init(|| {
            let total = 2 * DEVICE_BYTES as usize;
            // SAFETY: a fresh anonymous reservation; nothing else refers to it.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    total,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if base == libc::MAP_FAILED {
                return Err(MockError(format!(
                    "reserving {total} bytes of address space for the device: {}",
                    std::io::Error::last_os_error()
                )));
            }
            // SAFETY: the upper half of the reservation just made becomes the kernel view.
            let rc = unsafe {
                libc::mprotect(
                    (base as usize + DEVICE_BYTES as usize) as *mut libc::c_void,
                    DEVICE_BYTES as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
            if rc != 0 {
                return Err(MockError(format!(
                    "making the kernel view of device memory writable: {}",
                    std::io::Error::last_os_error()
                )));
            }
            Ok(Space { base: base as u64 })
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn heap() -> MutexGuard<'static, Heap> {
    static HEAP: OnceLock<Mutex<Heap>> = OnceLock::new();
    HEAP.get_or_init(|| {
        Mutex::new(Heap {
            live: BTreeMap::new(),
            free: BTreeMap::new(),
            used: 0,
            high: 0,
            next_id: 1,
            pinned: HashMap::new(),
        })
    })
    .lock()
    .unwrap_or_else(|e| e.into_inner())
}

/// The host (kernel-view) address of a device address, unchecked.
fn kernel_view(ptr: DevicePtr) -> *mut u8 {
    (ptr + DEVICE_BYTES) as *mut u8
}

/// Whether `ptr` lies in the device view at all.
pub fn in_device_range(ptr: u64) -> bool {
    space().is_ok_and(|s| ptr >= s.base && ptr < s.base + DEVICE_BYTES)
}

/// The span (with guards) an allocation of `len` bytes takes.
fn span_len(len: usize) -> u64 {
    let body = (len as u64).div_ceil(ALIGN).max(1) * ALIGN;
    body + 2 * ALIGN
}

/// Allocates `len` bytes of device memory; `made_by` names the call.
pub fn alloc(len: usize, made_by: &'static str) -> Result<Allocation, MockError> {
    let s = space()?;
    let need = span_len(len);
    let mut h = heap();
    if h.free.is_empty() && h.used == 0 && h.live.is_empty() {
        h.free.insert(s.base, DEVICE_BYTES);
    }
    let Some((&start, &flen)) = h.free.iter().find(|(_, &l)| l >= need) else {
        return Err(MockError(format!(
            "{made_by}: out of device memory ({len} bytes asked, {} of {DEVICE_BYTES} in use)",
            h.used
        )));
    };
    h.free.remove(&start);
    if flen > need {
        h.free.insert(start + need, flen - need);
    }
    h.used += need;
    h.high = h.high.max(h.used);
    let ptr = start + ALIGN;
    // SAFETY: the whole span lies in the kernel view and belongs to no other allocation.
    unsafe {
        let span = std::slice::from_raw_parts_mut(kernel_view(start), need as usize);
        span.fill(GUARD_BYTE);
    }
    let id = h.next_id;
    h.next_id += 1;
    let a = Allocation {
        id,
        ptr,
        len,
        made_by,
        freeing: false,
        writers: VecDeque::new(),
    };
    h.live.insert(ptr, a.clone());
    Ok(a)
}

/// The live allocation that holds `ptr`, if any.
pub fn allocation_of(ptr: DevicePtr) -> Option<Allocation> {
    let h = heap();
    let (_, a) = h.live.range(..=ptr).next_back()?;
    (ptr < a.ptr + a.len.max(1) as u64).then(|| a.clone())
}

/// Marks the allocation at `ptr` as being freed (a free is queued): later uses are errors.
pub fn mark_freeing(ptr: DevicePtr, what: &str) -> Result<Allocation, MockError> {
    let mut h = heap();
    match h.live.get_mut(&ptr) {
        Some(a) if a.freeing => Err(MockError(format!(
            "{what}: {ptr:#x} (allocation #{}, {} bytes) is freed twice",
            a.id, a.len
        ))),
        Some(a) => {
            a.freeing = true;
            Ok(a.clone())
        }
        None => Err(MockError(format!(
            "{what}: {ptr:#x} is not the start of a live device allocation"
        ))),
    }
}

/// Notes that `op` wrote into the allocation holding `ptr` (for guard failures).
pub fn note_writer(ptr: DevicePtr, op: &str) {
    let mut h = heap();
    if let Some((_, a)) = h.live.range_mut(..=ptr).next_back() {
        if ptr < a.ptr + a.len.max(1) as u64 {
            if a.writers.len() == WRITERS_KEPT {
                a.writers.pop_front();
            }
            a.writers.push_back(op.to_string());
        }
    }
}

/// Checks the guards of the allocation at `ptr`: an error names the allocation, the first bad
/// byte and the last operations that wrote it.
fn check_guards(a: &Allocation) -> Result<(), MockError> {
    let need = span_len(a.len);
    let start = a.ptr - ALIGN;
    // SAFETY: the span is the allocation's own, in the kernel view.
    let span = unsafe { std::slice::from_raw_parts(kernel_view(start), need as usize) };
    let body = ALIGN as usize..ALIGN as usize + a.len;
    if let Some(i) = (0..span.len())
        .filter(|i| !body.contains(i))
        .find(|&i| span[i] != GUARD_BYTE)
    {
        let offset = i as i64 - ALIGN as i64;
        let writers: Vec<&str> = a.writers.iter().map(String::as_str).collect();
        return Err(MockError(format!(
            "a write outside device allocation #{} ({:#x}, {} bytes, from {}): byte {offset} \
             from its start was overwritten; the last operations that wrote it: {}",
            a.id,
            a.ptr,
            a.len,
            a.made_by,
            if writers.is_empty() {
                "none recorded".to_string()
            } else {
                writers.join("; ")
            }
        )));
    }
    Ok(())
}

/// Frees the allocation at `ptr` after checking its guards; its pages go back to the system.
pub fn free(ptr: DevicePtr, what: &str) -> Result<(), MockError> {
    let mut h = heap();
    let a = h.live.remove(&ptr).ok_or_else(|| {
        MockError(format!(
            "{what}: {ptr:#x} is not the start of a live device allocation"
        ))
    })?;
    let guards = check_guards(&a);
    let need = span_len(a.len);
    let start = a.ptr - ALIGN;
    // SAFETY: page-aligned parts of the span hold nothing else (other allocations' spans
    // start and end on their own 256-byte boundaries; only whole pages inside are released).
    unsafe {
        let page = 4096u64;
        let lo = (start + DEVICE_BYTES).div_ceil(page) * page;
        let hi = (start + need + DEVICE_BYTES) / page * page;
        if hi > lo {
            libc::madvise(
                lo as *mut libc::c_void,
                (hi - lo) as usize,
                libc::MADV_DONTNEED,
            );
        }
    }
    h.used -= need;
    // Coalesce with the neighbours.
    let mut s = start;
    let mut l = need;
    if let Some((&ps, &pl)) = h.free.range(..s).next_back() {
        if ps + pl == s {
            h.free.remove(&ps);
            s = ps;
            l += pl;
        }
    }
    if let Some(&nl) = h.free.get(&(s + l)) {
        h.free.remove(&(s + l));
        l += nl;
    }
    h.free.insert(s, l);
    guards.map_err(|e| MockError(format!("{what}: {e}")))
}

/// The host address where the `len` bytes at `ptr` live, after checking that they lie inside
/// one live allocation; `what` names the access in the error (e.g. "cublasLtMatmul A").
pub fn host_range(ptr: DevicePtr, len: usize, what: &str) -> Result<*mut u8, MockError> {
    if !in_device_range(ptr) {
        return Err(MockError(format!(
            "{what}: {ptr:#x} is not a device address (a host pointer, or garbage)"
        )));
    }
    let a = allocation_of(ptr).ok_or_else(|| {
        MockError(format!(
            "{what}: {ptr:#x} lies in no live device allocation (freed, or never allocated)"
        ))
    })?;
    let end = ptr.checked_add(len as u64);
    if end.is_none_or(|e| e > a.ptr + a.len as u64) {
        return Err(MockError(format!(
            "{what}: {len} bytes at {ptr:#x} run past the end of allocation #{} ({:#x}, {} bytes)",
            a.id, a.ptr, a.len
        )));
    }
    Ok(kernel_view(ptr))
}

/// `(free, total)` bytes of device memory (`cuMemGetInfo`).
pub fn info() -> (u64, u64) {
    let used = heap().used;
    (DEVICE_BYTES.saturating_sub(used), DEVICE_BYTES)
}

/// Allocates `len` bytes of pinned host memory.
pub fn host_alloc(len: usize) -> Result<*mut u8, MockError> {
    let layout = std::alloc::Layout::from_size_align(len.max(1), 4096)
        .map_err(|e| MockError(format!("pinned host allocation of {len} bytes: {e}")))?;
    // SAFETY: a non-zero size.
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    if p.is_null() {
        return Err(MockError(format!(
            "pinned host allocation of {len} bytes: out of memory"
        )));
    }
    heap().pinned.insert(p as usize, len);
    Ok(p)
}

/// Frees pinned host memory from [`host_alloc`].
pub fn host_free(p: usize, what: &str) -> Result<(), MockError> {
    let len = heap().pinned.remove(&p).ok_or_else(|| {
        MockError(format!(
            "{what}: {p:#x} is not pinned host memory from cuMemAllocHost/cuMemHostAlloc"
        ))
    })?;
    let layout = std::alloc::Layout::from_size_align(len.max(1), 4096)
        .map_err(|e| MockError(format!("{what}: {e}")))?;
    // SAFETY: allocated by host_alloc with this layout, removed from the list just now.
    unsafe { std::alloc::dealloc(p as *mut u8, layout) };
    Ok(())
}

/// Whether `len` bytes at `p` lie inside one pinned host allocation.
pub fn is_pinned(p: *const u8, len: usize) -> bool {
    let h = heap();
    let p = p as usize;
    h.pinned
        .iter()
        .any(|(&start, &l)| p >= start && p + len <= start + l)
}

/// `(in use, high-water mark)` bytes of device memory (the pool's attributes).
pub fn usage() -> (u64, u64) {
    let h = heap();
    (h.used, h.high)
}

/// Resets the high-water mark to what is in use now.
pub fn reset_high_water() {
    let mut h = heap();
    h.high = h.used;
}
