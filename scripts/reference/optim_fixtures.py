#!/usr/bin/env python3
"""Reference values for engine/tests/optim_reference.rs, computed by PyTorch.

Writes engine/tests/fixtures/optim.json:
  - SGDW: torch.optim.SGD (momentum 0.875, nesterov off and on, weight_decay=0) with the
    decoupled weight decay of MosaicML Composer's DecoupledSGDW applied to the parameter
    before each optimizer.step() (the optimizer the paper used; Composer's
    composer/optim/decoupled_weight_decay.py, DecoupledSGDW.sgdw:
        decay_factor = (lr / initial_lr) if initial_lr else 1.0
        param.mul_(1 - decay_factor * weight_decay)
    followed by SGD's update, which never sees the decay);
  - AdamW: torch.optim.AdamW with betas (0.9, 0.98), eps 1e-6, weight_decay 1e-2, and with
    its default hyper-parameters;
  - learning rates per step from PyTorch's own schedulers (SequentialLR of a LinearLR warmup
    and a CosineAnnealingLR or LinearLR decay), for every step 0..=total, so the boundary steps
    0, W-1, W, W+1, total-1 and total are all there.

Every optimizer run uses a 12-element parameter, 6 random gradients (fixed seed) and a
per-step learning rate from one of those schedules. Run from the repository root:

    python3 scripts/reference/optim_fixtures.py

CI never runs this; the JSON is committed.
"""

import json
import os
import re
import warnings

import torch
from torch.optim import SGD, AdamW
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "engine", "tests", "fixtures", "optim.json")

N = 12
STEPS = 6
# LinearLR needs start_factor > 0; this makes step 0 of the warmup 0 to within 1e-12.
TINY = 1e-12

# SequentialLR passes an epoch to the second scheduler at the milestone, which warns.
warnings.filterwarnings("ignore", category=UserWarning)


def warmup_steps_from_fraction(fraction, total):
    # Composer converts a fraction of the duration to whole steps with int(), i.e. floor.
    return int(fraction * total)


def make_scheduler(opt, kind, warmup, total, final_lr):
    base = opt.param_groups[0]["lr"]
    warm = LinearLR(opt, start_factor=TINY, end_factor=1.0, total_iters=warmup)
    if kind == "warmup_cosine":
        decay = CosineAnnealingLR(opt, T_max=total - warmup, eta_min=final_lr)
    elif kind == "warmup_linear_decay":
        decay = LinearLR(
            opt, start_factor=1.0, end_factor=final_lr / base, total_iters=total - warmup
        )
    else:
        raise ValueError(kind)
    return SequentialLR(opt, [warm, decay], milestones=[warmup])


def schedule_case(kind, base_lr, total, final_lr, warmup=None, warmup_fraction=None):
    if warmup is None:
        warmup = warmup_steps_from_fraction(warmup_fraction, total)
    p = torch.zeros(1, requires_grad=True)
    opt = SGD([p], lr=base_lr)
    sched = make_scheduler(opt, kind, warmup, total, final_lr)
    lrs = []
    for _ in range(total + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return {
        "kind": kind,
        "base_lr": base_lr,
        "final_lr": final_lr,
        "total_steps": total,
        "warmup_steps": warmup,
        "warmup_fraction": warmup_fraction,
        "lrs": lrs,
    }


def optimizer_schedule():
    # The learning rates the optimizer runs use: 2 warmup steps, then cosine over 6 steps.
    return {"kind": "warmup_cosine", "warmup_steps": 2, "total_steps": STEPS, "final_lr_factor": 0.0}


def run_sgdw(init, grads, base_lr, momentum, dampening, nesterov, weight_decay):
    p = init.clone().requires_grad_(True)
    opt = SGD(
        [p],
        lr=base_lr,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=0.0,
        foreach=False,
    )
    s = optimizer_schedule()
    sched = make_scheduler(opt, s["kind"], s["warmup_steps"], s["total_steps"], 0.0)
    initial_lr = base_lr
    lrs, params = [], []
    for g in grads:
        lr = opt.param_groups[0]["lr"]
        lrs.append(lr)
        p.grad = g.clone()
        # Composer's DecoupledSGDW decay, written out (see the module docstring).
        with torch.no_grad():
            if weight_decay != 0:
                decay_factor = (lr / initial_lr) if initial_lr else 1.0
                p.mul_(1 - decay_factor * weight_decay)
        opt.step()
        sched.step()
        params.append(p.detach().tolist())
    return {
        "momentum": momentum,
        "dampening": dampening,
        "nesterov": nesterov,
        "weight_decay": weight_decay,
        "initial_lr": initial_lr,
        "schedule": dict(s, base_lr=base_lr),
        "lrs": lrs,
        "params": params,
    }


def run_adamw(init, grads, base_lr, **hparams):
    p = init.clone().requires_grad_(True)
    opt = AdamW([p], lr=base_lr, foreach=False, **hparams)
    group = opt.param_groups[0]
    s = optimizer_schedule()
    sched = make_scheduler(opt, s["kind"], s["warmup_steps"], s["total_steps"], 0.0)
    lrs, params = [], []
    for g in grads:
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = g.clone()
        opt.step()
        sched.step()
        params.append(p.detach().tolist())
    return {
        "beta1": group["betas"][0],
        "beta2": group["betas"][1],
        "eps": group["eps"],
        "weight_decay": group["weight_decay"],
        "schedule": dict(s, base_lr=base_lr),
        "lrs": lrs,
        "params": params,
    }


def main():
    torch.manual_seed(0)
    init = torch.randn(N, dtype=torch.float32)
    grads = torch.randn(STEPS, N, dtype=torch.float32)
    # Element 0 never gets a gradient (Adam's denominator is then eps alone); element 1 gets
    # tiny ones (sqrt(v) comparable to eps 1e-6).
    grads[:, 0] = 0.0
    grads[:, 1] *= 1e-6
    grads = list(grads)

    sgdw = {
        "paper": run_sgdw(init, grads, 0.1, 0.875, 0.0, False, 5e-4),
        "paper_nesterov": run_sgdw(init, grads, 0.1, 0.875, 0.0, True, 5e-4),
        "large_lr_dampening_strong_decay": run_sgdw(init, grads, 2.045, 0.875, 0.1, False, 0.05),
    }
    adamw = {
        "bert": run_adamw(init, grads, 0.05, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-2),
        "torch_defaults": run_adamw(init, grads, 0.05),
    }
    schedules = {
        "cosine_w3_t20": schedule_case("warmup_cosine", 2.045, 20, 0.0, warmup=3),
        "cosine_fraction": schedule_case("warmup_cosine", 0.1, 20, 1e-3, warmup_fraction=0.15),
        "linear_w3_t20": schedule_case("warmup_linear_decay", 5e-4, 20, 0.0, warmup=3),
        "linear_fraction": schedule_case(
            "warmup_linear_decay", 5e-4, 40, 1e-5, warmup_fraction=0.06
        ),
    }
    fixture = {
        "generator": "scripts/reference/optim_fixtures.py",
        "torch_version": torch.__version__,
        "init": init.tolist(),
        "grads": [g.tolist() for g in grads],
        "sgdw": sgdw,
        "adamw": adamw,
        "schedules": schedules,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    text = json.dumps(fixture, indent=1)
    # One line per list of numbers keeps the file small and diffable.
    text = re.sub(r"\[[^\[\]{}\"]*\]", lambda m: " ".join(m.group(0).split()), text)
    with open(OUT, "w") as f:
        f.write(text + "\n")
    print(f"wrote {os.path.relpath(OUT, ROOT)}")


if __name__ == "__main__":
    main()
