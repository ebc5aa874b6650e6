#!/usr/bin/env python3
"""The Hugging Face peer of `examples/text_throughput.rs`: tokens per second of reading C4-style
shards (JSON lines, gzip), tokenising with the `tokenizers` library (batch encoding on its Rust
thread pool), packing `[CLS] ... [SEP]` sequences of SEQ_LEN by concatenating the documents
(as the recycle pipeline does) and masking with transformers' `DataCollatorForLanguageModeling`
(15%, 80/10/10) into PyTorch batches.

Needs `pip install torch transformers tokenizers`. Run from the repository root:

    python3 scripts/reference/text_shards_peer.py TOKENIZER_JSON SEQ_LEN BATCH BATCHES SHARD...
"""

import gzip
import json
import sys
import time

import torch
from tokenizers import Tokenizer
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

CHUNK_DOCS = 1024


def documents(paths):
    while True:
        for path in paths:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        text = json.loads(line)["text"]
                        if text.strip():
                            yield text


def sequences(tok, paths, seq_len):
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    body = seq_len - 2
    pending = []
    chunk = []
    for doc in documents(paths):
        chunk.append(doc)
        if len(chunk) < CHUNK_DOCS:
            continue
        for enc in tok.encode_batch(chunk, add_special_tokens=False):
            if pending:
                pending.append(sep)
            pending.extend(enc.ids)
            while len(pending) >= body:
                yield [cls] + pending[:body] + [sep]
                pending = pending[body:]
                if pending and pending[0] == sep:
                    pending = pending[1:]
        chunk = []


def main():
    if len(sys.argv) < 6:
        sys.exit("usage: text_shards_peer.py TOKENIZER_JSON SEQ_LEN BATCH BATCHES SHARD...")
    tok_path, seq_len, batch, batches, paths = (
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
        sys.argv[5:],
    )
    tok = Tokenizer.from_file(tok_path)
    fast = PreTrainedTokenizerFast(
        tokenizer_file=tok_path,
        pad_token="[PAD]",
        mask_token="[MASK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        unk_token="[UNK]",
    )
    collator = DataCollatorForLanguageModeling(fast, mlm=True, mlm_probability=0.15)
    torch.manual_seed(0)
    start = time.perf_counter()
    tokens = masked = 0
    rows = []
    done = 0
    for seq in sequences(tok, paths, seq_len):
        rows.append({"input_ids": seq})
        if len(rows) == batch:
            out = collator(rows)
            tokens += int(out["attention_mask"].sum()) if "attention_mask" in out else out["input_ids"].numel()
            masked += int((out["labels"] != -100).sum())
            rows = []
            done += 1
            if done == batches:
                break
    secs = time.perf_counter() - start
    print(
        f"huggingface: {batches} batches of {batch}x{seq_len}, {tokens} tokens ({masked} masked) "
        f"in {secs:.2f} s: {tokens / secs:.0f} tokens/s on {torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
