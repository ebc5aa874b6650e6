//! Learning a WordPiece vocabulary, deterministically.
//!
//! The `tokenizers` crate's trainer breaks ties between equally frequent characters and pairs
//! through randomly seeded hash maps, so two processes trained on the same texts get different
//! vocabularies, and two runs of the same experiment different numbers. This trainer makes
//! the same choices every time: BERT normalisation and pre-tokenisation (from `tokenizers`,
//! which are deterministic), then byte-pair merges in WordPiece's form (a piece that does not
//! start a word carries the `##` prefix), each merge the most frequent adjacent pair, ties
//! broken by the pair's text.
//!
//! What it learns is a plain vocabulary; [`super::text::TextTokenizer::train`] wraps it in a
//! `tokenizers` WordPiece model, which does the encoding.

use std::collections::{BTreeMap, HashMap, HashSet};

use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::{
    NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer,
};

use crate::engine::{Error, Result};

/// The prefix of a piece that continues a word.
pub const CONTINUATION: &str = "##";

/// What the trainer keeps and how far it merges.
#[derive(Debug, Clone, Copy)]
pub struct WordPieceOptions {
    /// The vocabulary's size, special tokens included (the alphabet is kept whole even when
    /// it alone is larger).
    pub vocab_size: usize,
    /// Pairs seen fewer times than this are never merged.
    pub min_frequency: u64,
    /// The most frequent characters kept; rarer ones become `[UNK]` when encoding.
    pub limit_alphabet: usize,
}

/// Learns a vocabulary from `texts`: `special` first, in order, then the alphabet (each kept
/// character alone and with the continuation prefix, in character order), then the merged
/// pieces in the order they were learned. The same texts and options always give the same
/// vocabulary.
pub fn learn_vocab<S: AsRef<str>>(
    texts: &[S],
    special: &[&str],
    opts: WordPieceOptions,
) -> Result<Vec<String>> {
    const OP: &str = "wordpiece::learn_vocab";
    let words = count_words(texts)?;

    // The alphabet: the `limit_alphabet` most frequent characters, ties by character.
    let mut char_counts: BTreeMap<char, u64> = BTreeMap::new();
    for (word, &n) in &words {
        for c in word.chars() {
            *char_counts.entry(c).or_default() += n;
        }
    }
    let mut by_count: Vec<(char, u64)> = char_counts.into_iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    by_count.truncate(opts.limit_alphabet);
    let mut alphabet: Vec<char> = by_count.into_iter().map(|(c, _)| c).collect();
    alphabet.sort_unstable();

    let mut vocab: Vec<String> = special.iter().map(|s| s.to_string()).collect();
    let mut ids: HashMap<String, u32> = HashMap::new();
    for (i, s) in vocab.iter().enumerate() {
        if ids.insert(s.clone(), i as u32).is_some() {
            return Err(Error::invalid(OP, format!("special token {s} given twice")));
        }
    }
    let mut intern = |piece: String, vocab: &mut Vec<String>| -> u32 {
        *ids.entry(piece.clone()).or_insert_with(|| {
            vocab.push(piece);
            (vocab.len() - 1) as u32
        })
    };
    for &c in &alphabet {
        intern(c.to_string(), &mut vocab);
    }
    for &c in &alphabet {
        intern(format!("{CONTINUATION}{c}"), &mut vocab);
    }

    // Each distinct word as a list of piece ids; words with a character outside the alphabet
    // are left out (the encoder gives them `[UNK]`).
    let kept: HashSet<char> = alphabet.iter().copied().collect();
    let mut corpus: Vec<(Vec<u32>, u64)> = Vec::new();
    for (word, &n) in &words {
        if !word.chars().all(|c| kept.contains(&c)) {
            continue;
        }
        let pieces = word
            .chars()
            .enumerate()
            .map(|(i, c)| {
                let piece = if i == 0 {
                    c.to_string()
                } else {
                    format!("{CONTINUATION}{c}")
                };
                intern(piece, &mut vocab)
            })
            .collect();
        corpus.push((pieces, n));
    }

    // Pair counts, and which words hold each pair (a superset: entries are not removed when a
    // merge takes a pair out of a word; merging skips such words).
    let mut pair_counts: HashMap<(u32, u32), u64> = HashMap::new();
    let mut holders: HashMap<(u32, u32), Vec<usize>> = HashMap::new();
    for (w, (pieces, n)) in corpus.iter().enumerate() {
        for p in pieces.windows(2) {
            let pair = (p[0], p[1]);
            *pair_counts.entry(pair).or_default() += n;
            holders.entry(pair).or_default().push(w);
        }
    }

    while vocab.len() < opts.vocab_size {
        // The most frequent pair; ties by the texts of its two pieces, so the choice never
        // depends on the hash maps' order.
        let best = pair_counts
            .iter()
            .filter(|(_, &n)| n >= opts.min_frequency.max(1))
            .max_by(|(a, na), (b, nb)| {
                na.cmp(nb).then_with(|| {
                    let ka = (&vocab[a.0 as usize], &vocab[a.1 as usize]);
                    let kb = (&vocab[b.0 as usize], &vocab[b.1 as usize]);
                    kb.cmp(&ka)
                })
            })
            .map(|(&pair, _)| pair);
        let Some(pair) = best else { break };
        let right = &vocab[pair.1 as usize];
        let merged = format!(
            "{}{}",
            vocab[pair.0 as usize],
            right.strip_prefix(CONTINUATION).unwrap_or(right)
        );
        let new_id = intern(merged, &mut vocab);

        let mut words_with: Vec<usize> = holders.remove(&pair).unwrap_or_default();
        words_with.sort_unstable();
        words_with.dedup();
        for w in words_with {
            let (pieces, n) = &mut corpus[w];
            if !pieces.windows(2).any(|p| (p[0], p[1]) == pair) {
                continue;
            }
            for p in pieces.windows(2) {
                let old = (p[0], p[1]);
                if let Some(c) = pair_counts.get_mut(&old) {
                    *c -= *n;
                    if *c == 0 {
                        pair_counts.remove(&old);
                    }
                }
            }
            let mut out = Vec::with_capacity(pieces.len());
            let mut i = 0;
            while i < pieces.len() {
                if i + 1 < pieces.len() && (pieces[i], pieces[i + 1]) == pair {
                    out.push(new_id);
                    i += 2;
                } else {
                    out.push(pieces[i]);
                    i += 1;
                }
            }
            *pieces = out;
            for p in pieces.windows(2) {
                let new = (p[0], p[1]);
                *pair_counts.entry(new).or_default() += *n;
                holders.entry(new).or_default().push(w);
            }
        }
        pair_counts.remove(&pair);
    }
    Ok(vocab)
}

