"""CPU kernels that reduce the middle axis of an ``(O, C, I)`` array in place.

Softmax over dim 1 of an NCHW tensor, say: moving C last would cost a copy
in and a copy back. These kernels sweep C for a block of W inner positions
at a time, SIMD along the block, and the block (C x W elements of input and
output) stays in cache between the sweeps (see
``config.CPU_MIDDLE_BLOCK_BYTES``). A work item is one block of one outer
index. Scratch per worker: rows of W in the input dtype (the block's maxima,
partial sums, coefficients) and rows of W float64 sums.
"""

import math

import numpy as np
from numba import prange

from .cpu_common import WORKERS, claim, dot
from .cpu_rows import ce_index_grad_coeffs, ce_index_loss
from .exp import vexp_nonpos
from .intrinsics import maxnum
from .jit import cast_like, exact, inline, twins

#: Each lane of a partial sum here adds classes one after another, so the
#: partial sums span fewer terms than the row kernels' (whose SIMD lanes
#: split a block of 256 into short chains): blocks of 16 classes in float32,
#: then float64. With 256 the float32 rounding of the sum reached 1e-6
#: relative at C = 1000.
_MIDDLE_BLOCK = 16


@inline
def _middle_blocks(n_outer, n_inner, scratch):
    """``(W, blocks per outer index, work items)`` of a middle-axis kernel, ``W = scratch.shape[2]``."""
    width = scratch.shape[2]
    n_blocks = (n_inner + width - 1) // width
    return width, n_blocks, n_outer * n_blocks


@inline
def _middle_item(item, n_blocks, width, n_inner):
    """The outer index and inner range ``[i0, i1)`` of work item ``item``."""
    i0 = (item % n_blocks) * width
    return item // n_blocks, i0, min(i0 + width, n_inner)


@inline
def _middle_max(xs, i0, i1, m):
    """``m = max_c xs[c, i0:i1]``."""
    first = xs[0, i0:i1]
    for i in range(m.shape[0]):
        m[i] = first[i]
    for c in range(1, xs.shape[0]):
        xr = xs[c, i0:i1]
        for i in range(m.shape[0]):
            m[i] = maxnum(m[i], xr[i])


@inline
def _middle_exp_sum(xs, i0, i1, m, ys, part, total):
    """``total = sum_c exp(xs[c, i0:i1] - m)`` in float64; each exp also stored in ``ys`` if it has rows.

    Partial sums over blocks of :data:`_MIDDLE_BLOCK` classes in the input dtype.
    """
    store = ys.shape[0] > 0
    total[:] = 0.0
    for cb in range(0, xs.shape[0], _MIDDLE_BLOCK):
        part[:] = 0
        for c in range(cb, min(cb + _MIDDLE_BLOCK, xs.shape[0])):
            xr = xs[c, i0:i1]
            if store:
                yr = ys[c, i0:i1]
                for i in range(part.shape[0]):
                    e = vexp_nonpos(xr[i] - m[i])
                    yr[i] = e
                    part[i] += e
            else:
                for i in range(part.shape[0]):
                    part[i] += vexp_nonpos(xr[i] - m[i])
        for i in range(part.shape[0]):
            total[i] += part[i]


@inline
def _middle_dot(a, b, i0, i1, total):
    """``total = sum_c a[c, i0:i1] * b[c, i0:i1]`` (``b`` without rows: ``sum_c a``), in float64 (see :func:`dot`)."""
    total[:] = 0.0
    for c in range(a.shape[0]):
        ar = a[c, i0:i1]
        if b.shape[0] > 0:
            br = b[c, i0:i1]
            for i in range(total.shape[0]):
                total[i] += np.float64(ar[i]) * np.float64(br[i])
        else:
            for i in range(total.shape[0]):
                total[i] += np.float64(ar[i])


