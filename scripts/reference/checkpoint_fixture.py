#!/usr/bin/env python3
"""A tiny safetensors file written by PyTorch's safetensors, for engine/tests/checkpoint.rs.

Writes engine/tests/fixtures/torch_state.safetensors with one tensor of each element type a
PyTorch state dict brings (f32, bf16, f16, and the int64 `num_batches_tracked` of BatchNorm, a
0-dimensional tensor) and {"format": "pt"} metadata, as `safetensors.torch.save_file` writes
for a model. The values are exactly representable in their dtypes, so the Rust test can state
them literally. Needs `pip install safetensors numpy`. Run from the repository root:

    python3 scripts/reference/checkpoint_fixture.py

CI never runs this; the file is committed.
"""

import os

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "engine", "tests", "fixtures", "torch_state.safetensors")


def main():
    state = {
        # f32: -1.25, -0.75, ..., 1.25
        "conv.weight": (torch.arange(6, dtype=torch.float32) * 0.5 - 1.25).reshape(2, 3),
        "bn.running_var": torch.tensor([1.5, -2.0, 0.15625], dtype=torch.bfloat16),
        # f16: the largest finite value and the smallest subnormal, 2^-24.
        "emb.half": torch.tensor([[0.5, -65504.0], [2.0**-24, 1024.0]], dtype=torch.float16),
        "bn.num_batches_tracked": torch.tensor(123456, dtype=torch.int64),
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(state, OUT, metadata={"format": "pt"})
    print(f"wrote {os.path.relpath(OUT, ROOT)}")


if __name__ == "__main__":
    main()
