//! One rank per process: an NCCL communicator made from a unique id that rank 0 created and a
//! launcher handed to every rank (the torchrun-style rendezvous, or MPI), and the in-place mean
//! of a flat gradient buffer, or of a contiguous range of it (a bucket), across the ranks.
//!
//! Rank 0 calls [`NcclId::new`] (`ncclGetUniqueId`); every rank then makes its
//! [`RankComm`] with the same id on its own GPU, `cuda:LOCAL_RANK`
//! ([`RankComm::for_local_rank`]). The communicator is made without blocking
//! (`ncclCommInitRankConfig` with `blocking = 0`) and polled (`ncclCommGetAsyncError`) until it
//! is ready or the timeout passes: a rank that received the id but never joins makes the others
//! abort (`ncclCommAbort`) with an error, not wait forever inside NCCL.
//!
//! Ordering, as in [`super::AllReduceGroup`]: [`RankComm::reduce_bucket`] makes the
//! communication stream wait on an event recorded on the student stream (where the backward
//! that wrote the bucket was queued) and queues the reduction there, without blocking the host
//! or the student stream, so the rest of the backward can run beside it.
//! [`RankComm::join_student`] then makes the student stream wait for every reduction queued
//! so far (before the optimizer reads the gradients). The buffers are kept alive until then.
//!
//! NCCL reports a peer that is gone asynchronously: its collective never completes on this
//! rank's stream. [`RankComm::wait`] waits on the host for the queued reductions while polling
//! `ncclCommGetAsyncError`; an error or the timeout aborts the communicator (`ncclCommAbort`)
//! and becomes an error naming this rank and what to do, never a hang. After that the
//! communicator refuses further work.
//!
//! The argument rules (rank, world, id length, device, dtype, bucket range) run before any
//! library is touched and are unit-tested on the CPU.

use std::ops::Range;
use std::time::Duration;

use crate::{DType, Device, Error, Result, Tensor};

const OP: &str = "RankComm";

/// `NCCL_UNIQUE_ID_BYTES`.
pub const NCCL_ID_BYTES: usize = 128;

/// The unique id that names one communicator: made on rank 0, sent to every rank as bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct NcclId(pub [u8; NCCL_ID_BYTES]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId({:02x?}..)", &self.0[..8])
    }
}

#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
impl NcclId {
    /// The id as received from rank 0: exactly [`NCCL_ID_BYTES`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<NcclId> {
        let id: [u8; NCCL_ID_BYTES] = bytes.try_into().map_err(|_| {
            Error::invalid(
                OP,
                format!(
                    "an NCCL unique id of {} bytes; it is {NCCL_ID_BYTES} bytes, made by \
                     ncclGetUniqueId on rank 0 and sent unchanged to every rank",
                    bytes.len()
                ),
            )
        })?;
        Ok(NcclId(id))
    }

    /// A new id (`ncclGetUniqueId`), on rank 0, with `device` (rank 0's GPU) opened first so
    /// that a missing driver or GPU is reported as such.
    pub fn new(device: Device) -> Result<NcclId> {
        let ordinal = gpu_ordinal(device)?;
        with_backend!(ordinal, cuda_impl::unique_id(ordinal))
    }
}

fn gpu_ordinal(device: Device) -> Result<usize> {
    match device {
        Device::Cuda(n) => Ok(n),
        Device::Cpu => Err(Error::invalid(
            OP,
            "cpu: an NCCL communicator reduces on a GPU (cuda:N); CPU ranks reduce with MPI"
                .to_string(),
        )),
    }
}

/// `rank` of `world`: at least one rank, the rank below the world size.
pub fn check_rank(rank: usize, world: usize) -> Result<()> {
    if world == 0 {
        return Err(Error::invalid(
            OP,
            "world size 0: a communicator has at least one rank".to_string(),
        ));
    }
    if rank >= world {
        return Err(Error::invalid(
            OP,
            format!("rank {rank} of world size {world}: ranks are 0..{world}"),
        ));
    }
    if world > i32::MAX as usize {
        return Err(Error::invalid(
            OP,
            format!("world size {world} is too large"),
        ));
    }
    Ok(())
}