@exact
def _store_shifted_middle(xr, yr, m, log_s):
    """``yr = (xr - m) - log_s`` elementwise, in that order (see :func:`_store_shifted`)."""
    for i in range(xr.shape[0]):
        yr[i] = (xr[i] - m[i]) - log_s[i]


def _softmax_forward_middle(x, y, scratch, totals, queue, log):
    """``y[o, :, i] = softmax(x[o, :, i])``, or ``log_softmax`` when ``log``, for ``(O, C, I)`` arrays.

    Work items are blocks of ``W = scratch.shape[2]`` inner positions; each
    is swept three times over ``C``: the maxima, the sums of exponentials
    (softmax stores the exponentials in ``y``), then the output, scaled by
    ``1 / s`` or shifted by ``m + log(s)``.
    """
    n_outer, n_classes, n_inner = x.shape
    width, n_blocks, n_items = _middle_blocks(n_outer, n_inner, scratch)
    for w in prange(queue[WORKERS]):
        lo, hi = claim(queue, n_items)
        while lo < hi:
            for item in range(lo, hi):
                o, i0, i1 = _middle_item(item, n_blocks, width, n_inner)
                m, k, total = scratch[w, 0, : i1 - i0], scratch[w, 1, : i1 - i0], totals[w, 0, : i1 - i0]
                _middle_max(x[o], i0, i1, m)
                _middle_exp_sum(x[o], i0, i1, m, y[o, :0] if log else y[o], k, total)
                if log:
                    for i in range(k.shape[0]):
                        k[i] = cast_like(math.log(total[i]), k)
                    for c in range(n_classes):
                        _store_shifted_middle(x[o, c, i0:i1], y[o, c, i0:i1], m, k)
                else:
                    for i in range(k.shape[0]):
                        k[i] = cast_like(1.0 / total[i], k)
                    for c in range(n_classes):
                        yr = y[o, c, i0:i1]
                        for i in range(k.shape[0]):
                            yr[i] *= k[i]
            lo, hi = claim(queue, n_items)


def _softmax_backward_middle(y, dy, dx, scratch, totals, queue, log):
    """The gradient of :func:`_softmax_forward_middle` from its output ``y``.

    softmax: ``dx = y * (dy - sum_c(dy * y))``; log-softmax:
    ``dx = dy - exp(y) * sum_c(dy)``. Arguments as in the forward.
    """
    n_outer, n_classes, n_inner = y.shape
    width, n_blocks, n_items = _middle_blocks(n_outer, n_inner, scratch)
    for w in prange(queue[WORKERS]):
        lo, hi = claim(queue, n_items)
        while lo < hi:
            for item in range(lo, hi):
                o, i0, i1 = _middle_item(item, n_blocks, width, n_inner)
                d, total = scratch[w, 1, : i1 - i0], totals[w, 0, : i1 - i0]
                _middle_dot(dy[o], dy[o, :0] if log else y[o], i0, i1, total)
                for i in range(d.shape[0]):
                    d[i] = cast_like(total[i], d)
                for c in range(n_classes):
                    yr, gr, out = y[o, c, i0:i1], dy[o, c, i0:i1], dx[o, c, i0:i1]
                    if log:
                        for i in range(d.shape[0]):
                            out[i] = gr[i] - vexp_nonpos(yr[i]) * d[i]
                    else:
                        for i in range(d.shape[0]):
                            out[i] = yr[i] * (gr[i] - d[i])
            lo, hi = claim(queue, n_items)


