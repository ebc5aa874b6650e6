//! What the host knows about the values of one device storage without reading the device.
//!
//! **Why.** Ops that take i32 tensors (embedding ids, `gather_rows` indices, cross-entropy and
//! fused-loss labels and masks, attention padding masks) validate or use the values on the
//! host. When such a tensor lives on a GPU, reading it is a download, and a download waits for
//! everything queued on the stream: a BERT forward would stall the host in every embedding,
//! in every layer's attention and in the masked-position gather, and a teacher queued on its
//! own stream would stop overlapping the student. Those tensors are almost always uploaded
//! from the CPU (a batch, position ids made on the host), so the values are already known:
//! the storage keeps them ([`HostCopy`]) and reads return them with no copy and no wait.
//!
//! **What is kept.**
//! - `values`: the i32 values of the whole storage, set when i32 host data is uploaded
//!   (`Tensor::to_device`, `Tensor::from_vec` on a GPU, `Tensor::zeros`, a `deep_copy` of a
//!   storage that has them), up to [`HOST_COPY_MAX`] elements. A view (offset, length) reads
//!   its own slice. Outputs that kernels compute (arg-max indices, say) have none and are
//!   downloaded as before.
//! - `derived`: device tensors computed from this storage's values and reused while those
//!   values stand: the attention's additive padding mask, built once per mask instead of once
//!   per layer (on the student stream only: see `cuda::attention::padding_bias`). Keyed by
//!   what they were made from (the view and the dtype) and the stream that made them
//!   (`DerivedKey`).
//!
//! **Invalidation.** Every write into an existing device storage goes through
//! `Tensor::cuda_view_mut` (or, for `copy_from_i32` and `zero_`, which know what they write,
//! through [`HostCopy::write_i32`] / [`HostCopy::zero`]), which takes the storage's write lock
//! and updates or drops what is kept here. The writers, all of them:
//! - `Tensor::copy_from_i32` (the i32 values are known: the host copy is updated in place),
//!   `Tensor::zero_` (zeros: updated), `Tensor::copy_from` and `Tensor::add_assign` (float
//!   destinations only; dropped anyway, so a float mask's derived mask goes too);
//! - the optimizers' fused steps (parameters, state, the bf16 working copy), BatchNorm's
//!   running statistics, the NCCL all-reduce (in place): float buffers, dropped the same way;
//! - every other kernel writes into a buffer it has just allocated (`cuda::common::empty`), which
//!   starts with nothing kept; cuBLASLt and cuDNN are called with beta = 0 into fresh outputs;
//! - the host-side write guards (`write_f32`, `write_bf16`) refuse device tensors, and the read
//!   guards (`read_i32` included) too, so no host code touches device storage behind this.
//!
//! The logic is plain host code so that it is tested without a GPU (below); the device
//! storage (`storage::CudaStorage`) holds one `HostCopy`.

use crate::{DType, Tensor};

/// Largest storage (in elements) whose i32 values are kept on the host: 16 MiB, far above a
/// batch of ids (BERT-base at 128 × 512 is 65 536) and below anything where doubling the
/// memory would matter (a shard of tokens uploaded whole is not copied).
pub(crate) const HOST_COPY_MAX: usize = 1 << 22;

/// What a derived tensor was made from: which computation (`kind`), from which view of the
/// storage (`offset`, `len`), in which dtype, and on which stream (a raw stream handle: a
/// tensor made on one stream must not be read on another before an event orders them, so
/// each stream gets its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DerivedKey {
    pub kind: &'static str,
    pub offset: usize,
    pub len: usize,
    pub dtype: DType,
    pub stream: usize,
}

/// At most this many derived tensors per storage (a mask seen in two dtypes on two streams is
/// four); the oldest goes first.
const DERIVED_MAX: usize = 4;

/// See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct HostCopy {
    values: Option<Vec<i32>>,
    derived: Vec<(DerivedKey, Tensor)>,
}

