"""CPU row kernels: softmax, log-softmax and fused cross-entropy over the last axis.

Each works on C-contiguous 2-D arrays ``(R, C)`` with the reduced dimension
last, float32 or float64, and writes into outputs the caller allocated. Rows
are claimed from a work queue (:mod:`.cpu_common`); each kernel comes as
``{True: parallel, False: serial}`` twins (:func:`.jit.twins`). Sums of
exponentials run in SIMD lanes over blocks and add up in float64.
"""

import math

from numba import njit, prange

from . import rowmath
from .cpu_common import (
    BLOCK,
    WORKERS,
    claim,
    dot,
    exp_sum,
    exp_sum_inplace,
    flush,
    gap_sum,
    holds_nan,
    next_row,
    row_max_of,
    target_sums,
)
from .exp import vexp_nonpos
from .intrinsics import lane_sum64, store_fence
from .jit import EXACT, cast_like, exact, inline, twins

ce_index_loss = njit(**EXACT)(rowmath.ce_index_loss)
ce_index_grad_coeffs = njit(**EXACT)(rowmath.ce_index_grad_coeffs)


@exact
def _store_shifted(xr, yr, m, log_s):
    """``yr = (xr - m) - log_s``, in that order."""
    for j in range(xr.shape[0]):
        yr[j] = (xr[j] - m) - log_s



@inline
def _scratch_parts(scratch, w):
    """Worker ``w``'s stream row (empty when rows are built in place) and its block of :data:`BLOCK`."""
    n_stream = scratch.shape[1] - BLOCK
    return scratch[w, :n_stream], scratch[w, n_stream:]


def _softmax_forward(x, y, scratch, queue):
    """``y = exp(x - m) / sum(exp(x - m))`` per row, ``m`` the row max.

    Rows are claimed from ``queue`` (see :mod:`.cpu_common`). ``scratch``
    has a row per worker: a stream row, then a block of :data:`BLOCK`. When
    the stream row has columns (the output is larger than the cache), each
    row is built there and written to ``y`` with non-temporal stores, which
    saves reading ``y`` into the cache before writing it, once the worker
    has the max of its next row (:func:`flush`); one fence per worker then
    makes those stores visible. A NaN anywhere in a row makes the whole row
    NaN (through the sum); a row of all ``-inf`` gives NaN, as in PyTorch.
    """
    for w in prange(queue[WORKERS]):
        row, blk = _scratch_parts(scratch, w)
        stream = row.shape[0] > 0
        pending, pending_inv = -1, cast_like(1.0, x)  # the row whose exps `row` holds, not yet in y
        lo, hi = claim(queue, x.shape[0])
        while lo < hi:
            for i in range(lo, hi):
                xr = x[i]
                buf = row if stream else y[i]
                m = row_max_of(xr)
                if stream:
                    pending = flush(y, buf, pending, pending_inv)
                inv = cast_like(1.0 / exp_sum(xr, m, buf, blk, next_row(x, i)), xr)
                if stream:
                    pending, pending_inv = i, inv
                else:
                    for j in range(buf.shape[0]):
                        buf[j] *= inv
            lo, hi = claim(queue, x.shape[0])
        if stream:
            flush(y, row, pending, pending_inv)
            store_fence()


def _softmax_backward(y, dy, dx, queue, log):
    """The gradient from the forward output ``y``, per row.

    softmax: ``dx = y * (dy - sum(dy * y))``; log-softmax (``log``):
    ``dx = dy - exp(y) * sum(dy)``. ``dx`` may be ``dy`` (in place).
    """
    for w in prange(queue[WORKERS]):
        lo, hi = claim(queue, y.shape[0])
        while lo < hi:
            for i in range(lo, hi):
                yr, gr, out = y[i], dy[i], dx[i]
                d = cast_like(dot(gr, gr[:0] if log else yr), yr)
                if log:
                    for j in range(yr.shape[0]):
                        out[j] = gr[j] - vexp_nonpos(yr[j]) * d
                else:
                    for j in range(yr.shape[0]):
                        out[j] = yr[j] * (gr[j] - d)
            lo, hi = claim(queue, y.shape[0])


