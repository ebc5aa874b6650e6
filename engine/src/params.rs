//! A model's parameters in one flat f32 buffer, and their gradients in another (llm.c's
//! layout): each parameter is a view, so the optimizer is one pass over one buffer, a
//! checkpoint is one walk, and a future all-reduce is one bucketed call.
//!
//! Mixed precision: the f32 values are the **master weights**. A model that computes in bf16
//! keeps a bf16 **working copy** beside them (`enable_working_copy`): one more flat buffer,
//! each parameter a view at the same offset, equal to the master rounded to nearest even. The
//! forward reads the working copy (`var`), so no op casts a weight; the gradients still go
//! to the f32 gradient buffer (the tape adds a bf16 gradient into it widened); the
//! optimizers update the master and rewrite the working copy in the same pass (the CUDA
//! kernels' `working` output, the same rounding on the CPU). Checkpoints hold the master;
//! `set` and `refresh_working_copy` bring the working copy back in line after a write.

use std::collections::HashMap;

use half::bf16;

use crate::{tensor::elem_count, DType, Device, Error, Result, Tape, Tensor, Var};

#[derive(Debug, Clone)]
pub struct ParamEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
}

impl ParamEntry {
    pub fn len(&self) -> usize {
        elem_count(&self.shape)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone)]
pub struct FlatParams {
    values: Tensor,
    grads: Tensor,
    /// The bf16 working copy of `values` (same length and offsets), when enabled.
    working: Option<Tensor>,
    entries: Vec<ParamEntry>,
    index: HashMap<String, usize>,
}

impl FlatParams {
    /// Zero-initialised parameters with the given names and shapes, in order.
    pub fn new(specs: &[(String, Vec<usize>)], device: Device) -> Result<Self> {
        let mut entries = Vec::with_capacity(specs.len());
        let mut index = HashMap::new();
        let mut offset = 0;
        for (name, shape) in specs {
            if index.insert(name.clone(), entries.len()).is_some() {
                return Err(Error::invalid(
                    "FlatParams::new",
                    format!("parameter name `{name}` appears twice"),
                ));
            }
            entries.push(ParamEntry {
                name: name.clone(),
                shape: shape.clone(),
                offset,
            });
            offset += elem_count(shape);
        }
        Ok(FlatParams {
            values: Tensor::zeros(&[offset], DType::F32, device)?,
            grads: Tensor::zeros(&[offset], DType::F32, device)?,
            working: None,
            entries,
            index,
        })
    }

    /// A copy on `device` (values, gradients and the working copy; the same buffers when
    /// already there).
    pub fn to_device(&self, device: Device) -> Result<Self> {
        Ok(FlatParams {
            values: self.values.to_device(device)?,
            grads: self.grads.to_device(device)?,
            working: self
                .working
                .as_ref()
                .map(|w| w.to_device(device))
                .transpose()?,
            entries: self.entries.clone(),
            index: self.index.clone(),
        })
    }

    /// The device of the buffers.
    pub fn device(&self) -> Device {
        self.values.device()
    }

    /// Total number of scalars.
    pub fn len(&self) -> usize {
        self.values.elem_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn entries(&self) -> &[ParamEntry] {
        &self.entries
    }

    /// The whole value buffer (flat, f32).
    pub fn values(&self) -> &Tensor {
        &self.values
    }

    /// The whole gradient buffer (flat, f32).
    pub fn grads(&self) -> &Tensor {
        &self.grads
    }

    /// Adds a bf16 working copy of the values (the master weights rounded to nearest even),
    /// which `var` hands to the forward from then on; when one exists it is refreshed. Costs
    /// two bytes per parameter on the values' device.
    pub fn enable_working_copy(&mut self) -> Result<()> {
        match &self.working {
            Some(_) => self.refresh_working_copy(),
            None => {
                self.working = Some(self.values.cast(DType::BF16)?);
                Ok(())
            }
        }
    }

    /// Drops the working copy: `var` hands out the f32 master weights again.
    pub fn disable_working_copy(&mut self) {
        self.working = None;
    }

    /// The whole bf16 working copy (flat), when enabled.
    pub fn working(&self) -> Option<&Tensor> {
        self.working.as_ref()
    }

    /// Rewrites the working copy from the master weights (after writing `values()` directly,
    /// as a checkpoint restore does); nothing to do without one.
    pub fn refresh_working_copy(&self) -> Result<()> {
        match &self.working {
            Some(w) => w.copy_from(&self.values),
            None => Ok(()),
        }
    }

    fn entry(&self, name: &str) -> Result<&ParamEntry> {
        self.index
            .get(name)
            .map(|&i| &self.entries[i])
            .ok_or_else(|| Error::invalid("FlatParams", format!("no parameter named `{name}`")))
    }

    /// The value of parameter `name` (a view into the flat buffer).
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        self.values.view(e.offset, &e.shape)
    }

    /// The gradient of parameter `name` (a view into the flat gradient buffer).
    pub fn grad(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        self.grads.view(e.offset, &e.shape)
    }

    /// The value the forward reads for parameter `name`: the view of the bf16 working copy
    /// when there is one, else of the f32 master.
    pub fn forward_value(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        self.working
            .as_ref()
            .unwrap_or(&self.values)
            .view(e.offset, &e.shape)
    }

    /// Parameter `name` on `tape`: trainable on a recording tape, constant on an inference one.
    /// Its value is `forward_value` (the working copy when there is one); its gradient, in
    /// whatever type the ops produce, is added into the f32 gradient buffer.
    pub fn var(&self, tape: &Tape, name: &str) -> Result<Var> {
        tape.param(self.forward_value(name)?, self.grad(name)?)
    }