/// Checks that `grads` can be reduced by the communicator of `device`, over `range` of its
/// elements: on that GPU, f32 or bf16, the range non-empty and inside the buffer.
pub fn check_bucket(device: Device, grads: &Tensor, range: &Range<usize>) -> Result<()> {
    if grads.device() != device {
        return Err(Error::invalid(
            OP,
            format!(
                "the gradient buffer is on {}, but this rank's communicator is on {device}",
                grads.device()
            ),
        ));
    }
    if !matches!(grads.dtype(), DType::F32 | DType::BF16) {
        return Err(Error::invalid(
            OP,
            format!(
                "a {:?} buffer: gradients are reduced in f32 or bf16",
                grads.dtype()
            ),
        ));
    }
    let len = grads.elem_count();
    if range.start >= range.end || range.end > len {
        return Err(Error::invalid(
            OP,
            format!(
                "bucket {range:?} of a buffer of {len} elements: a bucket is a non-empty range \
                 inside the buffer"
            ),
        ));
    }
    Ok(())
}

/// This process's rank of an NCCL communicator across processes.
pub struct RankComm {
    rank: usize,
    world: usize,
    device: Device,
    #[cfg(feature = "cuda")]
    inner: cuda_impl::Inner,
}

impl std::fmt::Debug for RankComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RankComm(rank {} of {}, {})",
            self.rank, self.world, self.device
        )
    }
}

#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
impl RankComm {
    /// Rank `rank` of `world` on `device`, from rank 0's `id`. Returns once every rank has
    /// made its part (NCCL's rule); after `timeout` without them, aborts the half-made
    /// communicator and fails naming this rank.
    pub fn new(
        device: Device,
        rank: usize,
        world: usize,
        id: &NcclId,
        timeout: Duration,
    ) -> Result<RankComm> {
        let ordinal = gpu_ordinal(device)?;
        check_rank(rank, world)?;
        with_backend!(ordinal, {
            let inner = cuda_impl::Inner::init(ordinal, rank, world, id, timeout)?;
            Ok(RankComm {
                rank,
                world,
                device,
                inner,
            })
        })
    }

