#!/usr/bin/env python3
"""PyTorch reference fixtures for the engine's norm, softmax, attention and loss ops.

Writes small JSON files to engine/tests/fixtures/ops_*.json; engine/tests/ops_reference.rs
loads them and compares the engine's forward values and gradients. CI never runs this script:
the fixtures are committed. Rerun it (any recent PyTorch, CPU only) after changing a case:

    python3 scripts/reference/ops_fixtures.py

Inputs are drawn in float32 from fixed seeds, so the engine sees exactly the same values; the
references are computed in float64 from those values and written with 9 significant digits
(enough to round-trip a float32). Each tensor is {"shape": [...], "data": [flat, row-major]}.
"""

import json
import math
import pathlib

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "engine" / "tests" / "fixtures"


def tensor(t):
    t = t.detach().to(torch.float32).cpu()
    return {
        "shape": list(t.shape),
        "data": [float(f"{v:.9g}") for v in t.reshape(-1).tolist()],
    }


def ints(t):
    return {"shape": list(t.shape), "data": [int(v) for v in t.reshape(-1).tolist()]}


def randn(gen, *shape, scale=1.0, shift=0.0):
    """float32 normal samples, returned as float64 holding exactly those float32 values."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float32) * scale + shift
    return x.to(torch.float32).to(torch.float64)


def leaf(x):
    return x.clone().requires_grad_(True)


def write(name, payload):
    payload = {
        "generator": "scripts/reference/ops_fixtures.py",
        "torch_version": torch.__version__,
        **payload,
    }
    path = OUT / name
    path.write_text(json.dumps(payload, separators=(",", ":")) + "\n")
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size} bytes)")


def cross_entropy_cases():
    gen = torch.Generator().manual_seed(1)
    cases = []
    for ignore_index, smoothing, labels in [
        (-100, 0.0, [0, 3, -100, 4, 1, 1, -100, 2]),
        (-100, 0.1, [0, 3, -100, 4, 1, 1, -100, 2]),
        (2, 0.25, [2, 0, 4, 2, 3, 1, 0, 2]),
    ]:
        logits = randn(gen, 8, 5, scale=2.0)
        y = torch.tensor(labels, dtype=torch.int64)
        x = leaf(logits)
        loss = F.cross_entropy(
            x, y, ignore_index=ignore_index, label_smoothing=smoothing, reduction="mean"
        )
        loss.backward()
        cases.append(
            {
                "ignore_index": ignore_index,
                "label_smoothing": smoothing,
                "logits": tensor(logits),
                "labels": ints(y),
                "loss": float(f"{loss.item():.9g}"),
                "grad_logits": tensor(x.grad),
            }
        )
    write(
        "ops_cross_entropy.json",
        {
            "op": "F.cross_entropy(logits, labels, ignore_index, label_smoothing, reduction='mean'); "
            "grad for upstream 1",
            "cases": cases,
        },
    )


def batch_norm_cases():
    gen = torch.Generator().manual_seed(2)
    n, c, h, w = 2, 3, 3, 3
    momentum, eps = 0.1, 1e-5
    cases = []
    for training in [True, False]:
        x = randn(gen, n, c, h, w, scale=1.5, shift=0.5)
        weight = randn(gen, c, scale=0.3, shift=1.0)
        bias = randn(gen, c, scale=0.5)
        running_mean = randn(gen, c, scale=0.2)
        running_var = randn(gen, c, scale=0.2).abs() + 0.5
        running_var = running_var.to(torch.float32).to(torch.float64)
        dy = randn(gen, n, c, h, w)
        rm, rv = running_mean.clone(), running_var.clone()
        xv, wv, bv = leaf(x), leaf(weight), leaf(bias)
        y = F.batch_norm(xv, rm, rv, wv, bv, training=training, momentum=momentum, eps=eps)
        y.backward(dy)
        cases.append(
            {
                "training": training,
                "momentum": momentum,
                "eps": eps,
                "x": tensor(x),
                "weight": tensor(weight),
                "bias": tensor(bias),
                "running_mean": tensor(running_mean),
                "running_var": tensor(running_var),
                "grad_output": tensor(dy),
                "output": tensor(y),
                "grad_x": tensor(xv.grad),
                "grad_weight": tensor(wv.grad),
                "grad_bias": tensor(bv.grad),
                "running_mean_after": tensor(rm),
                "running_var_after": tensor(rv),
            }
        )
    write(
        "ops_batch_norm2d.json",
        {"op": "F.batch_norm on [N, C, H, W], training and eval", "cases": cases},
    )


def layer_norm_cases():
    gen = torch.Generator().manual_seed(3)
    d, eps = 6, 1e-5
    x = randn(gen, 2, 3, d, scale=2.0, shift=1.0)
    weight = randn(gen, d, scale=0.3, shift=1.0)
    bias = randn(gen, d, scale=0.5)
    dy = randn(gen, 2, 3, d)
    xv, wv, bv = leaf(x), leaf(weight), leaf(bias)
    y = F.layer_norm(xv, (d,), wv, bv, eps)
    y.backward(dy)
    case = {
        "eps": eps,
        "x": tensor(x),
        "weight": tensor(weight),
        "bias": tensor(bias),
        "grad_output": tensor(dy),
        "output": tensor(y),
        "grad_x": tensor(xv.grad),
        "grad_weight": tensor(wv.grad),
        "grad_bias": tensor(bv.grad),
    }
    write("ops_layer_norm.json", {"op": "F.layer_norm over the last dimension", "cases": [case]})


def softmax_cases():
    gen = torch.Generator().manual_seed(4)
    # The second row's logits are large: exp() overflows without the max subtraction.
    x = randn(gen, 3, 7, scale=3.0)
    x[1] += 500.0
    x = x.to(torch.float32).to(torch.float64)
    dy = randn(gen, 3, 7)
    cases = []
    for name, fn in [("softmax", F.softmax), ("log_softmax", F.log_softmax)]:
        xv = leaf(x)
        y = fn(xv, dim=-1)
        y.backward(dy)
        cases.append(
            {
                "op": name,
                "x": tensor(x),
                "grad_output": tensor(dy),
                "output": tensor(y),
                "grad_x": tensor(xv.grad),
            }
        )
    write("ops_softmax.json", {"op": "F.softmax / F.log_softmax over dim -1", "cases": cases})


def attention_cases():
    gen = torch.Generator().manual_seed(5)
    b, h, s, dh = 2, 2, 5, 4
    q = randn(gen, b, h, s, dh)
    k = randn(gen, b, h, s, dh)
    v = randn(gen, b, h, s, dh)
    dy = randn(gen, b, h, s, dh)
    # 1 = attend, 0 = padding: batch item 0 has two padded keys.
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.int32)
    qv, kv, vv = leaf(q), leaf(k), leaf(v)
    attn_mask = mask.bool()[:, None, None, :]  # True = take part in attention
    y = F.scaled_dot_product_attention(qv, kv, vv, attn_mask=attn_mask, dropout_p=0.0)
    y.backward(dy)

    # The same thing written out, as a check on the library call.
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    scores = scores.masked_fill(~attn_mask, float("-inf"))
    explicit = torch.softmax(scores, dim=-1) @ v
    assert torch.allclose(explicit, y.detach(), atol=1e-12), "SDPA disagrees with softmax(qk^T)v"

    case = {
        "dropout": 0.0,
        "q": tensor(q),
        "k": tensor(k),
        "v": tensor(v),
        "key_padding_mask": ints(mask),
        "grad_output": tensor(dy),
        "output": tensor(y),
        "grad_q": tensor(qv.grad),
        "grad_k": tensor(kv.grad),
        "grad_v": tensor(vv.grad),
    }
    write(
        "ops_attention.json",
        {
            "op": "F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_mask[:, None, None, :].bool())",
            "cases": [case],
        },
    )


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_default_dtype(torch.float64)
    cross_entropy_cases()
    batch_norm_cases()
    layer_norm_cases()
    softmax_cases()
    attention_cases()


if __name__ == "__main__":
    main()