    pub fn zero_grad(&self) -> Result<()> {
        self.grads.zero_()
    }

    /// Copies `value` into parameter `name`, checking the shape.
    pub fn set(&self, name: &str, value: &Tensor) -> Result<()> {
        let e = self.entry(name)?;
        if value.shape() != e.shape.as_slice() {
            return Err(Error::shape(
                "FlatParams::set",
                format!(
                    "parameter `{name}` has shape {:?}, the value has {:?}",
                    e.shape,
                    value.shape()
                ),
            ));
        }
        let master = self.values.view(e.offset, &e.shape)?;
        master.copy_from(value)?;
        match &self.working {
            // From the master, so the working copy is the rounding of what was stored.
            Some(w) => w.view(e.offset, &e.shape)?.copy_from(&master),
            None => Ok(()),
        }
    }

    /// Every parameter as a named view of the f32 master, in order (for checkpoints).
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.entries
            .iter()
            .map(|e| Ok((e.name.clone(), self.values.view(e.offset, &e.shape)?)))
            .collect()
    }
}

/// `working[i] = bf16(master[i])`, rounded to nearest even: the rule of the CUDA optimizer
/// kernels' `from_f32<bf16>` (and of `Tensor::cast`), so a CPU step leaves the working copy a
/// GPU step would.
pub(crate) fn round_to_working_cpu(master: &[f32], working: &mut [bf16]) {
    debug_assert_eq!(master.len(), working.len());
    working
        .iter_mut()
        .zip(master)
        .for_each(|(w, &m)| *w = bf16::from_f32(m));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_share_the_flat_buffers() {
        let specs = vec![("a".to_string(), vec![2, 3]), ("b".to_string(), vec![4])];
        let p = FlatParams::new(&specs, Device::Cpu).unwrap();
        assert_eq!(p.len(), 10);
        p.set("b", &Tensor::f32(vec![1.0, 2.0, 3.0, 4.0], &[4]).unwrap())
            .unwrap();
        assert_eq!(
            &p.values().to_vec_f32().unwrap()[6..],
            &[1.0, 2.0, 3.0, 4.0]
        );
        let tape = Tape::recording();
        let b = p.var(&tape, "b").unwrap();
        assert!(b.requires_grad());
        assert!(p.get("c").is_err());
        let err = p
            .set("a", &Tensor::f32(vec![0.0; 4], &[4]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("[2, 3]") && err.contains("[4]"), "{err}");
        assert!(FlatParams::new(&[specs[0].clone(), specs[0].clone()], Device::Cpu).is_err());
    }

    #[test]
    fn the_working_copy_is_the_rounded_master_and_feeds_the_forward() {
        let specs = vec![("a".to_string(), vec![2]), ("b".to_string(), vec![3])];
        let mut p = FlatParams::new(&specs, Device::Cpu).unwrap();
        let a = [1.0 + 2f32.powi(-8), -0.3];
        p.set("a", &Tensor::f32(a.to_vec(), &[2]).unwrap()).unwrap();
        assert!(p.working().is_none());
        assert_eq!(p.forward_value("a").unwrap().dtype(), DType::F32);

        p.enable_working_copy().unwrap();
        let w = p.working().unwrap();
        assert_eq!((w.dtype(), w.elem_count()), (DType::BF16, 5));
        let fa = p.forward_value("a").unwrap();
        assert_eq!(fa.dtype(), DType::BF16);
        assert_eq!(
            fa.to_vec::<bf16>().unwrap(),
            vec![bf16::from_f32(a[0]), bf16::from_f32(a[1])]
        );
        assert_eq!(fa.to_vec_f32().unwrap()[0], 1.0, "rounded to nearest even");
        // The master keeps the f32 values; checkpoints see the master.
        assert_eq!(p.get("a").unwrap().to_vec_f32().unwrap(), a.to_vec());
        assert_eq!(
            p.named_tensors().unwrap()[0].1.dtype(),
            DType::F32,
            "checkpoints hold the master"
        );

        // `set` rewrites both; a direct write to the master needs a refresh.
        p.set("b", &Tensor::f32(vec![0.1, 0.2, 0.3], &[3]).unwrap())
            .unwrap();
        let wb = p.forward_value("b").unwrap().to_vec::<bf16>().unwrap();
        assert_eq!(wb, [0.1f32, 0.2, 0.3].map(bf16::from_f32).to_vec());
        p.values().write_f32().unwrap()[4] = 5.0;
        assert_ne!(p.working().unwrap().to_vec_f32().unwrap()[4], 5.0);
        p.refresh_working_copy().unwrap();
        assert_eq!(p.working().unwrap().to_vec_f32().unwrap()[4], 5.0);

        // The forward reads the working copy; its gradient lands in the f32 buffer.
        let tape = Tape::recording();
        let v = p.var(&tape, "b").unwrap();
        assert_eq!(v.tensor().dtype(), DType::BF16);
        let y = crate::ops::elementwise::scale(&tape, &v, 2.0).unwrap();
        tape.backward_with(&y, Tensor::f32(vec![1.0, 2.0, 3.0], &[3]).unwrap())
            .unwrap();
        assert_eq!(p.grads().to_vec_f32().unwrap(), vec![0., 0., 2., 4., 6.]);

        // A CPU copy shares the working copy; disabling returns to the master.
        let moved = p.to_device(Device::Cpu).unwrap();
        assert!(moved.working().unwrap().same_storage(p.working().unwrap()));
        p.disable_working_copy();
        assert_eq!(p.forward_value("a").unwrap().dtype(), DType::F32);
    }
}