/// Every word of `texts` after BERT normalisation and pre-tokenisation, with its count.
fn count_words<S: AsRef<str>>(texts: &[S]) -> Result<BTreeMap<String, u64>> {
    const OP: &str = "wordpiece::count_words";
    let normalizer = BertNormalizer::default();
    let mut words: BTreeMap<String, u64> = BTreeMap::new();
    for text in texts {
        let mut normalized = NormalizedString::from(text.as_ref());
        normalizer
            .normalize(&mut normalized)
            .map_err(|e| Error::invalid(OP, e.to_string()))?;
        let mut pre = PreTokenizedString::from(normalized);
        BertPreTokenizer
            .pre_tokenize(&mut pre)
            .map_err(|e| Error::invalid(OP, e.to_string()))?;
        for (word, _, _) in pre.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            if !word.is_empty() {
                *words.entry(word.to_string()).or_default() += 1;
            }
        }
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECIAL: [&str; 2] = ["[PAD]", "[UNK]"];

    fn opts(vocab_size: usize) -> WordPieceOptions {
        WordPieceOptions {
            vocab_size,
            min_frequency: 2,
            limit_alphabet: 1000,
        }
    }

    #[test]
    fn merges_follow_frequency_then_text() {
        // "ab" occurs 3 times, "cd" 3 times: a tie, broken by text ("a" < "c").
        let texts = ["ab ab ab cd cd cd ef"];
        let v = learn_vocab(&texts, &SPECIAL, opts(100)).unwrap();
        let base = SPECIAL.len() + 2 * 6; // six characters, alone and continued
        assert_eq!(&v[..2], &SPECIAL);
        assert_eq!(&v[2..8], &["a", "b", "c", "d", "e", "f"]);
        assert_eq!(&v[8..14], &["##a", "##b", "##c", "##d", "##e", "##f"]);
        // "ef" occurs once: below min_frequency, never merged.
        assert_eq!(&v[base..], &["ab", "cd"]);
    }

    #[test]
    fn the_same_texts_give_the_same_vocabulary() {
        let texts: Vec<String> = (0..200)
            .map(|i| format!("the cat {} sat on the mat number {} again", i % 7, i % 13))
            .collect();
        let a = learn_vocab(&texts, &SPECIAL, opts(60)).unwrap();
        for _ in 0..3 {
            assert_eq!(learn_vocab(&texts, &SPECIAL, opts(60)).unwrap(), a);
        }
        assert_eq!(a.len(), 60);
    }

    #[test]
    fn continuation_pieces_merge_without_their_prefix() {
        let texts = ["abc abc abc abc"];
        let v = learn_vocab(&texts, &SPECIAL, opts(100)).unwrap();
        // (a, ##b) and (##b, ##c) tie at 4; "##b" sorts before "a", so ##b+##c -> "##bc" first,
        // then a+##bc -> "abc".
        assert!(
            v.ends_with(&["##bc".to_string(), "abc".to_string()]),
            "{v:?}"
        );
    }

    #[test]
    fn a_small_alphabet_leaves_rare_characters_out() {
        let texts = ["aaa aaa bbb z"];
        let mut o = opts(100);
        o.limit_alphabet = 2;
        let v = learn_vocab(&texts, &SPECIAL, o).unwrap();
        assert!(!v.iter().any(|p| p.contains('z')), "{v:?}");
    }

    #[test]
    fn a_repeated_special_token_is_an_error() {
        let err = learn_vocab(&["a"], &["[PAD]", "[PAD]"], opts(10)).unwrap_err();
        assert!(err.to_string().contains("[PAD]"), "{err}");
    }
}
