//! Masked-language-model batches streamed from text shards ([`super::text_shards`]): documents
//! are read in order, tokenised a chunk at a time on the `tokenizers` thread pool, packed into
//! `seq_len` sequences with `[CLS]` / `[SEP]` and masked by BERT's rule ([`mask_tokens`]) on a
//! producer thread that stays a few batches ahead of the trainer. Memory is bounded by one
//! chunk of documents and the prefetched batches, whatever the corpus size.
//!
//! Packing, as BERT's pre-training data:
//! - `concatenate` (the default): documents follow each other, separated by `[SEP]`, and every
//!   sequence is `[CLS]` + `seq_len - 2` tokens of that stream + `[SEP]`, so no position is
//!   padding (a document continues in the next sequence);
//! - `truncate`: one document per sequence, `[CLS] doc [SEP]`, cut to `seq_len` and padded.
//!
//! Determinism: sequence `k` of the stream is fixed by the files and the tokenizer, step `s`
//! takes sequences `s * B .. (s + 1) * B` (the stream starts again at the first file when it
//! ends), and its mask is drawn from `(seed, s)` and the position: a batch is reproduced
//! exactly, and a resumed run continues with the batch it would have seen (it reads and
//! tokenises the skipped part again to get there). The order is that of the files; C4's shards
//! are shuffled as published.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use super::text::{mask_tokens, MlmBatch, MlmDataset, TextTokenizer};
use super::text_shards::{documents, ShardFormat};
use crate::engine::{Device, Error, Result, Tensor};

/// How documents become sequences (see the module's documentation).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Packing {
    #[default]
    Concatenate,
    Truncate,
}

/// Documents tokenised together (one call into the tokenizer's thread pool) ...
const CHUNK_DOCS: usize = 1024;
/// ... or fewer, when they hold this much text.
const CHUNK_BYTES: usize = 4 << 20;

/// Turns token ids of documents into sequences of `seq_len`.
struct Packer {
    seq_len: usize,
    packing: Packing,
    cls: i32,
    sep: i32,
    pad: i32,
    /// Concatenate: the token stream not yet in a sequence (documents separated by `[SEP]`).
    pending: VecDeque<i32>,
    /// Finished sequences: ids and the count of real (non-padding) tokens.
    ready: VecDeque<(Vec<i32>, usize)>,
}

impl Packer {
    fn new(tokenizer: &TextTokenizer, seq_len: usize, packing: Packing) -> Packer {
        Packer {
            seq_len,
            packing,
            cls: tokenizer.cls_id() as i32,
            sep: tokenizer.sep_id() as i32,
            pad: tokenizer.pad_id() as i32,
            pending: VecDeque::new(),
            ready: VecDeque::new(),
        }
    }

    fn emit(&mut self, body: impl Iterator<Item = i32>) {
        let mut seq = Vec::with_capacity(self.seq_len);
        seq.push(self.cls);
        seq.extend(body);
        seq.push(self.sep);
        let n = seq.len();
        seq.resize(self.seq_len, self.pad);
        self.ready.push_back((seq, n));
    }

    fn push(&mut self, ids: &[u32]) {
        if ids.is_empty() {
            return;
        }
        let body = self.seq_len - 2;
        match self.packing {
            Packing::Truncate => self.emit(ids[..ids.len().min(body)].iter().map(|&t| t as i32)),
            Packing::Concatenate => {
                if !self.pending.is_empty() {
                    self.pending.push_back(self.sep);
                }
                self.pending.extend(ids.iter().map(|&t| t as i32));
                while self.pending.len() >= body {
                    let chunk: Vec<i32> = self.pending.drain(..body).collect();
                    self.emit(chunk.into_iter());
                    // A document boundary right at the cut: the next sequence starts with the
                    // next document, not with its separator.
                    if self.pending.front() == Some(&self.sep) {
                        self.pending.pop_front();
                    }
                }
            }
        }
    }

    /// The last, partial sequence (padded), at the end of a finite read.
    fn flush(&mut self) {
        if !self.pending.is_empty() {
            let rest: Vec<i32> = self.pending.drain(..).collect();
            self.emit(rest.into_iter());
        }
    }
}

/// A streamed training set: the shards, how to read and pack them, and the masking seed.
#[derive(Debug, Clone)]
pub struct TextShards {
    pub files: Vec<PathBuf>,
    pub format: ShardFormat,
    pub tokenizer: TextTokenizer,
    pub seq_len: usize,
    pub packing: Packing,
    /// Seed of the masking stream (with the step).
    pub seed: u64,
}

