"""The Python binding: the fused loss against a NumPy reference, bad input, the teacher pool
and schedule, and a tiny training run (on a small Fashion-MNIST-shaped data set written here)
with its report."""

import json
import os
import struct

import numpy as np
import pytest

import recycle
from recycle import KdSchedule, RecycleError, TeacherStrategy

# ------------------------------------------------------------------------------------------
# NumPy reference (float64)
# ------------------------------------------------------------------------------------------


def log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def reference(s, teachers, y, kind, T, w, mask=None, ignore_index=-100):
    s = s.astype(np.float64)
    rows, classes = s.shape
    counts = np.ones(rows, bool) if mask is None else np.asarray(mask, bool)
    has_label = counts & (y != ignore_index)
    grad = np.zeros_like(s)
    ce = 0.0
    if has_label.any():
        ls = log_softmax(s[has_label])
        ce = -ls[np.arange(len(ls)), y[has_label]].mean()
        g = np.exp(ls)
        g[np.arange(len(g)), y[has_label]] -= 1.0
        grad[has_label] += g / has_label.sum()
    kd = 0.0
    if teachers and w != 0.0:
        t = np.mean([np.asarray(tj, np.float64) for tj in teachers], axis=0)
        n = counts.sum()
        if kind == "kl":
            ls, lt = log_softmax(s[counts] / T), log_softmax(t[counts] / T)
            kd = (np.exp(lt) * (lt - ls)).sum(axis=1).mean() * T * T
            grad[counts] += w * T * (np.exp(ls) - np.exp(lt)) / n
        else:
            d = s[counts] - t[counts]
            kd = (d * d).mean()
            grad[counts] += w * 2.0 * d / (n * classes)
    return ce, kd, ce + w * kd, grad


@pytest.fixture
def logits():
    rng = np.random.default_rng(7)
    rows, classes, k = 12, 10, 3
    s = (rng.standard_normal((rows, classes)) * 3).astype(np.float32)
    t = (rng.standard_normal((k, rows, classes)) * 3).astype(np.float32)
    y = rng.integers(0, classes, rows)
    y[[2, 9]] = -100
    mask = np.ones(rows, bool)
    mask[[4, 5]] = False
    return s, t, y, mask


