//! The bodies of the fuzz targets over the file parsers, one function per target. The
//! libFuzzer binaries (`fuzz_targets/`) call them on each input, and the property tests of the
//! main crate (`tests/fuzz_properties.rs`, which includes this file) call them on mutations of
//! the seed files, so a short version runs with every `cargo test`.
//!
//! The parsers read files, so each input is written to a scratch directory of this process
//! first; some targets split one input into the several files a reader needs. A function may
//! return or fail an assertion; a panic anywhere is a finding.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use recycle::data::fashion_mnist::{read_idx_gz, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC};
use recycle::data::image_folder::{FolderOptions, FolderSplit, Item, SkipLog, ViewKind};
use recycle::data::{load_fashion_mnist, load_fortunes, BatchSource, Split, TextTokenizer};
use recycle::engine::{checkpoint, Device, FlatParams};
use recycle::experiments::runlog::Run;
use recycle::experiments::RunLog;
use recycle::recipe::Recipe;

/// A directory of this process (and thread: the test harness runs targets in parallel) under
/// the system's temporary directory, created once.
fn scratch() -> PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    let base = BASE
        .get_or_init(|| std::env::temp_dir().join(format!("recycle-fuzz-{}", std::process::id())));
    let thread = format!("{:?}", std::thread::current().id());
    base.join(thread.trim_start_matches("ThreadId(").trim_end_matches(')'))
}

/// Writes `bytes` to `<scratch>/<name>` (replacing what was there) and returns the path.
fn put(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("scratch subdirectory");
    }
    std::fs::write(&path, bytes).expect("scratch file");
    path
}

/// Removes this thread's scratch directory.
pub fn clean_scratch() {
    let _ = std::fs::remove_dir_all(scratch());
}

/// Splits an input in two at a point its first two bytes choose (so that the fuzzer can
/// move the boundary).
fn split2(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 2 {
        return (data, &[]);
    }
    let at = u16::from_le_bytes([data[0], data[1]]) as usize;
    let rest = &data[2..];
    rest.split_at(at.min(rest.len()))
}

/// `bytes`, gzip-compressed (fast level: the fuzzer wants executions, not ratio).
fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).expect("gzip into memory");
    enc.finish().expect("gzip into memory")
}

fn parent(p: &Path) -> &Path {
    p.parent().expect("a scratch file is in a directory")
}

/// The recipe parser (TOML, and the JSON form the Python binding passes): any text is a recipe
/// or an error, and a recipe that parses writes back to TOML that parses to the same text.
pub fn recipe(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = Recipe::from_toml(text) {
        let again = r.to_toml().expect("a parsed recipe writes back");
        let back = Recipe::from_toml(&again).expect("a written recipe parses");
        assert_eq!(back.to_toml().unwrap(), again, "TOML round trip");
    }
    if let Ok(r) = Recipe::from_json(text) {
        let again = r.to_toml().expect("a parsed recipe writes back");
        Recipe::from_toml(&again).expect("a written recipe parses");
    }
}

/// The safetensors checkpoint loader: header, dtypes (f16 widened, i64 narrowed), shapes,
/// offsets, truncation. Any bytes load or give an error naming the file; what loads is then
/// matched against expected names and shapes and loaded into flat parameters.
pub fn checkpoint(data: &[u8]) {
    let path = put("checkpoint.safetensors", data);
    match checkpoint::load(&path) {
        Ok(ckpt) => {
            for (name, t) in &ckpt.tensors {
                assert_eq!(ckpt.get(name).map(|g| g.shape()), Some(t.shape()));
                let _ = t.to_vec_f32();
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("checkpoint.safetensors"), "{msg}");
        }
    }
    // The names and shapes of the seed `matching.safetensors`: its mutations reach the checks
    // of load_matching and load_params.
    let expected = [("a".to_string(), vec![2, 3]), ("b".to_string(), vec![4])];
    let _ = checkpoint::load_matching(&path, &expected);
    if let Ok(params) = FlatParams::new(&expected, Device::Cpu) {
        let _ = checkpoint::load_params(&path, &params);
    }
}

/// IDX files (the Fashion-MNIST reader): one input becomes an images file and a labels file,
/// gzip-compressed here (so that the fuzzer explores the IDX header and data, not the gzip
/// checksum) unless the first byte says to take the bytes as they are. Both the raw reader and
/// the data-set loader, with and without an item limit, give data or an error.
pub fn idx(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (images, labels) = split2(rest);
    let encode = |b: &[u8]| if mode & 1 == 0 { gzip(b) } else { b.to_vec() };
    let images_path = put("idx/train-images-idx3-ubyte.gz", &encode(images));
    let labels_path = put("idx/train-labels-idx1-ubyte.gz", &encode(labels));
    let limit = (mode & 2 != 0).then_some((mode >> 2) as usize);
    for magic in [IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC] {
        if let Ok(a) = read_idx_gz(&images_path, magic, limit) {
            let item: usize = a.dims[1..].iter().product();
            assert_eq!(a.data.len(), a.items * item);
        }
    }
    let _ = read_idx_gz(&labels_path, IDX_LABELS_MAGIC, limit);
    if let Ok(d) = load_fashion_mnist(Some(parent(&images_path)), Split::Train, limit) {
        for i in 0..d.len() {
            assert!(d.image(i).is_some());
        }
        let _ = d.make_batch(&(0..d.len()).collect::<Vec<_>>(), 0);
    }
}

/// The fortunes text reader: any bytes (Latin-1, broken UTF-8, lone `%` lines, CRLF) in two
/// files give trimmed, non-empty entries or an error.
pub fn fortunes(data: &[u8]) {
    let (a, b) = split2(data);
    let path = put("fortunes/a", a);
    put("fortunes/b", b);
    if let Ok(entries) = load_fortunes(Some(parent(&path))) {
        for e in &entries {
            assert!(
                !e.is_empty() && e.trim() == e,
                "entries are trimmed and non-empty"
            );
        }
    }
}

