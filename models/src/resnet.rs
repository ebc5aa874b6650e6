//! ResNet v1.5 with torchvision's layout and parameter names.
//!
//! Depths 18 and 34 use basic blocks, 50 uses bottlenecks with the stride on the 3x3
//! convolution (v1.5). Two stems: ImageNet's (7x7 stride-2 convolution, then 3x3 stride-2
//! max-pool) and a small-input one for 28x28 / 32x32 images (3x3 stride-1 convolution, no
//! max-pool). A width multiplier scales every channel count for CPU-sized models.
//!
//! The same forward serves the student (BatchNorm with batch statistics while training,
//! running statistics in evaluation) and the teacher, whose BatchNorms are folded into the
//! preceding convolutions (`teacher`): one convolution with a bias instead of two ops.

use std::collections::HashMap;
use std::path::Path;

use recycle_engine::ops::{activation, conv, elementwise, matmul, norm, pool};
use recycle_engine::{DType, Device, Error, FlatParams, Result, Tape, Tensor, Var};

use crate::weights::{check_activations, match_state_dict, to_activations, StateDict, Weights};

const BN_EPS: f32 = 1e-5;
const BN_MOMENTUM: f32 = 0.1;

#[derive(Debug, Clone, PartialEq)]
pub struct ResNetConfig {
    /// 18, 34 or 50.
    pub depth: usize,
    pub num_classes: usize,
    pub in_channels: usize,
    /// 3x3 stride-1 stem without max-pool, for 28x28 / 32x32 inputs.
    pub small_stem: bool,
    /// Multiplies every channel count (64, 128, 256, 512); 1.0 is torchvision's model.
    pub width: f32,
}

