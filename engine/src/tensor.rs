//! `Tensor`: shared storage + offset + shape + dtype, always contiguous row-major.
//!
//! Cloning a tensor shares its storage (an `Arc`), so a parameter is a cheap view into a model's
//! flat buffer. Layout changes (permute, transpose) are explicit copy ops; `reshape` and `view`
//! only reinterpret. Values are read through guards (`read_f32`) that borrow f32 storage and
//! widen bf16/i32 storage, so CPU ops are written once, over `&[f32]`.
//!
//! A tensor on a GPU (feature `cuda`) holds device memory. The guards refuse it (CPU code
//! never reads device memory behind the caller's back); copies are explicit: `to_device`,
//! `to_vec`/`to_vec_f32`, `copy_from`. Metadata operations (`reshape`, `view`) and the
//! in-place helpers (`cast`, `deep_copy`, `add_assign`, `zero_`) work on both.
//!
//! An i32 tensor uploaded from the host keeps its values beside the device buffer
//! (`host_copy`): `to_vec`, `to_bytes` and `to_device(Device::Cpu)` of such a tensor (or of a
//! view of it) read them without a download, so ops that check ids, labels or masks on the
//! host do not wait for the GPU. Writes into device storage go through `cuda_view_mut` or
//! `cuda_write`, which keep that copy true or drop it.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use half::bf16;

use rayon::prelude::*;

use crate::backend::elementwise::PARALLEL_MIN;
use crate::storage::{CpuStorage, Storage};
use crate::{rng, DType, Device, Error, Result, WithDType};

#[derive(Clone)]
pub struct Tensor {
    storage: Arc<RwLock<Storage>>,
    offset: usize,
    shape: Vec<usize>,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor[{:?}, {}, {}]",
            self.shape, self.dtype, self.device
        )
    }
}

