//! A model's parameters in one flat f32 buffer, and their gradients in another (llm.c's
//! layout): each parameter is a view, so the optimizer is one pass over one buffer, a
//! checkpoint is one walk, and a future all-reduce is one bucketed call.

use std::collections::HashMap;

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
            entries,
            index,
        })
    }

    /// A copy on `device` (values and gradients; the same buffers when already there).
    pub fn to_device(&self, device: Device) -> Result<Self> {
        Ok(FlatParams {
            values: self.values.to_device(device)?,
            grads: self.grads.to_device(device)?,
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

    /// Parameter `name` on `tape`: trainable on a recording tape, constant on an inference one.
    pub fn var(&self, tape: &Tape, name: &str) -> Result<Var> {
        tape.param(self.get(name)?, self.grad(name)?)
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
        self.values.view(e.offset, &e.shape)?.copy_from(value)
    }

    /// Every parameter as a named view, in order (for checkpoints).
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.entries
            .iter()
            .map(|e| Ok((e.name.clone(), self.values.view(e.offset, &e.shape)?)))
            .collect()
    }
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
}
