#!/usr/bin/env python3
"""Where a PyTorch training step spends its time, for the models of torch_kd_overhead.py.

Beside scripts/reference/torch_kd_overhead.py (the per-step distillation peer), this times the
phases of the same plain step, interleaved as the peer does: student forward, forward +
backward, the whole step (forward, backward, optimizer) and a teacher forward. For BERT it adds
the *masked head* variant: the MLM head (transform + vocabulary projection) applied only at the
masked positions, as recycle's BERT does (Hugging Face's BertForMaskedLM, which the peer uses,
projects every position onto the 30522-word vocabulary, ~7x the work at 15% masking). That
variant is the equal-work PyTorch counterpart of recycle's plain and KD steps; KD runs on the
masked positions only in it (torch_kd_overhead.py --mlm-head masked measures the same step
with its KD variants).

    python3 scripts/reference/torch_step_breakdown.py --model resnet18-fmnist --batch 128
    python3 scripts/reference/torch_step_breakdown.py --model resnet18-fmnist --batch 128 \
        --width 0.125   # the peer of `recycle bench --model resnet18-fmnist-small`
    python3 scripts/reference/torch_step_breakdown.py --model bert-tiny --batch 32

Prints one JSON line (milliseconds, medians).
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def bench_interleaved(steps, iters, warmup):
    for _ in range(warmup):
        for step in steps:
            step()
    times = [[] for _ in steps]
    for _ in range(iters):
        for i, step in enumerate(steps):
            t0 = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - t0)
    return [sorted(ts)[len(ts) // 2] * 1e3 for ts in times]


def small_resnet18(width):
    """ResNet-18 with the small stem (3x3 stride-1 convolution, no max-pool, 1 input channel)
    and every channel count scaled by `width`, rounded as Recycle's ResNet rounds it."""
    from torchvision.models.resnet import BasicBlock

    widths = [max(1, int(c * width + 0.5)) for c in (64, 128, 256, 512)]
    layers = [nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
              nn.ReLU(inplace=True)]
    inplanes = widths[0]
    for stage, planes in enumerate(widths):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                     nn.BatchNorm2d(planes))
            layers.append(BasicBlock(inplanes, planes, stride, down))
            inplanes = planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, 10)]
    return nn.Sequential(*layers)


def kl(s, t, T=4.0):
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1),
                    log_target=True, reduction="batchmean") * T * T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18-fmnist", choices=["resnet18-fmnist", "bert-tiny"])
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--width", type=float, default=1.0,
                    help="ResNet channel multiplier (0.125: recycle bench's resnet18-fmnist-small)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    out = {"model": a.model, "batch": a.batch, "torch": torch.__version__,
           "threads": torch.get_num_threads()}
    if a.model == "resnet18-fmnist":
        out["width"] = a.width
    if a.model == "resnet18-fmnist":
        import torchvision

        def make():
            if a.width != 1.0:
                return small_resnet18(a.width)
            m = torchvision.models.resnet18(num_classes=10)
            m.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
            m.maxpool = nn.Identity()
            return m
        student, teacher = make(), make().eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        x = torch.randn(a.batch, 1, 28, 28)
        y = torch.randint(0, 10, (a.batch,))
        opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.875, weight_decay=5e-4)

        def fwd():
            F.cross_entropy(student(x), y)

        def fwd_bwd():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(student(x), y).backward()

        def step():
            fwd_bwd()
            opt.step()

        def teacher_fwd():
            with torch.no_grad():
                teacher(x)

        names = ["fwd_ms", "fwd_bwd_ms", "plain_ms", "teacher_fwd_ms"]
        res = bench_interleaved([fwd, fwd_bwd, step, teacher_fwd], a.iters, a.warmup)
    else:
        from transformers import BertConfig, BertForMaskedLM
        cfg = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=512)
        student, teacher = BertForMaskedLM(cfg), BertForMaskedLM(cfg).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        V = cfg.vocab_size
        ids = torch.randint(0, V, (a.batch, a.seq))
        mask = torch.rand(a.batch, a.seq) < 0.15
        labels_all = ids.clone()
        labels_all[~mask] = -100
        labels = ids[mask]
        opt = torch.optim.AdamW(student.parameters(), lr=5e-4, weight_decay=1e-5)

        def masked_logits(m):
            h = m.bert(input_ids=ids).last_hidden_state
            return m.cls(h[mask])

        def full_fwd():
            F.cross_entropy(student(input_ids=ids).logits.view(-1, V), labels_all.view(-1))

        def full_step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(student(input_ids=ids).logits.view(-1, V), labels_all.view(-1)).backward()
            opt.step()

        def masked_fwd():
            F.cross_entropy(masked_logits(student), labels)

        def masked_fwd_bwd():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(masked_logits(student), labels).backward()

        def masked_step():
            masked_fwd_bwd()
            opt.step()

        def masked_kd_step():
            opt.zero_grad(set_to_none=True)
            s = masked_logits(student)
            with torch.no_grad():
                t = masked_logits(teacher)
            (F.cross_entropy(s, labels) + kl(s, t)).backward()
            opt.step()

        def full_teacher_fwd():
            with torch.no_grad():
                teacher(input_ids=ids)

        def masked_teacher_fwd():
            with torch.no_grad():
                masked_logits(teacher)

        names = ["full_head_fwd_ms", "full_head_plain_ms", "fwd_ms", "fwd_bwd_ms", "plain_ms",
                 "kd_ms", "full_head_teacher_fwd_ms", "teacher_fwd_ms"]
        res = bench_interleaved([full_fwd, full_step, masked_fwd, masked_fwd_bwd, masked_step,
                                 masked_kd_step, full_teacher_fwd, masked_teacher_fwd],
                                a.iters, a.warmup)
        out["masked_positions"] = int(mask.sum())
    for n, v in zip(names, res):
        out[n] = round(v, 3)
    if "kd_ms" in out:
        out["kd_ratio"] = round(out["kd_ms"] / out["plain_ms"], 4)
    out["teacher_fwd_frac"] = round(out["teacher_fwd_ms"] / out["plain_ms"], 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