pub fn elem_count(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    fn from_cpu_storage(storage: CpuStorage, shape: &[usize]) -> Tensor {
        let dtype = storage.dtype();
        Tensor {
            storage: Arc::new(RwLock::new(Storage::Cpu(storage))),
            offset: 0,
            shape: shape.to_vec(),
            dtype,
            device: Device::Cpu,
        }
    }

    fn check_device(op: &'static str, device: Device) -> Result<()> {
        match device {
            Device::Cpu => Ok(()),
            Device::Cuda(n) => Device::cuda(n).map(|_| ()).map_err(|e| match e {
                Error::Device(msg) => Error::Device(format!("{op}: {msg}")),
                e => e,
            }),
        }
    }

    /// A tensor that takes ownership of `data` (no copy on the CPU; one upload to a GPU).
    pub fn from_vec<T: WithDType>(data: Vec<T>, shape: &[usize], device: Device) -> Result<Tensor> {
        Self::check_device("Tensor::from_vec", device)?;
        if !device.is_cpu() {
            return Self::from_vec(data, shape, Device::Cpu)?.to_device(device);
        }
        if data.len() != elem_count(shape) {
            return Err(Error::shape(
                "Tensor::from_vec",
                format!("{} values do not fill shape {shape:?}", data.len()),
            ));
        }
        let any: Box<dyn std::any::Any> = Box::new(data);
        let storage = match T::DTYPE {
            DType::F32 => CpuStorage::F32(*any.downcast::<Vec<f32>>().expect("dtype f32")),
            DType::BF16 => CpuStorage::BF16(*any.downcast::<Vec<bf16>>().expect("dtype bf16")),
            DType::I32 => CpuStorage::I32(*any.downcast::<Vec<i32>>().expect("dtype i32")),
        };
        Ok(Self::from_cpu_storage(storage, shape))
    }

    pub fn from_slice<T: WithDType>(data: &[T], shape: &[usize], device: Device) -> Result<Tensor> {
        Self::from_vec(data.to_vec(), shape, device)
    }

    /// Shorthand for the common case: f32 values on the CPU.
    pub fn f32(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        Self::from_vec(data, shape, Device::Cpu)
    }

    pub fn zeros(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        Self::check_device("Tensor::zeros", device)?;
        match device {
            Device::Cpu => Ok(Self::from_cpu_storage(
                CpuStorage::zeros(dtype, elem_count(shape)),
                shape,
            )),
            Device::Cuda(_n) => crate::on_cuda!(device, {
                let ctx = crate::cuda::context_of(_n)?;
                let n = elem_count(shape);
                let buffer = crate::cuda::DeviceBuffer::zeroed(&ctx, n * dtype.size_in_bytes())?;
                // Zero ids (BERT's default segment ids) are known on the host: no download
                // when an op reads them.
                let host = match dtype {
                    DType::I32 => crate::host_copy::HostCopy::zeros(n),
                    _ => crate::host_copy::HostCopy::none(),
                };
                Ok(Self::from_device_buffer_with_host(
                    buffer, dtype, shape, host,
                ))
            }),
        }
    }

    pub fn full(value: f32, shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        Self::check_device("Tensor::full", device)?;
        let n = elem_count(shape);
        let t = Self::zeros(&[n], DType::F32, Device::Cpu)?;
        t.write_f32()?.fill(value);
        t.reshape(shape)?.cast(dtype)?.to_device(device)
    }

    pub fn ones(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        Self::full(1.0, shape, dtype, device)
    }

    /// Normal samples `mean + std * N(0, 1)` from stream `seed` (reproducible across runs and
    /// backends: see `rng`).
    pub fn randn(
        shape: &[usize],
        mean: f32,
        std: f32,
        seed: u64,
        dtype: DType,
        device: Device,
    ) -> Result<Tensor> {
        Self::check_device("Tensor::randn", device)?;
        let data: Vec<f32> = (0..elem_count(shape) as u64)
            .map(|i| mean + std * rng::normal_at(seed, i))
            .collect();
        // Drawn and rounded on the host, so every device gets the same values.
        Self::from_vec(data, shape, Device::Cpu)?
            .cast(dtype)?
            .to_device(device)
    }

    /// Uniform samples in `[low, high)` from stream `seed`.
    pub fn rand_uniform(
        shape: &[usize],
        low: f32,
        high: f32,
        seed: u64,
        dtype: DType,
        device: Device,
    ) -> Result<Tensor> {
        if low.partial_cmp(&high) != Some(std::cmp::Ordering::Less) {
            return Err(Error::invalid(
                "Tensor::rand_uniform",
                format!("low {low} must be below high {high}"),
            ));
        }
        Self::check_device("Tensor::rand_uniform", device)?;
        let data: Vec<f32> = (0..elem_count(shape) as u64)
            .map(|i| low + (high - low) * rng::uniform_at(seed, i))
            .collect();
        Self::from_vec(data, shape, Device::Cpu)?
            .cast(dtype)?
            .to_device(device)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dims(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn elem_count(&self) -> usize {
        elem_count(&self.shape)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Size of dimension `d`, with negative indices counting from the end.
    pub fn dim(&self, d: isize) -> Result<usize> {
        let r = self.rank() as isize;
        let i = if d < 0 { r + d } else { d };
        if i < 0 || i >= r {
            return Err(Error::invalid(
                "Tensor::dim",
                format!("dimension {d} out of range for shape {:?}", self.shape),
            ));
        }
        Ok(self.shape[i as usize])
    }

    /// Whether two tensors share the same storage (views of one buffer).
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }

    /// The same elements under another shape (no copy).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if elem_count(shape) != self.elem_count() {
            return Err(Error::shape(
                "reshape",
                format!(
                    "cannot view {:?} ({} elements) as {shape:?} ({} elements)",
                    self.shape,
                    self.elem_count(),
                    elem_count(shape)
                ),
            ));
        }
        let mut t = self.clone();
        t.shape = shape.to_vec();
        Ok(t)
    }

    /// A view of `elem_count(shape)` elements starting `offset` elements into this tensor
    /// (a parameter inside a flat buffer).
    pub fn view(&self, offset: usize, shape: &[usize]) -> Result<Tensor> {
        let n = elem_count(shape);
        if offset + n > self.elem_count() {
            return Err(Error::shape(
                "view",
                format!(
                    "view of {shape:?} at offset {offset} runs past the end of a tensor of {} elements",
                    self.elem_count()
                ),
            ));
        }
        let mut t = self.clone();
        t.offset += offset;
        t.shape = shape.to_vec();
        Ok(t)
    }

    /// Rows `[start, start + len)` of the first dimension (a view).
    pub fn narrow_rows(&self, start: usize, len: usize) -> Result<Tensor> {
        let rows = *self
            .shape
            .first()
            .ok_or_else(|| Error::invalid("narrow_rows", "a scalar has no rows".to_string()))?;
        if start + len > rows {
            return Err(Error::shape(
                "narrow_rows",
                format!("rows {start}..{} of a tensor with {rows} rows", start + len),
            ));
        }
        let row = self.elem_count() / rows.max(1);
        let mut shape = self.shape.clone();
        shape[0] = len;
        self.view(start * row, &shape)
    }

    fn read_guard(&self) -> RwLockReadGuard<'_, Storage> {
        // A poisoned lock only means another thread panicked mid-op; the data is plain numbers.
        self.storage.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_guard(&self) -> RwLockWriteGuard<'_, Storage> {
        self.storage.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Read access as f32: borrowed when the storage is f32, widened copy otherwise.
    pub fn read_f32(&self) -> Result<F32Read<'_>> {
        let guard = self.read_guard();
        let (offset, len) = (self.offset, self.elem_count());
        match &*guard {
            Storage::Cpu(CpuStorage::F32(_)) => Ok(F32Read::Borrowed { guard, offset, len }),
            Storage::Cpu(s) => Ok(F32Read::Owned(s.range_to_f32(offset, len))),
            Storage::Cuda(_) => Err(crate::cuda::host_access_error("read_f32", self.device)),
        }
    }

    /// Read access to i32 values (labels, indices).
    pub fn read_i32(&self) -> Result<I32Read<'_>> {
        let guard = self.read_guard();
        match &*guard {
            Storage::Cpu(CpuStorage::I32(_)) => Ok(I32Read {
                guard,
                offset: self.offset,
                len: self.elem_count(),
            }),
            Storage::Cuda(_) => Err(crate::cuda::host_access_error("read_i32", self.device)),
            s => Err(Error::DType {
                op: "read_i32",
                expected: DType::I32,
                got: s.dtype(),
            }),
        }
    }

    /// Read access to a bf16 tensor's values as stored (a bf16 teacher's weights).
    pub fn read_bf16(&self) -> Result<Bf16Read<'_>> {
        let guard = self.read_guard();
        match &*guard {
            Storage::Cpu(CpuStorage::BF16(_)) => Ok(Bf16Read {
                guard,
                offset: self.offset,
                len: self.elem_count(),
            }),
            s => Err(Error::DType {
                op: "read_bf16",
                expected: DType::BF16,
                got: s.dtype(),
            }),
        }
    }

    /// Write access to an f32 tensor in place (optimizer updates, gradient accumulation).
    pub fn write_f32(&self) -> Result<F32Write<'_>> {
        let guard = self.write_guard();
        match &*guard {
            Storage::Cpu(CpuStorage::F32(_)) => Ok(F32Write {
                guard,
                offset: self.offset,
                len: self.elem_count(),
            }),
            Storage::Cuda(_) => Err(crate::cuda::host_access_error("write_f32", self.device)),
            s => Err(Error::DType {
                op: "write_f32",
                expected: DType::F32,
                got: s.dtype(),
            }),
        }
    }

    /// Write access to a bf16 tensor in place (bf16 working copies of master weights).
    pub fn write_bf16(&self) -> Result<Bf16Write<'_>> {
        let guard = self.write_guard();
        match &*guard {
            Storage::Cpu(CpuStorage::BF16(_)) => Ok(Bf16Write {
                guard,
                offset: self.offset,
                len: self.elem_count(),
            }),
            Storage::Cuda(_) => Err(crate::cuda::host_access_error("write_bf16", self.device)),
            s => Err(Error::DType {
                op: "write_bf16",
                expected: DType::BF16,
                got: s.dtype(),
            }),
        }
    }

    /// The values, copied out, as `T` (which must be this tensor's dtype).
    pub fn to_vec<T: WithDType>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(Error::DType {
                op: "to_vec",
                expected: T::DTYPE,
                got: self.dtype,
            });
        }
        if !self.device.is_cpu() {
            return Ok(bytemuck::pod_collect_to_vec(&self.to_bytes()?));
        }
        let guard = self.read_guard();
        match &*guard {
            Storage::Cpu(s) => {
                let bytes = s.range_bytes(self.offset, self.elem_count());
                Ok(bytemuck::pod_collect_to_vec(bytes))
            }
            Storage::Cuda(_) => Err(crate::cuda::host_access_error("to_vec", self.device)),
        }
    }

    /// The values as f32, whatever the dtype (copied to the host from a GPU).
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        if !self.device.is_cpu() {
            return self.to_device(Device::Cpu)?.to_vec_f32();
        }
        Ok(self.read_f32()?.to_vec())
    }

    /// The single value of a one-element tensor.
    pub fn to_scalar_f32(&self) -> Result<f32> {
        if self.elem_count() != 1 {
            return Err(Error::shape(
                "to_scalar_f32",
                format!("expected one element, got shape {:?}", self.shape),
            ));
        }
        Ok(self.to_vec_f32()?[0])
    }

    /// Little-endian bytes of the elements (for checkpoints; copied from a GPU, unless they
    /// are i32 values the host kept when they were uploaded).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        if let Device::Cuda(_) = self.device {
            return crate::on_cuda!(self.device, {
                // i32 values uploaded from the host are read from its copy: no download, no
                // wait for the stream.
                if let Some(v) = self.known_i32() {
                    return Ok(bytemuck::cast_slice(&v).to_vec());
                }
                self.device_bytes()
            });
        }
        let guard = self.read_guard();
        match &*guard {
            Storage::Cpu(s) => Ok(s.range_bytes(self.offset, self.elem_count()).to_vec()),
            Storage::Cuda(_) => Err(crate::cuda::host_access_error("to_bytes", self.device)),
        }
    }

    /// The bytes as the device holds them, read back even when the host knows the values
    /// (a download, which waits for the GPU): for checks that the host copy of an i32 tensor
    /// (`host_copy`) is what the device holds. On the CPU, `to_bytes`.
    pub fn device_bytes(&self) -> Result<Vec<u8>> {
        if let Device::Cuda(_) = self.device {
            return crate::on_cuda!(self.device, {
                let v = self.cuda_view("device_bytes")?;
                let mut out = vec![0u8; v.len * self.dtype.size_in_bytes()];
                crate::cuda::copy_to_host(&v, &mut out)?;
                Ok(out)
            });
        }
        self.to_bytes()
    }

    /// A fresh contiguous copy with its own storage, on the same device.
    pub fn deep_copy(&self) -> Result<Tensor> {
        if let Device::Cuda(_) = self.device {
            return crate::on_cuda!(self.device, crate::cuda::elementwise::deep_copy(self));
        }
        let guard = self.read_guard();
        let Storage::Cpu(s) = &*guard else {
            return Err(crate::cuda::host_access_error("deep_copy", self.device));
        };
        let (o, n) = (self.offset, self.elem_count());
        let storage = match s {
            CpuStorage::F32(v) => CpuStorage::F32(v[o..o + n].to_vec()),
            CpuStorage::BF16(v) => CpuStorage::BF16(v[o..o + n].to_vec()),
            CpuStorage::I32(v) => CpuStorage::I32(v[o..o + n].to_vec()),
        };
        Ok(Self::from_cpu_storage(storage, &self.shape))
    }

    /// Converts to `dtype` (a new tensor; shares storage when the dtype is already right).
    /// Float to bf16 rounds to nearest even; float to i32 truncates toward zero.
    pub fn cast(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        if let Device::Cuda(_) = self.device {
            return crate::on_cuda!(self.device, crate::cuda::elementwise::cast(self, dtype));
        }
        let storage = {
            let guard = self.read_guard();
            let Storage::Cpu(s) = &*guard else {
                return Err(crate::cuda::host_access_error("cast", self.device));
            };
            let (o, n) = (self.offset, self.elem_count());
            match (s, dtype) {
                (CpuStorage::I32(v), DType::F32) => {
                    CpuStorage::F32(v[o..o + n].iter().map(|&x| x as f32).collect())
                }
                (CpuStorage::I32(v), DType::BF16) => CpuStorage::BF16(
                    v[o..o + n]
                        .iter()
                        .map(|&x| bf16::from_f32(x as f32))
                        .collect(),
                ),
                (s, DType::F32) => CpuStorage::F32(s.range_to_f32(o, n)),
                (s, DType::BF16) => CpuStorage::BF16(
                    s.range_to_f32(o, n)
                        .into_iter()
                        .map(bf16::from_f32)
                        .collect(),
                ),
                (s, DType::I32) => {
                    CpuStorage::I32(s.range_to_f32(o, n).into_iter().map(|x| x as i32).collect())
                }
            }
        };
        Ok(Self::from_cpu_storage(storage, &self.shape))
    }

    /// Copies `src` (same element count, any float dtype) into this tensor's elements in place.
    pub fn copy_from(&self, src: &Tensor) -> Result<()> {
        if src.elem_count() != self.elem_count() {
            return Err(Error::shape(
                "copy_from",
                format!("{:?} into {:?}", src.shape, self.shape),
            ));
        }
        if !self.device.is_cpu() {
            return crate::on_cuda!(self.device, crate::cuda::elementwise::copy_into(self, src));
        }
        let values = src.to_vec_f32()?;
        match self.dtype {
            DType::F32 => self.write_f32()?.copy_from_slice(&values),
            DType::BF16 => {
                let mut w = self.write_bf16()?;
                for (d, s) in w.iter_mut().zip(values) {
                    *d = bf16::from_f32(s);
                }
            }
            DType::I32 => {
                return Err(Error::DType {
                    op: "copy_from",
                    expected: DType::F32,
                    got: DType::I32,
                })
            }
        }
        Ok(())
    }

    /// Overwrites this i32 tensor's elements with `values` (counters such as BatchNorm's
    /// `num_batches_tracked`).
    pub fn copy_from_i32(&self, values: &[i32]) -> Result<()> {
        if values.len() != self.elem_count() {
            return Err(Error::shape(
                "copy_from_i32",
                format!("{} values into shape {:?}", values.len(), self.shape),
            ));
        }
        if !self.device.is_cpu() {
            return crate::on_cuda!(self.device, {
                self.expect_dtype("copy_from_i32", DType::I32)?;
                // The values written are known: the host copy (if any) follows them, so a
                // counter written here and read back (BatchNorm's) never downloads.
                self.cuda_write(
                    "copy_from_i32",
                    |v| crate::cuda::copy_to_device(v, bytemuck::cast_slice(values)),
                    |host, offset| host.write_i32(offset, values),
                )
            });
        }
        let mut g = self.write_guard();
        match &mut *g {
            Storage::Cpu(CpuStorage::I32(v)) => {
                v[self.offset..self.offset + values.len()].copy_from_slice(values);
                Ok(())
            }
            s => Err(Error::DType {
                op: "copy_from_i32",
                expected: DType::I32,
                got: s.dtype(),
            }),
        }
    }

    /// Adds `src` into this f32 tensor in place (gradient accumulation).
    pub fn add_assign(&self, src: &Tensor) -> Result<()> {
        crate::error::check_same_shape("add_assign", &self.shape, &src.shape)?;
        match crate::cuda::common_device("add_assign", &[self, src])? {
            Device::Cpu => {}
            device => {
                return crate::on_cuda!(device, crate::cuda::elementwise::accumulate(self, src))
            }
        }
        if self.same_storage(src) {
            let s = src.to_vec_f32()?;
            let mut d = self.write_f32()?;
            d.iter_mut().zip(s).for_each(|(d, s)| *d += s);
            return Ok(());
        }
        let s = src.read_f32()?;
        let mut d = self.write_f32()?;
        if d.len() >= PARALLEL_MIN {
            d.par_chunks_mut(PARALLEL_MIN / 4)
                .zip(s.par_chunks(PARALLEL_MIN / 4))
                .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d += s));
        } else {
            d.iter_mut().zip(s.iter()).for_each(|(d, s)| *d += s);
        }
        Ok(())
    }

    /// A fresh f32 tensor holding `self + other` (same shape), neither input changed: gradient
    /// accumulation into a private buffer. On the CPU one pass writes the sum (no copy of
    /// `self` to add into); elsewhere, and when the two share storage, a copy of `self` in f32
    /// and `add_assign`. Either way each element is `f32(self) + f32(other)`.
    pub fn sum_f32(&self, other: &Tensor) -> Result<Tensor> {
        crate::error::check_same_shape("sum_f32", &self.shape, &other.shape)?;
        if self.device.is_cpu() && other.device.is_cpu() && !self.same_storage(other) {
            let (a, b) = (self.read_f32()?, other.read_f32()?);
            let sum: Vec<f32> = if a.len() >= PARALLEL_MIN {
                a.par_iter().zip(b.par_iter()).map(|(a, b)| a + b).collect()
            } else {
                a.iter().zip(b.iter()).map(|(a, b)| a + b).collect()
            };
            return Tensor::f32(sum, &self.shape);
        }
        let sum = if self.dtype == DType::F32 {
            self.deep_copy()?
        } else {
            self.cast(DType::F32)?
        };
        sum.add_assign(other)?;
        Ok(sum)
    }

    /// Sets every element to zero in place.
    pub fn zero_(&self) -> Result<()> {
        if !self.device.is_cpu() {
            return crate::on_cuda!(self.device, {
                let n = self.elem_count();
                self.cuda_write("zero_", crate::cuda::zero_device, |host, offset| {
                    host.zero(offset, n)
                })
            });
        }
        match self.dtype {
            // A model's flat gradient buffer, zeroed every step: on all threads.
            DType::F32 if self.elem_count() >= PARALLEL_MIN => self
                .write_f32()?
                .par_chunks_mut(PARALLEL_MIN / 4)
                .for_each(|c| c.fill(0.0)),
            DType::F32 => self.write_f32()?.fill(0.0),
            DType::BF16 => self.write_bf16()?.fill(bf16::ZERO),
            DType::I32 => {
                let mut g = self.write_guard();
                let Storage::Cpu(CpuStorage::I32(v)) = &mut *g else {
                    unreachable!("dtype says i32")
                };
                v[self.offset..self.offset + self.elem_count()].fill(0);
            }
        }
        Ok(())
    }

    /// A copy of this tensor on `device` (the same tensor when it is already there). To a GPU,
    /// through the context's pinned staging buffer; from a GPU, after the work queued on it.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device {
            return Ok(self.clone());
        }
        Self::check_device("Tensor::to_device", device)?;
        match (self.device, device) {
            (Device::Cpu, Device::Cuda(_n)) => crate::on_cuda!(device, {
                let ctx = crate::cuda::context_of(_n)?;
                let bytes = self.to_bytes()?;
                let buffer = crate::cuda::DeviceBuffer::alloc(&ctx, bytes.len())?;
                // i32 values (ids, labels, masks) stay readable on the host: see `host_copy`.
                let host = match self.dtype {
                    DType::I32 if self.elem_count() <= crate::host_copy::HOST_COPY_MAX => {
                        crate::host_copy::HostCopy::of(bytemuck::pod_collect_to_vec(&bytes))
                    }
                    _ => crate::host_copy::HostCopy::none(),
                };
                let t = Self::from_device_buffer_with_host(buffer, self.dtype, &self.shape, host);
                crate::cuda::copy_to_device(&t.cuda_view("to_device")?, &bytes)?;
                Ok(t)
            }),
            (Device::Cuda(_), Device::Cpu) => {
                let bytes = self.to_bytes()?;
                Ok(Self::from_cpu_storage(
                    CpuStorage::from_bytes(self.dtype, &bytes),
                    &self.shape,
                ))
            }
            // Between GPUs: through the host (peer copies come with multi-GPU training).
            _ => self.to_device(Device::Cpu)?.to_device(device),
        }
    }

    /// Fails with a dtype error unless this tensor is `dtype`.
    pub fn expect_dtype(&self, op: &'static str, dtype: DType) -> Result<()> {
        if self.dtype != dtype {
            return Err(Error::DType {
                op,
                expected: dtype,
                got: self.dtype,
            });
        }
        Ok(())
    }

    /// Fails with a dtype error unless this tensor holds floats.
    pub fn expect_float(&self, op: &'static str) -> Result<()> {
        if !self.dtype.is_float() {
            return Err(Error::DType {
                op,
                expected: DType::F32,
                got: self.dtype,
            });
        }
        Ok(())
    }

    /// Fails with a shape error unless this tensor has `rank` dimensions.
    pub fn expect_rank(&self, op: &'static str, name: &str, rank: usize) -> Result<()> {
        if self.rank() != rank {
            return Err(Error::shape(
                op,
                format!(
                    "{name} must have {rank} dimensions, got shape {:?}",
                    self.shape
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
impl Tensor {
    /// A tensor owning `buffer` (which holds `elem_count(shape)` values of `dtype`), whose
    /// values the host does not know (a kernel fills it).
    pub(crate) fn from_device_buffer(
        buffer: crate::cuda::DeviceBuffer,
        dtype: DType,
        shape: &[usize],
    ) -> Tensor {
        Self::from_device_buffer_with_host(buffer, dtype, shape, crate::host_copy::HostCopy::none())
    }

    /// A tensor owning `buffer`, with what the host knows of the values it will hold once the
    /// copy queued by the caller has run.
    pub(crate) fn from_device_buffer_with_host(
        buffer: crate::cuda::DeviceBuffer,
        dtype: DType,
        shape: &[usize],
        host: crate::host_copy::HostCopy,
    ) -> Tensor {
        let ordinal = buffer.ordinal();
        Tensor {
            storage: Arc::new(RwLock::new(Storage::Cuda(crate::storage::CudaStorage {
                buffer,
                dtype,
                len: elem_count(shape),
                host,
            }))),
            offset: 0,
            shape: shape.to_vec(),
            dtype,
            device: Device::Cuda(ordinal),
        }
    }

    /// The device address of this tensor's first element, its context and extent. The address
    /// stays valid while this tensor (or any clone sharing its storage) lives; work using it is
    /// ordered on the context's compute stream.
    pub(crate) fn cuda_view(&self, op: &'static str) -> Result<crate::cuda::CudaView> {
        let guard = self.read_guard();
        match &*guard {
            Storage::Cuda(s) => Ok(crate::cuda::CudaView {
                ctx: s.buffer.context().clone(),
                ptr: s.buffer.ptr() + (self.offset * self.dtype.size_in_bytes()) as u64,
                len: self.elem_count(),
                dtype: self.dtype,
            }),
            Storage::Cpu(_) => Err(Error::Device(format!(
                "{op}: expected a tensor on a GPU, this one is on the CPU"
            ))),
        }
    }

    /// The device address of this tensor for a kernel or copy that **writes** into it: what
    /// the host knew of the storage's values (`host_copy`) is dropped first, under the write
    /// lock, so no read afterwards returns the old values. Every in-place write into an
    /// existing device tensor goes through here or [`Tensor::cuda_write`].
    pub(crate) fn cuda_view_mut(&self, op: &'static str) -> Result<crate::cuda::CudaView> {
        let mut guard = self.write_guard();
        if let Storage::Cuda(s) = &mut *guard {
            s.host.invalidate();
        }
        drop(guard);
        self.cuda_view(op)
    }

    /// Runs `write` (which overwrites this tensor's elements on the device) under the
    /// storage's write lock, then lets `known` bring the host copy up to date from the
    /// tensor's offset (the caller knows what it wrote); if `write` fails, what it left on the
    /// device is unknown and the host copy is dropped.
    pub(crate) fn cuda_write(
        &self,
        op: &'static str,
        write: impl FnOnce(&crate::cuda::CudaView) -> Result<()>,
        known: impl FnOnce(&mut crate::host_copy::HostCopy, usize),
    ) -> Result<()> {
        let mut guard = self.write_guard();
        let Storage::Cuda(s) = &mut *guard else {
            return Err(Error::Device(format!(
                "{op}: expected a tensor on a GPU, this one is on the CPU"
            )));
        };
        let v = crate::cuda::CudaView {
            ctx: s.buffer.context().clone(),
            ptr: s.buffer.ptr() + (self.offset * self.dtype.size_in_bytes()) as u64,
            len: self.elem_count(),
            dtype: self.dtype,
        };
        match write(&v) {
            Ok(()) => {
                known(&mut s.host, self.offset);
                Ok(())
            }
            Err(e) => {
                s.host.invalidate();
                Err(e)
            }
        }
    }

    /// This i32 device tensor's values as the host knows them (uploaded from the host and not
    /// overwritten since), or `None`: read with no copy and no wait for the GPU.
    pub(crate) fn known_i32(&self) -> Option<Vec<i32>> {
        if self.dtype != DType::I32 {
            return None;
        }
        match &*self.read_guard() {
            Storage::Cuda(s) => s
                .host
                .i32_range(self.offset, self.elem_count())
                .map(<[i32]>::to_vec),
            Storage::Cpu(_) => None,
        }
    }

    /// The tensor derived from this view's values under `kind`, `dtype` and `stream` by an
    /// earlier call, if no write has happened since (see `host_copy::DerivedKey`).
    pub(crate) fn derived(&self, key: DerivedParts) -> Option<Tensor> {
        match &*self.read_guard() {
            Storage::Cuda(s) => s.host.derived(&self.derived_key(key)),
            Storage::Cpu(_) => None,
        }
    }

    /// Keeps `t`, derived from this view's values, for [`Tensor::derived`]: it lives as long as
    /// this storage and goes with the first write into it. Nothing is kept for a CPU tensor
    /// (its guards write without telling the storage).
    pub(crate) fn keep_derived(&self, key: DerivedParts, t: Tensor) {
        let key = self.derived_key(key);
        if let Storage::Cuda(s) = &mut *self.write_guard() {
            s.host.insert_derived(key, t);
        }
    }

    fn derived_key(&self, (kind, dtype, stream): DerivedParts) -> crate::host_copy::DerivedKey {
        crate::host_copy::DerivedKey {
            kind,
            offset: self.offset,
            len: self.elem_count(),
            dtype,
            stream,
        }
    }
}

/// What a derived tensor is, besides the view it comes from: its kind, its dtype, and the raw
/// handle of the stream that made it.
#[cfg(feature = "cuda")]
pub(crate) type DerivedParts = (&'static str, DType, usize);

/// f32 values of a tensor, borrowed from f32 storage or widened from another dtype.
pub enum F32Read<'a> {
    Borrowed {
        guard: RwLockReadGuard<'a, Storage>,
        offset: usize,
        len: usize,
    },
    Owned(Vec<f32>),
}

impl Deref for F32Read<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            F32Read::Borrowed { guard, offset, len } => match &**guard {
                Storage::Cpu(CpuStorage::F32(v)) => &v[*offset..*offset + *len],
                _ => unreachable!("F32Read::Borrowed holds f32 storage"),
            },
            F32Read::Owned(v) => v,
        }
    }
}

pub struct I32Read<'a> {
    guard: RwLockReadGuard<'a, Storage>,
    offset: usize,
    len: usize,
}

impl Deref for I32Read<'_> {
    type Target = [i32];
    fn deref(&self) -> &[i32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::I32(v)) => &v[self.offset..self.offset + self.len],
            _ => unreachable!("I32Read holds i32 storage"),
        }
    }
}

