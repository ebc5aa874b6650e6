"""Property tests of recycle.Trainer's array checks (hypothesis): images, labels and token
batches of random dtypes, ranks, shapes, strides and values (NaN, infinities, labels and ids
far out of range), through the Python class and straight into the native one. Every call
either returns its result or raises RecycleError (a CopyWarning at most besides); nothing else
escapes and nothing crashes."""

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import recycle
from recycle import RecycleError

DTYPES = [np.float32, np.float64, np.float16, np.int8, np.uint8, np.int32, np.int64, np.uint64,
          np.bool_, np.complex64]
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
VALUES = st.sampled_from([0.0, 1.0, 3.0, 9.0, -1.0, 0.5, 1e30, -1e9, np.inf, np.nan, 2.0**40])


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, fashion_dir):
    out = tmp_path_factory.mktemp("fuzz-trainer")
    return recycle.Trainer({
        "name": "fuzz", "out_dir": str(out),
        "model": {"kind": "resnet", "width": 0.0625},
        "data": {"dataset": "fashion-mnist", "dir": str(fashion_dir), "train_limit": 64,
                 "eval_limit": 16},
        "train": {"batch_size": 4, "samples": 10**8, "evals": 1},
        "optimizer": {"kind": "sgdw", "lr": 0.01},
    }, overwrite=True)


@st.composite
def arrays(draw, max_rank=4):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=max_rank)))
    n = int(np.prod(shape)) if shape else 1
    values = draw(st.lists(VALUES, min_size=n, max_size=n))
    with np.errstate(all="ignore"):
        a = np.asarray(values, np.float64).astype(dtype).reshape(shape)
    layout = draw(st.sampled_from(["c", "f", "strided", "readonly"]))
    if layout == "f":
        a = np.asfortranarray(a)
    elif layout == "strided" and a.ndim:
        a = np.repeat(a, 2, axis=-1)[..., ::2]
    elif layout == "readonly":
        a.setflags(write=False)
    return a


def call_or_error(f, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", recycle.CopyWarning)
        try:
            return f(*args)
        except RecycleError as e:
            assert str(e), "an empty message"
            return None


@SETTINGS
@given(images=arrays(), labels=arrays(max_rank=2), which=st.integers(0, 2))
def test_image_calls_return_or_raise_recycle_error(trainer, images, labels, which):
    f = [trainer.step, trainer.evaluate, trainer.teacher_logits][which]
    out = call_or_error(f, images, labels)
    if out is not None and which == 1:
        assert 0.0 <= out["accuracy"] <= 1.0 and out["rows"] == images.shape[0]


@SETTINGS
@given(ids=arrays(max_rank=3), mask=st.one_of(st.none(), arrays(max_rank=3)),
       labels=arrays(max_rank=3), which=st.integers(0, 2))
def test_token_calls_return_or_raise_recycle_error(trainer, ids, mask, labels, which):
    f = [trainer.step_mlm, trainer.evaluate_mlm, trainer.teacher_logits_mlm][which]
    assert call_or_error(f, ids, mask, labels) is None  # a ResNet takes no text


@SETTINGS
@given(images=st.one_of(arrays(), st.integers(), st.text(max_size=3), st.none()),
       labels=st.one_of(arrays(max_rank=2), st.lists(st.integers(-3, 12), max_size=4)))
def test_the_native_class_checks_what_it_reads(trainer, images, labels):
    native = trainer._native
    for f in (native.step_images, native.evaluate_images, native.teacher_logits_images):
        call_or_error(f, images, labels)
