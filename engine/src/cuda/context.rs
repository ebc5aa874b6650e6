//! One context per GPU: the primary context, three streams, the loaded kernel families, the
//! memory counters and the pinned staging buffer. Contexts are made on first use of `cuda:N`
//! and live for the rest of the process (a training process keeps its GPU).

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result, sys, CudaEvent, CudaStream};

use super::blas::Blas;
use super::dnn::Dnn;
use super::memory::{Memory, Staging};
use super::probe::{self, Probe};
use super::{AllocStats, DeviceInfo, StreamRole};
use crate::{Error, Result};

/// A `CUmodule` or `CUfunction`: plain handles, valid as long as the context; used from any
/// thread once the context is current there.
#[derive(Clone, Copy)]
struct Handle<T>(T);
// SAFETY: driver handles are process-wide; the driver serialises access to them.
unsafe impl<T> Send for Handle<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Handle<T> {}

pub(crate) struct CudaContext {
    info: DeviceInfo,
    ctx: Arc<cudarc::driver::CudaContext>,
    student: Arc<CudaStream>,
    teacher: Arc<CudaStream>,
    comm: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Handle<sys::CUmodule>>>,
    functions: Mutex<HashMap<&'static str, Handle<sys::CUfunction>>>,
    pub(crate) memory: Memory,
    /// The device's default memory pool, which every buffer comes from.
    pool: Handle<sys::CUmemoryPool>,
    pub(crate) staging: Mutex<Staging>,
    /// cuBLASLt: handle, plans by shape, workspace; made on the first product.
    pub(crate) blas: Mutex<Option<Blas>>,
    /// cuDNN: handle, convolution plans by shape, workspace; made on the first convolution.
    pub(crate) dnn: Mutex<Option<Dnn>>,
}

impl std::fmt::Debug for CudaContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaContext(cuda:{}, {})",
            self.info.ordinal, self.info.name
        )
    }
}

/// The context of `cuda:ordinal`, made (after the probe) on first use.
pub(crate) fn get(ordinal: usize) -> Result<Arc<CudaContext>> {
    static CONTEXTS: OnceLock<Mutex<HashMap<usize, Arc<CudaContext>>>> = OnceLock::new();
    let contexts = CONTEXTS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = contexts.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = map.get(&ordinal) {
        return Ok(c.clone());
    }
    let probe = probe::probe(ordinal).map_err(Error::Device)?;
    // The probe checked the driver version, so every symbol cudarc looks up exists; a panic
    // from it would still be a bug in this assumption, so it becomes an error, not an abort.
    let made = super::libs::unpanicked(
        || CudaContext::new(ordinal, probe),
        |what| format!("cuda:{ordinal}: the CUDA bindings failed while making the context: {what}"),
    )?;
    let made = Arc::new(made);
    map.insert(ordinal, made.clone());
    Ok(made)
}

/// A driver call's failure as an engine error.
pub(crate) fn driver_err(ordinal: usize, what: &str, e: result::DriverError) -> Error {
    Error::Device(format!("cuda:{ordinal}: {what}: {e}"))
}

