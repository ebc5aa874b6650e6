//! A run, described in TOML: model, data, duration, optimizer and learning-rate schedule (the
//! paper's table 1), and optionally the teachers and how to distill from them.
//!
//! ```toml
//! name = "kd-kl"
//! seed = 0
//! out_dir = "runs"
//! device = "cpu"         # or "cuda" (= "cuda:0"), "cuda:N"
//! activations = "f32"    # or "bf16"
//! [model]
//! kind = "resnet"        # or "bert"
//! depth = 18
//! width = 0.25
//! small_stem = true
//! [data]
//! dataset = "fashion-mnist"   # or "image-folder"; "fortunes", "text" (masked language modelling)
//! train_limit = 10000
//! eval_limit = 2000
//! [train]
//! batch_size = 128
//! epochs = 2.0
//! evals = 8
//! clip_grad_norm = 1.0   # clip gradients to this global L2 norm (off when absent)
//! on_nonfinite = "stop"  # or "skip": what a step with a NaN or infinity does
//! [optimizer]
//! kind = "sgdw"          # or "adamw"
//! lr = 0.4
//! schedule = "cosine"    # or "linear", "constant"
//! warmup = 0.1           # fraction of training
//! [distill]
//! teachers = ["runs/sweep-lr0.8"]   # run directories (or .safetensors files)
//! loss = "kl"            # or "mse"
//! temperature = 4.0
//! weight = 1.0
//! strategy = "single"    # ensemble:K, random-subset:K, random-one, random-one-per-rank
//! start = 0.0
//! stop = 1.0
//! ```

use std::path::{Path, PathBuf};

use recycle_engine::{DType, Device, Error, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::data::text_shards::PlainDocuments;
use crate::data::text_stream::Packing;
use crate::distill::cache::{CacheMode, ValueType};
use crate::distill::{KdKind, KdLoss, KdSchedule, TeacherStrategy};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    /// The method name reports group this run under (default: derived from `distill`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Where run directories are created (`<out_dir>/<name>/`).
    #[serde(default = "default_out_dir")]
    pub out_dir: PathBuf,
    /// Where the student, the teachers and the optimizer state live: `cpu` (the default),
    /// `cuda` or `cuda:N`. Only the spelling is checked when the recipe is read; whether the
    /// device is there is checked when a run starts (`trainer::open_device`).
    #[serde(
        default = "default_device",
        serialize_with = "serialize_device",
        deserialize_with = "deserialize_device"
    )]
    pub device: Device,
    /// The type the models compute their activations in: `f32` (the default) or `bf16`
    /// (parameters, gradients and optimizer state stay f32). On a GPU every op then computes in
    /// bf16. On a CPU with AVX512_BF16 the matmuls and convolutions, forward and backward, run
    /// in bf16 products with f32 accumulation; the other CPU ops widen bf16 to f32, so there the
    /// values each layer hands to the next are rounded to bf16.
    #[serde(default)]
    pub activations: Activations,
    pub model: ModelRecipe,
    pub data: DataRecipe,
    pub train: TrainRecipe,
    pub optimizer: OptimizerRecipe,
    #[serde(default)]
    pub distill: Option<DistillRecipe>,
}

fn default_out_dir() -> PathBuf {
    PathBuf::from("runs")
}

fn default_device() -> Device {
    Device::Cpu
}

/// Reads a device name as a recipe spells it, without opening the device: `cpu`, `cuda`
/// (GPU 0) or `cuda:N`. The error names the value and the spellings accepted.
pub fn parse_device_name(s: &str) -> Result<Device> {
    let t = s.trim();
    let bad = || {
        Error::invalid(
            "device",
            format!(
                "device `{s}` is not one of \"cpu\", \"cuda\" or \"cuda:N\" (N the GPU's number, \
                 e.g. \"cuda:0\")"
            ),
        )
    };
    if t.eq_ignore_ascii_case("cpu") {
        return Ok(Device::Cpu);
    }
    if t.eq_ignore_ascii_case("cuda") {
        return Ok(Device::Cuda(0));
    }
    let n = t.strip_prefix("cuda:").ok_or_else(bad)?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    n.parse::<usize>().map(Device::Cuda).map_err(|_| bad())
}

