#!/usr/bin/env python3
"""Tiny Hugging Face BERT checkpoints, one per layout, and a bert-base-uncased-style tokenizer.

Writes, under models/tests/fixtures/:

- hf_tokenizer.json: a WordPiece `tokenizer.json` built by `BertTokenizerFast` (lower-casing,
  bert-base-uncased's special-token ids: [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103)
  over a small vocabulary, so the loader reads the format bert-base-uncased ships.
- hf_config.json: the tiny `BertConfig` (as `save_pretrained` writes it).
- hf_masked_lm.safetensors: `BertForMaskedLM` (names `bert.*`, `cls.predictions.*`).
- hf_pretraining.safetensors: `BertForPreTraining` (adds `bert.pooler.*`, `cls.seq_relationship.*`).
- hf_encoder.safetensors: `BertModel` as sentence-transformers ship it (no `bert.` prefix, a pooler,
  no MLM head, and the int64 `embeddings.position_ids` buffer older checkpoints hold).
- hf_encoder_expected.json: input ids, attention mask and the `last_hidden_state` of the
  `BertModel` in evaluation mode (f32), which models/tests/hf_checkpoints.rs reproduces.

Needs `pip install torch transformers safetensors`. Run from the repository root:

    python3 scripts/reference/hf_bert_fixtures.py

CI never runs this; the files are committed.
"""

import json
import os
import tempfile

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForMaskedLM, BertForPreTraining, BertModel, BertTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "models", "tests", "fixtures")

WORDS = (
    "the of and to a in is you that it he was for on are as with his they i at be this have "
    "from or one had by word but not what all were we when your can said there use an each "
    "which she do how their if will up other about out many then them these so some her would "
    "make like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part "
    "fortune love life man never good know old think god wise fool money truth work world"
).split()


def vocabulary():
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,;:!?'\"()-%&*/$#@")
    vocab += chars + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab += [w for w in WORDS if w not in vocab]
    return vocab


def main():
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    vocab = vocabulary()
    with tempfile.TemporaryDirectory() as tmp:
        tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "tokenizer.json")) as f:
            tokenizer_json = f.read()
    with open(os.path.join(OUT, "hf_tokenizer.json"), "w") as f:
        f.write(tokenizer_json)

    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_act="gelu",
    )
    with open(os.path.join(OUT, "hf_config.json"), "w") as f:
        f.write(config.to_json_string())

    def save(model, name, drop=(), extra=None):
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k not in drop}
        state.update(extra or {})
        save_file(state, os.path.join(OUT, name), metadata={"format": "pt"})

    tied = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
    save(BertForMaskedLM(config).eval(), "hf_masked_lm.safetensors", drop=tied)
    save(BertForPreTraining(config).eval(), "hf_pretraining.safetensors", drop=tied)

    encoder = BertModel(config).eval()
    position_ids = torch.arange(config.max_position_embeddings, dtype=torch.int64).unsqueeze(0)
    save(encoder, "hf_encoder.safetensors", extra={"embeddings.position_ids": position_ids})

    text = ["the wise fool never knows", "love is a word"]
    batch = tok(text, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        ).last_hidden_state
    expected = {
        "text": text,
        "input_ids": batch["input_ids"].tolist(),
        "attention_mask": batch["attention_mask"].tolist(),
        "last_hidden_state": hidden.flatten().tolist(),
        "shape": list(hidden.shape),
    }
    with open(os.path.join(OUT, "hf_encoder_expected.json"), "w") as f:
        json.dump(expected, f)
    for name in sorted(os.listdir(OUT)):
        if name.startswith("hf_"):
            print(f"wrote models/tests/fixtures/{name}")


if __name__ == "__main__":
    main()
