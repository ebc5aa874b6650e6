//! Device memory and host↔device copies.
//!
//! **Allocation: stream-ordered, from the driver's pool.** Every buffer is allocated with
//! `cuMemAllocAsync` and freed with `cuMemFreeAsync` on the calling thread's current stream
//! (`CudaContext::compute_stream`: the student stream, or the stream of the `cuda::on_stream`
//! scope the thread is in), from the device's default memory pool, whose release threshold the
//! context raises to "never": a freed block goes back to the pool, not to the driver, and the
//! next allocation of a similar size reuses it without a device synchronisation. That makes the
//! driver's pool our caching allocator (PyTorch's is its own, for historical reasons: the
//! pools came with CUDA 11.2). Because allocation and free are ordered on the stream, a buffer
//! freed while kernels that read it are still queued on that stream stays valid until they
//! have run.
//!
//! **The free rule (several streams).** A buffer is freed on the stream current when its last
//! handle is dropped, which need not be the stream it was allocated or last used on. The free
//! is ordered after the work of *that* stream only, so: before a buffer is dropped on stream
//! S, every use of it queued on another stream must be ordered before S's current point by an
//! event S waits for. The scopes keep the rule by construction:
//! - a scope's temporaries (a teacher's activations) are allocated and dropped inside it, on
//!   its stream;
//! - a buffer made or used before a scope and dropped inside it is safe, since the scope's
//!   stream waited for the previous stream on entry;
//! - a scope's outputs (the teacher's logits) reach the previous stream only through
//!   `Pending::join`, which makes it wait for the scope's end first; a `Pending` dropped
//!   unjoined joins before dropping them.
//!
//! What breaks the rule: handing a buffer from inside a scope to the other stream by another
//! way (a clone stored outside the closure) and dropping it there before the join.
//!
//! The pool gives a block freed on one stream to an allocation on another only when the free
//! has already run on the device or an event orders it before the allocation (the context
//! turns the pool's "internal dependencies" off, see `context.rs`), so reuse across streams
//! never adds a hidden wait between them.
//!
//! Counters ([`super::AllocStats`]): allocations, frees, bytes in use and their peak, bytes
//! copied each way. A training step's allocation count is the difference of two snapshots.
//!
//! **Copies** go through one pinned (page-locked) staging buffer per context, in chunks of at
//! most [`STAGING_MAX`]: host data is copied into it, then `cuMemcpyHtoDAsync` reads it, so
//! the caller's `Vec` is free as soon as the call returns and the copy itself runs at full
//! PCIe speed (a pageable source would be staged by the driver, synchronously). An event
//! records when the staging buffer may be overwritten. Device-to-host copies wait for the
//! stream, then copy out of the staging buffer. Copies run on the current stream like
//! everything else: outside a scope the student's, as before; inside a teacher scope the
//! teacher's, because the destination of an upload there was allocated on that stream and
//! the teacher's kernels read it there.
//!
//! Copies are where a scope's work touches the host, and each is a point where the host waits:
//! - a download (`dtoh`: `to_vec`, `to_scalar_f32`, ids or a mask read back for validation)
//!   waits until the current stream has run everything queued before it;
//! - an upload waits until the previous upload (through the shared staging buffer, on any
//!   stream) has run.
//!
//! Inside a teacher scope either one holds the host until the teacher's stream has caught up
//! (to the download, or to the previous upload), and the student's work queued after the scope
//! cannot start overlapping before that. BERT's forward reads ids back in each `embedding` and
//! in `gather_rows` (the masked positions, after the encoder) when they are on the GPU, and
//! the attention's padding mask in every layer; so a BERT teacher with its batch on the GPU
//! overlaps the student little until those reads leave the forward's path.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, CudaEvent};

use super::context::{driver_err, CudaContext};
use super::AllocStats;
use crate::{Error, Result};

/// Largest chunk of one staged copy (and the staging buffer's largest size).
pub(crate) const STAGING_MAX: usize = 64 << 20;
/// Smallest staging buffer: batches of images or token ids fit at once.
pub(crate) const STAGING_MIN: usize = 1 << 20;

/// The memory counters of a context, and the first error a destructor could not report.
#[derive(Debug, Default)]
pub(crate) struct Memory {
    allocations: AtomicU64,
    frees: AtomicU64,
    bytes_in_use: AtomicU64,
    peak_bytes_in_use: AtomicU64,
    bytes_to_device: AtomicU64,
    bytes_to_host: AtomicU64,
    deferred: Mutex<Option<String>>,
    /// Fill every new allocation with 0xFF bytes (NaN as f32 and as bf16): the device check
    /// sets it so that an output element a kernel fails to write shows as NaN.
    pub(crate) poison: std::sync::atomic::AtomicBool,
}

impl Memory {
    pub(crate) fn stats(&self) -> AllocStats {
        AllocStats {
            allocations: self.allocations.load(Ordering::Relaxed),
            frees: self.frees.load(Ordering::Relaxed),
            bytes_in_use: self.bytes_in_use.load(Ordering::Relaxed),
            peak_bytes_in_use: self.peak_bytes_in_use.load(Ordering::Relaxed),
            bytes_to_device: self.bytes_to_device.load(Ordering::Relaxed),
            bytes_to_host: self.bytes_to_host.load(Ordering::Relaxed),
        }
    }

