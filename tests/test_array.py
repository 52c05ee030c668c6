"""fastsoftmax.array: SciPy's semantics on NumPy arrays, the backwards, the fused cross-entropy, DLPack and CUDA dispatch.

References are scipy.special on the input cast to float64 (independent of
our kernels), float64 formulas, finite differences, and torch's own
cross-entropy for the gradient. Shapes are commented with the layout path
they take (``fastsoftmax.array._layout``).
"""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.special as sp
from fastsoftmax.kernels import config

import fastsoftmax.array as fa
from fastsoftmax import errors
from fastsoftmax.array import _layout
from fastsoftmax.array._checks import AxisError

# (rtol, atol) of a result against the float64 reference computed from the same rounded input
TOLERANCES = {
    np.float64: (1e-12, 1e-13),
    np.float32: (1.3e-6, 1e-5),
    # computed in float32: the error is the final rounding to float16
    np.float16: (1e-3, 1e-5),
}
DTYPES = list(TOLERANCES)
RNG = np.random.default_rng(17)


def close(actual, expected, dtype):
    rtol, atol = TOLERANCES[dtype]
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=rtol, atol=atol)


def logits(*shape, dtype=np.float32, scale=3.0):
    return (RNG.standard_normal(shape) * scale).astype(dtype)


def scipy64(fn, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(np.asarray(x, np.float64), **kw)


# --- values, shapes and axes against SciPy -----------------------------------------

CASES = [
    ((7, 1000), -1),  # rows: axis last, no copy
    ((7, 1000), None),  # every axis: one row of 7000
    ((3, 40, 20), 1),  # middle: (O, C, I) reduced in place (20 >= CPU_MIDDLE_MIN_INNER)
    ((3, 40, 5), 1),  # rows after moving the axis last (a copy: only 5 inner positions)
    ((6, 9, 17), (0, 2)),  # a tuple of axes that are not consecutive: moved last, one copy
    ((4, 5, 6, 18), (1, 2)),  # consecutive axes in the middle: (O, C1*C2, I) in place
    ((5, 6, 7), (-1, -2)),  # trailing axes, negative
    ((300,), 0),  # one row
    ((), None),  # a 0-d array
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", CASES, ids=[f"{s}-{a}" for s, a in CASES])
@pytest.mark.parametrize("op", ["softmax", "log_softmax", "logsumexp"])
def test_matches_scipy(op, shape, axis, dtype):
    x = logits(*shape, dtype=dtype)
    ours = getattr(fa, op)(x, axis=axis)
    ref = scipy64(getattr(sp, op), x, axis=axis)
    assert np.shape(ours) == np.shape(ref)
    assert np.asarray(ours).dtype == dtype
    close(ours, ref, dtype)


@pytest.mark.parametrize("axis", [0, 1, 2, (0, 1), (1, 2), None])
def test_logsumexp_keepdims_shapes(axis):
    x = logits(4, 20, 24, dtype=np.float64)
    for keepdims in (False, True):
        ours = fa.logsumexp(x, axis=axis, keepdims=keepdims)
        ref = sp.logsumexp(x, axis=axis, keepdims=keepdims)
        assert np.shape(ours) == np.shape(ref)
        close(ours, ref, np.float64)


def test_layout_paths_are_the_ones_the_cases_name():
    # the comments of CASES say which path each shape takes: check the rule itself
    assert _layout.Layout(np.empty((3, 40, 20)), (1,), True).kind == "middle"
    assert _layout.Layout(np.empty((3, 40, 5)), (1,), True).kind == "rows"
    assert _layout.Layout(np.empty((4, 5, 6, 18)), (1, 2), True).shape == (4, 30, 18)
    assert _layout.Layout(np.empty((3, 40, 20)), (1,), False).kind == "rows"  # CUDA: never middle
    # a transposed array reduced over its first axis is already rows in memory: no middle, no copy
    xt = np.empty((50, 40)).T
    lay = _layout.Layout(xt, (0,), True)
    assert lay.kind == "rows" and np.shares_memory(lay.to_kernel(np, xt), xt)


def test_scalar_results_are_numpy_scalars_as_in_scipy():
    assert type(fa.logsumexp(np.zeros(3))) is np.float64
    assert type(fa.softmax(np.float32(2.0))) is np.float32 and fa.softmax(np.float32(2.0)) == 1.0
    assert fa.log_softmax(3.0) == 0.0
    assert type(fa.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 1]))) is np.float32


# --- special values: NaN and infinity placement as SciPy's -----------------------------

