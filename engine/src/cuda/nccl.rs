//! Gradient all-reduce across the GPUs of one process, through NCCL on each GPU's
//! communication stream.
//!
//! The engine keeps a model's gradients in one flat buffer per GPU (`FlatParams::grads`), so a
//! data-parallel step needs exactly one collective per step: the mean of N equally sized
//! buffers, written back in place on every GPU. [`AllReduceGroup`] is that collective for the
//! GPUs this process drives (NCCL's `ncclCommInitAll`: one communicator per GPU, no network
//! rendezvous). One process per GPU, with a communicator made from a unique id that a launcher
//! hands to every rank, is `nccl_rank`'s [`super::RankComm`].
//!
//! Ordering: a reduce must see the finished backward, and the optimizer must see the reduced
//! gradients, without stalling the host. So per GPU the communication stream first waits on an
//! event recorded on the student stream (where the backward was queued), the reductions of all
//! GPUs are queued inside one NCCL group (NCCL requires that when one thread drives several
//! GPUs: each call would otherwise block on the others), and the student stream then waits on
//! an event recorded on the communication stream. Nothing is allocated or freed on the
//! communication stream, so the free rule of `memory.rs` (frees ordered on the stream that
//! allocated) is untouched.
//!
//! NCCL is loaded at run time like cuBLASLt and cuDNN (`libs`): a machine without
//! `libnccl.so.2` gets an error naming it when a group is made, and single-GPU training never
//! needs it.
//!
//! What is checked without a GPU: every argument rule below (devices, tensors, dtypes, sizes)
//! runs before any library is touched and is unit-tested on the CPU; `recycle gpu-check` runs
//! a group over the checked GPU (one rank: the mean is the input itself, bit for bit).

use crate::{DType, Device, Error, Result, Tensor};

const OP: &str = "AllReduceGroup";

/// The GPUs of this process that average their gradients each step.
pub struct AllReduceGroup {
    ordinals: Vec<usize>,
    #[cfg(feature = "cuda")]
    comms: Vec<Comm>,
}

impl std::fmt::Debug for AllReduceGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AllReduceGroup({:?})", self.ordinals)
    }
}

/// The GPU ordinals of `devices`: at least one, every one a CUDA device, none twice.
pub fn group_ordinals(devices: &[Device]) -> Result<Vec<usize>> {
    if devices.is_empty() {
        return Err(Error::invalid(
            OP,
            "no devices given: a group needs at least one GPU (cuda:N)".to_string(),
        ));
    }
    let mut ordinals = Vec::with_capacity(devices.len());
    for d in devices {
        match *d {
            Device::Cpu => {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "{d} in {devices:?}: an all-reduce group is made of GPUs (cuda:N); \
                         the CPU has no communicator"
                    ),
                ))
            }
            Device::Cuda(n) => {
                if ordinals.contains(&n) {
                    return Err(Error::invalid(
                        OP,
                        format!("cuda:{n} appears twice in {devices:?}: give each GPU once"),
                    ));
                }
                ordinals.push(n);
            }
        }
    }
    Ok(ordinals)
}

/// Checks that `tensors` are one per GPU of the group, in the group's order, all of the same
/// number of elements and the same float type.
pub fn check_tensors(ordinals: &[usize], tensors: &[&Tensor]) -> Result<()> {
    if tensors.is_empty() || tensors.len() != ordinals.len() {
        return Err(Error::invalid(
            OP,
            format!(
                "{} tensors for a group of {} GPUs: give one per GPU, in the group's order",
                tensors.len(),
                ordinals.len()
            ),
        ));
    }
    let (first_len, first_dtype) = (tensors[0].elem_count(), tensors[0].dtype());
    for (i, (t, &n)) in tensors.iter().zip(ordinals).enumerate() {
        if t.device() != Device::Cuda(n) {
            return Err(Error::invalid(
                OP,
                format!(
                    "tensor {i} is on {}, but rank {i} of the group is cuda:{n}",
                    t.device()
                ),
            ));
        }
        if !matches!(t.dtype(), DType::F32 | DType::BF16) {
            return Err(Error::invalid(
                OP,
                format!(
                    "tensor {i} is {:?}: gradients are reduced in f32 or bf16",
                    t.dtype()
                ),
            ));
        }
        if t.dtype() != first_dtype || t.elem_count() != first_len {
            return Err(Error::shape(
                OP,
                format!(
                    "tensor {i} has {} {:?} elements but tensor 0 has {first_len} {first_dtype:?}: \
                     every GPU must hold the same gradient buffer",
                    t.elem_count(),
                    t.dtype()
                ),
            ));
        }
    }
    Ok(())
}

