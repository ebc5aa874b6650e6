//! The trainer: runs one recipe (a baseline or a distilled student) end to end.
//!
//! data → student forward (and, on distilled steps, the selected teachers' forwards) → fused
//! loss → backward → optimizer, with evaluations spread over the run, a JSONL log
//! (`log.jsonl`: step, samples, training seconds, lr, losses, teacher forwards, evaluation),
//! resumable checkpoints written atomically (`checkpoint.safetensors`: model, optimizer state
//! and the step), the final weights (`final.safetensors`) and `summary.json`.
//!
//! The recipe's `device` ([`open_device`]) holds the student, its optimizer state and the
//! teachers; the loader builds batches on the CPU and each step uploads its own (see
//! `docs/cuda.md`).
//!
//! Everything random is a function of `(seed, step)` — data order, MLM masks, dropout, teacher
//! sampling — so `resume` continues a stopped run to the same weights bit for bit (on the CPU).
//! A non-finite loss stops the run with an error naming the step; the last checkpoint, written
//! before it, stays intact.
//!
//! [`Trainer`] runs a recipe one step at a time (services drive it through the C ABI, reading
//! its metrics and checkpointing between steps), each step's batch pulled from the recipe's
//! data set or handed over by the caller ([`caller`]: the same step either way); [`run`] is a
//! loop over it.

pub mod cache_build;
pub mod caller;
pub mod interrupt;
pub mod lock;
pub mod model;
mod ranks;
mod resume;
mod runner;
pub mod step;
pub mod teacher_cache;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use recycle_engine::optim::{AdamW, LrSchedule, Optimizer, Sgdw};
use recycle_engine::{DType, Device, Error, Result, Tape};
use recycle_models::hf_config::read_bert_config;
use recycle_models::{Bert, BertConfig, HeadInit, MlmBatch, ResNetConfig};

use crate::data::text_shards::{self, ShardFormat};
use crate::data::text_stream::{sample_documents, TextShards};
use crate::data::{self, BatchSource, ImageSource, Loader, LoaderConfig, MlmDataset, Split};
use crate::distill::TeacherEntry;
use crate::experiments::runlog::RunSummary;
use crate::recipe::{Activations, InitHead, ModelRecipe, OptimizerKind, Recipe, ScheduleKind};
pub use cache_build::{cache_teacher, CacheBuild};
pub use caller::{check_batch, BatchEval, StepReport, IGNORE_LABEL};
pub use model::{Architecture, Batch, Model};
pub use runner::{Trainer, TrainerMetrics};
pub use step::{
    forward_backward, train_step, train_step_guarded, train_step_with, NonFinite, Recorder,
    StepGuard, StepOutput, Teachers,
};

/// How a run is started.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the run directory's checkpoint.
    pub resume: bool,
    /// Replace an existing run directory's results instead of refusing to start.
    pub overwrite: bool,
    /// Draw a progress bar (only shown on a terminal).
    pub progress: bool,
    /// Stop after this many steps (as if interrupted): for tests of resume.
    pub stop_after: Option<u64>,
    /// Return the summary of a finished run whose recorded recipe equals this one instead of
    /// training it again (sweeps and demos reuse teachers and baselines).
    pub reuse_finished: bool,
}

pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
pub const FINAL_FILE: &str = "final.safetensors";
pub const LOG_FILE: &str = "log.jsonl";
/// The recipe a run was started with, which `--resume` checks the given one against.
pub const RECIPE_FILE: &str = "recipe.toml";
pub use crate::experiments::runlog::SUMMARY_FILE;

/// The data of a run, loaded once: the training set, the validation split held out of the
/// training data (for choosing; empty when `data.validation_fraction` is 0) and the test split
/// (`eval`, for reporting).
pub enum TaskData {
    Images {
        train: Arc<ImageSource>,
        validation: Arc<ImageSource>,
        eval: Arc<ImageSource>,
    },
    Text {
        train: TextTrain,
        validation: Arc<MlmDataset>,
        eval: Arc<MlmDataset>,
        vocab_size: usize,
    },
}

