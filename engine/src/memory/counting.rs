//! A heap-byte counter for the CPU: the host's twin of `cuda::alloc_stats`.
//!
//! [`CountingAllocator`] wraps `std::alloc::System` and keeps, process-wide, the bytes in use,
//! their peak since the last [`reset_heap_peak`], the bytes allocated since then and the
//! largest single allocation since then. It is opt-in, because only the final binary chooses
//! the global allocator; a binary (or a test or bench target) installs it with
//!
//! ```ignore
//! #[global_allocator]
//! static HEAP: recycle_engine::memory::CountingAllocator = recycle_engine::memory::CountingAllocator;
//! ```
//!
//! and switches counting on with [`start_heap_counting`] (a measurement does, once, before it
//! allocates what it measures), then reads it with [`heap_stats`], which is `None` when the
//! allocator is not installed (a library used from a binary that did not install it) or
//! counting was never started: a missing figure is never reported as zero.
//!
//! Until counting starts, an allocation costs one relaxed load beside `System`'s work: the
//! counters are shared by every thread, and their read-modify-writes, bouncing one cache line
//! between cores, made allocation-heavy work (a tokenizer on two threads) nearly twice as
//! slow in a binary that never read them. Once started, the counters are relaxed atomics,
//! exact in total (every update is one atomic read-modify-write) for the blocks allocated
//! since: a block allocated before the start and freed after lowers the count by its size
//! (the figures never go below zero). A measurement window sees what all threads allocate, so
//! keep other work out of it (tests: one measuring test per binary, or a lock).
//! `realloc` counts the change of size only: the moment a moving `realloc` holds both blocks
//! is not counted (the engine's buffers are allocated at their size, so it hardly matters).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};

/// The counting global allocator (see the module doc for how to install it).
#[derive(Debug, Default, Clone, Copy)]
pub struct CountingAllocator;

/// Set by the first allocation through [`CountingAllocator`]: the runtime allocates before
/// `main`, so in a binary that installed it this is true by the time anyone reads.
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Set by [`start_heap_counting`]; never cleared.
static COUNTING: AtomicBool = AtomicBool::new(false);
/// Signed: a block counted nowhere (allocated before counting started) may be freed after.
static IN_USE: AtomicI64 = AtomicI64::new(0);
static PEAK: AtomicI64 = AtomicI64::new(0);
static ALLOCATED: AtomicU64 = AtomicU64::new(0);
static LARGEST: AtomicU64 = AtomicU64::new(0);

/// What [`heap_stats`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes allocated and not yet freed (as requested, without the allocator's overhead).
    pub bytes_in_use: u64,
    /// The most bytes in use at once since the last [`reset_heap_peak`] (or the start).
    pub peak_bytes_in_use: u64,
    /// Bytes allocated since the last reset, freed or not: what a computation would hold if
    /// it released nothing.
    pub allocated_bytes: u64,
    /// The largest single allocation since the last reset.
    pub largest_alloc_bytes: u64,
}

/// Switches counting on (from now; see the module doc) and returns whether
/// [`CountingAllocator`] is this process's global allocator. Calling it again does nothing.
pub fn start_heap_counting() -> bool {
    COUNTING.store(true, Relaxed);
    INSTALLED.load(Relaxed)
}

/// The counters, or `None` when [`CountingAllocator`] is not this process's global allocator
/// or [`start_heap_counting`] was not called.
pub fn heap_stats() -> Option<HeapStats> {
    (INSTALLED.load(Relaxed) && COUNTING.load(Relaxed)).then(|| HeapStats {
        bytes_in_use: IN_USE.load(Relaxed).max(0) as u64,
        peak_bytes_in_use: PEAK.load(Relaxed).max(0) as u64,
        allocated_bytes: ALLOCATED.load(Relaxed),
        largest_alloc_bytes: LARGEST.load(Relaxed),
    })
}

/// Starts a measurement window: the peak becomes the bytes in use now, and the allocated
/// bytes and the largest allocation start again from zero. Returns false (and does nothing
/// that matters) when the allocator is not installed or counting was not started.
pub fn reset_heap_peak() -> bool {
    PEAK.store(IN_USE.load(Relaxed), Relaxed);
    ALLOCATED.store(0, Relaxed);
    LARGEST.store(0, Relaxed);
    INSTALLED.load(Relaxed) && COUNTING.load(Relaxed)
}

/// Counts `size` more bytes in use; `block` when they are one new allocation (not the growth
/// of a `realloc`, which would make a doubling vector look like one large buffer).
fn on_alloc(size: u64, block: bool) {
    if !INSTALLED.load(Relaxed) {
        INSTALLED.store(true, Relaxed);
    }
    if !COUNTING.load(Relaxed) {
        return;
    }
    let now = IN_USE.fetch_add(size as i64, Relaxed) + size as i64;
    // Loads first: the read-modify-writes (a contended cache line) only when a record falls.
    if now > PEAK.load(Relaxed) {
        PEAK.fetch_max(now, Relaxed);
    }
    ALLOCATED.fetch_add(size, Relaxed);
    if block && size > LARGEST.load(Relaxed) {
        LARGEST.fetch_max(size, Relaxed);
    }
}

fn on_free(size: u64) {
    if COUNTING.load(Relaxed) {
        IN_USE.fetch_sub(size as i64, Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged and only
// updates counters beside it (no allocation, no panic), so `System`'s guarantees carry over.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            on_alloc(layout.size() as u64, true);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            on_alloc(layout.size() as u64, true);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        on_free(layout.size() as u64);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            let (old, new) = (layout.size() as u64, new_size as u64);
            if new >= old {
                on_alloc(new - old, false);
            } else {
                on_free(old - new);
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine's unit-test binary does not install the allocator: reading it says so
    /// instead of reporting zero bytes.
    #[test]
    fn not_installed_reads_as_none() {
        let v = vec![0u8; 1 << 20];
        std::hint::black_box(&v);
        assert_eq!(heap_stats(), None);
        assert!(!reset_heap_peak());
    }
}
