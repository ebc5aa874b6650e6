//! One shard file of a teacher cache: the cached rows of up to [`STEPS_PER_SHARD`] consecutive
//! training steps, self-describing and checksummed.
//!
//! Layout (little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `RCYTCSH\0` |
//! | 4 | format version ([`VERSION`]) |
//! | 1 | value type: 1 = bf16, 2 = f32 |
//! | 1 | bytes per class index: 2 (u16, up to 65536 classes) or 4 (u32) |
//! | 2 | zero |
//! | 32 | SHA-256 of the cache's key file ([`super::CacheKey::digest`]) |
//! | 4, 4 | k, classes |
//! | 4, 4 | entries (steps held), zero |
//! | 8, 8 | rows (all entries), payload bytes |
//! | 16 × entries | per entry: step (u64), rows (u32), zero (u32); steps increasing |
//! | payload | per entry: class indices `[rows, k]`, values `[rows, k]`, tail log-sum-exp `[rows]` (f32) |
//! | 32 | SHA-256 of every byte before it |
//!
//! A file whose length, header or checksum is not what it says is reported, never read.

use std::collections::BTreeMap;

use recycle_engine::kd_loss::CachedTargets;
use sha2::{Digest, Sha256};

use super::key::ValueType;

pub const MAGIC: &[u8; 8] = b"RCYTCSH\0";
pub const VERSION: u32 = 1;
/// Steps a shard spans: shard `i` holds steps `[i·N, (i+1)·N)`.
pub const STEPS_PER_SHARD: u64 = 256;
const HEADER: usize = 80;
const ENTRY: usize = 16;
const CHECKSUM: usize = 32;

/// The file name of the shard holding `step`.
pub fn shard_name(step: u64) -> String {
    format!(
        "steps-{:010}.shard",
        step / STEPS_PER_SHARD * STEPS_PER_SHARD
    )
}

/// A verified shard in memory: its bytes and where each step's rows are.
#[derive(Debug)]
pub struct Shard {
    bytes: Vec<u8>,
    k: usize,
    classes: usize,
    values: ValueType,
    index_bytes: usize,
    /// step → (payload offset, rows).
    steps: BTreeMap<u64, (usize, usize)>,
}

fn index_bytes(classes: usize) -> usize {
    if classes <= 1 << 16 {
        2
    } else {
        4
    }
}

/// The bytes a row of `k` kept classes out of `classes` takes in a shard: the indices, the
/// values and the tail's f32 log-sum-exp.
pub fn row_bytes(k: usize, classes: usize, values: ValueType) -> usize {
    let value = match values {
        ValueType::Bf16 => 2,
        ValueType::F32 => 4,
    };
    k * (index_bytes(classes) + value) + 4
}

/// Rounds a value as the cache stores it.
pub fn round_value(v: f32, values: ValueType) -> f32 {
    match values {
        ValueType::Bf16 => half::bf16::from_f32(v).to_f32(),
        ValueType::F32 => v,
    }
}