/// The training set of a text run: packed in memory (the fortunes) or streamed from shards.
#[derive(Clone)]
pub enum TextTrain {
    Packed(Arc<MlmDataset>),
    Stream(Arc<TextShards>),
}

/// Text shards: sequences of the validation files kept for evaluation when `data.eval_limit`
/// is not set (for each of the validation and test splits).
const TEXT_EVAL_DEFAULT: usize = 10_000;
/// Text shards without a tokenizer: the documents a WordPiece vocabulary is trained on.
const TOKENIZER_SAMPLE_DOCS: usize = 20_000;
const TOKENIZER_SAMPLE_BYTES: usize = 16 << 20;

/// Every `TEXT_TEST_EVERY`-th corpus text is a test text (5%, spread over the corpus).
const TEXT_TEST_EVERY: usize = 20;

/// Which evaluation split a metric is computed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalSplit {
    /// Held out of the training data: what sweeps and searches choose on.
    Validation,
    /// The data set's test split: reported, never chosen on.
    Test,
}

impl TaskData {
    /// Loads the data a recipe asks for. Text runs share one tokenizer per output directory
    /// (`<out_dir>/tokenizer-<vocab>.json`), so teachers and students agree on token ids.
    pub fn load(recipe: &Recipe) -> Result<TaskData> {
        let d = &recipe.data;
        match d.dataset.as_str() {
            "fashion-mnist" => {
                let all = data::load_fashion_mnist(d.dir.as_deref(), Split::Train, d.train_limit)?;
                let (train, mut validation) =
                    data::validation::split_images(all, d.validation_fraction);
                if let Some(n) = d.eval_limit {
                    let n = n.min(validation.len());
                    validation.images.truncate(n * validation.image_size());
                    validation.labels.truncate(n);
                }
                Ok(TaskData::Images {
                    train: Arc::new(ImageSource::Memory(train)),
                    validation: Arc::new(ImageSource::Memory(validation)),
                    eval: Arc::new(ImageSource::Memory(data::load_fashion_mnist(
                        d.dir.as_deref(),
                        Split::Test,
                        d.eval_limit,
                    )?)),
                })
            }
            "image-folder" => image_folder_data(recipe),
            "fortunes" => {
                let texts = data::load_fortunes(d.dir.as_deref())?;
                let tokenizer = match &d.tokenizer {
                    Some(path) => data::TextTokenizer::from_file(path)?,
                    None => {
                        std::fs::create_dir_all(&recipe.out_dir)
                            .map_err(|e| Error::io(&recipe.out_dir, e))?;
                        let path = recipe
                            .out_dir
                            .join(format!("tokenizer-{}.json", d.vocab_size));
                        data::TextTokenizer::load_or_train(&path, &texts, d.vocab_size)?
                    }
                };
                let (train, validation, test) =
                    data::validation::split_texts(&texts, TEXT_TEST_EVERY, d.validation_fraction);
                // A fixed data seed: every run of a comparison sees the same evaluation masks.
                let pack = |texts: &[&str], limit: Option<usize>| -> Result<MlmDataset> {
                    let (mut ds, _) = MlmDataset::build(texts, &tokenizer, d.seq_len, 0, 0)?;
                    truncate_mlm(&mut ds, limit);
                    Ok(ds)
                };
                Ok(TaskData::Text {
                    train: TextTrain::Packed(Arc::new(pack(&train, d.train_limit)?)),
                    validation: Arc::new(pack(&validation, d.eval_limit)?),
                    eval: Arc::new(pack(&test, d.eval_limit)?),
                    vocab_size: tokenizer.vocab_size(),
                })
            }
            "text" => load_text_shards(recipe),
            other => Err(Error::invalid(
                "TaskData::load",
                format!("unknown data set `{other}`"),
            )),
        }
    }

    /// Items in the validation split (0: the run keeps none).
    pub fn validation_len(&self) -> usize {
        match self {
            TaskData::Images { validation, .. } => validation.len(),
            TaskData::Text { validation, .. } => BatchSource::len(&**validation),
        }
    }

