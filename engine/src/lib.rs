//! recycle-engine: tensors, devices, autograd, CPU ops, optimizers, schedules and checkpoints
//! for Recycle, a training engine for same-architecture knowledge distillation.
//!
//! Layout (one module per job):
//! - `tensor`, `storage`, `dtype`, `device`: values and where they live;
//! - `autograd`: the recording / inference tape;
//! - `ops`: one file per op family, forward and backward, CPU reference implementations;
//! - `op_table`: every op's test cases, written once and run on the CPU (gradient checks) and
//!   on a device against the CPU (the engine's tests, `recycle gpu-check`);
//! - `backend`: backend-level functions beneath the ops, each dispatching by device to a CPU
//!   arm (the plain f32 kernels) or a CUDA arm, with no tape;
//! - `params`: a model's flat parameter and gradient buffers;
//! - `optim`: SGDW, AdamW and learning-rate schedules over flat buffers;
//! - `checkpoint`: safetensors save/load;
//! - `gradcheck`: finite-difference checks used by every op's tests;
//! - `host_copy`: the host's copy of a device storage's i32 values (no downloads to read ids);
//! - `kd_loss`: the fused distillation loss, its family in one place: the one `KdKind`, the
//!   host side both arms share (kernel choice, row counts, scalars), the f64 reference of a
//!   row, the CPU twin, the op on the tape and the CUDA arm (`kd_loss::cuda`, feature `cuda`);
//! - `memory`: allocator settings for the large short-lived buffers of a step, and an opt-in
//!   counting allocator (heap bytes in use and their peak).

pub mod autograd;
pub mod backend;
pub mod checkpoint;
pub mod cuda;
pub mod device;
pub mod dtype;
pub mod error;
pub mod gradcheck;
pub mod kd_loss;
// Without the `cuda` feature no device storage exists to hold a host copy; the module is
// still built (and tested) there, since its logic is plain host code.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) mod host_copy;
pub mod memory;
pub mod op_table;
pub mod ops;
pub mod optim;
pub mod params;
pub mod rng;
pub mod storage;
pub mod tensor;

pub use autograd::{BackwardFn, Gradients, Tape, Var};
pub use device::Device;
pub use dtype::{DType, WithDType};
pub use error::{Error, Result};
pub use params::{FlatParams, ParamEntry};
pub use tensor::Tensor;
