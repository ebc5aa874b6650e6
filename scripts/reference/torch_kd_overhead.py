#!/usr/bin/env python3
"""The per-step cost of distillation in PyTorch: the peer of `recycle bench` (src/bench.rs).

One training step (forward, backward, optimizer) of a student, plain and with one frozen
teacher of the same architecture (KL at T = 4 scaled by T^2, or MSE on the logits; lambda = 1),
and the teacher's forward alone, on one random batch, interleaved round after round as
`recycle bench` interleaves its variants; each figure is a median over the timed rounds.

Models (the shapes of `recycle bench --model ...`):

- `resnet18-fmnist`: torchvision ResNet-18, full width, 3x3 stride-1 stem, no max-pool,
  1x28x28 input, 10 classes (batch 128 by default); SGD, momentum 0.875, weight decay 5e-4.
- `resnet50`: torchvision ResNet-50, 3x224x224, 1000 classes (batch 256); the same SGD.
- `bert-tiny`: Hugging Face BertForMaskedLM, 2 layers, hidden 128, 2 heads, FFN 512 (batch 32).
- `bert-base`: BertForMaskedLM with the default BertConfig, 12 layers, hidden 768 (batch 128).
  Both BERTs: vocabulary 30522, sequence 128 (`--seq`), every position attended, 15% of the
  positions masked (each drawn independently), the label of a masked position its own token;
  AdamW, lr 5e-4, weight decay 1e-5.

Where the MLM head runs (`--mlm-head`): `all` (the default) is BertForMaskedLM as it comes,
projecting every position onto the vocabulary, plain or KD; `masked` applies the head
(`model.cls`) to the masked positions only, as Recycle's BERT does: the equal-work setting.
`--kd-positions masked|all` chooses the rows the distillation term covers (with
`--mlm-head masked` only the masked rows exist). Cross-entropy is over the masked positions.

Precision: by default student and teacher are f32. `--bf16-teacher` converts the teacher's
weights to bf16 and runs its forward in bf16 (Recycle's teachers are bf16 on every device);
`--autocast bf16` runs the student's forward under bf16 autocast (its matmuls and
convolutions in bf16: the equal-work peer of Recycle's `--activations bf16`); `--bf16` is
both. The JSON line names what was used.

    python3 scripts/reference/torch_kd_overhead.py --model resnet18-fmnist --device cpu --loss kl
    python3 scripts/reference/torch_kd_overhead.py --model bert-tiny --mlm-head masked \\
        --kd-positions masked --bf16-teacher
    python3 scripts/reference/torch_kd_overhead.py --model bert-base --device cuda --bf16 \\
        --kd-positions all

Prints one JSON line per loss (`--loss both`, the default, prints two from the same
interleaved rounds; `--loss none` times the plain step alone and prints one line with
plain_ms only): model, device, shapes, loss, positions, dtypes, torch version and threads,
plain_ms, kd_ms, kd_ratio, teacher_fwd_ms, teacher_ratio (medians, ms).
Needs torch, and torchvision (ResNet) or transformers (BERT).
"""
import argparse
import json
import statistics
import sys
import time

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError as e:  # the scripts that call this name the Python; say which one failed
    sys.exit(f"torch_kd_overhead.py: {sys.executable} cannot import torch ({e}); "
             "run it with a Python that has PyTorch (pip install torch torchvision transformers)")

MODELS = ["resnet18-fmnist", "resnet50", "bert-tiny", "bert-base"]
DEFAULT_BATCH = {"resnet18-fmnist": 128, "resnet50": 256, "bert-tiny": 32, "bert-base": 128}
TEMPERATURE = 4.0


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, choices=MODELS)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, help="samples per step (default: per model)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (BERT)")
    ap.add_argument("--loss", default="both", choices=["kl", "mse", "both", "none"],
                    help="the distillation term(s) timed beside the plain step (none: plain only)")
    ap.add_argument("--mlm-head", default="all", choices=["all", "masked"],
                    help="BERT: project every position, or the masked ones only")
    ap.add_argument("--kd-positions", default="masked", choices=["masked", "all"],
                    help="BERT: the rows the distillation term covers")
    ap.add_argument("--bf16-teacher", action="store_true", help="teacher weights and forward in bf16")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 teacher, and bf16 autocast for the student's forward")
    ap.add_argument("--autocast", default="none", choices=["none", "bf16"],
                    help="the student's forward under torch.autocast(dtype=bfloat16) (its "
                         "matmuls and convolutions, and their backward, in bf16), the teacher "
                         "as --bf16-teacher says")
    ap.add_argument("--iters", type=int, default=10, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=3, help="rounds run first and not timed")
    a = ap.parse_args(argv)
    if a.batch is None:
        a.batch = DEFAULT_BATCH[a.model]
    if a.batch < 1 or a.seq < 1 or a.iters < 1 or a.warmup < 0:
        ap.error("--batch, --seq and --iters must be at least 1, --warmup at least 0")
    if a.model.startswith("bert") and a.mlm_head == "masked" and a.kd_positions == "all":
        ap.error("--mlm-head masked gives logits at the masked positions only: "
                 "use --kd-positions masked, or --mlm-head all")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is false "
                 f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    if a.bf16:
        a.bf16_teacher = True
        a.autocast = "bf16"
    return a


def kd_term(kind, s, t):
    """The distillation term on [rows, classes] logits, as Recycle's fused loss defines it."""
    s, t = s.float(), t.float()
    if kind == "kl":
        T = TEMPERATURE
        return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1),
                        log_target=True, reduction="batchmean") * T * T
    return F.mse_loss(s, t)


def freeze(m):
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