pub struct Bf16Read<'a> {
    guard: RwLockReadGuard<'a, Storage>,
    offset: usize,
    len: usize,
}

impl Deref for Bf16Read<'_> {
    type Target = [bf16];
    fn deref(&self) -> &[bf16] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::BF16(v)) => &v[self.offset..self.offset + self.len],
            _ => unreachable!("Bf16Read holds bf16 storage"),
        }
    }
}

pub struct F32Write<'a> {
    guard: RwLockWriteGuard<'a, Storage>,
    offset: usize,
    len: usize,
}

impl Deref for F32Write<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.offset..self.offset + self.len],
            _ => unreachable!("F32Write holds f32 storage"),
        }
    }
}

impl DerefMut for F32Write<'_> {
    fn deref_mut(&mut self) -> &mut [f32] {
        match &mut *self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &mut v[self.offset..self.offset + self.len],
            _ => unreachable!("F32Write holds f32 storage"),
        }
    }
}

pub struct Bf16Write<'a> {
    guard: RwLockWriteGuard<'a, Storage>,
    offset: usize,
    len: usize,
}

impl Deref for Bf16Write<'_> {
    type Target = [bf16];
    fn deref(&self) -> &[bf16] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::BF16(v)) => &v[self.offset..self.offset + self.len],
            _ => unreachable!("Bf16Write holds bf16 storage"),
        }
    }
}