    /// The same on this machine's GPU number `local_rank` (`LOCAL_RANK`: one GPU per process).
    pub fn for_local_rank(
        local_rank: usize,
        rank: usize,
        world: usize,
        id: &NcclId,
        timeout: Duration,
    ) -> Result<RankComm> {
        RankComm::new(Device::Cuda(local_rank), rank, world, id, timeout).map_err(|e| match e {
            Error::Device(m) => Error::Device(format!(
                "LOCAL_RANK={local_rank} (rank {rank} of {world}): {m}; each process of a \
                 machine takes the GPU numbered by its LOCAL_RANK, so start at most as many \
                 processes per machine as it has GPUs"
            )),
            other => other,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Queues the in-place mean over the ranks of `grads[range]` on the communication stream,
    /// after the work queued so far on the student stream. Returns without waiting; call
    /// [`RankComm::join_student`] before the student stream uses the buffer again.
    pub fn reduce_bucket(&mut self, grads: &Tensor, range: Range<usize>) -> Result<()> {
        check_bucket(self.device, grads, &range)?;
        with_backend!(
            gpu_ordinal(self.device)?,
            self.inner
                .reduce(self.rank, self.world, grads, range, cuda_impl::Op::Avg)
        )
    }

    /// Replaces the host values `data` with their elementwise sum over the ranks (the same bits
    /// on every rank), through a buffer on this rank's GPU: for the small collectives of a run
    /// (a broadcast is a sum where only the root's values are not zero). Blocks until done or
    /// `timeout` passes, as [`RankComm::wait`].
    pub fn all_reduce_sum_host(&mut self, data: &mut [f32], timeout: Duration) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let buf = Tensor::from_vec(data.to_vec(), &[data.len()], self.device)?;
        check_bucket(self.device, &buf, &(0..data.len()))?;
        with_backend!(gpu_ordinal(self.device)?, {
            let (rank, world) = (self.rank, self.world);
            let sum = cuda_impl::Op::Sum;
            self.inner.reduce(rank, world, &buf, 0..data.len(), sum)?;
            self.join_student()?;
            self.wait(timeout)?;
            data.copy_from_slice(&buf.to_vec_f32()?);
            Ok(())
        })
    }

    /// Makes the student stream's later work wait for every reduction queued so far.
    pub fn join_student(&mut self) -> Result<()> {
        with_backend!(
            gpu_ordinal(self.device)?,
            self.inner.join_student(self.rank, self.world)
        )
    }

    /// The whole buffer's mean, ordered before the student stream's later work.
    pub fn all_reduce_mean(&mut self, grads: &Tensor) -> Result<()> {
        self.reduce_bucket(grads, 0..grads.elem_count())?;
        self.join_student()
    }

    /// Waits on the host until the reductions queued so far have finished, watching for
    /// NCCL's asynchronous errors; an error, or `timeout` passing, aborts the communicator.
    pub fn wait(&mut self, timeout: Duration) -> Result<()> {
        with_backend!(
            gpu_ordinal(self.device)?,
            self.inner.wait(self.rank, self.world, timeout)
        )
    }
}

#[cfg(feature = "cuda")]
mod cuda_impl {
    use std::ops::Range;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use cudarc::nccl::{result, sys};

    use super::super::libs::{self, Library};
    use super::super::{context, CudaContext, StreamRole};
    use super::{NcclId, NCCL_ID_BYTES};
    use crate::{DType, Error, Result, Tensor};

    fn nccl_err(
        ordinal: usize,
        rank: usize,
        world: usize,
        what: &str,
        e: sys::ncclResult_t,
    ) -> Error {
        Error::Device(format!(
            "cuda:{ordinal}, rank {rank} of {world}: NCCL failed {what}: {e:?}; check that every \
             rank was started with the same WORLD_SIZE and the same id, that the other ranks are \
             still running (their logs say why one stopped), and that libnccl.so.2 matches the \
             driver"
        ))
    }

    pub(super) fn unique_id(ordinal: usize) -> Result<NcclId> {
        let ctx = context::get(ordinal)?;
        libs::require(Library::Nccl, ordinal)?;
        libs::guarded(Library::Nccl, ordinal, || {
            ctx.bind()?;
            let id = result::get_uniqueid()
                .map_err(|e| nccl_err(ordinal, 0, 1, "making the unique id", e.0))?;
            let mut bytes = [0u8; NCCL_ID_BYTES];
            for (b, c) in bytes.iter_mut().zip(id.internal) {
                *b = c as u8;
            }
            Ok(NcclId(bytes))
        })
    }

    /// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: every other field undefined (NCCL's
    /// defaults), the struct's size, magic and the API version the bindings describe.
    fn nonblocking_config() -> sys::ncclConfig_t {
        const UNDEF: std::ffi::c_int = i32::MIN;
        sys::ncclConfig_t {
            size: std::mem::size_of::<sys::ncclConfig_t>(),
            magic: 0xcafe_beef,
            version: 2_30_00,
            blocking: 0,
            cgaClusterSize: UNDEF,
            minCTAs: UNDEF,
            maxCTAs: UNDEF,
            netName: std::ptr::null(),
            splitShare: UNDEF,
            trafficClass: UNDEF,
            commName: std::ptr::null(),
            collnetEnable: UNDEF,
            CTAPolicy: UNDEF,
            shrinkShare: UNDEF,
            nvlsCTAs: UNDEF,
            nChannelsPerNetPeer: UNDEF,
            nvlinkCentricSched: UNDEF,
            graphUsageMode: UNDEF,
            numRmaCtx: UNDEF,
            maxP2pPeers: UNDEF,
        }
    }

    /// The reduction of a collective.
    #[derive(Debug, Clone, Copy)]
    pub(super) enum Op {
        Sum,
        Avg,
    }

    /// The communicator (null once aborted), its context, and the buffers of reductions the
    /// student stream has not joined yet.
    pub(super) struct Inner {
        ctx: Arc<CudaContext>,
        comm: sys::ncclComm_t,
        pending: Vec<Tensor>,
        /// How long a call of this non-blocking communicator may stay in progress.
        timeout: Duration,
    }

    // SAFETY: a communicator may be used from any thread, one call at a time; `RankComm` uses
    // it only through `&mut self` and `Drop`.
    unsafe impl Send for Inner {}

    impl Inner {
        /// `ncclCommInitRankConfig` without blocking, then polls until the communicator is
        /// ready, fails, or `timeout` passes (then it is aborted).
        pub(super) fn init(
            ordinal: usize,
            rank: usize,
            world: usize,
            id: &NcclId,
            timeout: Duration,
        ) -> Result<Inner> {
            let ctx = context::get(ordinal)?;
            libs::require(Library::Nccl, ordinal)?;
            let mut internal = [0 as std::ffi::c_char; NCCL_ID_BYTES];
            for (c, b) in internal.iter_mut().zip(id.0) {
                *c = b as std::ffi::c_char;
            }
            let mut config = nonblocking_config();
            let mut comm: sys::ncclComm_t = std::ptr::null_mut();
            let started = libs::guarded(Library::Nccl, ordinal, || {
                ctx.bind()?;
                // SAFETY: `comm` receives one communicator; the id is passed by value and the
                // config is read during the call.
                let r = unsafe {
                    sys::ncclCommInitRankConfig(
                        &mut comm,
                        world as i32,
                        sys::ncclUniqueId { internal },
                        rank as i32,
                        &mut config,
                    )
                };
                match r {
                    sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
                    e => Err(nccl_err(
                        ordinal,
                        rank,
                        world,
                        "joining the communicator",
                        e,
                    )),
                }
            });
            let mut inner = Inner {
                ctx,
                comm,
                pending: Vec::new(),
                timeout,
            };
            if let Err(e) = started {
                inner.abort();
                return Err(e);
            }
            inner.settle(
                rank,
                world,
                timeout,
                "joining the communicator",
                "a rank that received the id never joined (it stopped, hangs, or was given \
                 another id or world size); check the other ranks' logs, or allow a longer \
                 timeout for slow starts",
            )?;
            Ok(inner)
        }

        /// Waits until the communicator has no NCCL call in progress (a non-blocking
        /// communicator's calls may return before their work is done): polls
        /// `ncclCommGetAsyncError` until it reports success; an error, or `timeout` passing,
        /// aborts the communicator.
        fn settle(
            &mut self,
            rank: usize,
            world: usize,
            timeout: Duration,
            what: &str,
            stalled: &str,
        ) -> Result<()> {
            let start = Instant::now();
            loop {
                let mut state = sys::ncclResult_t::ncclInProgress;
                // SAFETY: a communicator made by ncclCommInitRankConfig; `state` receives one
                // result.
                let asked = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
                let why = match (asked, state) {
                    (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclSuccess) => {
                        return Ok(())
                    }
                    (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclInProgress) => {
                        if start.elapsed() < timeout {
                            std::thread::sleep(Duration::from_millis(1));
                            continue;
                        }
                        format!(
                            "NCCL was still {what} after {:.1} s: {stalled}",
                            timeout.as_secs_f64()
                        )
                    }
                    (sys::ncclResult_t::ncclSuccess, e) => format!(
                        "NCCL failed {what}: {e:?} (ncclRemoteError: another rank's process \
                         exited or the network between them failed)"
                    ),
                    (e, _) => format!("asking NCCL for errors failed while {what}: {e:?}"),
                };
                return Err(self.fail(rank, world, why));
            }
        }

        fn live(&self, rank: usize, world: usize) -> Result<()> {
            if self.comm.is_null() {
                return Err(Error::Device(format!(
                    "cuda:{}, rank {rank} of {world}: the NCCL communicator was aborted after an \
                     earlier error; stop this rank and restart the launch",
                    self.ctx.ordinal()
                )));
            }
            Ok(())
        }

        pub(super) fn reduce(
            &mut self,
            rank: usize,
            world: usize,
            grads: &Tensor,
            range: Range<usize>,
            op: Op,
        ) -> Result<()> {
            self.live(rank, world)?;
            // Reduced in place.
            let v = grads.cuda_view_mut("RankComm::reduce_bucket")?;
            let ptr = v.ptr + (range.start * v.dtype.size_in_bytes()) as u64;
            let count = range.end - range.start;
            if let Err(e) = self.ctx.join(StreamRole::Comm, StreamRole::Student) {
                return Err(self.explain(rank, world, e));
            }
            // Kept alive until the student stream has waited for this reduction.
            self.pending.push(grads.clone());
            let ordinal = self.ctx.ordinal();
            let stream = self.ctx.stream(StreamRole::Comm).cu_stream();
            let comm = self.comm;
            let queued = libs::guarded(Library::Nccl, ordinal, || {
                self.ctx.bind()?;
                // SAFETY: `ptr` spans `count` elements of the buffer on this communicator's
                // GPU, kept alive by `pending` until the student stream has waited for the
                // communication stream; in place (send = receive buffer) is allowed by NCCL.
                unsafe {
                    result::all_reduce(
                        ptr as *const std::ffi::c_void,
                        ptr as *mut std::ffi::c_void,
                        count,
                        match v.dtype {
                            DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
                            _ => sys::ncclDataType_t::ncclFloat32,
                        },
                        match op {
                            Op::Sum => sys::ncclRedOp_t::ncclSum,
                            Op::Avg => sys::ncclRedOp_t::ncclAvg,
                        },
                        comm,
                        stream as sys::cudaStream_t,
                    )
                }
                .map_err(|e| nccl_err(ordinal, rank, world, "queueing an all-reduce", e.0))
            });
            match queued {
                // A non-blocking communicator may still be queueing the collective.
                Ok(result::NcclStatus::InProgress) => self.settle(
                    rank,
                    world,
                    self.timeout,
                    "queueing an all-reduce",
                    "a rank stalled or never reached the same collective",
                ),
                Ok(_) => Ok(()),
                Err(e) => Err(self.explain(rank, world, e)),
            }
        }

        pub(super) fn join_student(&mut self, rank: usize, world: usize) -> Result<()> {
            self.live(rank, world)?;
            if let Err(e) = self.ctx.join(StreamRole::Student, StreamRole::Comm) {
                return Err(self.explain(rank, world, e));
            }
            // The student stream now orders every later free of these buffers after the
            // reductions.
            self.pending.clear();
            Ok(())
        }

        /// NCCL's asynchronous error, if it has one (or cannot be asked).
        fn async_error(&self) -> Option<String> {
            let mut async_err = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator; `async_err` receives one result.
            let asked = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut async_err) };
            if asked != sys::ncclResult_t::ncclSuccess {
                Some(format!("asking NCCL for errors failed: {asked:?}"))
            } else if !matches!(
                async_err,
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
            ) {
                Some(format!(
                    "NCCL reported {async_err:?} for a queued all-reduce (ncclRemoteError: \
                     another rank's process exited or the network between them failed)"
                ))
            } else {
                None
            }
        }

        /// Aborts the communicator and says why, for the user.
        fn fail(&mut self, rank: usize, world: usize, why: String) -> Error {
            self.abort();
            Error::Device(format!(
                "cuda:{}, rank {rank} of {world}: {why}; the communicator was aborted; the other \
                 ranks' logs name the one that stopped; restart the launch",
                self.ctx.ordinal()
            ))
        }

        /// A driver error met while queueing: a failed collective makes every later call on
        /// the context fail, so NCCL's own account, when it has one, replaces the driver's.
        fn explain(&mut self, rank: usize, world: usize, e: Error) -> Error {
            match self.async_error() {
                Some(why) => self.fail(rank, world, format!("{why} (then: {e})")),
                None => e,
            }
        }

        /// Polls the communication stream's progress and NCCL's asynchronous error.
        pub(super) fn wait(&mut self, rank: usize, world: usize, timeout: Duration) -> Result<()> {
            self.live(rank, world)?;
            let event = match self.ctx.record(StreamRole::Comm) {
                Ok(e) => e,
                Err(e) => return Err(self.explain(rank, world, e)),
            };
            let start = Instant::now();
            loop {
                let done = event.try_is_complete();
                let failure = match (self.async_error(), done) {
                    (Some(why), _) => Some(why),
                    (None, Ok(true)) => {
                        self.pending.clear();
                        return Ok(());
                    }
                    (None, Ok(false)) if start.elapsed() >= timeout => Some(format!(
                        "the queued all-reduces did not finish within {:.1} s (a rank stalled \
                         or never reached the same collective)",
                        timeout.as_secs_f64()
                    )),
                    (None, Ok(false)) => None,
                    (None, Err(e)) => Some(format!(
                        "the communication stream failed ({e:?}) and NCCL reported no error of \
                         its own"
                    )),
                };
                if let Some(why) = failure {
                    return Err(self.fail(rank, world, why));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        fn abort(&mut self) {
            if !self.comm.is_null() {
                // SAFETY: a live communicator, aborted once; its queued work is abandoned
                // (the buffers in `pending` stay alive with `self`).
                let _ = unsafe { result::comm_abort(self.comm) };
                self.comm = std::ptr::null_mut();
            }
        }
    }

    impl Drop for Inner {
        fn drop(&mut self) {
            if !self.comm.is_null() {
                // SAFETY: made by `ncclCommInitRank`, destroyed once, here. A failure cannot
                // be reported from a destructor.
                let _ = unsafe { result::comm_destroy(self.comm) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_and_ids_are_checked() {
        assert!(check_rank(0, 1).is_ok() && check_rank(3, 4).is_ok());
        let e = check_rank(0, 0).unwrap_err().to_string();
        assert!(e.contains("at least one rank"), "{e}");
        let e = check_rank(4, 4).unwrap_err().to_string();
        assert!(e.contains("rank 4 of world size 4"), "{e}");
        let e = NcclId::from_bytes(&[0u8; 127]).unwrap_err().to_string();
        assert!(e.contains("127 bytes") && e.contains("128"), "{e}");
        let id = NcclId::from_bytes(&[7u8; 128]).unwrap();
        assert_eq!(id.0, [7u8; 128]);
        let e = NcclId::new(Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("cuda:N"), "{e}");
    }

    #[test]
    fn buckets_are_checked() {
        let t = Tensor::zeros(&[10], DType::F32, Device::Cpu).unwrap();
        // The rules other than the device, against a communicator "on" the CPU tensor's device.
        assert!(check_bucket(Device::Cpu, &t, &(0..10)).is_ok());
        assert!(check_bucket(Device::Cpu, &t, &(3..4)).is_ok());
        let e = check_bucket(Device::Cpu, &t, &(4..11))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bucket 4..11 of a buffer of 10"), "{e}");
        let e = check_bucket(Device::Cpu, &t, &(5..5))
            .unwrap_err()
            .to_string();
        assert!(e.contains("non-empty"), "{e}");
        let e = check_bucket(Device::Cuda(0), &t, &(0..10))
            .unwrap_err()
            .to_string();
        assert!(e.contains("on cpu") && e.contains("cuda:0"), "{e}");
        let i = Tensor::zeros(&[10], DType::I32, Device::Cpu).unwrap();
        let e = check_bucket(Device::Cpu, &i, &(0..10))
            .unwrap_err()
            .to_string();
        assert!(e.contains("f32 or bf16"), "{e}");
    }

    #[test]
    fn without_a_gpu_making_a_rank_is_an_error() {
        // No driver here (or no backend in this build): an error naming the device, never a
        // panic; where the mock or a GPU is present, one rank alone needs nobody.
        let id = match NcclId::new(Device::Cuda(0)) {
            Ok(id) => id,
            Err(e) => {
                assert!(
                    std::env::var_os("RECYCLE_EXPECT_CUDA").is_none(),
                    "RECYCLE_EXPECT_CUDA is set, but cuda:0 does not open: {e}"
                );
                assert!(e.to_string().contains("cuda:0"), "{e}");
                return;
            }
        };
        let c = RankComm::for_local_rank(0, 0, 1, &id, Duration::from_secs(30)).unwrap();
        assert_eq!(
            (c.rank(), c.world_size(), c.device()),
            (0, 1, Device::Cuda(0))
        );
    }
}