impl ResNetConfig {
    pub fn new(depth: usize, num_classes: usize) -> Self {
        ResNetConfig {
            depth,
            num_classes,
            in_channels: 3,
            small_stem: false,
            width: 1.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let op = "ResNetConfig";
        if ![18, 34, 50].contains(&self.depth) {
            return Err(Error::invalid(
                op,
                format!("depth {} is not supported: use 18, 34 or 50", self.depth),
            ));
        }
        if self.num_classes == 0 || self.in_channels == 0 {
            return Err(Error::invalid(
                op,
                "num_classes and in_channels must be at least 1".to_string(),
            ));
        }
        if !(self.width > 0.0 && self.width.is_finite()) {
            return Err(Error::invalid(
                op,
                format!("width multiplier {} must be a positive number", self.width),
            ));
        }
        Ok(())
    }

    /// A short human-readable name, used in error messages.
    pub fn name(&self) -> String {
        format!(
            "ResNet-{} ({} stem, width {}, {} input channels, {} classes)",
            self.depth,
            if self.small_stem { "small" } else { "ImageNet" },
            self.width,
            self.in_channels,
            self.num_classes
        )
    }

    fn bottleneck(&self) -> bool {
        self.depth == 50
    }

    fn expansion(&self) -> usize {
        if self.bottleneck() {
            4
        } else {
            1
        }
    }

    fn blocks_per_stage(&self) -> [usize; 4] {
        match self.depth {
            18 => [2, 2, 2, 2],
            _ => [3, 4, 6, 3],
        }
    }

    /// Channel counts of the four stages (as torchvision's `planes`).
    fn stage_widths(&self) -> [usize; 4] {
        [64, 128, 256, 512].map(|c| ((c as f32 * self.width).round() as usize).max(1))
    }

    fn blocks(&self) -> Vec<Block> {
        let widths = self.stage_widths();
        let mut inplanes = widths[0];
        let mut blocks = Vec::new();
        for (stage, (&planes, &n)) in widths.iter().zip(&self.blocks_per_stage()).enumerate() {
            for i in 0..n {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let out = planes * self.expansion();
                blocks.push(Block {
                    prefix: format!("layer{}.{i}", stage + 1),
                    inplanes,
                    planes,
                    stride,
                    downsample: i == 0 && (stride != 1 || inplanes != out),
                });
                inplanes = out;
            }
        }
        blocks
    }

    /// The modules in torchvision's `state_dict` order.
    fn modules(&self) -> Vec<Module> {
        let w0 = self.stage_widths()[0];
        let k = if self.small_stem { 3 } else { 7 };
        let mut m = vec![
            Module::Conv("conv1".into(), [w0, self.in_channels, k, k]),
            Module::Bn("bn1".into(), w0),
        ];
        for b in self.blocks() {
            let p = &b.prefix;
            if self.bottleneck() {
                m.push(Module::Conv(
                    format!("{p}.conv1"),
                    [b.planes, b.inplanes, 1, 1],
                ));
                m.push(Module::Bn(format!("{p}.bn1"), b.planes));
                m.push(Module::Conv(
                    format!("{p}.conv2"),
                    [b.planes, b.planes, 3, 3],
                ));
                m.push(Module::Bn(format!("{p}.bn2"), b.planes));
                m.push(Module::Conv(
                    format!("{p}.conv3"),
                    [b.planes * 4, b.planes, 1, 1],
                ));
                m.push(Module::Bn(format!("{p}.bn3"), b.planes * 4));
            } else {
                m.push(Module::Conv(
                    format!("{p}.conv1"),
                    [b.planes, b.inplanes, 3, 3],
                ));
                m.push(Module::Bn(format!("{p}.bn1"), b.planes));
                m.push(Module::Conv(
                    format!("{p}.conv2"),
                    [b.planes, b.planes, 3, 3],
                ));
                m.push(Module::Bn(format!("{p}.bn2"), b.planes));
            }
            if b.downsample {
                let out = b.planes * self.expansion();
                m.push(Module::Conv(
                    format!("{p}.downsample.0"),
                    [out, b.inplanes, 1, 1],
                ));
                m.push(Module::Bn(format!("{p}.downsample.1"), out));
            }
        }
        let features = self.stage_widths()[3] * self.expansion();
        m.push(Module::Linear("fc".into(), self.num_classes, features));
        m
    }

    /// Trainable parameters, in torchvision order.
    pub fn param_specs(&self) -> Vec<(String, Vec<usize>)> {
        let mut specs = Vec::new();
        for m in self.modules() {
            match m {
                Module::Conv(n, s) => specs.push((format!("{n}.weight"), s.to_vec())),
                Module::Bn(n, c) => {
                    specs.push((format!("{n}.weight"), vec![c]));
                    specs.push((format!("{n}.bias"), vec![c]));
                }
                Module::Linear(n, o, i) => {
                    specs.push((format!("{n}.weight"), vec![o, i]));
                    specs.push((format!("{n}.bias"), vec![o]));
                }
            }
        }
        specs
    }

    /// BatchNorm buffers (`running_mean`, `running_var` and the scalar `num_batches_tracked`).
    pub fn buffer_specs(&self) -> Vec<(String, Vec<usize>)> {
        let mut specs = Vec::new();
        for m in self.modules() {
            if let Module::Bn(n, c) = m {
                specs.push((format!("{n}.running_mean"), vec![c]));
                specs.push((format!("{n}.running_var"), vec![c]));
                specs.push((format!("{n}.num_batches_tracked"), vec![]));
            }
        }
        specs
    }

    /// Number of trainable scalars.
    pub fn num_params(&self) -> usize {
        self.param_specs()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

#[derive(Debug, Clone)]
struct Block {
    prefix: String,
    inplanes: usize,
    planes: usize,
    stride: usize,
    downsample: bool,
}

enum Module {
    Conv(String, [usize; 4]),
    Bn(String, usize),
    Linear(String, usize, usize),
}

#[derive(Debug, Clone)]
pub struct ResNet {
    config: ResNetConfig,
    weights: Weights,
    /// BatchNorm running statistics; empty once folded into a teacher.
    buffers: Vec<(String, Tensor)>,
    buffer_index: HashMap<String, usize>,
    /// Teacher form: BatchNorm folded into convolution biases.
    folded: bool,
    /// The compute dtype of the forward (`set_activations`); `None`: the input's.
    activations: Option<DType>,
}

impl ResNet {
    /// A freshly initialised student, as torchvision initialises it: Kaiming-normal
    /// convolutions (fan-out, ReLU gain), BatchNorm weight 1 and bias 0, PyTorch's default
    /// uniform initialisation for `fc`. Reproducible from `seed`.
    pub fn new(config: ResNetConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let params = FlatParams::new(&config.param_specs(), Device::Cpu)?;
        for (i, (name, shape)) in config.param_specs().iter().enumerate() {
            let s = seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
            let value = if name.starts_with("fc.") {
                let bound = 1.0 / (config.stage_widths()[3] * config.expansion()) as f32;
                Tensor::rand_uniform(
                    shape,
                    -bound.sqrt(),
                    bound.sqrt(),
                    s,
                    DType::F32,
                    Device::Cpu,
                )?
            } else if shape.len() == 4 {
                let fan_out = shape[0] * shape[2] * shape[3];
                let std = (2.0 / fan_out as f32).sqrt();
                Tensor::randn(shape, 0.0, std, s, DType::F32, Device::Cpu)?
            } else if name.ends_with(".weight") {
                Tensor::ones(shape, DType::F32, Device::Cpu)?
            } else {
                Tensor::zeros(shape, DType::F32, Device::Cpu)?
            };
            params.set(name, &value)?;
        }
        let buffers = config
            .buffer_specs()
            .into_iter()
            .map(|(name, shape)| {
                let t = if name.ends_with("num_batches_tracked") {
                    Tensor::zeros(&shape, DType::I32, Device::Cpu)?
                } else if name.ends_with("running_var") {
                    Tensor::ones(&shape, DType::F32, Device::Cpu)?
                } else {
                    Tensor::zeros(&shape, DType::F32, Device::Cpu)?
                };
                Ok((name, t))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::assemble(
            config,
            Weights::Trainable(params),
            buffers,
            false,
        ))
    }

    fn assemble(
        config: ResNetConfig,
        weights: Weights,
        buffers: Vec<(String, Tensor)>,
        folded: bool,
    ) -> Self {
        let buffer_index = buffers
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        ResNet {
            config,
            weights,
            buffers,
            buffer_index,
            folded,
            activations: None,
        }
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// The student's flat parameter and gradient buffers (`None` for a teacher).
    pub fn params(&self) -> Option<&FlatParams> {
        self.weights.params()
    }

    pub fn is_teacher(&self) -> bool {
        self.folded
    }

    /// A copy with its weights and BatchNorm buffers on `device` (a GPU copy shares nothing
    /// with this model; on the model's own device the storage is shared).
    pub fn to_device(&self, device: Device) -> Result<ResNet> {
        Ok(ResNet {
            config: self.config.clone(),
            weights: self.weights.to_device(device)?,
            buffers: self
                .buffers
                .iter()
                .map(|(n, t)| Ok((n.clone(), t.to_device(device)?)))
                .collect::<Result<Vec<_>>>()?,
            buffer_index: self.buffer_index.clone(),
            folded: self.folded,
            activations: self.activations,
        })
    }

    /// Sets the compute dtype of the forward: the input images are cast to `dtype` first (a
    /// differentiable `cast`, recorded only when something needs its gradient) and the logits
    /// come out in it. On a GPU every op then runs in `dtype` (an op's output keeps its input's
    /// type). For bf16 a student's parameters get a bf16 working copy of the f32 master
    /// weights, which the forward reads (`FlatParams::enable_working_copy`; the optimizers keep
    /// it current), so no op casts a weight; f32 drops it. On the CPU the ops widen bf16 to
    /// f32, so bf16 there means weights, input and logits rounded to bf16 (and, where the CPU
    /// has bf16 products, the inputs of convolutions and `fc`), f32 arithmetic in between. A
    /// teacher made from this model (`teacher`) keeps the compute dtype; its frozen weights
    /// are used in their own dtype. Until this is called the activations take the input's
    /// dtype (f32 images: f32; bf16 images: bf16), as before this setting existed.
    pub fn set_activations(&mut self, dtype: DType) -> Result<()> {
        check_activations("ResNet::set_activations", dtype)?;
        self.weights.match_activations(dtype)?;
        self.activations = Some(dtype);
        Ok(())
    }

    /// The compute dtype set by `set_activations`; `None` when the input's dtype is used.
    pub fn activations(&self) -> Option<DType> {
        self.activations
    }

    /// BatchNorm's running statistics and counters, in [`ResNetConfig::buffer_specs`] order
    /// (empty for a teacher, whose BatchNorm is folded).
    pub fn buffers(&self) -> &[(String, Tensor)] {
        &self.buffers
    }

    fn buffer(&self, name: &str) -> Result<&Tensor> {
        self.buffer_index
            .get(name)
            .map(|&i| &self.buffers[i].1)
            .ok_or_else(|| Error::invalid("ResNet", format!("no buffer named `{name}`")))
    }

    /// Logits `[N, num_classes]` for images `x` `[N, C, H, W]`. `training` selects batch
    /// statistics (and updates the running ones); a teacher only runs in evaluation mode.
    pub fn forward(&self, tape: &Tape, x: &Tensor, training: bool) -> Result<Var> {
        if x.rank() != 4 || x.shape()[1] != self.config.in_channels {
            return Err(Error::shape(
                "ResNet::forward",
                format!(
                    "input has shape {:?}; {} expects [N, {}, H, W]",
                    x.shape(),
                    self.config.name(),
                    self.config.in_channels
                ),
            ));
        }
        if training && self.folded {
            return Err(Error::invalid(
                "ResNet::forward",
                "a teacher (BatchNorm folded) runs in evaluation mode only".to_string(),
            ));
        }
        let x = tape.constant(x.clone());
        let x = to_activations(tape, &x, self.activations)?;
        let (stride, pad) = if self.config.small_stem {
            (1, 1)
        } else {
            (2, 3)
        };
        let mut h = self.conv_bn(tape, &x, "conv1", "bn1", stride, pad, training)?;
        h = activation::relu(tape, &h)?;
        if !self.config.small_stem {
            h = pool::max_pool2d(tape, &h, 3, 2, 1)?;
        }
        for b in self.config.blocks() {
            h = self.block(tape, &h, &b, training)?;
        }
        let pooled = pool::global_avg_pool2d(tape, &h)?;
        let w = self.weights.var(tape, "fc.weight")?;
        let bias = self.weights.var(tape, "fc.bias")?;
        let logits = matmul::linear(tape, &pooled, &w, Some(&bias))?;
        // On a GPU already in the compute dtype (an identity); on the CPU, where ops widen,
        // this rounds the logits so both devices hand the loss the same type.
        to_activations(tape, &logits, self.activations)
    }

    fn block(&self, tape: &Tape, x: &Var, b: &Block, training: bool) -> Result<Var> {
        let p = &b.prefix;
        let c = |i: usize| (format!("{p}.conv{i}"), format!("{p}.bn{i}"));
        // The branch and the shortcut are freed once added.
        let sum = {
            let out = if self.config.bottleneck() {
                let (c1, n1) = c(1);
                let (c2, n2) = c(2);
                let (c3, n3) = c(3);
                // `h = op(&h)` frees each activation once the next exists: a teacher's inference
                // tape holds nothing, so this is what keeps its forward to a few live activations.
                let mut h = self.conv_bn(tape, x, &c1, &n1, 1, 0, training)?;
                h = activation::relu(tape, &h)?;
                h = self.conv_bn(tape, &h, &c2, &n2, b.stride, 1, training)?;
                h = activation::relu(tape, &h)?;
                self.conv_bn(tape, &h, &c3, &n3, 1, 0, training)?
            } else {
                let (c1, n1) = c(1);
                let (c2, n2) = c(2);
                let mut h = self.conv_bn(tape, x, &c1, &n1, b.stride, 1, training)?;
                h = activation::relu(tape, &h)?;
                self.conv_bn(tape, &h, &c2, &n2, 1, 1, training)?
            };
            let identity = if b.downsample {
                let (dc, dn) = (format!("{p}.downsample.0"), format!("{p}.downsample.1"));
                self.conv_bn(tape, x, &dc, &dn, b.stride, 0, training)?
            } else {
                x.clone()
            };
            elementwise::add(tape, &out, &identity)?
        };
        activation::relu(tape, &sum)
    }

    /// Convolution then BatchNorm; for a teacher, the folded convolution with its bias.
    #[allow(clippy::too_many_arguments)]
    fn conv_bn(
        &self,
        tape: &Tape,
        x: &Var,
        conv_name: &str,
        bn_name: &str,
        stride: usize,
        padding: usize,
        training: bool,
    ) -> Result<Var> {
        let w = self.weights.var(tape, &format!("{conv_name}.weight"))?;
        let opts = conv::Conv2dOptions { stride, padding };
        if self.folded {
            let bias = self.weights.var(tape, &format!("{conv_name}.bias"))?;
            return conv::conv2d(tape, x, &w, Some(&bias), opts);
        }
        let y = conv::conv2d(tape, x, &w, None, opts)?;
        let gamma = self.weights.var(tape, &format!("{bn_name}.weight"))?;
        let beta = self.weights.var(tape, &format!("{bn_name}.bias"))?;
        let mean = self.buffer(&format!("{bn_name}.running_mean"))?;
        let var = self.buffer(&format!("{bn_name}.running_var"))?;
        let out = norm::batch_norm2d(
            tape,
            &y,
            &gamma,
            &beta,
            mean,
            var,
            norm::BatchNormOptions {
                training,
                momentum: BN_MOMENTUM,
                eps: BN_EPS,
            },
        )?;
        if training {
            let counter = self.buffer(&format!("{bn_name}.num_batches_tracked"))?;
            let n = counter.to_vec::<i32>()?[0];
            counter.copy_from_i32(&[n.saturating_add(1)])?;
        }
        Ok(out)
    }

    /// A frozen teacher: every BatchNorm folded into the convolution before it
    /// (`w' = w * g / sqrt(v + eps)`, `b' = beta - mean * g / sqrt(v + eps)`), weights cast to
    /// `dtype` (bf16 keeps a teacher at half the memory). Its evaluation-mode logits equal the
    /// student's up to `dtype` rounding. Made from the f32 master weights; it keeps this
    /// model's compute dtype (`set_activations`).
    pub fn teacher(&self, dtype: DType) -> Result<ResNet> {
        if self.folded {
            return Err(Error::invalid(
                "ResNet::teacher",
                "this model is already a folded teacher".to_string(),
            ));
        }
        let mut out = Vec::new();
        for m in self.config.modules() {
            match m {
                Module::Conv(name, shape) => {
                    let bn = self.bn_of_conv(&name);
                    let w = self.weights.get(&format!("{name}.weight"))?.to_vec_f32()?;
                    let gamma = self.weights.get(&format!("{bn}.weight"))?.to_vec_f32()?;
                    let beta = self.weights.get(&format!("{bn}.bias"))?.to_vec_f32()?;
                    let mean = self.buffer(&format!("{bn}.running_mean"))?.to_vec_f32()?;
                    let var = self.buffer(&format!("{bn}.running_var"))?.to_vec_f32()?;
                    let per_out = w.len() / shape[0];
                    let mut wf = w;
                    let mut bias = vec![0f32; shape[0]];
                    for o in 0..shape[0] {
                        let scale = gamma[o] / (var[o] + BN_EPS).sqrt();
                        wf[o * per_out..(o + 1) * per_out]
                            .iter_mut()
                            .for_each(|v| *v *= scale);
                        bias[o] = beta[o] - mean[o] * scale;
                    }
                    out.push((
                        format!("{name}.weight"),
                        Tensor::f32(wf, &shape)?.cast(dtype)?,
                    ));
                    out.push((
                        format!("{name}.bias"),
                        Tensor::f32(bias, &[shape[0]])?.cast(dtype)?,
                    ));
                }
                Module::Bn(..) => {}
                Module::Linear(name, ..) => {
                    for p in ["weight", "bias"] {
                        let n = format!("{name}.{p}");
                        out.push((n.clone(), self.weights.get(&n)?.cast(dtype)?.deep_copy()?));
                    }
                }
            }
        }
        let mut teacher =
            Self::assemble(self.config.clone(), Weights::frozen(out), Vec::new(), true);
        teacher.activations = self.activations;
        Ok(teacher)
    }

    /// The BatchNorm that follows convolution `conv` in torchvision's naming.
    fn bn_of_conv(&self, conv: &str) -> String {
        if let Some(p) = conv.strip_suffix("downsample.0") {
            format!("{p}downsample.1")
        } else {
            // conv1 -> bn1, layerX.Y.convK -> layerX.Y.bnK
            let (head, k) = conv.split_at(conv.len() - 1);
            format!("{}bn{k}", head.strip_suffix("conv").unwrap_or(head))
        }
    }

    /// Parameters and buffers with torchvision's names, in its order.
    pub fn state_dict(&self) -> Result<StateDict> {
        if self.folded {
            return self.weights.named_tensors();
        }
        let mut out = Vec::new();
        for m in self.config.modules() {
            let (name, params, buffers): (String, &[&str], &[&str]) = match m {
                Module::Conv(n, _) => (n, &["weight"], &[]),
                Module::Bn(n, _) => (
                    n,
                    &["weight", "bias"],
                    &["running_mean", "running_var", "num_batches_tracked"],
                ),
                Module::Linear(n, ..) => (n, &["weight", "bias"], &[]),
            };
            for p in params {
                let n = format!("{name}.{p}");
                out.push((n.clone(), self.weights.get(&n)?));
            }
            for b in buffers {
                let n = format!("{name}.{b}");
                out.push((n.clone(), self.buffer(&n)?.clone()));
            }
        }
        Ok(out)
    }

    /// A student built from a state dict (f32, bf16 or f16 values; `num_batches_tracked` as
    /// integers). `source` names where it came from, for error messages.
    pub fn from_state_dict(config: ResNetConfig, state: StateDict, source: &Path) -> Result<Self> {
        config.validate()?;
        let params = config.param_specs();
        let buffers = config.buffer_specs();
        let expected: Vec<(String, Vec<usize>)> =
            params.iter().chain(buffers.iter()).cloned().collect();
        let tensors = match_state_dict(&config.name(), source, &expected, state, &[])?;
        let model = ResNet::new(config, 0)?;
        let flat = model.params().expect("a new ResNet is trainable");
        for ((name, _), t) in params.iter().zip(&tensors) {
            flat.set(name, t)?;
        }
        for ((name, _), t) in buffers.iter().zip(&tensors[params.len()..]) {
            let dst = model.buffer(name)?;
            if name.ends_with("num_batches_tracked") {
                dst.copy_from_i32(&[t.cast(DType::I32)?.to_vec::<i32>()?[0]])?;
            } else {
                dst.copy_from(t)?;
            }
        }
        Ok(model)
    }

    /// Loads a student from a safetensors state dict.
    pub fn load(config: ResNetConfig, path: &Path) -> Result<Self> {
        let ckpt = recycle_engine::checkpoint::load(path)?;
        Self::from_state_dict(config, ckpt.tensors, path)
    }

    /// Loads a frozen teacher: the checkpoint, BatchNorm folded, weights in `dtype`.
    pub fn load_teacher(config: ResNetConfig, path: &Path, dtype: DType) -> Result<Self> {
        Self::load(config, path)?.teacher(dtype)
    }

    /// Writes the state dict as safetensors, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        recycle_engine::checkpoint::save(path, &self.state_dict()?, None)
    }
}
