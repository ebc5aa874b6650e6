//! The CUDA backend (feature `cuda`): a context per GPU, device memory, host↔device copies,
//! cuBLASLt, cuDNN and the kernels of `recycle-kernels` behind the ops.
//!
//! What has run on a GPU is said in one place, the status line of `docs/cuda.md`. Without a
//! GPU, the op table (`crate::op_table`) runs every op on the mock CUDA, whose kernels run on
//! the kernel simulator, against its CPU twin; `recycle gpu-check` runs the same table on a
//! device.
//!
//! # Pieces
//!
//! - **Loading** (`probe`): cudarc loads `libcuda.so` at run time and *panics* when it is
//!   missing, so nothing touches cudarc before the driver library has been opened here, with
//!   the loader's message kept for the error. Then `cuInit`, the driver's CUDA version (13.0 or
//!   newer: the cubins come from a 13.x toolkit), the number of GPUs, and whether the embedded
//!   fatbins hold an image for the GPU's architecture ([`recycle_kernels::fatbin::select`]).
//!   Each failure is an [`Error::Device`] saying what is missing; none is a panic.
//! - **Context** (`context`): the device's primary context and three non-blocking streams —
//!   `student` (every op of the engine outside a scope), `teacher` (the frozen teachers'
//!   forward, to overlap with the student) and `comm` (NCCL all-reduce) — with events to order
//!   work between them ([`StreamRole`]). Kernel families are loaded once per context, on first
//!   use, from the embedded fatbins.
//! - **Scopes** (`scope`): [`on_stream`] runs a closure with the calling thread's ops,
//!   allocations, frees, copies, cuBLASLt and cuDNN calls on another role's stream, ordered
//!   after the previous stream on entry; its [`Pending`] outputs are joined back when the
//!   caller is ready to use them. cuBLASLt and cuDNN keep a workspace (and cuDNN a handle) per
//!   role, so products on two streams never share one.
//! - **Memory** (`memory`): stream-ordered allocation, `cuMemAllocAsync`/`cuMemFreeAsync` on the
//!   current stream (the free rule for several streams is in `memory.rs`) from the device's default memory pool, its release threshold raised to
//!   "never" so that freed blocks stay in the pool and a training step's allocations are served
//!   from it after the first step: the driver's caching allocator rather than one of our own.
//!   [`alloc_stats`] counts allocations and frees (measure allocations per step by taking the
//!   difference around a step). Host↔device copies go through a pinned staging buffer per
//!   context (the batches: `Tensor::to_device`), so a pageable `Vec` never blocks the stream.
//! - **Launch** (`launch`): each op's tensor function launches its kernels directly — grid and
//!   block from [`recycle_kernels::launch`], typed arguments — through the kernel's launcher,
//!   which `recycle-kernels` generates from the `.cu` signature ([`recycle_kernels::launchers`]),
//!   so an argument list cannot disagree with its kernel; the launch checks the shape and sends
//!   the parameter array to `cuLaunchKernel`.
//! - **Ops**: the CUDA arm of every op, one file per family —
//!   `elementwise` (elementwise ops, activations, copies, casts, accumulation), `softmax`,
//!   `loss` (cross-entropy), the fused distillation loss [`kd_loss`] (its arm in
//!   `crate::kd_loss::cuda`, beside the rest of its family), `optim`
//!   (the SGDW and AdamW steps), `matmul` + `blas` (cuBLASLt products), `conv` + `dnn` (cuDNN
//!   convolutions), `norm` (layer and batch norm), `gather` (embedding, gather_rows),
//!   `dropout`, `pool`, `layout` (permute/narrow/concat, reductions, broadcasting),
//!   `attention` (the padding mask in its additive form; the attention itself is the
//!   composition of the others in `crate::backend::attention`).
//!   `libs` finds cuBLASLt and cuDNN at run time and turns their absence into an error naming
//!   the library; `common` holds the helpers every family uses (the storage type of a launch,
//!   launch shapes, views and typed pointers, outputs). Any op without an arm given a CUDA tensor returns "not implemented on
//!   CUDA yet: <op>", never a silent CPU fallback.
//!
//! Without the `cuda` feature this module keeps only its front: the functions below exist and
//! return the "no CUDA backend in this build" error, so callers need no `cfg`.

use crate::{Device, Error, Result, Tensor};

/// `$body` in a build with the backend; without it, the "no CUDA backend" error for
/// `cuda:$ordinal` (the front functions, and the methods of values such a build never makes).
macro_rules! with_backend {
    ($ordinal:expr, $body:expr) => {{
        #[cfg(feature = "cuda")]
        {
            $body
        }
        #[cfg(not(feature = "cuda"))]
        {
            Err($crate::cuda::no_backend_error($ordinal))
        }
    }};
}

