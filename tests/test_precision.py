"""The precision and overflow suite: every op at the extremes, against float64.

Each case also shows the textbook version (fastsoftmax.naive) failing on the
same input where ours is exact.
"""

import math

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from fastsoftmax.kernels import exp
from fastsoftmax.kernels.exp import vexp, vexp_nonpos
from helpers import FLOAT_DTYPES, assert_close, randn
from numba import njit

import fastsoftmax
from fastsoftmax import naive

F32_MAX = float(torch.finfo(torch.float32).max)


def _along(op, x, layout):
    """``op`` over the rows of a 2-D ``x``: along dim 1 (the row kernels), or with
    each row laid along the middle axis of a ``(1, C, inner)`` tensor (the
    middle-axis kernels; inner >= 16 positions, the rows repeated)."""
    if layout == "rows":
        return op(x, 1)
    reps = -(-16 // x.shape[0])
    y = op(x.t().repeat(1, reps).unsqueeze(0), 1)
    return y[0, :, : x.shape[0]].t()


LAYOUTS = ["rows", "middle"]


def _reference(op, x, dim=1):
    ref = TF.softmax if op is fastsoftmax.softmax else TF.log_softmax
    return ref(x.double(), dim)


EXTREME_ROWS = {
    "logits of 100": lambda: randn(8, 50, dtype=torch.float32) + 100.0,
    "logits of 1e30": lambda: randn(8, 50, dtype=torch.float32) * 1e30,
    "logits of 3e38": lambda: torch.tensor([[3e38, -3e38, 1e38, 0.0, F32_MAX]], dtype=torch.float32),
    "every logit below -100": lambda: randn(8, 50, dtype=torch.float32) - 200.0,
    "every logit below -1e4": lambda: randn(8, 50, dtype=torch.float32) * 10 - 1e4,
}


@pytest.mark.parametrize("op", [fastsoftmax.softmax, fastsoftmax.log_softmax], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("case", list(EXTREME_ROWS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_extreme_logits_are_exact_and_naive_fails(op, case, layout):
    x = EXTREME_ROWS[case]()
    y = _along(op, x, layout)
    ref = _reference(op, x)
    # finite wherever the exact result is representable (log_softmax of -3e38
    # next to 3.4e38 is -6.4e38: -inf in float32, in torch as in float64 rounding)
    representable = ref.abs() <= F32_MAX
    assert torch.isfinite(y[representable]).all()
    assert_close(y, ref.to(torch.float32).double())
    naive_op = naive.softmax if op is fastsoftmax.softmax else naive.log_softmax
    assert not torch.isfinite(naive_op(x)).all(), "the textbook version should overflow or underflow here"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cross_entropy_at_scale_1e4(dtype):
    x = randn(64, 100, dtype=torch.float64, scale=1e4).to(dtype)
    t = torch.randint(0, 100, (64,))
    xg = x.detach().requires_grad_()
    loss = fastsoftmax.cross_entropy(xg, t)
    loss.backward()
    x64 = x.double().requires_grad_()
    ref = TF.cross_entropy(x64, t)
    ref.backward()
    assert torch.isfinite(loss) and torch.isfinite(xg.grad).all()
    assert_close(loss, ref, dtype)
    assert_close(xg.grad, x64.grad, dtype)
    naive_loss = naive.cross_entropy_loss(x.float(), t)
    assert not torch.isfinite(naive_loss), "the textbook loss should give inf or NaN here"


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("case", ["scale 1e4", "every logit below -1e4"])
def test_cross_entropy_over_a_middle_axis_at_the_extremes(kind, case):
    """(N, C, d) logits reduced over C in place (the middle-axis kernels), with either kind of target."""
    x = randn(4, 30, 20, dtype=torch.float64, scale=1e4) if case == "scale 1e4" else randn(4, 30, 20, dtype=torch.float64) * 10 - 1e4
    x = x.float()
    if kind == "index":
        target = torch.randint(0, 30, (4, 20))
    else:
        target = torch.softmax(randn(4, 30, 20, dtype=torch.float32, seed=5), 1)
    xg = x.detach().requires_grad_()
    loss = fastsoftmax.cross_entropy(xg, target, label_smoothing=0.1)
    loss.backward()
    x64 = x.double().requires_grad_()
    ref = TF.cross_entropy(x64, target.double() if kind == "prob" else target, label_smoothing=0.1)
    ref.backward()
    assert torch.isfinite(loss) and torch.isfinite(xg.grad).all()
    assert_close(loss, ref, torch.float32)
    assert_close(xg.grad, x64.grad, torch.float32)


def test_cross_entropy_never_takes_log_of_zero():
    # the true class is 200 below the max: its probability underflows float32,
    # yet the loss (about 200) is finite and exact
    x = torch.zeros(4, 10)
    x[:, 0] = 100.0
    x[:, 1] = -100.0
    t = torch.full((4,), 1)
    loss = fastsoftmax.cross_entropy(x, t)
    assert_close(loss, TF.cross_entropy(x.double(), t), torch.float32)
    assert torch.isinf(naive.cross_entropy_loss(x, t))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_minus_inf_masks_give_zero_probability_and_finite_gradients(dtype, layout):
    x = randn(16, 40, dtype=dtype)
    x[:, ::3] = float("-inf")
    xs = x.detach().requires_grad_()
    y = _along(fastsoftmax.softmax, xs, layout)
    assert (y[:, ::3] == 0).all()
    assert_close(y, TF.softmax(x.double(), 1), dtype)
    y.backward(randn(16, 40, dtype=dtype))
    assert torch.isfinite(xs.grad).all() and (xs.grad[:, ::3] == 0).all()
    xl = x.detach().requires_grad_()
    lp = _along(fastsoftmax.log_softmax, xl, layout)
    g = randn(16, 40, dtype=dtype)
    lp.backward(g)
    assert torch.isfinite(xl.grad).all()  # dy - exp(y) * sum(dy): dy itself where masked
    y64, g64 = lp.detach().double(), g.double()  # the formula, applied to the output we returned
    assert_close(xl.grad, g64 - y64.exp() * g64.sum(1, keepdim=True), dtype)
    lp = lp.detach()
    assert torch.isneginf(lp[:, ::3]).all() and torch.isfinite(lp[:, 1::3]).all()
    # cross-entropy with masked classes, targets on unmasked ones
    xc = x.detach().requires_grad_()
    t = torch.randint(0, 13, (16,)) * 3 + 1
    loss = fastsoftmax.cross_entropy(xc, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(xc.grad).all() and (xc.grad[:, ::3] == 0).all()


@pytest.mark.parametrize("op", [fastsoftmax.softmax, fastsoftmax.log_softmax], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_stays_in_its_row(op, layout):
    x = randn(5, 33, dtype=torch.float32)
    x[2, 7] = float("nan")
    y = _along(op, x, layout)
    assert torch.isnan(y[2]).all()
    mask = torch.arange(5) != 2
    assert torch.isfinite(y[mask]).all()
    assert_close(y[mask], _reference(op, x[mask]))


def test_nan_logit_stays_in_its_cross_entropy_row():
    x = randn(5, 8).requires_grad_()
    with torch.no_grad():
        x[3, 1] = float("nan")
    loss = fastsoftmax.cross_entropy(x, torch.arange(5), reduction="none")
    assert torch.isnan(loss[3]) and torch.isfinite(loss[[0, 1, 2, 4]]).all()
    loss.sum().backward()
    assert torch.isnan(x.grad[3]).all() and torch.isfinite(x.grad[[0, 1, 2, 4]]).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rows_of_only_minus_inf_or_plus_inf_match_torch(layout):
    x = torch.tensor([[float("-inf")] * 4, [float("inf"), 0.0, 1.0, 2.0], [0.0, 1.0, 2.0, 3.0]])
    torch.testing.assert_close(_along(fastsoftmax.softmax, x, layout), torch.softmax(x, 1), equal_nan=True)
    torch.testing.assert_close(_along(fastsoftmax.log_softmax, x, layout), torch.log_softmax(x, 1), equal_nan=True)


def _apply(fn):
    @njit
    def apply(z):
        out = np.empty_like(z)
        for i in range(z.size):
            out[i] = fn(z[i])
        return out

    return apply


def _max_ulp(got, z, allowed):
    """The largest error in ulps, as a fraction of what is ``allowed`` at each argument (<= 1.0 passes)."""
    exact = np.exp(z.astype(np.longdouble))
    ulps = np.abs(got.astype(np.longdouble) - exact) / np.spacing(exact.astype(z.dtype)).astype(np.longdouble)
    return float((ulps / allowed).max())


def _ulps_allowed(z):
    """1 ulp, plus, where ln2 is one float32 (see :func:`vexp`), its own error times ``|z|``.

    ``fl(ln2)`` is off by ``delta`` (relative), so ``exp`` is off by
    ``|z| * delta`` (relative): at most ``|z| * delta * 2**24`` ulps.
    """
    parts = exp._FORMATS[numba.from_dtype(z.dtype)].ln2_parts
    if len(parts) > 1:
        return np.ones(z.shape)
    delta = abs(float(parts[0]) - math.log(2)) / math.log(2)
    assert delta < 3e-9  # fl(ln2) is this close; a wrong constant must not widen the bound
    return 1.0 + np.abs(z.astype(np.float64)) * delta * 2.0**24


@pytest.mark.parametrize("np_dtype", [np.float32, np.float64])
def test_vectorised_exp_is_within_one_ulp(np_dtype):
    """Within one ulp over the whole argument range whose result is a normal
    number, plus the error of a one-part ln2 (float32 with FMA, see :func:`_ulps_allowed`)."""
    tiny = np.finfo(np_dtype).tiny
    lo, hi = float(np.log(tiny)) + 0.01, float(np.log(np.finfo(np_dtype).max)) - 0.01
    z = np.concatenate([np.linspace(lo, hi, 200_001), np.random.default_rng(0).uniform(-1, 1, 100_000)]).astype(np_dtype)
    apply = _apply(vexp)
    assert _max_ulp(apply(z), z, _ulps_allowed(z)) <= 1.0
    special = apply(np.array([np.nan, -np.inf, np.inf, 0.0, -1e4, 1e4], dtype=np_dtype))
    assert np.isnan(special[0]) and special[1] == 0 and special[2] == np.inf and special[3] == 1
    assert special[4] == 0 and special[5] == np.inf


@pytest.mark.parametrize("np_dtype", [np.float32, np.float64])
def test_vectorised_exp_of_nonpositive_arguments(np_dtype):
    """The kernels' exp: within one ulp (:func:`_ulps_allowed`) down to the smallest normal result, then 0, never garbage."""
    tiny = np.finfo(np_dtype).tiny
    z = np.concatenate([np.linspace(float(np.log(tiny)) + 0.01, 0.0, 200_001), -np.random.default_rng(1).random(100_000)])
    z = z.astype(np_dtype)
    apply = _apply(vexp_nonpos)
    assert _max_ulp(apply(z), z, _ulps_allowed(z)) <= 1.0
    # below the normal range: as small as the exact value (to within 2**-k), monotone, and 0 far out
    deep = -np.geomspace(-float(np.log(tiny)), 1e30, 10_001).astype(np_dtype)
    got = apply(deep)
    assert np.all(np.isfinite(got)) and np.all(got >= 0) and np.all(np.diff(got) <= 0)
    assert np.all(got <= 1.01 * np.exp(deep.astype(np.longdouble)).astype(np.float64) + np.finfo(np_dtype).smallest_subnormal)
    special = apply(np.array([np.nan, -np.inf, -0.0, -3.0e38, -1e4], dtype=np_dtype))
    assert np.isnan(special[0]) and special[1] == 0 and special[2] == 1 and special[3] == 0 and special[4] == 0


@pytest.mark.parametrize("op", [fastsoftmax.softmax, fastsoftmax.log_softmax], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_error_is_a_few_ulps_of_its_terms(op, layout):
    """float32 gradients within 4 ulps of the size of the terms they are computed from.

    The backward subtracts ``p_j * sum_k(...)`` from ``dy_j``; where the two
    nearly cancel, the result can only be as exact as they are. Measured
    against the float64 formula applied to the output the forward returned.
    (With the sum accumulated in float32 the error reached ~190 ulps.)
    """
    log = op is fastsoftmax.log_softmax
    x = randn(64, 1000, dtype=torch.float32, seed=11).requires_grad_()
    dy = randn(64, 1000, dtype=torch.float32, seed=12)
    y = _along(op, x, layout)
    (dx,) = torch.autograd.grad(y, x, dy)
    y64, dy64 = y.detach().double(), dy.double()
    if log:
        ref = dy64 - y64.exp() * dy64.sum(1, keepdim=True)
        terms = dy64.abs() + y64.exp() * dy64.sum(1, keepdim=True).abs()
    else:
        dot = (dy64 * y64).sum(1, keepdim=True)
        ref = y64 * (dy64 - dot)
        terms = y64 * (dy64.abs() + dot.abs())
    ulps = (dx.double() - ref).abs() / (terms * 2.0**-24)
    assert float(ulps.max()) <= 4.0