def _log_softmax_forward(x, y, scratch, queue):
    """``y = (x - m) - log(sum(exp(x - m)))`` per row (``scratch`` as in :func:`_softmax_forward`)."""
    one = cast_like(1.0, x)
    for w in prange(queue[WORKERS]):
        row, blk = _scratch_parts(scratch, w)
        stream = row.shape[0] > 0
        pending = -1
        lo, hi = claim(queue, x.shape[0])
        while lo < hi:
            for i in range(lo, hi):
                xr = x[i]
                buf = row if stream else y[i]
                m = row_max_of(xr)
                if stream:
                    pending = flush(y, buf, pending, one)
                log_s = math.log(exp_sum(xr, m, blk[:0], blk, next_row(x, i)))
                _store_shifted(xr, buf, m, cast_like(log_s, xr))
                if stream:
                    pending = i
            lo, hi = claim(queue, x.shape[0])
        if stream:
            flush(y, row, pending, one)
            store_fence()


@inline
def _lse_of_row(xr, m, buf, blk, inplace, ahead):
    """``(s, log s)`` of a row, its exponentials left in ``buf`` (or in ``xr`` itself when ``inplace``)."""
    s = exp_sum_inplace(xr, m, ahead) if inplace else exp_sum(xr, m, buf, blk, ahead)
    return s, math.log(s)


@inline
def _gradient_row(buf, k_exp, k_w, weight):
    """``buf = buf * k_exp - k_w * w`` (``w`` empty: ones): the gradient from the exponentials ``buf``."""
    ke = cast_like(k_exp, buf)
    kw = cast_like(k_w, buf)
    if weight.shape[0] > 0:
        for j in range(buf.shape[0]):
            buf[j] = buf[j] * ke - kw * weight[j]
    else:
        for j in range(buf.shape[0]):
            buf[j] = buf[j] * ke - kw


def _cross_entropy_index(x, target, weight, ignore_index, eps, scale, z_scale, loss, lse, grad, scratch, queue):
    """Fused cross-entropy with class-index targets: loss, log-sum-exp and gradient in one sweep.

    ``x`` (R, C) logits; ``target`` (R,) int64, already checked to lie in
    ``[0, C)`` or equal ``ignore_index``; ``weight`` (C,) class weights, or
    shape (0,) for none; ``eps`` the label smoothing; ``scale`` the factor the
    reduction puts on every row's gradient (``1 / total weight`` for a mean;
    NaN when that total is 0, as torch's gradient is then NaN); ``z_scale``
    the factor of the z-loss ``lse**2`` in the reduced loss (0: none).

    Writes ``loss`` (R,), float64, the unreduced cross-entropy (without the
    z-loss, whose reduction differs: the host adds it from ``lse``); ``lse``
    (R,) float64 if it has R elements; and, when ``grad`` has R rows,
    ``grad`` = d(reduced loss)/dx for a unit grad_output. ``grad`` may be
    ``x`` itself: every value of the row the loss needs is read before its
    exponentials overwrite it. An ignored row gets loss 0 and gradient 0, or
    a NaN gradient if the row holds NaN or ``+inf``, or only ``-inf``: its
    log-softmax is NaN, and torch multiplies that by the zero weight.
    """
    R, C = x.shape
    has_w = weight.shape[0] > 0
    want_grad = grad.shape[0] > 0
    want_lse = lse.shape[0] > 0
    inplace = want_grad and grad.ctypes.data == x.ctypes.data
    w_sum = lane_sum64(weight) if has_w else float(C)
    one = cast_like(1.0, x)
    for w in prange(queue[WORKERS]):
        row, blk = _scratch_parts(scratch, w)
        stream = want_grad and row.shape[0] > 0 and not inplace
        pending = -1
        lo, hi = claim(queue, R)
        while lo < hi:
            for i in range(lo, hi):
                t = target[i]
                ignored = t == ignore_index
                xr = x[i]
                m = row_max_of(xr)
                if ignored and not want_lse:
                    loss[i] = 0.0
                    if want_grad:
                        grad[i, :] = math.nan if (abs(m) == math.inf or holds_nan(xr)) else 0.0
                    continue
                buf = row if stream else (grad[i] if want_grad else blk[:0])
                if stream:
                    pending = flush(grad, buf, pending, one)
                tt = 0 if ignored else t
                x_t = xr[tt]
                sum_wd = gap_sum(xr, m, weight, blk) if eps > 0.0 and not ignored else 0.0
                s, log_s = _lse_of_row(xr, m, buf, blk, inplace, next_row(x, i))
                if want_lse:
                    lse[i] = m + log_s
                if ignored:
                    loss[i] = 0.0
                    if want_grad:
                        buf[:] = math.nan if s != s else 0.0
                else:
                    w_t = weight[t] if has_w else 1.0
                    loss[i] = ce_index_loss(m, log_s, x_t, w_t, sum_wd, w_sum, eps, C)
                    if want_grad:
                        k_exp, k_w, k_hot = ce_index_grad_coeffs(s, w_t, w_sum, eps, C, scale)
                        if z_scale != 0.0:
                            k_exp += 2.0 * z_scale * (m + log_s) / s
                        _gradient_row(buf, k_exp, k_w, weight)
                        buf[t] -= cast_like(k_hot, buf)
                if stream:
                    pending = i
            lo, hi = claim(queue, R)
        if stream:
            flush(grad, row, pending, one)
            store_fence()