impl TextShards {
    fn check(&self) -> Result<()> {
        if self.seq_len < 3 {
            return Err(Error::invalid(
                "TextShards",
                format!(
                    "seq_len {} cannot hold [CLS], a token and [SEP]",
                    self.seq_len
                ),
            ));
        }
        if self.files.is_empty() {
            return Err(Error::invalid("TextShards", "no shard files"));
        }
        Ok(())
    }

    fn packer(&self) -> Packer {
        Packer::new(&self.tokenizer, self.seq_len, self.packing)
    }

    /// Reads the shards once, from the start, calling `each` with every sequence (ids, real
    /// tokens) until it returns `false`; the last partial sequence is included when `flush`,
    /// otherwise it stays in `packer` (the next pass continues it). Returns whether the shards
    /// held any token.
    fn for_each_sequence(
        &self,
        packer: &mut Packer,
        flush: bool,
        mut each: impl FnMut(Vec<i32>, usize) -> Result<bool>,
    ) -> Result<bool> {
        let mut any = false;
        let mut docs = documents(&self.files, &self.format);
        loop {
            let mut chunk: Vec<String> = Vec::new();
            let mut bytes = 0;
            for doc in docs.by_ref() {
                let doc = doc?;
                bytes += doc.len();
                chunk.push(doc);
                if chunk.len() >= CHUNK_DOCS || bytes >= CHUNK_BYTES {
                    break;
                }
            }
            let last = chunk.is_empty();
            for ids in self.tokenizer.encode_batch(&chunk)? {
                any |= !ids.is_empty();
                packer.push(&ids);
            }
            if last && flush {
                packer.flush();
            }
            while let Some((seq, n)) = packer.ready.pop_front() {
                if !each(seq, n)? {
                    return Ok(any);
                }
            }
            if last {
                return Ok(any);
            }
        }
    }

    fn empty_set(&self) -> MlmDataset {
        MlmDataset {
            seq_len: self.seq_len,
            input_ids: Vec::new(),
            attention_mask: Vec::new(),
            vocab_size: self.tokenizer.vocab_size(),
            mask_id: self.tokenizer.mask_id() as i32,
            special_ids: self
                .tokenizer
                .special_ids()
                .iter()
                .map(|&s| s as i32)
                .collect(),
            seed: self.seed,
        }
    }

    /// The first `limit` sequences (all when `None`), unmasked, for evaluation sets.
    pub fn collect(&self, limit: Option<usize>) -> Result<MlmDataset> {
        self.check()?;
        let mut ds = self.empty_set();
        let limit = limit.unwrap_or(usize::MAX);
        if limit == 0 {
            return Ok(ds);
        }
        self.for_each_sequence(&mut self.packer(), true, |seq, n| {
            ds.input_ids.extend_from_slice(&seq);
            ds.attention_mask
                .extend((0..self.seq_len).map(|i| (i < n) as i32));
            Ok(ds.len() < limit)
        })?;
        Ok(ds)
    }

    /// Held-out sequences split in two, `(validation, test)`: sequence `j` goes to validation
    /// when `floor((j + 1) * fraction) > floor(j * fraction)` (every tenth at 0.1), else to
    /// test; each split stops at `cap` sequences, and reading stops when both are full.
    pub fn split_held_out(&self, fraction: f64, cap: usize) -> Result<(MlmDataset, MlmDataset)> {
        self.check()?;
        let (mut validation, mut test) = (self.empty_set(), self.empty_set());
        if cap == 0 {
            return Ok((validation, test));
        }
        let mut j = 0usize;
        self.for_each_sequence(&mut self.packer(), true, |seq, n| {
            let to_validation = ((j + 1) as f64 * fraction).floor() > (j as f64 * fraction).floor();
            j += 1;
            let ds = if to_validation {
                &mut validation
            } else {
                &mut test
            };
            if ds.len() < cap {
                ds.input_ids.extend_from_slice(&seq);
                ds.attention_mask
                    .extend((0..self.seq_len).map(|i| (i < n) as i32));
            }
            let validation_full = fraction <= 0.0 || validation.len() >= cap;
            Ok(!(validation_full && test.len() >= cap))
        })?;
        Ok((validation, test))
    }

    /// The batch of `step` from its `batch_size` sequences: masked, as tensors `[B, S]`.
    fn batch(&self, ids: Vec<i32>, attention: Vec<i32>, step: u64) -> Result<MlmBatch> {
        let rows = ids.len() / self.seq_len;
        let special: Vec<i32> = self
            .tokenizer
            .special_ids()
            .iter()
            .map(|&s| s as i32)
            .collect();
        let (input, labels) = mask_tokens(
            &ids,
            &attention,
            &special,
            self.tokenizer.vocab_size(),
            self.tokenizer.mask_id() as i32,
            self.seed,
            step,
        )?;
        let shape = [rows, self.seq_len];
        Ok(MlmBatch {
            input_ids: Tensor::from_vec(input, &shape, Device::Cpu)?,
            token_type_ids: Tensor::from_vec(vec![0i32; ids.len()], &shape, Device::Cpu)?,
            attention_mask: Tensor::from_vec(attention, &shape, Device::Cpu)?,
            position_labels: Tensor::from_vec(labels, &shape, Device::Cpu)?,
        })
    }
}