INF, NAN = np.inf, np.nan
SPECIAL_ROWS = np.array(
    [
        [1.0, 2.0, 3.0, 0.5],
        [-INF, -INF, -INF, -INF],  # only -inf
        [1.0, INF, 2.0, -INF],  # +inf
        [INF, INF, 0.0, 0.0],  # two +inf
        [1.0, NAN, 2.0, 3.0],  # NaN
        [NAN, INF, -INF, 0.0],  # NaN and +inf
        [0.0, -INF, 1.0, -INF],  # -inf entries of a finite row
        [1e30, -1e30, 3e38, 0.0],  # huge finite values
    ]
)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", ["softmax", "log_softmax", "logsumexp"])
@pytest.mark.parametrize("layout", ["rows", "middle", "moved"])
def test_special_values_placed_as_scipy(op, layout, dtype):
    rows = SPECIAL_ROWS.astype(dtype)
    if layout == "rows":
        x, axis = rows, 1
    elif layout == "middle":  # classes on axis 1, 16 positions after it: reduced in place
        x, axis = np.ascontiguousarray(np.repeat(rows.T[None, :, :], 2, axis=2)), 1
    else:  # classes on axis 0 of a C-contiguous array: moved last (a copy)
        x, axis = np.ascontiguousarray(rows.T), 0
    ours = getattr(fa, op)(x, axis=axis)
    ref = scipy64(getattr(sp, op), x, axis=axis)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_array_equal(np.isinf(ours) * np.sign(ours), np.isinf(ref) * np.sign(ref))
    close(np.where(np.isfinite(ref), ours, 0), np.where(np.isfinite(ref), ref, 0), dtype)


def test_logsumexp_return_sign_and_empty_axis_as_scipy():
    for x in (SPECIAL_ROWS, np.zeros((3, 0))):
        ours = fa.logsumexp(x, axis=1, return_sign=True)
        ref = scipy64(sp.logsumexp, x, axis=1, return_sign=True)
        for a, r in zip(ours, ref):
            np.testing.assert_array_equal(a, r)


def test_empty_arrays():
    assert fa.softmax(np.empty((0, 5), np.float32), axis=1).shape == (0, 5)
    assert fa.log_softmax(np.empty((4, 0)), axis=1).shape == (4, 0)  # SciPy raises here; torch returns it
    assert fa.logsumexp(np.empty((0, 5)), axis=1).shape == (0,)


# --- b= -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_logsumexp_weights_against_scipy(dtype):
    x = logits(50, 300, dtype=dtype)
    b = RNG.uniform(0.1, 2.0, (50, 300)).astype(dtype)
    close(fa.logsumexp(x, axis=1, b=b), sp.logsumexp(x.astype(np.float64), axis=1, b=b.astype(np.float64)), dtype)
    # b broadcast along rows, over axis 0 (moved last)
    bc = RNG.uniform(0.1, 2.0, 300).astype(dtype)
    close(fa.logsumexp(x, axis=0, b=bc), sp.logsumexp(x.astype(np.float64), axis=0, b=bc.astype(np.float64)), dtype)


def test_logsumexp_negative_weights_return_sign():
    x = logits(40, 100, dtype=np.float64)
    b = RNG.standard_normal((40, 100))
    ours, sign = fa.logsumexp(x, axis=1, b=b, return_sign=True)
    ref, ref_sign = sp.logsumexp(x, axis=1, b=b, return_sign=True)
    close(ours, ref, np.float64)
    np.testing.assert_array_equal(sign, ref_sign)
    assert (sign < 0).any() and (sign > 0).any()
    plain = fa.logsumexp(x, axis=1, b=b)
    assert np.isnan(plain[sign < 0]).all() and not np.isnan(plain[sign > 0]).any()