def _cross_entropy_index_middle(x, target, weight, ignore_index, eps, scale, z_scale, loss, lse, grad, scratch, totals, queue):
    """Fused cross-entropy over the middle axis: logits ``x`` (O, C, I), class indices ``target`` (O, I).

    The loss of :func:`.cpu_rows._cross_entropy_index` for every position
    ``(o, i)``, written to ``loss`` (O, I), the log-sum-exp to ``lse`` (O, I)
    if it has elements, and, when ``grad`` has rows, the gradient (O, C, I),
    laid out like ``x`` (``grad`` may be ``x``). Blocks of W positions as in
    :func:`_softmax_forward_middle`; scratch ``(workers, 6, W)``: maxima,
    partial sums, per position the factor of ``exp(x - m)``, the factor of
    ``w_c`` and the one-hot term of the gradient, and the target logits;
    totals ``(workers, 2, W)`` float64: ``s`` and ``sum_c w_c (m - x_c)``.
    """
    n_outer, n_classes, n_inner = x.shape
    has_w = weight.shape[0] > 0
    want_grad = grad.shape[0] > 0
    want_lse = lse.shape[0] > 0
    w_sum = dot(weight, weight[:0]) if has_w else float(n_classes)
    width, n_blocks, n_items = _middle_blocks(n_outer, n_inner, scratch)
    for w in prange(queue[WORKERS]):
        lo, hi = claim(queue, n_items)
        while lo < hi:
            for item in range(lo, hi):
                o, i0, i1 = _middle_item(item, n_blocks, width, n_inner)
                m, part = scratch[w, 0, : i1 - i0], scratch[w, 1, : i1 - i0]
                k_exp, k_w, k_hot = scratch[w, 2, : i1 - i0], scratch[w, 3, : i1 - i0], scratch[w, 4, : i1 - i0]
                x_t = scratch[w, 5, : i1 - i0]
                s, sum_wd = totals[w, 0, : i1 - i0], totals[w, 1, : i1 - i0]
                xs = x[o]
                _middle_max(xs, i0, i1, m)
                # everything the loss reads from the logits, before an in-place gradient overwrites them
                sum_wd[:] = 0.0
                if eps > 0.0:
                    for c in range(n_classes):
                        xr = xs[c, i0:i1]
                        w_c = weight[c] if has_w else 1.0
                        for i in range(sum_wd.shape[0]):
                            sum_wd[i] += w_c * (np.float64(m[i]) - np.float64(xr[i]))
                for i in range(m.shape[0]):
                    t = target[o, i0 + i]
                    x_t[i] = xs[0 if t == ignore_index else t, i0 + i]
                _middle_exp_sum(xs, i0, i1, m, grad[o] if want_grad else xs[:0], part, s)
                for i in range(m.shape[0]):
                    t = target[o, i0 + i]
                    log_s = math.log(s[i])
                    if want_lse:
                        lse[o, i0 + i] = m[i] + log_s
                    if t == ignore_index:
                        loss[o, i0 + i] = 0.0
                        k_exp[i] = 0
                        k_w[i] = 0
                        continue
                    w_t = weight[t] if has_w else 1.0
                    loss[o, i0 + i] = ce_index_loss(m[i], log_s, x_t[i], w_t, sum_wd[i], w_sum, eps, n_classes)
                    ke, kw, kh = ce_index_grad_coeffs(s[i], w_t, w_sum, eps, n_classes, scale)
                    if z_scale != 0.0:
                        ke += 2.0 * z_scale * (m[i] + log_s) / s[i]
                    k_exp[i] = cast_like(ke, k_exp)
                    k_w[i] = cast_like(kw, k_w)
                    k_hot[i] = cast_like(kh, k_hot)
                if not want_grad:
                    continue
                g = grad[o]
                for c in range(n_classes):
                    gr = g[c, i0:i1]
                    w_c = weight[c] if has_w else cast_like(1.0, weight)
                    for i in range(gr.shape[0]):
                        gr[i] = gr[i] * k_exp[i] - k_w[i] * w_c
                for i in range(m.shape[0]):
                    t = target[o, i0 + i]
                    if t == ignore_index:
                        # 0 exactly, even where a logit is NaN; NaN where torch's log-softmax is
                        fill = math.nan if s[i] != s[i] else 0.0
                        for c in range(n_classes):
                            g[c, i0 + i] = fill
                    else:
                        g[t, i0 + i] -= k_hot[i]
            lo, hi = claim(queue, n_items)