#[cfg(feature = "cuda")]
pub(crate) mod attention;
#[cfg(feature = "cuda")]
mod blas;
#[cfg(feature = "cuda")]
pub(crate) mod common;
#[cfg(feature = "cuda")]
mod context;
#[cfg(feature = "cuda")]
pub(crate) mod conv;
#[cfg(feature = "cuda")]
mod dnn;
#[cfg(feature = "cuda")]
pub(crate) mod dropout;
#[cfg(feature = "cuda")]
pub(crate) mod elementwise;
#[cfg(feature = "cuda")]
pub(crate) mod gather;
#[cfg(feature = "cuda")]
pub(crate) mod launch;
#[cfg(feature = "cuda")]
pub(crate) mod layout;
#[cfg(feature = "cuda")]
mod libs;
#[cfg(feature = "cuda")]
pub(crate) mod loss;
#[cfg(feature = "cuda")]
pub(crate) mod matmul;
#[cfg(feature = "cuda")]
mod memory;
pub mod nccl;
pub mod nccl_rank;
#[cfg(feature = "cuda")]
pub(crate) mod norm;
#[cfg(feature = "cuda")]
pub(crate) mod optim;
#[cfg(feature = "cuda")]
pub(crate) mod pool;
#[cfg(feature = "cuda")]
mod probe;
mod scope;
#[cfg(feature = "cuda")]
pub(crate) mod softmax;

pub use scope::{current_role, on_stream, Pending};

#[cfg(feature = "cuda")]
pub(crate) use context::CudaContext;
#[cfg(feature = "cuda")]
pub(crate) use memory::DeviceBuffer;
pub use nccl::AllReduceGroup;
pub use nccl_rank::{NcclId, RankComm};

/// Where a GPU tensor's elements are: its context, the address of its first element, how many
/// elements and of which type.
#[cfg(feature = "cuda")]
#[derive(Clone)]
pub(crate) struct CudaView {
    pub ctx: std::sync::Arc<CudaContext>,
    pub ptr: u64,
    pub len: usize,
    pub dtype: crate::DType,
}

#[cfg(feature = "cuda")]
impl CudaView {
    pub(crate) fn bytes(&self) -> usize {
        self.len * self.dtype.size_in_bytes()
    }
}

/// The context of `cuda:N` (made on first use).
#[cfg(feature = "cuda")]
pub(crate) fn context_of(ordinal: usize) -> Result<std::sync::Arc<CudaContext>> {
    context::get(ordinal)
}

/// Copies the elements of `v` into `out` (exactly their size), after the queued work.
#[cfg(feature = "cuda")]
pub(crate) fn copy_to_host(v: &CudaView, out: &mut [u8]) -> Result<()> {
    if out.len() != v.bytes() {
        return Err(Error::invalid(
            "copy to host",
            format!("{} bytes into a buffer of {}", v.bytes(), out.len()),
        ));
    }
    memory::dtoh(&v.ctx, v.ptr, out)
}

/// Overwrites the elements of `v` with `bytes` (exactly their size).
#[cfg(feature = "cuda")]
pub(crate) fn copy_to_device(v: &CudaView, bytes: &[u8]) -> Result<()> {
    if bytes.len() != v.bytes() {
        return Err(Error::invalid(
            "copy to device",
            format!(
                "{} bytes into {} bytes of device memory",
                bytes.len(),
                v.bytes()
            ),
        ));
    }
    memory::htod(&v.ctx, v.ptr, bytes)
}

/// Sets the elements of `v` to zero.
#[cfg(feature = "cuda")]
pub(crate) fn zero_device(v: &CudaView) -> Result<()> {
    memory::memset_zero(&v.ctx, v.ptr, v.bytes())
}

/// Copies `bytes` between two device ranges of the same context.
#[cfg(feature = "cuda")]
pub(crate) fn copy_device_to_device(dst: &CudaView, src: &CudaView) -> Result<()> {
    if dst.bytes() != src.bytes() || dst.ctx.ordinal() != src.ctx.ordinal() {
        return Err(Error::invalid(
            "device copy",
            format!(
                "{} bytes on cuda:{} into {} bytes on cuda:{}",
                src.bytes(),
                src.ctx.ordinal(),
                dst.bytes(),
                dst.ctx.ordinal()
            ),
        ));
    }
    memory::dtod(&dst.ctx, dst.ptr, src.ptr, dst.bytes())
}

