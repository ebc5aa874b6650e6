//! BERT for masked language modelling, with Hugging Face `BertForMaskedLM` names.
//!
//! Post-LayerNorm encoder layers, exact-erf GELU, a padding attention mask, dropout on the
//! embeddings, the attention probabilities and each sub-layer output. The MLM head gathers the
//! masked positions **before** its transform and the vocabulary projection, so logits exist
//! only where a label exists: with 15% masking that is ~7x less work in the widest matmul of
//! the model, for students and teachers alike. The decoder is tied to the word embeddings
//! (`cls.predictions.decoder.weight` is `bert.embeddings.word_embeddings.weight`), its bias is
//! `cls.predictions.bias`; the tied copies are neither stored nor required in checkpoints.

use std::path::Path;

use recycle_engine::ops::{
    activation, attention, dropout, elementwise, embedding, gather, layout, loss, matmul, norm,
};
use recycle_engine::{DType, Device, Error, FlatParams, Result, Tape, Tensor, Var};

use crate::bert_layouts::{self, HeadInit, LayoutReport};
use crate::weights::{check_activations, match_state_dict, to_activations, StateDict, Weights};

/// Names that Hugging Face state dicts may carry for the tied decoder; accepted and ignored.
const TIED_NAMES: [&str; 2] = [
    "cls.predictions.decoder.weight",
    "cls.predictions.decoder.bias",
];

#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
    pub hidden_dropout: f32,
    pub attention_dropout: f32,
}

impl BertConfig {
    fn sized(layers: usize, hidden: usize, vocab_size: usize) -> Self {
        BertConfig {
            vocab_size,
            hidden_size: hidden,
            num_layers: layers,
            num_heads: hidden / 64,
            intermediate_size: 4 * hidden,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_dropout: 0.1,
            attention_dropout: 0.1,
        }
    }

    /// 2 layers, hidden 128, 2 heads.
    pub fn tiny(vocab_size: usize) -> Self {
        Self::sized(2, 128, vocab_size)
    }

    /// 4 layers, hidden 256, 4 heads.
    pub fn mini(vocab_size: usize) -> Self {
        Self::sized(4, 256, vocab_size)
    }

    /// 4 layers, hidden 512, 8 heads.
    pub fn small(vocab_size: usize) -> Self {
        Self::sized(4, 512, vocab_size)
    }

    /// 12 layers, hidden 768, 12 heads (BERT-base).
    pub fn base(vocab_size: usize) -> Self {
        Self::sized(12, 768, vocab_size)
    }

