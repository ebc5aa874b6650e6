//! The memory behind tensors: one enum arm per backend (candle's pattern); ops dispatch by
//! `match` on this enum (or on the tensor's `Device`).
//!
//! The `Cuda` arm exists in every build so that code matching on storage is written once. With
//! the `cuda` feature it holds a device buffer ([`CudaStorage`]); without it, `CudaStorage` is
//! an empty enum, so the arm cannot be built and every match on it compiles to nothing.

use half::bf16;

use crate::DType;

#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    Cuda(CudaStorage),
}

/// Device memory of one tensor storage: a stream-ordered allocation on one GPU and the element
/// type it holds (see `crate::cuda` for the allocator), and what the host knows of its values
/// without reading them back (`host_copy`: the i32 values it was uploaded with, tensors
/// derived from them; changed only under the tensor's write lock).
#[cfg(feature = "cuda")]
#[derive(Debug)]
pub struct CudaStorage {
    pub(crate) buffer: crate::cuda::DeviceBuffer,
    pub(crate) dtype: DType,
    pub(crate) len: usize,
    pub(crate) host: crate::host_copy::HostCopy,
}

#[cfg(feature = "cuda")]
impl CudaStorage {
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The GPU holding the memory.
    pub fn ordinal(&self) -> usize {
        self.buffer.ordinal()
    }
}

/// Without the `cuda` feature no device storage can exist: this enum has no value.
#[cfg(not(feature = "cuda"))]
#[derive(Debug)]
pub enum CudaStorage {}

#[cfg(not(feature = "cuda"))]
impl CudaStorage {
    pub fn dtype(&self) -> DType {
        match *self {}
    }

    pub fn len(&self) -> usize {
        match *self {}
    }

    pub fn is_empty(&self) -> bool {
        match *self {}
    }

    pub fn ordinal(&self) -> usize {
        match *self {}
    }
}

/// Host memory, typed.
#[derive(Debug, Clone)]
pub enum CpuStorage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    I32(Vec<i32>),
}

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::I32(_) => DType::I32,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::I32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn zeros(dtype: DType, len: usize) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(vec![0.0; len]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; len]),
            DType::I32 => CpuStorage::I32(vec![0; len]),
        }
    }

    /// Elements `[start, start + len)` widened to f32.
    pub fn range_to_f32(&self, start: usize, len: usize) -> Vec<f32> {
        match self {
            CpuStorage::F32(v) => v[start..start + len].to_vec(),
            CpuStorage::BF16(v) => v[start..start + len].iter().map(|x| x.to_f32()).collect(),
            CpuStorage::I32(v) => v[start..start + len].iter().map(|&x| x as f32).collect(),
        }
    }

    /// Values of `dtype` from their little-endian bytes (a copy back from a device).
    pub fn from_bytes(dtype: DType, bytes: &[u8]) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(bytemuck::pod_collect_to_vec(bytes)),
            DType::BF16 => CpuStorage::BF16(bytemuck::pod_collect_to_vec(bytes)),
            DType::I32 => CpuStorage::I32(bytemuck::pod_collect_to_vec(bytes)),
        }
    }

    /// The raw little-endian bytes of `[start, start + len)`.
    pub fn range_bytes(&self, start: usize, len: usize) -> &[u8] {
        match self {
            CpuStorage::F32(v) => bytemuck::cast_slice(&v[start..start + len]),
            CpuStorage::BF16(v) => bytemuck::cast_slice(&v[start..start + len]),
            CpuStorage::I32(v) => bytemuck::cast_slice(&v[start..start + len]),
        }
    }
}

impl Storage {
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            Storage::Cuda(s) => s.dtype(),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Storage::Cpu(s) => s.len(),
            Storage::Cuda(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