/// `tokenizer.json` loading: any bytes give a tokenizer with the special tokens masked
/// language modelling needs, or an error; one that loads encodes and decodes without panicking.
pub fn tokenizer(data: &[u8]) {
    let path = put("tokenizer.json", data);
    if let Ok(t) = TextTokenizer::from_file(&path) {
        if let Ok(ids) = t.encode("A fortune: [MASK] and caf\u{e9}, twice.") {
            let _ = t.decode(&ids);
        }
        let _ = t.decode(&[t.pad_id(), t.mask_id(), u32::MAX]);
    }
}

/// The run files `recycle report` reads: one input becomes a run directory's `summary.json`
/// and `log.jsonl`. Either the run loads or an error names the file; a run that loads gives
/// its evaluation curve and times without panicking.
pub fn runlog(data: &[u8]) {
    let (summary, log) = split2(data);
    let summary_path = put("run/summary.json", summary);
    let log_path = put("run/log.jsonl", log);
    if let Ok(l) = RunLog::read(&log_path) {
        let _ = l.eval_points();
    }
    if let Ok(run) = Run::load(parent(&summary_path)) {
        let _ = run.eval_curve();
        let _ = run.eval_curve_with_samples();
        let _ = run.samples_seen();
        let _ = run.seconds_per_sample();
        let _ = run.time_to_reach(run.summary.final_eval);
    }
}

/// Text shards (`[data] dataset = "text"`): one input is a JSON lines shard, gzip-compressed
/// when its first byte is odd, read to its end, and the same bytes as a plain-text shard in
/// blocks. Every document is non-empty, and an error names the file.
pub fn text_shards(data: &[u8]) {
    use recycle::data::text_shards::{documents, PlainDocuments, ShardFormat};
    let (flag, body) = match data.split_first() {
        Some((f, b)) => (*f, b),
        None => (0, data),
    };
    let (name, bytes) = if flag & 1 == 1 {
        ("shard.json.gz", gzip(body))
    } else {
        ("shard.jsonl", body.to_vec())
    };
    let json = put(name, &bytes);
    let plain = put("shard.txt", body);
    let blocks = ShardFormat {
        plain: PlainDocuments::Blocks,
        ..ShardFormat::default()
    };
    for (path, format) in [(&json, ShardFormat::default()), (&plain, blocks)] {
        for doc in documents(std::slice::from_ref(path), &format) {
            match doc {
                Ok(d) => assert!(!d.trim().is_empty(), "an empty document"),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains(&path.display().to_string()), "{msg}");
                }
            }
        }
    }
}

/// A Hugging Face BERT `config.json`: a valid configuration or an error naming the file.
pub fn hf_config(data: &[u8]) {
    let path = put("config.json", data);
    match recycle::models::hf_config::read_bert_config(&path) {
        Ok(c) => c.validate().expect("a parsed config is valid"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("config.json"), "{msg}");
        }
    }
}

/// The decode path of image folders: any bytes, named `.jpg` (the format is told by the bytes,
/// JPEG or PNG), give a decoded RGB image of consistent size or an error; through a folder's
/// training and evaluation splits they give finite `3 x 8 x 8` views or an error naming the
/// file.
pub fn image(data: &[u8]) {
    let_decoder_panics_unwind();
    // decode_rgb checks its own output sizes; the views below decode through it.
    static POOL: OnceLock<std::sync::Arc<rayon::ThreadPool>> = OnceLock::new();
    let pool = POOL.get_or_init(|| FolderSplit::decode_pool(1).expect("one decoding thread"));
    let path = put("image/train/c/input.jpg", data);
    let options = FolderOptions {
        image_size: 8,
        skip_bad: false,
        decode_threads: 1,
        // A few hundred bytes can declare a 100-megapixel progressive JPEG, whose decode is
        // legitimate but takes seconds (libFuzzer's timeout): what is fuzzed here is the
        // parsing, which a megapixel covers.
        max_pixels: 1 << 20,
    };
    for kind in [
        ViewKind::Train {
            seed: 0,
            steps_per_epoch: 1,
        },
        ViewKind::Eval,
    ] {
        let split = FolderSplit::new(
            vec![Item {
                path: path.clone(),
                label: 0,
            }],
            1,
            kind,
            options.clone(),
            pool.clone(),
            std::sync::Arc::new(SkipLog::default()),
        );
        match split.make_batch(&[0], 3) {
            Ok(b) => {
                assert_eq!(b.x.shape(), &[1, 3, 8, 8]);
                let x = b.x.to_vec_f32().expect("a CPU batch reads back");
                assert!(
                    x.iter().all(|v| v.is_finite()),
                    "a view holds a non-finite value"
                );
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("input.jpg"), "{msg}");
            }
        }
    }
}

/// The JPEG and PNG decoders are third-party code that can panic on hostile bytes (zune-jpeg
/// 0.5.15 unwraps in its AVX2 IDCT): `decode_rgb` runs them inside `catch_unwind` and turns a
/// panic into an error naming the file, which the target then checks. libFuzzer's panic hook
/// aborts on every panic, before any unwinding; this hook lets a panic raised inside those
/// crates unwind to that catch, and hands every other panic to libFuzzer's hook, a finding.
fn let_decoder_panics_unwind() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let fuzzer_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_decoder = info.location().is_some_and(|l| {
                let file = l.file();
                ["/zune-jpeg-", "/zune-core-", "/png-"]
                    .iter()
                    .any(|c| file.contains(c))
            });
            if !in_decoder {
                fuzzer_hook(info);
            }
        }));
    });
}
