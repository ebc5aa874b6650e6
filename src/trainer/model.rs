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

    /// A student loaded from a safetensors state dict (whose weights must be floats: a tensor
    /// tagged as integers is an error naming it, not weights; a NaN or infinity is an error
    /// naming the file and the tensor).
    pub fn load(arch: &Architecture, path: &Path) -> Result<Model> {
        let state = recycle_engine::checkpoint::load(path)?.tensors;
        check_float_tensors(path, &state)?;
        reject_nonfinite(&state, path)?;
        Ok(match arch {
            Architecture::ResNet(c) => {
                Model::ResNet(ResNet::from_state_dict(c.clone(), state, path)?)
            }
            Architecture::Bert(c) => Model::Bert(Bert::from_state_dict(c.clone(), state, path)?),
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

    /// This model computing its forward in `dtype` (f32 or bf16): the activations, and the
    /// logits, which the fused loss takes in either type. ResNet casts its input images to
    /// `dtype`, BERT the sum of its embeddings (before the embeddings' LayerNorm), so its
    /// encoder and MLM head run in it. With bf16 a student's parameters keep a bf16 working
    /// copy of the f32 master weights, which the forward reads and the optimizers rewrite in
    /// the same pass as the master (fp32 master weights; checkpoints hold the master). On a
    /// GPU every op runs in `dtype`; on the CPU, whose ops compute in f32, bf16 rounds the
    /// weights and the values where they are cast (the input or the embeddings, and the
    /// logits) and each op widens them again. The gradient buffer stays f32. Without this call a model computes in the dtype its inputs bring (f32 for
    /// f32 images and for a student's f32 embedding tables), as before.
    pub fn with_activations(self, dtype: DType) -> Result<Model> {
        Ok(match self {
            Model::ResNet(mut m) => {
                m.set_activations(dtype)?;
                Model::ResNet(m)
            }
            Model::Bert(mut m) => {
                m.set_activations(dtype)?;
                Model::Bert(m)
            }
        })
    }

    /// The compute dtype set by [`Model::with_activations`]; `None` when the forward takes
    /// the dtype of its inputs (the default).
    pub fn activations(&self) -> Option<DType> {
        match self {
            Model::ResNet(m) => m.activations(),
            Model::Bert(m) => m.activations(),
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

    /// State that a training forward changes outside the parameters: ResNet's BatchNorm
    /// running statistics and counters (BERT has none).
    pub fn buffers(&self) -> &[(String, Tensor)] {
        match self {
            Model::ResNet(m) => m.buffers(),
            Model::Bert(_) => &[],
        }
    }

    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        match self {
            Model::ResNet(m) => m.state_dict(),
            Model::Bert(m) => m.state_dict(),
        }
    }

    /// Restores parameters and buffers from a state dict taken from the same architecture.
    pub fn load_state_dict(&self, state: Vec<(String, Tensor)>, source: &Path) -> Result<()> {
        reject_nonfinite(&state, source)?;
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
        // The copies went to the f32 master: bring a bf16 working copy in line with it.
        let params = match self {
            Model::ResNet(m) => m.params(),
            Model::Bert(m) => m.params(),
        };
        if let Some(p) = params {
            p.refresh_working_copy()?;
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

/// The tensors of a checkpoint that the model holds as floats must be floats in the file: a
/// tensor tagged I32 would otherwise be read as weights (integers converted to floats).
pub(crate) fn check_float_tensors(path: &Path, state: &[(String, Tensor)]) -> Result<()> {
    let wrong: Vec<String> = state
        .iter()
        .filter(|(n, t)| !t.dtype().is_float() && !n.ends_with("num_batches_tracked"))
        .map(|(n, t)| format!("`{n}` ({})", t.dtype()))
        .collect();
    if wrong.is_empty() {
        return Ok(());
    }
    Err(Error::checkpoint(
        path,
        format!(
            "weights must be floating point (F32, BF16 or F16), these are integers: {}; the \
             file is corrupt or not a checkpoint of this model",
            wrong.join(", ")
        ),
    ))
}

/// An error naming `source`, the tensor, the element and its value when a float tensor of
/// `state` holds a NaN or an infinity: weights that would poison every step are refused when
/// they are loaded, before a run trains on them (one scan per load).
pub fn reject_nonfinite(state: &[(String, Tensor)], source: &Path) -> Result<()> {
    for (name, t) in state {
        if !t.dtype().is_float() {
            continue;
        }
        let values = t.to_vec_f32()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            let bad = values.iter().filter(|v| !v.is_finite()).count();
            return Err(Error::checkpoint(
                source,
                format!(
                    "tensor `{name}` holds {} at element {i} ({bad} of its {} values are NaN or \
                     infinite): the checkpoint is poisoned; load an earlier one",
                    values[i],
                    values.len()
                ),
            ));
        }
    }
    Ok(())
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

    fn small_cases() -> Vec<(Architecture, Batch)> {
        let mut cfg = ResNetConfig::new(18, 10);
        cfg.in_channels = 1;
        cfg.small_stem = true;
        cfg.width = 0.125;
        let x = Tensor::randn(&[4, 1, 12, 12], 0.0, 1.0, 5, DType::F32, Device::Cpu).unwrap();
        let images = Batch::Image {
            x,
            labels: Tensor::from_vec(vec![1i32, 7, 3, 0], &[4], Device::Cpu).unwrap(),
        };
        let text = crate::bench::mlm_batch(2, 16, 64).unwrap();
        vec![
            (Architecture::ResNet(cfg), images),
            (Architecture::Bert(BertConfig::tiny(64)), text),
        ]
    }

    /// bf16 activations on the CPU: the logits come out in bf16, within bf16 rounding of the
    /// f32 model's (the input/embeddings and the logits are rounded, relative error 2^-9 each,
    /// amplified a little by the layers between); and training from there still lowers the
    /// loss on a fixed batch.
    #[test]
    fn bf16_activations_give_close_logits_and_still_train() {
        use recycle_engine::optim::Sgdw;
        let loss = crate::distill::KdLoss::kl(4.0, 1.0);
        for (arch, batch) in small_cases() {
            let f32_model = Model::new(&arch, 3).unwrap();
            assert_eq!(f32_model.activations(), None);
            let bf16_model = Model::new(&arch, 3)
                .unwrap()
                .with_activations(DType::BF16)
                .unwrap();
            assert_eq!(bf16_model.activations(), Some(DType::BF16));
            let tape = Tape::inference();
            let a = f32_model.logits(&tape, &batch, false, 0).unwrap();
            let b = bf16_model.logits(&tape, &batch, false, 0).unwrap();
            assert_eq!(a.tensor().dtype(), DType::F32);
            assert_eq!(b.tensor().dtype(), DType::BF16);
            let (a, b) = (
                a.tensor().to_vec_f32().unwrap(),
                b.tensor().to_vec_f32().unwrap(),
            );
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = a
                .iter()
                .zip(&b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale));
            assert!(worst > 0.0, "{}: bf16 changed nothing", arch.name());
            assert!(worst < 2e-2, "{}: {worst}", arch.name());

            let params = bf16_model.params().unwrap();
            let mut opt = Sgdw::paper(params.len(), 0.05).unwrap();
            let mut losses = Vec::new();
            for step in 0..6 {
                let out = crate::trainer::train_step(
                    &bf16_model,
                    None,
                    &loss,
                    &batch,
                    &mut opt,
                    0.05,
                    step,
                    1,
                )
                .unwrap();
                losses.push(out.loss);
            }
            assert!(
                losses[5] < losses[0],
                "{}: loss did not fall: {losses:?}",
                arch.name()
            );
            // The optimizer kept the working copy the rounding of the updated master.
            // (bf16 values compared as f32: widening is exact, so equal means equal bits.)
            let master = params.values().to_vec_f32().unwrap();
            let working = params.working().unwrap();
            assert_eq!(working.dtype(), DType::BF16);
            let rounded = params
                .values()
                .cast(DType::BF16)
                .unwrap()
                .to_vec_f32()
                .unwrap();
            assert_eq!(working.to_vec_f32().unwrap(), rounded, "{}", arch.name());
            let initial = Model::new(&arch, 3).unwrap();
            assert_ne!(
                initial.params().unwrap().values().to_vec_f32().unwrap(),
                master,
                "{}: the master did not move",
                arch.name()
            );

            // A restored checkpoint (f32 master) refreshes the working copy.
            let fresh = Model::new(&arch, 9)
                .unwrap()
                .with_activations(DType::BF16)
                .unwrap();
            fresh
                .load_state_dict(bf16_model.state_dict().unwrap(), Path::new("mem"))
                .unwrap();
            let p = fresh.params().unwrap();
            assert_eq!(p.values().to_vec_f32().unwrap(), master);
            assert_eq!(
                p.working().unwrap().to_vec_f32().unwrap(),
                rounded,
                "{}",
                arch.name()
            );
        }
        let m = Model::new(&small_cases()[0].0, 1).unwrap();
        assert!(m.with_activations(DType::I32).is_err());

        // A teacher made from a bf16 student computes in bf16 too, from its own frozen weights.
        for (arch, batch) in small_cases() {
            let student = Model::new(&arch, 2)
                .unwrap()
                .with_activations(DType::BF16)
                .unwrap();
            let teacher = student.teacher(DType::BF16).unwrap();
            assert_eq!(teacher.activations(), Some(DType::BF16));
            assert!(teacher.params().is_err());
            let out = teacher
                .logits(&Tape::inference(), &batch, false, 0)
                .unwrap();
            assert_eq!(out.tensor().dtype(), DType::BF16, "{}", arch.name());
        }
    }

    /// A bf16 model reads its weights from the working copy, not from the master: a write to
    /// the master alone changes nothing until the working copy is refreshed, and a model whose
    /// master is already the rounded one gives the same logits. Back to f32 activations, the
    /// working copy is dropped and the model computes from the master again.
    #[test]
    fn the_bf16_forward_reads_the_working_copy() {
        for (arch, batch) in small_cases() {
            let name = arch.name();
            let model = Model::new(&arch, 4)
                .unwrap()
                .with_activations(DType::BF16)
                .unwrap();
            let tape = Tape::inference();
            let logits = |m: &Model| {
                m.logits(&tape, &batch, false, 0)
                    .unwrap()
                    .tensor()
                    .to_vec_f32()
                    .unwrap()
            };
            let before = logits(&model);
            let p = model.params().unwrap();
            let master = p.values().to_vec_f32().unwrap();
            // Halve the master in place: the forward does not see it...
            p.values()
                .copy_from(
                    &Tensor::f32(master.iter().map(|v| v * 0.5).collect(), &[master.len()])
                        .unwrap(),
                )
                .unwrap();
            assert_eq!(logits(&model), before, "{name}");
            // ... until the working copy is refreshed from it.
            p.refresh_working_copy().unwrap();
            assert_ne!(logits(&model), before, "{name}");

            // A model whose master is the rounded one reads the same working copy.
            let rounded = Model::new(&arch, 4)
                .unwrap()
                .with_activations(DType::BF16)
                .unwrap();
            let rp = rounded.params().unwrap();
            rp.values()
                .copy_from(&rp.values().cast(DType::BF16).unwrap())
                .unwrap();
            rp.refresh_working_copy().unwrap();
            let fresh = Model::new(&arch, 4)
                .unwrap()
                .with_activations(DType::BF16)
                .unwrap();
            assert_eq!(logits(&rounded), logits(&fresh), "{name}");

            // f32 again: no working copy, the f32 model's logits exactly.
            let back = fresh.with_activations(DType::F32).unwrap();
            assert!(back.params().unwrap().working().is_none(), "{name}");
            let plain = Model::new(&arch, 4).unwrap();
            let out = back.logits(&tape, &batch, false, 0).unwrap();
            assert_eq!(out.tensor().dtype(), DType::F32);
            assert_eq!(out.tensor().to_vec_f32().unwrap(), logits(&plain), "{name}");
        }
    }
}
