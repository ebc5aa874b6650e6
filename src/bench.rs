//! The per-step cost of distillation against a plain step, measured side by side: the shared
//! code behind the criterion benchmark `kd_overhead` and `recycle bench`.
//!
//! A configuration (`resnet18-fmnist`, `resnet18-fmnist-small`, `bert-tiny`, and the paper's
//! GPU sizes `resnet50-imagenet`, `bert-base`) builds a student, four frozen bf16 teachers of
//! the same architecture (randomly initialised, different seeds: the cost of a forward does not
//! depend on the weights' values), one batch of the shapes the PyTorch peer
//! (`torch_kd_overhead.py`) uses, and the optimizer of the task (SGDW for images, AdamW for
//! MLM), all on the device of the spec (`cpu` or `cuda:N`). Each variant is one `train_step`:
//!
//! - `plain`: no teacher;
//! - `kd-kl`, `kd-mse`: one teacher (`Single`), KL at T = 4 or MSE on logits;
//! - `ensemble-2`, `ensemble-4`: the mean of the logits of 2 or 4 teachers;
//! - `random-one-4`: one of the 4 teachers drawn per step;
//! - `off-schedule`: a step of a distilled run outside its `KdSchedule` window, chosen the way
//!   the trainer chooses (`pool.filter(|_| schedule.is_active(step, total))`): no teacher runs,
//!   so it must cost what `plain` costs;
//! - `teacher-fwd`: one teacher forward alone (inference tape), the cost distillation adds at
//!   the least;
//! - `cached-k10`: the `kd-kl` step with the teacher's targets replayed from a teacher cache
//!   (`distill::cache`) at k = 10, bf16 values: no teacher runs; the step decodes the rows from
//!   a shard held in memory (the page cache's part of reading one) and computes the loss on
//!   them (`kd_loss_cached`).
//!
//! Variants run in alternation, round after round, and each one's median is reported with its
//! ratio to `plain`: drift on a shared machine then hits every variant alike (the peer does the
//! same). For BERT, logits exist only at the masked positions (the model gathers them before
//! the vocabulary projection), so distillation is on masked positions only.
//!
//! On a GPU each timed step sits between two device synchronisations (the peer's
//! `torch.cuda.synchronize()`), so a step's time includes everything it queued; the teachers
//! run on the teacher stream (`train_step`), overlapping the student's forward. Each variant's
//! peak device memory (the most bytes the engine had allocated during its steps; the counter is
//! reset before each step) is reported beside its time, and so is the memory the four teachers'
//! weights hold for the whole run (*teacher-resident bytes*, measured on the device as the
//! bytes their upload allocated): the peak of a KD step over a plain one is then what running a
//! teacher costs beyond its weights (its activations, freed as they are consumed, and its
//! logits). Every batch is uploaded once, as the trainer does: BERT's integers (ids, padding
//! mask, masked positions, labels) keep their host copy on the device (`Tensor::to_device` of
//! an i32 tensor), so the ops that validate them on the host read that copy instead of
//! downloading and waiting for the stream, and nothing is uploaded again per op. The report
//! also gives what the device's memory pool holds at the end
//! (`cuda::pool_reserved_bytes`): with two streams it can exceed the peak by blocks one stream
//! freed that the other could not reuse yet. `resnet50-imagenet` and `bert-base` compute in
//! bf16 (`Model::with_activations`), student and teachers; the CPU-sized configurations in the
//! dtype of their inputs, as before.
//!
//! On the CPU the same two figures come from the heap, when the binary installed
//! `memory::CountingAllocator` (the `recycle` binary and the `kd_overhead` benchmark do): each
//! variant's peak heap bytes (reset before each step, the most over its steps) and the heap
//! bytes the teachers hold once built. Without the counter (a test binary, a program embedding
//! the library) there is no peak column and the teachers' figure is their weights' bytes.

use std::time::Instant;

use recycle_engine::cuda::{self, StreamRole};
use recycle_engine::memory;
use recycle_engine::optim::{AdamW, Optimizer, Sgdw};
use recycle_engine::rng::Rng;
use recycle_engine::{DType, Device, Error, Result, Tape, Tensor};
use recycle_models::{BertConfig, MlmBatch, ResNetConfig};

use crate::distill::cache::shard::{encode, Shard};
use crate::distill::cache::ValueType;
use crate::distill::{kd_loss, KdLoss, KdSchedule, TeacherEntry, TeacherPool, TeacherStrategy};
use crate::trainer::model::{Architecture, Batch, Model};
use crate::trainer::{train_step, train_step_with, StepGuard, Teachers};
use recycle_engine::kd_loss::CachedTargets;