    fn on_alloc(&self, bytes: u64) {
        self.allocations.fetch_add(1, Ordering::Relaxed);
        let now = self.bytes_in_use.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak_bytes_in_use.fetch_max(now, Ordering::Relaxed);
    }

    /// Starts a new peak: the peak becomes the bytes in use now.
    pub(crate) fn reset_peak(&self) {
        let now = self.bytes_in_use.load(Ordering::Relaxed);
        self.peak_bytes_in_use.store(now, Ordering::Relaxed);
    }

    fn on_free(&self, bytes: u64) {
        self.frees.fetch_add(1, Ordering::Relaxed);
        self.bytes_in_use.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub(crate) fn defer(&self, msg: String) {
        let mut d = self.deferred.lock().unwrap_or_else(|e| e.into_inner());
        d.get_or_insert(msg);
    }

    pub(crate) fn take_deferred_error(&self, ordinal: usize) -> Result<()> {
        let mut d = self.deferred.lock().unwrap_or_else(|e| e.into_inner());
        match d.take() {
            Some(msg) => Err(Error::Device(format!("cuda:{ordinal}: {msg}"))),
            None => Ok(()),
        }
    }
}

/// One stream-ordered device allocation. Dropping it queues its free on the calling thread's
/// current stream (see the free rule in the module doc).
pub(crate) struct DeviceBuffer {
    ptr: u64,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceBuffer({} bytes on cuda:{})",
            self.bytes,
            self.ctx.ordinal()
        )
    }
}

impl DeviceBuffer {
    /// `bytes` of uninitialised device memory (no allocation for zero bytes: a null pointer).
    pub(crate) fn alloc(ctx: &Arc<CudaContext>, bytes: usize) -> Result<DeviceBuffer> {
        let mut ptr = 0;
        if bytes > 0 {
            ctx.bind()?;
            // SAFETY: the stream belongs to the current context; the memory is only used
            // through this buffer, ordered on the same stream.
            ptr = unsafe { result::malloc_async(ctx.compute_stream(), bytes) }.map_err(|e| {
                driver_err(
                    ctx.ordinal(),
                    &format!("allocating {bytes} bytes (cuMemAllocAsync)"),
                    e,
                )
            })?;
            ctx.memory.on_alloc(bytes as u64);
            if ctx.memory.poison.load(Ordering::Relaxed) {
                // SAFETY: `ptr` spans `bytes` of the allocation just made, on this stream.
                unsafe { result::memset_d8_async(ptr, 0xFF, bytes, ctx.compute_stream()) }
                    .map_err(|e| driver_err(ctx.ordinal(), "poisoning new device memory", e))?;
            }
        }
        Ok(DeviceBuffer {
            ptr,
            bytes,
            ctx: ctx.clone(),
        })
    }

    /// `bytes` of device memory set to zero.
    pub(crate) fn zeroed(ctx: &Arc<CudaContext>, bytes: usize) -> Result<DeviceBuffer> {
        let b = Self::alloc(ctx, bytes)?;
        memset_zero(ctx, b.ptr, bytes)?;
        Ok(b)
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        let freed = self.ctx.bind().map_err(|e| e.to_string()).and_then(|()| {
            // SAFETY: allocated on this stream by `alloc`, freed once, here.
            unsafe { result::free_async(self.ptr, self.ctx.compute_stream()) }
                .map_err(|e| format!("freeing {} bytes (cuMemFreeAsync): {e}", self.bytes))
        });
        match freed {
            Ok(()) => self.ctx.memory.on_free(self.bytes as u64),
            Err(msg) => self.ctx.memory.defer(msg),
        }
    }
}

/// The pinned host buffer copies go through, and the event after which it may be reused.
#[derive(Default)]
pub(crate) struct Staging {
    ptr: Option<PinnedPtr>,
    cap: usize,
    in_flight: Option<CudaEvent>,
}

#[derive(Clone, Copy)]
struct PinnedPtr(*mut u8);
// SAFETY: page-locked host memory, used only under the context's staging mutex.
unsafe impl Send for PinnedPtr {}

