//! The per-step cost of distillation against a plain step, measured side by side: the shared
//! code behind the criterion benchmark `kd_overhead` and `recycle bench`.
//!
//! A configuration (`resnet18-fmnist`, `resnet18-fmnist-small`, `bert-tiny`) builds a student,
//! four frozen bf16 teachers of the same architecture (randomly initialised, different seeds:
//! the cost of a forward does not depend on the weights' values), one batch of the shapes the
//! PyTorch peer (`torch_kd_overhead.py`) uses, and the optimizer of the task (SGDW for images,
//! AdamW for MLM). Each variant is one `train_step`:
//!
//! - `plain`: no teacher;
//! - `kd-kl`, `kd-mse`: one teacher (`Single`), KL at T = 4 or MSE on logits;
//! - `ensemble-2`, `ensemble-4`: the mean of the logits of 2 or 4 teachers;
//! - `random-one-4`: one of the 4 teachers drawn per step;
//! - `off-schedule`: a step of a distilled run outside its `KdSchedule` window, chosen the way
//!   the trainer chooses (`pool.filter(|_| schedule.is_active(step, total))`): no teacher runs,
//!   so it must cost what `plain` costs;
//! - `teacher-fwd`: one teacher forward alone (inference tape), the cost distillation adds at
//!   the least.
//!
//! Variants run in alternation, round after round, and each one's median is reported with its
//! ratio to `plain`: drift on a shared machine then hits every variant alike (the peer does the
//! same). For BERT, logits exist only at the masked positions (the model gathers them before
//! the vocabulary projection), so distillation is on masked positions only.

use std::time::Instant;

use recycle_engine::optim::{AdamW, Optimizer, Sgdw};
use recycle_engine::rng::Rng;
use recycle_engine::{DType, Device, Error, Result, Tape, Tensor};
use recycle_models::{BertConfig, MlmBatch, ResNetConfig};

use crate::distill::{kd_loss, KdLoss, KdSchedule, TeacherEntry, TeacherPool, TeacherStrategy};
use crate::trainer::model::{Architecture, Batch, Model};
use crate::trainer::train_step;

/// Configurations `bench` knows, with what each one is.
pub const CONFIGS: [(&str, &str); 3] = [
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
];

/// Teachers in the pool (ensembles of 2 and 4, RandomOne of 4).
pub const TEACHERS: usize = 4;

/// What to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchSpec {
    /// One of [`CONFIGS`].
    pub model: String,
    /// Samples per step (images or sequences); `None` takes the peer's default (128 images,
    /// 32 sequences).
    pub batch: Option<usize>,
    /// Tokens per sequence (BERT).
    pub seq: usize,
    /// Measured rounds (each runs every variant once).
    pub iters: usize,
    /// Rounds run first and thrown away.
    pub warmup: usize,
    /// Variants to run, by name; empty runs them all.
    pub variants: Vec<Variant>,
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
}

