//! English text for masked-language-model training: fortune-mod's fortunes (found or
//! downloaded by [`super::locate`]), a WordPiece vocabulary, packed sequences and BERT's
//! masking.
//!
//! - [`load_fortunes`] reads the fortune files (entries separated by lines holding only `%`).
//! - [`TextTokenizer`] wraps a Hugging Face tokenizer: either a BERT-style WordPiece learned
//!   here deterministically ([`super::wordpiece`]; lower-casing, BERT pre-tokenisation, special tokens
//!   `[PAD]`=0, `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]`) or any `tokenizer.json`.
//! - [`MlmDataset`] packs consecutive texts into `[CLS] a [SEP] b [SEP] ... [PAD]...` sequences
//!   of a fixed length, split into train and eval by a fixed rule.
//! - [`mask_tokens`] applies BERT's masking (15% of the real tokens; of those 80% `[MASK]`, 10%
//!   a random token, 10% kept) with counter-based random numbers, so the mask of a batch is a
//!   pure function of `(seed, step)`: a resumed run sees exactly the masks it would have seen.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::{AddedToken, Tokenizer};

use super::loader::BatchSource;
use super::locate::locate;
use super::sources::FORTUNES;
use super::wordpiece::{learn_vocab, WordPieceOptions, CONTINUATION};
use super::{corrupt, missing};
use crate::engine::rng;
use crate::engine::{Device, Error, Result, Tensor};

/// The special tokens of a trained tokenizer, in id order (`[PAD]` is 0).
pub const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
/// BERT's masking rates.
pub const MASK_PROB: f32 = 0.15;
pub const MASK_TOKEN_PROB: f32 = 0.8;
pub const RANDOM_TOKEN_PROB: f32 = 0.1;
/// The label of positions that are not predicted (PyTorch's `ignore_index`).
pub const IGNORE_LABEL: i32 = -100;

/// Reads every fortune in `dir` (by default the folder [`locate`] finds or downloads): files in
/// name order, entries in file order, each trimmed, empty ones dropped. The `.dat` index files,
/// the `.u8` links, hidden files (such as a download in progress) and subdirectories (such as
/// the offensive `off/`) are skipped.
pub fn load_fortunes(dir: Option<&Path>) -> Result<Vec<String>> {
    let dir: PathBuf = locate(&FORTUNES, dir)?;
    if !dir.is_dir() {
        return Err(missing(&dir, &FORTUNES));
    }
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .map_err(|e| Error::io(&dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            let hidden = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            let skipped = hidden
                || matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("dat") | Some("u8")
                );
            // `is_file` follows links, so a link to a fortune file elsewhere still counts.
            !skipped && p.is_file()
        })
        .collect();
    files.sort();

    let mut fortunes = Vec::new();
    for path in &files {
        let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
        // A few fortune files carry Latin-1 bytes; a replacement character is harmless here.
        let text = String::from_utf8_lossy(&bytes);
        let mut entry = String::new();
        for line in text.lines() {
            if line.trim_end() == "%" {
                push_entry(&mut fortunes, &mut entry);
            } else {
                entry.push_str(line);
                entry.push('\n');
            }
        }
        push_entry(&mut fortunes, &mut entry);
    }
    if fortunes.is_empty() {
        return Err(Error::io(
            &dir,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "holds no fortunes; point {} at a folder of fortune files, or leave it \
                     unset to use Debian's {} or a download into the cache",
                    FORTUNES.dir_env, FORTUNES.system_package
                ),
            ),
        ));
    }
    Ok(fortunes)
}

fn push_entry(out: &mut Vec<String>, entry: &mut String) {
    let trimmed = entry.trim();
    if !trimmed.is_empty() {
        out.push(trimmed.to_string());
    }
    entry.clear();
}

/// A text tokenizer with the special tokens masked-language modelling needs.
///
/// Training is deterministic (see [`super::wordpiece`]); a run still saves its vocabulary and
/// loads it everywhere (see [`TextTokenizer::load_or_train`]), so that a teacher trained by an
/// older version keeps the vocabulary its weights were trained with.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    pad: u32,
    unk: Option<u32>,
    cls: u32,
    sep: u32,
    mask: u32,
    /// Every special token id (the five above and any added token marked special), sorted.
    special: Vec<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .finish()
    }
}

fn tk_err(op: &'static str, e: impl std::fmt::Display) -> Error {
    Error::invalid(op, e.to_string())
}