def _cross_entropy_prob(x, q, weight, eps, scale, z_scale, loss, lse, grad, scratch, queue):
    """Fused cross-entropy with class-probability targets ``q`` (R, C).

    With ``a_j = w_j * ((1 - eps) * q_j + eps / C)`` and ``A = sum_j a_j``:
    ``loss = sum_j a_j * (lse - x_j)`` and ``d loss / d x_j = A * p_j - a_j``.
    Other arguments as in :func:`_cross_entropy_index` (``grad`` may be ``x``).
    """
    R, C = x.shape
    has_w = weight.shape[0] > 0
    want_grad = grad.shape[0] > 0
    want_lse = lse.shape[0] > 0
    inplace = want_grad and grad.ctypes.data == x.ctypes.data
    keep = 1.0 - eps
    spread = eps / C
    one = cast_like(1.0, x)
    for w in prange(queue[WORKERS]):
        row, blk = _scratch_parts(scratch, w)
        stream = want_grad and row.shape[0] > 0 and not inplace
        pending = -1
        lo, hi = claim(queue, R)
        while lo < hi:
            for i in range(lo, hi):
                xr = x[i]
                qr = q[i]
                buf = row if stream else (grad[i] if want_grad else blk[:0])
                m = row_max_of(xr)
                if stream:
                    pending = flush(grad, buf, pending, one)
                a_sum, sum_ad = target_sums(xr, m, qr, weight, keep, spread, blk)
                s, log_s = _lse_of_row(xr, m, buf, blk, inplace, next_row(x, i))
                loss[i] = sum_ad + a_sum * log_s
                if want_lse:
                    lse[i] = m + log_s
                if want_grad:
                    k_exp = a_sum * scale / s
                    if z_scale != 0.0:
                        k_exp += 2.0 * z_scale * (m + log_s) / s
                    ke = cast_like(k_exp, xr)
                    k_keep = cast_like(keep * scale, xr)
                    k_spread = cast_like(spread * scale, xr)
                    if has_w:
                        for j in range(C):
                            buf[j] = buf[j] * ke - weight[j] * (k_keep * qr[j] + k_spread)
                    else:
                        for j in range(C):
                            buf[j] = buf[j] * ke - (k_keep * qr[j] + k_spread)
                    if stream:
                        pending = i
            lo, hi = claim(queue, R)
        if stream:
            flush(grad, row, pending, one)
            store_fence()


def _scale_rows(src, factor, out, queue):
    """``out[i, :] = src[i, :] * factor[i]``: the cross-entropy backward (``out`` may be ``src``)."""
    for w in prange(queue[WORKERS]):
        lo, hi = claim(queue, src.shape[0])
        while lo < hi:
            for i in range(lo, hi):
                f = cast_like(factor[i], src)
                sr = src[i]
                orow = out[i]
                for j in range(sr.shape[0]):
                    orow[j] = sr[j] * f
            lo, hi = claim(queue, src.shape[0])


softmax_forward = twins(_softmax_forward)
softmax_backward = twins(_softmax_backward)
log_softmax_forward = twins(_log_softmax_forward)
cross_entropy_index = twins(_cross_entropy_index)
cross_entropy_prob = twins(_cross_entropy_prob)
scale_rows = twins(_scale_rows)


@njit(cache=True, nogil=True)
def check_targets(target, n_classes, ignore_index, weight):
    """Validate class-index targets before any kernel reads ``x[i, target[i]]``.

    Numba does no bounds checking, so an unchecked target is an out-of-bounds
    read. Returns ``(position of the first bad target or -1, total weight of
    the non-ignored targets, number of non-ignored targets)``.
    """
    has_w = weight.shape[0] > 0
    total = 0.0
    count = 0
    for i in range(target.shape[0]):  # sequential: the denominator is the same however the rows are batched
        t = target[i]
        if t == ignore_index:
            continue
        if t < 0 or t >= n_classes:
            return i, total, count
        total += weight[t] if has_w else 1.0
        count += 1
    return -1, total, count
