//! The memory behind tensors: one enum arm per backend (candle's pattern). The CUDA arm joins
//! when the `cuda` feature brings its backend; ops dispatch by `match` on this enum.

use half::bf16;

use crate::DType;

#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
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
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Storage::Cpu(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
