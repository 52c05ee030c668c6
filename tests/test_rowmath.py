"""The row math shared by the CPU and CUDA kernels, as plain Python against float64 references."""

import math
import random

import numpy as np
import pytest
from fastsoftmax.kernels import exp, rowmath


def _fold(xs):
    m, s = -math.inf, 0.0
    for x in xs:
        m, s = rowmath.online_update(m, s, x)
    return m, s


def _lse(xs):
    xs = np.asarray(xs, dtype=np.float64)
    m = xs.max()
    return m + math.log(np.exp(xs - m).sum())


@pytest.mark.parametrize("seed", range(5))
def test_online_update_and_merge_give_logsumexp(seed):
    rng = random.Random(seed)
    xs = [rng.gauss(0, 30) for _ in range(200)]
    m, s = _fold(xs)
    assert m + math.log(s) == pytest.approx(_lse(xs), rel=1e-14)
    cut = rng.randrange(1, 199)
    merged = rowmath.lse_merge(*_fold(xs[:cut]), *_fold(xs[cut:]))
    assert merged[0] + math.log(merged[1]) == pytest.approx(_lse(xs), rel=1e-14)


def test_online_update_special_values_follow_the_two_pass_form():
    assert _fold([-math.inf, 1.0, -math.inf]) == (1.0, 1.0)  # -inf adds nothing
    assert math.isnan(_fold([1.0, math.inf, 2.0])[1])  # inf - inf, as torch
    assert math.isnan(_fold([1.0, math.nan, 2.0])[1])
    assert _fold([1e30, -1e30]) == (1e30, 1.0)  # no overflow
    m, s = rowmath.lse_merge(-math.inf, 0.0, 3.0, 2.0)  # an empty side
    assert (m, s) == (3.0, 2.0)


def test_cross_entropy_row_formula():
    x = np.array([2.0, -1.0, 0.5, 3.0])
    w = np.array([1.0, 2.0, 0.5, 1.5])
    t, eps = 2, 0.2
    m = x.max()
    s = np.exp(x - m).sum()
    loss = rowmath.ce_index_loss(m, math.log(s), x[t], w[t], float((w * (m - x)).sum()), float(w.sum()), eps, 4)
    lse = _lse(x)
    assert loss == pytest.approx((1 - eps) * w[t] * (lse - x[t]) + eps / 4 * (w * (lse - x)).sum(), rel=1e-14)
    k_exp, k_w, k_hot = rowmath.ce_index_grad_coeffs(s, w[t], float(w.sum()), eps, 4, 1.0)
    grad = np.exp(x - m) * k_exp - k_w * w
    grad[t] -= k_hot
    a = eps / 4 * w
    a[t] += (1 - eps) * w[t]
    p = np.exp(x - lse)
    np.testing.assert_allclose(grad, a.sum() * p - a, rtol=1e-14)


def test_one_part_ln2_only_where_the_target_fuses_multiply_add(monkeypatch):
    """A user-chosen Numba target (``NUMBA_CPU_NAME``, e.g. for portable caches) decides, not the host."""
    import platform

    from numba.core import config as numba_config

    monkeypatch.setattr(numba_config, "CPU_NAME", "generic")
    monkeypatch.setattr(numba_config, "CPU_FEATURES", "")
    on_arm = platform.machine().lower() in ("arm64", "aarch64")
    assert exp._target_has_fma() is on_arm
    monkeypatch.setattr(numba_config, "CPU_FEATURES", "+avx2,+fma")
    assert exp._target_has_fma() is True
    # the constant the module chose matches the answer for the target it was imported under
    monkeypatch.undo()
    assert len(exp._F32.ln2_parts) == (1 if exp._target_has_fma() else 2)
