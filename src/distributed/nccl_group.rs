//! GPU ranks launched torchrun-style (`docs/distributed.md`): one NCCL communicator per rank,
//! made from rank 0's id, which the [`rendezvous`](super::rendezvous) hands to every rank.
//! The gradient buckets are averaged on the communication stream ([`NcclReducer`]); the
//! run's small host collectives go through the same communicator as sums of small device
//! buffers: a broadcast is a sum where only rank 0's values are not zero, a gather a sum
//! where each rank fills its own slots. Integers and exact bits travel as 16-bit pieces, which
//! f32 sums of one non-zero term and zeros carry exactly.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use recycle_engine::cuda::{NcclId, RankComm};
use recycle_engine::ops::elementwise::scale;
use recycle_engine::{Device, Error, Result, Tape, Tensor};

use super::launch::{Launch, Launcher};
use super::reducer::{not_begun, GradReducer};
use super::rendezvous;
use super::world::Group;

/// This rank's communicator and the wait for a collective.
pub struct NcclGroup {
    rank: usize,
    size: usize,
    comm: Arc<Mutex<RankComm>>,
    timeout: Duration,
}

impl NcclGroup {
    /// Rank `launch.rank` of a torchrun-style launch on `device`: meets the other ranks at
    /// `MASTER_ADDR` (rank 0 makes the NCCL id there) and joins the communicator. Waits up to
    /// `timeout` for every rank.
    pub fn start(launch: &Launch, device: Device, timeout: Duration) -> Result<NcclGroup> {
        let Launcher::Torchrun {
            master_addr,
            master_port,
        } = &launch.launcher
        else {
            return Err(Error::invalid(
                "launch",
                format!(
                    "GPU ranks meet through a torchrun-style launch (RANK, WORLD_SIZE, \
                     MASTER_ADDR, MASTER_PORT); this one was started by {}",
                    launch.launcher.name()
                ),
            ));
        };
        let (rank, size) = (launch.rank, launch.world_size);
        let port = rendezvous::port_from_env(*master_port, |k| std::env::var(k).ok())?;
        let addr = rendezvous::join_host_port(master_addr, port);
        let id = rendezvous::exchange(&addr, rank, size, timeout, || {
            NcclId::new(device)
                .map(|id| id.0.to_vec())
                .map_err(|e| e.to_string())
        })?;
        let comm = RankComm::new(device, rank, size, &NcclId::from_bytes(&id)?, timeout)?;
        Ok(NcclGroup {
            rank,
            size,
            comm: Arc::new(Mutex::new(comm)),
            timeout,
        })
    }

    fn comm(&self) -> Result<MutexGuard<'_, RankComm>> {
        lock(&self.comm)
    }

    fn sum(&self, data: &mut [f32]) -> Result<()> {
        let done = self.comm()?.all_reduce_sum_host(data, self.timeout);
        done.map_err(|e| name_peer(e, self.rank, self.size))
    }

    /// Every rank's `values` replaced by rank 0's, bit for bit.
    fn broadcast_bits(&self, values: &mut [u64], pieces: usize) -> Result<()> {
        let mut buf = vec![0f32; values.len() * pieces];
        if self.rank == 0 {
            for (v, chunk) in values.iter().zip(buf.chunks_mut(pieces)) {
                split(*v, chunk);
            }
        }
        self.sum(&mut buf)?;
        for (v, chunk) in values.iter_mut().zip(buf.chunks(pieces)) {
            *v = join(chunk);
        }
        Ok(())
    }
}

fn lock(comm: &Mutex<RankComm>) -> Result<MutexGuard<'_, RankComm>> {
    comm.lock().map_err(|_| {
        Error::Device("the NCCL communicator's lock was poisoned by a failed collective".into())
    })
}

/// A failed collective, with the rank that stopped when there is only one other: NCCL says
/// that a peer failed, not which.
fn name_peer(e: Error, rank: usize, size: usize) -> Error {
    match e {
        Error::Device(m) if size == 2 && m.contains("aborted") => Error::Device(format!(
            "{m} (of 2 ranks, the one that stopped is rank {})",
            1 - rank
        )),
        e => e,
    }
}

/// `v` as `pieces` 16-bit pieces, low first, each an exact f32.
fn split(v: u64, out: &mut [f32]) {
    for (i, p) in out.iter_mut().enumerate() {
        *p = ((v >> (16 * i)) & 0xffff) as f32;
    }
}

fn join(pieces: &[f32]) -> u64 {
    pieces
        .iter()
        .enumerate()
        .fold(0, |v, (i, &p)| v | ((p as u64 & 0xffff) << (16 * i)))
}

