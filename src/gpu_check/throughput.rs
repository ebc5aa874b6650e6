//! Throughput: samples per second of a plain training step of ResNet-50 and BERT-base in bf16,
//! and its table. `recycle gpu-check` runs it after the check's table.

use std::fmt::Write as _;

use recycle_engine::optim::Sgdw;
use recycle_engine::{cuda, DType, Device, Result};
use recycle_models::{BertConfig, ResNetConfig};

use super::models::{batch_text, image_batch};
use crate::distill::loss::KdLoss;
use crate::trainer::{train_step, Architecture, Batch, Model};

/// How `throughput` measures.
#[derive(Debug, Clone)]
pub struct ThroughputOptions {
    /// Untimed steps before the timed ones.
    pub warmup_steps: usize,
    /// Timed steps.
    pub timed_steps: usize,
}

impl Default for ThroughputOptions {
    fn default() -> Self {
        ThroughputOptions {
            warmup_steps: 3,
            timed_steps: 10,
        }
    }
}

/// The throughput of one model's plain training step.
#[derive(Debug, Clone)]
pub struct ThroughputRow {
    pub model: String,
    /// Batch and input, as text.
    pub batch: String,
    /// The dtype the activations run in (the master weights, gradients and optimizer state
    /// are f32; bf16 activations read a bf16 working copy of the weights).
    pub activations: DType,
    pub samples_per_step: usize,
    pub timed_steps: usize,
    /// Seconds per step, or the error that stopped the measurement.
    pub outcome: std::result::Result<f64, String>,
}

impl ThroughputRow {
    pub fn samples_per_second(&self) -> Option<f64> {
        self.outcome
            .as_ref()
            .ok()
            .map(|s| self.samples_per_step as f64 / s)
    }
}

/// The throughput table: model, batch, activations, steps, ms per step, samples per second.
pub fn format_throughput(rows: &[ThroughputRow]) -> String {
    let mut s = String::from(
        "throughput of a plain training step (forward, cross-entropy, backward, SGDW):\n\
         | model | batch | activations | timed steps | ms / step | samples / s |\n\
         |---|---|---|---:|---:|---:|\n",
    );
    for r in rows {
        let (ms, sps) = match (&r.outcome, r.samples_per_second()) {
            (Ok(sec), Some(sps)) => (format!("{:.1}", sec * 1e3), format!("{sps:.1}")),
            (Err(e), _) => ("-".to_string(), format!("error: {e}")),
            _ => ("-".to_string(), "-".to_string()),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {ms} | {sps} |",
            r.model, r.batch, r.activations, r.timed_steps
        );
    }
    s
}

/// The large models of the throughput measurement, both with bf16 activations and the bf16
/// working copy of their f32 master weights (`Model::with_activations`): ResNet-50 on 256
/// 3x224x224 images (1000 classes; the model casts the f32 images to bf16 first) and BERT-base
/// on 128 sequences of 128 tokens (vocabulary 30522; the embedding sum is cast, so the encoder
/// and the MLM head run in bf16).
fn throughput_cases() -> Result<Vec<(String, Architecture, Batch, DType)>> {
    Ok(vec![
        (
            "ResNet-50".to_string(),
            Architecture::ResNet(ResNetConfig::new(50, 1000)),
            image_batch(256, 3, 224, 1000, 0x50)?,
            DType::BF16,
        ),
        (
            "BERT-base".to_string(),
            Architecture::Bert(BertConfig::base(30_522)),
            crate::bench::mlm_batch(128, 128, 30_522)?,
            DType::BF16,
        ),
    ])
}

/// Seconds per plain training step (train_step with SGDW, no teachers) of `arch` computing in
/// `activations` on `device`: `warmup` untimed steps, then `steps` timed ones closed by a
/// device synchronisation.
fn time_steps(
    device: Device,
    arch: &Architecture,
    batch: &Batch,
    activations: DType,
    (warmup, steps): (usize, usize),
) -> Result<f64> {
    let model = Model::new(arch, 5)?
        .with_activations(activations)?
        .to_device(device)?;
    let batch = batch.to_device(device)?;
    let params = model.params()?;
    let mut opt = Sgdw::paper(params.len(), 0.01)?;
    let loss = KdLoss::kl(4.0, 1.0);
    for step in 0..warmup {
        train_step(&model, None, &loss, &batch, &mut opt, 0.01, step as u64, 1)?;
    }
    cuda::synchronize(device)?;
    let t0 = std::time::Instant::now();
    for step in warmup..warmup + steps {
        train_step(&model, None, &loss, &batch, &mut opt, 0.01, step as u64, 1)?;
    }
    cuda::synchronize(device)?;
    Ok(t0.elapsed().as_secs_f64() / steps.max(1) as f64)
}

/// The throughput of a plain training step of ResNet-50 and BERT-base on `device` (a GPU),
/// run after `run` (`recycle gpu-check` prints the table first). A model that fails to step
/// gets its error in its row; the error returned is the device's (none, or not a GPU).
pub fn throughput(device: Device, opts: &ThroughputOptions) -> Result<Vec<ThroughputRow>> {
    let ordinal = super::ordinal_of(device)?;
    cuda::device_info(ordinal)?;
    let mut rows = Vec::new();
    for (model, arch, batch, activations) in throughput_cases()? {
        let counts = (opts.warmup_steps, opts.timed_steps);
        let outcome =
            time_steps(device, &arch, &batch, activations, counts).map_err(|e| e.to_string());
        rows.push(ThroughputRow {
            model,
            batch: batch_text(&batch),
            activations,
            samples_per_step: batch.samples(),
            timed_steps: opts.timed_steps,
            outcome,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_table_shows_rates_and_errors() {
        let rows = vec![
            ThroughputRow {
                model: "ResNet-50".into(),
                batch: "[256, 3, 224, 224]".into(),
                activations: DType::BF16,
                samples_per_step: 256,
                timed_steps: 10,
                outcome: Ok(0.5),
            },
            ThroughputRow {
                model: "BERT-base".into(),
                batch: "[128, 128] tokens".into(),
                activations: DType::BF16,
                samples_per_step: 128,
                timed_steps: 10,
                outcome: Err("out of memory".into()),
            },
        ];
        assert_eq!(rows[0].samples_per_second(), Some(512.0));
        let t = format_throughput(&rows);
        assert!(
            t.contains("| ResNet-50 | [256, 3, 224, 224] | bf16 | 10 | 500.0 | 512.0 |"),
            "{t}"
        );
        assert!(
            t.contains("| BERT-base | [128, 128] tokens | bf16 | 10 | - | error: out of memory |"),
            "{t}"
        );
    }

    /// Both throughput models train in bf16 (BERT too, now that it has a bf16 mode), from f32
    /// inputs the models cast themselves.
    #[test]
    fn throughput_cases_run_in_bf16() {
        let cases = throughput_cases().unwrap();
        assert_eq!(cases.len(), 2);
        for (name, _, batch, activations) in &cases {
            assert_eq!(*activations, DType::BF16, "{name}");
            if let Batch::Image { x, .. } = batch {
                assert_eq!(x.dtype(), DType::F32);
                assert_eq!(x.shape(), &[256, 3, 224, 224]);
            }
        }
        assert!(matches!(cases[1].2, Batch::Mlm(_)));
    }
}