impl CudaContext {
    fn new(ordinal: usize, probe: Probe) -> Result<CudaContext> {
        let err = |what: &'static str| move |e| driver_err(ordinal, what, e);
        let ctx = cudarc::driver::CudaContext::new(ordinal)
            .map_err(err("creating the primary context"))?;
        if !ctx.has_async_alloc() {
            return Err(Error::Device(format!(
                "cuda:{ordinal} ({}) does not support stream-ordered allocation (memory \
                 pools), which recycle's CUDA backend allocates with",
                probe.name
            )));
        }
        // Keep freed blocks in the device's pool instead of returning them to the driver at
        // every synchronisation: from the second step on, a step's allocations come from the
        // pool (the caching allocator is the driver's).
        // SAFETY: the device handle comes from the context just made; the release threshold
        // takes a u64, the reuse policy an int.
        let pool = unsafe {
            let pool = result::device::get_default_mem_pool(ctx.cu_device())
                .map_err(err("cuDeviceGetDefaultMemPool"))?;
            let mut threshold: u64 = u64::MAX;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut c_void,
            )
            .map_err(err("setting the memory pool's release threshold"))?;
            // The pool may hand a block freed on one stream to an allocation on another
            // before the free has run on the device by making the allocating stream wait for
            // the freeing one ("internal dependencies"). With the teacher's forward on its own
            // stream that wait would tie the student's allocations to the teacher's progress
            // and undo the overlap the teacher stream exists for. Without it, a block freed on
            // another stream is reused once its free has completed (opportunistic reuse) or
            // when an event orders the two (the scopes' joins); until then the pool grows,
            // by at most what the two streams hold at once.
            let mut no: i32 = 0;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES,
                &mut no as *mut i32 as *mut c_void,
            )
            .map_err(err("setting the memory pool's reuse policy"))?;
            pool
        };
        let stream = |role: &str| {
            ctx.new_stream()
                .map_err(|e| driver_err(ordinal, &format!("creating the {role} stream"), e))
        };
        let (student, teacher, comm) = (stream("student")?, stream("teacher")?, stream("comm")?);
        let (major, minor) = probe.compute_capability;
        Ok(CudaContext {
            info: DeviceInfo {
                ordinal,
                name: probe.name,
                compute_capability: (major, minor),
                driver_version: probe.driver_version,
                total_memory: probe.total_memory,
                kernel_image: probe.kernel_image,
            },
            ctx,
            student,
            teacher,
            comm,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            memory: Memory::default(),
            pool: Handle(pool),
            staging: Mutex::new(Staging::default()),
            blas: Mutex::new(None),
            dnn: Mutex::new(None),
        })
    }

    pub(crate) fn ordinal(&self) -> usize {
        self.info.ordinal
    }

    pub(crate) fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Makes this context current on the calling thread (cheap when it already is).
    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_err(self.ordinal(), "making the context current", e))
    }

    pub(crate) fn stream(&self, role: StreamRole) -> &Arc<CudaStream> {
        match role {
            StreamRole::Student => &self.student,
            StreamRole::Teacher => &self.teacher,
            StreamRole::Comm => &self.comm,
        }
    }

    /// The role whose stream the calling thread's work on this GPU goes to: the student's
    /// outside any scope, the scope's inside `cuda::on_stream` (see `scope.rs`).
    pub(crate) fn current_role(&self) -> StreamRole {
        super::scope::role_of(self.ordinal())
    }

    /// The stream every engine op of the calling thread runs on now, and on which memory is
    /// allocated, freed and copied: the current role's.
    pub(crate) fn compute_stream(&self) -> sys::CUstream {
        self.stream(self.current_role()).cu_stream()
    }

    /// An event marking the work queued so far on `role`'s stream.
    pub(crate) fn record(&self, role: StreamRole) -> Result<CudaEvent> {
        self.bind()?;
        self.stream(role)
            .record_event(None)
            .map_err(|e| driver_err(self.ordinal(), "recording an event", e))
    }

    /// Makes `role`'s stream wait (on the device, not the host) for `event`.
    pub(crate) fn wait(&self, role: StreamRole, event: &CudaEvent) -> Result<()> {
        self.bind()?;
        self.stream(role)
            .wait(event)
            .map_err(|e| driver_err(self.ordinal(), "waiting for an event", e))
    }

    /// Orders `to` after the work queued so far on `from` (e.g. the student's loss after the
    /// teacher's forward).
    #[allow(dead_code)]
    pub(crate) fn join(&self, to: StreamRole, from: StreamRole) -> Result<()> {
        let event = self.record(from)?;
        self.wait(to, &event)
    }

    /// Waits for all three streams, then reports any error a destructor deferred.
    pub(crate) fn synchronize(&self) -> Result<()> {
        self.bind()?;
        for role in [StreamRole::Student, StreamRole::Teacher, StreamRole::Comm] {
            self.stream(role).synchronize().map_err(|e| {
                driver_err(
                    self.ordinal(),
                    &format!("synchronising the {role:?} stream (a kernel failed before)"),
                    e,
                )
            })?;
        }
        self.memory.take_deferred_error(self.ordinal())
    }

    pub(crate) fn alloc_stats(&self) -> AllocStats {
        self.memory.stats()
    }

    /// The device memory the pool holds now (`CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT`): what
    /// the engine's buffers occupy on the device, with the blocks freed into the pool and
    /// kept for reuse (the release threshold is "never", so it only grows).
    pub(crate) fn pool_reserved_bytes(&self) -> Result<u64> {
        self.bind()?;
        let mut v: u64 = 0;
        // SAFETY: the pool is the device's default pool, alive as long as the context; the
        // attribute is a cuuint64_t.
        unsafe {
            result::mem_pool::get_attribute(
                self.pool.0,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
                &mut v as *mut u64 as *mut c_void,
            )
        }
        .map_err(|e| driver_err(self.ordinal(), "reading the memory pool's size", e))?;
        Ok(v)
    }

    /// The function `kernel` of `family`, loading the family's fatbin on first use.
    pub(crate) fn function(
        &self,
        family: &'static str,
        kernel: &'static str,
    ) -> Result<sys::CUfunction> {
        if let Some(f) = self.lock_functions().get(kernel) {
            return Ok(f.0);
        }
        let module = self.module(family)?;
        let name = CString::new(kernel).map_err(|_| {
            Error::invalid("cuda launch", format!("kernel name {kernel:?} holds a NUL"))
        })?;
        self.bind()?;
        // SAFETY: the module is loaded in this context and stays loaded.
        let f = unsafe { result::module::get_function(module, name) }.map_err(|e| {
            driver_err(
                self.ordinal(),
                &format!("kernel {kernel} is not in the {family} module"),
                e,
            )
        })?;
        self.lock_functions().insert(kernel, Handle(f));
        Ok(f)
    }

    fn lock_functions(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<&'static str, Handle<sys::CUfunction>>> {
        self.functions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn module(&self, family: &'static str) -> Result<sys::CUmodule> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(family) {
            return Ok(m.0);
        }
        let image = recycle_kernels::family(family)
            .ok_or_else(|| Error::invalid("cuda launch", format!("no kernel family `{family}`")))?;
        if image.is_empty() {
            return Err(Error::Device(probe::no_kernels_message(self.ordinal())));
        }
        self.bind()?;
        // SAFETY: `image` is a complete fatbin embedded in the binary ('static, 64-byte
        // aligned); the driver copies what it needs.
        let m =
            unsafe { result::module::load_data(image.as_ptr() as *const c_void) }.map_err(|e| {
                driver_err(
                    self.ordinal(),
                    &format!(
                        "loading the {family} kernels (image {} for this GPU)",
                        self.info.kernel_image
                    ),
                    e,
                )
            })?;
        modules.insert(family, Handle(m));
        Ok(m)
    }
}