impl DerefMut for Bf16Write<'_> {
    fn deref_mut(&mut self) -> &mut [bf16] {
        match &mut *self.guard {
            Storage::Cpu(CpuStorage::BF16(v)) => &mut v[self.offset..self.offset + self.len],
            _ => unreachable!("Bf16Write holds bf16 storage"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        (0..len).map(|i| rng::normal_at(seed, i as u64)).collect()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.to_vec_f32()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    /// `sum_f32` against the copy-and-`add_assign` it replaces, bit for bit: below and above
    /// the threaded size, a bf16 left side, two views of one storage, and a shape mismatch.
    #[test]
    fn sum_f32_matches_copy_then_add_assign() {
        for len in [7, PARALLEL_MIN + 5] {
            let a = Tensor::f32(values(len, 1), &[len]).unwrap();
            let b = Tensor::f32(values(len, 2), &[len]).unwrap();
            let want = a.deep_copy().unwrap();
            want.add_assign(&b).unwrap();
            let got = a.sum_f32(&b).unwrap();
            assert_eq!(bits(&got), bits(&want), "length {len}");
            assert!(!got.same_storage(&a) && !got.same_storage(&b));
            // The inputs are left as they were.
            assert_eq!(
                bits(&a),
                bits(&Tensor::f32(values(len, 1), &[len]).unwrap())
            );

            let a16 = a.cast(DType::BF16).unwrap();
            let want = a16.cast(DType::F32).unwrap();
            want.add_assign(&b).unwrap();
            let got = a16.sum_f32(&b).unwrap();
            assert_eq!(got.dtype(), DType::F32);
            assert_eq!(bits(&got), bits(&want), "bf16 + f32, length {len}");
        }
        let whole = Tensor::f32(values(8, 3), &[8]).unwrap();
        let (lo, hi) = (whole.view(0, &[4]).unwrap(), whole.view(4, &[4]).unwrap());
        let got = lo.sum_f32(&hi).unwrap().to_vec_f32().unwrap();
        let v = values(8, 3);
        assert_eq!(got, (0..4).map(|i| v[i] + v[i + 4]).collect::<Vec<_>>());
        assert!(lo.sum_f32(&whole).is_err());
    }

    /// The threaded `add_assign` adds each element once, like the serial loop, and the
    /// threaded `zero_` of a view zeroes that view only.
    #[test]
    fn threaded_add_assign_and_zero_cover_their_elements_only() {
        let len = 3 * PARALLEL_MIN + 11;
        let (a, b) = (values(len, 4), values(len, 5));
        let t = Tensor::f32(a.clone(), &[len]).unwrap();
        t.add_assign(&Tensor::f32(b.clone(), &[len]).unwrap())
            .unwrap();
        let want: Vec<f32> = a.iter().zip(&b).map(|(a, b)| a + b).collect();
        assert_eq!(t.to_vec_f32().unwrap(), want);

        let inner = t.view(3, &[len - 5]).unwrap();
        inner.zero_().unwrap();
        let got = t.to_vec_f32().unwrap();
        assert_eq!((&got[..3], &got[len - 2..]), (&want[..3], &want[len - 2..]));
        assert!(got[3..len - 2].iter().all(|&v| v == 0.0));
    }
}
