//! GPU ranks under an MPI launch (`mpirun`, `mpiexec`, `srun`; `docs/distributed.md`): MPI
//! hands rank 0's NCCL id to every rank, each rank makes its communicator on
//! `cuda:LOCAL_RANK`, and the gradient buckets are averaged by NCCL on the communication
//! stream, as on GPU ranks of a torchrun-style launch ([`super::nccl_group`]).
//!
//! The run's small host collectives (the start-up broadcast, the logged losses, BatchNorm
//! statistics, the weight check) stay on MPI: they take host buffers, carry any bits exactly,
//! and run between steps, after the step's reductions were joined and waited for, so the two
//! transports never hold work of the same step at once. An error on a rank ends every rank
//! through `MPI_Abort`, as on CPU ranks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use recycle_engine::cuda::nccl_rank::NCCL_ID_BYTES;
use recycle_engine::cuda::{NcclId, RankComm};
use recycle_engine::{Device, Error, Result};

use super::nccl_group::reducer;
use super::reducer::GradReducer;
use super::world::Group;

/// MPI for the host collectives, an NCCL communicator for the gradients.
pub struct MpiGpuGroup {
    mpi: Arc<dyn Group>,
    comm: Arc<Mutex<RankComm>>,
}

/// The id as 64-bit words, behind a word that says whether rank 0 made one (1) or failed (0).
const WORDS: usize = 1 + NCCL_ID_BYTES / 8;

impl MpiGpuGroup {
    /// This rank's communicator on `device`: rank 0 makes the id, MPI broadcasts it, and every
    /// rank joins (`ncclCommInitRank`, waiting up to `timeout` for the others).
    pub fn start(mpi: Arc<dyn Group>, device: Device, timeout: Duration) -> Result<MpiGpuGroup> {
        let (rank, size) = (mpi.rank(), mpi.size());
        let mut words = [0u64; WORDS];
        let made = match rank {
            0 => Some(NcclId::new(device)),
            _ => None,
        };
        if let Some(Ok(id)) = &made {
            words[0] = 1;
            for (w, b) in words[1..].iter_mut().zip(id.0.chunks(8)) {
                *w = u64::from_le_bytes(b.try_into().expect("8 bytes"));
            }
        }
        // Rank 0 broadcasts even when it failed, so that no rank waits for an id.
        mpi.broadcast_u64(&mut words)?;
        if let Some(Err(e)) = made {
            return Err(e);
        }
        if words[0] != 1 {
            return Err(Error::Device(format!(
                "rank {rank} of {size}: rank 0 could not make the NCCL id (its error says why)"
            )));
        }
        let bytes: Vec<u8> = words[1..].iter().flat_map(|w| w.to_le_bytes()).collect();
        let id = NcclId::from_bytes(&bytes)?;
        let comm = RankComm::new(device, rank, size, &id, timeout)?;
        Ok(MpiGpuGroup {
            mpi,
            comm: Arc::new(Mutex::new(comm)),
        })
    }
}

impl Group for MpiGpuGroup {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }

    fn size(&self) -> usize {
        self.mpi.size()
    }

    fn barrier(&self) -> Result<()> {
        self.mpi.barrier()
    }

    fn broadcast_f32(&self, data: &mut [f32]) -> Result<()> {
        self.mpi.broadcast_f32(data)
    }

    fn broadcast_u64(&self, data: &mut [u64]) -> Result<()> {
        self.mpi.broadcast_u64(data)
    }

    fn all_reduce_sum_f32(&self, data: &mut [f32]) -> Result<()> {
        self.mpi.all_reduce_sum_f32(data)
    }

    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        self.mpi.all_gather_u64(value)
    }

    fn grad_reducer(&self, timeout: Duration) -> Result<Box<dyn GradReducer>> {
        Ok(reducer(self.comm.clone(), self.size(), timeout))
    }

    fn abort(&self, code: i32) -> ! {
        self.mpi.abort(code)
    }
}