fn serialize_device<S: Serializer>(d: &Device, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(d)
}

fn deserialize_device<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Device, D::Error> {
    let s = String::deserialize(d)?;
    parse_device_name(&s).map_err(|e| match e {
        Error::Invalid { msg, .. } => serde::de::Error::custom(msg),
        e => serde::de::Error::custom(e),
    })
}

/// The type a model's activations are computed in (see [`Recipe::activations`]).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Activations {
    #[default]
    F32,
    Bf16,
}

impl Activations {
    pub fn dtype(self) -> DType {
        match self {
            Activations::F32 => DType::F32,
            Activations::Bf16 => DType::BF16,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ModelRecipe {
    Resnet {
        #[serde(default = "default_depth")]
        depth: usize,
        #[serde(default = "one")]
        width: f32,
        #[serde(default = "yes")]
        small_stem: bool,
    },
    Bert {
        /// tiny, mini, small or base.
        #[serde(default = "default_bert_size")]
        size: String,
        /// A Hugging Face BERT `config.json` giving the sizes (instead of `size`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        config: Option<PathBuf>,
        /// A checkpoint the student starts from: a BertForMaskedLM, BertForPreTraining or
        /// BertModel / sentence-transformers safetensors file.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        init: Option<PathBuf>,
        /// `fresh`: the MLM head starts from random values (needed for an encoder-only `init`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        init_head: Option<InitHead>,
    },
}

/// How the MLM head of a BERT started from `init` begins.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InitHead {
    /// From the checkpoint (which must hold one); the same as leaving it out.
    File,
    /// Freshly initialised, whatever the checkpoint holds.
    Fresh,
}

fn default_depth() -> usize {
    18
}
fn one() -> f32 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_bert_size() -> String {
    "tiny".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataRecipe {
    /// `fashion-mnist`, `fortunes` or `image-folder` (`dir` holding `train/<class>/*` and
    /// `val/<class>/*`).
    pub dataset: String,
    /// Where the data set lives (default: found or downloaded, see `data::locate`).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Use only the first N training examples.
    #[serde(default)]
    pub train_limit: Option<usize>,
    /// Use only the first N evaluation examples.
    #[serde(default)]
    pub eval_limit: Option<usize>,
    /// Text: tokens per sequence.
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Text: WordPiece vocabulary size when training a tokenizer.
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// Text: a tokenizer.json to use instead of training one.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Fraction of the training data held out as the validation split, on which sweeps and
    /// searches choose (teachers, learning rates); the test split is only reported. Images: of
    /// the (first `train_limit`) training images; text: of the corpus texts outside the test
    /// split. `eval_limit` caps it like the test split. 0 keeps no validation split.
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// Text shards (`dataset = "text"`): the training files, as paths or globs (`*`, `?` in
    /// the file name), relative to `dir` when it is set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub train: Vec<String>,
    /// Text shards: the held-out files; `validation_fraction` of their sequences form the
    /// validation split, the rest the test split.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub validation: Vec<String>,
    /// Text shards: the JSON field holding a document (default `text`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_field: Option<String>,
    /// Text shards: a plain-text file holds one document per line (`lines`, the default) or
    /// per blank-line-separated block (`blocks`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub documents: Option<PlainDocuments>,
    /// Text shards: `concatenate` documents into full sequences (the default) or `truncate`
    /// each to one padded sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packing: Option<Packing>,
    /// Image folder: side of the square views (224 for ImageNet; evaluation resizes the short
    /// side to `image_size * 256 / 224` first).
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// Image folder: skip (and count) files that cannot be decoded instead of stopping.
    #[serde(default, skip_serializing_if = "is_false")]
    pub skip_bad: bool,
    /// Image folder: decoding threads (0, the default: one per core).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub decode_threads: usize,
}

fn default_image_size() -> usize {
    224
}
fn is_false(b: &bool) -> bool {
    !*b
}
fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn default_seq_len() -> usize {
    64
}
fn default_vocab() -> usize {
    2000
}
fn default_validation_fraction() -> f64 {
    0.1
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainRecipe {
    pub batch_size: usize,
    /// Duration in passes over the training set ...
    #[serde(default)]
    pub epochs: Option<f64>,
    /// ... or in samples (exactly one of the two).
    #[serde(default)]
    pub samples: Option<u64>,
    /// Evaluations spread evenly over the run (the last one at the final step).
    #[serde(default = "default_evals")]
    pub evals: u64,
    /// Write a resumable checkpoint every N steps (0: only at evaluations and the end).
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Clip the gradients to this global L2 norm before each update (as PyTorch's
    /// `clip_grad_norm_`); off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_grad_norm: Option<f32>,
    /// What a step that meets a NaN or infinity does: `stop` the run (the default) or `skip`
    /// the update and count it.
    #[serde(default, skip_serializing_if = "OnNonFinite::is_stop")]
    pub on_nonfinite: OnNonFinite,
}

/// What a training step does when its input batch, a teacher's logits, the loss or the
/// gradients hold a NaN or an infinity (see `trainer::step`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnNonFinite {
    /// End the run with an error naming the step and the source; the last checkpoint stays.
    #[default]
    Stop,
    /// Leave the weights and optimizer state as they were, count the step as skipped, go on.
    Skip,
}

impl OnNonFinite {
    fn is_stop(&self) -> bool {
        *self == OnNonFinite::Stop
    }
}

fn default_evals() -> u64 {
    10
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Sgdw,
    Adamw,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimizerRecipe {
    pub kind: OptimizerKind,
    pub lr: f32,
    /// SGDW momentum (table 1: 0.875).
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    #[serde(default)]
    pub nesterov: bool,
    /// Decoupled weight decay (table 1: 5e-4 for SGDW, 1e-5 for AdamW).
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_betas")]
    pub betas: (f64, f64),
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default = "default_schedule")]
    pub schedule: ScheduleKind,
    /// Warmup as a fraction of training.
    #[serde(default)]
    pub warmup: f64,
    /// Learning rate at the end of the decay.
    #[serde(default)]
    pub final_lr: f32,
}

fn default_momentum() -> f64 {
    0.875
}
fn default_betas() -> (f64, f64) {
    (0.9, 0.98)
}
fn default_eps() -> f64 {
    1e-6
}
fn default_schedule() -> ScheduleKind {
    ScheduleKind::Cosine
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DistillRecipe {
    /// Teacher run directories (their `final.safetensors` and recorded accuracy) or
    /// checkpoint files.
    pub teachers: Vec<PathBuf>,
    /// The distillation term: `kl` (at `temperature`) or `mse` ([`KdKind::NAMES`]).
    #[serde(default = "default_kd_loss", deserialize_with = "kd_loss_name")]
    pub loss: String,
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    /// λ.
    #[serde(default = "default_weight")]
    pub weight: f32,
    /// single, ensemble:K, random-subset:K, random-one, or random-one-per-rank (data-parallel
    /// runs: each rank draws its own teacher for its shard; one process: random-one).
    #[serde(default = "default_strategy")]
    pub strategy: String,
    #[serde(default)]
    pub start: f32,
    #[serde(default = "default_stop")]
    pub stop: f32,
    #[serde(default = "default_every")]
    pub every: u64,
    /// A directory of teacher caches (`distill::cache`): the teachers' targets are read from
    /// it instead of running their forwards; steps it lacks are recorded as the run goes
    /// (unless `cache_mode = "read"`). Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<PathBuf>,
    /// Logits kept per row in the cache (default [`DEFAULT_CACHE_K`]; at least the number of
    /// classes keeps every logit, and the loss is then the online one exactly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_k: Option<usize>,
    /// How the cached logits are stored: `bf16` (the default) or `f32`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub cache_values: ValueType,
    /// `record` (the default: read what the cache holds, record the rest) or `read`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub cache_mode: CacheMode,
}

/// The strategy whose draws differ between the ranks of a data-parallel run.
pub const PER_RANK_STRATEGY: &str = "random-one-per-rank";

/// Logits per row a teacher cache keeps unless the recipe says `cache_k`.
pub const DEFAULT_CACHE_K: usize = 10;

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn default_kd_loss() -> String {
    "kl".into()
}

/// `distill.loss`: a name of [`KdKind::NAMES`] (serde's message for a name that is not).
fn kd_loss_name<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    let name = String::deserialize(d)?;
    if KdKind::NAMES.contains(&name.as_str()) {
        Ok(name)
    } else {
        Err(serde::de::Error::unknown_variant(&name, &KdKind::NAMES))
    }
}
fn default_temperature() -> f32 {
    4.0
}
fn default_weight() -> f32 {
    1.0
}
fn default_strategy() -> String {
    "single".into()
}
fn default_stop() -> f32 {
    1.0
}
fn default_every() -> u64 {
    1
}

impl DistillRecipe {
    /// The distillation term `loss` names, at `temperature` for KL.
    pub fn kind(&self) -> Result<KdKind> {
        KdKind::from_name(&self.loss, self.temperature).ok_or_else(|| {
            Error::invalid(
                "recipe",
                format!(
                    "distill.loss {:?} is not one of {:?}",
                    self.loss,
                    KdKind::NAMES
                ),
            )
        })
    }

    pub fn loss(&self) -> Result<KdLoss> {
        Ok(match self.kind()? {
            KdKind::Kl { temperature } => KdLoss::kl(temperature, self.weight),
            KdKind::Mse => KdLoss::mse(self.weight),
        })
    }

    pub fn schedule(&self) -> KdSchedule {
        KdSchedule {
            start: self.start,
            stop: self.stop,
            every: self.every,
        }
    }

    pub fn strategy(&self) -> Result<TeacherStrategy> {
        if self.draws_per_rank() {
            return Ok(TeacherStrategy::RandomOne);
        }
        TeacherStrategy::parse(&self.strategy).map_err(|e| match e {
            Error::Invalid { op, msg } => Error::invalid(
                op,
                format!("{msg} (or random-one-per-rank for data-parallel runs)"),
            ),
            e => e,
        })
    }

    /// Whether each rank of a data-parallel run draws its own teacher (`random-one-per-rank`)
    /// instead of every rank running the same draw.
    pub fn draws_per_rank(&self) -> bool {
        self.strategy == PER_RANK_STRATEGY
    }

    /// Logits kept per row when caching: `cache_k`, else [`DEFAULT_CACHE_K`].
    pub fn cache_k(&self) -> usize {
        self.cache_k.unwrap_or(DEFAULT_CACHE_K)
    }
}

impl Recipe {
    /// Reads and validates a recipe file; errors name the file and the offending field.
    pub fn from_file(path: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml(&text).map_err(|e| match e {
            Error::Invalid { op, msg } => Error::invalid(op, format!("{}: {msg}", path.display())),
            e => e,
        })
    }

    pub fn from_toml(text: &str) -> Result<Recipe> {
        let r: Recipe = toml::from_str(text)
            .map_err(|e| Error::invalid("recipe", format!("not a valid recipe: {e}")))?;
        r.validate()?;
        Ok(r)
    }

    /// The same recipe from JSON (what the Python binding passes for a dict): the fields, their
    /// defaults and the validation are those of the TOML form.
    pub fn from_json(text: &str) -> Result<Recipe> {
        let r: Recipe = serde_json::from_str(text)
            .map_err(|e| Error::invalid("recipe", format!("not a valid recipe: {e}")))?;
        r.validate()?;
        Ok(r)
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self)
            .map_err(|e| Error::invalid("recipe", format!("cannot write as TOML: {e}")))
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid("recipe", msg));
        // The name is a directory inside out_dir: `.` and `..` would put the run's files in
        // out_dir itself or above it.
        if self.name.is_empty()
            || self.name.contains(['/', '\\', '\0'])
            || self.name == "."
            || self.name == ".."
        {
            return bad(format!(
                "name `{}` must be non-empty, not `.` or `..`, and contain no path separators",
                self.name
            ));
        }
        match self.data.dataset.as_str() {
            "fashion-mnist" => {
                if !matches!(self.model, ModelRecipe::Resnet { .. }) {
                    return bad("dataset fashion-mnist needs model kind = \"resnet\"".into());
                }
            }
            "fortunes" => {
                if !matches!(self.model, ModelRecipe::Bert { .. }) {
                    return bad("dataset fortunes needs model kind = \"bert\"".into());
                }
                if self.data.seq_len < 8 {
                    return bad(format!(
                        "data.seq_len {} must be at least 8",
                        self.data.seq_len
                    ));
                }
            }
            "text" => {
                if !matches!(self.model, ModelRecipe::Bert { .. }) {
                    return bad("dataset text needs model kind = \"bert\"".into());
                }
                if self.data.seq_len < 8 {
                    return bad(format!(
                        "data.seq_len {} must be at least 8",
                        self.data.seq_len
                    ));
                }
                if self.data.train.is_empty() || self.data.validation.is_empty() {
                    return bad(
                        "dataset text needs data.train and data.validation: lists of files or \
                         globs (e.g. train = [\"c4-train.*.json.gz\"])"
                            .into(),
                    );
                }
                if self.train.epochs.is_some() {
                    return bad(
                        "dataset text is streamed and its size unknown: give train.samples \
                         (sequences to train on) instead of train.epochs"
                            .into(),
                    );
                }
                if self.data.text_field.as_deref() == Some("") {
                    return bad("data.text_field must name a JSON field".into());
                }
            }
            "image-folder" => {
                if !matches!(self.model, ModelRecipe::Resnet { .. }) {
                    return bad("dataset image-folder needs model kind = \"resnet\"".into());
                }
                if self.data.image_size < 8 {
                    return bad(format!(
                        "data.image_size {} must be at least 8 (224 for ImageNet)",
                        self.data.image_size
                    ));
                }
            }
            other => {
                return bad(format!(
                    "data.dataset `{other}` is not known: use fashion-mnist, image-folder, \
                     fortunes or text"
                ))
            }
        }
        match &self.model {
            ModelRecipe::Resnet { depth, width, .. } => {
                if ![18, 34, 50].contains(depth) {
                    return bad(format!("model.depth {depth} is not one of 18, 34 or 50"));
                }
                if !(*width > 0.0 && width.is_finite()) {
                    return bad(format!("model.width {width} must be a positive number"));
                }
            }
            ModelRecipe::Bert { size, .. } => {
                if !["tiny", "mini", "small", "base"].contains(&size.as_str()) {
                    return bad(format!(
                        "model.size `{size}` is not one of tiny, mini, small or base"
                    ));
                }
            }
        }
        for (field, limit) in [
            ("data.train_limit", self.data.train_limit),
            ("data.eval_limit", self.data.eval_limit),
        ] {
            if limit == Some(0) {
                return bad(format!(
                    "{field} = 0 leaves no examples: give at least 1 (or leave it out for all)"
                ));
            }
        }
        if self.train.batch_size == 0 {
            return bad("train.batch_size must be at least 1".into());
        }
        let vf = self.data.validation_fraction;
        if !(0.0..0.5).contains(&vf) {
            return bad(format!(
                "data.validation_fraction {vf} must be in [0, 0.5): the share of the training \
                 data held out for validation (0.1 holds out 10%, 0 none)"
            ));
        }
        match (self.train.epochs, self.train.samples) {
            (Some(e), None) if e > 0.0 && e.is_finite() => {}
            (None, Some(s)) if s > 0 => {}
            (Some(_), Some(_)) => return bad("give train.epochs or train.samples, not both".into()),
            _ => return bad("train.epochs or train.samples must be given and positive".into()),
        }
        if self.train.evals == 0 {
            return bad("train.evals must be at least 1".into());
        }
        if let Some(c) = self.train.clip_grad_norm {
            if !(c > 0.0 && c.is_finite()) {
                return bad(format!(
                    "train.clip_grad_norm {c} must be a positive number (or left out: no clipping)"
                ));
            }
        }
        let o = &self.optimizer;
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            return bad(format!("optimizer.lr {} must be positive", o.lr));
        }
        if !(0.0..1.0).contains(&o.warmup) {
            return bad(format!(
                "optimizer.warmup {} must be a fraction in [0, 1)",
                o.warmup
            ));
        }
        if !(0.0..1.0).contains(&o.momentum) {
            return bad(format!(
                "optimizer.momentum {} must be in [0, 1)",
                o.momentum
            ));
        }
        if o.nesterov && o.momentum == 0.0 {
            return bad("optimizer.nesterov needs optimizer.momentum above 0".into());
        }
        if !(o.weight_decay >= 0.0 && o.weight_decay.is_finite()) {
            return bad(format!(
                "optimizer.weight_decay {} must be a number at least 0",
                o.weight_decay
            ));
        }
        for (field, beta) in [
            ("optimizer.betas[0]", o.betas.0),
            ("optimizer.betas[1]", o.betas.1),
        ] {
            if !(0.0..1.0).contains(&beta) {
                return bad(format!("{field} {beta} must be in [0, 1)"));
            }
        }
        if !(o.eps > 0.0 && o.eps.is_finite()) {
            return bad(format!("optimizer.eps {} must be a positive number", o.eps));
        }
        if !(o.final_lr >= 0.0 && o.final_lr.is_finite()) {
            return bad(format!(
                "optimizer.final_lr {} must be a number at least 0",
                o.final_lr
            ));
        }
        if let Some(d) = &self.distill {
            if d.teachers.is_empty() {
                return bad("distill.teachers is empty: list teacher run directories".into());
            }
            if !(d.temperature > 0.0 && d.temperature.is_finite()) {
                return bad(format!(
                    "distill.temperature {} must be a positive number",
                    d.temperature
                ));
            }
            if !(d.weight >= 0.0 && d.weight.is_finite()) {
                return bad(format!(
                    "distill.weight {} must be a number at least 0",
                    d.weight
                ));
            }
            if !(0.0 <= d.start && d.start <= d.stop && d.stop <= 1.0) {
                return bad(format!(
                    "distill.start {} and distill.stop {} must satisfy 0 <= start <= stop <= 1",
                    d.start, d.stop
                ));
            }
            if d.every == 0 {
                return bad("distill.every must be at least 1".into());
            }
            if d.cache_k == Some(0) {
                return bad("distill.cache_k must be at least 1".into());
            }
            if d.cache.is_none()
                && (d.cache_k.is_some()
                    || d.cache_values != ValueType::default()
                    || d.cache_mode != CacheMode::default())
            {
                return bad(
                    "distill.cache_k, cache_values and cache_mode need distill.cache (the cache \
                     directory)"
                        .into(),
                );
            }
            d.loss()?.validate()?;
            d.schedule().validate()?;
            d.strategy().map_err(|e| match e {
                Error::Invalid { msg, .. } => {
                    Error::invalid("recipe", format!("distill.strategy: {msg}"))
                }
                e => e,
            })?;
        }
        Ok(())
    }