impl Staging {
    /// A pinned buffer of at least `len` bytes (`len <= STAGING_MAX`), once the previous copy
    /// through it has finished.
    fn ready(&mut self, ctx: &CudaContext, len: usize) -> Result<&mut [u8]> {
        if let Some(ev) = self.in_flight.take() {
            ev.synchronize()
                .map_err(|e| driver_err(ctx.ordinal(), "waiting for a staged copy", e))?;
        }
        if self.cap < len || self.ptr.is_none() {
            if let Some(PinnedPtr(p)) = self.ptr.take() {
                // SAFETY: allocated by malloc_host below; no copy is in flight any more.
                unsafe { result::free_host(p as *mut c_void) }.map_err(|e| {
                    driver_err(ctx.ordinal(), "freeing the pinned staging buffer", e)
                })?;
                self.cap = 0;
            }
            let cap = len.next_power_of_two().clamp(STAGING_MIN, STAGING_MAX);
            ctx.bind()?;
            // SAFETY: plain page-locked allocation, owned by this struct.
            let p = unsafe { result::malloc_host(cap, 0) }.map_err(|e| {
                driver_err(
                    ctx.ordinal(),
                    &format!("allocating {cap} bytes of pinned host memory"),
                    e,
                )
            })?;
            self.ptr = Some(PinnedPtr(p as *mut u8));
            self.cap = cap;
        }
        let PinnedPtr(p) = self.ptr.expect("allocated above");
        // SAFETY: `cap >= len` bytes of host memory owned by this struct, not in use by any
        // copy (waited for above), borrowed mutably through `&mut self`.
        Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
    }
}

fn lock_staging(ctx: &CudaContext) -> std::sync::MutexGuard<'_, Staging> {
    ctx.staging.lock().unwrap_or_else(|e| e.into_inner())
}

/// Copies `src` to device address `dst` through the pinned staging buffer, on the current
/// stream; returns once `src` may be dropped (the copy itself may still be running).
pub(crate) fn htod(ctx: &CudaContext, dst: u64, src: &[u8]) -> Result<()> {
    let mut staging = lock_staging(ctx);
    let stream = ctx.stream(ctx.current_role()).clone();
    for (i, chunk) in src.chunks(STAGING_MAX).enumerate() {
        let pinned = staging.ready(ctx, chunk.len())?;
        pinned.copy_from_slice(chunk);
        ctx.bind()?;
        // SAFETY: `pinned` stays allocated and untouched until the event recorded below has
        // completed (`Staging::ready` waits for it); `dst` spans `src.len()` bytes.
        unsafe {
            result::memcpy_htod_async(dst + (i * STAGING_MAX) as u64, &*pinned, stream.cu_stream())
        }
        .map_err(|e| driver_err(ctx.ordinal(), "copying to the device", e))?;
        let ev = stream
            .record_event(None)
            .map_err(|e| driver_err(ctx.ordinal(), "recording a staged copy", e))?;
        staging.in_flight = Some(ev);
    }
    ctx.memory
        .bytes_to_device
        .fetch_add(src.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// Copies `dst.len()` bytes from device address `src` into `dst`, after the work queued on
/// the current stream (the values are final when this returns).
pub(crate) fn dtoh(ctx: &CudaContext, src: u64, dst: &mut [u8]) -> Result<()> {
    let mut staging = lock_staging(ctx);
    let stream = ctx.stream(ctx.current_role()).clone();
    for (i, chunk) in dst.chunks_mut(STAGING_MAX).enumerate() {
        let pinned = staging.ready(ctx, chunk.len())?;
        ctx.bind()?;
        // SAFETY: `pinned` is ours until the synchronisation below; `src` spans the bytes.
        unsafe {
            result::memcpy_dtoh_async(
                &mut *pinned,
                src + (i * STAGING_MAX) as u64,
                stream.cu_stream(),
            )
        }
        .map_err(|e| driver_err(ctx.ordinal(), "copying to the host", e))?;
        stream.synchronize().map_err(|e| {
            driver_err(
                ctx.ordinal(),
                "waiting for a copy to the host (a kernel queued before it may have failed)",
                e,
            )
        })?;
        chunk.copy_from_slice(pinned);
    }
    ctx.memory
        .bytes_to_host
        .fetch_add(dst.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// Device-to-device copy of `bytes`, ordered on the current stream.
pub(crate) fn dtod(ctx: &CudaContext, dst: u64, src: u64, bytes: usize) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    ctx.bind()?;
    // SAFETY: both ranges are live device allocations of at least `bytes` from the offsets.
    unsafe { result::memcpy_dtod_async(dst, src, bytes, ctx.compute_stream()) }
        .map_err(|e| driver_err(ctx.ordinal(), "copying on the device", e))
}

/// Sets `bytes` at `dst` to zero, ordered on the current stream.
pub(crate) fn memset_zero(ctx: &CudaContext, dst: u64, bytes: usize) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    ctx.bind()?;
    // SAFETY: `dst` spans `bytes` of a live allocation.
    unsafe { result::memset_d8_async(dst, 0, bytes, ctx.compute_stream()) }
        .map_err(|e| driver_err(ctx.ordinal(), "zeroing device memory", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_peak_starts_from_the_bytes_in_use() {
        let m = Memory::default();
        m.on_alloc(100);
        m.on_alloc(50);
        m.on_free(100);
        assert_eq!(m.stats().peak_bytes_in_use, 150);
        m.reset_peak();
        assert_eq!(m.stats().peak_bytes_in_use, 50);
        m.on_alloc(30);
        m.on_free(30);
        let s = m.stats();
        assert_eq!((s.bytes_in_use, s.peak_bytes_in_use), (50, 80));
        assert_eq!((s.allocations, s.frees), (3, 2));
    }
}
