//! A Hugging Face BERT `config.json` read into a [`BertConfig`]: the sizes of bert-base-uncased,
//! all-MiniLM-L6-v2 and any `BertConfig` that `transformers` writes. Fields that change the
//! computation in ways this model does not implement (another activation, relative position
//! embeddings, another model type) are errors naming the file, the field and the value.

use std::path::Path;

use recycle_engine::{Error, Result};
use serde_json::{Map, Value};

use crate::bert::BertConfig;

/// Reads `path` (a `config.json`).
pub fn read_bert_config(path: &Path) -> Result<BertConfig> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_bert_config(&bytes, path)
}

/// Parses the bytes of a `config.json`; `source` names the file in errors.
pub fn parse_bert_config(bytes: &[u8], source: &Path) -> Result<BertConfig> {
    let bad = |msg: String| {
        Error::io(
            source,
            std::io::Error::new(std::io::ErrorKind::InvalidData, msg),
        )
    };
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not a valid config.json: {e}")))?;
    let Value::Object(map) = value else {
        return Err(bad("not a valid config.json: not a JSON object".into()));
    };
    let text = |field: &str| -> Result<Option<String>> {
        match map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(bad(format!("field `{field}` is {v}, not a string"))),
        }
    };
    if let Some(t) = text("model_type")? {
        if t != "bert" {
            return Err(bad(format!(
                "field `model_type` is \"{t}\": only \"bert\" configurations describe this model"
            )));
        }
    }
    if let Some(act) = text("hidden_act")? {
        if act != "gelu" {
            return Err(bad(format!(
                "field `hidden_act` is \"{act}\": this BERT computes the exact (erf) \"gelu\" only"
            )));
        }
    }
    if let Some(p) = text("position_embedding_type")? {
        if p != "absolute" {
            return Err(bad(format!(
                "field `position_embedding_type` is \"{p}\": only \"absolute\" is implemented"
            )));
        }
    }
    let size = |field: &str, default: Option<usize>| -> Result<usize> {
        match (field_of(&map, field), default) {
            (None, Some(d)) => Ok(d),
            (None, None) => Err(bad(format!("field `{field}` is missing"))),
            (Some(v), _) => v
                .as_u64()
                .filter(|n| (1..=1 << 31).contains(n))
                .map(|n| n as usize)
                .ok_or_else(|| bad(format!("field `{field}` is {v}, not a size of at least 1"))),
        }
    };
    let real = |field: &str, default: f64| -> Result<f64> {
        match field_of(&map, field) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| bad(format!("field `{field}` is {v}, not a number"))),
        }
    };
    let hidden_size = size("hidden_size", None)?;
    let config = BertConfig {
        vocab_size: size("vocab_size", None)?,
        hidden_size,
        num_layers: size("num_hidden_layers", None)?,
        num_heads: size("num_attention_heads", None)?,
        intermediate_size: size("intermediate_size", Some(4 * hidden_size))?,
        max_position_embeddings: size("max_position_embeddings", Some(512))?,
        type_vocab_size: size("type_vocab_size", Some(2))?,
        layer_norm_eps: real("layer_norm_eps", 1e-12)? as f32,
        hidden_dropout: real("hidden_dropout_prob", 0.1)? as f32,
        attention_dropout: real("attention_probs_dropout_prob", 0.1)? as f32,
    };
    if !config.layer_norm_eps.is_finite() || config.layer_norm_eps <= 0.0 {
        return Err(bad(format!(
            "field `layer_norm_eps` is {}, not a positive number",
            config.layer_norm_eps
        )));
    }
    config.validate().map_err(|e| match e {
        Error::Invalid { msg, .. } => bad(format!("describes no valid BERT: {msg}")),
        e => e,
    })?;
    Ok(config)
}

fn field_of<'a>(map: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    map.get(field).filter(|v| !v.is_null())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_bert_base_config_and_names_bad_fields() {
        let src = Path::new("config.json");
        let base = br#"{"architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1,
            "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768,
            "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-12,
            "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
            "num_hidden_layers": 12, "pad_token_id": 0, "position_embedding_type": "absolute",
            "type_vocab_size": 2, "vocab_size": 30522}"#;
        assert_eq!(
            parse_bert_config(base, src).unwrap(),
            BertConfig::base(30522)
        );
        let text = std::str::from_utf8(base).unwrap();
        for (from, to, needle) in [
            ("\"gelu\"", "\"relu\"", "hidden_act"),
            (
                "\"model_type\": \"bert\"",
                "\"model_type\": \"gpt2\"",
                "gpt2",
            ),
            (
                "\"num_attention_heads\": 12",
                "\"num_attention_heads\": 7",
                "divisible",
            ),
            ("\"hidden_size\": 768", "\"hidden_size\": -1", "hidden_size"),
            ("\"vocab_size\": 30522", "\"vocab\": 30522", "vocab_size"),
            ("{", "[", "not a valid"),
        ] {
            let err = parse_bert_config(text.replacen(from, to, 1).as_bytes(), src)
                .unwrap_err()
                .to_string();
            assert!(err.contains("config.json") && err.contains(needle), "{err}");
        }
    }
}