/// Configurations `bench` knows, with what each one is.
pub const CONFIGS: [(&str, &str); 5] = [
    (
        "resnet18-fmnist",
        "ResNet-18, full width, 3x3 stem, no max-pool, 1x28x28, 10 classes (the peer's)",
    ),
    (
        "resnet18-fmnist-small",
        "the same at width 0.125, the CPU-sized model of `recycle demo`",
    ),
    (
        "bert-tiny",
        "BERT 2 layers, hidden 128, vocabulary 30522, sequence 128, 15% masked",
    ),
    (
        "resnet50-imagenet",
        "ResNet-50, 3x224x224, 1000 classes, batch 256, bf16 activations (the paper's GPU size)",
    ),
    (
        "bert-base",
        "BERT-base 12 layers, hidden 768, vocabulary 30522, batch 128 x sequence 128, 15% \
         masked, bf16 activations",
    ),
];

/// Teachers in the pool (ensembles of 2 and 4, RandomOne of 4).
pub const TEACHERS: usize = 4;

/// What to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchSpec {
    /// One of [`CONFIGS`].
    pub model: String,
    /// Samples per step (images or sequences); `None` takes the configuration's default (128
    /// images and 32 sequences as the peer's CPU runs; 256 for `resnet50-imagenet`, 128 for
    /// `bert-base`).
    pub batch: Option<usize>,
    /// Tokens per sequence (BERT).
    pub seq: usize,
    /// Measured rounds (each runs every variant once).
    pub iters: usize,
    /// Rounds run first and thrown away.
    pub warmup: usize,
    /// Variants to run, by name; empty runs them all.
    pub variants: Vec<Variant>,
    /// Where the student, the teachers and the batch live.
    pub device: Device,
    /// The compute dtype of student and teachers (`Model::with_activations`); `None` takes
    /// the configuration's (bf16 for the GPU sizes, the inputs' dtype otherwise).
    pub activations: Option<DType>,
}

impl BenchSpec {
    pub fn new(model: &str) -> Self {
        BenchSpec {
            model: model.to_string(),
            batch: None,
            seq: 128,
            iters: 10,
            warmup: 3,
            variants: Vec::new(),
            device: Device::Cpu,
            activations: None,
        }
    }
}

/// One kind of step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Plain,
    KdKl,
    KdMse,
    Ensemble2,
    Ensemble4,
    RandomOne4,
    OffSchedule,
    TeacherForward,
    Cached10,
}

impl Variant {
    pub const ALL: [Variant; 9] = [
        Variant::Plain,
        Variant::KdKl,
        Variant::KdMse,
        Variant::Ensemble2,
        Variant::Ensemble4,
        Variant::RandomOne4,
        Variant::OffSchedule,
        Variant::TeacherForward,
        Variant::Cached10,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::KdKl => "kd-kl",
            Variant::KdMse => "kd-mse",
            Variant::Ensemble2 => "ensemble-2",
            Variant::Ensemble4 => "ensemble-4",
            Variant::RandomOne4 => "random-one-4",
            Variant::OffSchedule => "off-schedule",
            Variant::TeacherForward => "teacher-fwd",
            Variant::Cached10 => "cached-k10",
        }
    }

    pub fn parse(s: &str) -> Result<Variant> {
        Variant::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Variant::ALL.iter().map(|v| v.name()).collect();
                Error::invalid(
                    "bench",
                    format!("unknown variant `{s}`: use one of {}", names.join(", ")),
                )
            })
    }
}

/// A student, its optimizer, a batch and the teacher pools of every variant, ready to step.
pub struct KdBench {
    pub model: String,
    pub batch_size: usize,
    pub device: Device,
    /// Bytes the four teachers' weights hold (see the module doc).
    pub teacher_resident_bytes: u64,
    student: Model,
    optimizer: Box<dyn Optimizer>,
    lr: f32,
    batch: Batch,
    kl: KdLoss,
    mse: KdLoss,
    single: TeacherPool<Model>,
    ensemble2: TeacherPool<Model>,
    ensemble4: TeacherPool<Model>,
    random_one: TeacherPool<Model>,
    /// Distills the first 30% of `total_steps` (BERT's schedule in the paper); the off-schedule
    /// variant asks it about a step past that window.
    schedule: KdSchedule,
    total_steps: u64,
    step: u64,
    /// The single teacher's rows for the batch, top-[`CACHED_K`], as a cache shard holds them.
    cached: Shard,
}

/// Logits per row of the `cached-k10` variant.
pub const CACHED_K: usize = 10;

/// A configuration's architecture, default batch and compute dtype (`None`: the inputs').
pub fn config(name: &str) -> Result<(Architecture, usize, Option<DType>)> {
    let small_resnet = |width| {
        Architecture::ResNet(ResNetConfig {
            depth: 18,
            num_classes: 10,
            in_channels: 1,
            small_stem: true,
            width,
        })
    };
    Ok(match name {
        "resnet18-fmnist" => (small_resnet(1.0), 128, None),
        "resnet18-fmnist-small" => (small_resnet(0.125), 128, None),
        "bert-tiny" => (Architecture::Bert(BertConfig::tiny(30522)), 32, None),
        "resnet50-imagenet" => (
            Architecture::ResNet(ResNetConfig::new(50, 1000)),
            256,
            Some(DType::BF16),
        ),
        "bert-base" => (
            Architecture::Bert(BertConfig::base(30522)),
            128,
            Some(DType::BF16),
        ),
        other => return Err(bad_model(other)),
    })
}

