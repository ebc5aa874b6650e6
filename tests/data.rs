//! Data: IDX reading, fortunes, the WordPiece tokenizer, MLM packing and masking, and the
//! deterministic prefetching loader.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use flate2::write::GzEncoder;
use flate2::Compression;

use recycle::data::fashion_mnist::{self, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC};
use recycle::data::loader::{epoch_order, steps_per_epoch};
use recycle::data::test_support::{use_fixture_data, write_fashion_mnist};
use recycle::data::text::{IGNORE_LABEL, SPECIAL_TOKENS};
use recycle::data::{
    load_fashion_mnist, load_fortunes, mask_tokens, BatchSource, ImageDataset, Loader,
    LoaderConfig, MlmDataset, Split, TextTokenizer,
};
use recycle::engine::{Error, Result};

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("recycle-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn idx_bytes(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Writes a small Fashion-MNIST-shaped split: `n` images of 4x3, labels `i % 10`.
fn write_split(dir: &Path, prefix: &str, n_images: u32, n_labels: u32) -> (Vec<u8>, Vec<u8>) {
    let pixels: Vec<u8> = (0..n_images * 12).map(|i| (i * 37 % 256) as u8).collect();
    let labels: Vec<u8> = (0..n_labels).map(|i| (i % 10) as u8).collect();
    std::fs::write(
        dir.join(format!("{prefix}-images-idx3-ubyte.gz")),
        gzip(&idx_bytes(IDX_IMAGES_MAGIC, &[n_images, 4, 3], &pixels)),
    )
    .unwrap();
    std::fs::write(
        dir.join(format!("{prefix}-labels-idx1-ubyte.gz")),
        gzip(&idx_bytes(IDX_LABELS_MAGIC, &[n_labels], &labels)),
    )
    .unwrap();
    (pixels, labels)
}

fn err_text<T: std::fmt::Debug>(r: Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn idx_good_file_loads_and_normalises() {
    let dir = scratch("idx-good");
    let (pixels, labels) = write_split(&dir, "train", 7, 7);
    let ds = load_fashion_mnist(Some(&dir), Split::Train, None).unwrap();
    assert_eq!(ds.len(), 7);
    assert_eq!(
        (ds.channels, ds.height, ds.width, ds.classes),
        (1, 4, 3, 10)
    );
    assert_eq!(ds.images.len(), 7 * 12);
    for (x, p) in ds.images.iter().zip(&pixels) {
        let want = (*p as f32 / 255.0 - fashion_mnist::MEAN) / fashion_mnist::STD;
        assert!((x - want).abs() < 1e-6);
    }
    let want: Vec<i32> = labels.iter().map(|&l| l as i32).collect();
    assert_eq!(ds.labels, want);

    let limited = load_fashion_mnist(Some(&dir), Split::Train, Some(3)).unwrap();
    assert_eq!(limited.len(), 3);
    assert_eq!(limited.images[..], ds.images[..3 * 12]);

    // The test split has its own files.
    let e = err_text(load_fashion_mnist(Some(&dir), Split::Test, None));
    assert!(e.contains("t10k-images-idx3-ubyte.gz"), "{e}");
    assert!(e.contains("RECYCLE_FASHION_MNIST_DIR"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn idx_missing_directory_says_where_data_comes_from() {
    let dir = std::env::temp_dir().join("recycle-data-no-such-dir");
    let e = err_text(load_fashion_mnist(Some(&dir), Split::Train, None));
    assert!(e.contains("recycle-data-no-such-dir"), "{e}");
    assert!(e.contains("RECYCLE_FASHION_MNIST_DIR"), "{e}");
}

#[test]
fn idx_damaged_files_are_errors_naming_them() {
    let dir = scratch("idx-bad");
    let images = dir.join("train-images-idx3-ubyte.gz");
    let labels = dir.join("train-labels-idx1-ubyte.gz");

    // Truncated data (the gzip stream is complete, the IDX payload short).
    write_split(&dir, "train", 5, 5);
    let short = idx_bytes(IDX_IMAGES_MAGIC, &[5, 4, 3], &[0u8; 50]);
    std::fs::write(&images, gzip(&short)).unwrap();
    let e = err_text(load_fashion_mnist(Some(&dir), Split::Train, None));
    assert!(
        e.contains("train-images-idx3-ubyte.gz") && e.contains("50 of 60"),
        "{e}"
    );

    // Truncated gzip stream.
    let good = gzip(&idx_bytes(IDX_IMAGES_MAGIC, &[5, 4, 3], &[7u8; 60]));
    std::fs::write(&images, &good[..good.len() / 2]).unwrap();
    let e = err_text(load_fashion_mnist(Some(&dir), Split::Train, None));
    assert!(e.contains("train-images-idx3-ubyte.gz"), "{e}");

    // Not gzip at all.
    std::fs::write(&images, b"this is not a gzip file at all").unwrap();
    let e = err_text(load_fashion_mnist(Some(&dir), Split::Train, None));
    assert!(e.contains("train-images-idx3-ubyte.gz"), "{e}");

    // Wrong magic: a labels file where the images should be.
    std::fs::write(&images, gzip(&idx_bytes(IDX_LABELS_MAGIC, &[5], &[1u8; 5]))).unwrap();
    let e = err_text(load_fashion_mnist(Some(&dir), Split::Train, None));
    assert!(
        e.contains("train-images-idx3-ubyte.gz") && e.contains("magic"),
        "{e}"
    );

    // Trailing garbage past the declared size.
    let long = idx_bytes(IDX_IMAGES_MAGIC, &[5, 4, 3], &[0u8; 64]);
    std::fs::write(&images, gzip(&long)).unwrap();
    let e = err_text(load_fashion_mnist(Some(&dir), Split::Train, None));
    assert!(
        e.contains("train-images-idx3-ubyte.gz") && e.contains("4 bytes past"),
        "{e}"
    );

    // Image and label counts that disagree.
    write_split(&dir, "train", 5, 6);
    let e = err_text(load_fashion_mnist(Some(&dir), Split::Train, None));
    assert!(
        e.contains("train-labels-idx1-ubyte.gz") && e.contains("6 labels"),
        "{e}"
    );

    // A label outside 0..10.
    write_split(&dir, "train", 3, 3);
    std::fs::write(
        &labels,
        gzip(&idx_bytes(IDX_LABELS_MAGIC, &[3], &[1, 12, 3])),
    )
    .unwrap();
    let e = err_text(load_fashion_mnist(Some(&dir), Split::Train, None));
    assert!(
        e.contains("train-labels-idx1-ubyte.gz") && e.contains("label 12"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_fixture_data_set_is_fashion_mnist_shaped_balanced_and_separable() {
    let dir = scratch("fixture");
    write_fashion_mnist(&dir, 200, 100).unwrap();
    let train = load_fashion_mnist(Some(&dir), Split::Train, None).unwrap();
    let test = load_fashion_mnist(Some(&dir), Split::Test, None).unwrap();
    assert_eq!((train.len(), test.len()), (200, 100));
    assert_eq!((test.channels, test.height, test.width), (1, 28, 28));
    let mut counts = [0usize; 10];
    for &l in &test.labels {
        counts[l as usize] += 1;
    }
    assert_eq!(counts, [10; 10], "balanced");
    // Each class is brightest in its own place: the mean image of a class differs from every
    // other class' mean image.
    let mean_of = |c: i32| -> Vec<f32> {
        let idx: Vec<usize> = (0..train.len()).filter(|&i| train.labels[i] == c).collect();
        (0..784)
            .map(|p| {
                idx.iter().map(|&i| train.image(i).unwrap()[p]).sum::<f32>() / idx.len() as f32
            })
            .collect()
    };
    let means: Vec<Vec<f32>> = (0..10).map(mean_of).collect();
    for a in 0..10 {
        for b in a + 1..10 {
            let d: f32 = means[a]
                .iter()
                .zip(&means[b])
                .map(|(x, y)| (x - y).abs())
                .sum();
            assert!(d > 100.0, "classes {a} and {b} look alike ({d})");
        }
    }
    // Written twice, the same bytes (processes sharing the folder agree).
    let first = std::fs::read(dir.join("train-images-idx3-ubyte.gz")).unwrap();
    write_fashion_mnist(&dir, 200, 100).unwrap();
    assert_eq!(
        first,
        std::fs::read(dir.join("train-images-idx3-ubyte.gz")).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn fortunes_are_split_on_percent_lines() {
    let dir = scratch("fortunes");
    std::fs::write(
        dir.join("b-jokes"),
        "First one.\n%\n  Second,\ntwo lines.  \n%\n%\nThird.\n",
    )
    .unwrap();
    std::fs::write(dir.join("a-wisdom"), "Alpha.\n%\nBeta.\n%\n").unwrap();
    std::fs::write(dir.join("a-wisdom.dat"), [0u8, 1, 2, 3]).unwrap();
    std::fs::write(dir.join("a-wisdom.u8"), "Not me.\n%\n").unwrap();
    std::fs::create_dir(dir.join("off")).unwrap();
    std::fs::write(dir.join("off").join("rude"), "Hidden.\n%\n").unwrap();
    let f = load_fortunes(Some(&dir)).unwrap();
    assert_eq!(
        f,
        vec![
            "Alpha.",
            "Beta.",
            "First one.",
            "Second,\ntwo lines.",
            "Third."
        ]
    );

    let empty = scratch("fortunes-empty");
    let e = err_text(load_fortunes(Some(&empty)));
    assert!(e.contains("RECYCLE_TEXT_DIR"), "{e}");
    let e = err_text(load_fortunes(Some(&dir.join("nope"))));
    assert!(e.contains("nope") && e.contains("RECYCLE_TEXT_DIR"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&empty).unwrap();
}

/// A small corpus: the generated fortunes, found through `RECYCLE_TEXT_DIR` as the trainer
/// finds them (a slice, to stay fast).
fn corpus() -> Vec<String> {
    use_fixture_data(Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap();
    let f = load_fortunes(None).unwrap();
    assert!(f.len() >= 1500, "only {} fortunes", f.len());
    f.into_iter().take(1500).collect()
}

#[test]
fn wordpiece_training_gives_the_same_vocabulary_every_time() {
    // Two experiments on the same corpus must see the same token ids (a teacher's logits index
    // them); hash-map order once made each training differ.
    let texts = corpus();
    let a = TextTokenizer::train(&texts, 1000).unwrap();
    let b = TextTokenizer::train(&texts, 1000).unwrap();
    assert_eq!(a.vocab_size(), b.vocab_size());
    let (va, vb) = (a.inner().get_vocab(true), b.inner().get_vocab(true));
    assert_eq!(va, vb);
    for t in texts.iter().take(200) {
        assert_eq!(a.encode(t).unwrap(), b.encode(t).unwrap());
    }
}

#[test]
fn wordpiece_train_save_load() {
    let texts = corpus();
    let tok = TextTokenizer::train(&texts, 1000).unwrap();
    for (id, name) in SPECIAL_TOKENS.iter().enumerate() {
        assert_eq!(tok.inner().token_to_id(name), Some(id as u32));
    }
    assert_eq!(tok.pad_id(), 0);
    assert_eq!((tok.cls_id(), tok.sep_id(), tok.mask_id()), (2, 3, 4));
    assert!(
        tok.vocab_size() <= 1000 + 50 && tok.vocab_size() > 100,
        "{}",
        tok.vocab_size()
    );

    let ids = tok.encode("The Quick brown fox.").unwrap();
    assert!(!ids.is_empty() && ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
    assert_eq!(
        ids,
        tok.encode("the quick BROWN fox.").unwrap(),
        "lower-cased"
    );
    assert_eq!(tok.decode(&ids).unwrap(), "the quick brown fox.");

    let dir = scratch("tokenizer");
    let path = dir.join("tokenizer.json");
    tok.save(&path).unwrap();
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    let back = TextTokenizer::from_file(&path).unwrap();
    assert_eq!(back.vocab_size(), tok.vocab_size());
    assert_eq!(back.special_ids(), tok.special_ids());
    for t in texts.iter().take(50) {
        assert_eq!(back.encode(t).unwrap(), tok.encode(t).unwrap());
    }

    std::fs::write(&path, "{ not json").unwrap();
    let e = err_text(TextTokenizer::from_file(&path));
    assert!(e.contains("tokenizer.json"), "{e}");
    let e = err_text(TextTokenizer::from_file(&dir.join("absent.json")));
    assert!(e.contains("absent.json"), "{e}");
    assert!(TextTokenizer::train(&texts, 3).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn load_or_train_publishes_once() {
    let texts = corpus();
    let dir = scratch("load-or-train");
    let path = dir.join("tokenizer.json");
    // Two racing processes (threads here): both must end up with the one file on disk.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| TextTokenizer::load_or_train(&path, &texts[..300], 400).unwrap());
        let b = s.spawn(|| TextTokenizer::load_or_train(&path, &texts[300..600], 400).unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(a.inner().get_vocab(true), b.inner().get_vocab(true));
    // An existing file is loaded, not retrained (a different size would show).
    let c = TextTokenizer::load_or_train(&path, &texts, 900).unwrap();
    assert_eq!(c.inner().get_vocab(true), a.inner().get_vocab(true));
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mlm_packing_and_split() {
    let texts = corpus();
    let tok = TextTokenizer::train(&texts, 800).unwrap();
    let seq_len = 32;
    let (train, eval) = MlmDataset::build(&texts, &tok, seq_len, 10, 5).unwrap();
    assert!(!train.is_empty() && !eval.is_empty());
    assert!(
        eval.len() * 5 < train.len(),
        "{} vs {}",
        eval.len(),
        train.len()
    );

    let (cls, sep, pad) = (
        tok.cls_id() as i32,
        tok.sep_id() as i32,
        tok.pad_id() as i32,
    );
    let count_tokens = |ds: &MlmDataset| {
        let mut n = 0;
        for i in 0..ds.len() {
            let (ids, att) = ds.sequence(i).unwrap();
            assert_eq!(ids.len(), seq_len);
            assert_eq!(ids[0], cls);
            let real = att.iter().filter(|&&a| a == 1).count();
            assert!(att[..real].iter().all(|&a| a == 1) && att[real..].iter().all(|&a| a == 0));
            assert_eq!(ids[real - 1], sep);
            assert!(ids[real..].iter().all(|&t| t == pad));
            n += ids[..real]
                .iter()
                .filter(|&&t| t != cls && t != sep)
                .count();
        }
        n
    };
    // Every token of every text lands in exactly one split, in its own split.
    let per_text: Vec<usize> = texts.iter().map(|t| tok.encode(t).unwrap().len()).collect();
    let want_eval: usize = per_text.iter().skip(9).step_by(10).sum();
    let want_train: usize = per_text.iter().sum::<usize>() - want_eval;
    assert_eq!(count_tokens(&train), want_train);
    assert_eq!(count_tokens(&eval), want_eval);

    let (all, none) = MlmDataset::build(&texts, &tok, seq_len, 0, 5).unwrap();
    assert!(none.is_empty() && all.len() > train.len());
    assert!(MlmDataset::build(&texts, &tok, 2, 10, 5).is_err());
}

#[test]
fn masking_rates_and_reproducibility() {
    // 64 sequences of 128: ids 5.. in a vocab of 1000, specials 0..5, the tail padded.
    let (b, s, vocab, mask_id) = (64usize, 128usize, 1000usize, 4);
    let special = [0, 1, 2, 3, 4];
    let mut ids = Vec::new();
    let mut att = Vec::new();
    for r in 0..b {
        let real = 100 + r % 20;
        for p in 0..s {
            if p == 0 {
                ids.push(2);
            } else if p < real {
                ids.push(5 + ((r * 131 + p * 17) % 995) as i32);
            } else {
                ids.push(0);
            }
            att.push((p < real) as i32);
        }
    }
    let (mut eligible, mut chosen, mut masked, mut random, mut kept) = (0, 0, 0, 0, 0);
    for step in 0..20 {
        let (input, labels) = mask_tokens(&ids, &att, &special, vocab, mask_id, 11, step).unwrap();
        for i in 0..ids.len() {
            let is_eligible = att[i] == 1 && ids[i] >= 5;
            eligible += is_eligible as usize;
            if labels[i] == IGNORE_LABEL {
                assert_eq!(input[i], ids[i], "unchosen positions are untouched");
                continue;
            }
            assert!(is_eligible, "special or padding position {i} chosen");
            assert_eq!(labels[i], ids[i]);
            chosen += 1;
            if input[i] == mask_id {
                masked += 1;
            } else if input[i] == ids[i] {
                kept += 1;
            } else {
                assert!(
                    (5..vocab as i32).contains(&input[i]),
                    "random id {}",
                    input[i]
                );
                random += 1;
            }
        }
    }
    let rate = chosen as f64 / eligible as f64;
    assert!(
        (rate - 0.15).abs() < 0.005,
        "chosen rate {rate} of {eligible}"
    );
    let frac = |k: usize| k as f64 / chosen as f64;
    // A random draw equal to the original (1 in 995) counts as kept: negligible here.
    assert!((frac(masked) - 0.8).abs() < 0.01, "mask {}", frac(masked));
    assert!((frac(random) - 0.1).abs() < 0.01, "random {}", frac(random));
    assert!((frac(kept) - 0.1).abs() < 0.01, "kept {}", frac(kept));

    let a = mask_tokens(&ids, &att, &special, vocab, mask_id, 11, 3).unwrap();
    assert_eq!(
        a,
        mask_tokens(&ids, &att, &special, vocab, mask_id, 11, 3).unwrap()
    );
    assert_ne!(
        a,
        mask_tokens(&ids, &att, &special, vocab, mask_id, 11, 4).unwrap()
    );
    assert_ne!(
        a,
        mask_tokens(&ids, &att, &special, vocab, mask_id, 12, 3).unwrap()
    );
    assert!(mask_tokens(&ids, &att[1..], &special, vocab, mask_id, 11, 3).is_err());
}

#[test]
fn masking_never_leaves_a_batch_without_a_target() {
    // [CLS] x [SEP] [PAD]: one eligible token, chosen 15% of the time by the draw alone.
    let ids = [2, 77, 3, 0];
    let att = [1, 1, 1, 0];
    for step in 0..200 {
        let (input, labels) = mask_tokens(&ids, &att, &[0, 1, 2, 3, 4], 100, 4, 1, step).unwrap();
        assert_eq!(labels, [IGNORE_LABEL, 77, IGNORE_LABEL, IGNORE_LABEL]);
        assert!(input[1] == 4 || (5..100).contains(&input[1]), "{input:?}");
    }
    // Nothing eligible: nothing to mask, no error.
    let (input, labels) = mask_tokens(&[2, 3, 0], &[1, 1, 0], &[0, 2, 3], 10, 4, 1, 0).unwrap();
    assert_eq!(input, [2, 3, 0]);
    assert!(labels.iter().all(|&l| l == IGNORE_LABEL));
}

/// A source whose batch is just its indices (and step), for checking the loader's walk.
struct Indices {
    n: usize,
    calls: AtomicUsize,
    fail_at: Option<u64>,
    panic_at: Option<u64>,
}

impl Indices {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Indices {
            n,
            calls: AtomicUsize::new(0),
            fail_at: None,
            panic_at: None,
        })
    }
}

impl BatchSource for Indices {
    type Batch = (u64, Vec<usize>);
    fn len(&self) -> usize {
        self.n
    }
    fn make_batch(&self, indices: &[usize], step: u64) -> Result<(u64, Vec<usize>)> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_at == Some(step) {
            return Err(Error::invalid(
                "Indices",
                format!("bad item at step {step}"),
            ));
        }
        if self.panic_at == Some(step) {
            panic!("boom at step {step}");
        }
        Ok((step, indices.to_vec()))
    }
}

fn take_steps(loader: &mut Loader<Indices>, k: usize) -> Vec<(u64, Vec<usize>)> {
    loader.by_ref().take(k).map(|b| b.unwrap()).collect()
}

#[test]
fn loader_epochs_are_seeded_permutations() {
    let src = Indices::new(10);
    let mut loader = Loader::new(src.clone(), LoaderConfig::train(3, 42), 0).unwrap();
    assert_eq!(loader.steps_per_epoch(), 3);
    let batches = take_steps(&mut loader, 9);
    for (k, (step, idx)) in batches.iter().enumerate() {
        assert_eq!(*step, k as u64);
        assert_eq!(idx.len(), 3, "training drops the partial batch");
    }
    for epoch in 0..3 {
        let mut seen: Vec<usize> = batches[epoch * 3..epoch * 3 + 3]
            .iter()
            .flat_map(|b| b.1.clone())
            .collect();
        let order = epoch_order(10, 42, epoch as u64, true);
        assert_eq!(seen, order[..9]);
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 9, "no repeats within an epoch");
    }
    assert_ne!(epoch_order(10, 42, 0, true), epoch_order(10, 42, 1, true));
    assert_ne!(epoch_order(10, 42, 0, true), epoch_order(10, 43, 0, true));
    assert_eq!(loader.step(), 9);
    assert_eq!(loader.epoch(), 3);

    // Same seed, same batches.
    let mut again = Loader::new(src, LoaderConfig::train(3, 42), 0).unwrap();
    assert_eq!(take_steps(&mut again, 9), batches);
}

#[test]
fn loader_resumes_at_any_step() {
    let src = Indices::new(23);
    let cfg = LoaderConfig::train(4, 7);
    let full = take_steps(&mut Loader::new(src.clone(), cfg.clone(), 0).unwrap(), 30);
    for start in [1u64, 5, 6, 11, 17] {
        let resumed = take_steps(
            &mut Loader::new(src.clone(), cfg.clone(), start).unwrap(),
            10,
        );
        assert_eq!(
            resumed[..],
            full[start as usize..start as usize + 10],
            "start {start}"
        );
    }
}

#[test]
fn eval_loader_is_one_ordered_pass_with_the_partial_batch() {
    let src = Indices::new(10);
    let batches: Vec<_> = Loader::new(src, LoaderConfig::eval(4), 0)
        .unwrap()
        .map(|b| b.unwrap().1)
        .collect();
    assert_eq!(
        batches,
        vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]
    );
    assert_eq!(steps_per_epoch(10, 4, false), 3);
    assert_eq!(steps_per_epoch(10, 4, true), 2);

    assert!(Loader::new(Indices::new(3), LoaderConfig::train(4, 0), 0).is_err());
    assert!(Loader::new(Indices::new(3), LoaderConfig::train(0, 0), 0).is_err());
}

#[test]
fn loader_errors_reach_the_consumer() {
    let src = Arc::new(Indices {
        fail_at: Some(4),
        ..Arc::into_inner(Indices::new(20)).unwrap()
    });
    let items: Vec<_> = Loader::new(src, LoaderConfig::train(2, 1), 0)
        .unwrap()
        .collect();
    assert_eq!(items.len(), 5, "four batches, then the error, then the end");
    assert!(items[..4].iter().all(|b| b.is_ok()));
    let e = items[4].as_ref().unwrap_err().to_string();
    assert!(e.contains("bad item at step 4"), "{e}");

    let src = Arc::new(Indices {
        panic_at: Some(2),
        ..Arc::into_inner(Indices::new(20)).unwrap()
    });
    let items: Vec<_> = Loader::new(src, LoaderConfig::train(2, 1), 0)
        .unwrap()
        .collect();
    assert_eq!(items.len(), 3);
    let e = items[2].as_ref().unwrap_err().to_string();
    assert!(
        e.contains("panicked") && e.contains("boom at step 2"),
        "{e}"
    );
}

#[test]
fn dropping_the_loader_stops_its_thread() {
    let src = Indices::new(100);
    let mut loader = Loader::new(src.clone(), LoaderConfig::train(5, 3), 0).unwrap();
    take_steps(&mut loader, 2);
    drop(loader); // joins the producer
    let calls = src.calls.load(Ordering::SeqCst);
    // Two consumed, at most `prefetch` waiting and one in hand when the channel closed.
    assert!((2..=2 + 3 + 1).contains(&calls), "{calls} batches made");
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(
        src.calls.load(Ordering::SeqCst),
        calls,
        "the thread is gone"
    );
    // One strong reference left: ours (the thread's copy was dropped with it).
    assert_eq!(Arc::strong_count(&src), 1);
}

#[test]
fn image_and_mlm_batches_through_the_loader() {
    let images = Arc::new(ImageDataset {
        images: (0..6 * 4).map(|i| i as f32).collect(),
        labels: vec![0, 1, 2, 3, 4, 5],
        channels: 1,
        height: 2,
        width: 2,
        classes: 10,
    });
    let mut loader = Loader::new(images.clone(), LoaderConfig::train(4, 9), 0).unwrap();
    let batch = loader.next().unwrap().unwrap();
    assert_eq!(batch.x.shape(), &[4, 1, 2, 2]);
    assert_eq!(batch.labels.shape(), &[4]);
    let x = batch.x.to_vec::<f32>().unwrap();
    for (k, &label) in batch.labels.to_vec::<i32>().unwrap().iter().enumerate() {
        assert_eq!(
            x[k * 4..k * 4 + 4],
            images.images[label as usize * 4..label as usize * 4 + 4]
        );
    }
    assert!(images.make_batch(&[6], 0).is_err());

    let texts = corpus();
    let tok = TextTokenizer::train(&texts[..400], 600).unwrap();
    let (train, _) = MlmDataset::build(&texts[..400], &tok, 24, 10, 1).unwrap();
    let train = Arc::new(train);
    let cfg = LoaderConfig::train(8, 2);
    let a: Vec<_> = Loader::new(train.clone(), cfg.clone(), 0)
        .unwrap()
        .take(3)
        .collect();
    let b: Vec<_> = Loader::new(train.clone(), cfg, 2)
        .unwrap()
        .take(1)
        .collect();
    let (a, b) = (a[2].as_ref().unwrap(), b[0].as_ref().unwrap());
    for t in [
        &a.input_ids,
        &a.token_type_ids,
        &a.attention_mask,
        &a.position_labels,
    ] {
        assert_eq!(t.shape(), &[8, 24]);
    }
    assert_eq!(
        a.input_ids.to_vec::<i32>().unwrap(),
        b.input_ids.to_vec::<i32>().unwrap()
    );
    assert_eq!(
        a.position_labels.to_vec::<i32>().unwrap(),
        b.position_labels.to_vec::<i32>().unwrap(),
        "resumed masks match"
    );
    assert!(a
        .token_type_ids
        .to_vec::<i32>()
        .unwrap()
        .iter()
        .all(|&t| t == 0));
    let labels = a.position_labels.to_vec::<i32>().unwrap();
    let att = a.attention_mask.to_vec::<i32>().unwrap();
    assert!(labels.iter().any(|&l| l != IGNORE_LABEL));
    for (l, m) in labels.iter().zip(&att) {
        assert!(
            *l == IGNORE_LABEL || *m == 1,
            "a padded position is a target"
        );
    }
}