    pub fn train_len(&self) -> usize {
        match self {
            TaskData::Images { train, .. } => train.len(),
            TaskData::Text {
                train: TextTrain::Packed(train),
                ..
            } => BatchSource::len(&**train),
            // A stream's size is unknown (its recipes give train.samples).
            TaskData::Text {
                train: TextTrain::Stream(_),
                ..
            } => usize::MAX,
        }
    }

    pub fn metric(&self) -> &'static str {
        match self {
            TaskData::Images { .. } => "accuracy",
            TaskData::Text { .. } => "mlm-accuracy",
        }
    }
}

/// The text shards of a `dataset = "text"` recipe: the training files streamed; the first
/// sequences of the validation files split between the validation split (every sequence whose
/// share of `validation_fraction` ticks over) and the test split (the others), each capped at
/// `eval_limit` (default [`TEXT_EVAL_DEFAULT`]). Without `tokenizer`, a WordPiece vocabulary is
/// trained on the first documents of the training files and kept in `out_dir`, named by the
/// vocabulary size and the files, so every run on the same shards shares it.
fn load_text_shards(recipe: &Recipe) -> Result<TaskData> {
    let d = &recipe.data;
    let base = d.dir.as_deref();
    let train_files = text_shards::resolve(&d.train, base)?;
    let validation_files = text_shards::resolve(&d.validation, base)?;
    let format = ShardFormat {
        text_field: d.text_field.clone().unwrap_or_else(|| "text".into()),
        plain: d.documents.unwrap_or_default(),
    };
    let tokenizer = match &d.tokenizer {
        Some(path) => data::TextTokenizer::from_file(path)?,
        None => {
            std::fs::create_dir_all(&recipe.out_dir).map_err(|e| Error::io(&recipe.out_dir, e))?;
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for f in &train_files {
                for b in f.to_string_lossy().bytes().chain([0]) {
                    h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
                }
            }
            let path = recipe
                .out_dir
                .join(format!("tokenizer-{}-{h:016x}.json", d.vocab_size));
            let texts = if path.exists() {
                Vec::new()
            } else {
                sample_documents(
                    &train_files,
                    &format,
                    TOKENIZER_SAMPLE_DOCS,
                    TOKENIZER_SAMPLE_BYTES,
                )?
            };
            if texts.is_empty() && !path.exists() {
                return Err(Error::invalid(
                    "data.train",
                    format!(
                        "the training files (first {}) hold no text to train a tokenizer on",
                        train_files[0].display()
                    ),
                ));
            }
            data::TextTokenizer::load_or_train(&path, &texts, d.vocab_size)?
        }
    };
    let shards = |files: Vec<PathBuf>, seed: u64| TextShards {
        files,
        format: format.clone(),
        tokenizer: tokenizer.clone(),
        seq_len: d.seq_len,
        packing: d.packing.unwrap_or_default(),
        seed,
    };
    let cap = d.eval_limit.unwrap_or(TEXT_EVAL_DEFAULT);
    // A fixed data seed for the held-out sequences: every run of a comparison sees the same
    // evaluation masks.
    let held = shards(validation_files, 0);
    let (validation, test) = held.split_held_out(d.validation_fraction, cap)?;
    if test.is_empty() {
        return Err(Error::invalid(
            "data.validation",
            format!(
                "the validation files (first {}) hold no text for the test split",
                held.files[0].display()
            ),
        ));
    }
    Ok(TaskData::Text {
        train: TextTrain::Stream(Arc::new(shards(train_files, recipe.seed))),
        validation: Arc::new(validation),
        eval: Arc::new(test),
        vocab_size: tokenizer.vocab_size(),
    })
}

