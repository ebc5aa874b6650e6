//! [`Group`] on MPI (the `mpi` crate over the system's Open MPI or MPICH).
//!
//! The gradient buckets are all-reduced on a communication thread with a communicator of its
//! own: blocking `MPI_Allreduce` calls there progress by themselves, whereas non-blocking ones
//! started from the training thread would only progress when that thread next enters MPI
//! (Open MPI runs no progress thread by default), which backward never does. The training
//! thread calls its own collectives (start-up broadcasts, BatchNorm statistics, weight checks)
//! only between steps, when the communication thread is idle, so MPI's "serialized" threading
//! level is all this needs.
//!
//! An all-reduce sums every element once and hands the same result to every rank (Open MPI's
//! and MPICH's algorithms for a commutative built-in sum reduce each element along one path and
//! send the result around, or add the same two partial sums on both sides), so every rank
//! updates its weights with the same bits; the trainer checks it every few steps.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;
use recycle_engine::{Error, Result, Tensor};

use super::launch::Launch;
use super::reducer::{not_begun, GradReducer};
use super::world::Group;

/// A communicator shared between threads. MPI handles are plain integers or pointers that the
/// library allows any thread to use at the threading level initialised (checked in
/// [`MpiGroup::init`]); the trainer never calls two collectives on one communicator at once.
struct Comm(SimpleCommunicator);
unsafe impl Send for Comm {}
unsafe impl Sync for Comm {}

/// MPI itself, held for its drop (`MPI_Finalize`) in [`finalize`]; MPI allows one
/// initialisation per process.
struct Env(#[allow(dead_code)] Universe);
unsafe impl Send for Env {}

static UNIVERSE: Mutex<Option<Env>> = Mutex::new(None);

pub struct MpiGroup {
    world: Comm,
    rank: usize,
    size: usize,
}

fn mpi_error(msg: String) -> Error {
    Error::invalid("mpi", msg)
}

impl MpiGroup {
    /// Starts MPI and checks that it sees the ranks the launcher's variables announced.
    pub fn init(launch: &Launch) -> Result<MpiGroup> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| mpi_error("MPI was already initialised in this process".into()))?;
        if matches!(threading, Threading::Single | Threading::Funneled) {
            return Err(mpi_error(format!(
                "the MPI library offers threading level {threading:?}; data-parallel training \
                 reduces gradients on a thread of its own and needs Serialized or Multiple \
                 (build Open MPI or MPICH with thread support)"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if (rank, size) != (launch.rank, launch.world_size) {
            return Err(mpi_error(format!(
                "MPI says this is rank {rank} of {size}, but {} announced rank {} of {}: launch \
                 with the mpirun of the MPI library recycle was built against",
                launch.launcher.name(),
                launch.rank,
                launch.world_size
            )));
        }
        *UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()) = Some(Env(universe));
        Ok(MpiGroup {
            world: Comm(world),
            rank,
            size,
        })
    }
}

/// MPI_Finalize, once every communicator but the world's is freed.
pub fn finalize() {
    let env = UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(env);
}

impl Group for MpiGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn barrier(&self) -> Result<()> {
        self.world.0.barrier();
        Ok(())
    }

    fn broadcast_f32(&self, data: &mut [f32]) -> Result<()> {
        self.world.0.process_at_rank(0).broadcast_into(data);
        Ok(())
    }

    fn broadcast_u64(&self, data: &mut [u64]) -> Result<()> {
        self.world.0.process_at_rank(0).broadcast_into(data);
        Ok(())
    }

    fn all_reduce_sum_f32(&self, data: &mut [f32]) -> Result<()> {
        let send = data.to_vec();
        self.world
            .0
            .all_reduce_into(&send[..], data, SystemOperation::sum());
        Ok(())
    }

    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        let mut all = vec![0u64; self.size];
        self.world.0.all_gather_into(&value, &mut all[..]);
        Ok(all)
    }

    fn grad_reducer(&self, timeout: Duration) -> Result<Box<dyn GradReducer>> {
        Ok(Box::new(MpiReducer::new(
            Comm(self.world.0.duplicate()),
            self.rank,
            self.size,
            timeout,
        )?))
    }

    fn abort(&self, code: i32) -> ! {
        self.world.0.abort(code)
    }
}