/// The bytes of a shard holding `entries` (each of `k` classes out of `classes`).
pub fn encode(
    key_digest: &[u8; 32],
    k: usize,
    classes: usize,
    values: ValueType,
    entries: &BTreeMap<u64, CachedTargets>,
) -> Vec<u8> {
    let ib = index_bytes(classes);
    let rows: usize = entries.values().map(|t| t.rows).sum();
    let per_row = k * (ib + values.bytes()) + 4;
    let payload = rows * per_row;
    let mut out = Vec::with_capacity(HEADER + ENTRY * entries.len() + payload + CHECKSUM);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(match values {
        ValueType::Bf16 => 1,
        ValueType::F32 => 2,
    });
    out.push(ib as u8);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(key_digest);
    for v in [k as u32, classes as u32, entries.len() as u32, 0] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&(rows as u64).to_le_bytes());
    out.extend_from_slice(&(payload as u64).to_le_bytes());
    for (&step, t) in entries {
        out.extend_from_slice(&step.to_le_bytes());
        out.extend_from_slice(&(t.rows as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }
    for t in entries.values() {
        for &j in &t.indices {
            match ib {
                2 => out.extend_from_slice(&(j as u16).to_le_bytes()),
                _ => out.extend_from_slice(&j.to_le_bytes()),
            }
        }
        for &v in &t.values {
            match values {
                ValueType::Bf16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                ValueType::F32 => out.extend_from_slice(&v.to_le_bytes()),
            }
        }
        for &l in &t.tail_lse {
            out.extend_from_slice(&l.to_le_bytes());
        }
    }
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Shard {
    /// Checks and indexes a shard's bytes; the error says what is wrong with them.
    pub fn decode(bytes: Vec<u8>, key_digest: &[u8; 32]) -> Result<Shard, String> {
        if bytes.len() < HEADER + CHECKSUM {
            return Err(format!(
                "{} bytes, shorter than a shard's header and checksum",
                bytes.len()
            ));
        }
        if &bytes[..8] != MAGIC {
            return Err("not a teacher cache shard (wrong magic bytes)".to_string());
        }
        let version = u32_at(&bytes, 8);
        if version != VERSION {
            return Err(format!(
                "format version {version}, this build reads version {VERSION}"
            ));
        }
        let body = bytes.len() - CHECKSUM;
        if Sha256::digest(&bytes[..body])[..] != bytes[body..] {
            return Err("checksum mismatch: the file is truncated or corrupt".to_string());
        }
        if &bytes[16..48] != key_digest {
            return Err("written for another key (its key digest differs)".to_string());
        }
        let values = match bytes[12] {
            1 => ValueType::Bf16,
            2 => ValueType::F32,
            t => return Err(format!("unknown value type {t}")),
        };
        let ib = bytes[13] as usize;
        let (k, classes) = (u32_at(&bytes, 48) as usize, u32_at(&bytes, 52) as usize);
        let entries = u32_at(&bytes, 56) as usize;
        let (rows, payload) = (u64_at(&bytes, 64) as usize, u64_at(&bytes, 72) as usize);
        if ib != index_bytes(classes) || k == 0 || k > classes {
            return Err(format!(
                "inconsistent header: k {k}, {classes} classes, {ib}-byte indices"
            ));
        }
        let per_row = k * (ib + values.bytes()) + 4;
        let table = HEADER + entries * ENTRY;
        if rows.checked_mul(per_row) != Some(payload) || table + payload != body {
            return Err(format!(
                "{} bytes for {entries} steps of {rows} rows: the file is truncated or corrupt",
                bytes.len()
            ));
        }
        let mut steps = BTreeMap::new();
        let mut offset = table;
        let mut total = 0usize;
        for e in 0..entries {
            let at = HEADER + e * ENTRY;
            let (step, n) = (u64_at(&bytes, at), u32_at(&bytes, at + 8) as usize);
            if steps.insert(step, (offset, n)).is_some() {
                return Err(format!("step {step} appears twice"));
            }
            offset += n * per_row;
            total += n;
        }
        if total != rows {
            return Err(format!(
                "the steps hold {total} rows, the header says {rows}"
            ));
        }
        Ok(Shard {
            bytes,
            k,
            classes,
            values,
            index_bytes: ib,
            steps,
        })
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    pub fn values(&self) -> ValueType {
        self.values
    }

    pub fn steps(&self) -> impl Iterator<Item = u64> + '_ {
        self.steps.keys().copied()
    }

    pub fn contains(&self, step: u64) -> bool {
        self.steps.contains_key(&step)
    }

    /// The rows of `step`, when the shard holds it.
    pub fn get(&self, step: u64) -> Option<CachedTargets> {
        let &(offset, rows) = self.steps.get(&step)?;
        let (k, ib) = (self.k, self.index_bytes);
        let n = rows * k;
        let b = &self.bytes[offset..];
        let indices = (0..n)
            .map(|i| match ib {
                2 => u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32,
                _ => u32_at(b, 4 * i),
            })
            .collect();
        let b = &b[n * ib..];
        let values = (0..n)
            .map(|i| match self.values {
                ValueType::Bf16 => half::bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
                ValueType::F32 => f32::from_bits(u32_at(b, 4 * i)),
            })
            .collect();
        let b = &b[n * self.values.bytes()..];
        let tail_lse = (0..rows)
            .map(|i| f32::from_bits(u32_at(b, 4 * i)))
            .collect();
        Some(CachedTargets {
            rows,
            classes: self.classes,
            k,
            indices,
            values,
            tail_lse,
        })
    }
}
