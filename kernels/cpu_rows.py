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
    WORKERS,
    claim,
    dot,
    exp_sum,
    flush,
    gap_dot,
    next_row,
    row_max_of,
    target_sums,
)
from .exp import vexp_nonpos
from .intrinsics import store_fence
from .jit import EXACT, cast_like, exact, inline, twins

ce_index_loss = njit(**EXACT)(rowmath.ce_index_loss)
ce_index_grad_coeffs = njit(**EXACT)(rowmath.ce_index_grad_coeffs)


@exact
def _store_shifted(xr, yr, m, log_s):
    """``yr = (xr - m) - log_s``, in that order."""
    for j in range(xr.shape[0]):
        yr[j] = (xr[j] - m) - log_s



def _softmax_forward(x, y, scratch, queue):
    """``y = exp(x - m) / sum(exp(x - m))`` per row, ``m`` the row max.

    Rows are claimed from ``queue`` (see the module docstring). ``scratch``
    has a row per worker; when it has columns (the output is larger than the
    cache), each row is built in its worker's scratch row and written to ``y``
    with non-temporal stores, which saves reading ``y`` into the cache before
    writing it, once the worker has the max of its next row (:func:`flush`);
    one fence per worker then makes those stores visible. A NaN anywhere in a row
    makes the whole row NaN (through the sum); a row of all ``-inf`` gives NaN,
    as in PyTorch.
    """
    stream = scratch.shape[1] > 0
    for w in prange(queue[WORKERS]):
        pending, pending_inv = -1, cast_like(1.0, x)  # the row whose exps scratch[w] holds, not yet in y
        lo, hi = claim(queue, x.shape[0])
        while lo < hi:
            for i in range(lo, hi):
                xr = x[i]
                buf = scratch[w] if stream else y[i]
                m = row_max_of(xr)
                if stream:
                    pending = flush(y, buf, pending, pending_inv)
                inv = cast_like(1.0 / exp_sum(xr, m, buf, next_row(x, i)), xr)
                if stream:
                    pending, pending_inv = i, inv
                else:
                    for j in range(buf.shape[0]):
                        buf[j] *= inv
            lo, hi = claim(queue, x.shape[0])
        if stream:
            flush(y, scratch[w], pending, pending_inv)
            store_fence()