/// Training batches from [`TextShards`], built on a producer thread `prefetch` batches ahead;
/// endless (the trainer decides when to stop). Iterate it for `Result<MlmBatch>`; an error
/// (a damaged shard, shards without text) arrives once and ends it. Dropping it stops and
/// joins the thread.
pub struct TextStreamLoader {
    rx: Option<Receiver<Result<MlmBatch>>>,
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    finished: bool,
}

impl TextStreamLoader {
    /// Starts at the batch of `start_step` (0 for a fresh run).
    pub fn new(
        shards: Arc<TextShards>,
        batch_size: usize,
        start_step: u64,
        prefetch: usize,
    ) -> Result<TextStreamLoader> {
        shards.check()?;
        if batch_size == 0 {
            return Err(Error::invalid(
                "TextStreamLoader",
                "batch_size must be at least 1",
            ));
        }
        let (tx, rx) = sync_channel(prefetch.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("text-shards".into())
            .spawn(move || produce(&shards, batch_size, start_step, &tx, &flag))
            .map_err(|e| Error::invalid("TextStreamLoader", format!("cannot start thread: {e}")))?;
        Ok(TextStreamLoader {
            rx: Some(rx),
            handle: Some(handle),
            stop,
            finished: false,
        })
    }
}

fn produce(
    shards: &TextShards,
    batch_size: usize,
    start_step: u64,
    tx: &SyncSender<Result<MlmBatch>>,
    stop: &AtomicBool,
) {
    let s = shards.seq_len;
    let mut skip = start_step.saturating_mul(batch_size as u64);
    let mut step = start_step;
    let (mut ids, mut attention) = (Vec::new(), Vec::new());
    let send = |item: Result<MlmBatch>| tx.send(item).is_ok();
    // One packer for every pass: the stream goes on from the end of the last shard into the
    // first one again.
    let mut packer = shards.packer();
    // Set when the consumer is gone or a batch failed (its error was sent): nothing more to do.
    let mut halted = false;
    loop {
        let pass = shards.for_each_sequence(&mut packer, false, |seq, n| {
            if stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
            if skip > 0 {
                skip -= 1;
                return Ok(true);
            }
            ids.extend_from_slice(&seq);
            attention.extend((0..s).map(|i| (i < n) as i32));
            if ids.len() == batch_size * s {
                let batch = shards.batch(
                    std::mem::take(&mut ids),
                    std::mem::take(&mut attention),
                    step,
                );
                step += 1;
                let failed = batch.is_err();
                if !send(batch) || failed {
                    halted = true;
                    return Ok(false);
                }
            }
            Ok(true)
        });
        if halted || stop.load(Ordering::Relaxed) {
            return;
        }
        match pass {
            Ok(true) => {}
            Ok(false) => {
                let first = shards.files[0].display();
                send(Err(Error::invalid(
                    "data.train",
                    format!(
                        "the {} shard files (first {first}) hold no text to train on",
                        shards.files.len()
                    ),
                )));
                return;
            }
            Err(e) => {
                send(Err(e));
                return;
            }
        }
    }
}

impl Iterator for TextStreamLoader {
    type Item = Result<MlmBatch>;

    fn next(&mut self) -> Option<Result<MlmBatch>> {
        if self.finished {
            return None;
        }
        match self.rx.as_ref()?.recv() {
            Ok(Ok(b)) => Some(Ok(b)),
            Ok(Err(e)) => {
                self.finished = true;
                Some(Err(e))
            }
            Err(_) => {
                self.finished = true;
                None
            }
        }
    }
}

impl Drop for TextStreamLoader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver wakes a producer blocked on a full channel.
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Up to `max_docs` documents (and about `max_bytes` of text) from the start of `files`: what a
/// WordPiece vocabulary is trained on when the recipe names no tokenizer.
pub fn sample_documents(
    files: &[PathBuf],
    format: &ShardFormat,
    max_docs: usize,
    max_bytes: usize,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut bytes = 0;
    for doc in documents(files, format) {
        let doc = doc?;
        bytes += doc.len();
        out.push(doc);
        if out.len() >= max_docs || bytes >= max_bytes {
            break;
        }
    }
    Ok(out)
}