def assert_matches(out, ref, tol=1e-5):
    ce, kd, total, grad = ref
    assert out["ce"] == pytest.approx(ce, rel=tol, abs=tol)
    assert out["kd"] == pytest.approx(kd, rel=tol, abs=tol)
    assert out["total"] == pytest.approx(total, rel=tol, abs=tol)
    assert out["grad"].dtype == np.float32
    assert out["grad"].shape == grad.shape
    np.testing.assert_allclose(out["grad"], grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------
# The fused loss
# ------------------------------------------------------------------------------------------


def test_kl_one_teacher(logits):
    s, t, y, _ = logits
    out = recycle.kd_loss(s, t[0], y, kind="kl", temperature=4.0, weight=0.7)
    assert_matches(out, reference(s, [t[0]], y, "kl", 4.0, 0.7))
    assert out["ce_rows"] == 10 and out["kd_rows"] == 12


def test_kl_teachers_as_3d_array_or_list_with_mask(logits):
    s, t, y, mask = logits
    ref = reference(s, list(t), y, "kl", 2.0, 0.5, mask=mask)
    a = recycle.kd_loss(s, t, y, kind="kl", temperature=2.0, weight=0.5, mask=mask)
    b = recycle.kd_loss(s, list(t), y, kind="kl", temperature=2.0, weight=0.5, mask=mask)
    assert_matches(a, ref)
    assert_matches(b, ref)
    assert a["ce_rows"] == 8 and a["kd_rows"] == 10


def test_mse(logits):
    s, t, y, mask = logits
    out = recycle.kd_loss(s, t[:2], y, kind="mse", weight=0.3, mask=mask)
    assert_matches(out, reference(s, list(t[:2]), y, "mse", 1.0, 0.3, mask=mask))


def test_ce_only_and_custom_ignore_index(logits):
    s, _, y, _ = logits
    y = np.where(y == -100, -1, y).astype(np.int32)
    out = recycle.kd_loss(s, None, y, ignore_index=-1)
    assert_matches(out, reference(s, [], y, "kl", 1.0, 0.0, ignore_index=-1))
    assert out["kd"] == 0.0 and out["kd_rows"] == 0


def test_gradient_is_the_derivative_of_total(logits):
    s, t, y, _ = logits
    out = recycle.kd_loss(s, t, y, kind="kl", temperature=3.0, weight=0.9)
    eps, (r, c) = 1e-2, (3, 4)
    plus, minus = s.copy(), s.copy()
    plus[r, c] += eps
    minus[r, c] -= eps
    num = (
        recycle.kd_loss(plus, t, y, kind="kl", temperature=3.0, weight=0.9)["total"]
        - recycle.kd_loss(minus, t, y, kind="kl", temperature=3.0, weight=0.9)["total"]
    ) / (2 * eps)
    assert out["grad"][r, c] == pytest.approx(num, rel=2e-2, abs=1e-4)


def test_bfloat16_from_ml_dtypes_and_uint16_bits(logits):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    s, t, y, _ = logits
    s16, t16 = s.astype(ml_dtypes.bfloat16), t.astype(ml_dtypes.bfloat16)
    ref = reference(s16.astype(np.float32), list(t16.astype(np.float32)), y, "kl", 4.0, 1.0)
    assert_matches(recycle.kd_loss(s16, t16, y), ref)
    bits = recycle.kd_loss(s16.view(np.uint16), t16.view(np.uint16), y, bf16=True)
    assert_matches(bits, ref)


def test_uint16_bits_widen_exactly():
    # 0x3F80 is bfloat16 1.0, 0x4000 is 2.0: one row, labels 0.
    s = np.array([[0x3F80, 0x4000]], np.uint16)
    out = recycle.kd_loss(s, None, np.array([0]), bf16=True)
    assert out["ce"] == pytest.approx(np.log(np.exp(1.0) + np.exp(2.0)) - 1.0, rel=1e-6)


def test_bad_input_raises_with_clear_messages(logits):
    s, t, y, mask = logits
    assert issubclass(RecycleError, RuntimeError) and issubclass(RecycleError, ValueError)
    cases = [
        (lambda: recycle.kd_loss(s, t[0][:5], y), "shape (5, 10)"),
        (lambda: recycle.kd_loss(s, t[0].T, y), "student_logits (12, 10)"),
        (lambda: recycle.kd_loss(s.astype(np.float64), t, y), "dtype float64"),
        (lambda: recycle.kd_loss(s, t.astype(np.float16), y), "dtype float16"),
        (lambda: recycle.kd_loss(s, t, y.astype(np.float32)), "labels must be integers"),
        (lambda: recycle.kd_loss(s, t, y[:-1]), "labels have shape (11,)"),
        (lambda: recycle.kd_loss(s[0], t, y), "must be 2-D"),
        (lambda: recycle.kd_loss(s, t, y, mask=mask[:3]), "mask has shape (3,)"),
        (lambda: recycle.kd_loss(s, t, y, mask=mask.astype(np.int8)), "mask must be booleans"),
        (lambda: recycle.kd_loss(s, t, np.full(12, 10)), "label 10 in row 0 is outside [0, 10)"),
        (lambda: recycle.kd_loss(s, t, y, kind="l2"), 'kind="l2" is unknown'),
        (lambda: recycle.kd_loss(s, t, y, temperature=0.0), "temperature 0"),
        (lambda: recycle.kd_loss(s, t, y, weight=-1.0), "weight"),
        (lambda: recycle.kd_loss(s.view(np.uint16), None, y), "pass bf16=True"),
    ]
    for call, message in cases:
        with pytest.raises(RecycleError) as err:
            call()
        assert message in str(err.value), (message, str(err.value))


# ------------------------------------------------------------------------------------------
# Teacher pool and schedule
# ------------------------------------------------------------------------------------------


def test_teacher_strategies_select_like_the_pool():
    assert TeacherStrategy("single").select(0, accuracies=[0.5, 0.9, 0.7]) == [1]
    assert TeacherStrategy("ensemble:2").select(5, accuracies=[0.5, 0.9, 0.7]) == [1, 2]
    assert TeacherStrategy("ensemble:2").forwards_per_step == 2
    one = TeacherStrategy("random-one")
    picks = [one.select(step, num_teachers=4, seed=3) for step in range(200)]
    assert all(len(p) == 1 and 0 <= p[0] < 4 for p in picks)
    assert {p[0] for p in picks} == {0, 1, 2, 3}
    assert picks == [one.select(step, num_teachers=4, seed=3) for step in range(200)]
    assert picks != [one.select(step, num_teachers=4, seed=4) for step in range(200)]
    subset = TeacherStrategy("random-subset:3").select(11, num_teachers=5, seed=1)
    assert len(set(subset)) == 3 and all(0 <= i < 5 for i in subset)
    assert str(one) == "random-one" and "random-one" in repr(one)


def test_teacher_strategy_errors():
    with pytest.raises(RecycleError, match="use single, ensemble:K"):
        TeacherStrategy("best")
    with pytest.raises(RecycleError, match="needs 1 <= k <= 2"):
        TeacherStrategy("ensemble:3").select(0, num_teachers=2)
    with pytest.raises(RecycleError, match="pass num_teachers"):
        TeacherStrategy("single").select(0)


def test_kd_schedule():
    s = KdSchedule(start=0.0, stop=0.3, every=2)
    assert s.window(100) == (0, 30)
    active = [step for step in range(100) if s.is_active(step, 100)]
    assert active == list(range(0, 30, 2))
    assert KdSchedule().is_active(99, 100)
    assert (s.start, s.stop, s.every) == pytest.approx((0.0, 0.3, 2))
    with pytest.raises(RecycleError, match="start 0.5 and stop 0.2"):
        KdSchedule(start=0.5, stop=0.2)
    with pytest.raises(RecycleError, match="every must be at least 1"):
        KdSchedule(every=0)


# ------------------------------------------------------------------------------------------
# Training and the report
# ------------------------------------------------------------------------------------------


def tiny_recipe(out_dir, name, data_dir):
    return {
        "name": name,
        "out_dir": out_dir,
        "model": {"kind": "resnet", "width": 0.0625},
        "data": {
            "dataset": "fashion-mnist",
            "dir": str(data_dir),
            "train_limit": 288,
            "eval_limit": 128,
        },
        "train": {"batch_size": 32, "epochs": 1.0, "evals": 2},
        "optimizer": {"kind": "sgdw", "lr": 0.1, "weight_decay": 5e-4, "warmup": 0.1},
    }


def test_train_from_dict_and_toml_then_report(tmp_path, fashion_dir, monkeypatch):
    teacher = recycle.train(tiny_recipe(tmp_path, "teacher", fashion_dir))
    assert teacher["steps"] == 8 and teacher["duration_samples"] == 256
    assert 0.0 <= teacher["final_eval"] <= 1.0
    assert teacher["metric"] == "accuracy" and teacher["teacher_forwards"] == 0
    assert teacher["train_seconds"] > 0 and teacher["wall_seconds"] >= teacher["train_seconds"]
    assert teacher["skipped_steps"] == 0
    records = [json.loads(line) for line in open(teacher["log"])]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["eval"] == pytest.approx(teacher["final_eval"])

    with pytest.raises(RecycleError, match="already holds a run"):
        recycle.train(tiny_recipe(tmp_path, "teacher", fashion_dir))
    again = recycle.train(tiny_recipe(tmp_path, "teacher", fashion_dir), reuse_finished=True)
    assert again["final_eval"] == teacher["final_eval"]

    # The student's recipe names no folder: the data set is found through the variable.
    monkeypatch.setenv("RECYCLE_FASHION_MNIST_DIR", str(fashion_dir))
    toml = tmp_path / "student.toml"
    toml.write_text(
        f"""
name = "student"
out_dir = "{tmp_path}"
[model]
kind = "resnet"
width = 0.0625
[data]
dataset = "fashion-mnist"
train_limit = 288
eval_limit = 128
[train]
batch_size = 32
epochs = 1.0
evals = 2
[optimizer]
kind = "sgdw"
lr = 0.1
warmup = 0.1
[distill]
teachers = ["{teacher['run_dir']}"]
loss = "kl"
stop = 0.5
"""
    )
    student = recycle.train(toml)
    assert student["teacher_forwards"] == 4, "distilled the first half of 8 steps"
    assert student["teachers"] == [teacher["run_dir"]]

    out = tmp_path / "report"
    rep = recycle.report(tmp_path, out_dir=out)
    rows = {r["run"]: r for r in rep["rows"]}
    assert set(rows) == {"teacher", "student"}
    assert rows["student"]["final_eval"] == pytest.approx(student["final_eval"])
    assert rows["teacher"]["train_seconds"] == pytest.approx(teacher["train_seconds"])
    assert rep["targets"] and rep["findings"]
    for key in ("markdown", "json", "plot"):
        assert os.path.getsize(rep["files"][key]) > 0
    assert rep["files"]["plot_has_text"] is True, "the embedded font when no other is found"
    assert recycle.report([teacher["run_dir"]])["rows"][0]["run"] == "teacher"


def test_train_errors(tmp_path, fashion_dir):
    bad = tiny_recipe(tmp_path, "bad", fashion_dir)
    bad["optimizer"]["lr"] = -1.0
    with pytest.raises(RecycleError, match="optimizer.lr"):
        recycle.train(bad)
    with pytest.raises(RecycleError, match="not a valid recipe"):
        recycle.train({"name": "x"})
    empty = tmp_path / "no-data"
    empty.mkdir()
    with pytest.raises(RecycleError, match="RECYCLE_FASHION_MNIST_DIR"):
        recycle.train(tiny_recipe(tmp_path, "no-data-run", empty))
    misspelt = tiny_recipe(tmp_path, "gpu", fashion_dir)
    misspelt["device"] = "gpu0"
    with pytest.raises(RecycleError, match=r"device `gpu0` is not one of"):
        recycle.train(misspelt)
    assert not (tmp_path / "gpu").exists()
    with pytest.raises(RecycleError, match="nope.toml"):
        recycle.train(tmp_path / "nope.toml")
    with pytest.raises(RecycleError, match="not a directory"):
        recycle.report([tmp_path / "missing"])


# ------------------------------------------------------------------------------------------
# Training on cuda:0
# ------------------------------------------------------------------------------------------


def read_safetensors(path):
    """The tensors of a safetensors file, by name: f32 ones as arrays, others as their bytes
    (the format: an 8-byte little-endian header length, a JSON header of dtypes, shapes and
    byte offsets, then the data)."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if info["dtype"] == "F32":
            out[name] = np.frombuffer(data[start:end], np.float32).reshape(info["shape"])
        else:
            out[name] = data[start:end]
    return out


def test_train_on_cuda_matches_the_cpu(tmp_path, fashion_dir):
    """A recipe with device = "cuda:0" trains there (a GPU, or the mock CUDA under which CI runs
    this test with RECYCLE_EXPECT_CUDA=1, docs/mockcuda.md) and agrees with the same recipe on
    the CPU within gpu-check's f32 model-step tolerances: each step's loss to 1e-4 (relative),
    the final weights to 1e-2 as a relative L2 error per tensor (not element by element, and
    ten times the one-step tolerance: over four steps the libraries' summation orders compound,
    most in the BatchNorm biases, whose gradients are sums that nearly cancel). Where cuda:0
    does not open (a build without the cuda feature, no driver), the run must fail before
    writing anything, with what is missing."""

    def small(name, device):
        r = tiny_recipe(tmp_path, name, fashion_dir)
        r["device"] = device
        r["data"].update(train_limit=64, eval_limit=32, validation_fraction=0.0)
        r["train"].update(batch_size=16, evals=1)
        return r

    try:
        gpu = recycle.train(small("gpu", "cuda:0"))
    except RecycleError as e:
        assert os.environ.get("RECYCLE_EXPECT_CUDA") is None, (
            f"RECYCLE_EXPECT_CUDA is set, but cuda:0 does not open: {e}"
        )
        assert any(
            m in str(e) for m in ("no CUDA backend", "no NVIDIA driver found", "sees no GPU")
        ), str(e)
        assert not (tmp_path / "gpu").exists()
        return
    cpu = recycle.train(small("cpu", "cpu"))
    assert gpu["device"].startswith("cuda:0 ") and cpu["device"] == "cpu"
    assert gpu["steps"] == cpu["steps"] == 4
    logs = [[json.loads(line) for line in open(s["log"])] for s in (gpu, cpu)]
    for g, c in zip(*logs):
        assert g["step"] == c["step"]
        assert g["loss"] == pytest.approx(c["loss"], rel=1e-4), f"step {g['step']}"
    wg = read_safetensors(os.path.join(gpu["run_dir"], "final.safetensors"))
    wc = read_safetensors(os.path.join(cpu["run_dir"], "final.safetensors"))
    assert wg.keys() == wc.keys()
    for name, c in wc.items():
        g = wg[name]
        if isinstance(c, bytes):  # counters: equal
            assert g == c, name
            continue
        diff = float(np.linalg.norm(g.astype(np.float64) - c))
        norm = float(np.linalg.norm(c.astype(np.float64)))
        err = diff / norm if norm > 0 else diff
        assert err <= 1e-2, f"{name}: relative L2 error {err:.2e}"


def test_steps_skipped_on_nonfinite_values_are_counted(tmp_path, fashion_dir):
    # A learning rate that makes the weights overflow: under on_nonfinite = "skip" the steps that
    # meet a NaN or infinity change nothing and are counted; under "stop" the run fails.
    recipe = tiny_recipe(tmp_path, "diverging", fashion_dir)
    recipe["data"].update(train_limit=96, eval_limit=32)
    recipe["train"] = {"batch_size": 16, "samples": 96, "evals": 1, "on_nonfinite": "skip"}
    recipe["optimizer"] = {"kind": "sgdw", "lr": 1e30, "schedule": "constant"}
    summary = recycle.train(recipe)
    assert summary["steps"] == 6
    assert 0 < summary["skipped_steps"] < 6, summary
    records = [json.loads(line) for line in open(summary["log"])]
    assert sum(1 for r in records if r.get("skipped")) == summary["skipped_steps"]

    recipe["name"] = "diverging-stop"
    recipe["train"]["on_nonfinite"] = "stop"
    with pytest.raises(RecycleError, match="step"):
        recycle.train(recipe)
