r"""CPU kernels of the array API: log-sum-exp over rows, over a middle axis, and with weights.

.. math::

    \mathrm{logsumexp}(x) = \log \sum_j b_j e^{x_j} = m + \log \sum_j b_j e^{x_j - m}, \qquad m = \max_j x_j

(``b`` all ones unless weights are given). The special values are SciPy's
(``scipy.special.logsumexp``): a row holding NaN gives NaN; else one
holding ``+inf`` gives ``+inf``; a row of ``-inf`` only, or with no
elements, gives ``-inf``. With weights, a term whose ``b_j`` is 0 is left
out even where ``x_j`` is infinite or NaN, and the sum may be negative: the
kernels return ``log |sum|`` and the sign of the sum.

Same layouts and work queue as :mod:`.cpu_rows` and :mod:`.cpu_middle`; each
kernel comes as ``{True: parallel, False: serial}`` twins. The plain kernels
read every element once from memory (the max pass streams a row into the
cache, the exp pass reads it from there) and write one float64 per row.
"""

import math

from numba import prange

from .cpu_common import BLOCK, WORKERS, claim, exp_sum, holds_nan, next_row, row_max_of
from .cpu_middle import _middle_blocks, _middle_exp_sum, _middle_item, _middle_max
from .exp import vexp_nonpos
from .intrinsics import lane_sum, row_max
from .jit import cast_like, inline, twins


@inline
def _lse_of_extreme_row(xr, m):
    """SciPy's result for a row whose (NaN-skipping) max ``m`` is infinite: NaN if the row holds one, else ``m``."""
    return math.nan if holds_nan(xr) else float(m)


def _logsumexp_rows(x, out, scratch, queue):
    """``out[i] = logsumexp(x[i])`` in float64 for C-contiguous ``x`` (R, C).

    ``scratch`` (workers, :data:`.cpu_common.BLOCK`): where each block's
    exponentials are put before they are summed in the fixed lane order.
    """
    n_rows = x.shape[0]
    for w in prange(queue[WORKERS]):
        blk = scratch[w]
        lo, hi = claim(queue, n_rows)
        while lo < hi:
            for i in range(lo, hi):
                xr = x[i]
                m = row_max_of(xr)
                if abs(m) == math.inf:
                    out[i] = _lse_of_extreme_row(xr, m)
                else:
                    out[i] = m + math.log(exp_sum(xr, m, blk[:0], blk, next_row(x, i)))
            lo, hi = claim(queue, n_rows)


def _logsumexp_middle(x, out, scratch, totals, queue):
    """``out[o, i] = logsumexp(x[o, :, i])`` in float64 for C-contiguous ``x`` (O, C, I).

    Blocks of ``W`` inner positions swept twice over ``C`` (maxima, then the
    sums of exponentials), as in :func:`.cpu_middle._softmax_forward_middle`;
    scratch ``(workers, 2, W)`` in ``x``'s dtype, totals ``(workers, 1+, W)``.
    """
    n_outer, n_classes, n_inner = x.shape
    width, n_blocks, n_items = _middle_blocks(n_outer, n_inner, scratch)
    for w in prange(queue[WORKERS]):
        lo, hi = claim(queue, n_items)
        while lo < hi:
            for item in range(lo, hi):
                o, i0, i1 = _middle_item(item, n_blocks, width, n_inner)
                m, part, total = scratch[w, 0, : i1 - i0], scratch[w, 1, : i1 - i0], totals[w, 0, : i1 - i0]
                _middle_max(x[o], i0, i1, m)
                _middle_exp_sum(x[o], i0, i1, m, x[o, :0], part, total)
                for i in range(m.shape[0]):
                    if abs(m[i]) == math.inf or m[i] != m[i]:
                        # rare: the column is scanned again, one element at a time
                        nan = False
                        for c in range(n_classes):
                            nan = nan or x[o, c, i0 + i] != x[o, c, i0 + i]
                        out[o, i0 + i] = math.nan if (nan or m[i] != m[i]) else float(m[i])
                    else:
                        out[o, i0 + i] = m[i] + math.log(total[i])
            lo, hi = claim(queue, n_items)


@inline
def _kept_max(xr, br, blk):
    """``max_j x_j`` over the terms with ``b_j != 0`` (NaN skipped; ``-inf`` if none is left)."""
    n = xr.shape[0]
    lowest = cast_like(-math.inf, xr)
    m = lowest
    for b in range(0, n, BLOCK):
        end = min(b + BLOCK, n)
        xb, bb, tb = xr[b:end], br[b:end], blk[: end - b]
        for j in range(xb.shape[0]):
            tb[j] = xb[j] if bb[j] != 0 else lowest
        mb = row_max(tb)
        m = mb if mb > m else m
    return m


def _logsumexp_weighted_rows(x, b, out, sign, scratch, queue):
    """``out[i] = log |sum_j b_ij exp(x_ij)|`` and ``sign[i]`` its sign (+1, -1, 0 or NaN), in float64.

    ``x`` and ``b`` C-contiguous (R, C) of one dtype; terms with ``b_ij = 0``
    are left out. With ``m`` the max over the kept terms, the sum is
    ``exp(m) * sum_j b_j exp(x_j - m)``, the inner sum in the fixed lane
    order (blocks in ``x``'s dtype, then float64). When ``m`` is not finite
    (no kept term, or an infinite one) the row takes SciPy's fallback: the
    unshifted ``sum_j b_j exp(x_j)`` over every term, one at a time.
    """
    n_rows, n_cols = x.shape
    for w in prange(queue[WORKERS]):
        blk = scratch[w]
        lo, hi = claim(queue, n_rows)
        while lo < hi:
            for i in range(lo, hi):
                xr, br = x[i], b[i]
                m = _kept_max(xr, br, blk)
                shift = 0.0
                total = 0.0
                if abs(m) != math.inf:
                    shift = float(m)
                    for s in range(0, n_cols, BLOCK):
                        end = min(s + BLOCK, n_cols)
                        xb, bb, tb = xr[s:end], br[s:end], blk[: end - s]
                        for j in range(xb.shape[0]):
                            tb[j] = bb[j] * vexp_nonpos(xb[j] - m) if bb[j] != 0 else 0
                        total += lane_sum(tb)
                else:
                    for j in range(n_cols):
                        total += float(br[j]) * math.exp(float(xr[j]))
                sign[i] = math.nan if total != total else (1.0 if total > 0 else (-1.0 if total < 0 else 0.0))
                out[i] = shift + math.log(abs(total)) if total != 0 else -math.inf
            lo, hi = claim(queue, n_rows)


logsumexp_rows = twins(_logsumexp_rows)
logsumexp_middle = twins(_logsumexp_middle)
logsumexp_weighted_rows = twins(_logsumexp_weighted_rows)