/// The alignment cuBLASLt may assume for a device address (or a byte offset from a 256-byte
/// aligned base): the largest power of two dividing it, at most 256. Its default assumption is
/// 256 bytes, which a parameter (a view at any offset of the flat buffer) need not meet: an
/// algorithm chosen for aligned operands would be refused at the call. So a product's plan is
/// chosen for the operands' actual alignments, which are part of its key.
pub fn operand_alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        (1u64 << ptr.trailing_zeros().min(8)) as u32
    }
}

/// The error for a CUDA device asked of a build without the backend.
pub fn no_backend_error(ordinal: usize) -> Error {
    Error::Device(format!(
        "cuda:{ordinal} was requested, but this build of recycle-engine has no CUDA backend; \
         use the CPU (`cpu`), or rebuild with `--features cuda` (recycle-engine/cuda) on a \
         machine with an NVIDIA driver"
    ))
}

/// The error of an op that has no CUDA implementation yet, given a tensor on `device`.
pub fn not_on_cuda_yet(op: &str, device: Device) -> Error {
    Error::Device(format!(
        "not implemented on CUDA yet: {op} (an input is on {device}); move the inputs to the \
         CPU with `to_device(Device::Cpu)` to run it there"
    ))
}

/// The error of CPU code handed a tensor that lives on a GPU (no implicit copies).
pub fn host_access_error(what: &str, device: Device) -> Error {
    Error::Device(format!(
        "{what}: the tensor lives on {device}, and CPU code cannot read device memory; copy it \
         with `to_device(Device::Cpu)` (or `to_vec`) first"
    ))
}

/// The one device all `tensors` live on; an error naming both when they differ.
pub fn common_device(op: &str, tensors: &[&Tensor]) -> Result<Device> {
    let mut device = Device::Cpu;
    for (i, t) in tensors.iter().enumerate() {
        if i == 0 {
            device = t.device();
        } else if t.device() != device {
            return Err(Error::Device(format!(
                "{op}: inputs live on different devices ({device} and {}); move them to one \
                 device with `to_device`",
                t.device()
            )));
        }
    }
    Ok(device)
}

/// Fails with "not implemented on CUDA yet: `op`" when any of `tensors` is on a GPU: the
/// first line of every op that has only a CPU implementation.
pub fn cpu_only<'a>(op: &str, tensors: impl IntoIterator<Item = &'a Tensor>) -> Result<()> {
    match tensors.into_iter().find(|t| !t.device().is_cpu()) {
        Some(t) => Err(not_on_cuda_yet(op, t.device())),
        None => Ok(()),
    }
}

/// The GPU behind `cuda:N`, as the backend sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// `(major, minor)`, e.g. `(9, 0)` for an H100.
    pub compute_capability: (u32, u32),
    /// The driver's CUDA version as `cuDriverGetVersion` gives it (13000 for 13.0).
    pub driver_version: u32,
    pub total_memory: u64,
    /// Which image of the fatbins this GPU runs: `sm_90`, or `compute_90 PTX (JIT)`.
    pub kernel_image: String,
}

/// The name the mock CUDA (`mockcuda/`, the GPU path on the CPU) gives its device.
pub const MOCK_DEVICE_NAME: &str = "Recycle mock CUDA device (CPU)";

impl DeviceInfo {
    /// Whether this is the mock CUDA, not a GPU: its timings are the CPU's and must never be
    /// reported as GPU figures.
    pub fn is_mock(&self) -> bool {
        self.name == MOCK_DEVICE_NAME
    }
}

/// Device-memory counters of one context (stream-ordered allocations).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// `cuMemAllocAsync` calls so far (zero-byte tensors allocate nothing).
    pub allocations: u64,
    pub frees: u64,
    pub bytes_in_use: u64,
    pub peak_bytes_in_use: u64,
    /// Bytes copied through the pinned staging buffer, each way.
    pub bytes_to_device: u64,
    pub bytes_to_host: u64,
}

impl AllocStats {
    /// Allocations between two snapshots (e.g. around a training step).
    pub fn allocations_since(&self, earlier: &AllocStats) -> u64 {
        self.allocations.saturating_sub(earlier.allocations)
    }
}

/// The three streams of a context. Work goes to the student's unless the calling thread is
/// inside an [`on_stream`] scope of another role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamRole {
    /// The student's forward and backward, the loss, the optimizer: every engine op outside a
    /// scope.
    Student,
    /// The frozen teachers' forward (`on_stream(device, StreamRole::Teacher, ..)`), overlapped
    /// with the student's.
    Teacher,
    /// Gradient all-reduce (NCCL).
    Comm,
}

