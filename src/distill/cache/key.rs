//! What a teacher cache was made for: the teacher, the data set and how its batches are drawn,
//! and what the loss keeps of each row. A cache is read only under the key it was written with;
//! any difference is an error naming the field, both values and what to do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use recycle_engine::{Error, Result};
use sha2::{Digest, Sha256};

use crate::distill::KdKind;
use crate::experiments::runlog::write_atomic;
use crate::recipe::Recipe;

/// The key file of a teacher's cache directory.
pub const KEY_FILE: &str = "key.json";

/// Fields of [`crate::recipe::DataRecipe`] that do not change a training batch (where the
/// evaluation splits end, how many threads decode); every other data field is in the key.
const DATA_FIELDS_OUTSIDE_THE_KEY: [&str; 3] = ["eval_limit", "decode_threads", "validation"];

/// How the cached logits are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    /// 2 bytes a value, rounded to nearest even (lossless for a bf16 teacher's logits).
    #[default]
    Bf16,
    /// 4 bytes a value, lossless for any teacher.
    F32,
}

impl ValueType {
    pub fn name(self) -> &'static str {
        match self {
            ValueType::Bf16 => "bf16",
            ValueType::F32 => "f32",
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            ValueType::Bf16 => 2,
            ValueType::F32 => 4,
        }
    }
}

/// A cache key: named fields and their values (as text), compared field by field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    pub fields: BTreeMap<String, String>,
}

/// What the loss keeps of each teacher row: k, the term (with its temperature), the value
/// type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSpec {
    pub k: usize,
    pub term: KdKind,
    pub values: ValueType,
}

impl RowSpec {
    /// The temperature the tail's log-sum-exp is taken at (MSE does not read it: 1).
    pub fn tail_temperature(&self) -> f32 {
        match self.term {
            KdKind::Kl { temperature } => temperature,
            KdKind::Mse => 1.0,
        }
    }
}

impl CacheKey {
    /// The key of `teacher`'s cache (its checkpoint file and the name of its architecture) for
    /// the batches of `recipe` and the rows of `rows`. `teacher_compute` names the type the
    /// teacher computes in (its logits differ between f32 and bf16 activations).
    pub fn new(
        recipe: &Recipe,
        teacher: &Path,
        architecture: &str,
        teacher_compute: &str,
        rows: &RowSpec,
    ) -> Result<CacheKey> {
        let mut fields = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            fields.insert(k.to_string(), v);
        };
        put("teacher.checkpoint_sha256", sha256_file(teacher)?);
        put("teacher.architecture", architecture.to_string());
        put("teacher.compute", teacher_compute.to_string());
        let data = serde_json::to_value(&recipe.data)
            .map_err(|e| Error::invalid("teacher cache", format!("data section as JSON: {e}")))?;
        if let serde_json::Value::Object(map) = data {
            for (name, value) in map {
                if !DATA_FIELDS_OUTSIDE_THE_KEY.contains(&name.as_str()) {
                    put(&format!("data.{name}"), value.to_string());
                }
            }
        }
        put("seed", recipe.seed.to_string());
        put("train.batch_size", recipe.train.batch_size.to_string());
        put("cache_k", rows.k.to_string());
        put("cache_values", rows.values.name().to_string());
        let (loss, temperature) = match rows.term {
            KdKind::Kl { temperature } => ("kl", format!("{temperature}")),
            // MSE does not read the tail: any temperature will do.
            KdKind::Mse => ("mse", "-".to_string()),
        };
        put("distill.loss", loss.to_string());
        put("distill.temperature", temperature);
        Ok(CacheKey { fields })
    }

    /// The key as its file holds it (sorted JSON object), and what shards are tied to.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.fields).expect("a map of strings serialises")
    }

    /// SHA-256 of [`CacheKey::to_json`]: every shard carries it.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.to_json().as_bytes()).into()
    }

    pub fn read(dir: &Path) -> Result<Option<CacheKey>> {
        let path = dir.join(KEY_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let fields = serde_json::from_str(&text).map_err(|e| {
            Error::invalid(
                "teacher cache",
                format!(
                    "{}: not a cache key ({e}); delete {} to rebuild the cache",
                    path.display(),
                    dir.display()
                ),
            )
        })?;
        Ok(Some(CacheKey { fields }))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Ok(write_atomic(dir.join(KEY_FILE), self.to_json().as_bytes())?)
    }

    /// An error naming the first field (in name order) where the cache in `dir`, keyed
    /// `self`, differs from what a run `wanted`.
    pub fn check(&self, wanted: &CacheKey, dir: &Path) -> Result<()> {
        let names: std::collections::BTreeSet<&String> =
            self.fields.keys().chain(wanted.fields.keys()).collect();
        for name in names {
            let (have, want) = (self.fields.get(name), wanted.fields.get(name));
            if have != want {
                let show = |v: Option<&String>| v.map_or("(absent)".to_string(), |v| v.clone());
                return Err(Error::invalid(
                    "teacher cache",
                    format!(
                        "{}: key field `{name}` is {} in the cache but {} for this run; point \
                         [distill] cache at another directory, or delete {} to rebuild it",
                        dir.join(KEY_FILE).display(),
                        show(have),
                        show(want),
                        dir.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The SHA-256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    crate::data::download::sha256_file(path)
}

/// The directory of one teacher's cache inside a cache directory: named by the start of its
/// checkpoint's hash, so that each teacher of a pool has its own and a retrained teacher gets a
/// new one.
pub fn teacher_dir(cache: &Path, key: &CacheKey) -> PathBuf {
    let hash = key
        .fields
        .get("teacher.checkpoint_sha256")
        .map_or("unknown", |h| &h[..h.len().min(16)]);
    cache.join(format!("teacher-{hash}"))
}