impl HostCopy {
    /// Nothing known (a storage a kernel fills).
    pub(crate) fn none() -> HostCopy {
        HostCopy::default()
    }

    /// The values of a whole storage, uploaded from the host; nothing kept beyond
    /// [`HOST_COPY_MAX`] elements.
    pub(crate) fn of(values: Vec<i32>) -> HostCopy {
        HostCopy {
            values: (values.len() <= HOST_COPY_MAX).then_some(values),
            derived: Vec::new(),
        }
    }

    /// A copy of a storage of `len` zeros (no allocation beyond the limit).
    pub(crate) fn zeros(len: usize) -> HostCopy {
        if len > HOST_COPY_MAX {
            return HostCopy::none();
        }
        HostCopy::of(vec![0; len])
    }

    /// The values of elements `[offset, offset + len)` of the storage, when known.
    pub(crate) fn i32_range(&self, offset: usize, len: usize) -> Option<&[i32]> {
        self.values
            .as_deref()?
            .get(offset..offset.checked_add(len)?)
    }

    /// Elements from `offset` were overwritten with `values` (on the device too): the host
    /// copy, if any, follows; derived tensors are dropped (their source changed).
    pub(crate) fn write_i32(&mut self, offset: usize, values: &[i32]) {
        self.derived.clear();
        let Some(v) = self.values.as_mut() else {
            return;
        };
        match v.get_mut(offset..offset.saturating_add(values.len())) {
            Some(dst) => dst.copy_from_slice(values),
            // A write outside what is known cannot be followed: forget everything.
            None => self.values = None,
        }
    }

    /// Elements `[offset, offset + len)` were set to zero.
    pub(crate) fn zero(&mut self, offset: usize, len: usize) {
        self.derived.clear();
        let Some(v) = self.values.as_mut() else {
            return;
        };
        match v.get_mut(offset..offset.saturating_add(len)) {
            Some(dst) => dst.fill(0),
            None => self.values = None,
        }
    }

    /// Something unknown was written (a kernel, a device copy): nothing kept stands.
    pub(crate) fn invalidate(&mut self) {
        self.values = None;
        self.derived.clear();
    }