impl Variant {
    pub const ALL: [Variant; 8] = [
        Variant::Plain,
        Variant::KdKl,
        Variant::KdMse,
        Variant::Ensemble2,
        Variant::Ensemble4,
        Variant::RandomOne4,
        Variant::OffSchedule,
        Variant::TeacherForward,
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
        let is_bert = spec.model == "bert-tiny";
        let arch = match spec.model.as_str() {
            "resnet18-fmnist" | "resnet18-fmnist-small" => Architecture::ResNet(ResNetConfig {
                depth: 18,
                num_classes: 10,
                in_channels: 1,
                small_stem: true,
                width: if spec.model.ends_with("small") {
                    0.125
                } else {
                    1.0
                },
            }),
            "bert-tiny" => Architecture::Bert(BertConfig::tiny(30522)),
            other => return Err(bad_model(other)),
        };
        let batch_size = spec.batch.unwrap_or(if is_bert { 32 } else { 128 });
        if batch_size == 0 || spec.seq == 0 {
            return Err(Error::invalid(
                "bench",
                "batch and sequence length must be at least 1".to_string(),
            ));
        }
        let student = Model::new(&arch, 0)?;
        let teachers = (0..TEACHERS)
            .map(|i| {
                Ok(TeacherEntry {
                    name: format!("teacher{i}"),
                    // Distinct accuracies give Single and Ensemble a fixed order.
                    accuracy: 0.9 - 0.01 * i as f32,
                    model: Model::new(&arch, 100 + i as u64)?.teacher(DType::BF16)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Teacher models share their weights' storage between pools (tensors are Arc-backed).
        let pool = |strategy| TeacherPool::new(teachers.clone(), strategy, 7);
        let batch = match &arch {
            Architecture::ResNet(_) => image_batch(batch_size)?,
            Architecture::Bert(c) => mlm_batch(batch_size, spec.seq, c.vocab_size)?,
        };
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
            Variant::TeacherForward => {
                let t = &self.single.teachers()[0].model;
                let logits = t.logits(&Tape::inference(), &self.batch, false, 0)?;
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
        let mut times = vec![Vec::with_capacity(iters); variants.len()];
        for _ in 0..iters {
            for (i, &v) in variants.iter().enumerate() {
                let t0 = Instant::now();
                self.run(v)?;
                times[i].push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        let rows = variants
            .iter()
            .zip(times)
            .map(|(&variant, ts)| BenchRow {
                variant,
                median_ms: median(ts.clone()),
                min_ms: ts.iter().cloned().fold(f64::INFINITY, f64::min),
                max_ms: ts.iter().cloned().fold(0.0, f64::max),
            })
            .collect();
        Ok(BenchReport {
            model: self.model.clone(),
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
        for i in 0..warmup + iters {
            let params = self.student.params()?;
            let t0 = Instant::now();
            let tape = Tape::recording();
            let logits = self.student.logits(&tape, &self.batch, true, i as u64)?;
            let out = kd_loss(&tape, &self.kl, &logits, &[], self.batch.labels(), None)?;
            std::hint::black_box(out.total.tensor().to_scalar_f32()?);
            let t1 = Instant::now();
            tape.backward(&out.total)?;
            drop(tape);
            let t2 = Instant::now();
            self.optimizer.step(params, self.lr)?;
            params.zero_grad()?;
            let t3 = Instant::now();
            self.run(Variant::TeacherForward)?;
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Random 1x28x28 images and labels in `[0, 10)`.
fn image_batch(n: usize) -> Result<Batch> {
    let x = Tensor::randn(&[n, 1, 28, 28], 0.0, 1.0, 1, DType::F32, Device::Cpu)?;
    let mut rng = Rng::new(2);
    let labels: Vec<i32> = (0..n).map(|_| rng.below(10) as i32).collect();
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
}

/// The medians of one measurement and their ratios to the plain step.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub model: String,
    pub batch: usize,
    /// Rows of logits per step: images, or masked positions for BERT.
    pub logit_rows: usize,
    pub iters: usize,
    pub threads: usize,
    pub rows: Vec<BenchRow>,
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

    /// A Markdown table: variant, median ms, min–max, ratio to plain.
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "{} — batch {} ({} logit rows), median of {} interleaved rounds, {} threads\n\n\
             | step | median ms | min–max ms | / plain |\n|---|---:|---:|---:|\n",
            self.model, self.batch, self.logit_rows, self.iters, self.threads
        );
        for r in &self.rows {
            let ratio = self
                .ratio(r.variant)
                .map_or("—".to_string(), |x| format!("{x:.3}"));
            s += &format!(
                "| {} | {:.1} | {:.1}–{:.1} | {ratio} |\n",
                r.variant.name(),
                r.median_ms,
                r.min_ms,
                r.max_ms
            );
        }
        s
    }

    /// One JSON object, keyed like the peer's output where they mean the same thing
    /// (`plain_ms`, `kd_ms`, `kd_ratio`, `teacher_fwd_ms`, `teacher_fwd_frac`).
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("model".into(), self.model.clone().into());
        m.insert("batch".into(), self.batch.into());
        m.insert("logit_rows".into(), self.logit_rows.into());
        m.insert("threads".into(), self.threads.into());
        m.insert("iters".into(), self.iters.into());
        let round = |x: f64| (x * 1e4).round() / 1e4;
        for r in &self.rows {
            m.insert(
                format!("{}_ms", r.variant.name()),
                round(r.median_ms).into(),
            );
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
    fn bad_names_are_errors() {
        assert!(KdBench::new(&BenchSpec::new("resnet99")).is_err());
        assert!(Variant::parse("ensemble-3").is_err());
        assert_eq!(Variant::parse("kd-mse").unwrap(), Variant::KdMse);
        let mut spec = BenchSpec::new("bert-tiny");
        spec.batch = Some(0);
        assert!(KdBench::new(&spec).is_err());
    }
}
