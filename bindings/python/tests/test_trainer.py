"""recycle.Trainer fed batches made here: the example script equals the Rust Trainer on the
same batches bit for bit; arrays read in place or copied with a warning; PyTorch tensors
through DLPack and a DataLoader; masked language modelling; the GIL released during a step;
bad input raised as RecycleError."""

import importlib.util
import json
import os
import struct
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import recycle
from recycle import CopyWarning, RecycleError, _native

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distill_own_batches.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("distill_own_batches", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tensors(path):
    """name -> bytes of every tensor of a safetensors file."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    return {
        k: body[v["data_offsets"][0] : v["data_offsets"][1]]
        for k, v in header.items()
        if k != "__metadata__"
    }


def bits(v):
    return struct.pack("<f", v)


def test_the_example_script_equals_the_rust_trainer(tmp_path, fashion_dir, example):
    assert len(EXAMPLE.read_text().splitlines()) < 60
    out = str(tmp_path)
    steps, summary = example.main(out, str(fashion_dir))
    assert len(steps) == 6 and summary["steps"] == 6 and summary["teacher_forwards"] == 6
    assert 0.0 <= summary["final_eval"] <= 1.0

    # The Rust Trainer on the same batches, given as raw bytes (no Python in between).
    recipe = example.recipe("student-rust", out, str(fashion_dir), teacher=f"{out}/teacher")
    batches = [[x.tobytes(), y.tobytes()] for x, y in (example.batch(s) for s in range(6))]
    ckpt = os.path.join(out, "rust.safetensors")
    rust = _native.replay_steps(json.dumps(recipe), True, "images", batches, [16, 1, 28, 28], ckpt)
    for got, (loss, ce, kd, lr, _) in zip(steps, rust):
        assert bits(got["loss"]) == bits(loss) and bits(got["ce"]) == bits(ce)
        assert bits(got["kd"]) == bits(kd) and bits(got["lr"]) == bits(lr)
    python, reference = tensors(os.path.join(out, "python.safetensors")), tensors(ckpt)
    assert len(reference) > 10 and python == reference


def image_recipe(out, name, fashion_dir):
    return {
        "name": name,
        "out_dir": str(out),
        "model": {"kind": "resnet", "width": 0.0625},
        "data": {"dataset": "fashion-mnist", "dir": str(fashion_dir), "train_limit": 192,
                 "eval_limit": 32},
        "train": {"batch_size": 8, "samples": 64, "evals": 1},
        "optimizer": {"kind": "sgdw", "lr": 0.1},
    }


def made(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, n).astype(np.int32)


def test_arrays_are_read_in_place_or_copied_with_a_warning(tmp_path, fashion_dir):
    x, y = made()
    # The right dtype, C-contiguous: the very array goes to the engine.
    assert recycle._array("images", x, np.dtype(np.float32), (4,)) is x
    assert recycle._array("labels", y, recycle._INDEX, (1,)) is y
    y64 = y.astype(np.int64)
    assert recycle._array("labels", y64, recycle._INDEX, (1,)) is y64
    a = recycle.Trainer(image_recipe(tmp_path, "a", fashion_dir), overwrite=True)
    b = recycle.Trainer(image_recipe(tmp_path, "b", fashion_dir), overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = [a.step(x, y), a.step(x[:, 0], y64)]  # [n, h, w]: one channel, a view
    # float64 images, strided images, uint8 labels: copied, with a warning each; same steps.
    wide = np.zeros((8, 1, 28, 56), np.float32)
    wide[..., ::2] = x
    with pytest.warns(CopyWarning, match="float64 copied to float32"):
        got = [b.step(x.astype(np.float64), y)]
    with pytest.warns(CopyWarning, match="strided"):
        got.append(b.step(wide[..., ::2], y.astype(np.uint8)))
    for w, g in zip(want, got):
        assert bits(w["loss"]) == bits(g["loss"]) and w["step"] == g["step"]
    assert a.metrics["step"] == 2 and a.metrics["samples"] == 16
    ev = a.evaluate(x, y)
    assert ev["rows"] == 8 and ev["accuracy"] == ev["correct"] / 8 and ev["loss"] > 0


def test_bad_input_raises_recycle_error(tmp_path, fashion_dir):
    t = recycle.Trainer(image_recipe(tmp_path, "bad", fashion_dir), overwrite=True)
    x, y = made()
    cases = [
        ((x.astype(np.complex64), y), "dtype complex64"),
        ((x, y.astype(np.float32)), "pass int32 or int64"),
        ((x.astype(bool), y), "dtype bool"),
        ((x[0, 0, 0], y), "expected 3-D or 4-D"),
        ((x, y[:5]), "labels have shape (5,) for 8 images"),
        ((np.repeat(x, 2, axis=1), y), "takes [n, 1, height, width]"),
        ((x, y + 10), "outside [0, 10)"),
        ((x, np.full(8, 2**40)), "outside the int32 range"),
        (("pixels", y), "expected 3-D or 4-D"),
    ]
    for args, msg in cases:
        with pytest.raises(RecycleError, match=None) as e:
            t.step(*args)
        assert msg in str(e.value), (msg, str(e.value))
    assert t.metrics["step"] == 0
    with pytest.raises(RecycleError, match="has no teachers"):
        t.teacher_logits(x)
    with pytest.raises(RecycleError, match="a text batch for a ResNet"):
        t.step_mlm(np.ones((2, 4), np.int32), None, np.ones((2, 4), np.int32))
    with pytest.raises(RecycleError, match="0 of its 8 steps"):
        t.finish()
    with pytest.raises(RecycleError, match="recipe must be a path"):
        recycle.Trainer(42)
    # The native class refuses anything but a plain ndarray of the right type.
    with pytest.raises(RecycleError, match="numpy.ndarray expected"):
        t._native.step_images(x.tolist(), y)
    with pytest.raises(RecycleError, match="not one this call takes"):
        t._native.step_images(x.astype(np.float64), y)
    with pytest.raises(RecycleError, match="not C-contiguous"):
        t._native.step_images(x[..., ::2], y)
    for _ in range(8):
        t.step(x, y)
    summary = t.finish()
    assert summary["steps"] == 8 and os.path.exists(summary["log"])
    with pytest.raises(RecycleError, match="finished"):
        t.step(x, y)


def test_the_gil_is_released_during_a_step(tmp_path, fashion_dir):
    t = recycle.Trainer(image_recipe(tmp_path, "gil", fashion_dir), overwrite=True)
    x, y = made(64)
    spans, ticks = [], []

    def work():
        for _ in range(3):
            start = time.perf_counter()
            t.step(x, y)
            spans.append((start, time.perf_counter()))

    worker = threading.Thread(target=work)
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
        time.sleep(0.0005)
    worker.join()
    assert len(spans) == 3
    # The main thread ran while a step was in the engine (with the GIL held it could not).
    inside = [c for c in ticks for s, e in spans if s + 0.002 < c < e - 0.002]
    assert inside, f"no main-thread tick inside {spans}"


def test_masked_language_modelling(tmp_path, fortunes_dir):
    recipe = {
        "name": "mlm",
        "out_dir": str(tmp_path),
        "model": {"kind": "bert", "size": "tiny"},
        "data": {"dataset": "fortunes", "dir": str(fortunes_dir), "seq_len": 16,
                 "vocab_size": 120, "train_limit": 32, "eval_limit": 8},
        "train": {"batch_size": 4, "samples": 24, "evals": 1},
        "optimizer": {"kind": "adamw", "lr": 3e-3, "weight_decay": 0.0},
    }
    t = recycle.Trainer(recipe, overwrite=True)
    ids = (5 + (np.arange(64) * 7) % 50).reshape(4, 16)
    labels = np.where(np.arange(64).reshape(4, 16) % 5 == 2, ids, -100)
    mask = np.ones((4, 16), np.int64)
    before = t.evaluate_mlm(ids, mask, labels)
    assert before["rows"] == 13 and before["mlm_accuracy"] == before["correct"] / 13
    losses = [t.step_mlm(ids, mask, labels)["loss"] for _ in range(6)]
    assert losses[-1] < losses[0], losses
    assert t.evaluate_mlm(ids, None, labels)["loss"] < before["loss"]
    with pytest.raises(RecycleError, match="attention_mask has shape"):
        t.evaluate_mlm(ids, mask[:, :8], labels)
    bad = ids.copy()
    bad[1, 3] = 10**6
    with pytest.raises(RecycleError, match="input_ids"):
        t.evaluate_mlm(bad, mask, labels)
    with pytest.raises(RecycleError, match="has no teachers"):
        t.teacher_logits_mlm(ids, mask, labels)


def test_teacher_logits_are_the_distillation_targets(tmp_path, fashion_dir):
    teacher = recycle.Trainer(image_recipe(tmp_path, "teacher", fashion_dir), overwrite=True)
    for s in range(8):
        teacher.step(*made(seed=s))
    teacher.finish()
    r = image_recipe(tmp_path, "student", fashion_dir)
    r["distill"] = {"teachers": [str(tmp_path / "teacher")], "temperature": 2.0, "weight": 0.5}
    student = recycle.Trainer(r, overwrite=True)
    x, y = made(seed=50)
    t = student.teacher_logits(x)
    assert t.shape == (1, 8, 10) and t.dtype == np.float32 and np.isfinite(t).all()
    step = student.step(x, y)
    assert step["teacher_forwards"] == 1 and step["kd"] > 0
    assert step["loss"] == pytest.approx(step["ce"] + 0.5 * step["kd"], rel=1e-6)


class Device:
    def __init__(self, kind):
        self.type = kind

    def __str__(self):
        return self.type


class Tensor:
    """What the trainer sees of a PyTorch tensor, without PyTorch: DLPack export, a ``device``
    with a ``type``, ``detach()`` (a tensor that requires grad refuses DLPack export until
    detached), ``requires_grad_()``."""

    def __init__(self, array, device="cpu"):
        self.array, self.device, self.requires_grad = array, Device(device), False

    def requires_grad_(self):
        self.requires_grad = True
        return self

    def detach(self):
        return Tensor(self.array, self.device.type)

    def __dlpack__(self, **kwargs):
        if self.requires_grad:
            raise RuntimeError("Can't export tensors that require gradient, use tensor.detach()")
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


def test_dlpack_tensors_feed_the_trainer_in_place(tmp_path, fashion_dir, example):
    # The path a PyTorch DataLoader's CPU tensors take: DLPack, read in place (no copy warning),
    # the same losses bit for bit as NumPy arrays; a tensor on another device is refused.
    xs, ys = zip(*(example.batch(s, 8) for s in range(8)))
    a = recycle.Trainer(image_recipe(tmp_path, "tensors", fashion_dir), overwrite=True)
    b = recycle.Trainer(image_recipe(tmp_path, "numpy", fashion_dir), overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 and int64 tensors: read in place
        got = [
            a.step(Tensor(xi).requires_grad_(), Tensor(yi.astype(np.int64)))
            for xi, yi in zip(xs, ys)
        ]
    want = [b.step(xi, yi) for xi, yi in zip(xs, ys)]
    assert [bits(g["loss"]) for g in got] == [bits(w["loss"]) for w in want]
    assert a.evaluate(Tensor(xs[0]), Tensor(ys[0]))["rows"] == 8
    with pytest.raises(RecycleError, match="on meta"):
        a.step(Tensor(xs[0], device="meta"), Tensor(ys[0]))


torch = None
try:
    import torch
except ImportError:
    pass


# The same through PyTorch itself, where it is installed (CI does not install it; the test above
# covers the binding's side of the exchange without it).
@pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
def test_a_torch_dataloader_feeds_the_trainer(tmp_path, fashion_dir, example):
    from torch.utils.data import DataLoader, TensorDataset

    xs, ys = zip(*(example.batch(s, 8) for s in range(8)))
    x, y = np.concatenate(xs), np.concatenate(ys)
    loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y).long()), batch_size=8)
    a = recycle.Trainer(image_recipe(tmp_path, "torch", fashion_dir), overwrite=True)
    b = recycle.Trainer(image_recipe(tmp_path, "numpy", fashion_dir), overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 and int64 tensors: read in place
        got = [a.step(images.requires_grad_(), labels) for images, labels in loader]
    want = [b.step(xi, yi) for xi, yi in zip(xs, ys)]
    assert [bits(g["loss"]) for g in got] == [bits(w["loss"]) for w in want]
    assert a.evaluate(torch.from_numpy(x[:8]), torch.from_numpy(y[:8]))["rows"] == 8
    with pytest.raises(RecycleError, match="on meta"):
        a.step(torch.zeros((8, 1, 28, 28), device="meta"), torch.zeros(8, dtype=torch.long))