def test_logsumexp_zero_weights_leave_out_inf_and_nan():
    x = np.array([[INF, 1.0, 2.0], [NAN, 1.0, 2.0], [1.0, 1.0, 5.0], [INF, -INF, 0.0], [1.0, 2.0, 3.0]])
    b = np.array([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0], [1.0, -1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    ours = fa.logsumexp(x, axis=1, b=b, return_sign=True)
    ref = scipy64(sp.logsumexp, x, axis=1, b=b, return_sign=True)
    for a, r in zip(ours, ref):
        np.testing.assert_array_equal(a, r)


def test_logsumexp_integer_weights_promote_as_scipy():
    x = logits(3, 10)
    mask = (RNG.uniform(size=(3, 10)) > 0.3).astype(np.int64)
    ours = fa.logsumexp(x, axis=1, b=mask)
    ref = sp.logsumexp(x, axis=1, b=mask)
    assert ours.dtype == ref.dtype == np.float64
    close(ours, ref, np.float32)  # the input is float32: compare at its precision


# --- out= ----------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_out_is_written_in_place(op):
    x = logits(6, 33, 20)
    ref = getattr(fa, op)(x, axis=1)
    for out in (np.full(x.shape, np.nan, np.float32), np.full(x.shape[::-1], np.nan, np.float32).T):  # dense, transposed
        got = getattr(fa, op)(x, axis=1, out=out)
        assert got is out
        np.testing.assert_array_equal(out, ref)
    y = x.copy()
    assert getattr(fa, op)(y, axis=1, out=y) is y  # out is the input itself
    np.testing.assert_array_equal(y, ref)


def test_out_of_logsumexp_and_bad_outs():
    x = logits(5, 40)
    out = np.full(5, np.nan, np.float32)
    assert fa.logsumexp(x, axis=1, out=out) is out
    close(out, scipy64(sp.logsumexp, x, axis=1), np.float32)
    with pytest.raises(errors.ShapeError, match="out has shape"):
        fa.softmax(x, axis=1, out=np.empty((5, 41), np.float32))
    with pytest.raises(errors.DTypeError, match="out is float64"):
        fa.softmax(x, axis=1, out=np.empty((5, 40)))
    readonly = np.empty((5, 40), np.float32)
    readonly.flags.writeable = False
    with pytest.raises(errors.ArgumentError, match="read-only"):
        fa.log_softmax(x, axis=1, out=readonly)


# --- layouts and dtypes ------------------------------------------------------------


def test_non_contiguous_inputs():
    base = logits(20, 64, 30, dtype=np.float64)
    for x, axis in [(base[:, ::2, :], 1), (base[::3, :, ::2], -1), (base.transpose(2, 0, 1), 0), (base[..., 5], 1)]:
        for op in ("softmax", "log_softmax", "logsumexp"):
            close(getattr(fa, op)(x, axis=axis), scipy64(getattr(sp, op), x, axis=axis), np.float64)


def test_float16_in_chunks(monkeypatch):
    monkeypatch.setattr(config, "CPU_HALF_CHUNK_BYTES", 4 * 300 * 7)  # chunks of 7 rows of 300
    x = logits(50, 300, dtype=np.float16)
    for op in ("softmax", "log_softmax", "logsumexp"):
        ours = getattr(fa, op)(x, axis=1)
        assert ours.dtype == np.float16
        close(ours, scipy64(getattr(sp, op), x, axis=1), np.float16)
    t = RNG.integers(0, 300, 50)
    loss, grad = fa.cross_entropy(x, t, return_grad=True)
    assert grad.dtype == np.float16 and loss.dtype == np.float16
    x64 = x.astype(np.float64)
    p = sp.softmax(x64, axis=1)
    close(loss, np.mean(sp.logsumexp(x64, axis=1) - x64[np.arange(50), t]), np.float16)
    close(grad, (p - np.eye(300)[t]) / 50, np.float16)


def test_ml_dtypes_bfloat16_in_float32():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = logits(20, 300).astype(ml_dtypes.bfloat16)
    x64 = x.astype(np.float64)
    for op in ("softmax", "log_softmax", "logsumexp"):
        ours = getattr(fa, op)(x, axis=1)
        assert ours.dtype == x.dtype
        # the final rounding to bfloat16 (8 bits): torch's tolerance for it
        np.testing.assert_allclose(ours.astype(np.float64), getattr(sp, op)(x64, axis=1), rtol=1.6e-2, atol=1e-5)
    loss, grad = fa.cross_entropy(x, np.zeros(20, np.int64), return_grad=True)
    assert loss.dtype == grad.dtype == x.dtype


# --- errors ---------------------------------------------------------------------------


def test_errors_name_the_problem():
    x = logits(4, 10)
    with pytest.raises(errors.UnsupportedDTypeError, match="floating-point"):
        fa.softmax(np.arange(10), axis=0)
    with pytest.raises(NotImplementedError):  # torch's class for integer logits
        fa.logsumexp(np.arange(10))
    with pytest.raises(IndexError, match="out of bounds"):
        fa.softmax(x, axis=2)
    with pytest.raises(AxisError):
        fa.log_softmax(x, axis=(0, -3))
    with pytest.raises(errors.ArgumentError, match="repeated axis"):
        fa.logsumexp(x, axis=(1, -1))
    with pytest.raises(TypeError, match="axis must be"):
        fa.softmax(x, axis=1.0)
    with pytest.raises(errors.NotATensorError, match="must be an array, not NoneType"):
        fa.softmax(None)
    with pytest.raises(errors.ShapeError, match="does not broadcast"):
        fa.logsumexp(x, axis=1, b=np.ones(3))
    with pytest.raises(errors.ShapeError, match="does not match"):
        fa.softmax_backward(x, x[:2], axis=1)
    with pytest.raises(errors.DTypeError, match="one dtype"):
        fa.log_softmax_backward(x, x.astype(np.float64), axis=1)


def test_cross_entropy_errors():
    x = logits(4, 10)
    t = np.array([1, 2, 3, 4])
    with pytest.raises(errors.ShapeError, match="Expected target size"):
        fa.cross_entropy(x, t[:3])
    with pytest.raises(IndexError, match=r"Target 10 is out of bounds.*position 2"):
        fa.cross_entropy(x, np.array([1, 2, 10, 4]))
    with pytest.raises(IndexError, match="Target -1"):
        fa.cross_entropy(x, np.array([1, -1, 3, 4]))
    with pytest.raises(errors.ShapeError, match="all 10 classes"):
        fa.cross_entropy(x, t, weight=np.ones(9, np.float32))
    with pytest.raises(errors.DTypeError, match="integer dtype"):
        fa.cross_entropy(x, t.astype(np.float32))
    with pytest.raises(errors.UnsupportedDTypeError):
        fa.cross_entropy(x.astype(np.int32), t)
    with pytest.raises(errors.ArgumentError, match="reduction"):
        fa.cross_entropy(x, t, reduction="avg")
    with pytest.raises(errors.ArgumentError, match="label_smoothing"):
        fa.cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(errors.ArgumentError, match="ignore_index is not supported"):
        fa.cross_entropy(x, np.full(x.shape, 0.1, np.float32), ignore_index=0)
    with pytest.raises(IndexError, match="class axis"):
        fa.cross_entropy(np.float32(1.0), np.int64(0))


# --- the backwards ----------------------------------------------------------------------


@pytest.mark.parametrize("shape,axis", [((6, 50), 1), ((3, 40, 20), 1), ((5, 7, 9), (0, 2)), ((4, 6), None)])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_backward_against_float64_formula_and_finite_differences(shape, axis, log):
    x = logits(*shape, dtype=np.float64, scale=1.0)
    dy = RNG.standard_normal(shape)
    forward = fa.log_softmax if log else fa.softmax
    backward = fa.log_softmax_backward if log else fa.softmax_backward
    y = forward(x, axis=axis)
    dx = backward(y, dy, axis=axis)
    total = (dy if log else dy * y).sum(axis=axis, keepdims=True)
    close(dx, dy - np.exp(y) * total if log else y * (dy - total), np.float64)
    # central differences of <dy, f(x)> along a random direction
    v = RNG.standard_normal(shape)
    h = 1e-6
    fd = (np.sum(dy * forward(x + h * v, axis=axis)) - np.sum(dy * forward(x - h * v, axis=axis))) / (2 * h)
    assert abs(fd - np.sum(dx * v)) <= 1e-6 * max(1.0, abs(fd))


def test_backward_float32_out_and_transposed():
    y = fa.softmax(logits(30, 20), axis=0)
    dy = logits(20, 30).T  # a transposed dy: moved to y's layout
    out = np.full((30, 20), np.nan, np.float32)
    assert fa.softmax_backward(y, dy, axis=0, out=out) is out
    y64, dy64 = y.astype(np.float64), dy.astype(np.float64)
    close(out, y64 * (dy64 - (dy64 * y64).sum(0, keepdims=True)), np.float32)


# --- cross-entropy against torch -------------------------------------------------------


CE_CASES = [
    dict(shape=(64, 100), axis=-1),  # rows
    dict(shape=(8, 13, 4, 5), axis=1),  # (N, C, H, W): 20 positions after C, reduced in place
    dict(shape=(6, 3, 13), axis=2),  # class axis last of a 3-d array
    dict(shape=(6, 13, 3), axis=1),  # 3 positions after C: moved last
    dict(shape=(13,), axis=0),  # one example
]


@pytest.mark.parametrize("case", CE_CASES, ids=lambda c: f"{c['shape']}-{c['axis']}")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"weight": True, "ignore": True, "smoothing": 0.1}, {"prob": True, "smoothing": 0.2}])
def test_cross_entropy_and_gradient_match_torch(case, reduction, options):
    torch = pytest.importorskip("torch")
    shape, axis = case["shape"], case["axis"]
    x = logits(*shape, dtype=np.float64)
    n_classes = shape[axis]
    kept_shape = tuple(n for k, n in enumerate(shape) if k != axis % len(shape))
    if options.get("prob"):
        target = sp.softmax(RNG.standard_normal(shape), axis=axis)
    else:
        target = RNG.integers(0, n_classes, kept_shape)
        if options.get("ignore"):
            target = np.where(RNG.uniform(size=kept_shape) < 0.25, -100, target)
    weight = RNG.uniform(0.5, 2.0, n_classes) if options.get("weight") else None
    eps = options.get("smoothing", 0.0)
    loss, grad = fa.cross_entropy(x, target, axis=axis, weight=weight, reduction=reduction, label_smoothing=eps, return_grad=True)
    # torch wants the classes on dim 1 (dim 0 for one example)
    xt = torch.tensor(np.moveaxis(x, axis, 1 if len(shape) > 1 else 0), requires_grad=True)
    tt = torch.tensor(np.moveaxis(target, axis, 1 if len(shape) > 1 else 0) if options.get("prob") else target)
    wt = None if weight is None else torch.tensor(weight)
    ref = torch.nn.functional.cross_entropy(xt, tt, weight=wt, reduction=reduction, label_smoothing=eps)
    ref.backward(torch.ones_like(ref))
    close(loss, ref.detach().numpy(), np.float64)
    close(grad, np.moveaxis(xt.grad.numpy(), 1 if len(shape) > 1 else 0, axis), np.float64)
    assert np.shape(loss) == tuple(ref.shape)


