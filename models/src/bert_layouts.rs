//! The layouts Hugging Face BERT checkpoints come in, brought to `BertForMaskedLM` names.
//!
//! - `BertForMaskedLM`: `bert.*` and the MLM head `cls.predictions.*` (the model's own names).
//! - `BertForPreTraining` (bert-base-uncased): the same plus the pooler `bert.pooler.*` and the
//!   next-sentence head `cls.seq_relationship.*`, which masked-language modelling never reads.
//! - `BertModel` / sentence-transformers (all-MiniLM-L6-v2): the encoder without the `bert.`
//!   prefix, usually a `pooler.*`, and no MLM head.
//!
//! Buffers saved beside the parameters (`embeddings.position_ids`, `embeddings.token_type_ids`)
//! are ignored in every layout.

use std::path::Path;

use recycle_engine::{Error, Result};

use crate::weights::StateDict;

/// Which layout a checkpoint file has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BertLayout {
    MaskedLm,
    PreTraining,
    /// An encoder alone: `BertModel`, as sentence-transformers save it.
    Encoder,
}

impl BertLayout {
    pub fn name(self) -> &'static str {
        match self {
            BertLayout::MaskedLm => "BertForMaskedLM",
            BertLayout::PreTraining => "BertForPreTraining",
            BertLayout::Encoder => "BertModel",
        }
    }
}

/// What to do about the MLM head when a model is started from a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeadInit {
    /// The file must hold the head (an encoder-only file is an error saying how to proceed).
    #[default]
    FromFile,
    /// Start the head from fresh random values, whatever the file holds.
    Fresh,
}

/// What loading made of a checkpoint: its layout, the tensors it left out (sorted), and
/// whether the MLM head was initialised fresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutReport {
    pub layout: BertLayout,
    pub ignored: Vec<String>,
    pub fresh_head: bool,
}

impl LayoutReport {
    /// One line for a run's log.
    pub fn describe(&self, source: &Path) -> String {
        let mut s = format!("{}: a {} checkpoint", source.display(), self.layout.name());
        if !self.ignored.is_empty() {
            let shown: Vec<&str> = self.ignored.iter().take(4).map(|n| n.as_str()).collect();
            s.push_str(&format!(
                "; ignored {} tensors not used for masked-language modelling ({}{})",
                self.ignored.len(),
                shown.join(", "),
                if self.ignored.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            ));
        }
        if self.fresh_head {
            s.push_str("; the MLM head starts from fresh values (model.init_head = \"fresh\")");
        }
        s
    }
}

/// The prefix of the MLM head's tensors.
pub const MLM_HEAD_PREFIX: &str = "cls.predictions.";

fn is_buffer(name: &str) -> bool {
    name.ends_with("embeddings.position_ids") || name.ends_with("embeddings.token_type_ids")
}

fn is_unused_head(name: &str) -> bool {
    name.starts_with("bert.pooler.")
        || name.starts_with("pooler.")
        || name.starts_with("cls.seq_relationship.")
}