/// A bucket on its way to the communication thread and back: its range and its values.
struct Bucket {
    range: Range<usize>,
    values: Vec<f32>,
}

/// Buckets all-reduced (sum) on a thread of their own, in the order they were started (the
/// same on every rank: the backward's order).
struct MpiReducer {
    jobs: Option<Sender<Bucket>>,
    done: Receiver<Bucket>,
    thread: Option<JoinHandle<()>>,
    grads: Option<(Tensor, f32)>,
    pending: usize,
    timeout: Duration,
    reduce_nanos: Arc<AtomicU64>,
    rank: usize,
    size: usize,
}

impl MpiReducer {
    fn new(comm: Comm, rank: usize, size: usize, timeout: Duration) -> Result<MpiReducer> {
        let (jobs, inbox) = channel::<Bucket>();
        let (outbox, done) = channel::<Bucket>();
        let reduce_nanos = Arc::new(AtomicU64::new(0));
        let nanos = reduce_nanos.clone();
        let thread = std::thread::Builder::new()
            .name("grad-allreduce".into())
            .spawn(move || {
                let comm = comm;
                for mut bucket in inbox {
                    let t0 = Instant::now();
                    let mut sum = vec![0f32; bucket.values.len()];
                    comm.0.all_reduce_into(
                        &bucket.values[..],
                        &mut sum[..],
                        SystemOperation::sum(),
                    );
                    nanos.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    bucket.values = sum;
                    if outbox.send(bucket).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| mpi_error(format!("cannot start the all-reduce thread: {e}")))?;
        Ok(MpiReducer {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            grads: None,
            pending: 0,
            timeout,
            reduce_nanos,
            rank,
            size,
        })
    }

    fn stopped(&self, what: &str) -> Error {
        mpi_error(format!(
            "rank {} of {}: {what}; another rank has stopped or is stuck (its own error, or the \
             launcher's report of it, names it)",
            self.rank, self.size
        ))
    }
}

impl GradReducer for MpiReducer {
    fn begin(&mut self, grads: &Tensor, weight: f32) -> Result<()> {
        if self.pending > 0 {
            return Err(self.stopped("a step began before the last one's buckets came back"));
        }
        self.grads = Some((grads.clone(), weight));
        Ok(())
    }

    fn start(&mut self, range: Range<usize>) -> Result<()> {
        let (grads, weight) = self.grads.as_ref().ok_or_else(not_begun)?;
        let values: Vec<f32> = {
            let g = grads.read_f32()?;
            g[range.clone()].iter().map(|v| v * weight).collect()
        };
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|j| j.send(Bucket { range, values }).is_ok());
        if !sent {
            return Err(self.stopped("the all-reduce thread has ended"));
        }
        self.pending += 1;
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        let (grads, _) = self.grads.take().ok_or_else(not_begun)?;
        let deadline = Instant::now() + self.timeout;
        while self.pending > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            let bucket = match self.done.recv_timeout(left) {
                Ok(b) => b,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.stopped(&format!(
                        "the gradient all-reduce did not complete within {:.0} s \
                         (RECYCLE_COLLECTIVE_TIMEOUT sets it)",
                        self.timeout.as_secs_f64()
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.stopped("the all-reduce thread has ended"))
                }
            };
            self.pending -= 1;
            grads.write_f32()?[bucket.range].copy_from_slice(&bucket.values);
        }
        Ok(())
    }

    fn reduce_seconds(&self) -> f64 {
        self.reduce_nanos.load(Ordering::Relaxed) as f64 * 1e-9
    }
}

impl Drop for MpiReducer {
    fn drop(&mut self) {
        // Closing the queue ends the thread; it may only be joined when it is not inside an
        // all-reduce that another rank will never join (the run is aborted then).
        self.jobs.take();
        if self.pending == 0 {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}
