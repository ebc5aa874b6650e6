//! Batches a caller builds itself (a service with decoded images or token ids in memory, a
//! notebook with its own data loader), and their checks against the model they are fed to.
//!
//! [`Batch::images`] and [`Batch::mlm`] turn flat host buffers with explicit shapes into a
//! [`Batch`]; [`check_batch`] refuses, with a message naming the tensor, the value and the
//! model, anything the step would otherwise trip over later (a label outside the classes, a
//! token id outside the vocabulary, a channel count the model does not take). The bindings
//! (C, Python) go through both, so that their errors read the same.

use recycle_engine::{DType, Device, Error, Result, Tensor};
use recycle_models::MlmBatch;

use super::model::{Batch, Model};

/// The label of a position that predicts nothing (Hugging Face's convention).
pub const IGNORE_LABEL: i32 = -100;

/// What [`super::Trainer::step_batch`] ran: the step's index, its learning rate and losses.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    /// The index of the step that ran (0-based; the trainer's step count is this plus one).
    pub step: u64,
    pub lr: f32,
    pub output: super::StepOutput,
}

/// The student's metrics on one caller batch ([`super::Trainer::evaluate_batch`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchEval {
    /// Mean cross-entropy over the batch's rows (images, or masked positions).
    pub loss: f32,
    /// Rows whose first maximum is at the label.
    pub correct: usize,
    pub rows: usize,
}

impl BatchEval {
    /// `correct / rows`: top-1 accuracy for images, masked-token accuracy for MLM.
    pub fn accuracy(&self) -> f32 {
        self.correct as f32 / self.rows as f32
    }
}

fn invalid(what: &'static str, msg: String) -> Error {
    Error::invalid(what, msg)
}

/// `dims` multiplied, or an error naming them when the product overflows.
fn elements(op: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| invalid(op, format!("the shape {dims:?} overflows")))
}

impl Batch {
    /// An image batch from `[n, channels, height, width]` f32 pixels (row-major) and `n`
    /// labels.
    pub fn images(pixels: Vec<f32>, shape: [usize; 4], labels: Vec<i32>) -> Result<Batch> {
        let op = "Batch::images";
        let n = shape[0];
        if shape.contains(&0) {
            return Err(invalid(
                op,
                format!("the shape {shape:?} [n, channels, height, width] has a zero"),
            ));
        }
        let want = elements(op, &shape)?;
        if pixels.len() != want {
            return Err(invalid(
                op,
                format!(
                    "images hold {} values; the shape {shape:?} needs {want}",
                    pixels.len()
                ),
            ));
        }
        if labels.len() != n {
            return Err(invalid(
                op,
                format!(
                    "{} labels for {n} images: pass one label per image",
                    labels.len()
                ),
            ));
        }
        Ok(Batch::Image {
            x: Tensor::from_vec(pixels, &shape, Device::Cpu)?,
            labels: Tensor::from_vec(labels, &[n], Device::Cpu)?,
        })
    }

    /// A masked-language-modelling batch from `[batch, seq_len]` token ids, attention mask
    /// (1 for tokens, 0 for padding) and per-position labels ([`IGNORE_LABEL`] where nothing is
    /// predicted), all row-major.
    pub fn mlm(
        input_ids: Vec<i32>,
        attention_mask: Vec<i32>,
        labels: Vec<i32>,
        batch: usize,
        seq_len: usize,
    ) -> Result<Batch> {
        let op = "Batch::mlm";
        if batch == 0 || seq_len == 0 {
            return Err(invalid(
                op,
                format!("the shape [{batch}, {seq_len}] [batch, seq_len] has a zero"),
            ));
        }
        let want = elements(op, &[batch, seq_len])?;
        for (name, len) in [
            ("input_ids", input_ids.len()),
            ("attention_mask", attention_mask.len()),
            ("labels", labels.len()),
        ] {
            if len != want {
                return Err(invalid(
                    op,
                    format!("{name} holds {len} values; [{batch}, {seq_len}] needs {want}"),
                ));
            }
        }
        let shape = [batch, seq_len];
        Ok(Batch::Mlm(MlmBatch::from_position_labels(
            Tensor::from_vec(input_ids, &shape, Device::Cpu)?,
            None,
            Tensor::from_vec(attention_mask, &shape, Device::Cpu)?,
            &Tensor::from_vec(labels, &shape, Device::Cpu)?,
        )?))
    }
}

