//! Data-parallel training across processes (`docs/distributed.md`): how this process was
//! launched ([`launch`]), the ranks' collectives ([`Group`]: MPI behind the `mpi` feature, or
//! one process), and the gradient reduction the backward pass feeds bucket by bucket
//! ([`reducer`], [`buckets`]); for GPU ranks (behind the `cuda` feature), the NCCL
//! communicator made from rank 0's id, which the torchrun-style [`rendezvous`] or, under an
//! MPI launch, an MPI broadcast hands to every rank.
//!
//! Every rank trains on its shard of each global batch; the gradients are averaged (weighted
//! by each rank's share of the batch's loss terms), so every rank applies the same update and
//! ends each step with the same weights.

pub mod buckets;
pub mod launch;
#[cfg(all(feature = "mpi", feature = "cuda"))]
pub mod mpi_gpu_group;
#[cfg(feature = "mpi")]
pub mod mpi_group;
#[cfg(feature = "cuda")]
pub mod nccl_group;
pub mod reducer;
pub mod rendezvous;
pub mod world;

pub use buckets::BucketPlan;
pub use launch::{Launch, Launcher};
pub use reducer::{GradReducer, GradSync, ReduceTimes};
pub use world::{Group, World};