/// A shard holding, as step 0, `teacher`'s top-[`CACHED_K`] rows for `batch` at temperature
/// `t` (bf16 values).
fn cached_shard(teacher: &Model, batch: &Batch, t: f32) -> Result<Shard> {
    let logits = teacher.logits(&Tape::inference(), batch, false, 0)?;
    let classes = logits.shape()[1];
    let rows = CachedTargets::from_logits(
        &logits.tensor().to_vec_f32()?,
        classes,
        CACHED_K.min(classes),
        t,
    )?;
    let k = rows.k;
    let entries = std::collections::BTreeMap::from([(0u64, rows)]);
    let digest = [0u8; 32];
    Shard::decode(
        encode(&digest, k, classes, ValueType::Bf16, &entries),
        &digest,
    )
    .map_err(|why| Error::invalid("bench", format!("the cached shard: {why}")))
}

fn bad_model(name: &str) -> Error {
    let names: Vec<_> = CONFIGS.iter().map(|(n, _)| *n).collect();
    Error::invalid(
        "bench",
        format!("unknown model `{name}`: use one of {}", names.join(", ")),
    )
}

impl KdBench {
    /// Builds everything for `spec.model` at `spec.batch` (see the module doc).
    pub fn new(spec: &BenchSpec) -> Result<KdBench> {
        let (arch, default_batch, default_activations) = config(&spec.model)?;
        let activations = spec.activations.or(default_activations);
        let is_bert = matches!(arch, Architecture::Bert(_));
        let batch_size = spec.batch.unwrap_or(default_batch);
        if batch_size == 0 || spec.seq == 0 {
            return Err(Error::invalid(
                "bench",
                "batch and sequence length must be at least 1".to_string(),
            ));
        }
        let device = spec.device;
        // Fail early, naming what is missing, before minutes of building on the CPU.
        if let Device::Cuda(n) = device {
            cuda::device_info(n)?;
        }
        // The heap is counted from here on (where the binary installed the counter): what the
        // bench builds and steps, not what came before.
        memory::start_heap_counting();
        let place = |m: Model| -> Result<Model> {
            let m = match activations {
                Some(dtype) => m.with_activations(dtype)?,
                None => m,
            };
            m.to_device(device)
        };
        let student = place(Model::new(&arch, 0)?)?;
        let before = bytes_in_use(device)?;
        let teachers = (0..TEACHERS)
            .map(|i| {
                Ok(TeacherEntry {
                    name: format!("teacher{i}"),
                    // Distinct accuracies give Single and Ensemble a fixed order.
                    accuracy: 0.9 - 0.01 * i as f32,
                    model: place(Model::new(&arch, 100 + i as u64)?.teacher(DType::BF16)?)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // What building (and on a GPU uploading) them left allocated, where that is counted;
        // otherwise (a CPU run without the counting allocator) the weights' bytes.
        let teacher_resident_bytes = match (before, bytes_in_use(device)?) {
            (Some(b), Some(a)) => a.saturating_sub(b),
            _ => teachers
                .iter()
                .map(|t| weight_bytes(&t.model))
                .sum::<Result<u64>>()?,
        };
        // Teacher models share their weights' storage between pools (tensors are Arc-backed).
        let pool = |strategy| TeacherPool::new(teachers.clone(), strategy, 7);
        let batch = match &arch {
            Architecture::ResNet(c) => {
                let (channels, hw) = if c.small_stem { (1, 28) } else { (3, 224) };
                image_batch(batch_size, channels, hw, c.num_classes)?.to_device(device)?
            }
            // All integers: uploaded once with their host copies (see the module doc).
            Architecture::Bert(c) => {
                mlm_batch(batch_size, spec.seq, c.vocab_size)?.to_device(device)?
            }
        };
        let cached = cached_shard(&teachers[0].model, &batch, 4.0)?;
        let num_params = student.params()?.len();
        let (optimizer, lr): (Box<dyn Optimizer>, f32) = if is_bert {
            (
                Box::new(AdamW::new(num_params, 0.9, 0.999, 1e-8, 1e-5)?),
                5e-4,
            )
        } else {
            // The peer's SGD (momentum 0.875, weight decay 5e-4); a small rate keeps hundreds
            // of steps on one random batch finite (the cost does not depend on it).
            (Box::new(Sgdw::paper(num_params, 0.01)?), 0.01)
        };
        Ok(KdBench {
            model: spec.model.clone(),
            batch_size,
            device,
            teacher_resident_bytes,
            student,
            optimizer,
            lr,
            batch,
            kl: KdLoss::kl(4.0, 1.0),
            mse: KdLoss::mse(1.0),
            single: pool(TeacherStrategy::Single)?,
            ensemble2: pool(TeacherStrategy::Ensemble { k: 2 })?,
            ensemble4: pool(TeacherStrategy::Ensemble { k: 4 })?,
            random_one: pool(TeacherStrategy::RandomOne)?,
            schedule: KdSchedule {
                start: 0.0,
                stop: 0.3,
                every: 1,
            },
            total_steps: 1_000_000,
            step: 0,
            cached,
        })
    }

    /// Runs one step of `variant`.
    pub fn run(&mut self, variant: Variant) -> Result<()> {
        let step = self.step;
        self.step += 1;
        let (pool, loss) = match variant {
            Variant::Plain => (None, self.kl),
            Variant::KdKl => (Some(&self.single), self.kl),
            Variant::KdMse => (Some(&self.single), self.mse),
            Variant::Ensemble2 => (Some(&self.ensemble2), self.kl),
            Variant::Ensemble4 => (Some(&self.ensemble4), self.kl),
            Variant::RandomOne4 => (Some(&self.random_one), self.kl),
            Variant::OffSchedule => {
                // A step past the window, decided as the trainer decides.
                let off = self.total_steps / 2 + step % 1000;
                let pool =
                    Some(&self.single).filter(|_| self.schedule.is_active(off, self.total_steps));
                (pool, self.kl)
            }
            Variant::Cached10 => {
                let rows = self.cached.get(0).ok_or_else(|| {
                    Error::invalid("bench", "the cached shard lost its step".to_string())
                })?;
                let out = train_step_with(
                    &self.student,
                    Some(Teachers::Cached(std::slice::from_ref(&rows))),
                    &self.kl,
                    &self.batch,
                    self.optimizer.as_mut(),
                    self.lr,
                    step,
                    0,
                    &StepGuard::default(),
                )?;
                if out.teacher_forwards != 0 || out.kd.is_none() {
                    return Err(Error::invalid(
                        "bench",
                        "cached-k10 ran a teacher or did not distill".to_string(),
                    ));
                }
                return Ok(());
            }
            Variant::TeacherForward => {
                // As train_step runs it: on the teacher stream, joined.
                let t = &self.single.teachers()[0].model;
                let logits = cuda::on_stream(self.device, StreamRole::Teacher, || {
                    t.logits(&Tape::inference(), &self.batch, false, 0)
                })?
                .join()?;
                std::hint::black_box(logits.tensor().elem_count());
                return Ok(());
            }
        };
        let out = train_step(
            &self.student,
            pool,
            &loss,
            &self.batch,
            self.optimizer.as_mut(),
            self.lr,
            step,
            0,
        )?;
        let want = match variant {
            Variant::Plain | Variant::OffSchedule => 0,
            Variant::Ensemble2 => 2,
            Variant::Ensemble4 => 4,
            _ => 1,
        };
        if out.teacher_forwards != want {
            return Err(Error::invalid(
                "bench",
                format!(
                    "{} ran {} teacher forwards, expected {want}",
                    variant.name(),
                    out.teacher_forwards
                ),
            ));
        }
        Ok(())
    }

    /// Runs `warmup` rounds, then `iters` timed rounds of every variant in `variants` (in
    /// alternation), and reports each one's median.
    pub fn measure(
        &mut self,
        variants: &[Variant],
        iters: usize,
        warmup: usize,
    ) -> Result<BenchReport> {
        if iters == 0 {
            return Err(Error::invalid(
                "bench",
                "iters must be at least 1".to_string(),
            ));
        }
        let variants: Vec<Variant> = if variants.is_empty() {
            Variant::ALL.to_vec()
        } else {
            variants.to_vec()
        };
        for _ in 0..warmup {
            for &v in &variants {
                self.run(v)?;
            }
        }
        // A GPU queues work and returns: each timed step starts on an idle device and ends when
        // everything it queued has run (on the CPU `synchronize` does nothing).
        let device = self.device;
        let ordinal = match device {
            Device::Cuda(n) => Some(n),
            Device::Cpu => None,
        };
        cuda::synchronize(device)?;
        let mut times = vec![Vec::with_capacity(iters); variants.len()];
        let mut peaks = vec![None; variants.len()];
        for _ in 0..iters {
            for (i, &v) in variants.iter().enumerate() {
                reset_peak(device)?;
                let t0 = Instant::now();
                self.run(v)?;
                cuda::synchronize(device)?;
                times[i].push(t0.elapsed().as_secs_f64() * 1e3);
                if let Some(peak) = peak_bytes(device)? {
                    peaks[i] = Some(peaks[i].map_or(peak, |p: u64| p.max(peak)));
                }
            }
        }
        let rows = variants
            .iter()
            .zip(times)
            .zip(peaks)
            .map(|((&variant, ts), peak_bytes)| BenchRow {
                variant,
                median_ms: median(ts.clone()),
                min_ms: ts.iter().cloned().fold(f64::INFINITY, f64::min),
                max_ms: ts.iter().cloned().fold(0.0, f64::max),
                peak_bytes,
            })
            .collect();
        // What the pool holds after every variant ran: the device memory the run needs,
        // freed blocks kept for reuse included.
        let pool_reserved_bytes = ordinal.map(cuda::pool_reserved_bytes).transpose()?;
        let info = ordinal.map(cuda::device_info).transpose()?;
        Ok(BenchReport {
            device_name: info.as_ref().map(|i| i.name.clone()),
            mock: info.as_ref().is_some_and(|i| i.is_mock()),
            model: self.model.clone(),
            device,
            teacher_resident_bytes: self.teacher_resident_bytes,
            pool_reserved_bytes,
            batch: self.batch_size,
            logit_rows: self.batch.labels().elem_count(),
            iters,
            threads: rayon::current_num_threads(),
            rows,
        })
    }
}

impl KdBench {
    /// Where a plain step's time goes: the student forward with the loss, backward, and the
    /// optimizer update (with zeroing the gradients), each a median over `iters` steps, and
    /// a teacher forward beside them. Runs the same sequence as `train_step`.
    pub fn phases(&mut self, iters: usize, warmup: usize) -> Result<PhaseReport> {
        if iters == 0 {
            return Err(Error::invalid(
                "bench",
                "iters must be at least 1".to_string(),
            ));
        }
        let mut t = [const { Vec::new() }; 4];
        // On a GPU each phase ends with a device synchronisation, so its time is its own.
        let device = self.device;
        let sync = || cuda::synchronize(device);
        for i in 0..warmup + iters {
            let params = self.student.params()?;
            sync()?;
            let t0 = Instant::now();
            let tape = Tape::recording();
            let logits = self.student.logits(&tape, &self.batch, true, i as u64)?;
            let out = kd_loss(&tape, &self.kl, &logits, &[], self.batch.labels(), None)?;
            std::hint::black_box(out.total_value);
            sync()?;
            let t1 = Instant::now();
            tape.backward(&out.total)?;
            drop(tape);
            sync()?;
            let t2 = Instant::now();
            self.optimizer.step(params, self.lr)?;
            params.zero_grad()?;
            sync()?;
            let t3 = Instant::now();
            self.run(Variant::TeacherForward)?;
            sync()?;
            let t4 = Instant::now();
            if i >= warmup {
                for (v, (a, b)) in t.iter_mut().zip([(t0, t1), (t1, t2), (t2, t3), (t3, t4)]) {
                    v.push((b - a).as_secs_f64() * 1e3);
                }
            }
        }
        let [forward_ms, backward_ms, optimizer_ms, teacher_fwd_ms] = t.map(median);
        Ok(PhaseReport {
            model: self.model.clone(),
            batch: self.batch_size,
            forward_ms,
            backward_ms,
            optimizer_ms,
            teacher_fwd_ms,
        })
    }
}

/// Medians of the phases of a plain step (see [`KdBench::phases`]).
#[derive(Debug, Clone)]
pub struct PhaseReport {
    pub model: String,
    pub batch: usize,
    /// Student forward on a recording tape and the loss.
    pub forward_ms: f64,
    /// Backward through the tape (and freeing it).
    pub backward_ms: f64,
    /// Optimizer update and zeroing the gradients.
    pub optimizer_ms: f64,
    /// One bf16 teacher forward on an inference tape.
    pub teacher_fwd_ms: f64,
}

impl PhaseReport {
    pub fn to_markdown(&self) -> String {
        let total = self.forward_ms + self.backward_ms + self.optimizer_ms;
        let mut s = format!(
            "{} — batch {}, phases of a plain step (medians)\n\n\
             | phase | ms | share of the step |\n|---|---:|---:|\n",
            self.model, self.batch
        );
        for (name, v) in [
            ("forward + loss", self.forward_ms),
            ("backward", self.backward_ms),
            ("optimizer", self.optimizer_ms),
            ("teacher forward (bf16)", self.teacher_fwd_ms),
        ] {
            s += &format!("| {name} | {v:.1} | {:.3} |\n", v / total);
        }
        s
    }
}

/// Builds and measures `spec` in one call.
pub fn run_bench(spec: &BenchSpec) -> Result<BenchReport> {
    KdBench::new(spec)?.measure(&spec.variants, spec.iters, spec.warmup)
}

/// Starts a step's peak-memory window: the device's allocator on a GPU, the heap on the CPU
/// (a no-op when the binary did not install `memory::CountingAllocator`).
fn reset_peak(device: Device) -> Result<()> {
    match device {
        Device::Cuda(n) => cuda::reset_peak_memory(n),
        Device::Cpu => {
            memory::reset_heap_peak();
            Ok(())
        }
    }
}

/// The most bytes in use since [`reset_peak`]: device memory on a GPU, heap bytes on the CPU,
/// `None` on the CPU when nothing counts them (no peak column rather than a false zero).
fn peak_bytes(device: Device) -> Result<Option<u64>> {
    Ok(match device {
        Device::Cuda(n) => Some(cuda::alloc_stats(n)?.peak_bytes_in_use),
        Device::Cpu => memory::heap_stats().map(|s| s.peak_bytes_in_use),
    })
}

/// Bytes in use now, where they are counted (see [`peak_bytes`]).
fn bytes_in_use(device: Device) -> Result<Option<u64>> {
    Ok(match device {
        Device::Cuda(n) => Some(cuda::alloc_stats(n)?.bytes_in_use),
        Device::Cpu => memory::heap_stats().map(|s| s.bytes_in_use),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Bytes of a model's weights (parameters and buffers) as its state dict holds them.
fn weight_bytes(m: &Model) -> Result<u64> {
    Ok(m.state_dict()?
        .iter()
        .map(|(_, t)| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
        .sum())
}

/// Random `channels x hw x hw` images (f32) and labels in `[0, classes)`, on the CPU.
fn image_batch(n: usize, channels: usize, hw: usize, classes: usize) -> Result<Batch> {
    let x = Tensor::randn(&[n, channels, hw, hw], 0.0, 1.0, 1, DType::F32, Device::Cpu)?;
    let mut rng = Rng::new(2);
    let labels: Vec<i32> = (0..n).map(|_| rng.below(classes as u64) as i32).collect();
    Ok(Batch::Image {
        x,
        labels: Tensor::from_vec(labels, &[n], Device::Cpu)?,
    })
}

/// Random token ids, every position attended, 15% of positions masked (at least one), the
/// label being the token itself (as the peer does).
pub(crate) fn mlm_batch(b: usize, s: usize, vocab: usize) -> Result<Batch> {
    let mut rng = Rng::new(3);
    let ids: Vec<i32> = (0..b * s).map(|_| rng.below(vocab as u64) as i32).collect();
    let mut labels: Vec<i32> = ids
        .iter()
        .map(|&id| if rng.uniform() < 0.15 { id } else { -100 })
        .collect();
    if labels.iter().all(|&l| l == -100) {
        labels[0] = ids[0];
    }
    let input_ids = Tensor::from_vec(ids, &[b, s], Device::Cpu)?;
    let mask = Tensor::from_vec(vec![1i32; b * s], &[b, s], Device::Cpu)?;
    let labels = Tensor::from_vec(labels, &[b, s], Device::Cpu)?;
    Ok(Batch::Mlm(MlmBatch::from_position_labels(
        input_ids, None, mask, &labels,
    )?))
}

/// One variant's timing.
#[derive(Debug, Clone, Copy)]
pub struct BenchRow {
    pub variant: Variant,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// The most memory in use during one of its steps: device memory on a GPU, heap bytes on
    /// the CPU when the binary installed `memory::CountingAllocator`; `None` when not counted.
    pub peak_bytes: Option<u64>,
}

/// The medians of one measurement and their ratios to the plain step.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub model: String,
    pub device: Device,
    /// Bytes the four teachers' weights hold for the whole run.
    pub teacher_resident_bytes: u64,
    /// GPU: the device memory the allocator's pool held at the end (`cuda::pool_reserved_bytes`).
    pub pool_reserved_bytes: Option<u64>,
    pub batch: usize,
    /// Rows of logits per step: images, or masked positions for BERT.
    pub logit_rows: usize,
    pub iters: usize,
    pub threads: usize,
    pub rows: Vec<BenchRow>,
    /// The GPU's name on `cuda:N` (`None` on the CPU).
    pub device_name: Option<String>,
    /// The device is the mock CUDA on the CPU: the timings are not GPU figures.
    pub mock: bool,
}

impl BenchReport {
    pub fn median_ms(&self, v: Variant) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.variant == v)
            .map(|r| r.median_ms)
    }

    /// `variant / plain`, when both were measured.
    pub fn ratio(&self, v: Variant) -> Option<f64> {
        Some(self.median_ms(v)? / self.median_ms(Variant::Plain)?)
    }

    /// A Markdown table: variant, median ms, min–max, ratio to plain, and where memory is
    /// counted the peak of each variant's steps (device memory on a GPU, heap on the CPU).
    pub fn to_markdown(&self) -> String {
        let peaks = self.rows.iter().any(|r| r.peak_bytes.is_some());
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let mut s = format!(
            "{} on {} — batch {} ({} logit rows), median of {} interleaved rounds, {} threads; \
             teachers resident: {:.1} MiB ({TEACHERS} bf16)",
            self.model,
            self.device,
            self.batch,
            self.logit_rows,
            self.iters,
            self.threads,
            mib(self.teacher_resident_bytes)
        );
        if let Some(b) = self.pool_reserved_bytes {
            s += &format!("; memory pool at the end: {:.0} MiB", mib(b));
        }
        if let Some(name) = &self.device_name {
            s += &format!("; device: {name}");
        }
        if self.mock {
            s += "\n\nMOCK: these timings are the mock CUDA's on the CPU (mockcuda), not a GPU's; \
                  never record them as GPU figures";
        }
        s += "\n\n";
        s += if peaks {
            "| step | median ms | min–max ms | / plain | peak MiB |\n|---|---:|---:|---:|---:|\n"
        } else {
            "| step | median ms | min–max ms | / plain |\n|---|---:|---:|---:|\n"
        };
        for r in &self.rows {
            let ratio = self
                .ratio(r.variant)
                .map_or("—".to_string(), |x| format!("{x:.3}"));
            s += &format!(
                "| {} | {:.1} | {:.1}–{:.1} | {ratio} |",
                r.variant.name(),
                r.median_ms,
                r.min_ms,
                r.max_ms
            );
            if peaks {
                s += &r
                    .peak_bytes
                    .map_or(" — |".to_string(), |b| format!(" {:.0} |", mib(b)));
            }
            s += "\n";
        }
        s
    }

    /// One JSON object, keyed like the peer's output where they mean the same thing
    /// (`plain_ms`, `kd_ms`, `kd_ratio`, `teacher_fwd_ms`, `teacher_fwd_frac`).
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("model".into(), self.model.clone().into());
        m.insert("device".into(), self.device.to_string().into());
        if let Some(name) = &self.device_name {
            m.insert("device_name".into(), name.clone().into());
        }
        if self.mock {
            m.insert("mock".into(), true.into());
        }
        m.insert("batch".into(), self.batch.into());
        m.insert("logit_rows".into(), self.logit_rows.into());
        m.insert("threads".into(), self.threads.into());
        m.insert("iters".into(), self.iters.into());
        let round = |x: f64| (x * 1e4).round() / 1e4;
        let mib = |b: u64| round(b as f64 / (1u64 << 20) as f64);
        m.insert(
            "teacher_resident_mib".into(),
            mib(self.teacher_resident_bytes).into(),
        );
        if let Some(b) = self.pool_reserved_bytes {
            m.insert("pool_reserved_mib".into(), mib(b).into());
        }
        for r in &self.rows {
            m.insert(
                format!("{}_ms", r.variant.name()),
                round(r.median_ms).into(),
            );
            if let Some(b) = r.peak_bytes {
                m.insert(format!("{}_peak_mib", r.variant.name()), mib(b).into());
            }
        }
        if let Some(v) = self.median_ms(Variant::Plain) {
            m.insert("plain_ms".into(), round(v).into());
        }
        if let Some(v) = self.median_ms(Variant::KdKl) {
            m.insert("kd_ms".into(), round(v).into());
        }
        if let Some(v) = self.ratio(Variant::KdKl) {
            m.insert("kd_ratio".into(), round(v).into());
        }
        if let Some(v) = self.median_ms(Variant::TeacherForward) {
            m.insert("teacher_fwd_ms".into(), round(v).into());
        }
        if let Some(v) = self.ratio(Variant::TeacherForward) {
            m.insert("teacher_fwd_frac".into(), round(v).into());
        }
        serde_json::Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_runs_with_the_right_teacher_count() {
        // Width 0.125 at batch 4: a few milliseconds per step.
        let mut spec = BenchSpec::new("resnet18-fmnist-small");
        spec.batch = Some(4);
        spec.iters = 1;
        spec.warmup = 0;
        let report = run_bench(&spec).unwrap();
        assert_eq!(report.rows.len(), Variant::ALL.len());
        assert!(report.rows.iter().all(|r| r.median_ms > 0.0));
        // This test binary does not install the counting allocator: the heap is not counted,
        // so there is no peak column (never a column of zeros). tests/teacher_memory.rs
        // installs it and checks the column is there.
        assert!(recycle_engine::memory::heap_stats().is_none());
        assert!(report.rows.iter().all(|r| r.peak_bytes.is_none()));
        assert!(!report.to_markdown().contains("peak"));
        assert_eq!(report.to_json()["device"], "cpu");
        assert!(report.pool_reserved_bytes.is_none());
        assert!(report.teacher_resident_bytes > 0);
        assert!((report.ratio(Variant::Plain).unwrap() - 1.0).abs() < 1e-12);
        let md = report.to_markdown();
        assert!(md.contains("| ensemble-4 |") && md.contains("| off-schedule |"));
        assert!(report.to_json()["kd_ratio"].as_f64().unwrap() > 0.0);
    }

    #[test]
    fn bert_masks_fifteen_percent_and_distills_masked_rows_only() {
        let b = mlm_batch(4, 64, 30522).unwrap();
        let m = b.labels().elem_count();
        assert!((20..60).contains(&m), "{m} masked of 256");
        let mut spec = BenchSpec::new("bert-tiny");
        spec.batch = Some(2);
        spec.seq = 16;
        let mut bench = KdBench::new(&spec).unwrap();
        for v in [Variant::KdKl, Variant::OffSchedule, Variant::Ensemble2] {
            bench.run(v).unwrap();
        }
    }

    #[test]
    fn the_gpu_configurations_are_the_papers_sizes() {
        for (name, _) in CONFIGS {
            config(name).unwrap();
        }
        let (arch, batch, act) = config("resnet50-imagenet").unwrap();
        let Architecture::ResNet(c) = arch else {
            panic!("a ResNet")
        };
        assert_eq!(
            (c.depth, c.num_classes, c.in_channels, c.small_stem),
            (50, 1000, 3, false)
        );
        assert_eq!((batch, act), (256, Some(DType::BF16)));
        let (arch, batch, act) = config("bert-base").unwrap();
        let Architecture::Bert(c) = arch else {
            panic!("a BERT")
        };
        assert_eq!(
            (c.num_layers, c.hidden_size, c.vocab_size),
            (12, 768, 30522)
        );
        assert_eq!((batch, act), (128, Some(DType::BF16)));
        assert_eq!(config("bert-tiny").unwrap().2, None);
    }

    #[test]
    fn a_gpu_bench_without_a_gpu_says_what_is_missing_before_building() {
        let mut spec = BenchSpec::new("bert-base");
        spec.device = Device::Cuda(0);
        let t0 = Instant::now();
        let e = KdBench::new(&spec).err().expect("no GPU here").to_string();
        assert!(e.contains("cuda:0"), "{e}");
        // Building BERT-base five times on the CPU would take seconds.
        assert!(t0.elapsed().as_secs_f64() < 2.0);
    }

    #[test]
    fn gpu_reports_show_peak_memory() {
        let row = |variant, ms, peak| BenchRow {
            variant,
            median_ms: ms,
            min_ms: ms,
            max_ms: ms,
            peak_bytes: Some(peak),
        };
        let report = BenchReport {
            model: "bert-base".into(),
            device: Device::Cuda(0),
            teacher_resident_bytes: (4 * 220) << 20,
            pool_reserved_bytes: Some(4000 << 20),
            batch: 128,
            logit_rows: 2458,
            iters: 5,
            threads: 16,
            rows: vec![
                row(Variant::Plain, 100.0, 3000 << 20),
                row(Variant::KdKl, 125.0, 3300 << 20),
            ],
            device_name: Some("NVIDIA H100 80GB HBM3".into()),
            mock: false,
        };
        let md = report.to_markdown();
        assert!(
            md.contains("device: NVIDIA H100") && !md.contains("MOCK"),
            "{md}"
        );
        assert!(md.contains("| peak MiB |"), "{md}");
        assert!(
            md.contains("| kd-kl | 125.0 | 125.0–125.0 | 1.250 | 3300 |"),
            "{md}"
        );
        assert!(md.contains("on cuda:0") && md.contains("880.0 MiB"), "{md}");
        let j = report.to_json();
        assert_eq!(j["device"], "cuda:0");
        assert_eq!(j["kd-kl_peak_mib"].as_f64(), Some(3300.0));
        assert_eq!(j["teacher_resident_mib"].as_f64(), Some(880.0));
        assert_eq!(j["pool_reserved_mib"].as_f64(), Some(4000.0));
        assert!(md.contains("memory pool at the end: 4000 MiB"), "{md}");
        assert_eq!(j["kd_ratio"].as_f64(), Some(1.25));
        assert!(j.get("mock").is_none());
        // On the mock CUDA the timings are labelled, in the table and in the JSON.
        let mock = BenchReport {
            device_name: Some(cuda::MOCK_DEVICE_NAME.into()),
            mock: true,
            ..report
        };
        assert!(mock.to_markdown().contains("MOCK: these timings"));
        assert_eq!(mock.to_json()["mock"], true);
    }

    #[test]
    fn bad_names_are_errors() {
        assert!(KdBench::new(&BenchSpec::new("resnet99")).is_err());
        assert!(Variant::parse("ensemble-3").is_err());
        assert_eq!(Variant::parse("kd-mse").unwrap(), Variant::KdMse);
        let mut spec = BenchSpec::new("bert-tiny");
        spec.batch = Some(0);
        assert!(KdBench::new(&spec).is_err());
    }
}