impl AllReduceGroup {
    /// One communicator per GPU of `devices` (opened first: driver, GPU and kernels are
    /// checked in that order), then NCCL; each missing piece is an error saying what to do.
    pub fn new(devices: &[Device]) -> Result<AllReduceGroup> {
        let ordinals = group_ordinals(devices)?;
        with_backend!(ordinals[0], {
            let comms = Comm::init_all(&ordinals)?;
            Ok(AllReduceGroup { ordinals, comms })
        })
    }

    /// The number of GPUs in the group.
    pub fn world_size(&self) -> usize {
        self.ordinals.len()
    }

    /// The group's GPUs, in rank order.
    pub fn devices(&self) -> Vec<Device> {
        self.ordinals.iter().map(|&n| Device::Cuda(n)).collect()
    }

    /// Replaces each tensor (one per GPU, in rank order) with the element-wise mean over the
    /// group, in place. Queued after the work already on each GPU's student stream; the
    /// student stream's later work (the optimizer) sees the result. Returns without waiting.
    pub fn all_reduce_mean(&mut self, tensors: &[&Tensor]) -> Result<()> {
        check_tensors(&self.ordinals, tensors)?;
        with_backend!(self.ordinals[0], all_reduce_mean_cuda(&self.comms, tensors))
    }
}

#[cfg(feature = "cuda")]
use cuda_impl::{all_reduce_mean_cuda, Comm};

#[cfg(feature = "cuda")]
mod cuda_impl {
    use std::sync::Arc;

    use cudarc::nccl::{result, sys};

    use super::super::libs::{self, Library};
    use super::super::{context, CudaContext, StreamRole};
    use crate::{DType, Error, Result, Tensor};

    /// One GPU's communicator, with the context it belongs to.
    pub(crate) struct Comm {
        ctx: Arc<CudaContext>,
        comm: sys::ncclComm_t,
    }

    // SAFETY: a communicator may be used from any thread, one call at a time; the group
    // only uses it through `&mut self` (`all_reduce_mean`) and `Drop`.
    unsafe impl Send for Comm {}

    fn nccl_err(ordinal: usize, what: &str, e: result::NcclError) -> Error {
        Error::Device(format!(
            "cuda:{ordinal}: NCCL failed {what}: {:?}; check that every GPU of the group is \
             visible (CUDA_VISIBLE_DEVICES) and that libnccl.so.2 matches the driver",
            e.0
        ))
    }

    impl Comm {
        /// `ncclCommInitAll` over `ordinals` (contexts opened first, so a missing driver or
        /// GPU is reported as such, not as an NCCL failure).
        pub(crate) fn init_all(ordinals: &[usize]) -> Result<Vec<Comm>> {
            let ctxs = ordinals
                .iter()
                .map(|&n| context::get(n))
                .collect::<Result<Vec<_>>>()?;
            libs::require(Library::Nccl, ordinals[0])?;
            let devlist: Vec<i32> = ordinals.iter().map(|&n| n as i32).collect();
            let mut raw: Vec<sys::ncclComm_t> = vec![std::ptr::null_mut(); ordinals.len()];
            libs::guarded(Library::Nccl, ordinals[0], || {
                ctxs[0].bind()?;
                // SAFETY: `raw` has room for one communicator per device of `devlist`.
                unsafe {
                    result::comm_init_all(raw.as_mut_ptr(), devlist.len() as i32, devlist.as_ptr())
                }
                .map_err(|e| nccl_err(ordinals[0], "making the communicators", e))?;
                Ok(())
            })?;
            Ok(ctxs
                .into_iter()
                .zip(raw)
                .map(|(ctx, comm)| Comm { ctx, comm })
                .collect())
        }
    }

    impl Drop for Comm {
        fn drop(&mut self) {
            // SAFETY: made by `ncclCommInitAll`, destroyed once, here. A failure cannot be
            // reported from a destructor; the process is ending the group anyway.
            let _ = unsafe { result::comm_destroy(self.comm) };
        }
    }