/// An image folder's splits (see `data::image_folder`); `data.dir` (or `--data`) names it.
fn image_folder_data(recipe: &Recipe) -> Result<TaskData> {
    let d = &recipe.data;
    let root = d.dir.as_deref().ok_or_else(|| {
        Error::invalid(
            "recipe",
            "dataset image-folder needs data.dir (or `recycle train RECIPE --data DIR`): the \
             folder holding train/<class>/* and val/<class>/*"
                .to_string(),
        )
    })?;
    let splits = data::image_folder::open_splits(&data::image_folder::FolderRequest {
        root,
        options: data::image_folder::FolderOptions {
            image_size: d.image_size,
            skip_bad: d.skip_bad,
            decode_threads: d.decode_threads,
            max_pixels: data::image_decode::MAX_PIXELS,
        },
        seed: recipe.seed,
        batch_size: recipe.train.batch_size,
        train_limit: d.train_limit,
        eval_limit: d.eval_limit,
        validation_fraction: d.validation_fraction,
    })?;
    Ok(TaskData::Images {
        train: Arc::new(ImageSource::Folder(splits.train)),
        validation: Arc::new(ImageSource::Folder(splits.validation)),
        eval: Arc::new(ImageSource::Folder(splits.test)),
    })
}

fn truncate_mlm(d: &mut MlmDataset, limit: Option<usize>) {
    if let Some(n) = limit {
        let keep = n.min(d.input_ids.len() / d.seq_len) * d.seq_len;
        d.input_ids.truncate(keep);
        d.attention_mask.truncate(keep);
    }
}

/// The model architecture a recipe describes, given its data.
pub fn architecture(recipe: &Recipe, data: &TaskData) -> Result<Architecture> {
    match (&recipe.model, data) {
        (
            ModelRecipe::Resnet {
                depth,
                width,
                small_stem,
            },
            TaskData::Images { train, .. },
        ) => {
            let c = ResNetConfig {
                depth: *depth,
                num_classes: train.classes(),
                in_channels: train.channels(),
                small_stem: *small_stem,
                width: *width,
            };
            c.validate()?;
            Ok(Architecture::ResNet(c))
        }
        (
            ModelRecipe::Bert {
                config: None, size, ..
            },
            TaskData::Text { vocab_size, .. },
        ) => {
            let mut c = BertConfig::by_name(size, *vocab_size)?;
            c.max_position_embeddings = c.max_position_embeddings.max(recipe.data.seq_len);
            c.validate()?;
            Ok(Architecture::Bert(c))
        }
        (
            ModelRecipe::Bert {
                config: Some(path), ..
            },
            TaskData::Text { vocab_size, .. },
        ) => {
            let c = read_bert_config(path)?;
            let bad = |msg: String| Err(Error::checkpoint(path, msg));
            if c.vocab_size < *vocab_size {
                return bad(format!(
                    "vocab_size {} is smaller than the tokenizer's {} ids: use the tokenizer                      this model was trained with (data.tokenizer)",
                    c.vocab_size, vocab_size
                ));
            }
            if c.max_position_embeddings < recipe.data.seq_len {
                return bad(format!(
                    "max_position_embeddings {} is below data.seq_len {}: shorten the sequences",
                    c.max_position_embeddings, recipe.data.seq_len
                ));
            }
            Ok(Architecture::Bert(c))
        }
        _ => Err(Error::invalid(
            "recipe",
            "the model does not fit the data set (ResNet for images, BERT for text)".to_string(),
        )),
    }
}

/// The student a run starts from: fresh from the recipe's seed, or (BERT with `model.init`) a
/// checkpoint of any Hugging Face layout, what it left out said once on standard error; in the
/// recipe's compute dtype.
pub fn initial_student(recipe: &Recipe, arch: &Architecture) -> Result<Model> {
    let model = match (&recipe.model, arch) {
        (
            ModelRecipe::Bert {
                init: Some(path),
                init_head,
                ..
            },
            Architecture::Bert(c),
        ) => {
            let head = match init_head {
                Some(InitHead::Fresh) => HeadInit::Fresh,
                _ => HeadInit::FromFile,
            };
            let (bert, report) = Bert::from_pretrained(c.clone(), path, head, recipe.seed)?;
            eprintln!("{}: student from {}", recipe.name, report.describe(path));
            Model::Bert(bert)
        }
        _ => Model::new(arch, recipe.seed)?,
    };
    match recipe.activations {
        Activations::F32 => Ok(model),
        Activations::Bf16 => model.with_activations(DType::BF16),
    }
}

