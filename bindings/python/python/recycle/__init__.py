"""Recycle from Python: train a recipe (or drive a :class:`Trainer` with your own batches), ask the teacher pool and the distillation schedule,
build the time-to-accuracy report, and compute the fused distillation loss on NumPy arrays.

Everything is computed by Recycle's Rust crates (the extension module ``recycle._native``);
this module only converts arguments and results.

Errors are raised as :class:`RecycleError`, a subclass of both ``RuntimeError`` and
``ValueError``, carrying the engine's message.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from . import _native
from ._native import KdSchedule, RecycleError, TeacherStrategy

__all__ = [
    "RecycleError",
    "CopyWarning",
    "Trainer",
    "TeacherStrategy",
    "KdSchedule",
    "train",
    "report",
    "kd_loss",
]

PathLike = Union[str, "os.PathLike[str]"]


def train(
    recipe: Union[PathLike, Mapping[str, Any]],
    *,
    overwrite: bool = False,
    resume: bool = False,
    reuse_finished: bool = False,
) -> Dict[str, Any]:
    """Trains one recipe and returns its summary.

    ``recipe`` is the path of a TOML recipe file (as for ``recycle train``) or a dict with the
    same fields (``src/recipe.rs`` documents them; paths may be ``str`` or ``pathlib.Path``).
    The run writes ``<out_dir>/<name>/`` (``log.jsonl``, checkpoints, ``final.safetensors``,
    ``summary.json``). An existing run there needs ``overwrite=True`` (start again) or
    ``resume=True`` (continue from its checkpoint); ``reuse_finished=True`` returns the summary
    of a finished run with exactly this recipe without training.

    The returned dict is the run's ``summary.json`` (``name``, ``method``, ``metric``,
    ``final_eval``, ``steps``, ``duration_samples``, ``train_seconds``, ``teacher_forwards``,
    ``teachers``, ``config``) plus ``run_dir``, ``log`` (the ``log.jsonl`` path),
    ``wall_seconds`` (the wall-clock time the log records at the last step) and
    ``skipped_steps``: the steps skipped because a value was NaN or infinite under
    ``train.on_nonfinite = "skip"`` (0 when none; ``summary.json`` leaves it out then). The GIL
    is released while training.
    """
    if isinstance(recipe, Mapping):
        text, is_json = json.dumps(dict(recipe), default=_jsonable), True
    elif isinstance(recipe, (str, os.PathLike)):
        text, is_json = _native.read_recipe(os.fspath(recipe)), False
    else:
        raise RecycleError(
            f"train: recipe must be a path to a TOML file or a dict, not {type(recipe).__name__}"
        )
    summary_json, run_dir = _native.train(
        text, is_json, overwrite=overwrite, resume=resume, reuse_finished=reuse_finished
    )
    summary = json.loads(summary_json)
    log = os.path.join(run_dir, "log.jsonl")
    summary["run_dir"] = run_dir
    summary["log"] = log
    summary["wall_seconds"] = _last_wall_seconds(log)
    summary.setdefault("skipped_steps", 0)
    return summary


def _jsonable(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"recipe value {value!r} ({type(value).__name__}) is not a TOML value")


def _last_wall_seconds(log: str) -> Optional[float]:
    try:
        with open(log, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.strip():
            try:
                return float(json.loads(line)["wall_seconds"])
            except (ValueError, KeyError):
                return None
    return None


def report(
    run_dirs: Union[PathLike, Iterable[PathLike]], out_dir: Optional[PathLike] = None
) -> Dict[str, Any]:
    """The time-to-accuracy report over finished runs, as ``recycle report`` builds it.

    ``run_dirs`` is a directory or a list of them: each is a run directory or a directory
    holding runs at any depth. Returns the report as a dict: ``targets``, ``rows`` (one dict
    per run: ``run``, ``method``, ``final_eval``, ``train_seconds``, ``curve``,
    ``vs_baselines``...), ``findings``, ``incomplete`` and ``notes``. With ``out_dir``, also
    writes ``report.md``, ``report.json`` and ``accuracy_vs_time.png`` there; their paths are
    under the key ``files`` (``plot_has_text`` is False when no font was found).
    """
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    paths = [os.fspath(p) for p in run_dirs]
    text, files = _native.report(paths, None if out_dir is None else os.fspath(out_dir))
    result = json.loads(text)
    if files is not None:
        markdown, js, plot, has_text = files
        result["files"] = {
            "markdown": markdown,
            "json": js,
            "plot": plot,
            "plot_has_text": has_text,
        }
    return result


# ------------------------------------------------------------------------------------------
# The fused distillation loss
# ------------------------------------------------------------------------------------------


def _is_bf16(a: np.ndarray) -> bool:
    # ml_dtypes.bfloat16 (what JAX and TensorFlow hand out), without importing ml_dtypes.
    return a.dtype.name == "bfloat16" and a.dtype.itemsize == 2


def _logits(name: str, value: Any, bf16_bits: bool) -> tuple:
    """(C-contiguous array, is bf16) for float32 / bfloat16 logits; anything else raises."""
    a = np.asarray(value)
    if _is_bf16(a):
        return np.ascontiguousarray(a).view(np.uint16), True
    if a.dtype == np.uint16:
        if not bf16_bits:
            raise RecycleError(
                f"kd_loss: {name} is uint16; pass bf16=True if these are bfloat16 bit patterns"
            )
        return np.ascontiguousarray(a), True
    if a.dtype == np.float32:
        if bf16_bits:
            raise RecycleError(
                f"kd_loss: bf16=True but {name} is float32; pass uint16 bit patterns or drop bf16"
            )
        return np.ascontiguousarray(a), False
    raise RecycleError(
        f"kd_loss: {name} has dtype {a.dtype}; pass float32 or bfloat16 "
        f"(ml_dtypes.bfloat16, or uint16 bit patterns with bf16=True): e.g. "
        f"{name}.astype(np.float32)"
    )


def kd_loss(
    student_logits: Any,
    teacher_logits: Any = None,
    labels: Any = None,
    *,
    kind: str = "kl",
    temperature: float = 4.0,
    weight: float = 1.0,
    mask: Any = None,
    ignore_index: int = -100,
    bf16: bool = False,
) -> Dict[str, Any]:
    """The fused distillation loss ``total = ce + weight * kd`` and its gradient.

    - ``student_logits``: ``[rows, classes]``, float32 or bfloat16;
    - ``teacher_logits``: one ``[rows, classes]`` array, a ``[k, rows, classes]`` array or a
      list of k ``[rows, classes]`` arrays (their mean is the target), in the student's dtype;
      ``None`` (or an empty list) gives the cross-entropy alone;
    - ``labels``: ``[rows]`` integers; ``ignore_index`` marks rows without a CE target;
    - ``kind``: ``"kl"`` (``T² · KL(softmax(t/T) ‖ softmax(s/T))`` averaged over rows) or
      ``"mse"`` (mean over rows and classes of ``(s - t)²``);
    - ``mask``: ``[rows]`` booleans, True where the row counts (in both terms).

    bfloat16 logits are ``ml_dtypes.bfloat16`` arrays, or ``uint16`` arrays holding bfloat16 bit
    patterns with ``bf16=True``; they are widened to float32 exactly. Returns a dict with
    ``ce``, ``kd`` (before the weight), ``total``, ``ce_rows``, ``kd_rows`` and ``grad``
    (d total / d student logits, float32, the student's shape).
    """
    s, is_bf16 = _logits("student_logits", student_logits, bf16)
    if s.ndim != 2:
        raise RecycleError(
            f"kd_loss: student_logits must be 2-D [rows, classes], got shape {s.shape}"
        )
    rows, classes = s.shape
    if teacher_logits is None:
        teachers: List[Any] = []
    elif isinstance(teacher_logits, (list, tuple)):
        teachers = list(teacher_logits)
    else:
        t = np.asarray(teacher_logits)
        if t.ndim == 3:
            teachers = list(t)
        elif t.ndim == 2:
            teachers = [t]
        else:
            raise RecycleError(
                "kd_loss: teacher_logits must be [rows, classes], [k, rows, classes] or a list "
                f"of [rows, classes] arrays, got shape {t.shape}"
            )
    teacher_bytes = []
    for j, t in enumerate(teachers):
        t, t_bf16 = _logits(f"teacher_logits[{j}]", t, bf16)
        if t_bf16 != is_bf16:
            raise RecycleError(
                f"kd_loss: teacher_logits[{j}] is {'bfloat16' if t_bf16 else 'float32'} but "
                f"student_logits is {'bfloat16' if is_bf16 else 'float32'}: use one dtype"
            )
        if t.shape != s.shape:
            raise RecycleError(
                f"kd_loss: teacher_logits[{j}] has shape {t.shape}, student_logits {s.shape}"
            )
        teacher_bytes.append(t.tobytes())
    if labels is None:
        raise RecycleError("kd_loss: labels are required ([rows] integers)")
    y = np.asarray(labels)
    if y.dtype.kind not in "iu":
        raise RecycleError(
            f"kd_loss: labels must be integers, got dtype {y.dtype}: e.g. labels.astype(np.int64)"
        )
    if y.shape != (rows,):
        raise RecycleError(
            f"kd_loss: labels have shape {y.shape}, expected ({rows},) (one per student row)"
        )
    y = np.ascontiguousarray(y, dtype=np.int64)
    mask_bytes = None
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype != np.bool_:
            raise RecycleError(f"kd_loss: mask must be booleans, got dtype {m.dtype}")
        if m.shape != (rows,):
            raise RecycleError(
                f"kd_loss: mask has shape {m.shape}, expected ({rows},) (one per student row)"
            )
        mask_bytes = np.ascontiguousarray(m, dtype=np.uint8).tobytes()
    ce, kd, total, ce_rows, kd_rows, grad = _native.kd_loss_raw(
        s.tobytes(),
        teacher_bytes,
        y.tobytes(),
        classes,
        is_bf16,
        kind,
        float(temperature),
        float(weight),
        int(ignore_index),
        mask_bytes,
    )
    return {
        "ce": ce,
        "kd": kd,
        "total": total,
        "ce_rows": ce_rows,
        "kd_rows": kd_rows,
        "grad": np.frombuffer(grad, dtype=np.float32).reshape(rows, classes).copy(),
    }


# ------------------------------------------------------------------------------------------
# A trainer fed the caller's batches
# ------------------------------------------------------------------------------------------


class CopyWarning(UserWarning):
    """An array handed to :class:`Trainer` had to be copied (converted to another dtype, or
    made contiguous) before the engine could read it. Pass C-contiguous float32 images and
    int32 or int64 integers to avoid the copy."""


def _recipe_text(recipe: Any, what: str) -> tuple:
    if isinstance(recipe, Mapping):
        return json.dumps(dict(recipe), default=_jsonable), True
    if isinstance(recipe, (str, os.PathLike)):
        return _native.read_recipe(os.fspath(recipe)), False
    raise RecycleError(
        f"{what}: recipe must be a path to a TOML file or a dict, not {type(recipe).__name__}"
    )


def _from_tensor(name: str, value: Any) -> Any:
    """A PyTorch (or other DLPack) CPU tensor as a NumPy array sharing its memory."""
    device = getattr(value, "device", None)
    if device is not None and getattr(device, "type", "cpu") != "cpu":
        raise RecycleError(
            f"{name} is on {device}: Trainer reads CPU memory; pass {name}.cpu()"
        )
    if hasattr(value, "detach"):
        value = value.detach()  # a tensor that requires grad does not export itself
    try:
        return np.from_dlpack(value)
    except (TypeError, RuntimeError, BufferError, AttributeError):
        return np.asarray(value)  # the buffer protocol or __array__


def _array(name: str, value: Any, want: Any, ndims: Sequence[int]) -> np.ndarray:
    """``value`` as a C-contiguous array of ``want`` (float32, or the int32/int64 pair),
    without a copy when it already is one; a copy with a :class:`CopyWarning` when its dtype
    converts safely or it is strided; a :class:`RecycleError` otherwise."""
    if isinstance(value, np.ndarray):
        a = value
    elif hasattr(value, "__dlpack__"):
        a = _from_tensor(name, value)
    else:
        try:
            a = np.asarray(value)
        except (TypeError, ValueError) as e:
            raise RecycleError(f"{name}: not an array ({e})") from None
    if a.ndim not in ndims:
        raise RecycleError(
            f"{name} has shape {a.shape}; expected {' or '.join(f'{n}-D' for n in ndims)}"
        )
    ints = isinstance(want, tuple)
    ok = a.dtype in want if ints else a.dtype == want
    if not ok:
        kind = a.dtype.kind
        if ints and kind in "iu":
            target = np.int64
        elif not ints and kind in "fiu" and a.dtype.itemsize <= 8:
            target = np.float32
        else:
            expected = "int32 or int64" if ints else "float32"
            raise RecycleError(f"{name} has dtype {a.dtype}; pass {expected}")
        if ints and kind == "u" and a.size and int(a.max()) > np.iinfo(np.int64).max:
            raise RecycleError(f"{name} holds values beyond int64")
        warnings.warn(
            f"{name}: dtype {a.dtype} copied to {np.dtype(target)}", CopyWarning, stacklevel=3
        )
        a = a.astype(target)
    if not (a.flags.c_contiguous and a.flags.aligned):
        warnings.warn(f"{name}: strided array copied to a contiguous one", CopyWarning, stacklevel=3)
        a = np.ascontiguousarray(a)
    if type(a) is not np.ndarray:
        a = a.view(np.ndarray)  # a subclass (memmap, ...): the same memory, plain type
    return a


_INDEX = (np.dtype(np.int32), np.dtype(np.int64))


def _images(images: Any, labels: Any) -> tuple:
    x = _array("images", images, np.dtype(np.float32), (3, 4))
    if x.ndim == 3:
        x = x.reshape(x.shape[0], 1, x.shape[1], x.shape[2])  # [n, h, w]: one channel, a view
    y = _array("labels", labels, _INDEX, (1,))
    if y.shape[0] != x.shape[0]:
        raise RecycleError(f"labels have shape {y.shape} for {x.shape[0]} images")
    return x, y


def _tokens(input_ids: Any, attention_mask: Any, labels: Any) -> tuple:
    ids = _array("input_ids", input_ids, _INDEX, (2,))
    if attention_mask is None:
        mask = np.ones(ids.shape, np.int32)
    else:
        mask = _array("attention_mask", attention_mask, _INDEX, (2,))
    y = _array("labels", labels, _INDEX, (2,))
    for name, a in (("attention_mask", mask), ("labels", y)):
        if a.shape != ids.shape:
            raise RecycleError(f"{name} has shape {a.shape}, input_ids {ids.shape}")
    return ids, mask, y


class Trainer:
    """One run of a recipe fed your own batches, a step at a time.

    ``recipe`` is a TOML path or a dict, as for :func:`train`: it chooses the model, optimizer,
    schedule, distillation (teachers) and the run's length and evaluations; its data set sets
    the model's input shape, classes or vocabulary and is what the scheduled evaluations use.
    The run writes ``<out_dir>/<name>/`` as :func:`train` does; an existing run there needs
    ``overwrite=True`` or ``resume=True`` (then feed the batches from the checkpoint's step on).

    Arrays are NumPy arrays, PyTorch CPU tensors (through DLPack) or anything ``np.asarray``
    takes. C-contiguous float32 images and int32/int64 integers are read in place, without a
    copy on the Python side; anything else is copied with a :class:`CopyWarning`. The GIL is
    released while a step runs. Use one trainer from one thread at a time.
    """

    def __init__(
        self, recipe: Union[PathLike, Mapping[str, Any]], *, overwrite: bool = False,
        resume: bool = False,
    ) -> None:
        text, is_json = _recipe_text(recipe, "Trainer")
        self._native = _native.Trainer(text, is_json, overwrite=overwrite, resume=resume)

    def step(self, images: Any, labels: Any) -> Dict[str, Any]:
        """One training step on ``images`` (``[n, channels, h, w]``, or ``[n, h, w]`` for one
        channel) and ``labels`` (``[n]`` class indices). Returns ``step`` (its index), ``lr``,
        ``ce``, ``kd`` (None when the step did not distill), ``loss``, ``teacher_forwards`` and
        ``skipped`` (None, or where a NaN was met under ``on_nonfinite = "skip"``)."""
        x, y = _images(images, labels)
        return self._native.step_images(x, y)

    def step_mlm(self, input_ids: Any, attention_mask: Any, labels: Any) -> Dict[str, Any]:
        """One masked-language-modelling step: ``[batch, seq_len]`` token ids, attention mask
        (1 for tokens, 0 for padding; None: all ones) and labels (the token to predict, -100
        where nothing is predicted). Returns what :meth:`step` returns."""
        return self._native.step_tokens(*_tokens(input_ids, attention_mask, labels))

    def evaluate(self, images: Any, labels: Any) -> Dict[str, Any]:
        """The student on a batch of images, in evaluation mode: ``loss`` (mean
        cross-entropy), ``accuracy``, ``correct``, ``rows``. Nothing trains."""
        loss, correct, rows = self._native.evaluate_images(*_images(images, labels))
        return {"loss": loss, "accuracy": correct / rows, "correct": correct, "rows": rows}

    def evaluate_mlm(self, input_ids: Any, attention_mask: Any, labels: Any) -> Dict[str, Any]:
        """As :meth:`evaluate` on a token batch: ``loss``, ``mlm_accuracy`` (over the
        labelled positions), ``correct``, ``rows``."""
        loss, correct, rows = self._native.evaluate_tokens(
            *_tokens(input_ids, attention_mask, labels)
        )
        return {"loss": loss, "mlm_accuracy": correct / rows, "correct": correct, "rows": rows}

    def teacher_logits(self, images: Any, labels: Any = None) -> np.ndarray:
        """The logits of the teachers the next step would run, ``[k, n, classes]`` float32:
        the targets (their mean) of the distillation term; :func:`kd_loss` takes them as they
        are. A run without teachers raises."""
        if labels is None:
            n = np.shape(images)[0] if np.ndim(images) else 0
            labels = np.zeros(n, np.int32)
        data, k, rows, classes = self._native.teacher_logits_images(*_images(images, labels))
        return np.frombuffer(data, np.float32).reshape(k, rows, classes)

    def teacher_logits_mlm(self, input_ids: Any, attention_mask: Any, labels: Any) -> np.ndarray:
        """As :meth:`teacher_logits` on a token batch, at the labelled positions:
        ``[k, rows, vocab]``."""
        data, k, rows, classes = self._native.teacher_logits_tokens(
            *_tokens(input_ids, attention_mask, labels)
        )
        return np.frombuffer(data, np.float32).reshape(k, rows, classes)

    def save(self, path: PathLike) -> None:
        """Writes a resumable checkpoint (weights, optimizer state, step) to ``path``."""
        self._native.save(os.fspath(path))

    @property
    def metrics(self) -> Dict[str, Any]:
        """``step``, ``total_steps``, ``samples``, ``train_seconds``, ``wall_seconds``,
        ``teacher_forwards``, and the last step's ``lr``, ``ce``, ``kd``, ``loss`` and the last
        evaluation ``last_eval`` (None before there is one)."""
        return json.loads(self._native.metrics())

    @property
    def run_dir(self) -> str:
        return self._native.run_dir()

    def finish(self) -> Dict[str, Any]:
        """Ends a run whose steps are all done (final evaluation, ``final.safetensors``,
        ``summary.json``) and returns the summary as :func:`train` does."""
        summary_json, run_dir = self._native.finish()
        summary = json.loads(summary_json)
        log = os.path.join(run_dir, "log.jsonl")
        summary["run_dir"] = run_dir
        summary["log"] = log
        summary["wall_seconds"] = _last_wall_seconds(log)
        return summary
