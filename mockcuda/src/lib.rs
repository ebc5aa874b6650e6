//! A mock CUDA on the CPU: the driver API, cuBLASLt, cuDNN and NCCL, exported under their own
//! (versioned) symbol names from one shared library, so that the engine's GPU path runs
//! unchanged, picked up through `LD_LIBRARY_PATH`.
//!
//! - `memory`: the device address space (allocations, guard bytes, host views).
//! - `stream`: streams and events; every operation is queued with the byte ranges it reads and
//!   writes.
//! - `driver`: the `cu*` entry points; `module`: module loading and kernel launches on the
//!   kernel simulator.
//! - `blaslt`, `dnn`, `nccl`: the libraries, written from NVIDIA's documented semantics.

pub mod driver;
pub mod error;
pub mod memory;
pub mod module;
pub mod stream;

pub mod blaslt;
pub mod dnn;
pub mod libcommon;
pub mod nccl;