def _softmax_backward(y, dy, dx, queue, log):
    """The gradient from the forward output ``y``, per row.

    softmax: ``dx = y * (dy - sum(dy * y))``; log-softmax (``log``):
    ``dx = dy - exp(y) * sum(dy)``.
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
    stream = scratch.shape[1] > 0
    no_store = x[0, :0]
    one = cast_like(1.0, x)
    for w in prange(queue[WORKERS]):
        pending = -1
        lo, hi = claim(queue, x.shape[0])
        while lo < hi:
            for i in range(lo, hi):
                xr = x[i]
                buf = scratch[w] if stream else y[i]
                m = row_max_of(xr)
                if stream:
                    pending = flush(y, buf, pending, one)
                _store_shifted(xr, buf, m, cast_like(math.log(exp_sum(xr, m, no_store, next_row(x, i))), xr))
                if stream:
                    pending = i
            lo, hi = claim(queue, x.shape[0])
        if stream:
            flush(y, scratch[w], pending, one)
            store_fence()


@inline
def _grad_row(scratch, grad, w, i):
    """Where worker ``w`` builds row ``i``'s gradient: its scratch row (streamed out after), the gradient row, or an empty row when no gradient is wanted.

    The empty row is cut from ``scratch``, not from the logits: were it, LLVM
    would take the stores into the row as possibly writing the logits, and
    leave the exp loop of the serial twin scalar (4x slower).
    """
    if grad.shape[0] == 0:
        return scratch[w, :0]
    return scratch[w] if scratch.shape[1] > 0 else grad[i]


def _cross_entropy_index(x, target, weight, ignore_index, eps, scale, loss, grad, scratch, queue):
    """Fused cross-entropy with class-index targets: loss and gradient in one sweep.

    ``x`` (R, C) logits; ``target`` (R,) int64, already checked to lie in
    ``[0, C)`` or equal ``ignore_index``; ``weight`` (C,) class weights, or
    shape (0,) for none; ``eps`` the label smoothing; ``scale`` the factor the
    reduction puts on every row's gradient (``1 / total weight`` for a mean).
    Writes ``loss`` (R,), float64, unreduced, and, when ``grad`` has R rows,
    ``grad`` = d(reduced loss)/dx (``scratch`` as in :func:`_softmax_forward`).
    Ignored rows get loss 0 and gradient 0.
    """
    R, C = x.shape
    has_w = weight.shape[0] > 0
    want_grad = grad.shape[0] > 0
    w_sum = dot(weight, weight[:0]) if has_w else float(C)
    stream = want_grad and scratch.shape[1] > 0
    one = cast_like(1.0, x)
    for w in prange(queue[WORKERS]):
        pending = -1
        lo, hi = claim(queue, R)
        while lo < hi:
            for i in range(lo, hi):
                t = target[i]
                if t == ignore_index:
                    loss[i] = 0.0
                    if want_grad:
                        grad[i, :] = 0
                    continue
                xr = x[i]
                buf = _grad_row(scratch, grad, w, i)
                m = row_max_of(xr)
                if stream:
                    pending = flush(grad, buf, pending, one)
                s = exp_sum(xr, m, buf, next_row(x, i))
                sum_wd = gap_dot(xr, m, weight) if eps > 0.0 else 0.0
                w_t = weight[t] if has_w else 1.0
                loss[i] = ce_index_loss(m, math.log(s), xr[t], w_t, sum_wd, w_sum, eps, C)
                if want_grad:
                    k_exp, k_w, k_hot = ce_index_grad_coeffs(s, w_t, w_sum, eps, C, scale)
                    ke = cast_like(k_exp, xr)
                    kw = cast_like(k_w, xr)
                    if has_w:
                        for j in range(C):
                            buf[j] = buf[j] * ke - kw * weight[j]
                    else:
                        for j in range(C):
                            buf[j] = buf[j] * ke - kw
                    buf[t] -= cast_like(k_hot, xr)
                    if stream:
                        pending = i
            lo, hi = claim(queue, R)
        if stream:
            flush(grad, scratch[w], pending, one)
            store_fence()


def _cross_entropy_prob(x, q, weight, eps, scale, loss, grad, scratch, queue):
    """Fused cross-entropy with class-probability targets ``q`` (R, C).

    With ``a_j = w_j * ((1 - eps) * q_j + eps / C)`` and ``A = sum_j a_j``:
    ``loss = sum_j a_j * (lse - x_j)`` and ``d loss / d x_j = A * p_j - a_j``.
    Other arguments as in :func:`_cross_entropy_index`.
    """
    R, C = x.shape
    has_w = weight.shape[0] > 0
    want_grad = grad.shape[0] > 0
    keep = 1.0 - eps
    spread = eps / C
    stream = want_grad and scratch.shape[1] > 0
    one = cast_like(1.0, x)
    for w in prange(queue[WORKERS]):
        pending = -1
        lo, hi = claim(queue, R)
        while lo < hi:
            for i in range(lo, hi):
                xr = x[i]
                qr = q[i]
                buf = _grad_row(scratch, grad, w, i)
                m = row_max_of(xr)
                if stream:
                    pending = flush(grad, buf, pending, one)
                s = exp_sum(xr, m, buf, next_row(x, i))
                a_sum, sum_ad = target_sums(xr, m, qr, weight, keep, spread)
                loss[i] = sum_ad + a_sum * math.log(s)
                if want_grad:
                    ke = cast_like(a_sum * scale / s, xr)
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
            flush(grad, scratch[w], pending, one)
            store_fence()


def _scale_rows(src, factor, out, queue):
    """``out[i, :] = src[i, :] * factor[i]``: the cross-entropy backward."""
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
    for i in range(target.shape[0]):
        t = target[i]
        if t == ignore_index:
            continue
        if t < 0 or t >= n_classes:
            return i, total, count
        total += weight[t] if has_w else 1.0
        count += 1
    return -1, total, count