/// Training steps of a recipe over `train_len` examples.
pub fn total_steps(recipe: &Recipe, train_len: usize) -> Result<u64> {
    let samples = match (recipe.train.epochs, recipe.train.samples) {
        (Some(e), _) => (e * train_len as f64).round() as u64,
        (_, Some(s)) => s,
        _ => 0,
    };
    let steps = samples / recipe.train.batch_size as u64;
    if steps == 0 || train_len < recipe.train.batch_size {
        return Err(Error::invalid(
            "recipe",
            format!(
                "{samples} samples from {train_len} examples make no full batch of {}: \
                 train longer or use a smaller batch",
                recipe.train.batch_size
            ),
        ));
    }
    Ok(steps)
}

fn make_optimizer(recipe: &Recipe, num_params: usize) -> Result<Box<dyn Optimizer + Send>> {
    let o = &recipe.optimizer;
    Ok(match o.kind {
        OptimizerKind::Sgdw => Box::new(Sgdw::new(
            num_params,
            o.momentum,
            0.0,
            o.weight_decay,
            o.nesterov,
            o.lr as f64,
        )?),
        // Decoupled as in Composer's DecoupledAdamW (the paper's): the decay per step is
        // weight_decay * lr / base_lr, which is PyTorch's AdamW with weight_decay / base_lr.
        OptimizerKind::Adamw => Box::new(AdamW::new(
            num_params,
            o.betas.0,
            o.betas.1,
            o.eps,
            o.weight_decay / o.lr as f64,
        )?),
    })
}

fn make_schedule(recipe: &Recipe, total: u64) -> Result<LrSchedule> {
    let o = &recipe.optimizer;
    match o.schedule {
        ScheduleKind::Cosine => {
            LrSchedule::warmup_cosine_fraction(o.lr, o.warmup, total, o.final_lr)
        }
        ScheduleKind::Linear => {
            LrSchedule::warmup_linear_decay_fraction(o.lr, o.warmup, total, o.final_lr)
        }
        ScheduleKind::Constant => LrSchedule::constant(o.lr),
    }
}

/// The checkpoint file of a teacher a recipe names: a run directory's `final.safetensors`, or
/// the file itself.
pub fn teacher_checkpoint(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.join(FINAL_FILE)
    } else {
        p.to_path_buf()
    }
}

/// Loads the teachers a recipe names: run directories (their `final.safetensors`, ranked by
/// the validation metric of their `summary.json`, never the test one; a run without it ranks
/// as given) or checkpoint files. Each is loaded on the CPU as a
/// frozen teacher (weights in bf16, BatchNorm folded), computing in `activations` when given
/// (else in its input's type), then moved to `device`.
pub fn load_teachers(
    paths: &[PathBuf],
    arch: &Architecture,
    device: Device,
    activations: Option<DType>,
) -> Result<Vec<TeacherEntry<Model>>> {
    paths
        .iter()
        .map(|p| {
            let file = teacher_checkpoint(p);
            let dir = if p.is_dir() {
                p.clone()
            } else {
                p.parent().unwrap_or(Path::new(".")).to_path_buf()
            };
            if !file.exists() {
                return Err(Error::io(
                    &file,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "teacher checkpoint not found; train it first (recycle sweep)",
                    ),
                ));
            }
            let accuracy = RunSummary::read(&dir)
                .ok()
                .and_then(|s| s.final_validation)
                .unwrap_or(0.0);
            Ok(TeacherEntry {
                name: p.display().to_string(),
                accuracy,
                model: {
                    let t = Model::load_teacher(arch, &file, DType::BF16)?;
                    match activations {
                        Some(dtype) => t.with_activations(dtype)?,
                        None => t,
                    }
                    .to_device(device)?
                },
            })
        })
        .collect()
}

