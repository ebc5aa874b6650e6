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
//! **Copies** go through pinned (page-locked) staging memory per context: host data is copied
//! into it, then `cuMemcpyHtoDAsync` reads it, so the caller's `Vec` is free as soon as the
//! call returns and the copy itself runs at full PCIe speed (a pageable source would be staged
//! by the driver, synchronously). An event per buffer records when it may be overwritten.
//! Uploads of at most [`SMALL_UPLOAD`] bytes (ids, masks, labels: the uploads inside a
//! forward) take the next slot of a ring of [`SMALL_SLOTS`]; larger ones and downloads go
//! through one large buffer, in chunks of at most [`STAGING_MAX`]. Device-to-host copies wait
//! for the stream, then copy out of the staging buffer. Copies run on the current stream like
//! everything else: outside a scope the student's, as before; inside a teacher scope the
//! teacher's, because the destination of an upload there was allocated on that stream and
//! the teacher's kernels read it there.
//!
//! Copies are where a scope's work touches the host, and each can make the host wait:
//! - a download (`dtoh`: `to_vec`, `to_scalar_f32`, ids or a mask read back for validation)
//!   waits until the current stream has run everything queued before it;
//! - a small upload waits for the copy that used its ring slot [`SMALL_SLOTS`] small uploads
//!   earlier (in practice never within a step), a large one for the previous large copy.
//!
//! Inside a teacher scope a download holds the host until the teacher's stream has caught up,
//! and the student's work queued after the scope cannot start overlapping before that. BERT's
//! forward reads ids in each `embedding` and in `gather_rows` (the masked positions, after the
//! encoder), and the attention's padding mask, on the host; an i32 tensor uploaded from the
//! host keeps its values there (`crate::host_copy`), so those reads download nothing whether
//! the batch is on the GPU or on the host.

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

    /// The address of the library workspace in `slot`, first grown to at least `bytes` on
    /// `ctx`'s current stream: the smaller one it replaces is freed on that stream, after the
    /// calls that used it (all queued there). 0 when no workspace was ever needed.
    pub(crate) fn workspace(
        ctx: &Arc<CudaContext>,
        slot: &mut Option<DeviceBuffer>,
        bytes: usize,
    ) -> Result<u64> {
        if bytes > slot.as_ref().map_or(0, |w| w.bytes) {
            *slot = Some(Self::alloc(ctx, bytes)?);
        }
        Ok(slot.as_ref().map_or(0, |w| w.ptr))
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
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

/// Uploads of at most this many bytes go through the ring of small staging slots.
pub(crate) const SMALL_UPLOAD: usize = 1 << 20;
/// Slots in the ring: more than the small uploads of one BERT-base forward (3 embeddings' ids,
/// a padding mask per layer, the masked positions), so a forward's uploads never wait for
/// each other, nor for those of the forward queued before it on another stream.
pub(crate) const SMALL_SLOTS: usize = 32;
// One BERT-base forward's small uploads (3 embeddings' ids, 12 masks, the masked positions),
// for a teacher and the student queued after it, fit the ring; and a batch of 128 x 128 ids
// (i32) or a [128, 1, 1, 128] f32 mask fits a slot.
const _: () = assert!(SMALL_SLOTS >= 2 * (3 + 12 + 1) && 128 * 128 * 4 <= SMALL_UPLOAD);

/// The pinned host buffers copies go through, each with the event after which it may be
/// reused: one large buffer (downloads, and uploads above [`SMALL_UPLOAD`]), and a ring of
/// small slots for the many small uploads inside a forward (ids, masks), so that one of them
/// waits only for the copy [`SMALL_SLOTS`] uploads earlier, not for the previous one: with a
/// single buffer every upload held the host until the stream had reached the previous upload,
/// and the host could never queue more than a layer ahead of the device, nor queue the
/// student's forward while the teacher's stream was still busy.
#[derive(Default)]
pub(crate) struct Staging {
    ptr: Option<PinnedPtr>,
    cap: usize,
    in_flight: Option<CudaEvent>,
    small: Vec<SmallSlot>,
    /// Uploads through the ring so far; the next one uses slot `next % SMALL_SLOTS`.
    next: usize,
}

/// One slot of the small-upload ring: [`SMALL_UPLOAD`] pinned bytes.
struct SmallSlot {
    ptr: PinnedPtr,
    in_flight: Option<CudaEvent>,
}

/// The ring slot of the `n`-th small upload.
pub(crate) fn ring_slot(n: usize) -> usize {
    n % SMALL_SLOTS
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

    /// The next ring slot (made on first use), once the copy that last used it has finished,
    /// as `len <= SMALL_UPLOAD` bytes; `finish_small` records the copy that uses it.
    fn small(&mut self, ctx: &CudaContext, len: usize) -> Result<(usize, &mut [u8])> {
        debug_assert!(len <= SMALL_UPLOAD);
        let i = ring_slot(self.next);
        if i == self.small.len() {
            ctx.bind()?;
            // SAFETY: plain page-locked allocation, owned by this struct.
            let p = unsafe { result::malloc_host(SMALL_UPLOAD, 0) }.map_err(|e| {
                driver_err(
                    ctx.ordinal(),
                    &format!("allocating {SMALL_UPLOAD} bytes of pinned host memory"),
                    e,
                )
            })?;
            self.small.push(SmallSlot {
                ptr: PinnedPtr(p as *mut u8),
                in_flight: None,
            });
        }
        // Counted once the slot exists, so that slots are made in ring order even after a
        // failed allocation.
        self.next = self.next.wrapping_add(1);
        let slot = &mut self.small[i];
        if let Some(ev) = slot.in_flight.take() {
            ev.synchronize()
                .map_err(|e| driver_err(ctx.ordinal(), "waiting for a staged copy", e))?;
        }
        // SAFETY: SMALL_UPLOAD >= len bytes owned by this struct, not in use by any copy
        // (waited for above), borrowed mutably through `&mut self`.
        Ok((i, unsafe {
            std::slice::from_raw_parts_mut(slot.ptr.0, len)
        }))
    }

    fn finish_small(&mut self, i: usize, ev: CudaEvent) {
        self.small[i].in_flight = Some(ev);
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
    if !src.is_empty() && src.len() <= SMALL_UPLOAD {
        let (i, pinned) = staging.small(ctx, src.len())?;
        pinned.copy_from_slice(src);
        ctx.bind()?;
        // SAFETY: the slot stays allocated and untouched until the event recorded below has
        // completed (`Staging::small` waits for it); `dst` spans `src.len()` bytes.
        unsafe { result::memcpy_htod_async(dst, &*pinned, stream.cu_stream()) }
            .map_err(|e| driver_err(ctx.ordinal(), "copying to the device", e))?;
        let ev = stream
            .record_event(None)
            .map_err(|e| driver_err(ctx.ordinal(), "recording a staged copy", e))?;
        staging.finish_small(i, ev);
        ctx.memory
            .bytes_to_device
            .fetch_add(src.len() as u64, Ordering::Relaxed);
        return Ok(());
    }
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
    fn small_uploads_cycle_through_the_ring() {
        let slots: Vec<usize> = (0..2 * SMALL_SLOTS + 3).map(ring_slot).collect();
        // The first SMALL_SLOTS uploads each get a slot of their own (made in that order,
        // which `Staging::small` relies on), then they come round again.
        assert_eq!(
            &slots[..SMALL_SLOTS],
            &(0..SMALL_SLOTS).collect::<Vec<_>>()[..]
        );
        assert_eq!(slots[SMALL_SLOTS], 0);
        assert_eq!(slots[2 * SMALL_SLOTS + 2], 2);
    }

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