    /// The method label used in reports: `baseline`, `kd-kl`, `kd-mse`, `random-one`, ...
    pub fn method(&self) -> String {
        if let Some(label) = &self.label {
            return label.clone();
        }
        match &self.distill {
            None => "baseline".into(),
            Some(d) => {
                let loss = match d.kind() {
                    Ok(KdKind::Kl { temperature }) => format!("kl-t{temperature}"),
                    _ => d.loss.clone(),
                };
                let mut m = if d.strategy == "single" {
                    format!("kd-{loss}")
                } else {
                    format!("kd-{loss}-{}", d.strategy.replace(':', ""))
                };
                if d.start > 0.0 || d.stop < 1.0 {
                    m.push_str(&format!("-until{}", d.stop));
                }
                m
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "kd"
[model]
kind = "resnet"
width = 0.25
[data]
dataset = "fashion-mnist"
train_limit = 1000
[train]
batch_size = 64
epochs = 2.0
[optimizer]
kind = "sgdw"
lr = 0.4
warmup = 0.1
[distill]
teachers = ["runs/t1", "runs/t2"]
strategy = "random-one"
"#;

    /// `distill.loss` names the engine's term; another name gets serde's own message.
    #[test]
    fn the_loss_name_maps_onto_the_engines_term() {
        let d = Recipe::from_toml(GOOD).unwrap().distill.unwrap();
        assert_eq!(d.kind().unwrap(), KdKind::Kl { temperature: 4.0 });
        let mse = GOOD.replace("strategy", "loss = \"mse\"\nstrategy");
        let r = Recipe::from_toml(&mse).unwrap();
        assert_eq!(r.distill.as_ref().unwrap().kind().unwrap(), KdKind::Mse);
        assert_eq!(r.method(), "kd-mse-random-one");
        assert_eq!(Recipe::from_toml(&r.to_toml().unwrap()).unwrap(), r);
        let bad = GOOD.replace("strategy", "loss = \"kd\"\nstrategy");
        let e = Recipe::from_toml(&bad).unwrap_err().to_string();
        assert!(
            e.contains("unknown variant `kd`, expected `kl` or `mse`"),
            "{e}"
        );
    }

    #[test]
    fn parses_with_defaults_and_round_trips() {
        let r = Recipe::from_toml(GOOD).unwrap();
        assert_eq!(r.optimizer.momentum, 0.875);
        assert_eq!(r.distill.as_ref().unwrap().temperature, 4.0);
        assert_eq!(r.method(), "kd-kl-t4-random-one");
        let again = Recipe::from_toml(&r.to_toml().unwrap()).unwrap();
        assert_eq!(r, again);
    }

    #[test]
    fn random_one_per_rank_draws_one_teacher_per_rank() {
        let r =
            Recipe::from_toml(&GOOD.replace("\"random-one\"", "\"random-one-per-rank\"")).unwrap();
        let d = r.distill.as_ref().unwrap();
        assert!(d.draws_per_rank());
        assert_eq!(d.strategy().unwrap(), TeacherStrategy::RandomOne);
        assert_eq!(r.method(), "kd-kl-t4-random-one-per-rank");
        assert!(!Recipe::from_toml(GOOD)
            .unwrap()
            .distill
            .unwrap()
            .draws_per_rank());
        let err = Recipe::from_toml(&GOOD.replace("\"random-one\"", "\"random-two-per-rank\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("random-one-per-rank"), "{err}");
    }

    #[test]
    fn json_gives_the_recipe_toml_gives() {
        let json = r#"{"name": "kd", "model": {"kind": "resnet", "width": 0.25},
            "data": {"dataset": "fashion-mnist", "train_limit": 1000},
            "train": {"batch_size": 64, "epochs": 2.0},
            "optimizer": {"kind": "sgdw", "lr": 0.4, "warmup": 0.1},
            "distill": {"teachers": ["runs/t1", "runs/t2"], "strategy": "random-one"}}"#;
        assert_eq!(
            Recipe::from_json(json).unwrap(),
            Recipe::from_toml(GOOD).unwrap()
        );
        let err = Recipe::from_json(&json.replace("0.4", "-1.0"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("optimizer.lr"), "{err}");
        let err = Recipe::from_json("{\"name\": 3}").unwrap_err().to_string();
        assert!(err.contains("not a valid recipe"), "{err}");
    }

    #[test]
    fn device_and_activations_parse_with_defaults() {
        let r = Recipe::from_toml(GOOD).unwrap();
        assert_eq!((r.device, r.activations), (Device::Cpu, Activations::F32));
        assert_eq!(r.activations.dtype(), DType::F32);
        let with = |lines: &str| Recipe::from_toml(&format!("{lines}\n{GOOD}"));
        for (text, device) in [
            ("device = \"cpu\"", Device::Cpu),
            ("device = \"CPU\"", Device::Cpu),
            ("device = \"cuda\"", Device::Cuda(0)),
            ("device = \"cuda:0\"", Device::Cuda(0)),
            ("device = \"cuda:3\"", Device::Cuda(3)),
        ] {
            // Only the spelling is checked: a GPU recipe reads on a machine without one.
            let r = with(text).unwrap();
            assert_eq!(r.device, device, "{text}");
            let again = Recipe::from_toml(&r.to_toml().unwrap()).unwrap();
            assert_eq!(again, r, "{text}");
        }
        let r = with("activations = \"bf16\"").unwrap();
        assert_eq!(r.activations, Activations::Bf16);
        assert_eq!(r.activations.dtype(), DType::BF16);
        let toml = r.to_toml().unwrap();
        assert!(toml.contains("activations = \"bf16\""), "{toml}");
        assert!(toml.contains("device = \"cpu\""), "{toml}");
        // A cuda recipe written back says which GPU.
        let toml = with("device = \"cuda\"").unwrap().to_toml().unwrap();
        assert!(toml.contains("device = \"cuda:0\""), "{toml}");
        // JSON (the Python binding's dicts) reads the same fields.
        let json = r#"{"name": "kd", "device": "cuda:1", "activations": "bf16",
            "model": {"kind": "resnet"}, "data": {"dataset": "fashion-mnist"},
            "train": {"batch_size": 64, "epochs": 2.0},
            "optimizer": {"kind": "sgdw", "lr": 0.4}}"#;
        let r = Recipe::from_json(json).unwrap();
        assert_eq!(
            (r.device, r.activations),
            (Device::Cuda(1), Activations::Bf16)
        );
    }

    #[test]
    fn bad_devices_and_activations_name_the_file_and_the_value() {
        let dir =
            std::env::temp_dir().join(format!("recycle-recipe-device-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (line, needles) in [
            ("device = \"gpu\"", &["`gpu`", "\"cuda:N\""][..]),
            ("device = \"cuda:x\"", &["`cuda:x`", "\"cpu\""][..]),
            ("device = \"cuda:\"", &["`cuda:`"][..]),
            ("device = \"cuda:-1\"", &["`cuda:-1`"][..]),
            ("device = 0", &["device"][..]),
            ("activations = \"fp16\"", &["fp16", "f32", "bf16"][..]),
        ] {
            let path = dir.join("bad.toml");
            std::fs::write(&path, format!("{line}\n{GOOD}")).unwrap();
            let err = Recipe::from_file(&path).unwrap_err().to_string();
            assert!(err.contains(&path.display().to_string()), "{line}: {err}");
            for needle in needles {
                assert!(err.contains(needle), "{line}: {needle}: {err}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(parse_device_name(" cuda:2 ").unwrap(), Device::Cuda(2));
        let err = parse_device_name("tpu").unwrap_err().to_string();
        assert!(err.contains("`tpu`") && err.contains("cuda:0"), "{err}");
    }

    #[test]
    fn bad_values_are_errors_naming_the_field() {
        let cases = [
            (GOOD.replace("lr = 0.4", "lr = -1.0"), "optimizer.lr"),
            (
                GOOD.replace("epochs = 2.0", "epochs = 2.0\nsamples = 5"),
                "not both",
            ),
            (GOOD.replace("random-one", "best-two"), "best-two"),
            (GOOD.replace("fashion-mnist", "imagenet"), "imagenet"),
            (GOOD.replace("width = 0.25", "widht = 0.25"), "widht"),
            (
                GOOD.replace("batch_size = 64", "batch_size = 0"),
                "batch_size",
            ),
        ];
        for (text, needle) in cases {
            let err = Recipe::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }
}
