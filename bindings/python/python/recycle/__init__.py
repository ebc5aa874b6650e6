"""Recycle from Python: train a recipe, ask the teacher pool and the distillation schedule,
build the time-to-accuracy report, and compute the fused distillation loss on NumPy arrays.

Everything is computed by Recycle's Rust crates (the extension module ``recycle._native``);
this module only converts arguments and results.

Errors are raised as :class:`RecycleError`, a subclass of both ``RuntimeError`` and
``ValueError``, carrying the engine's message.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from . import _native
from ._native import KdSchedule, RecycleError, TeacherStrategy

__all__ = [
    "RecycleError",
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
