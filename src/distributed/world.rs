//! The ranks of this process's run: its [`Launch`] and, for more than one process, the
//! [`Group`] their collectives go through. MPI is initialised once per process, so the world
//! is too: `recycle` sets it up at start ([`World::init`]) and shuts it down at exit
//! ([`finalize`]); a library caller that never does trains as one process.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use recycle_engine::{Error, Result};

use super::launch::{Launch, Launcher};
use super::reducer::GradReducer;

/// The collectives a data-parallel trainer needs. Every rank calls the same ones in the same
/// order; all but [`Group::grad_reducer`]'s run on the calling thread and block.
pub trait Group: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Waits until every rank is here.
    fn barrier(&self) -> Result<()>;
    /// Overwrites `data` on every rank with rank 0's (same length everywhere).
    fn broadcast_f32(&self, data: &mut [f32]) -> Result<()>;
    fn broadcast_u64(&self, data: &mut [u64]) -> Result<()>;
    /// Replaces `data` with its elementwise sum over the ranks, the same bits on every rank.
    fn all_reduce_sum_f32(&self, data: &mut [f32]) -> Result<()>;
    /// Every rank's `value`, in rank order.
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>>;
    /// A reducer of gradient buckets on a communicator of its own (it may run beside the
    /// calling thread's collectives); waits for a bucket fail after `timeout`.
    fn grad_reducer(&self, timeout: Duration) -> Result<Box<dyn GradReducer>>;
    /// Ends every rank of the run with `code` (after an error on this one, so that no other
    /// rank waits forever in a collective).
    fn abort(&self, code: i32) -> !;
}

/// This process's place in its run.
#[derive(Clone)]
pub struct World {
    pub launch: Launch,
    /// The ranks' collectives; `None` for one process.
    pub group: Option<Arc<dyn Group>>,
}

static WORLD: OnceLock<World> = OnceLock::new();

impl World {
    /// One process, no collectives.
    pub fn single() -> World {
        World {
            launch: Launch::single(),
            group: None,
        }
    }

    /// Reads the launch from the environment and, for an MPI launch of several processes,
    /// starts MPI. Called once, at the start of `recycle`; later calls return the same world.
    pub fn init() -> Result<&'static World> {
        if let Some(w) = WORLD.get() {
            return Ok(w);
        }
        let launch = Launch::from_env()?;
        launch.check_supported()?;
        let group = start_group(&launch)?;
        Ok(WORLD.get_or_init(|| World { launch, group }))
    }

    /// The world [`World::init`] set up, else one process.
    pub fn current() -> World {
        WORLD.get().cloned().unwrap_or_else(World::single)
    }

    /// This process's rank: its group's, else its launch's (GPU ranks before they meet).
    pub fn rank(&self) -> usize {
        self.group.as_ref().map_or(self.launch.rank, |g| g.rank())
    }

    pub fn size(&self) -> usize {
        self.group
            .as_ref()
            .map_or(self.launch.world_size, |g| g.size())
    }

    /// Whether this is one of several ranks.
    pub fn is_distributed(&self) -> bool {
        self.size() > 1
    }

    /// Whether this is one of several processes of a torchrun-style launch whose ranks have
    /// not met yet (GPU ranks meet in [`World::with_gpu_group`]).
    pub fn awaits_gpu_group(&self) -> bool {
        self.group.is_none()
            && self.launch.world_size > 1
            && matches!(self.launch.launcher, Launcher::Torchrun { .. })
    }

    /// Whether a GPU recipe makes this world's ranks meet on NCCL: several processes of a
    /// torchrun-style launch (they have no group yet), or of an MPI launch (MPI hands out the
    /// NCCL id).
    pub fn meets_on_gpus(&self) -> bool {
        self.awaits_gpu_group() || (self.launch.launcher.is_mpi() && self.group.is_some())
    }

    /// The world of GPU ranks on `device`: for a torchrun-style launch, the NCCL group of its
    /// ranks (rank 0's id handed out by the rendezvous, waiting up to `timeout` for every
    /// rank); for an MPI launch, MPI's collectives with the gradients on NCCL (rank 0's id
    /// broadcast by MPI); any other world as it is.
    #[cfg(feature = "cuda")]
    pub fn with_gpu_group(
        self,
        device: recycle_engine::Device,
        timeout: Duration,
    ) -> Result<World> {
        if self.awaits_gpu_group() {
            let group = super::nccl_group::NcclGroup::start(&self.launch, device, timeout)?;
            return Ok(World {
                group: Some(Arc::new(group)),
                ..self
            });
        }
        #[cfg(feature = "mpi")]
        if let (true, Some(mpi)) = (self.launch.launcher.is_mpi(), &self.group) {
            let group = super::mpi_gpu_group::MpiGpuGroup::start(mpi.clone(), device, timeout)?;
            return Ok(World {
                group: Some(Arc::new(group)),
                ..self
            });
        }
        Ok(self)
    }

    /// `rank r of n: ` for messages of a distributed run, empty for one process.
    pub fn prefix(&self) -> String {
        if self.is_distributed() {
            format!("rank {} of {}: ", self.rank(), self.size())
        } else {
            String::new()
        }
    }
}