/// Renames `state` to `BertForMaskedLM` names and drops what masked-language modelling does not
/// use. Returns the tensors kept, the layout and the names dropped. A file with neither
/// `bert.*` nor `embeddings.*` / `encoder.*` tensors is an error naming `source`.
pub fn normalise(state: StateDict, source: &Path) -> Result<(StateDict, LayoutReport)> {
    let prefixed = state.iter().any(|(n, _)| n.starts_with("bert."));
    let bare = state
        .iter()
        .any(|(n, _)| n.starts_with("embeddings.") || n.starts_with("encoder."));
    if prefixed && bare {
        return Err(Error::checkpoint(
            source,
            "holds both `bert.*` and unprefixed `embeddings.*` / `encoder.*` tensors: not one \
             BERT checkpoint; save a single model's state dict",
        ));
    }
    if !prefixed && !bare {
        let first = state.first().map_or("none", |(n, _)| n.as_str());
        return Err(Error::checkpoint(
            source,
            format!(
                "holds no BERT encoder (no `bert.embeddings.*` or `embeddings.*` tensors; first \
                 tensor: `{first}`); give a BertForMaskedLM, BertForPreTraining or BertModel \
                 checkpoint"
            ),
        ));
    }
    let pretraining = state
        .iter()
        .any(|(n, _)| n.starts_with("cls.seq_relationship."));
    let layout = if bare {
        BertLayout::Encoder
    } else if pretraining {
        BertLayout::PreTraining
    } else {
        BertLayout::MaskedLm
    };
    let mut kept = Vec::with_capacity(state.len());
    let mut ignored = Vec::new();
    for (name, t) in state {
        if is_buffer(&name) || is_unused_head(&name) {
            ignored.push(name);
        } else if bare && (name.starts_with("embeddings.") || name.starts_with("encoder.")) {
            kept.push((format!("bert.{name}"), t));
        } else {
            kept.push((name, t));
        }
    }
    ignored.sort();
    Ok((
        kept,
        LayoutReport {
            layout,
            ignored,
            fresh_head: false,
        },
    ))
}

/// Whether `state` (normalised) holds any tensor of the MLM head.
pub fn has_mlm_head(state: &StateDict) -> bool {
    state.iter().any(|(n, _)| n.starts_with(MLM_HEAD_PREFIX))
}

/// The error for a checkpoint without the MLM head when the recipe did not ask for a fresh one.
pub fn missing_head(source: &Path, layout: BertLayout) -> Error {
    Error::checkpoint(
        source,
        format!(
            "is a {} checkpoint: it has no masked-language-model head (`{MLM_HEAD_PREFIX}*`), \
             only the encoder. To start from its encoder with a freshly initialised head, set \
             `init_head = \"fresh\"` under [model] in the recipe; or give a BertForMaskedLM / \
             BertForPreTraining checkpoint",
            layout.name()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use recycle_engine::{DType, Device, Tensor};

    fn t() -> Tensor {
        Tensor::zeros(&[1], DType::F32, Device::Cpu).unwrap()
    }

    #[test]
    fn layouts_are_recognised_and_renamed() {
        let src = Path::new("m.safetensors");
        let state: StateDict = vec![
            ("embeddings.word_embeddings.weight".into(), t()),
            ("embeddings.position_ids".into(), t()),
            ("encoder.layer.0.output.dense.bias".into(), t()),
            ("pooler.dense.weight".into(), t()),
        ];
        let (kept, report) = normalise(state, src).unwrap();
        assert_eq!(report.layout, BertLayout::Encoder);
        let names: Vec<&str> = kept.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "bert.embeddings.word_embeddings.weight",
                "bert.encoder.layer.0.output.dense.bias"
            ]
        );
        assert_eq!(
            report.ignored,
            ["embeddings.position_ids", "pooler.dense.weight"]
        );
        assert!(!has_mlm_head(&kept));
        let line = report.describe(src);
        assert!(
            line.contains("BertModel") && line.contains("ignored 2"),
            "{line}"
        );

        let state: StateDict = vec![
            ("bert.embeddings.word_embeddings.weight".into(), t()),
            ("bert.pooler.dense.bias".into(), t()),
            ("cls.seq_relationship.weight".into(), t()),
            ("cls.predictions.bias".into(), t()),
        ];
        let (kept, report) = normalise(state, src).unwrap();
        assert_eq!(report.layout, BertLayout::PreTraining);
        assert_eq!(kept.len(), 2);
        assert!(has_mlm_head(&kept));

        let err = normalise(vec![("fc.weight".into(), t())], src)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m.safetensors") && err.contains("`fc.weight`"),
            "{err}"
        );
        let err = missing_head(src, BertLayout::Encoder).to_string();
        assert!(err.contains("init_head = \"fresh\"") && err.contains("m.safetensors"));
    }
}