impl TextTokenizer {
    /// Trains a BERT-style WordPiece vocabulary of (at most, alphabet permitting) `vocab_size`
    /// tokens on `texts`: `BertNormalizer` (clean, lower-case, strip accents),
    /// `BertPreTokenizer` (whitespace and punctuation), WordPiece with `##` continuations,
    /// learned by [`learn_vocab`]: the same texts give the same vocabulary in every process.
    pub fn train<S: AsRef<str> + Sync>(texts: &[S], vocab_size: usize) -> Result<Self> {
        const OP: &str = "TextTokenizer::train";
        if vocab_size <= SPECIAL_TOKENS.len() {
            return Err(Error::invalid(
                OP,
                format!(
                    "vocab_size {vocab_size} leaves no room next to {} special tokens",
                    SPECIAL_TOKENS.len()
                ),
            ));
        }
        if texts.is_empty() {
            return Err(Error::invalid(OP, "no texts to train on"));
        }
        let vocab = learn_vocab(
            texts,
            &SPECIAL_TOKENS,
            WordPieceOptions {
                vocab_size,
                min_frequency: 2,
                limit_alphabet: 1000,
            },
        )?;
        let vocab: serde_json::Map<String, serde_json::Value> = vocab
            .into_iter()
            .enumerate()
            .map(|(id, piece)| (piece, serde_json::Value::from(id)))
            .collect();
        // Through text: the model's deserializer borrows its strings from the input.
        let model: WordPiece = serde_json::from_str(
            &serde_json::json!({
            "type": "WordPiece",
            "unk_token": "[UNK]",
            "continuing_subword_prefix": CONTINUATION,
            "max_input_chars_per_word": 100,
            "vocab": vocab,
            })
            .to_string(),
        )
        .map_err(|e| tk_err(OP, e))?;
        let mut tokenizer = Tokenizer::new(model);
        tokenizer
            .with_normalizer(Some(BertNormalizer::default()))
            .map_err(|e| tk_err(OP, e))?;
        tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
        tokenizer.with_decoder(Some(WordPieceDecoder::default()));
        tokenizer
            .add_special_tokens(SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)))
            .map_err(|e| tk_err(OP, e))?;
        let tok = Self::wrap(tokenizer, Path::new("<trained>"))?;
        // The trainer adds the special tokens first, in order; the models rely on [PAD] = 0.
        for (id, name) in SPECIAL_TOKENS.iter().enumerate() {
            if tok.inner.token_to_id(name) != Some(id as u32) {
                return Err(Error::invalid(
                    OP,
                    format!("trained vocabulary gave {name} an id other than {id}"),
                ));
            }
        }
        Ok(tok)
    }

    /// Loads any Hugging Face `tokenizer.json`. Its special tokens are found by their BERT
    /// names (`[PAD]`, `[CLS]`, ...) or, failing that, RoBERTa's (`<pad>`, `<s>`, ...).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        // The JSON syntax first: the tokenizers crate panics (instead of failing) on some
        // malformed JSON inside its `decoder` (found by fuzzing), and this names line and column.
        serde_json::from_str::<serde::de::IgnoredAny>(&text)
            .map_err(|e| corrupt(path, format!("not valid JSON: {e}")))?;
        // Any other panic of that crate's parser is an error here, not a crash of the caller.
        let parsed = std::panic::catch_unwind(|| text.parse::<Tokenizer>()).map_err(|_| {
            corrupt(
                path,
                "not a valid tokenizer.json (the tokenizers library failed on it)".to_string(),
            )
        })?;
        let inner =
            parsed.map_err(|e| corrupt(path, format!("not a valid tokenizer.json: {e}")))?;
        Self::wrap(inner, path)
    }

    fn wrap(inner: Tokenizer, path: &Path) -> Result<Self> {
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let need = |names: &[&str]| {
            find(names).ok_or_else(|| {
                Error::io(
                    path,
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("tokenizer has no {} token", names.join(" or ")),
                    ),
                )
            })
        };
        let pad = need(&["[PAD]", "<pad>"])?;
        let cls = need(&["[CLS]", "<s>"])?;
        let sep = need(&["[SEP]", "</s>"])?;
        let mask = need(&["[MASK]", "<mask>"])?;
        let unk = find(&["[UNK]", "<unk>"]);
        let mut special: BTreeSet<u32> = [pad, cls, sep, mask].into_iter().collect();
        special.extend(unk);
        special.extend(
            inner
                .get_added_tokens_decoder()
                .into_iter()
                .filter(|(_, t)| t.special)
                .map(|(id, _)| id),
        );
        Ok(TextTokenizer {
            inner,
            pad,
            unk,
            cls,
            sep,
            mask,
            special: special.into_iter().collect(),
        })
    }

    /// Writes the tokenizer as `tokenizer.json` to `path`, atomically: a temporary file in the
    /// same directory, then a rename, so a crash never leaves a half-written file behind.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.write_atomic(path, false).map(|_| ())
    }

    /// Loads the tokenizer at `path` if there is one; otherwise trains one on `texts` and
    /// publishes it there. This is how runs should get their vocabulary: a teacher and its
    /// students must share one, including a teacher trained by an older version whose
    /// vocabulary training differed. Publishing never overwrites: when several processes race,
    /// the first file wins and every process returns what is on disk.
    pub fn load_or_train<S: AsRef<str> + Sync>(
        path: &Path,
        texts: &[S],
        vocab_size: usize,
    ) -> Result<Self> {
        if !path.exists() {
            Self::train(texts, vocab_size)?.write_atomic(path, true)?;
        }
        Self::from_file(path)
    }

    /// Writes to a temporary file next to `path`, then moves it into place: by rename
    /// (replacing any old file) or, with `keep_existing`, by hard link, which fails when `path`
    /// exists, so an existing file is left alone. Returns whether our file was placed.
    fn write_atomic(&self, path: &Path, keep_existing: bool) -> Result<bool> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| tk_err("TextTokenizer::save", e))?;
        let name = path
            .file_name()
            .ok_or_else(|| Error::invalid("TextTokenizer::save", "path has no file name"))?;
        let tmp = path.with_file_name(format!(
            ".{}.tmp{}-{}",
            name.to_string_lossy(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let result = fs::write(&tmp, json.as_bytes()).and_then(|()| {
            if keep_existing {
                match fs::hard_link(&tmp, path) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(e),
                }
            } else {
                fs::rename(&tmp, path).map(|()| true)
            }
        });
        // After a rename the temporary name is already gone; after a link it must go.
        let _ = fs::remove_file(&tmp);
        result.map_err(|e| Error::io(path, e))
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| tk_err("TextTokenizer::encode", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of many texts at once (in parallel), without special tokens.
    pub fn encode_batch<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>> {
        let inputs: Vec<&str> = texts.iter().map(|t| t.as_ref()).collect();
        let encs = self
            .inner
            .encode_batch(inputs, false)
            .map_err(|e| tk_err("TextTokenizer::encode_batch", e))?;
        Ok(encs.iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Text back from ids, special tokens dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| tk_err("TextTokenizer::decode", e))
    }

    /// Number of ids, added tokens included (the model's embedding rows).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }
    pub fn mask_id(&self) -> u32 {
        self.mask
    }
    pub fn cls_id(&self) -> u32 {
        self.cls
    }
    pub fn sep_id(&self) -> u32 {
        self.sep
    }
    pub fn unk_id(&self) -> Option<u32> {
        self.unk
    }
    /// All special ids (never masked, never drawn as random replacements), sorted.
    pub fn special_ids(&self) -> &[u32] {
        &self.special
    }
    /// The wrapped Hugging Face tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// BERT's masking of one batch (`ids` and `attention` of the same length, flattened `[B, S]`).
///
/// Each position with `attention != 0` whose id is not in `special` is chosen with probability
/// [`MASK_PROB`]; a chosen position becomes `mask_id` (80%), a random non-special id below
/// `vocab` (10%) or stays (10%). Returns `(input_ids, labels)`: labels hold the original id at
/// chosen positions and [`IGNORE_LABEL`] elsewhere. If no position is chosen but some could be,
/// the one with the smallest draw is chosen, so every batch has something to predict.
///
/// The draws are counter-based (`engine::rng`) on a stream derived from `(seed, step)`:
/// position `i` uses counters `3i`, `3i+1`, `3i+2`, so the result depends on nothing else.
pub fn mask_tokens(
    ids: &[i32],
    attention: &[i32],
    special: &[i32],
    vocab: usize,
    mask_id: i32,
    seed: u64,
    step: u64,
) -> Result<(Vec<i32>, Vec<i32>)> {
    if ids.len() != attention.len() {
        return Err(Error::shape(
            "mask_tokens",
            format!("{} ids vs {} attention values", ids.len(), attention.len()),
        ));
    }
    // A fixed tag keeps the masking stream apart from other users of the same seed.
    let stream = rng::bits_at(seed ^ 0x4d41_534b_4d4c_4d21, step);
    let mut specials: Vec<i32> = special.to_vec();
    specials.sort_unstable();
    specials.dedup();
    let in_vocab = specials
        .iter()
        .filter(|&&s| s >= 0 && (s as usize) < vocab)
        .count();
    let ordinary = vocab.saturating_sub(in_vocab) as u64;

    let mut input = ids.to_vec();
    let mut labels = vec![IGNORE_LABEL; ids.len()];
    let apply = |i: usize, input: &mut [i32], labels: &mut [i32]| {
        labels[i] = ids[i];
        let u = rng::uniform_at(stream, 3 * i as u64 + 1);
        if u < MASK_TOKEN_PROB {
            input[i] = mask_id;
        } else if u < MASK_TOKEN_PROB + RANDOM_TOKEN_PROB && ordinary > 0 {
            // The r-th non-special id: draw among the ordinary ids, then step over every
            // special id at or below it (ascending, so each skip is accounted for).
            let bits = rng::bits_at(stream, 3 * i as u64 + 2);
            let mut r = ((bits as u128 * ordinary as u128) >> 64) as i64;
            for &s in &specials {
                if (s as i64) <= r {
                    r += 1;
                }
            }
            input[i] = r as i32;
        }
    };

    let mut chosen = 0usize;
    let mut fallback: Option<(f32, usize)> = None;
    for i in 0..ids.len() {
        if attention[i] == 0 || specials.binary_search(&ids[i]).is_ok() {
            continue;
        }
        let u = rng::uniform_at(stream, 3 * i as u64);
        if u < MASK_PROB {
            apply(i, &mut input, &mut labels);
            chosen += 1;
        } else if fallback.is_none_or(|(best, _)| u < best) {
            fallback = Some((u, i));
        }
    }
    if chosen == 0 {
        if let Some((_, i)) = fallback {
            apply(i, &mut input, &mut labels);
        }
    }
    Ok((input, labels))
}

/// Packed, padded token sequences for masked-language modelling.
#[derive(Debug, Clone)]
pub struct MlmDataset {
    pub seq_len: usize,
    /// `len() * seq_len` ids: `[CLS] a [SEP] b [SEP] ... [PAD] ...`.
    pub input_ids: Vec<i32>,
    /// `len() * seq_len` values: 1 on real tokens (special ones included), 0 on padding.
    pub attention_mask: Vec<i32>,
    pub vocab_size: usize,
    pub mask_id: i32,
    /// Ids never masked nor drawn as replacements.
    pub special_ids: Vec<i32>,
    /// Seed of the masking stream (with the loader's step).
    pub seed: u64,
}

/// A batch for masked-language modelling, every tensor `[B, S]` i32.
#[derive(Debug, Clone)]
pub struct MlmBatch {
    /// Ids after masking.
    pub input_ids: Tensor,
    /// All zeros (one segment per sequence).
    pub token_type_ids: Tensor,
    /// 1 on real tokens, 0 on padding.
    pub attention_mask: Tensor,
    /// The original id at predicted positions, [`IGNORE_LABEL`] elsewhere.
    pub position_labels: Tensor,
}

impl MlmDataset {
    /// Tokenises `texts` and packs them into sequences of `seq_len` ids, returning
    /// `(train, eval)`.
    ///
    /// Split rule (deterministic, and by text, so no text is in both): text `j` (0-based, in
    /// the given order) goes to eval when `eval_every > 0` and `j % eval_every ==
    /// eval_every - 1`; so `eval_every = 20` keeps 5% for evaluation, spread over the whole
    /// corpus. Packing: consecutive texts of a split share a sequence while they fit; a text
    /// longer than `seq_len - 2` ids is cut into pieces that each open a fresh sequence.
    pub fn build<S: AsRef<str> + Sync>(
        texts: &[S],
        tokenizer: &TextTokenizer,
        seq_len: usize,
        eval_every: usize,
        seed: u64,
    ) -> Result<(MlmDataset, MlmDataset)> {
        if seq_len < 3 {
            return Err(Error::invalid(
                "MlmDataset::build",
                format!("seq_len {seq_len} cannot hold [CLS], a token and [SEP]"),
            ));
        }
        let encoded = tokenizer.encode_batch(texts)?;
        let is_eval = |j: usize| eval_every > 0 && j % eval_every == eval_every - 1;
        let pack = |eval: bool| {
            let mut ds = MlmDataset {
                seq_len,
                input_ids: Vec::new(),
                attention_mask: Vec::new(),
                vocab_size: tokenizer.vocab_size(),
                mask_id: tokenizer.mask_id() as i32,
                special_ids: tokenizer.special_ids().iter().map(|&s| s as i32).collect(),
                seed,
            };
            let (cls, sep, pad) = (
                tokenizer.cls_id() as i32,
                tokenizer.sep_id() as i32,
                tokenizer.pad_id() as i32,
            );
            let mut cur = vec![cls];
            for (_, ids) in encoded
                .iter()
                .enumerate()
                .filter(|(j, _)| is_eval(*j) == eval)
            {
                for piece in ids.chunks(seq_len - 2) {
                    if cur.len() + piece.len() + 1 > seq_len {
                        ds.push_sequence(&cur, pad);
                        cur.truncate(1);
                    }
                    cur.extend(piece.iter().map(|&t| t as i32));
                    cur.push(sep);
                }
            }
            if cur.len() > 1 {
                ds.push_sequence(&cur, pad);
            }
            ds
        };
        Ok((pack(false), pack(true)))
    }

    fn push_sequence(&mut self, tokens: &[i32], pad: i32) {
        let n = tokens.len();
        self.input_ids.extend_from_slice(tokens);
        self.input_ids
            .extend(std::iter::repeat_n(pad, self.seq_len - n));
        self.attention_mask.extend(std::iter::repeat_n(1, n));
        self.attention_mask
            .extend(std::iter::repeat_n(0, self.seq_len - n));
    }

    pub fn len(&self) -> usize {
        self.input_ids.len() / self.seq_len
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// `(ids, attention)` of sequence `i`, or `None` past the end.
    pub fn sequence(&self, i: usize) -> Option<(&[i32], &[i32])> {
        let range = i * self.seq_len..(i + 1) * self.seq_len;
        Some((
            self.input_ids.get(range.clone())?,
            self.attention_mask.get(range)?,
        ))
    }
}

impl BatchSource for MlmDataset {
    type Batch = MlmBatch;

    fn len(&self) -> usize {
        MlmDataset::len(self)
    }

    fn make_batch(&self, indices: &[usize], step: u64) -> Result<MlmBatch> {
        let s = self.seq_len;
        let mut ids = Vec::with_capacity(indices.len() * s);
        let mut attention = Vec::with_capacity(indices.len() * s);
        for &i in indices {
            let (seq, att) = self.sequence(i).ok_or_else(|| {
                Error::invalid(
                    "MlmDataset::make_batch",
                    format!("index {i} out of range for {} sequences", self.len()),
                )
            })?;
            ids.extend_from_slice(seq);
            attention.extend_from_slice(att);
        }
        let (input, labels) = mask_tokens(
            &ids,
            &attention,
            &self.special_ids,
            self.vocab_size,
            self.mask_id,
            self.seed,
            step,
        )?;
        let shape = [indices.len(), s];
        Ok(MlmBatch {
            input_ids: Tensor::from_vec(input, &shape, Device::Cpu)?,
            token_type_ids: Tensor::from_vec(vec![0i32; ids.len()], &shape, Device::Cpu)?,
            attention_mask: Tensor::from_vec(attention, &shape, Device::Cpu)?,
            position_labels: Tensor::from_vec(labels, &shape, Device::Cpu)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_replacements_skip_scattered_specials() {
        // Specials scattered through a vocab of 10: replacements come from the other six ids,
        // each about equally often.
        let special = [9, 3, 1, 4];
        let ids = vec![6; 4000];
        let att = vec![1; 4000];
        let mut seen = [0usize; 10];
        for step in 0..50 {
            let (input, labels) = mask_tokens(&ids, &att, &special, 10, 99, 5, step).unwrap();
            for (x, l) in input.iter().zip(&labels) {
                if *l != IGNORE_LABEL && *x != 99 {
                    seen[*x as usize] += 1;
                }
            }
        }
        for s in special {
            assert_eq!(seen[s as usize], 0, "special {s} drawn: {seen:?}");
        }
        // ~30000 chosen, 10% random over 6 ids plus 10% kept (id 6): ~500 each, ~3500 for 6.
        for id in [0, 2, 5, 7, 8] {
            assert!((350..650).contains(&seen[id]), "{seen:?}");
        }
        assert!(seen[6] > 3000, "{seen:?}");
    }

    #[test]
    fn fortune_entries_are_trimmed_and_non_empty() {
        let mut out = Vec::new();
        let mut entry = String::from("  \n");
        push_entry(&mut out, &mut entry);
        entry.push_str("\n  Hello,\n  world.  \n");
        push_entry(&mut out, &mut entry);
        assert_eq!(out, vec!["Hello,\n  world."]);
        assert!(entry.is_empty());
    }
}