class ResNetTask:
    def __init__(self, a, dev):
        import torchvision

        def make():
            if a.model == "resnet18-fmnist":
                m = torchvision.models.resnet18(num_classes=10)
                m.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
                m.maxpool = nn.Identity()
            else:
                m = torchvision.models.resnet50(num_classes=1000)
            return m.to(dev)

        channels, hw, classes = (1, 28, 10) if a.model == "resnet18-fmnist" else (3, 224, 1000)
        self.student = make().train()
        self.teacher = freeze(make())
        if a.bf16_teacher:
            self.teacher = self.teacher.to(torch.bfloat16)
        self.teacher_dtype = torch.bfloat16 if a.bf16_teacher else torch.float32
        self.x = torch.randn(a.batch, channels, hw, hw, device=dev)
        self.y = torch.randint(0, classes, (a.batch,), device=dev)
        self.rows = a.batch
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=0.01, momentum=0.875,
                                         weight_decay=5e-4)

    def student_logits(self):
        return self.student(self.x), self.y

    def teacher_logits(self):
        return self.teacher(self.x.to(self.teacher_dtype))


class BertTask:
    def __init__(self, a, dev):
        from transformers import BertConfig, BertForMaskedLM

        if a.model == "bert-tiny":
            cfg = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=512)
        else:
            cfg = BertConfig()
        self.student = BertForMaskedLM(cfg).to(dev).train()
        self.teacher = freeze(BertForMaskedLM(cfg).to(dev))
        if a.bf16_teacher:
            self.teacher = self.teacher.to(torch.bfloat16)
        self.ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device=dev)
        self.mask = torch.rand(a.batch, a.seq, device=dev) < 0.15
        if not bool(self.mask.any()):
            self.mask[0, 0] = True
        self.labels = self.ids[self.mask]
        self.head, self.kd_positions = a.mlm_head, a.kd_positions
        self.vocab = cfg.vocab_size
        self.rows = int(self.mask.sum()) if a.kd_positions == "masked" else a.batch * a.seq
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=5e-4, weight_decay=1e-5)

    def _logits(self, m):
        """Logits at the rows the distillation term uses, and every row the head produced."""
        if self.head == "masked":
            h = m.bert(input_ids=self.ids).last_hidden_state
            return m.cls(h[self.mask])
        return m(input_ids=self.ids).logits

    def student_logits(self):
        logits = self._logits(self.student)
        if self.head == "masked":
            return logits, self.labels
        return logits, self.labels, logits[self.mask]

    def teacher_logits(self):
        return self._logits(self.teacher)

    def kd_rows(self, s_all, t_all):
        if self.head == "all" and self.kd_positions == "masked":
            return s_all[self.mask], t_all[self.mask]
        return s_all.reshape(-1, self.vocab), t_all.reshape(-1, self.vocab)


def make_steps(task, a, dev):
    """plain, kd-kl, kd-mse and teacher-fwd as closures, each one whole step."""
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16,
                              enabled=a.autocast == "bf16")
    is_bert = isinstance(task, BertTask)

    def forward_ce():
        with autocast:
            out = task.student_logits()
        if is_bert and len(out) == 3:
            logits, labels, at_labels = out
            return logits, F.cross_entropy(at_labels.float(), labels)
        logits, labels = out
        return logits, F.cross_entropy(logits.float(), labels)

    def plain():
        task.optimizer.zero_grad(set_to_none=True)
        _, ce = forward_ce()
        ce.backward()
        task.optimizer.step()

    def kd(kind):
        def step():
            task.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad(), autocast:
                t = task.teacher_logits()
            s, ce = forward_ce()
            if is_bert:
                s, t = task.kd_rows(s, t)
            (ce + kd_term(kind, s, t)).backward()
            task.optimizer.step()
        return step

    def teacher_fwd():
        with torch.no_grad(), autocast:
            task.teacher_logits()

    return {"plain": plain, "kd-kl": kd("kl"), "kd-mse": kd("mse"), "teacher-fwd": teacher_fwd}


def measure(steps, iters, warmup, dev):
    """Median ms of each step, run in alternation; on a GPU each step sits between two syncs."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for f in steps.values():
            f()
    times = {name: [] for name in steps}
    for _ in range(iters):
        for name, f in steps.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
    a = parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    task = (BertTask if a.model.startswith("bert") else ResNetTask)(a, dev)
    steps = make_steps(task, a, dev)
    losses = {"both": ["kl", "mse"], "none": []}.get(a.loss, [a.loss])
    wanted = ["plain"] + [f"kd-{k}" for k in losses] + (["teacher-fwd"] if losses else [])
    ms = measure({k: steps[k] for k in wanted}, a.iters, a.warmup, dev)
    base = {
        "model": a.model, "device": a.device, "batch": a.batch,
        "student_dtype": "bf16-autocast" if a.autocast == "bf16" else "f32",
        "teacher_dtype": "bf16" if a.bf16_teacher else "f32",
        "kd_rows": task.rows, "iters": a.iters, "warmup": a.warmup,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    if isinstance(task, BertTask):
        base.update(seq=a.seq, mlm_head=a.mlm_head, kd_positions=a.kd_positions,
                    masked_positions=int(task.mask.sum()))
    if dev.type == "cuda":
        base["gpu"] = torch.cuda.get_device_name(dev)
    if not losses:
        print(json.dumps(dict(base, loss=None, plain_ms=round(ms["plain"], 3))), flush=True)
    for kind in losses:
        plain, kd, teacher = ms["plain"], ms[f"kd-{kind}"], ms["teacher-fwd"]
        line = dict(base, loss=kind, plain_ms=round(plain, 3), kd_ms=round(kd, 3),
                    kd_ratio=round(kd / plain, 4), teacher_fwd_ms=round(teacher, 3),
                    teacher_ratio=round(teacher / plain, 4))
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
