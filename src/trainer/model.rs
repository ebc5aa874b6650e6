//! The two model families behind one enum, so the trainer, the teacher pool and the
//! benchmarks are written once: `Model` (a ResNet or a BERT, student or teacher) and `Batch`
//! (images with labels, or a masked-language-modelling batch).

use std::path::Path;

use recycle_engine::{DType, Device, Error, FlatParams, Result, Tape, Tensor, Var};
use recycle_models::bert::BertForwardOptions;
use recycle_models::{Bert, BertConfig, MlmBatch, ResNet, ResNetConfig, Weights};

#[derive(Debug, Clone)]
pub enum Model {
    ResNet(ResNet),
    Bert(Bert),
}

/// The architecture of a model, enough to build or load one.
#[derive(Debug, Clone, PartialEq)]
pub enum Architecture {
    ResNet(ResNetConfig),
    Bert(BertConfig),
}

#[derive(Debug, Clone)]
pub enum Batch {
    Image { x: Tensor, labels: Tensor },
    Mlm(MlmBatch),
}

impl Batch {
    /// The targets the loss compares the logits with (one per logits row).
    pub fn labels(&self) -> &Tensor {
        match self {
            Batch::Image { labels, .. } => labels,
            Batch::Mlm(b) => &b.labels,
        }
    }

    /// A copy with every tensor on `device` (the same tensors where they already are).
    pub fn to_device(&self, device: Device) -> Result<Batch> {
        Ok(match self {
            Batch::Image { x, labels } => Batch::Image {
                x: x.to_device(device)?,
                labels: labels.to_device(device)?,
            },
            Batch::Mlm(b) => Batch::Mlm(b.to_device(device)?),
        })
    }

    /// Training samples in the batch (images, or sequences).
    pub fn samples(&self) -> usize {
        match self {
            Batch::Image { x, .. } => x.shape()[0],
            Batch::Mlm(b) => b.input_ids.shape()[0],
        }
    }
}

impl Architecture {
    pub fn name(&self) -> String {
        match self {
            Architecture::ResNet(c) => c.name(),
            Architecture::Bert(c) => c.name(),
        }
    }
}

impl Model {
    /// A freshly initialised student.
    pub fn new(arch: &Architecture, seed: u64) -> Result<Model> {
        Ok(match arch {
            Architecture::ResNet(c) => Model::ResNet(ResNet::new(c.clone(), seed)?),
            Architecture::Bert(c) => Model::Bert(Bert::new(c.clone(), seed)?),
        })
    }

    /// A student loaded from a safetensors state dict.
    pub fn load(arch: &Architecture, path: &Path) -> Result<Model> {
        Ok(match arch {
            Architecture::ResNet(c) => Model::ResNet(ResNet::load(c.clone(), path)?),
            Architecture::Bert(c) => Model::Bert(Bert::load(c.clone(), path)?),
        })
    }

    /// A frozen teacher loaded from a checkpoint: weights in `dtype`, BatchNorm folded.
    pub fn load_teacher(arch: &Architecture, path: &Path, dtype: DType) -> Result<Model> {
        Self::load(arch, path)?.teacher(dtype)
    }

    pub fn teacher(&self, dtype: DType) -> Result<Model> {
        Ok(match self {
            Model::ResNet(m) => Model::ResNet(m.teacher(dtype)?),
            Model::Bert(m) => Model::Bert(m.teacher(dtype)?),
        })
    }

    /// A copy with its parameters, gradients and buffers on `device`: a GPU copy of a CPU
    /// model shares no storage with it (train both from the same weights); on the model's own
    /// device it is the same model (shared storage).
    pub fn to_device(&self, device: Device) -> Result<Model> {
        Ok(match self {
            Model::ResNet(m) => Model::ResNet(m.to_device(device)?),
            Model::Bert(m) => Model::Bert(m.to_device(device)?),
        })
    }

    /// The device the model's weights are on.
    pub fn device(&self) -> Device {
        let weights = match self {
            Model::ResNet(m) => m.weights(),
            Model::Bert(m) => m.weights(),
        };
        match weights {
            Weights::Trainable(p) => p.device(),
            Weights::Frozen { tensors, .. } => {
                tensors.first().map_or(Device::Cpu, |(_, t)| t.device())
            }
        }
    }

