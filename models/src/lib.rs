//! recycle-models: the two architectures of the paper, written once on the engine and run
//! both as a trained student (recording tape, f32 parameters in a flat buffer) and as a frozen
//! teacher (inference tape, bf16 weights, BatchNorm folded into the convolutions).
//!
//! - `resnet`: ResNet v1.5 (depths 18/34/50) with torchvision's parameter names, a small-input
//!   stem for 28x28 / 32x32 images and a width multiplier;
//! - `bert`: BERT for masked language modelling with Hugging Face `BertForMaskedLM` names, the
//!   decoder tied to the word embeddings and the vocabulary projection only at masked positions;
//! - `bert_layouts`: the Hugging Face checkpoint layouts (BertForMaskedLM, BertForPreTraining,
//!   BertModel / sentence-transformers) brought to the model's names; `hf_config`: a Hugging
//!   Face BERT `config.json` read into a [`BertConfig`];
//! - `weights`: where a model's tensors live (trainable flat buffer or frozen named tensors) and
//!   how state dicts are matched against a model, by name and shape.

pub mod bert;
pub mod bert_layouts;
pub mod hf_config;
pub mod resnet;
pub mod weights;

pub use bert::{Bert, BertConfig, MlmBatch};
pub use bert_layouts::{BertLayout, HeadInit, LayoutReport};
pub use resnet::{ResNet, ResNetConfig};
pub use weights::{StateDict, Weights};