def _cross_entropy_prob_middle(x, q, weight, eps, scale, z_scale, loss, lse, grad, scratch, totals, queue):
    """Fused cross-entropy over the middle axis with class probabilities: ``x`` and ``q`` (O, C, I).

    The loss of :func:`.cpu_rows._cross_entropy_prob` for every position
    ``(o, i)``, written to ``loss`` (O, I), the log-sum-exp to ``lse`` if it
    has elements, and, when ``grad`` has rows, the gradient (O, C, I), laid
    out like ``x`` (``grad`` may be ``x``): with
    ``a_c = w_c * ((1 - eps) * q_c + eps / C)`` and ``A = sum_c a_c``,
    ``loss = sum_c a_c * (m - x_c) + A * log(s)`` and
    ``d loss / d x_c = A * exp(x_c - m) / s - a_c``. Scratch ``(workers, 3, W)``:
    maxima, partial sums, the factor ``A * scale / s``; totals
    ``(workers, 3, W)`` float64: ``s``, ``A`` and ``sum_c a_c * (m - x_c)``.
    """
    n_outer, n_classes, n_inner = x.shape
    has_w = weight.shape[0] > 0
    want_grad = grad.shape[0] > 0
    want_lse = lse.shape[0] > 0
    keep = 1.0 - eps
    spread = eps / n_classes
    k_keep = cast_like(keep * scale, x)
    k_spread = cast_like(spread * scale, x)
    width, n_blocks, n_items = _middle_blocks(n_outer, n_inner, scratch)
    for w in prange(queue[WORKERS]):
        lo, hi = claim(queue, n_items)
        while lo < hi:
            for item in range(lo, hi):
                o, i0, i1 = _middle_item(item, n_blocks, width, n_inner)
                m, part, k_exp = scratch[w, 0, : i1 - i0], scratch[w, 1, : i1 - i0], scratch[w, 2, : i1 - i0]
                s, a_sum, ad_sum = totals[w, 0, : i1 - i0], totals[w, 1, : i1 - i0], totals[w, 2, : i1 - i0]
                xs, qs = x[o], q[o]
                _middle_max(xs, i0, i1, m)
                a_sum[:] = 0.0
                ad_sum[:] = 0.0
                for c in range(n_classes):
                    xr, qr = xs[c, i0:i1], qs[c, i0:i1]
                    w_c = np.float64(weight[c]) if has_w else 1.0
                    for i in range(a_sum.shape[0]):
                        a = w_c * (keep * np.float64(qr[i]) + spread)
                        a_sum[i] += a
                        ad_sum[i] += a * (np.float64(m[i]) - np.float64(xr[i]))
                _middle_exp_sum(xs, i0, i1, m, grad[o] if want_grad else xs[:0], part, s)
                for i in range(m.shape[0]):
                    log_s = math.log(s[i])
                    loss[o, i0 + i] = ad_sum[i] + a_sum[i] * log_s
                    if want_lse:
                        lse[o, i0 + i] = m[i] + log_s
                    ke = a_sum[i] * scale / s[i]
                    if z_scale != 0.0:
                        ke += 2.0 * z_scale * (m[i] + log_s) / s[i]
                    k_exp[i] = cast_like(ke, k_exp)
                if not want_grad:
                    continue
                for c in range(n_classes):
                    gr, qr = grad[o, c, i0:i1], qs[c, i0:i1]
                    w_c = weight[c] if has_w else cast_like(1.0, weight)
                    for i in range(gr.shape[0]):
                        gr[i] = gr[i] * k_exp[i] - w_c * (k_keep * qr[i] + k_spread)
            lo, hi = claim(queue, n_items)


softmax_forward_middle = twins(_softmax_forward_middle)
softmax_backward_middle = twins(_softmax_backward_middle)
cross_entropy_index_middle = twins(_cross_entropy_index_middle)
cross_entropy_prob_middle = twins(_cross_entropy_prob_middle)
