//! The two model families behind one enum, so the trainer, the teacher pool and the
//! benchmarks are written once: `Model` (a ResNet or a BERT, student or teacher) and `Batch`
//! (images with labels, or a masked-language-modelling batch).

use std::path::Path;

use recycle_engine::{DType, Error, FlatParams, Result, Tape, Tensor, Var};
use recycle_models::bert::BertForwardOptions;
use recycle_models::{Bert, BertConfig, MlmBatch, ResNet, ResNetConfig};

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