    /// One of `tiny`, `mini`, `small`, `base`.
    pub fn by_name(size: &str, vocab_size: usize) -> Result<Self> {
        match size {
            "tiny" => Ok(Self::tiny(vocab_size)),
            "mini" => Ok(Self::mini(vocab_size)),
            "small" => Ok(Self::small(vocab_size)),
            "base" => Ok(Self::base(vocab_size)),
            other => Err(Error::invalid(
                "BertConfig::by_name",
                format!("unknown BERT size `{other}`: use tiny, mini, small or base"),
            )),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let op = "BertConfig";
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.num_layers == 0
            || self.num_heads == 0
            || self.intermediate_size == 0
            || self.max_position_embeddings == 0
            || self.type_vocab_size == 0
        {
            return Err(Error::invalid(
                op,
                format!("every size must be at least 1: {self:?}"),
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(Error::invalid(
                op,
                format!(
                    "hidden size {} is not divisible by {} heads",
                    self.hidden_size, self.num_heads
                ),
            ));
        }
        for (name, p) in [
            ("hidden_dropout", self.hidden_dropout),
            ("attention_dropout", self.attention_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::invalid(op, format!("{name} {p} must be in [0, 1)")));
            }
        }
        Ok(())
    }

    pub fn name(&self) -> String {
        format!(
            "BERT ({} layers, hidden {}, {} heads, vocabulary {})",
            self.num_layers, self.hidden_size, self.num_heads, self.vocab_size
        )
    }

    /// Trainable parameters in Hugging Face order, the tied decoder counted once.
    pub fn param_specs(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let mut s: Vec<(String, Vec<usize>)> = Vec::new();
        let mut push = |n: String, shape: Vec<usize>| s.push((n, shape));
        let e = "bert.embeddings";
        push(
            format!("{e}.word_embeddings.weight"),
            vec![self.vocab_size, h],
        );
        push(
            format!("{e}.position_embeddings.weight"),
            vec![self.max_position_embeddings, h],
        );
        push(
            format!("{e}.token_type_embeddings.weight"),
            vec![self.type_vocab_size, h],
        );
        push(format!("{e}.LayerNorm.weight"), vec![h]);
        push(format!("{e}.LayerNorm.bias"), vec![h]);
        for l in 0..self.num_layers {
            let p = format!("bert.encoder.layer.{l}");
            for q in ["query", "key", "value"] {
                push(format!("{p}.attention.self.{q}.weight"), vec![h, h]);
                push(format!("{p}.attention.self.{q}.bias"), vec![h]);
            }
            push(format!("{p}.attention.output.dense.weight"), vec![h, h]);
            push(format!("{p}.attention.output.dense.bias"), vec![h]);
            push(format!("{p}.attention.output.LayerNorm.weight"), vec![h]);
            push(format!("{p}.attention.output.LayerNorm.bias"), vec![h]);
            push(format!("{p}.intermediate.dense.weight"), vec![i, h]);
            push(format!("{p}.intermediate.dense.bias"), vec![i]);
            push(format!("{p}.output.dense.weight"), vec![h, i]);
            push(format!("{p}.output.dense.bias"), vec![h]);
            push(format!("{p}.output.LayerNorm.weight"), vec![h]);
            push(format!("{p}.output.LayerNorm.bias"), vec![h]);
        }
        push("cls.predictions.bias".into(), vec![self.vocab_size]);
        push("cls.predictions.transform.dense.weight".into(), vec![h, h]);
        push("cls.predictions.transform.dense.bias".into(), vec![h]);
        push("cls.predictions.transform.LayerNorm.weight".into(), vec![h]);
        push("cls.predictions.transform.LayerNorm.bias".into(), vec![h]);
        s
    }

    pub fn num_params(&self) -> usize {
        self.param_specs()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// One masked-language-modelling batch.
#[derive(Debug, Clone)]
pub struct MlmBatch {
    /// Token ids `[B, S]`, i32.
    pub input_ids: Tensor,
    /// Segment ids `[B, S]`, i32; all zeros when `None`.
    pub token_type_ids: Option<Tensor>,
    /// `[B, S]`, i32: 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// Flat positions `b * S + s` of the masked tokens, `[M]`, i32, in row-major order.
    pub masked_positions: Tensor,
    /// The original token at each masked position, `[M]`, i32.
    pub labels: Tensor,
}

impl MlmBatch {
    /// Builds a batch from per-position labels `[B, S]` (-100 where nothing is predicted, as in
    /// Hugging Face), keeping only the labelled positions.
    pub fn from_position_labels(
        input_ids: Tensor,
        token_type_ids: Option<Tensor>,
        attention_mask: Tensor,
        position_labels: &Tensor,
    ) -> Result<Self> {
        recycle_engine::error::check_same_shape(
            "MlmBatch::from_position_labels",
            input_ids.shape(),
            position_labels.shape(),
        )?;
        let labels_all = position_labels.to_vec::<i32>()?;
        let (mut positions, mut labels) = (Vec::new(), Vec::new());
        for (i, &l) in labels_all.iter().enumerate() {
            if l != -100 {
                positions.push(i as i32);
                labels.push(l);
            }
        }
        let m = positions.len();
        Ok(MlmBatch {
            input_ids,
            token_type_ids,
            attention_mask,
            masked_positions: Tensor::from_vec(positions, &[m], Device::Cpu)?,
            labels: Tensor::from_vec(labels, &[m], Device::Cpu)?,
        })
    }

    /// A copy with every tensor on `device`.
    pub fn to_device(&self, device: Device) -> Result<MlmBatch> {
        Ok(MlmBatch {
            input_ids: self.input_ids.to_device(device)?,
            token_type_ids: self
                .token_type_ids
                .as_ref()
                .map(|t| t.to_device(device))
                .transpose()?,
            attention_mask: self.attention_mask.to_device(device)?,
            masked_positions: self.masked_positions.to_device(device)?,
            labels: self.labels.to_device(device)?,
        })
    }

    fn validate(&self, config: &BertConfig) -> Result<(usize, usize)> {
        let op = "Bert::forward";
        self.input_ids.expect_dtype(op, DType::I32)?;
        self.input_ids.expect_rank(op, "input_ids", 2)?;
        let (b, s) = (self.input_ids.shape()[0], self.input_ids.shape()[1]);
        if s > config.max_position_embeddings {
            return Err(Error::shape(
                op,
                format!(
                    "sequence length {s} exceeds the {} positions of {}",
                    config.max_position_embeddings,
                    config.name()
                ),
            ));
        }
        if self.attention_mask.shape() != [b, s] {
            return Err(Error::shape(
                op,
                format!(
                    "attention_mask {:?} does not match input_ids {:?}",
                    self.attention_mask.shape(),
                    self.input_ids.shape()
                ),
            ));
        }
        if let Some(tt) = &self.token_type_ids {
            if tt.shape() != [b, s] {
                return Err(Error::shape(
                    op,
                    format!(
                        "token_type_ids {:?} does not match input_ids {:?}",
                        tt.shape(),
                        self.input_ids.shape()
                    ),
                ));
            }
        }
        if self.masked_positions.rank() != 1 || self.labels.shape() != self.masked_positions.shape()
        {
            return Err(Error::shape(
                op,
                format!(
                    "masked_positions {:?} and labels {:?} must be matching vectors",
                    self.masked_positions.shape(),
                    self.labels.shape()
                ),
            ));
        }
        Ok((b, s))
    }
}

/// Dropout and its randomness for one forward pass.
#[derive(Debug, Clone, Copy)]
pub struct BertForwardOptions {
    pub training: bool,
    /// Seeds every dropout site of this pass (change it every step).
    pub seed: u64,
}

impl BertForwardOptions {
    pub fn eval() -> Self {
        BertForwardOptions {
            training: false,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Bert {
    config: BertConfig,
    weights: Weights,
    /// The compute dtype of the encoder and the MLM head (`set_activations`); `None`: the
    /// embedding tables' dtype.
    activations: Option<DType>,
}

impl Bert {
    /// A freshly initialised student, as Hugging Face initialises BERT: normal(0, 0.02)
    /// matrices and embeddings (the padding row 0 zeroed), zero biases, LayerNorm weight 1.
    pub fn new(config: BertConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let specs = config.param_specs();
        let params = FlatParams::new(&specs, Device::Cpu)?;
        for (i, (name, shape)) in specs.iter().enumerate() {
            let s = seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
            let value = if shape.len() == 2 {
                let t = Tensor::randn(shape, 0.0, 0.02, s, DType::F32, Device::Cpu)?;
                if name.ends_with("word_embeddings.weight") {
                    t.write_f32()?[..shape[1]].fill(0.0); // pad_token_id 0
                }
                t
            } else if name.ends_with("LayerNorm.weight") {
                Tensor::ones(shape, DType::F32, Device::Cpu)?
            } else {
                Tensor::zeros(shape, DType::F32, Device::Cpu)?
            };
            params.set(name, &value)?;
        }
        Ok(Bert {
            config,
            weights: Weights::Trainable(params),
            activations: None,
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    pub fn params(&self) -> Option<&FlatParams> {
        self.weights.params()
    }

    pub fn is_teacher(&self) -> bool {
        self.weights.params().is_none()
    }

    /// A copy with its weights on `device` (a GPU copy shares nothing with this model; on the
    /// model's own device the storage is shared).
    pub fn to_device(&self, device: Device) -> Result<Bert> {
        Ok(Bert {
            config: self.config.clone(),
            weights: self.weights.to_device(device)?,
            activations: self.activations,
        })
    }

    /// Sets the compute dtype of the forward: the sum of the three embeddings is cast to
    /// `dtype` before the embeddings' LayerNorm, so the encoder and the MLM head run in it, and
    /// the logits come out in it. On a GPU every op after the cast runs in `dtype`. For bf16 a
    /// student's parameters get a bf16 working copy of the f32 master weights, which the
    /// forward reads (`FlatParams::enable_working_copy`; the optimizers keep it current), so no
    /// op casts a weight and the embeddings already come out in bf16; f32 drops it. On the CPU
    /// the ops widen bf16 to f32, so bf16 there means weights, embeddings and logits rounded
    /// to bf16 (and, where the CPU has bf16 products, the inputs of the linear layers), f32
    /// arithmetic in between. A teacher made from this model (`teacher`) keeps the compute
    /// dtype; its frozen weights are used in their own dtype. Until this is called the
    /// activations take the embedding tables' dtype (f32 for a student, the weights' dtype for
    /// a teacher), as before this setting existed.
    pub fn set_activations(&mut self, dtype: DType) -> Result<()> {
        check_activations("Bert::set_activations", dtype)?;
        self.weights.match_activations(dtype)?;
        self.activations = Some(dtype);
        Ok(())
    }

    /// The compute dtype set by `set_activations`; `None` when the tables' dtype is used.
    pub fn activations(&self) -> Option<DType> {
        self.activations
    }

    fn w(&self, tape: &Tape, name: &str) -> Result<Var> {
        self.weights.var(tape, name)
    }

    fn linear(&self, tape: &Tape, x: &Var, prefix: &str) -> Result<Var> {
        let w = self.w(tape, &format!("{prefix}.weight"))?;
        let b = self.w(tape, &format!("{prefix}.bias"))?;
        matmul::linear(tape, x, &w, Some(&b))
    }

    fn layer_norm(&self, tape: &Tape, x: &Var, prefix: &str) -> Result<Var> {
        let w = self.w(tape, &format!("{prefix}.weight"))?;
        let b = self.w(tape, &format!("{prefix}.bias"))?;
        norm::layer_norm(tape, x, &w, &b, self.config.layer_norm_eps)
    }

    /// Encoder output `[B * S, hidden]`.
    pub fn encode(&self, tape: &Tape, batch: &MlmBatch, opts: BertForwardOptions) -> Result<Var> {
        let (b, s) = batch.validate(&self.config)?;
        let (h, nh) = (self.config.hidden_size, self.config.num_heads);
        let dh = h / nh;
        let drop = |tape: &Tape, x: &Var, p: f32, site: u64| -> Result<Var> {
            let seed = opts.seed.wrapping_mul(0x9e37_79b9).wrapping_add(site);
            dropout::dropout(tape, x, p, seed, opts.training)
        };

        // Every activation is dropped right after its last use (by a block's end, or by
        // `t = op(&t)`, which frees the old value once the new one exists), not at the end of
        // the forward or of a layer: on a teacher's inference tape nothing else holds it, so a
        // teacher forward keeps a few activations at a time, whatever the depth
        // (tests/teacher_memory.rs measures it). A recording tape keeps what backward needs.
        let e = "bert.embeddings";
        // Position and segment ids live where the token ids do.
        let ids_device = batch.input_ids.device();
        let mut x = {
            let table = |name: &str| self.w(tape, &format!("{e}.{name}.weight"));
            let positions = Tensor::from_vec((0..s as i32).collect::<Vec<_>>(), &[s], ids_device)?;
            let types = match &batch.token_type_ids {
                Some(t) => t.clone(),
                None => Tensor::zeros(&[b, s], DType::I32, ids_device)?,
            };
            let mut t = embedding::embedding(tape, &table("word_embeddings")?, &batch.input_ids)?;
            t = elementwise::add(
                tape,
                &t,
                &embedding::embedding(tape, &table("token_type_embeddings")?, &types)?,
            )?;
            // [B, S, H] + [S, H]
            t = elementwise::add(
                tape,
                &t,
                &embedding::embedding(tape, &table("position_embeddings")?, &positions)?,
            )?;
            t = to_activations(tape, &t, self.activations)?;
            t = self.layer_norm(tape, &t, &format!("{e}.LayerNorm"))?;
            t = drop(tape, &t, self.config.hidden_dropout, 0)?;
            layout::reshape(tape, &t, &[b * s, h])?
        };

        let heads = |tape: &Tape, t: &Var| -> Result<Var> {
            let t = layout::reshape(tape, t, &[b, s, nh, dh])?;
            layout::permute(tape, &t, &[0, 2, 1, 3])
        };
        // The padding mask where the activations are, once for all layers: on a GPU the
        // attention turns it into an additive mask once per mask tensor and keeps that with it,
        // so a mask left on the host would be converted (and uploaded) again in every layer.
        let mask = batch.attention_mask.to_device(x.tensor().device())?;
        for l in 0..self.config.num_layers {
            let p = format!("bert.encoder.layer.{l}");
            let a = {
                // q, k and v are freed as soon as the attention has run.
                let mut t = {
                    let proj = |name: &str| {
                        heads(
                            tape,
                            &self.linear(tape, &x, &format!("{p}.attention.self.{name}"))?,
                        )
                    };
                    let (q, k, v) = (proj("query")?, proj("key")?, proj("value")?);
                    attention::scaled_dot_product_attention(
                        tape,
                        &q,
                        &k,
                        &v,
                        Some(&mask),
                        attention::AttentionOptions {
                            dropout: self.config.attention_dropout,
                            seed: opts
                                .seed
                                .wrapping_mul(0x9e37_79b9)
                                .wrapping_add(1000 + l as u64),
                            training: opts.training,
                        },
                    )?
                };
                t = layout::permute(tape, &t, &[0, 2, 1, 3])?;
                t = layout::reshape(tape, &t, &[b * s, h])?;
                t = self.linear(tape, &t, &format!("{p}.attention.output.dense"))?;
                t = drop(tape, &t, self.config.hidden_dropout, 2000 + 2 * l as u64)?;
                t = elementwise::add(tape, &t, &x)?;
                self.layer_norm(tape, &t, &format!("{p}.attention.output.LayerNorm"))?
            };
            x = {
                let mut t = self.linear(tape, &a, &format!("{p}.intermediate.dense"))?;
                t = activation::gelu(tape, &t)?;
                t = self.linear(tape, &t, &format!("{p}.output.dense"))?;
                t = drop(tape, &t, self.config.hidden_dropout, 2001 + 2 * l as u64)?;
                t = elementwise::add(tape, &t, &a)?;
                self.layer_norm(tape, &t, &format!("{p}.output.LayerNorm"))?
            };
        }
        Ok(x)
    }

    /// Vocabulary logits `[M, vocab]` at the masked positions only.
    pub fn mlm_logits(
        &self,
        tape: &Tape,
        batch: &MlmBatch,
        opts: BertForwardOptions,
    ) -> Result<Var> {
        // As in `encode`, each activation is freed once consumed (the encoder's output as
        // soon as the masked rows are gathered).
        let mut t = gather::gather_rows(
            tape,
            &self.encode(tape, batch, opts)?,
            &batch.masked_positions,
        )?;
        t = self.linear(tape, &t, "cls.predictions.transform.dense")?;
        t = activation::gelu(tape, &t)?;
        t = self.layer_norm(tape, &t, "cls.predictions.transform.LayerNorm")?;
        let decoder = self.w(tape, "bert.embeddings.word_embeddings.weight")?;
        let bias = self.w(tape, "cls.predictions.bias")?;
        let logits = matmul::linear(tape, &t, &decoder, Some(&bias))?;
        drop(t);
        // On a GPU already in the compute dtype (an identity); on the CPU, where ops widen,
        // this rounds the logits so both devices hand the loss the same type.
        to_activations(tape, &logits, self.activations)
    }

    /// Logits at the masked positions and the mean cross-entropy against the labels.
    pub fn mlm_loss(
        &self,
        tape: &Tape,
        batch: &MlmBatch,
        opts: BertForwardOptions,
    ) -> Result<(Var, Var)> {
        let logits = self.mlm_logits(tape, batch, opts)?;
        let ce = loss::cross_entropy(
            tape,
            &logits,
            &batch.labels,
            loss::CrossEntropyOptions {
                ignore_index: Some(-100),
                label_smoothing: 0.0,
            },
        )?;
        Ok((logits, ce))
    }

    /// A frozen teacher with its weights in `dtype` (bf16 by default for teachers), made from
    /// the f32 master weights; it keeps this model's compute dtype (`set_activations`).
    pub fn teacher(&self, dtype: DType) -> Result<Bert> {
        let tensors = self
            .weights
            .named_tensors()?
            .into_iter()
            .map(|(n, t)| Ok((n, t.cast(dtype)?.deep_copy()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Bert {
            config: self.config.clone(),
            weights: Weights::frozen(tensors),
            activations: self.activations,
        })
    }

    /// Parameters with Hugging Face names, without the tied decoder copies.
    pub fn state_dict(&self) -> Result<StateDict> {
        self.weights.named_tensors()
    }

    /// A student from a state dict (f32, bf16 or f16) in any of the layouts of
    /// [`crate::bert_layouts`] that holds the MLM head; the tied decoder names may be present.
    pub fn from_state_dict(config: BertConfig, state: StateDict, source: &Path) -> Result<Self> {
        Ok(Self::from_layout(config, state, source, HeadInit::FromFile, 0)?.0)
    }

    /// A student from a Hugging Face checkpoint of any layout ([`crate::bert_layouts`]): the
    /// encoder from the file; the MLM head from the file, or (with [`HeadInit::Fresh`]) fresh
    /// from `seed` as [`Bert::new`] draws it. An encoder-only file without `Fresh` is an error
    /// saying how to proceed. The report says what was ignored, for the run's log.
    pub fn from_pretrained(
        config: BertConfig,
        path: &Path,
        head: HeadInit,
        seed: u64,
    ) -> Result<(Self, LayoutReport)> {
        let ckpt = recycle_engine::checkpoint::load(path)?;
        Self::from_layout(config, ckpt.tensors, path, head, seed)
    }

    fn from_layout(
        config: BertConfig,
        state: StateDict,
        source: &Path,
        head: HeadInit,
        seed: u64,
    ) -> Result<(Self, LayoutReport)> {
        config.validate()?;
        let (mut state, mut report) = bert_layouts::normalise(state, source)?;
        let model = Bert::new(config, seed)?;
        match head {
            HeadInit::FromFile if !bert_layouts::has_mlm_head(&state) => {
                return Err(bert_layouts::missing_head(source, report.layout));
            }
            HeadInit::FromFile => {}
            HeadInit::Fresh => {
                state.retain(|(n, _)| !n.starts_with(bert_layouts::MLM_HEAD_PREFIX));
                for (name, t) in model.weights.named_tensors()? {
                    if name.starts_with(bert_layouts::MLM_HEAD_PREFIX) {
                        state.push((name, t.deep_copy()?));
                    }
                }
                report.fresh_head = true;
            }
        }
        let specs = model.config.param_specs();
        let tensors = match_state_dict(&model.config.name(), source, &specs, state, &TIED_NAMES)?;
        let flat = model.params().expect("a new Bert is trainable");
        for ((name, _), t) in specs.iter().zip(&tensors) {
            flat.set(name, t)?;
        }
        Ok((model, report))
    }

    pub fn load(config: BertConfig, path: &Path) -> Result<Self> {
        let ckpt = recycle_engine::checkpoint::load(path)?;
        Self::from_state_dict(config, ckpt.tensors, path)
    }

    pub fn load_teacher(config: BertConfig, path: &Path, dtype: DType) -> Result<Self> {
        Self::load(config, path)?.teacher(dtype)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        recycle_engine::checkpoint::save(path, &self.state_dict()?, None)
    }
}