/// Checks a caller's batch against `model` (the student): the kind (images for a ResNet, text
/// for a BERT), dtypes, shapes, label and token ranges, the attention mask's values, and at
/// least one labelled position. Pixels may be any float (a NaN is the step's business: it
/// stops or skips the step as the recipe says).
pub fn check_batch(model: &Model, batch: &Batch) -> Result<()> {
    match (model, batch) {
        (Model::ResNet(m), Batch::Image { x, labels }) => {
            let op = "images";
            let c = m.config();
            x.expect_dtype(op, DType::F32)?;
            labels.expect_dtype("labels", DType::I32)?;
            let s = x.shape();
            if s.len() != 4 || s[1] != c.in_channels || s.contains(&0) {
                return Err(invalid(
                    op,
                    format!(
                        "the images have shape {s:?}; {} takes [n, {}, height, width] with no \
                         zero",
                        c.name(),
                        c.in_channels
                    ),
                ));
            }
            if labels.shape() != [s[0]] {
                return Err(invalid(
                    "labels",
                    format!("labels {:?} for {} images", labels.shape(), s[0]),
                ));
            }
            check_range("labels", &labels.to_vec::<i32>()?, c.num_classes, "classes")
        }
        (Model::Bert(m), Batch::Mlm(b)) => {
            let c = m.config();
            b.input_ids.expect_dtype("input_ids", DType::I32)?;
            b.attention_mask
                .expect_dtype("attention_mask", DType::I32)?;
            b.labels.expect_dtype("labels", DType::I32)?;
            b.masked_positions
                .expect_dtype("masked_positions", DType::I32)?;
            let s = b.input_ids.shape();
            if s.len() != 2 || s.contains(&0) {
                return Err(invalid(
                    "input_ids",
                    format!("input_ids have shape {s:?}; pass [batch, seq_len] with no zero"),
                ));
            }
            if s[1] > c.max_position_embeddings {
                return Err(invalid(
                    "input_ids",
                    format!(
                        "sequence length {} exceeds the {} positions of {}: shorten the \
                         sequences or raise data.seq_len",
                        s[1],
                        c.max_position_embeddings,
                        c.name()
                    ),
                ));
            }
            if b.attention_mask.shape() != s {
                return Err(invalid(
                    "attention_mask",
                    format!(
                        "attention_mask {:?} does not match input_ids {s:?}",
                        b.attention_mask.shape()
                    ),
                ));
            }
            check_range(
                "input_ids",
                &b.input_ids.to_vec::<i32>()?,
                c.vocab_size,
                "tokens",
            )?;
            let mask = b.attention_mask.to_vec::<i32>()?;
            if let Some(i) = mask.iter().position(|&v| v != 0 && v != 1) {
                return Err(invalid(
                    "attention_mask",
                    format!(
                        "attention_mask[{i}] is {}; use 1 for tokens, 0 for padding",
                        mask[i]
                    ),
                ));
            }
            if let Some(tt) = &b.token_type_ids {
                tt.expect_dtype("token_type_ids", DType::I32)?;
                if tt.shape() != s {
                    return Err(invalid(
                        "token_type_ids",
                        format!(
                            "token_type_ids {:?} do not match input_ids {s:?}",
                            tt.shape()
                        ),
                    ));
                }
                check_range(
                    "token_type_ids",
                    &tt.to_vec::<i32>()?,
                    c.type_vocab_size,
                    "segment types",
                )?;
            }
            let labels = b.labels.to_vec::<i32>()?;
            let positions = b.masked_positions.to_vec::<i32>()?;
            if labels.is_empty() || labels.len() != positions.len() {
                return Err(invalid(
                    "labels",
                    format!(
                        "{} labels at {} masked positions: a batch needs at least one labelled \
                         position (labels other than {IGNORE_LABEL})",
                        labels.len(),
                        positions.len()
                    ),
                ));
            }
            check_range("labels", &labels, c.vocab_size, "tokens")?;
            let end = s[0] * s[1];
            let mut last = -1i64;
            for (i, &p) in positions.iter().enumerate() {
                if (p as i64) <= last || p as usize >= end || p < 0 {
                    return Err(invalid(
                        "masked_positions",
                        format!(
                            "masked_positions[{i}] is {p}: positions must increase and lie in \
                             [0, {end})"
                        ),
                    ));
                }
                last = p as i64;
            }
            Ok(())
        }
        (Model::ResNet(_), Batch::Mlm(_)) => Err(invalid(
            "batch",
            "a text batch for a ResNet student: this recipe trains on images".to_string(),
        )),
        (Model::Bert(_), Batch::Image { .. }) => Err(invalid(
            "batch",
            "an image batch for a BERT student: this recipe trains on text (MLM)".to_string(),
        )),
    }
}

/// An error naming `name`, the element and its value when one lies outside `[0, n)`.
fn check_range(name: &'static str, values: &[i32], n: usize, what: &str) -> Result<()> {
    match values.iter().position(|&v| v < 0 || v as usize >= n) {
        None => Ok(()),
        Some(i) => Err(invalid(
            name,
            format!(
                "{name}[{i}] is {}, outside [0, {n}): the model has {n} {what}",
                values[i]
            ),
        )),
    }
}
