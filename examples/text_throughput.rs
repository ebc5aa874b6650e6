//! Tokens per second of the text-shard pipeline (read, decompress, parse, tokenise on the
//! thread pool, pack, mask, batch tensors) on given shards, as a trainer consumes it. The
//! Hugging Face peer is `scripts/reference/text_shards_peer.py`; figures in docs/benchmarks.md.
//!
//! ```sh
//! cargo run --example text_throughput -- TOKENIZER_JSON SEQ_LEN BATCH BATCHES SHARD...
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use recycle::data::text_shards::ShardFormat;
use recycle::data::text_stream::{Packing, TextShards, TextStreamLoader};
use recycle::data::TextTokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        return Err("usage: text_throughput TOKENIZER_JSON SEQ_LEN BATCH BATCHES SHARD...".into());
    }
    let tokenizer = TextTokenizer::from_file(&PathBuf::from(&args[0]))?;
    let seq_len: usize = args[1].parse()?;
    let batch: usize = args[2].parse()?;
    let batches: usize = args[3].parse()?;
    let shards = Arc::new(TextShards {
        files: args[4..].iter().map(PathBuf::from).collect(),
        format: ShardFormat::default(),
        tokenizer,
        seq_len,
        packing: Packing::Concatenate,
        seed: 0,
    });
    let start = Instant::now();
    let mut tokens = 0usize;
    let mut masked = 0usize;
    for b in TextStreamLoader::new(shards, batch, 0, 3)?.take(batches) {
        let b = b?;
        tokens += b
            .attention_mask
            .to_vec::<i32>()?
            .iter()
            .filter(|&&m| m != 0)
            .count();
        masked += b
            .position_labels
            .to_vec::<i32>()?
            .iter()
            .filter(|&&l| l != -100)
            .count();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "recycle: {batches} batches of {batch}x{seq_len}, {tokens} tokens ({masked} masked) in \
         {secs:.2} s: {:.0} tokens/s on {} threads",
        tokens as f64 / secs,
        rayon::current_num_threads()
    );
    Ok(())
}