    fn nccl_dtype(dtype: DType) -> sys::ncclDataType_t {
        match dtype {
            DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
            _ => sys::ncclDataType_t::ncclFloat32,
        }
    }

    /// Student → comm events, one NCCL group of in-place `ncclAvg` reductions, comm → student.
    pub(crate) fn all_reduce_mean_cuda(comms: &[Comm], tensors: &[&Tensor]) -> Result<()> {
        let views = tensors
            .iter()
            // Reduced in place.
            .map(|t| t.cuda_view_mut("AllReduceGroup::all_reduce_mean"))
            .collect::<Result<Vec<_>>>()?;
        for c in comms {
            c.ctx.join(StreamRole::Comm, StreamRole::Student)?;
        }
        let first = comms[0].ctx.ordinal();
        let reduced = libs::guarded(Library::Nccl, first, || {
            result::group_start().map_err(|e| nccl_err(first, "starting a group", e))?;
            let mut queued = Ok(());
            for (c, v) in comms.iter().zip(&views) {
                // Not `?`: an error must still close the group below.
                if let Err(e) = c.ctx.bind() {
                    queued = Err(e);
                    break;
                }
                let stream = c.ctx.stream(StreamRole::Comm).cu_stream();
                // SAFETY: `v` spans `v.len` elements of `v.dtype` on this communicator's GPU,
                // kept alive by `tensors` until the student stream has waited for the comm
                // stream below; in place (send = receive buffer) is allowed by NCCL.
                let r = unsafe {
                    result::all_reduce(
                        v.ptr as *const std::ffi::c_void,
                        v.ptr as *mut std::ffi::c_void,
                        v.len,
                        nccl_dtype(v.dtype),
                        sys::ncclRedOp_t::ncclAvg,
                        c.comm,
                        stream as sys::cudaStream_t,
                    )
                };
                if let Err(e) = r {
                    queued = Err(nccl_err(c.ctx.ordinal(), "queueing an all-reduce", e));
                    break;
                }
            }
            // The group is closed whatever happened inside it (NCCL's rule).
            let ended = result::group_end().map_err(|e| nccl_err(first, "ending a group", e));
            queued.and(ended.map(|_| ()))
        });
        // Whatever was queued (all of it, or part of a failed group), the student stream
        // waits for it before the caller's next work (the optimizer) touches the buffers.
        let joined = comms
            .iter()
            .try_for_each(|c| c.ctx.join(StreamRole::Student, StreamRole::Comm));
        reduced.and(joined)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_must_be_distinct_gpus() {
        assert_eq!(
            group_ordinals(&[Device::Cuda(1), Device::Cuda(0)]).unwrap(),
            vec![1, 0]
        );
        let e = group_ordinals(&[]).unwrap_err().to_string();
        assert!(e.contains("at least one GPU"), "{e}");
        let e = group_ordinals(&[Device::Cuda(0), Device::Cpu])
            .unwrap_err()
            .to_string();
        assert!(e.contains("made of GPUs"), "{e}");
        let e = group_ordinals(&[Device::Cuda(0), Device::Cuda(0)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cuda:0 appears twice"), "{e}");
    }

    #[test]
    fn tensors_must_match_the_group() {
        let t = Tensor::zeros(&[4], DType::F32, Device::Cpu).unwrap();
        // One per GPU.
        let e = check_tensors(&[0, 1], &[&t]).unwrap_err().to_string();
        assert!(e.contains("1 tensors for a group of 2 GPUs"), "{e}");
        // On the rank's GPU (a CPU tensor is on none).
        let e = check_tensors(&[0], &[&t]).unwrap_err().to_string();
        assert!(
            e.contains("tensor 0 is on cpu") && e.contains("cuda:0"),
            "{e}"
        );
    }

    #[test]
    fn without_a_gpu_making_a_group_is_an_error() {
        // No driver here (or no backend in this build): either way an error, never a panic.
        match AllReduceGroup::new(&[Device::Cuda(0)]) {
            Ok(g) => assert_eq!(g.world_size(), 1),
            Err(e) => {
                let m = e.to_string();
                assert!(m.contains("cuda:0"), "{m}");
            }
        }
    }
}
