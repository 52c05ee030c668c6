r"""CPU kernels of the vocabulary-parallel cross-entropy: the two passes over one rank's slice of the classes.

Rank ``r`` holds the logits ``x`` (R, V) of the classes ``[v0, v0 + V)`` of
``C``. Per row, with ``j`` over the rank's classes and weights ``w`` (ones
when none are given):

* pass 1 (:data:`vocab_partials`), one read of the slice: the local max
  ``m_r = max_j x_j``, ``s_r = sum_j exp(x_j - m_r)`` and, for label
  smoothing, ``g_r = sum_j w_j (b_r - x_j)`` about ``b_r = m_r`` (0 when
  ``m_r = -inf``). The host then all-reduces them into

  .. math::

      M = \max_r m_r, \qquad S = \sum_r s_r e^{m_r - M}, \qquad
      \sum_c w_c (M - x_c) = \sum_r \big(g_r + (M - b_r) W_r\big),

  every term non-negative, so large logits do not cancel;
* pass 2 (:data:`vocab_gradient`), one more read of the slice and one write:
  the rank's slice of the gradient of the reduced loss for a unit
  grad_output,

  .. math::

      g_j = \mathrm{scale}\,\big(A\, e^{x_j - M} / S - \tfrac{\varepsilon}{C} w_j
            - (1 - \varepsilon) w_t [v_0 + j = t]\big),
      \qquad A = (1 - \varepsilon) w_t + \tfrac{\varepsilon}{C} W,

  with the coefficients of :func:`.rowmath.ce_index_grad_coeffs`, the ones
  the single-device kernel uses.

Rows are claimed from a work queue and each kernel comes as twins, as in
:mod:`.cpu_rows`; sums run in the fixed order of :mod:`.cpu_common`, so a
rank's partials do not depend on the thread count.
"""

import math

from numba import njit, prange

from . import rowmath
from .cpu_common import (
    BLOCK,
    WORKERS,
    claim,
    exp_sum,
    gap_sum,
    holds_nan,
    next_row,
    row_max_of,
    stream_row,
)
from .exp import vexp_nonpos
from .intrinsics import store_fence
from .jit import EXACT, cast_like, inline, twins

ce_index_grad_coeffs = njit(**EXACT)(rowmath.ce_index_grad_coeffs)


def _vocab_partials(x, weight, row_max, row_sum, gap, scratch, queue):
    """Pass 1: ``row_max[i] = m_r``, ``row_sum[i] = s_r`` and, if ``gap`` has rows, ``gap[i] = g_r`` (float64).

    ``x`` (R, V) the rank's logits, ``weight`` (V,) its class weights or
    shape (0,) for none, ``scratch`` (workers, :data:`BLOCK`). A row whose
    slice holds no finite or ``+inf`` logit (only ``-inf``, or no columns)
    has ``m_r = -inf`` and ``s_r = 0``, nothing to add to another rank's
    sum; ``s_r`` is NaN if the slice holds a NaN or ``+inf``, which makes the
    whole row NaN after the all-reduce, as the single-device kernel does.
    """
    want_gap = gap.shape[0] > 0
    for w in prange(queue[WORKERS]):
        blk = scratch[w]
        lo, hi = claim(queue, x.shape[0])
        while lo < hi:
            for i in range(lo, hi):
                xr = x[i]
                m = row_max_of(xr)
                if m == -math.inf:
                    # exp(x_j - m) would be exp(-inf + inf): NaN where the slice only holds nothing to add
                    s = math.nan if holds_nan(xr) else 0.0
                    base = cast_like(0.0, xr)
                else:
                    s = exp_sum(xr, m, blk[:0], blk, next_row(x, i))
                    base = m
                row_max[i] = m
                row_sum[i] = s
                if want_gap:
                    gap[i] = gap_sum(xr, base, weight, blk)
            lo, hi = claim(queue, x.shape[0])


@inline
def _exp_gradient(xr, m, buf, k_exp, k_w, weight):
    """``buf = exp(x - m) * k_exp - k_w * w`` (``w`` empty: ones), in the order the single-device kernel rounds it."""
    mm = cast_like(m, xr)
    ke = cast_like(k_exp, xr)
    kw = cast_like(k_w, xr)
    if weight.shape[0] > 0:
        for j in range(xr.shape[0]):
            buf[j] = vexp_nonpos(xr[j] - mm) * ke - kw * weight[j]
    else:
        for j in range(xr.shape[0]):
            buf[j] = vexp_nonpos(xr[j] - mm) * ke - kw


def _vocab_gradient(x, target, v0, weight, ignore_index, eps, n_classes, w_sum, scale, row_max, row_sum, w_t, grad, scratch, queue):
    """Pass 2: the rank's slice ``grad`` (R, V) of d(reduced loss)/dx for a unit grad_output.

    ``target`` (R,) int64 global class indices, already checked; ``v0`` the
    slice's first class; ``n_classes`` (C) and ``w_sum`` (W) over all ranks;
    ``scale`` the reduction's factor (NaN for a mean over zero weight);
    ``row_max`` (M), ``row_sum`` (S) and ``w_t`` the all-reduced per-row
    values, float64. An ignored row gets 0, or NaN where the whole row's
    log-softmax is NaN (``S`` is NaN), as torch multiplies it by a zero
    weight. ``scratch`` as in :func:`.cpu_rows._softmax_forward`: with a
    stream row, each row is built there and written with non-temporal stores.
    """
    R, V = x.shape
    one = cast_like(1.0, x)
    for w in prange(queue[WORKERS]):
        n_stream = scratch.shape[1] - BLOCK
        row = scratch[w, :n_stream]
        stream = n_stream > 0
        lo, hi = claim(queue, R)
        while lo < hi:
            for i in range(lo, hi):
                buf = row if stream else grad[i]
                t = target[i]
                s = row_sum[i]
                if t == ignore_index:
                    buf[:] = math.nan if s != s else 0.0
                else:
                    k_exp, k_w, k_hot = ce_index_grad_coeffs(s, w_t[i], w_sum, eps, n_classes, scale)
                    _exp_gradient(x[i], row_max[i], buf, k_exp, k_w, weight)
                    local = t - v0
                    if 0 <= local < V:
                        buf[local] -= cast_like(k_hot, buf)
                if stream:
                    stream_row(grad[i], buf, one)
            lo, hi = claim(queue, R)
        if stream:
            store_fence()


vocab_partials = twins(_vocab_partials)
vocab_gradient = twins(_vocab_gradient)