    /// The derived tensor made under `key`, if it is still valid.
    pub(crate) fn derived(&self, key: &DerivedKey) -> Option<Tensor> {
        self.derived
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, t)| t.clone())
    }

    /// Keeps `t` as the tensor derived under `key` (replacing an older one under that key).
    pub(crate) fn insert_derived(&mut self, key: DerivedKey, t: Tensor) {
        self.derived.retain(|(k, _)| *k != key);
        if self.derived.len() >= DERIVED_MAX {
            self.derived.remove(0);
        }
        self.derived.push((key, t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    fn key(offset: usize, len: usize, dtype: DType) -> DerivedKey {
        DerivedKey {
            kind: "test",
            offset,
            len,
            dtype,
            stream: 1,
        }
    }

    fn t(v: f32) -> Tensor {
        Tensor::f32(vec![v], &[1]).unwrap()
    }

    #[test]
    fn views_read_their_slice() {
        let h = HostCopy::of((0..10).collect());
        assert_eq!(
            h.i32_range(0, 10).unwrap(),
            &(0..10).collect::<Vec<_>>()[..]
        );
        assert_eq!(h.i32_range(3, 4).unwrap(), &[3, 4, 5, 6]);
        assert_eq!(h.i32_range(10, 0).unwrap(), &[] as &[i32]);
        assert!(h.i32_range(8, 3).is_none(), "past the end");
        assert!(h.i32_range(usize::MAX, 2).is_none(), "overflowing range");
        assert!(HostCopy::none().i32_range(0, 0).is_none());
        assert!(HostCopy::zeros(3).i32_range(0, 3).is_some());
        assert_eq!(HostCopy::zeros(3).i32_range(1, 2).unwrap(), &[0, 0]);
    }

    #[test]
    fn large_storages_keep_nothing() {
        assert!(HostCopy::zeros(HOST_COPY_MAX + 1).i32_range(0, 1).is_none());
        assert!(HostCopy::of(vec![1; HOST_COPY_MAX + 1])
            .i32_range(0, 1)
            .is_none());
        assert!(HostCopy::zeros(HOST_COPY_MAX)
            .i32_range(HOST_COPY_MAX - 1, 1)
            .is_some());
    }

    #[test]
    fn known_writes_update_the_copy() {
        let mut h = HostCopy::of(vec![1, 2, 3, 4, 5]);
        h.write_i32(1, &[20, 30]);
        assert_eq!(h.i32_range(0, 5).unwrap(), &[1, 20, 30, 4, 5]);
        h.zero(3, 2);
        assert_eq!(h.i32_range(0, 5).unwrap(), &[1, 20, 30, 0, 0]);
        // A write the copy cannot cover makes it unknown, not wrong.
        h.write_i32(4, &[7, 8]);
        assert!(h.i32_range(0, 1).is_none());
        let mut h = HostCopy::of(vec![1, 2]);
        h.zero(1, 5);
        assert!(h.i32_range(0, 1).is_none());
        // Writes into a storage with no copy leave it without one.
        let mut h = HostCopy::none();
        h.write_i32(0, &[1]);
        h.zero(0, 1);
        assert!(h.i32_range(0, 1).is_none());
    }

    #[test]
    fn unknown_writes_drop_everything() {
        let mut h = HostCopy::of(vec![1, 0, 1]);
        h.insert_derived(key(0, 3, DType::F32), t(1.0));
        h.invalidate();
        assert!(h.i32_range(0, 3).is_none());
        assert!(h.derived(&key(0, 3, DType::F32)).is_none());
    }

    #[test]
    fn derived_tensors_are_keyed_and_dropped_on_writes() {
        let mut h = HostCopy::of(vec![1, 1, 0, 1]);
        let (a, b) = (key(0, 4, DType::F32), key(0, 4, DType::BF16));
        h.insert_derived(a, t(1.0));
        h.insert_derived(b, t(2.0));
        assert_eq!(h.derived(&a).unwrap().to_vec_f32().unwrap(), vec![1.0]);
        assert_eq!(h.derived(&b).unwrap().to_vec_f32().unwrap(), vec![2.0]);
        // Another view, another stream: not the same derived tensor.
        assert!(h.derived(&key(2, 2, DType::F32)).is_none());
        assert!(h.derived(&DerivedKey { stream: 2, ..a }).is_none());
        // Replacing under one key keeps one entry.
        h.insert_derived(a, t(3.0));
        assert_eq!(h.derived(&a).unwrap().to_vec_f32().unwrap(), vec![3.0]);
        // A known write keeps the values but drops what was derived from the old ones.
        h.write_i32(2, &[1]);
        assert!(h.derived(&a).is_none() && h.derived(&b).is_none());
        assert_eq!(h.i32_range(0, 4).unwrap(), &[1, 1, 1, 1]);
        h.insert_derived(a, t(4.0));
        h.zero(0, 1);
        assert!(h.derived(&a).is_none());
    }

    #[test]
    fn derived_tensors_are_bounded() {
        let mut h = HostCopy::none();
        for i in 0..DERIVED_MAX + 2 {
            h.insert_derived(key(i, 1, DType::F32), t(i as f32));
        }
        assert!(h.derived(&key(0, 1, DType::F32)).is_none());
        assert!(h.derived(&key(1, 1, DType::F32)).is_none());
        for i in 2..DERIVED_MAX + 2 {
            let got = h.derived(&key(i, 1, DType::F32)).unwrap();
            assert_eq!(got.to_vec_f32().unwrap(), vec![i as f32]);
        }
        // Derived tensors keep their device (here the CPU).
        assert_eq!(
            h.derived(&key(2, 1, DType::F32)).unwrap().device(),
            Device::Cpu
        );
    }
}