fn start_group(launch: &Launch) -> Result<Option<Arc<dyn Group>>> {
    if launch.world_size <= 1 {
        return Ok(None);
    }
    match &launch.launcher {
        // GPU ranks: the trainer meets the others once it knows its device
        // ([`World::with_gpu_group`]).
        #[cfg(feature = "cuda")]
        Launcher::Torchrun { .. } => Ok(None),
        #[cfg(not(feature = "cuda"))]
        Launcher::Torchrun { .. } => Err(Error::invalid(
            "launch",
            format!(
                "{}; GPU ranks of a torchrun-style launch need a build with `--features cuda`",
                torchrun_on_cpu(launch)
            ),
        )),
        #[cfg(feature = "mpi")]
        _ => Ok(Some(Arc::new(super::mpi_group::MpiGroup::init(launch)?))),
        #[cfg(not(feature = "mpi"))]
        _ => {
            launch.check_supported()?;
            Ok(None)
        }
    }
}

/// Why several CPU processes of a torchrun-style launch cannot train together.
pub fn torchrun_on_cpu(launch: &Launch) -> String {
    format!(
        "this process is rank {} of {} of a torchrun-style launch: training on the CPU across \
         processes reduces gradients with MPI; launch with `mpirun -np {}` or `srun` on a build \
         with `--features mpi`",
        launch.rank, launch.world_size, launch.world_size
    )
}

/// Shuts the run's communication down (MPI_Finalize) once every reducer is gone; nothing for
/// one process. Called by `recycle` before it exits.
pub fn finalize() {
    #[cfg(feature = "mpi")]
    if let Some(World { group: Some(_), .. }) = WORLD.get() {
        super::mpi_group::finalize();
    }
}

/// A duration in seconds from the environment variable `var`, else `default`; a malformed
/// value is an error naming the variable and the value.
pub fn env_seconds(var: &str, default: f64) -> Result<Duration> {
    match std::env::var(var) {
        Err(_) => Ok(Duration::from_secs_f64(default)),
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| {
                Error::invalid(
                    "distributed",
                    format!("{var} is `{v}`: give a number of seconds above 0"),
                )
            }),
    }
}

/// A whole number from the environment variable `var`, else `default`; a malformed value is
/// an error naming the variable and the value.
pub fn env_usize(var: &str, default: usize) -> Result<usize> {
    match std::env::var(var) {
        Err(_) => Ok(default),
        Ok(v) => v.trim().parse::<usize>().map_err(|_| {
            Error::invalid(
                "distributed",
                format!("{var} is `{v}`: give a whole number"),
            )
        }),
    }
}