impl Group for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn barrier(&self) -> Result<()> {
        self.sum(&mut [1.0])
    }

    fn broadcast_f32(&self, data: &mut [f32]) -> Result<()> {
        let mut bits: Vec<u64> = data.iter().map(|v| v.to_bits() as u64).collect();
        self.broadcast_bits(&mut bits, 2)?;
        for (d, b) in data.iter_mut().zip(bits) {
            *d = f32::from_bits(b as u32);
        }
        Ok(())
    }

    fn broadcast_u64(&self, data: &mut [u64]) -> Result<()> {
        self.broadcast_bits(data, 4)
    }

    fn all_reduce_sum_f32(&self, data: &mut [f32]) -> Result<()> {
        self.sum(data)
    }

    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        let mut buf = vec![0f32; self.size * 4];
        split(value, &mut buf[self.rank * 4..(self.rank + 1) * 4]);
        self.sum(&mut buf)?;
        Ok(buf.chunks(4).map(join).collect())
    }

    /// The gradient buckets go through the same communicator: they are queued on its stream
    /// in the same order on every rank, and joined before any host collective of the step.
    fn grad_reducer(&self, timeout: Duration) -> Result<Box<dyn GradReducer>> {
        Ok(reducer(self.comm.clone(), self.size, timeout))
    }

    /// The other ranks' communicators report this process's exit as a remote error.
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The gradient reducer of GPU ranks on `comm` (of `size` ranks): each bucket's mean on the
/// communication stream, joined and waited for (up to `timeout`) when backward is done.
pub(super) fn reducer(
    comm: Arc<Mutex<RankComm>>,
    size: usize,
    timeout: Duration,
) -> Box<dyn GradReducer> {
    Box::new(NcclReducer {
        comm,
        size,
        timeout,
        step: None,
        seconds: 0.0,
    })
}

/// Each bucket's mean over the ranks, queued on the communication stream as soon as backward
/// has written it (after the student stream's work so far), overlapping the rest of backward.
struct NcclReducer {
    comm: Arc<Mutex<RankComm>>,
    size: usize,
    timeout: Duration,
    /// The buffer and the factor its buckets are scaled by before NCCL's mean.
    step: Option<(Tensor, f32)>,
    seconds: f64,
}

impl GradReducer for NcclReducer {
    /// NCCL's mean divides the sum by N: a rank weighing `weight` scales its gradients by
    /// `weight * N` first (nothing to do for N equal shares).
    fn begin(&mut self, grads: &Tensor, weight: f32) -> Result<()> {
        self.step = Some((grads.clone(), weight * self.size as f32));
        Ok(())
    }

    fn start(&mut self, range: Range<usize>) -> Result<()> {
        let Some((grads, factor)) = &self.step else {
            return Err(not_begun());
        };
        if *factor != 1.0 {
            let view = grads.view(range.start, &[range.end - range.start])?;
            let tape = Tape::inference();
            let scaled = scale(&tape, &tape.constant(view.clone()), *factor)?;
            view.copy_from(scaled.tensor())?;
        }
        lock(&self.comm)?.reduce_bucket(grads, range)
    }

    fn finish(&mut self) -> Result<()> {
        if self.step.take().is_none() {
            return Err(not_begun());
        }
        let t = Instant::now();
        let mut comm = lock(&self.comm)?;
        let (rank, size) = (comm.rank(), self.size);
        comm.join_student()
            .and_then(|()| comm.wait(self.timeout))
            .map_err(|e| name_peer(e, rank, size))?;
        self.seconds += t.elapsed().as_secs_f64();
        Ok(())
    }

    /// The host's wait for the reductions after backward (their time on the communication
    /// stream overlaps backward and is not measured here).
    fn reduce_seconds(&self) -> f64 {
        self.seconds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_carry_every_bit() {
        for v in [0u64, 1, 0xffff, 0x1_0000, u64::MAX, 0x8000_0000_0000_0001] {
            let mut p = [0f32; 4];
            split(v, &mut p);
            assert!(p
                .iter()
                .all(|x| *x >= 0.0 && *x < 65536.0 && x.fract() == 0.0));
            assert_eq!(join(&p), v);
        }
        let f = (-0.0f32).to_bits() as u64;
        let mut p = [0f32; 2];
        split(f, &mut p);
        assert_eq!(
            f32::from_bits(join(&p) as u32).to_bits(),
            (-0.0f32).to_bits()
        );
    }
}
