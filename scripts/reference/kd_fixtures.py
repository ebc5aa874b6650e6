#!/usr/bin/env python3
"""PyTorch reference values for Recycle's fused distillation loss (tests/kd_loss.rs).

Each case: student logits s [N, C], k teacher logits, labels (with -100 = ignored), an optional
row mask, and PyTorch's
  ce    = F.cross_entropy(s, y, ignore_index=-100)
  kd_kl = F.kl_div(F.log_softmax(s/T, -1), F.log_softmax(t/T, -1), log_target=True,
                   reduction="batchmean") * T**2        (t = mean of the teachers' logits)
  kd_mse= F.mse_loss(s, t)
  total = ce + lam * kd, and d total / d s by autograd.
Masked-out rows are removed before the loss (their gradient is 0). This pins the direction of
the KL term: the teacher distribution is the target.

Run from the repository root: python3 scripts/reference/kd_fixtures.py
"""
import json
import os

import torch
import torch.nn.functional as F


def case(name, n, c, k, kind, T, lam, ignore_rows=(), mask=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).float()
    ts = [(torch.randn(n, c, generator=g, dtype=torch.float64) * 3).float() for _ in range(k)]
    y = torch.randint(0, c, (n,), generator=g)
    for r in ignore_rows:
        y[r] = -100
    keep = torch.ones(n, dtype=torch.bool) if mask is None else torch.tensor(mask, dtype=torch.bool)
    sv = s.clone().requires_grad_(True)
    s_in, y_in = sv[keep], y[keep]
    ce = F.cross_entropy(s_in, y_in, ignore_index=-100)
    if k == 0:
        kd = torch.zeros(())
    else:
        t = torch.stack(ts).mean(0)[keep]
        if kind == "kl":
            kd = F.kl_div(F.log_softmax(s_in / T, -1), F.log_softmax(t / T, -1),
                          log_target=True, reduction="batchmean") * T * T
        else:
            kd = F.mse_loss(s_in, t)
    total = ce + lam * kd
    total.backward()
    return {
        "name": name, "rows": n, "classes": c, "kind": kind, "temperature": T, "weight": lam,
        "student": s.flatten().tolist(),
        "teachers": [t.flatten().tolist() for t in ts],
        "labels": y.tolist(),
        "mask": None if mask is None else [int(m) for m in mask],
        "ce": ce.item(), "kd": kd.item(), "total": total.item(),
        "grad": sv.grad.flatten().tolist(),
    }


def main():
    cases = [
        case("kl_t4_one_teacher_ignored_row", 6, 10, 1, "kl", 4.0, 1.0, ignore_rows=(2,), seed=1),
        case("kl_t1_three_teachers_vocab1000", 4, 1000, 3, "kl", 1.0, 0.5, seed=2),
        case("mse_two_teachers", 5, 10, 2, "mse", 1.0, 0.7, seed=3),
        case("kl_t2_row_mask", 6, 12, 1, "kl", 2.0, 2.0, mask=[1, 0, 1, 1, 0, 1], seed=4),
        case("ce_only", 5, 7, 0, "kl", 1.0, 1.0, ignore_rows=(0,), seed=5),
    ]
    os.makedirs("tests/fixtures", exist_ok=True)
    with open("tests/fixtures/kd_loss.json", "w") as f:
        json.dump({"torch": torch.__version__, "cases": cases}, f)
    print(f"wrote tests/fixtures/kd_loss.json ({len(cases)} cases)")


if __name__ == "__main__":
    main()