    /// The student's flat parameter and gradient buffers.
    pub fn params(&self) -> Result<&FlatParams> {
        let p = match self {
            Model::ResNet(m) => m.params(),
            Model::Bert(m) => m.params(),
        };
        p.ok_or_else(|| {
            Error::invalid(
                "Model::params",
                "a frozen teacher has no trainable parameters".to_string(),
            )
        })
    }

    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        match self {
            Model::ResNet(m) => m.state_dict(),
            Model::Bert(m) => m.state_dict(),
        }
    }

    /// Restores parameters and buffers from a state dict taken from the same architecture.
    pub fn load_state_dict(&self, state: Vec<(String, Tensor)>, source: &Path) -> Result<()> {
        let fresh = match self {
            Model::ResNet(m) => {
                Model::ResNet(ResNet::from_state_dict(m.config().clone(), state, source)?)
            }
            Model::Bert(m) => {
                Model::Bert(Bert::from_state_dict(m.config().clone(), state, source)?)
            }
        };
        // Copy values in place so views held elsewhere (the optimizer's buffers are sized
        // from these) stay valid.
        for ((name, dst), (_, src)) in self.state_dict()?.iter().zip(fresh.state_dict()?) {
            if dst.dtype() == DType::I32 {
                dst.copy_from_i32(&src.to_vec::<i32>()?)?;
            } else {
                dst.copy_from(&src)
                    .map_err(|e| Error::checkpoint(source, format!("restoring `{name}`: {e}")))?;
            }
        }
        Ok(())
    }

    /// Logits, one row per label of `batch`: `[N, classes]` for images, `[M, vocab]` at the
    /// masked positions for MLM. `seed` drives dropout.
    pub fn logits(&self, tape: &Tape, batch: &Batch, training: bool, seed: u64) -> Result<Var> {
        match (self, batch) {
            (Model::ResNet(m), Batch::Image { x, .. }) => m.forward(tape, x, training),
            (Model::Bert(m), Batch::Mlm(b)) => {
                m.mlm_logits(tape, b, BertForwardOptions { training, seed })
            }
            _ => Err(Error::invalid(
                "Model::logits",
                "the batch does not fit the model (images need a ResNet, text a BERT)".to_string(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Moving to the CPU is the identity: same values, and the storage is shared (a write
    /// through one is seen by the other), for the parameters, the gradients and the buffers.
    #[test]
    fn to_device_cpu_is_the_identity() {
        let mut cfg = ResNetConfig::new(18, 10);
        cfg.in_channels = 1;
        cfg.small_stem = true;
        cfg.width = 0.125;
        for arch in [
            Architecture::ResNet(cfg),
            Architecture::Bert(BertConfig::tiny(64)),
        ] {
            let m = Model::new(&arch, 3).unwrap();
            let moved = m.to_device(Device::Cpu).unwrap();
            let (a, b) = (m.state_dict().unwrap(), moved.state_dict().unwrap());
            assert_eq!(a.len(), b.len());
            for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
                assert_eq!(na, nb);
                assert_eq!(tb.device(), Device::Cpu);
                assert_eq!(ta.to_bytes().unwrap(), tb.to_bytes().unwrap(), "{na}");
            }
            let p = moved.params().unwrap();
            assert_eq!(p.device(), Device::Cpu);
            p.grads().write_f32().unwrap()[0] = 7.0;
            assert_eq!(m.params().unwrap().grads().to_vec_f32().unwrap()[0], 7.0);
        }
        let batch = Batch::Image {
            x: Tensor::zeros(&[2, 1, 4, 4], DType::F32, Device::Cpu).unwrap(),
            labels: Tensor::from_vec(vec![1i32, 2], &[2], Device::Cpu).unwrap(),
        };
        let moved = batch.to_device(Device::Cpu).unwrap();
        assert_eq!(moved.samples(), 2);
        assert_eq!(moved.labels().to_vec::<i32>().unwrap(), vec![1, 2]);
    }
}
