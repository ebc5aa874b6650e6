#!/usr/bin/env python3
"""Where does distillation pay at CPU scale? Runs one scenario of the search recorded in
docs/experiments.md with the trainer itself (`recycle sweep` and `recycle train`) and prints,
for every student, the samples and seconds at which it first reached each baseline's final
accuracy.

Choices are made on the validation split (`data.validation_fraction` of the training subset,
held out of training): the best sweep learning rate, and so the teacher and the baselines' rate.
Every accuracy in the table is on the test split, which nothing is chosen on.

A scenario fixes the data (training subset size), the teachers (a learning-rate sweep at some
duration) and the baselines (the best sweep learning rate at several durations, another seed);
the students vary what distillation can change: duration, loss, temperature T, weight λ, the
fraction of training after which distillation stops, the teacher strategy, and their seed.

  python3 scripts/experiments/regime_search.py --out runs/regime/long \\
      --train-limit 20000 --teacher-epochs 6 --baselines 1,2,3,4 \\
      --student e=3,T=1,w=1 --student e=3,T=1,w=1,stop=0.5 --student e=2,strategy=random-one

Finished runs are kept and reused (a run directory holding summary.json is not trained
again), so students can be added to a scenario later. The trainer binary is
target/release/recycle (build it with `cargo build --release --bin recycle`) unless
RECYCLE_BIN says otherwise.
"""
import argparse
import os
import subprocess
import sys

from samples_to_target import first_reaching, load

BIN = os.environ.get("RECYCLE_BIN", "target/release/recycle")


def recipe_toml(name, out_dir, seed, lr, epochs, a, distill=None, label=None):
    lines = [
        f'name = "{name}"',
        f"seed = {seed}",
    ]
    if label:
        lines.append(f'label = "{label}"')
    lines += [
        f'out_dir = "{out_dir}"',
        "",
        "[model]",
        'kind = "resnet"',
        "depth = 18",
        f"width = {a.width}",
        "small_stem = true",
        "",
        "[data]",
        'dataset = "fashion-mnist"',
        f"train_limit = {a.train_limit}",
        f"eval_limit = {a.eval_limit}",
        f"validation_fraction = {a.validation_fraction}",
        "",
        "[train]",
        f"batch_size = {a.batch}",
        f"epochs = {float(epochs)}",
        f"evals = {a.evals}",
        "",
        "[optimizer]",
        'kind = "sgdw"',
        f"lr = {lr}",
        "momentum = 0.875",
        "weight_decay = 0.0005",
        'schedule = "cosine"',
        "warmup = 0.1",
    ]
    if distill:
        teachers = ", ".join(f'"{t}"' for t in distill["teachers"])
        lines += [
            "",
            "[distill]",
            f"teachers = [{teachers}]",
            f'loss = "{distill["loss"]}"',
            f"temperature = {distill['T']}",
            f"weight = {distill['w']}",
            f'strategy = "{distill["strategy"]}"',
            "start = 0.0",
            f"stop = {distill['stop']}",
            "every = 1",
        ]
    return "\n".join(lines) + "\n"


