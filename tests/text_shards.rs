//! Text shards made by the tests from generated fortunes (`.json.gz` JSON lines and plain
//! text), read, packed and masked reproducibly; damaged shards are errors naming the file;
//! Hugging Face's tokenizer.json and BERT checkpoints (the fixtures of
//! `scripts/reference/hf_bert_fixtures.py`) drive a few steps of training with distillation,
//! and the shipped C4 recipe starts on tiny shards.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use recycle::data::test_support::write_fortunes;
use recycle::data::text_shards::{documents, resolve, PlainDocuments, ShardFormat};
use recycle::data::text_stream::{Packing, TextShards, TextStreamLoader};
use recycle::data::{load_fortunes, TextTokenizer};
use recycle::experiments::RunLog;
use recycle::recipe::Recipe;
use recycle::trainer::{self, RunOptions};

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("recycle-text-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/tests/fixtures")
        .join(name)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn json_lines(texts: &[String]) -> String {
    texts
        .iter()
        .map(|t| format!("{}\n", serde_json::json!({"text": t, "url": "x"})))
        .collect()
}

/// C4-named shards of generated fortunes under `dir`: two training shards and one validation
/// shard (JSON lines, gzip). Returns the fortunes.
fn write_c4_shards(dir: &Path) -> Vec<String> {
    let src = dir.join("fortunes");
    write_fortunes(&src, 600).unwrap();
    let texts = load_fortunes(Some(&src)).unwrap();
    let (train, held) = texts.split_at(500);
    for (i, part) in train.chunks(250).enumerate() {
        let name = format!("c4-train.{i:05}-of-00002.json.gz");
        std::fs::write(dir.join(name), gzip(json_lines(part).as_bytes())).unwrap();
    }
    let name = "c4-validation.00000-of-00001.json.gz";
    std::fs::write(dir.join(name), gzip(json_lines(held).as_bytes())).unwrap();
    texts
}

