//! Hugging Face BERT checkpoints of each layout (tiny ones, written by
//! `scripts/reference/hf_bert_fixtures.py` with `transformers` classes): they load, what masked
//! language modelling does not use is ignored, an encoder-only file needs a fresh head, and the
//! encoder reproduces `BertModel`'s `last_hidden_state`.

use std::path::{Path, PathBuf};

use recycle_engine::{Device, Tape, Tensor};
use recycle_models::bert::BertForwardOptions;
use recycle_models::hf_config::read_bert_config;
use recycle_models::{Bert, BertConfig, BertLayout, HeadInit, MlmBatch};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn config() -> BertConfig {
    read_bert_config(&fixture("hf_config.json")).unwrap()
}

#[test]
fn config_json_gives_the_fixture_sizes() {
    let c = config();
    assert_eq!(
        (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads),
        (308, 32, 2, 4)
    );
    assert_eq!((c.intermediate_size, c.max_position_embeddings), (48, 64));
}

#[test]
fn every_layout_loads_and_says_what_it_ignored() {
    let (m, r) = Bert::from_pretrained(
        config(),
        &fixture("hf_masked_lm.safetensors"),
        HeadInit::FromFile,
        0,
    )
    .unwrap();
    assert_eq!(r.layout, BertLayout::MaskedLm);
    assert!(r.ignored.is_empty() && !r.fresh_head, "{r:?}");
    assert_eq!(m.config().num_layers, 2);

    let (_, r) = Bert::from_pretrained(
        config(),
        &fixture("hf_pretraining.safetensors"),
        HeadInit::FromFile,
        0,
    )
    .unwrap();
    assert_eq!(r.layout, BertLayout::PreTraining);
    assert!(
        r.ignored.iter().any(|n| n.starts_with("bert.pooler."))
            && r.ignored
                .iter()
                .any(|n| n.starts_with("cls.seq_relationship.")),
        "{r:?}"
    );
    let line = r.describe(&fixture("hf_pretraining.safetensors"));
    assert!(
        line.contains("BertForPreTraining") && line.contains("ignored"),
        "{line}"
    );

    let encoder = fixture("hf_encoder.safetensors");
    let err = Bert::from_pretrained(config(), &encoder, HeadInit::FromFile, 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hf_encoder.safetensors")
            && err.contains("no masked-language-model head")
            && err.contains("init_head = \"fresh\""),
        "{err}"
    );
    // The plain loader (teachers, resumed students) refuses it the same way.
    assert!(Bert::load(config(), &encoder).is_err());
    let (fresh, r) = Bert::from_pretrained(config(), &encoder, HeadInit::Fresh, 7).unwrap();
    assert_eq!(r.layout, BertLayout::Encoder);
    assert!(r.fresh_head);
    assert!(
        r.ignored.contains(&"embeddings.position_ids".to_string()),
        "{r:?}"
    );
    // The fresh head is what a new model of that seed draws.
    let new = Bert::new(config(), 7).unwrap();
    let get = |m: &Bert, n: &str| -> Vec<f32> {
        let sd = m.state_dict().unwrap();
        sd.into_iter()
            .find(|(k, _)| k == n)
            .unwrap()
            .1
            .to_vec_f32()
            .unwrap()
    };
    let dense = "cls.predictions.transform.dense.weight";
    assert_eq!(get(&fresh, dense), get(&new, dense));
    let word = "bert.embeddings.word_embeddings.weight";
    assert_ne!(get(&fresh, word), get(&new, word));

    // A config whose sizes differ from the file's is an error naming a tensor and both shapes.
    let mut wrong = config();
    wrong.intermediate_size = 64;
    let err = Bert::from_pretrained(wrong, &encoder, HeadInit::Fresh, 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hf_encoder.safetensors") && err.contains("[48"),
        "{err}"
    );
}

#[test]
fn encoder_reproduces_hugging_face_last_hidden_state() {
    let text = std::fs::read_to_string(fixture("hf_encoder_expected.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rows = |k: &str| -> Vec<i32> {
        v[k].as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_i64().unwrap() as i32)
            })
            .collect()
    };
    let shape: Vec<usize> = v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let expected: Vec<f32> = v["last_hidden_state"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let (b, s) = (shape[0], shape[1]);
    let ids = Tensor::from_vec(rows("input_ids"), &[b, s], Device::Cpu).unwrap();
    let mask = Tensor::from_vec(rows("attention_mask"), &[b, s], Device::Cpu).unwrap();
    let none = Tensor::from_vec(vec![-100i32; b * s], &[b, s], Device::Cpu).unwrap();
    let batch = MlmBatch::from_position_labels(ids, None, mask, &none).unwrap();
    let (model, _) = Bert::from_pretrained(
        config(),
        &fixture("hf_encoder.safetensors"),
        HeadInit::Fresh,
        0,
    )
    .unwrap();
    let out = model
        .encode(&Tape::inference(), &batch, BertForwardOptions::eval())
        .unwrap();
    assert_eq!(out.shape(), &[b * s, shape[2]]);
    let got = out.tensor().to_vec_f32().unwrap();
    let worst = got
        .iter()
        .zip(&expected)
        .map(|(a, e)| (a - e).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst < 1e-4,
        "largest difference from Hugging Face: {worst}"
    );
}