def train(recipe_text, out_dir, name):
    run_dir = os.path.join(out_dir, name)
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        return run_dir
    os.makedirs(os.path.join(out_dir, "recipes"), exist_ok=True)
    path = os.path.join(out_dir, "recipes", name + ".toml")
    with open(path, "w") as f:
        f.write(recipe_text)
    print(f"# training {name}", file=sys.stderr, flush=True)
    subprocess.run([BIN, "train", path, "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    return run_dir


def parse_student(spec):
    st = {"e": None, "loss": "kl", "T": 1.0, "w": 1.0, "stop": 1.0, "strategy": "single",
          "seed": 1, "lr": 1.0}
    for kv in spec.split(","):
        k, v = kv.split("=")
        if k not in st:
            sys.exit(f"--student {spec}: unknown key `{k}` (use {', '.join(st)})")
        st[k] = v if k in ("loss", "strategy") else float(v)
    if st["e"] is None:
        sys.exit(f"--student {spec}: give its duration in epochs, e=N")
    return st


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--train-limit", type=int, default=6000)
    p.add_argument("--eval-limit", type=int, default=2000)
    p.add_argument("--validation-fraction", type=float, default=0.1,
                   help="share of the training subset held out to choose on (above 0)")
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--evals", type=int, default=16)
    p.add_argument("--lrs", default="0.025,0.05,0.1,0.2")
    p.add_argument("--teacher-epochs", type=float, default=2.0)
    p.add_argument("--baselines", default="1,2", help="baseline durations in epochs")
    p.add_argument("--baseline-seeds", default="1", help="seeds of the baselines")
    p.add_argument("--student", action="append", default=[],
                   help="e=EPOCHS[,loss=kl|mse][,T=][,w=][,stop=][,strategy=][,seed=][,lr=scale]")
    a = p.parse_args()
    if not 0.0 < a.validation_fraction < 0.5:
        sys.exit(f"--validation-fraction {a.validation_fraction}: give a share in (0, 0.5); "
                 "the teacher is chosen on it, never on the test split")
    out = os.path.abspath(a.out)

    # The teachers: a learning-rate sweep, seed 0.
    teachers = []
    for lr in a.lrs.split(","):
        name = f"teacher-lr{lr}"
        teachers.append(train(recipe_toml(name, out, 0, lr, a.teacher_epochs, a, label="sweep"),
                              out, name))
    graded = []
    for t in teachers:
        s = load(t)[0]
        if s.get("final_validation") is None:
            sys.exit(f"{t}/summary.json has no final_validation: the run was trained without a "
                     "validation split; delete it and run again to rank it on validation")
        graded.append((s["final_validation"], s["final_eval"], t))
    graded.sort(key=lambda g: g[0], reverse=True)
    best = graded[0][2]
    best_lr = os.path.basename(best)[len("teacher-lr"):]
    print("teachers, ranked on validation: " + ", ".join(
        f"{os.path.basename(t)} validation {v:.4f} (test {e:.4f})" for v, e, t in graded))

    baselines = []
    for seed in a.baseline_seeds.split(","):
        for e in a.baselines.split(","):
            name = f"baseline-e{e}-s{seed}"
            baselines.append(train(recipe_toml(name, out, int(seed), best_lr, e, a), out, name))
    students = []
    for spec in a.student:
        st = parse_student(spec)
        pool = [best] if st["strategy"] == "single" else teachers
        name = (f"{st['loss']}-e{st['e']:g}-T{st['T']:g}-w{st['w']:g}-stop{st['stop']:g}"
                f"-{st['strategy']}-lr{st['lr']:g}-s{int(st['seed'])}")
        d = {"teachers": pool, "loss": st["loss"], "T": st["T"], "w": st["w"],
             "stop": st["stop"], "strategy": st["strategy"]}
        lr = float(best_lr) * st["lr"]
        students.append(train(recipe_toml(name, out, int(st["seed"]), lr, st["e"], a, d),
                              out, name))

    # The table: every run against every baseline's final accuracy.
    runs = [(os.path.basename(r), *load(r)) for r in baselines + students]
    targets = [(n, s["final_eval"], first_reaching(pts, s["final_eval"]))
               for n, s, pts in runs if n.startswith("baseline")]
    head = "| run | final (test) | validation | " + " | ".join(
        f"{n} {v:.4f} ({smp} samples, {sec:.0f} s)" for n, v, (smp, sec) in targets) + " |"
    print(head)
    print("|---|---:|---:|" + "---:|" * len(targets))
    for n, s, pts in runs:
        cells = []
        for _, v, (bs, bsec) in targets:
            smp, sec = first_reaching(pts, v)
            cells.append("—" if smp is None else
                         f"{smp} ({bs / smp:.2f}×), {sec:.0f} s ({bsec / sec:.2f}×)")
        v = s.get("final_validation")
        v = "—" if v is None else f"{v:.4f}"
        print(f"| {n} | {s['final_eval']:.4f} | {v} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
