//! How the process's allocator treats the large, short-lived buffers of a training step.
//!
//! A step allocates and frees buffers of tens of megabytes (activations, gradients, BERT's
//! `[masked positions, vocabulary]` logits). glibc's malloc serves blocks above its mmap
//! threshold (128 KiB, rising to at most 32 MiB) with fresh `mmap`s and returns them to the
//! kernel on `free`, and it trims the top of the heap once 128 KiB are free there: every step
//! then pays a page fault and a page of zeroing per 4 KiB it touches, again and again. Measured
//! on BERT-tiny at batch 32 (docs/benchmarks-steps.md): a quarter of a training step and a
//! third of a teacher forward. [`keep_freed_memory`] tells malloc to keep freed memory for
//! reuse instead; the price is a resident set that stays at its peak.
//!
//! How many bytes a step holds at its peak is measured by [`CountingAllocator`] (in
//! `memory/counting.rs`), a global allocator a binary opts into: the CPU's twin of the GPU's
//! `cuda::alloc_stats`, read with [`heap_stats`].

mod counting;

pub use counting::{
    heap_stats, reset_heap_peak, start_heap_counting, CountingAllocator, HeapStats,
};

/// Asks glibc's malloc to serve large blocks from its heap and never trim it, so that memory
/// freed by one step is reused by the next without page faults. Returns whether the allocator
/// accepted (false on other C libraries, where it does nothing). Call it once at start-up,
/// before the threads that allocate exist; the `recycle` binary and benchmarks do.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's malloc.h: M_TRIM_THRESHOLD -1, M_MMAP_THRESHOLD -3.
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt only changes malloc's tuning parameters; any value is valid input
        // (out-of-range ones are rejected with 0).
        unsafe { mallopt(-3, i32::MAX) == 1 && mallopt(-1, i32::MAX) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
