//! What the tests of GPU ranks share (`tests/train_ranks_cuda.rs` torchrun-style,
//! `tests/train_ranks_mpi_cuda.rs` under mpirun): whether `cuda:0` opens, the recipe of a
//! small BERT distilled on `cuda:0`, its teacher, and how close two ranks must end to one
//! process.

use std::path::{Path, PathBuf};

/// As on the CPU path (`tests/distributed.rs`), the order of the sums is the only difference
/// between two ranks and one process: each rank sums its half of the batch's gradient, scaled
/// by its share of the masked tokens, and NCCL's mean adds the halves, where one process sums
/// the whole batch at once; the last bits of each step's gradients differ and AdamW carries
/// them into the weights. A step on the wrong rows or with the wrong weighting changes the
/// gradient itself and moves weights by about the learning rate, 2e-3.
pub const TOLERANCE: f32 = 1e-4;

/// Whether `cuda:0` opens; when it does not, the engine's message (and `RECYCLE_EXPECT_CUDA`
/// must be unset).
pub fn cuda_opens() -> Result<(), String> {
    match recycle_engine::cuda::device_info(0) {
        Ok(_) => Ok(()),
        Err(e) => {
            assert!(
                std::env::var_os("RECYCLE_EXPECT_CUDA").is_none(),
                "RECYCLE_EXPECT_CUDA is set, but cuda:0 does not open: {e} (build with \
                 `--features cuda` and put a driver, or the mock CUDA's folder, on LD_LIBRARY_PATH)"
            );
            Err(match e {
                recycle_engine::Error::Device(m) => m,
                e => e.to_string(),
            })
        }
    }
}

/// A BERT without dropout (a rank's shard sees exactly the computation the same rows see in
/// one process) on the fixture fortunes: 4 steps of a global batch of 8 sequences on `device`;
/// with `teacher`, distilled from it.
pub fn recipe(out: &Path, name: &str, device: &str, teacher: Option<&Path>) -> PathBuf {
    let config = out.join("bert-config.json");
    std::fs::write(
        &config,
        r#"{"model_type": "bert", "hidden_act": "gelu", "vocab_size": 512, "hidden_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
            "max_position_embeddings": 32, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0}"#,
    )
    .unwrap();
    let distill = match teacher {
        None => String::new(),
        Some(t) => format!(
            "[distill]\nteachers = [\"{}\"]\ntemperature = 2.0\nweight = 0.5\n",
            t.display()
        ),
    };
    let text = format!(
        r#"
name = "{name}"
out_dir = "{out}"
device = "{device}"
[model]
kind = "bert"
config = "{config}"
[data]
dataset = "fortunes"
train_limit = 32
eval_limit = 8
seq_len = 16
vocab_size = 500
validation_fraction = 0.0
[train]
batch_size = 8
epochs = 1.0
evals = 1
[optimizer]
kind = "adamw"
lr = 2e-3
warmup = 0.25
{distill}"#,
        out = out.display(),
        config = config.display()
    );
    let path = out.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// The teacher of the GPU students: [`recipe`] trained on the CPU in `out/teacher`.
pub fn train_teacher(out: &Path) -> PathBuf {
    let teacher = recipe(out, "teacher", "cpu", None);
    let recipe = recycle::recipe::Recipe::from_file(&teacher).unwrap();
    recycle::trainer::run(&recipe, &recycle::trainer::RunOptions::default()).unwrap();
    out.join("teacher")
}
