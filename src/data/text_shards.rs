//! Text shards: the files a recipe's `[data] train` / `validation` name (paths or globs), read
//! one document at a time, never a whole file in memory.
//!
//! - JSON lines (`.jsonl`, `.json`), one object per line, the document in a string field
//!   (`text` by default, as C4's `c4-train.*.json.gz`; `text_field` changes it);
//! - plain text (any other name): one document per line, or with `documents = "blocks"` per
//!   block of lines separated by blank lines.
//!
//! Either may be gzip-compressed (recognised by its first bytes, whatever the name; the format
//! is taken from the name without `.gz`). A damaged file (bad compression, a line that is not a
//! JSON object, a missing or non-string field) is an error naming the file and the line.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use serde::{Deserialize, Serialize};

use super::corrupt;
use crate::engine::{Error, Result};

/// The longest line (and the longest document) read, so memory stays bounded whatever a file
/// holds; a longer one is an error naming the file and the line.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// How a plain-text file is cut into documents.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PlainDocuments {
    /// One document per non-empty line.
    #[default]
    Lines,
    /// One document per block of lines separated by blank lines.
    Blocks,
}

/// How documents are read from the shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardFormat {
    /// The JSON field holding a document's text.
    pub text_field: String,
    pub plain: PlainDocuments,
}

impl Default for ShardFormat {
    fn default() -> Self {
        ShardFormat {
            text_field: "text".into(),
            plain: PlainDocuments::Lines,
        }
    }
}

/// The files of `patterns` in order: each pattern's matches sorted by name, patterns in the
/// order given, a file named twice kept once. A pattern is a path whose last component may hold
/// `*` (any run of characters) and `?` (one character); relative ones are taken from `base`
/// when given. A pattern that matches no file is an error naming it.
pub fn resolve(patterns: &[String], base: Option<&Path>) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = Vec::new();
    for pattern in patterns {
        let full = match base {
            Some(b) if Path::new(pattern).is_relative() => b.join(pattern),
            _ => PathBuf::from(pattern),
        };
        let name = full
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = full.parent().unwrap_or(Path::new("")).to_path_buf();
        if dir.to_string_lossy().contains(['*', '?']) {
            return Err(Error::invalid(
                "data.train",
                format!(
                    "pattern `{pattern}`: wildcards are allowed in the file name only, not in \
                     folders; list one pattern per folder"
                ),
            ));
        }
        let mut found: Vec<PathBuf> = if name.contains(['*', '?']) {
            let listing = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                &dir
            };
            std::fs::read_dir(listing)
                .map_err(|e| Error::io(listing, e))?
                .filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    !n.starts_with('.') && wildcard_match(&name, &n)
                })
                .map(|e| dir.join(e.file_name()))
                .filter(|p| p.is_file())
                .collect()
        } else if full.is_file() {
            vec![full.clone()]
        } else {
            Vec::new()
        };
        if found.is_empty() {
            return Err(Error::io(
                &full,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "pattern `{pattern}` matches no file{}; check the recipe's data.train / \
                         data.validation (and data.dir, which relative patterns start from)",
                        base.map(|b| format!(" under {}", b.display()))
                            .unwrap_or_default()
                    ),
                ),
            ));
        }
        found.sort();
        for f in found {
            if !out.contains(&f) {
                out.push(f);
            }
        }
    }
    Ok(out)
}

/// Whether `name` matches `pattern` (`*`: any run of characters, `?`: one character).
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Greedy with backtracking to the last `*`: linear in practice, no recursion.
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

/// Whether a file holds JSON lines, by its name without `.gz`.
fn is_json_lines(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase());
    let name = name.as_deref().unwrap_or("");
    let name = name.strip_suffix(".gz").unwrap_or(name);
    name.ends_with(".jsonl") || name.ends_with(".json")
}

/// Opens `path`, decompressing it when it starts with gzip's magic bytes.
fn open(path: &Path) -> Result<Box<dyn BufRead + Send>> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut magic = [0u8; 2];
    let mut got = 0;
    while got < 2 {
        match file.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    let head = std::io::Cursor::new(magic[..got].to_vec()).chain(file);
    Ok(if got == 2 && magic == [0x1f, 0x8b] {
        Box::new(BufReader::with_capacity(
            1 << 16,
            MultiGzDecoder::new(BufReader::new(head)),
        ))
    } else {
        Box::new(BufReader::with_capacity(1 << 16, head))
    })
}

