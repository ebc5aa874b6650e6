//! Images per second of the image-folder pipeline on a given number of decoding threads:
//! decoding alone, training views (decode, RandomResizedCrop, flip, normalise) and evaluation
//! views (decode, resize, centre crop, normalise), over every image of `DIR/train` and
//! `DIR/val`, in batches as the loader asks for them. Its peer is
//! `scripts/reference/image_folder_peer.py measure DIR` (torchvision + PIL on one thread).
//!
//!     cargo run --release --example image_folder_throughput -- DIR [THREADS] [SIZE] [PASSES]

use std::path::PathBuf;
use std::time::Instant;

use recycle::data::image_decode::decode_rgb;
use recycle::data::image_folder::{open_splits, FolderOptions, FolderRequest, FolderSplit};
use recycle::data::BatchSource;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first().map(PathBuf::from) else {
        return Err("usage: image_folder_throughput DIR [THREADS] [SIZE] [PASSES]".into());
    };
    let arg = |i: usize, default: usize| -> Result<usize, Box<dyn std::error::Error>> {
        Ok(args
            .get(i)
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let (threads, size, passes) = (arg(1, 1)?, arg(2, 224)?, arg(3, 2)?);
    let splits = open_splits(&FolderRequest {
        root: &dir,
        options: FolderOptions {
            image_size: size,
            skip_bad: false,
            decode_threads: threads,
        },
        seed: 0,
        batch_size: 32,
        train_limit: None,
        eval_limit: None,
        validation_fraction: 0.0,
    })?;
    println!(
        "{} training and {} validation images, {size}x{size} views, {threads} decoding thread{}",
        splits.train.len(),
        splits.test.len(),
        if threads == 1 { "" } else { "s" }
    );

    // Decoding alone (one thread), after one pass that warms the page cache.
    let files: Vec<Vec<u8>> = splits
        .train
        .items
        .iter()
        .map(|i| std::fs::read(&i.path))
        .collect::<Result<_, _>>()?;
    let t0 = Instant::now();
    let mut pixels = 0usize;
    for _ in 0..passes {
        for f in &files {
            pixels += decode_rgb(f)?.pixels.len();
        }
    }
    let dt = t0.elapsed().as_secs_f64();
    println!(
        "decode only (zune-jpeg, files in memory, 1 thread): {:.1} images/s ({:.1} Mpixel/s)",
        (passes * files.len()) as f64 / dt,
        pixels as f64 / 3.0 / dt / 1e6
    );

    for (name, split) in [("train", &splits.train), ("val", &splits.test)] {
        let rate = views_per_second(split, passes)?;
        println!(
            "{name} views: {rate:.1} images/s on {threads} thread{} ({:.1} per thread)",
            if threads == 1 { "" } else { "s" },
            rate / threads as f64
        );
    }
    Ok(())
}

/// Every item of `split` in batches of 32, `passes` times (each pass a new epoch), after one
/// untimed pass.
fn views_per_second(split: &FolderSplit, passes: usize) -> recycle::engine::Result<f64> {
    let n = split.len();
    let idx: Vec<usize> = (0..n).collect();
    let batches = |epoch: usize| -> recycle::engine::Result<()> {
        for (b, chunk) in idx.chunks(32).enumerate() {
            let step = (epoch * n.div_ceil(32) + b) as u64;
            std::hint::black_box(split.make_batch(chunk, step)?);
        }
        Ok(())
    };
    batches(0)?;
    let t0 = Instant::now();
    for p in 0..passes {
        batches(p + 1)?;
    }
    Ok((passes * n) as f64 / t0.elapsed().as_secs_f64())
}
