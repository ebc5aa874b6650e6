//! The per-step cost of the C ABI against the Rust `Trainer` fed the same batches: BERT-tiny
//! (masked language modelling) on a small and a large token batch. Two trainers of the same
//! recipe take turns, step for step: one through `Trainer::step_batch` (the batch built from
//! the caller's vectors, as a Rust service would), the other through
//! `recycle_trainer_step_tokens` on the same buffers. Prints the median milliseconds of each
//! and their ratio; on a busy machine only the ratio means anything.
//!
//! Usage: cargo run --release -p recycle-c --example step_overhead [-- STEPS]

use std::ffi::CString;
use std::time::Instant;

use recycle::data::test_support::write_fortunes;
use recycle::recipe::Recipe;
use recycle::trainer::{Batch, Model, RunOptions, Trainer, IGNORE_LABEL};
use recycle_c::{
    recycle_last_error, recycle_trainer_free, recycle_trainer_new, recycle_trainer_step_tokens,
    RecycleTrainer, RECYCLE_LABELS_I32, RECYCLE_OK, RECYCLE_OVERWRITE,
};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let steps: usize = std::env::args().nth(1).map_or(Ok(20), |s| s.parse())?;
    let warmup = 2;
    let dir = std::env::temp_dir().join(format!("recycle-step-overhead-{}", std::process::id()));
    write_fortunes(&dir.join("fortunes"), 2400)?;
    println!("| batch | Rust Trainer (ms) | C ABI (ms) | C / Rust |");
    println!("|---|---|---|---|");
    for (b, s) in [(4usize, 32usize), (32, 128)] {
        let toml = |name: &str| {
            format!(
                "name = \"{name}\"\nout_dir = \"{}\"\n[model]\nkind = \"bert\"\nsize = \"tiny\"\n\
                 [data]\ndataset = \"fortunes\"\ndir = \"{}\"\nseq_len = {s}\nvocab_size = 1000\n\
                 eval_limit = 8\n[train]\nbatch_size = {b}\nsamples = {}\nevals = 1\n\
                 [optimizer]\nkind = \"adamw\"\nlr = 1e-4\n",
                dir.display(),
                dir.join("fortunes").display(),
                (steps + warmup + 1) * b * 2
            )
        };
        let opts = RunOptions {
            overwrite: true,
            ..RunOptions::default()
        };
        let mut rust = Trainer::new(&Recipe::from_toml(&toml("rust"))?, &opts)?;
        let recipe = CString::new(toml("c"))?;
        let mut c: *mut RecycleTrainer = std::ptr::null_mut();
        // SAFETY: a NUL-terminated recipe and a writable handle.
        if unsafe { recycle_trainer_new(recipe.as_ptr(), RECYCLE_OVERWRITE, &mut c) } != RECYCLE_OK
        {
            let msg = unsafe { std::ffi::CStr::from_ptr(recycle_last_error()) };
            return Err(format!("recycle_trainer_new: {msg:?}").into());
        }
        // Token ids inside the model's vocabulary: that of the tokenizer trained on the
        // generated text, which `vocab_size` only caps.
        let vocab = match rust.model() {
            Model::Bert(m) => m.config().vocab_size,
            Model::ResNet(_) => return Err("the recipe must build a BERT".into()),
        };
        let n = b * s;
        let ids: Vec<i32> = (0..n)
            .map(|i| 5 + ((i * 37) % (vocab - 5)) as i32)
            .collect();
        let mask = vec![1i32; n];
        let labels: Vec<i32> = (0..n)
            .map(|i| if i % 7 == 3 { ids[i] } else { IGNORE_LABEL })
            .collect();
        let (mut t_rust, mut t_c) = (Vec::new(), Vec::new());
        for i in 0..steps + warmup {
            let t0 = Instant::now();
            let batch = Batch::mlm(ids.clone(), mask.clone(), labels.clone(), b, s)?;
            rust.step_batch(&batch)?;
            let r = t0.elapsed().as_secs_f64() * 1e3;
            let t0 = Instant::now();
            // SAFETY: the handle is live and each buffer holds `n` int32 values.
            let status = unsafe {
                recycle_trainer_step_tokens(
                    c,
                    ids.as_ptr().cast(),
                    mask.as_ptr().cast(),
                    labels.as_ptr().cast(),
                    n as u64,
                    RECYCLE_LABELS_I32,
                    b as u64,
                    s as u64,
                    std::ptr::null_mut(),
                )
            };
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            if status != RECYCLE_OK {
                let msg = unsafe { std::ffi::CStr::from_ptr(recycle_last_error()) };
                return Err(format!("recycle_trainer_step_tokens: {msg:?}").into());
            }
            if i >= warmup {
                t_rust.push(r);
                t_c.push(ms);
            }
        }
        // SAFETY: the handle came from recycle_trainer_new and is not used again.
        unsafe { recycle_trainer_free(c) };
        let (r, cm) = (median(&mut t_rust), median(&mut t_c));
        println!("| {b} x {s} | {r:.2} | {cm:.2} | {:.3} |", cm / r);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