impl StreamRole {
    /// How many roles there are (per-role state is an array of this length).
    pub const COUNT: usize = 3;

    /// This role's slot in per-role arrays.
    pub fn index(self) -> usize {
        match self {
            StreamRole::Student => 0,
            StreamRole::Teacher => 1,
            StreamRole::Comm => 2,
        }
    }
}

/// How many GPUs this process sees (after `CUDA_VISIBLE_DEVICES`): 0 without a driver or in
/// a build without the backend.
pub fn device_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        probe::device_count()
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

/// Opens `cuda:N` (driver, GPU, kernels) and describes it; the error says what is missing.
pub fn device_info(ordinal: usize) -> Result<DeviceInfo> {
    with_backend!(ordinal, Ok(context::get(ordinal)?.info().clone()))
}

/// Waits until every stream of `device` is idle, and reports an error a deferred operation
/// (a free in a destructor) met since the last call.
pub fn synchronize(device: Device) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda(n) => with_backend!(n, context::get(n)?.synchronize()),
    }
}

/// The allocation counters of `cuda:N`'s context.
pub fn alloc_stats(ordinal: usize) -> Result<AllocStats> {
    with_backend!(ordinal, Ok(context::get(ordinal)?.alloc_stats()))
}

/// The device memory `cuda:N`'s pool holds now: every live buffer of the engine plus the
/// freed blocks it keeps for reuse (never returned to the driver). With work on two streams
/// it can exceed the engine's peak in use ([`AllocStats::peak_bytes_in_use`]) by the blocks
/// one stream freed that the other could not reuse yet.
pub fn pool_reserved_bytes(ordinal: usize) -> Result<u64> {
    with_backend!(ordinal, context::get(ordinal)?.pool_reserved_bytes())
}

/// Starts a new peak of `cuda:N`'s memory counters: `peak_bytes_in_use` becomes the bytes in
/// use now, so a later [`alloc_stats`] gives the peak of what ran in between (the benchmark
/// resets it before each variant's step).
pub fn reset_peak_memory(ordinal: usize) -> Result<()> {
    with_backend!(ordinal, {
        context::get(ordinal)?.memory.reset_peak();
        Ok(())
    })
}

/// While `on`, every new buffer on `cuda:N` starts as NaN (0xFF bytes) instead of whatever the
/// pool held: the device check turns it on, so an output element a kernel never writes cannot
/// pass for a value left by an earlier run.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn set_poison_allocations(ordinal: usize, on: bool) -> Result<()> {
    with_backend!(ordinal, {
        let poison = &context::get(ordinal)?.memory.poison;
        poison.store(on, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    })
}

/// The fused distillation loss on a GPU: what `kd_loss_cpu` returns, with the gradient left on
/// the device.
#[derive(Debug, Clone)]
pub struct KdLossDevice {
    pub ce: f32,
    pub kd: f32,
    pub total: f32,
    /// d total / d student logits, `[N, C]`, on the student's device, in its dtype.
    pub grad: Tensor,
    pub ce_rows: usize,
    pub kd_rows: usize,
}

/// The fused loss kernel (`kd_loss.cu`) with `cfg`'s term, λ and ignored label over `student`
/// `[N, C]` logits on a GPU, the mean of `teachers` (1 to 8 `[N, C]` logits on the same GPU;
/// none, or λ = 0, for CE alone),
/// `labels` i32 `[N]` and an optional row `mask` `[N]` (non-zero = the row counts; labels and
/// mask may be on the host or the GPU), with `upstream` the gradient of the total (1 for
/// `backward(loss)`). The CPU twin is `crate::kd_loss::kd_loss_cpu`.
pub fn kd_loss(
    cfg: &crate::kd_loss::KdLoss,
    student: &Tensor,
    teachers: &[Tensor],
    labels: &Tensor,
    mask: Option<&Tensor>,
    upstream: f32,
) -> Result<KdLossDevice> {
    #[cfg(feature = "cuda")]
    {
        crate::kd_loss::cuda::kd_loss(cfg, student, teachers, labels, mask, upstream)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (cfg, teachers, labels, mask, upstream);
        match student.device() {
            Device::Cuda(n) => Err(no_backend_error(n)),
            Device::Cpu => Err(Error::Device(
                "kd_loss (CUDA): the student logits are on the CPU; use kd_loss_cpu".into(),
            )),
        }
    }
}

