//! Where a model's tensors live, and how a state dict is matched against a model.
//!
//! A student keeps its parameters in one flat f32 buffer with gradients beside it
//! (`FlatParams`); a teacher keeps frozen named tensors (bf16 by default) and no gradients.
//! Both answer `var(tape, name)`, so the model's forward code is written once.

use std::collections::HashMap;
use std::path::Path;

use recycle_engine::{DType, Device, Error, FlatParams, Result, Tape, Tensor, Var};

/// Named tensors in a model's canonical order (torchvision / Hugging Face names).
pub type StateDict = Vec<(String, Tensor)>;

#[derive(Debug, Clone)]
pub enum Weights {
    /// A student's parameters: f32 values and gradients in flat buffers.
    Trainable(FlatParams),
    /// A teacher's weights: frozen, any float dtype, no gradients.
    Frozen {
        tensors: Vec<(String, Tensor)>,
        index: HashMap<String, usize>,
    },
}

impl Weights {
    pub fn frozen(tensors: Vec<(String, Tensor)>) -> Self {
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        Weights::Frozen { tensors, index }
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        match self {
            Weights::Trainable(p) => p.get(name),
            Weights::Frozen { tensors, index } => index
                .get(name)
                .map(|&i| tensors[i].1.clone())
                .ok_or_else(|| Error::invalid("Weights::get", format!("no weight named `{name}`"))),
        }
    }

    /// `name` on `tape`: trainable for a student on a recording tape, constant otherwise.
    pub fn var(&self, tape: &Tape, name: &str) -> Result<Var> {
        match self {
            Weights::Trainable(p) => p.var(tape, name),
            Weights::Frozen { .. } => Ok(tape.constant(self.get(name)?)),
        }
    }

    /// A copy on `device` (the same storage where a tensor is already there).
    pub fn to_device(&self, device: Device) -> Result<Self> {
        Ok(match self {
            Weights::Trainable(p) => Weights::Trainable(p.to_device(device)?),
            Weights::Frozen { tensors, index } => Weights::Frozen {
                tensors: tensors
                    .iter()
                    .map(|(n, t)| Ok((n.clone(), t.to_device(device)?)))
                    .collect::<Result<Vec<_>>>()?,
                index: index.clone(),
            },
        })
    }

    /// The flat parameter buffers of a student; `None` for a frozen teacher.
    pub fn params(&self) -> Option<&FlatParams> {
        match self {
            Weights::Trainable(p) => Some(p),
            Weights::Frozen { .. } => None,
        }
    }

    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        match self {
            Weights::Trainable(p) => p.named_tensors(),
            Weights::Frozen { tensors, .. } => Ok(tensors.clone()),
        }
    }

    /// Bytes the weights occupy (a teacher's resident cost).
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Weights::Trainable(p) => p.len() * 4,
            Weights::Frozen { tensors, .. } => tensors
                .iter()
                .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
                .sum(),
        }
    }
}

/// Checks a compute dtype given to a model's `set_activations`: f32 or bf16.
pub(crate) fn check_activations(op: &'static str, dtype: DType) -> Result<()> {
    if dtype.is_float() {
        return Ok(());
    }
    Err(Error::invalid(
        op,
        format!("activations compute in f32 or bf16, not {dtype}"),
    ))
}

/// `x` in the model's compute dtype `activations` (`None`: unchanged).
pub(crate) fn to_activations(tape: &Tape, x: &Var, activations: Option<DType>) -> Result<Var> {
    match activations {
        Some(dtype) => recycle_engine::ops::elementwise::cast(tape, x, dtype),
        None => Ok(x.clone()),
    }
}

/// Matches `given` tensors against the names and shapes a model expects.
///
/// Returns the tensors in the order of `expected`. Names listed in `ignored` (tied copies such
/// as BERT's `cls.predictions.decoder.weight`) may be present or absent. Any mismatch is one
/// error that names the first offending tensor with both shapes, then counts the rest, and
/// says which model and which file (`source`) were involved.
pub fn match_state_dict(
    model: &str,
    source: &Path,
    expected: &[(String, Vec<usize>)],
    given: StateDict,
    ignored: &[&str],
) -> Result<Vec<Tensor>> {
    let mut by_name: HashMap<String, Tensor> = given.into_iter().collect();
    let mut out = Vec::with_capacity(expected.len());
    let mut missing = Vec::new();
    let mut misshaped = Vec::new();
    for (name, shape) in expected {
        match by_name.remove(name) {
            None => missing.push(name.clone()),
            Some(t) if t.shape() != shape.as_slice() => {
                misshaped.push(format!(
                    "`{name}` has shape {:?} in the file but {model} expects {shape:?}",
                    t.shape()
                ));
            }
            Some(t) if !t.dtype().is_float() && t.dtype() != DType::I32 => {
                misshaped.push(format!("`{name}` has unsupported dtype {}", t.dtype()));
            }
            Some(t) => out.push(t),
        }
    }
    for name in ignored {
        by_name.remove(*name);
    }
    let mut unexpected: Vec<String> = by_name.into_keys().collect();
    unexpected.sort();
    if missing.is_empty() && misshaped.is_empty() && unexpected.is_empty() {
        return Ok(out);
    }
    let mut parts = Vec::new();
    if let Some(first) = misshaped.first() {
        parts.push(format!("tensor {first}"));
        if misshaped.len() > 1 {
            parts.push(format!(
                "{} more tensors have the wrong shape",
                misshaped.len() - 1
            ));
        }
    }
    if !missing.is_empty() {
        parts.push(format!(
            "{} tensors missing from the file, first `{}`",
            missing.len(),
            missing[0]
        ));
    }
    if !unexpected.is_empty() {
        parts.push(format!(
            "{} tensors the model does not have, first `{}`",
            unexpected.len(),
            unexpected[0]
        ));
    }
    Err(Error::checkpoint(
        source,
        format!(
            "does not match {model}: {}; check that the file was saved from the same \
             architecture and size",
            parts.join("; ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize]) -> Tensor {
        Tensor::zeros(shape, DType::F32, recycle_engine::Device::Cpu).unwrap()
    }

    #[test]
    fn mismatches_name_the_tensor_and_both_shapes() {
        let expected = vec![("a".to_string(), vec![2, 3]), ("b".to_string(), vec![4])];
        let ok = match_state_dict(
            "M",
            Path::new("f.safetensors"),
            &expected,
            vec![
                ("b".into(), t(&[4])),
                ("a".into(), t(&[2, 3])),
                ("tied".into(), t(&[1])),
            ],
            &["tied"],
        )
        .unwrap();
        assert_eq!(ok[0].shape(), &[2, 3]);
        let err = match_state_dict(
            "M",
            Path::new("f.safetensors"),
            &expected,
            vec![("a".into(), t(&[3, 2])), ("c".into(), t(&[1]))],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("f.safetensors"), "{err}");
        assert!(
            err.contains("`a` has shape [3, 2]") && err.contains("[2, 3]"),
            "{err}"
        );
        assert!(err.contains("missing") && err.contains("`b`"), "{err}");
        assert!(err.contains("`c`"), "{err}");
    }
}
