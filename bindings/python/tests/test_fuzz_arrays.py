"""Property tests of the binding's array checks (hypothesis): kd_loss on arrays of random
dtypes, ranks and sizes, mismatched teachers, labels and masks, NaN and infinity, and the
native entry point on raw buffers of any length with any class count. Every call either
returns a result of the right shape or raises RecycleError; nothing else escapes and nothing
crashes."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import recycle
from recycle import RecycleError

try:
    import ml_dtypes

    BF16 = [ml_dtypes.bfloat16]
except ImportError:  # the tests below do not need it; it only widens the dtypes tried
    BF16 = []

DTYPES = [np.float32, np.float64, np.float16, np.uint16, np.int32, np.int64, np.bool_] + BF16
SETTINGS = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
FLOATS = st.sampled_from([0.0, 1.0, -2.5, 30.0, 1e30, -1e30, np.inf, -np.inf, np.nan])


@st.composite
def arrays(draw, shape=None):
    dtype = draw(st.sampled_from(DTYPES))
    if shape is None:
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    n = int(np.prod(shape)) if shape else 1
    values = draw(st.lists(FLOATS, min_size=n, max_size=n))
    with np.errstate(all="ignore"):
        return np.asarray(values, dtype=np.float64).astype(dtype).reshape(shape)


@st.composite
def calls(draw):
    rows, classes = draw(st.integers(0, 4)), draw(st.integers(0, 5))
    student = draw(st.one_of(arrays((rows, classes)), arrays()))
    teachers = draw(
        st.one_of(
            st.none(),
            arrays((rows, classes)),
            arrays(),
            st.lists(st.one_of(arrays((rows, classes)), arrays()), max_size=3),
        )
    )
    labels = draw(
        st.one_of(
            st.none(),
            st.lists(st.integers(-(2**40), 2**40), min_size=rows, max_size=rows).map(
                lambda v: np.asarray(v, np.int64)
            ),
            st.lists(st.integers(-200, 10), max_size=6).map(lambda v: np.asarray(v, np.int32)),
            arrays(),
        )
    )
    mask = draw(st.one_of(st.none(), arrays((rows,)), arrays()))
    kwargs = dict(
        kind=draw(st.sampled_from(["kl", "mse", "KL", ""])),
        temperature=draw(FLOATS),
        weight=draw(FLOATS),
        mask=mask,
        ignore_index=draw(st.sampled_from([-100, 0, 2**31, -(2**40)])),
        bf16=draw(st.booleans()),
    )
    return student, teachers, labels, kwargs


@SETTINGS
@given(calls())
def test_kd_loss_returns_or_raises_recycle_error(call):
    student, teachers, labels, kwargs = call
    try:
        out = recycle.kd_loss(student, teachers, labels, **kwargs)
    except RecycleError:
        return
    assert out["grad"].shape == np.shape(student)
    assert out["grad"].dtype == np.float32


@SETTINGS
@given(
    student=st.binary(max_size=64),
    teachers=st.lists(st.binary(max_size=64), max_size=3),
    labels=st.binary(max_size=40),
    classes=st.one_of(st.integers(0, 8), st.integers(0, 2**64 - 1)),
    bf16=st.booleans(),
    mask=st.one_of(st.none(), st.binary(max_size=8)),
)
def test_the_native_entry_point_checks_raw_buffers(student, teachers, labels, classes, bf16, mask):
    try:
        out = recycle._native.kd_loss_raw(
            student, teachers, labels, classes, bf16, "kl", 2.0, 1.0, -100, mask
        )
    except RecycleError:
        return
    assert len(out[5]) == 4 * (len(student) // (2 if bf16 else 4))