#[test]
fn json_gz_and_plain_text_shards_give_their_documents() {
    let dir = temp_dir("read");
    let texts = write_c4_shards(&dir);
    let files = resolve(&["c4-train.*.json.gz".into()], Some(&dir)).unwrap();
    assert_eq!(files.len(), 2);
    assert!(files[0] < files[1]);
    let docs: Vec<String> = documents(&files, &ShardFormat::default())
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(docs, texts[..500]);

    // Another field name; plain text one per line and per blank-line block; uncompressed.
    let alt: String = texts[..3]
        .iter()
        .map(|t| format!("{}\n\n", serde_json::json!({"body": t})))
        .collect();
    std::fs::write(dir.join("alt.jsonl"), &alt).unwrap();
    let format = ShardFormat {
        text_field: "body".into(),
        ..ShardFormat::default()
    };
    let got: Vec<String> = documents(&[dir.join("alt.jsonl")], &format)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(got, texts[..3]);
    std::fs::write(dir.join("lines.txt"), "first doc\n\n  second doc \nthird\n").unwrap();
    std::fs::write(
        dir.join("blocks.txt.gz"),
        gzip(b"para one\nstill one\n\n\npara two\n"),
    )
    .unwrap();
    let lines: Vec<String> = documents(&[dir.join("lines.txt")], &ShardFormat::default())
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(lines, ["first doc", "second doc", "third"]);
    let blocks = ShardFormat {
        plain: PlainDocuments::Blocks,
        ..ShardFormat::default()
    };
    let got: Vec<String> = documents(&[dir.join("blocks.txt.gz")], &blocks)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(got, ["para one\nstill one", "para two"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn damaged_shards_and_missing_patterns_are_errors_naming_the_file() {
    let dir = temp_dir("bad");
    let good = gzip(b"{\"text\": \"a b c\"}\n{\"text\": \"d e f\"}\n");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated.json.gz",
            good[..good.len() - 9].to_vec(),
            "corrupt",
        ),
        (
            "garbage.json.gz",
            [&[0x1f, 0x8b][..], b"not gzip at all"].concat(),
            "corrupt",
        ),
        (
            "notjson.jsonl",
            b"{\"text\": \"ok\"}\n{oops\n".to_vec(),
            "line 2",
        ),
        (
            "nofield.jsonl",
            b"{\"body\": \"x\"}\n".to_vec(),
            "text_field",
        ),
        ("number.jsonl", b"{\"text\": 3}\n".to_vec(), "a number"),
        ("array.jsonl", b"[1, 2]\n".to_vec(), "not a JSON object"),
    ];
    for (name, bytes, needle) in cases {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = documents(std::slice::from_ref(&path), &ShardFormat::default())
            .find_map(|d| d.err())
            .unwrap_or_else(|| panic!("{name} read without an error"))
            .to_string();
        assert!(err.contains(name) && err.contains(needle), "{name}: {err}");
    }
    let err = resolve(&["c4-train.*.json.gz".into()], Some(&dir))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("c4-train.*.json.gz") && err.contains("matches no file"),
        "{err}"
    );
    let err = resolve(&["shards/*/x.json".into()], Some(&dir))
        .unwrap_err()
        .to_string();
    assert!(err.contains("file name only"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bert_uncased_tokenizer_json_works_as_is() {
    let tok = TextTokenizer::from_file(&fixture("hf_tokenizer.json")).unwrap();
    assert_eq!(
        (
            tok.pad_id(),
            tok.unk_id(),
            tok.cls_id(),
            tok.sep_id(),
            tok.mask_id()
        ),
        (0, Some(100), 101, 102, 103)
    );
    // The ids transformers' BertTokenizerFast gave when the fixture was written.
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("hf_encoder_expected.json")).unwrap(),
    )
    .unwrap();
    let text = v["text"][0].as_str().unwrap().to_uppercase();
    let expected: Vec<u32> = v["input_ids"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let ids = tok.encode(&text).unwrap();
    assert_eq!(ids, expected[1..expected.len() - 1]);
}

fn shards(dir: &Path, packing: Packing, seq_len: usize) -> Arc<TextShards> {
    Arc::new(TextShards {
        files: resolve(&["c4-train.*.json.gz".into()], Some(dir)).unwrap(),
        format: ShardFormat::default(),
        tokenizer: TextTokenizer::from_file(&fixture("hf_tokenizer.json")).unwrap(),
        seq_len,
        packing,
        seed: 11,
    })
}

fn batches(s: &Arc<TextShards>, start: u64, n: usize) -> Vec<(Vec<i32>, Vec<i32>, Vec<i32>)> {
    TextStreamLoader::new(s.clone(), 8, start, 2)
        .unwrap()
        .take(n)
        .map(|b| {
            let b = b.unwrap();
            (
                b.input_ids.to_vec::<i32>().unwrap(),
                b.attention_mask.to_vec::<i32>().unwrap(),
                b.position_labels.to_vec::<i32>().unwrap(),
            )
        })
        .collect()
}

#[test]
fn streamed_batches_are_packed_masked_and_reproduced_bit_for_bit() {
    let dir = temp_dir("stream");
    write_c4_shards(&dir);
    let s = shards(&dir, Packing::Concatenate, 32);
    // 500 short documents make ~100 sequences: 40 steps of 8 wrap around the shards.
    let a = batches(&s, 0, 40);
    assert_eq!(a, batches(&s, 0, 40), "two runs differ");
    // Started at step 25 (a resume): the batches an uninterrupted run sees from there.
    assert_eq!(a[25..], batches(&s, 25, 15)[..]);
    let (mut chosen, mut real) = (0usize, 0usize);
    for (ids, att, labels) in &a {
        assert!(
            att.iter().all(|&x| x == 1),
            "concatenated sequences have no padding"
        );
        for (row, lab) in labels.chunks(32).zip(ids.chunks(32)).map(|(l, i)| (i, l)) {
            let originals: Vec<i32> = row
                .iter()
                .zip(lab)
                .map(|(&i, &l)| if l == -100 { i } else { l })
                .collect();
            assert_eq!((originals[0], originals[31]), (101, 102), "[CLS] ... [SEP]");
        }
        chosen += labels.iter().filter(|&&l| l != -100).count();
        real += ids.len();
    }
    let rate = chosen as f64 / real as f64;
    assert!((0.11..0.17).contains(&rate), "masked share {rate}");

    // Truncate: one document per sequence, padded, the mask only on real tokens.
    let t = shards(&dir, Packing::Truncate, 32);
    let (ids, att, labels) = &batches(&t, 0, 1)[0];
    assert!(att.contains(&0));
    for ((&i, &m), &l) in ids.iter().zip(att).zip(labels) {
        if m == 0 {
            assert_eq!((i, l), (0, -100));
        }
    }
    let held = s.collect(Some(5)).unwrap();
    assert_eq!(held.len(), 5);
    let _ = std::fs::remove_dir_all(&dir);
}

fn text_recipe(out: &Path, data: &Path, name: &str, extra_model: &str, distill: &str) -> Recipe {
    Recipe::from_toml(&text_toml(out, data, name, extra_model, distill)).unwrap()
}

fn text_toml(out: &Path, data: &Path, name: &str, extra_model: &str, distill: &str) -> String {
    format!(
        r#"
name = "{name}"
seed = 3
out_dir = "{out}"
[model]
kind = "bert"
config = "{config}"
{extra_model}
[data]
dataset = "text"
dir = "{data}"
train = ["c4-train.*.json.gz"]
validation = ["c4-validation.*.json.gz"]
tokenizer = "{tok}"
seq_len = 32
eval_limit = 16
validation_fraction = 0.25
[train]
batch_size = 8
samples = 48
evals = 2
[optimizer]
kind = "adamw"
lr = 1e-3
schedule = "linear"
warmup = 0.1
{distill}
"#,
        out = out.display(),
        data = data.display(),
        config = fixture("hf_config.json").display(),
        tok = fixture("hf_tokenizer.json").display(),
    )
}

fn losses(dir: &Path) -> Vec<(u64, f32, Option<f32>)> {
    RunLog::read(dir.join("log.jsonl"))
        .unwrap()
        .records
        .iter()
        .map(|r| (r.step, r.loss, r.kd))
        .collect()
}

#[test]
fn hugging_face_checkpoints_train_on_shards_with_distillation_reproducibly() {
    let root = temp_dir("train");
    let data = root.join("c4");
    std::fs::create_dir_all(&data).unwrap();
    write_c4_shards(&data);
    let out = root.join("runs");
    let opts = RunOptions::default();

    // A teacher started from the BertForPreTraining checkpoint (its MLM head loads).
    let init = format!(
        "init = \"{}\"",
        fixture("hf_pretraining.safetensors").display()
    );
    let teacher = text_recipe(&out, &data, "teacher", &init, "");
    trainer::run(&teacher, &opts).unwrap();

    // The encoder-only checkpoint needs init_head = "fresh" ...
    let init = format!("init = \"{}\"", fixture("hf_encoder.safetensors").display());
    let refused = text_recipe(&out, &data, "refused", &init, "");
    let err = trainer::run(&refused, &opts).unwrap_err().to_string();
    assert!(
        err.contains("hf_encoder.safetensors") && err.contains("init_head"),
        "{err}"
    );
    // ... and then trains, distilled from the teacher, twice to the same losses.
    let model = format!("{init}\ninit_head = \"fresh\"");
    let distill = format!(
        "[distill]\nteachers = [\"{}\"]\nloss = \"kl\"\nstop = 0.5",
        out.join("teacher").display()
    );
    let mut losses_of = Vec::new();
    for name in ["student-a", "student-b"] {
        let r = text_recipe(&out, &data, name, &model, &distill);
        let summary = trainer::run(&r, &opts).unwrap();
        assert_eq!(summary.steps, 6);
        losses_of.push(losses(&out.join(name)));
    }
    assert_eq!(losses_of[0], losses_of[1], "the two runs differ");
    assert!(
        losses_of[0].iter().any(|(_, _, kd)| kd.is_some()),
        "no distilled step"
    );
    assert!(losses_of[0].iter().all(|(_, l, _)| l.is_finite()));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn the_shipped_c4_recipe_starts_on_tiny_shards() {
    let root = temp_dir("c4");
    let data = root.join("c4");
    std::fs::create_dir_all(&data).unwrap();
    write_c4_shards(&data);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/bert-base-c4.toml");
    let mut r = Recipe::from_file(&path).unwrap();
    // Table 1 and table 2's A1, as shipped.
    assert_eq!(
        (r.train.batch_size, r.train.samples),
        (4096, Some(286_720_000))
    );
    assert_eq!((r.data.seq_len, r.optimizer.weight_decay), (128, 1e-5));
    assert_eq!((r.optimizer.lr, r.optimizer.warmup), (5e-4, 0.06));
    // `--data DIR` sets data.dir; the sizes shrink to something a test trains in seconds.
    r.data.dir = Some(data);
    r.out_dir = root.join("runs");
    r.data.tokenizer = Some(fixture("hf_tokenizer.json"));
    r.data.eval_limit = Some(8);
    if let recycle::recipe::ModelRecipe::Bert { config, .. } = &mut r.model {
        *config = Some(fixture("hf_config.json"));
    }
    r.data.seq_len = 64;
    r.train.batch_size = 4;
    r.train.samples = Some(12);
    let summary = trainer::run(&r, &RunOptions::default()).unwrap();
    assert_eq!(summary.steps, 3);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn text_recipes_name_what_is_missing() {
    let out = Path::new("runs");
    let good = text_toml(out, Path::new("data"), "r", "", "");
    for (from, to, needle) in [
        ("samples = 48", "epochs = 1.0", "train.samples"),
        ("validation = [", "# validation = [", "data.validation"),
        ("[data]\n", "[data]\npacking = \"shuffle\"\n", "shuffle"),
    ] {
        let text = good.replacen(from, to, 1);
        assert_ne!(text, good, "{from}");
        let err = Recipe::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
    // The new fields round-trip, and a recipe without them writes none of them.
    let r = Recipe::from_toml(&good).unwrap();
    assert_eq!(Recipe::from_toml(&r.to_toml().unwrap()).unwrap(), r);
    assert!(good.contains("train = [") && !good.contains("packing"));
}