/// Opens the device `recipe` trains on and names it for the summary: `cpu`, or the GPU's
/// ordinal and name (`cuda:0 NVIDIA H200`). A GPU that cannot be used here (a build without
/// the `cuda` feature, no NVIDIA driver, no such GPU, ...) is an error with the engine's
/// account of what is missing, the run's name and the setting; nothing has been written then.
pub fn open_device(recipe: &Recipe) -> Result<(Device, String)> {
    match recipe.device {
        Device::Cpu => Ok((Device::Cpu, "cpu".to_string())),
        Device::Cuda(n) => match recycle_engine::cuda::device_info(n) {
            Ok(info) => Ok((Device::Cuda(n), format!("cuda:{n} {}", info.name))),
            Err(e) => {
                let why = match e {
                    Error::Device(m) => m,
                    e => e.to_string(),
                };
                Err(Error::Device(format!(
                    "run `{}` has device = \"cuda:{n}\": {why}; to train on the CPU instead, \
                     set device = \"cpu\" (or pass --device cpu)",
                    recipe.name
                )))
            }
        },
    }
}

/// Converts a loader batch into the model's batch.
fn image_batch(b: data::ImageBatch) -> Batch {
    Batch::Image {
        x: b.x,
        labels: b.labels,
    }
}

fn mlm_batch(b: data::MlmBatch) -> Result<Batch> {
    Ok(Batch::Mlm(MlmBatch::from_position_labels(
        b.input_ids,
        Some(b.token_type_ids),
        b.attention_mask,
        &b.position_labels,
    )?))
}

/// Evaluation metric of `model` on the test split: top-1 accuracy for images, masked-token
/// accuracy for MLM (fixed masks). See [`evaluate_on`].
pub fn evaluate(model: &Model, data: &TaskData, batch_size: usize) -> Result<f32> {
    evaluate_on(model, data, EvalSplit::Test, batch_size)
}

/// Evaluation metric of `model` on `split`. The loader builds each batch on the CPU; it is
/// uploaded to the model's device, and the logits come back in one copy per batch (the labels
/// never leave the host). An empty split is an error naming the setting to raise.
pub fn evaluate_on(
    model: &Model,
    data: &TaskData,
    split: EvalSplit,
    batch_size: usize,
) -> Result<f32> {
    let device = model.device();
    let (mut correct, mut total) = (0usize, 0usize);
    let mut score = |batch: Batch| -> Result<()> {
        let labels = batch.labels().to_vec::<i32>()?;
        let logits = model.logits(&Tape::inference(), &batch.to_device(device)?, false, 0)?;
        let (rows, classes) = (logits.shape()[0], logits.shape()[1]);
        let t = logits.tensor();
        correct += if t.device().is_cpu() && t.dtype() == DType::F32 {
            count_correct(&t.read_f32()?, classes, &labels)
        } else {
            count_correct(&t.to_vec_f32()?, classes, &labels)
        };
        total += rows;
        Ok(())
    };
    let test = split == EvalSplit::Test;
    match data {
        TaskData::Images {
            validation, eval, ..
        } => {
            let set = if test { eval } else { validation };
            for b in Loader::new(set.clone(), LoaderConfig::eval(batch_size), 0)? {
                score(image_batch(b?))?;
            }
        }
        TaskData::Text {
            validation, eval, ..
        } => {
            let set = if test { eval } else { validation };
            for b in Loader::new(set.clone(), LoaderConfig::eval(batch_size), 0)? {
                score(mlm_batch(b?)?)?;
            }
        }
    }
    if total == 0 {
        let what = if test {
            "the test split is empty: raise data.eval_limit"
        } else {
            "the validation split is empty: raise data.validation_fraction (or data.eval_limit)"
        };
        return Err(Error::invalid("evaluate", what.to_string()));
    }
    Ok(correct as f32 / total as f32)
}