/// The loss on one teacher's cached targets below k = C (`kd_loss.cu`'s `kd_loss_cached_*`)
/// over `student` `[N, C]` logits on a GPU (C at most 65,536), `labels` i32 `[N]` and an
/// optional row `mask` `[N]`, with `upstream` the gradient of the total. The CPU twin is
/// `crate::kd_loss::kd_loss_buckets_cpu`; the route at k = C is the online kernel
/// ([`kd_loss`]) on the rows scattered back (`crate::kd_loss::kd_loss_cached` picks it).
pub fn kd_loss_cached(
    cfg: &crate::kd_loss::KdLoss,
    student: &Tensor,
    teacher: &crate::kd_loss::CachedTargets,
    labels: &Tensor,
    mask: Option<&Tensor>,
    upstream: f32,
) -> Result<KdLossDevice> {
    #[cfg(feature = "cuda")]
    {
        crate::kd_loss::cached_cuda::kd_loss_cached(cfg, student, teacher, labels, mask, upstream)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (cfg, teacher, labels, mask, upstream);
        match student.device() {
            Device::Cuda(n) => Err(no_backend_error(n)),
            Device::Cpu => Err(Error::Device(
                "kd_loss_cached (CUDA): the student logits are on the CPU; use \
                 kd_loss_cached_cpu"
                    .into(),
            )),
        }
    }
}

/// The CUDA arm of an op: the expression with the `cuda` feature; without it no tensor can be
/// on a GPU, and the arm returns the "no CUDA backend" error.
#[macro_export]
#[doc(hidden)]
macro_rules! on_cuda {
    ($device:expr, $e:expr) => {{
        #[cfg(feature = "cuda")]
        {
            let _ = $device;
            $e
        }
        #[cfg(not(feature = "cuda"))]
        {
            match $device {
                $crate::Device::Cuda(n) => Err($crate::cuda::no_backend_error(n)),
                $crate::Device::Cpu => unreachable!("on_cuda! is the arm of a CUDA device"),
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_op_and_the_way_out() {
        let e = not_on_cuda_yet("conv2d", Device::Cuda(1)).to_string();
        assert!(e.contains("not implemented on CUDA yet: conv2d"), "{e}");
        assert!(e.contains("cuda:1") && e.contains("to_device"), "{e}");
        let e = host_access_error("read_f32", Device::Cuda(0)).to_string();
        assert!(
            e.contains("read_f32") && e.contains("to_device(Device::Cpu)"),
            "{e}"
        );
        let e = no_backend_error(3).to_string();
        assert!(e.contains("cuda:3") && e.contains("--features cuda"), "{e}");
    }

    #[test]
    fn cpu_tensors_pass_the_guards() {
        let a = Tensor::f32(vec![1.0], &[1]).unwrap();
        let b = Tensor::f32(vec![2.0], &[1]).unwrap();
        assert_eq!(common_device("add", &[&a, &b]).unwrap(), Device::Cpu);
        assert!(cpu_only("conv2d", [&a, &b]).is_ok());
    }

    #[test]
    fn roles_have_distinct_slots_and_a_gpu_is_needed_for_counters() {
        let roles = [StreamRole::Student, StreamRole::Teacher, StreamRole::Comm];
        let mut slots: Vec<usize> = roles.iter().map(|r| r.index()).collect();
        slots.sort();
        assert_eq!(slots, (0..StreamRole::COUNT).collect::<Vec<_>>());
        // A GPU that is not there: an error naming the device, not a panic.
        use crate::device::tests::MISSING_GPU;
        for e in [
            reset_peak_memory(MISSING_GPU).unwrap_err(),
            pool_reserved_bytes(MISSING_GPU).unwrap_err(),
        ] {
            assert!(
                e.to_string().contains(&format!("cuda:{MISSING_GPU}")),
                "{e}"
            );
        }
    }

    #[test]
    fn alignments_are_the_largest_power_of_two_up_to_256() {
        assert_eq!(operand_alignment(0x7f00_0000_0000), 256);
        assert_eq!(operand_alignment(0x7f00_0000_0004), 4);
        assert_eq!(operand_alignment(0x7f00_0000_0010), 16);
        assert_eq!(operand_alignment(0x7f00_0000_0082), 2);
        assert_eq!(operand_alignment(0), 256);
    }

    #[test]
    fn stats_difference() {
        let a = AllocStats {
            allocations: 10,
            ..AllocStats::default()
        };
        let b = AllocStats {
            allocations: 25,
            ..AllocStats::default()
        };
        assert_eq!(b.allocations_since(&a), 15);
        assert_eq!(a.allocations_since(&b), 0);
    }
}