/// The documents of one shard, in file order. Yields `Err` once (naming the file and line) and
/// then ends, when the file turns out damaged.
pub struct Documents {
    path: PathBuf,
    reader: Box<dyn BufRead + Send>,
    json: bool,
    format: ShardFormat,
    line: u64,
    buf: Vec<u8>,
    done: bool,
}

impl Documents {
    pub fn open(path: &Path, format: &ShardFormat) -> Result<Documents> {
        Ok(Documents {
            path: path.to_path_buf(),
            reader: open(path)?,
            json: is_json_lines(path),
            format: format.clone(),
            line: 0,
            buf: Vec::new(),
            done: false,
        })
    }

    /// The next line into `self.buf` (without its end of line); `false` at the end.
    fn next_line(&mut self) -> Result<bool> {
        self.buf.clear();
        let limit = MAX_LINE_BYTES as u64 + 1;
        let n = (&mut self.reader)
            .take(limit)
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| self.damaged(format!("reading line {}: {e}", self.line + 1)))?;
        if n == 0 {
            return Ok(false);
        }
        self.line += 1;
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
            if self.buf.last() == Some(&b'\r') {
                self.buf.pop();
            }
        } else if self.buf.len() > MAX_LINE_BYTES {
            return Err(self.damaged(format!(
                "line {} is longer than {} MiB",
                self.line,
                MAX_LINE_BYTES >> 20
            )));
        }
        Ok(true)
    }

    fn damaged(&self, msg: String) -> Error {
        corrupt(&self.path, msg)
    }

    fn next_json(&mut self) -> Result<Option<String>> {
        while self.next_line()? {
            if self.buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let object: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&self.buf).map_err(|e| {
                    self.damaged(format!("line {} is not a JSON object: {e}", self.line))
                })?;
            match object.get(&self.format.text_field) {
                Some(serde_json::Value::String(s)) => {
                    if !s.trim().is_empty() {
                        return Ok(Some(s.clone()));
                    }
                }
                Some(other) => {
                    return Err(self.damaged(format!(
                        "line {}: field `{}` is {}, not a string",
                        self.line,
                        self.format.text_field,
                        json_kind(other)
                    )))
                }
                None => {
                    return Err(self.damaged(format!(
                        "line {} has no field `{}` (set data.text_field to the field holding \
                         the text)",
                        self.line, self.format.text_field
                    )))
                }
            }
        }
        Ok(None)
    }

    fn next_plain(&mut self) -> Result<Option<String>> {
        let mut doc = String::new();
        while self.next_line()? {
            let line = String::from_utf8_lossy(&self.buf);
            let blank = line.trim().is_empty();
            match self.format.plain {
                PlainDocuments::Lines if !blank => return Ok(Some(line.trim().to_string())),
                PlainDocuments::Lines => {}
                PlainDocuments::Blocks if blank => {
                    if !doc.is_empty() {
                        return Ok(Some(doc));
                    }
                }
                PlainDocuments::Blocks => {
                    if doc.len() + line.len() > MAX_LINE_BYTES {
                        return Err(self.damaged(format!(
                            "the block ending at line {} is longer than {} MiB",
                            self.line,
                            MAX_LINE_BYTES >> 20
                        )));
                    }
                    if !doc.is_empty() {
                        doc.push('\n');
                    }
                    doc.push_str(line.trim_end());
                }
            }
        }
        Ok((!doc.is_empty()).then_some(doc))
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

impl Iterator for Documents {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Result<String>> {
        if self.done {
            return None;
        }
        let r = if self.json {
            self.next_json()
        } else {
            self.next_plain()
        };
        match r {
            Ok(Some(doc)) => Some(Ok(doc)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Every document of `files` in order, one file open at a time.
pub fn documents<'a>(
    files: &'a [PathBuf],
    format: &'a ShardFormat,
) -> impl Iterator<Item = Result<String>> + 'a {
    files
        .iter()
        .flat_map(move |f| -> Box<dyn Iterator<Item = Result<String>>> {
            match Documents::open(f, format) {
                Ok(d) => Box::new(d),
                Err(e) => Box::new(std::iter::once(Err(e))),
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_a_shell() {
        assert!(wildcard_match(
            "c4-train.*.json.gz",
            "c4-train.00001-of-01024.json.gz"
        ));
        assert!(!wildcard_match(
            "c4-train.*.json.gz",
            "c4-validation.0.json.gz"
        ));
        assert!(wildcard_match("a?c*", "abcdef"));
        assert!(wildcard_match("*", ""));
        assert!(!wildcard_match("a*b", "acbx"));
        assert!(wildcard_match("*a*a*", "banana"));
    }
}