/// The metric of always predicting the test split's most frequent label: the floor a model
/// has not left while its accuracy sits there (for MLM, the most frequent masked token).
pub fn majority_floor(data: &TaskData) -> Result<f32> {
    let mut counts: std::collections::HashMap<i32, usize> = std::collections::HashMap::new();
    let mut add = |batch: Batch| -> Result<()> {
        for l in batch.labels().to_vec::<i32>()? {
            *counts.entry(l).or_default() += 1;
        }
        Ok(())
    };
    match data {
        TaskData::Images { eval, .. } => {
            for b in Loader::new(eval.clone(), LoaderConfig::eval(256), 0)? {
                add(image_batch(b?))?;
            }
        }
        TaskData::Text { eval, .. } => {
            for b in Loader::new(eval.clone(), LoaderConfig::eval(256), 0)? {
                add(mlm_batch(b?)?)?;
            }
        }
    }
    let total: usize = counts.values().sum();
    let most = counts.values().copied().max().unwrap_or(0);
    if total == 0 {
        return Err(Error::invalid(
            "majority_floor",
            "the test split is empty: raise data.eval_limit".to_string(),
        ));
    }
    Ok(most as f32 / total as f32)
}

/// Rows of `logits` (`classes` wide) whose first maximum is at the row's label.
fn count_correct(logits: &[f32], classes: usize, labels: &[i32]) -> usize {
    logits
        .chunks_exact(classes)
        .zip(labels)
        .filter(|(row, &label)| {
            let best = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                )
                .0;
            best as i32 == label
        })
        .count()
}

/// Steps after which an evaluation runs: `evals` of them, evenly spaced, the last at the end.
pub fn eval_steps(total: u64, evals: u64) -> Vec<u64> {
    let evals = evals.min(total).max(1);
    (1..=evals).map(|i| (i * total).div_ceil(evals)).collect()
}

/// Runs `recipe` and returns its summary. The run directory is `<out_dir>/<name>`. A loop
/// over [`Trainer`]: see it for the files a run writes.
pub fn run(recipe: &Recipe, opts: &RunOptions) -> Result<RunSummary> {
    recipe.validate()?;
    if opts.reuse_finished && !opts.resume {
        if let Some(summary) = finished_run(&recipe.out_dir.join(&recipe.name), recipe)? {
            return Ok(summary);
        }
    }
    let mut trainer = Trainer::new(recipe, opts)?;
    let stop_at = opts
        .stop_after
        .map_or(trainer.total_steps(), |s| s.min(trainer.total_steps()));
    while trainer.current_step() < stop_at {
        // SIGINT / SIGTERM (see `interrupt`): a checkpoint, then an error saying how to go on.
        if let Some(signal) = interrupt::stop_requested() {
            let why = format!("interrupted by {}", interrupt::signal_name(signal));
            return Err(trainer.stop(&why));
        }
        trainer.step()?;
    }
    trainer.finish()
}

/// The summary of the run in `dir` when it finished with exactly `recipe`.
fn finished_run(dir: &Path, recipe: &Recipe) -> Result<Option<RunSummary>> {
    let (summary, recorded) = (dir.join("summary.json"), dir.join("recipe.toml"));
    if !summary.exists() || !recorded.exists() || !dir.join(FINAL_FILE).exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&recorded).map_err(|e| Error::io(&recorded, e))?;
    if Recipe::from_toml(&text).ok().as_ref() != Some(recipe) {
        return Ok(None);
    }
    let summary = RunSummary::read(dir)?;
    // A run finished before validation splits existed reads back with the default fraction
    // but has no validation metric: train it again rather than reuse it.
    if recipe.data.validation_fraction > 0.0 && summary.final_validation.is_none() {
        return Ok(None);
    }
    Ok(Some(summary))
}

fn progress_bar(enabled: bool, total: u64, at: u64, name: &str) -> Option<indicatif::ProgressBar> {
    if !enabled {
        return None;
    }
    let p = indicatif::ProgressBar::new(total);
    p.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} steps, {per_sec}, ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    p.set_prefix(name.to_string());
    p.set_position(at);
    Some(p)
}
