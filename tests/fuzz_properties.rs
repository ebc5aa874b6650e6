//! The fuzz targets' bodies (`fuzz/src/targets.rs`) under `cargo test`: each parser on its
//! seed files and a few thousand deterministic mutations of them. No input may panic, and
//! every error from a file names it. The coverage-guided runs (cargo-fuzz, libFuzzer, with
//! AddressSanitizer) go much further; see docs/reliability.md (Fuzzing). Inputs those runs found
//! crashing are replayed by `crashing_inputs_found_by_fuzzing_stay_fixed`.

#[path = "../fuzz/src/mutate.rs"]
mod mutate;
#[path = "../fuzz/src/targets.rs"]
mod targets;

use std::path::PathBuf;

use recycle::data::image_decode::MAX_PIXELS;

/// Mutations per target: about a second each on two cores.
const RUNS: usize = 2000;

fn seeds(target: &str) -> Vec<Vec<u8>> {
    mutate::seeds(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/seeds")
            .join(target),
    )
}

fn fuzz(name: &str, target: fn(&[u8]), seed: u64) {
    mutate::run(target, &seeds(name), RUNS, seed);
    targets::clean_scratch();
}

#[test]
fn recipe_parser_never_panics() {
    fuzz("recipe", targets::recipe, 1);
}

#[test]
fn checkpoint_loader_never_panics() {
    fuzz("checkpoint", targets::checkpoint, 2);
}

#[test]
fn idx_reader_never_panics() {
    fuzz("idx", targets::idx, 3);
}

#[test]
fn fortunes_reader_never_panics() {
    fuzz("fortunes", targets::fortunes, 4);
}

#[test]
fn tokenizer_loader_never_panics() {
    fuzz("tokenizer", targets::tokenizer, 5);
}

#[test]
fn run_log_reader_never_panics() {
    fuzz("runlog", targets::runlog, 6);
}

#[test]
fn image_decode_path_never_panics() {
    fuzz("image", targets::image, 7);
}

/// Inputs that panicked before their fix, kept as regression tests.
#[test]
fn crashing_inputs_found_by_fuzzing_stay_fixed() {
    use recycle::distill::{kd_loss_cpu, KdLoss};
    // A class count whose product with the row count overflows (`classes` is a caller's
    // size_t in the C ABI): an error, not an arithmetic-overflow panic.
    let student = [0.5f32; 8];
    for classes in [1usize << 62, usize::MAX] {
        let err = kd_loss_cpu(&KdLoss::kl(2.0, 1.0), &student, &[], &[0; 4], None, classes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("8 values for 4 labels"), "{err}");
        // No rows and a huge class count: no allocation of `classes` floats (an abort).
        let out = kd_loss_cpu(&KdLoss::kl(2.0, 1.0), &[], &[], &[], None, classes).unwrap();
        assert!(out.grad.is_empty() && out.ce_rows == 0);
    }

    // A tokenizer.json whose `decoder` holds a non-string key: the tokenizers crate panicked
    // ("key must be a string"); now an error naming the file, line and column.
    let seed = String::from_utf8(seeds("tokenizer").remove(0)).unwrap();
    let bad = seed.replacen("\"decoder\": {", "\"decoder\": {1: 0, ", 1);
    assert_ne!(bad, seed, "the seed has a decoder");
    let dir = std::env::temp_dir().join(format!("recycle-fuzz-regress-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, bad).unwrap();
    let err = match recycle::data::TextTokenizer::from_file(&path) {
        Ok(_) => panic!("a malformed tokenizer.json is refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("tokenizer.json") && err.contains("not valid JSON") && err.contains("line"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);

    // A baseline JPEG whose second scan selects a Huffman table no DHT defines: zune-jpeg 0.4
    // unwrapped the missing table (caught, and reported only as "the decoder failed"); 0.5
    // returns an error naming the table.
    let jpeg = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jpeg-scan-without-huffman-table.jpg"),
    )
    .unwrap();
    let err = recycle::data::image_decode::decode_rgb(&jpeg, MAX_PIXELS).unwrap_err();
    assert!(err.contains("table not found"), "{err}");

    // A JPEG on which zune-jpeg 0.5.15 panics (an unwrap in its AVX2 IDCT): caught, an error
    // ("the decoder failed on this file"; on a CPU without AVX2 the decoder's own error).
    let jpeg = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jpeg-avx2-idct-panic.jpg"),
    )
    .unwrap();
    assert!(recycle::data::image_decode::decode_rgb(&jpeg, MAX_PIXELS).is_err());

    // 283 bytes declaring a 13824x8199 progressive JPEG (113 megapixels, under Pillow's
    // limit): its decode outlasted libFuzzer's 10 s timeout. A caller's pixel limit refuses it
    // from the header, before any allocation.
    let bomb = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jpeg-113-megapixels-in-283-bytes.jpg"),
    )
    .unwrap();
    let err = recycle::data::image_decode::decode_rgb(&bomb, 1 << 20).unwrap_err();
    assert!(
        err.contains("13824x8199") && err.contains("larger than allowed"),
        "{err}"
    );
}

#[test]
fn text_shard_reader_never_panics() {
    fuzz("text_shards", targets::text_shards, 8);
}

#[test]
fn hf_config_reader_never_panics() {
    fuzz("hf_config", targets::hf_config, 9);
}