def test_cross_entropy_float32_and_without_gradient():
    torch = pytest.importorskip("torch")
    x = logits(256, 1000)
    t = RNG.integers(0, 1000, 256)
    ref = torch.nn.functional.cross_entropy(torch.tensor(x), torch.tensor(t)).item()
    assert abs(float(fa.cross_entropy(x, t)) - ref) <= 2e-6 * abs(ref)
    assert np.isnan(fa.cross_entropy(x, np.full(256, -100)))  # all ignored: mean over no weight


def test_cross_entropy_no_classes_as_torch():
    x = np.empty((3, 0), np.float32)
    assert fa.cross_entropy(x, np.full(3, -100), reduction="sum") == 0.0
    assert np.isnan(fa.cross_entropy(x, np.full(3, -100)))
    with pytest.raises(IndexError):
        fa.cross_entropy(x, np.array([0, -100, -100]))
    loss, grad = fa.cross_entropy(x, np.full(3, -100), reduction="none", return_grad=True)
    assert loss.shape == (3,) and grad.shape == (3, 0)


# --- no torch ---------------------------------------------------------------------------


def test_numpy_use_needs_no_torch():
    """With torch impossible to import (as where it is not installed), the array API runs, and the torch API says what to install."""
    code = """
import sys
sys.modules["torch"] = None  # any import of torch now fails, as it does where torch is not installed
import numpy as np
import fastsoftmax, fastsoftmax.array as fa
x = np.random.default_rng(0).standard_normal((64, 300)).astype(np.float32)
fa.softmax(x, axis=-1); fa.log_softmax(x, axis=0); fa.logsumexp(x, axis=(0, 1), b=2.0, return_sign=True)
y = fa.softmax(x, axis=1); fa.softmax_backward(y, x, axis=1); fa.log_softmax_backward(y, x, axis=1)
fa.cross_entropy(x, np.zeros(64, np.int64), return_grad=True, label_smoothing=0.1)
fa.softmax(x.astype(np.float16), axis=1)
print("fastsoftmax.ops" in sys.modules)
try:
    fastsoftmax.softmax
except ModuleNotFoundError as error:
    print(error.name, error)
from fastsoftmax.apps import cli
print(cli.main(["demo"]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    assert lines[0] == "False"
    assert lines[1].startswith("torch fastsoftmax.softmax needs PyTorch") and "pip install torch" in lines[1]
    assert lines[2] == "2" and "pip install torch" in proc.stderr


def test_benchmark_script_runs_once_on_a_small_shape(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "array_bench.py"
    spec = importlib.util.spec_from_file_location("array_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--shapes", "16x50", "--repeats", "1", "--out", str(tmp_path)]) == 0
    import json

    run = json.loads((tmp_path / "array_bench.json").read_text())
    assert [r["op"] for r in run["results"]] == ["softmax", "log_softmax", "logsumexp"]
    assert {"fastsoftmax", "scipy", "naive", "copy"} <= set(run["results"][0]["median_ms"])
    assert "fraction_of_read_speed" in run["results"][2]
