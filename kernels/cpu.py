"""CPU kernels: Numba ``@njit``, parallel over rows, SIMD along each row.

Every kernel works on a C-contiguous 2-D view ``(R, C)`` with the reduced
dimension last, float32 or float64, and writes into outputs the caller
allocated. Each row is read from memory once: its first pass streams it into
the cache, the passes after it (``C`` floats: 128 KiB at ``C = 32000``) run
from L2. Inner loops are branch-free so LLVM vectorises them; sums are
accumulated in float64 whatever the input dtype.

Each kernel comes as a pair, ``parallel`` over rows and ``serial``: for
small inputs waking the thread pool costs more than the work (see
:data:`config.CPU_PARALLEL_MIN_ELEMENTS` and :func:`pick`).
"""

import math
from types import FunctionType

import numpy as np
from numba import njit, prange

from . import config, rowmath
from ._llvm import maxnum
from .rowmath import cast_like, vexp

_OPTIONS = dict(fastmath=set(config.FASTMATH), cache=True, nogil=True, error_model="numpy")

# Code that must be evaluated as written is compiled without ``reassoc``: with
# it, LLVM turns ``(x - m) - log_s`` into ``x - (m + log_s)``, hoists the sum
# out of the loop and rounds it at the magnitude of ``m`` (an error of 5e-4 at
# logits of -1e4). The flags stay on the instructions after LLVM inlines these.
_EXACT = dict(fastmath=set(config.FASTMATH_EXACT), cache=True, nogil=True, error_model="numpy")

ce_index_loss = njit(**_EXACT)(rowmath.ce_index_loss)
ce_index_grad_coeffs = njit(**_EXACT)(rowmath.ce_index_grad_coeffs)


@njit(**_EXACT)
def _store_shifted(xr, yr, m, log_s):
    """``yr = (xr - m) - log_s``, in that order."""
    for j in range(xr.shape[0]):
        yr[j] = (xr[j] - m) - log_s


def _twins(fn):
    """Compile ``fn`` twice: parallel (``prange`` over rows) and serial.

    The serial twin is a copy of the function under another qualified name,
    so that Numba's on-disk cache keeps the two apart.
    """
    serial = FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    serial.__qualname__ = fn.__qualname__ + "_serial"
    serial.__doc__ = fn.__doc__
    return {True: njit(parallel=True, **_OPTIONS)(fn), False: njit(**_OPTIONS)(serial)}


def pick(kernel, n_elements):
    """The parallel twin of ``kernel`` for large inputs, the serial one for small."""
    return kernel[n_elements >= config.CPU_PARALLEL_MIN_ELEMENTS]


@njit(inline="always")
def _row_max(xr):
    m = xr[0]
    for j in range(1, xr.shape[0]):
        m = maxnum(m, xr[j])
    return m


def _softmax_forward(x, y):
    """``y = exp(x - m) / sum(exp(x - m))`` per row, ``m`` the row max.

    A NaN anywhere in a row makes the whole row NaN (through the sum); a row of
    all ``-inf`` gives NaN, as in PyTorch.
    """
    for i in prange(x.shape[0]):
        xr = x[i]
        yr = y[i]
        m = _row_max(xr)
        s = 0.0
        for j in range(xr.shape[0]):
            e = vexp(xr[j] - m)
            yr[j] = e
            s += e
        inv = cast_like(1.0 / s, yr)
        for j in range(yr.shape[0]):
            yr[j] *= inv


def _softmax_backward(y, dy, dx):
    """``dx = y * (dy - sum(dy * y))`` per row."""
    for i in prange(y.shape[0]):
        yr = y[i]
        gr = dy[i]
        dot = 0.0
        for j in range(yr.shape[0]):
            dot += gr[j] * yr[j]
        d = cast_like(dot, yr)
        out = dx[i]
        for j in range(yr.shape[0]):
            out[j] = yr[j] * (gr[j] - d)


def _log_softmax_forward(x, y):
    """``y = (x - m) - log(sum(exp(x - m)))`` per row."""
    for i in prange(x.shape[0]):
        xr = x[i]
        yr = y[i]
        m = _row_max(xr)
        s = 0.0
        for j in range(xr.shape[0]):
            s += vexp(xr[j] - m)
        _store_shifted(xr, yr, m, cast_like(math.log(s), xr))


def _log_softmax_backward(y, dy, dx):
    """``dx = dy - exp(y) * sum(dy)`` per row."""
    for i in prange(y.shape[0]):
        yr = y[i]
        gr = dy[i]
        total = 0.0
        for j in range(yr.shape[0]):
            total += gr[j]
        t = cast_like(total, yr)
        out = dx[i]
        for j in range(yr.shape[0]):
            out[j] = gr[j] - vexp(yr[j]) * t


def _cross_entropy_index(x, target, weight, ignore_index, eps, scale, loss, grad):
    """Fused cross-entropy with class-index targets: loss and gradient in one sweep.

    ``x`` (R, C) logits; ``target`` (R,) int64, already checked to lie in
    ``[0, C)`` or equal ``ignore_index``; ``weight`` (C,) class weights, or
    shape (0,) for none; ``eps`` the label smoothing; ``scale`` the factor the
    reduction puts on every row's gradient (``1 / total weight`` for a mean).
    Writes ``loss`` (R,), float64, unreduced, and, when ``grad`` has R rows,
    ``grad`` = d(reduced loss)/dx. Ignored rows get loss 0 and gradient 0.
    """
    R, C = x.shape
    has_w = weight.shape[0] > 0
    want_grad = grad.shape[0] > 0
    w_sum = 0.0
    if has_w:
        for j in range(C):
            w_sum += weight[j]
    else:
        w_sum = float(C)
    for i in prange(R):
        t = target[i]
        if t == ignore_index:
            loss[i] = 0.0
            if want_grad:
                grad[i, :] = 0
            continue
        xr = x[i]
        m = _row_max(xr)
        s = 0.0
        if want_grad:
            gr = grad[i]
            for j in range(C):
                e = vexp(xr[j] - m)
                gr[j] = e
                s += e
        else:
            for j in range(C):
                s += vexp(xr[j] - m)
        sum_wd = 0.0
        if eps > 0.0:
            if has_w:
                for j in range(C):
                    sum_wd += weight[j] * (m - xr[j])
            else:
                for j in range(C):
                    sum_wd += m - xr[j]
        w_t = weight[t] if has_w else 1.0
        loss[i] = ce_index_loss(m, math.log(s), xr[t], w_t, sum_wd, w_sum, eps, C)
        if want_grad:
            k_exp, k_w, k_hot = ce_index_grad_coeffs(s, w_t, w_sum, eps, C, scale)
            ke = cast_like(k_exp, xr)
            kw = cast_like(k_w, xr)
            if has_w:
                for j in range(C):
                    gr[j] = gr[j] * ke - kw * weight[j]
            else:
                for j in range(C):
                    gr[j] = gr[j] * ke - kw
            gr[t] -= cast_like(k_hot, xr)


def _cross_entropy_prob(x, q, weight, eps, scale, loss, grad):
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
    for i in prange(R):
        xr = x[i]
        qr = q[i]
        m = _row_max(xr)
        s = 0.0
        if want_grad:
            gr = grad[i]
            for j in range(C):
                e = vexp(xr[j] - m)
                gr[j] = e
                s += e
        else:
            for j in range(C):
                s += vexp(xr[j] - m)
        a_sum = 0.0
        sum_ad = 0.0
        if has_w:
            for j in range(C):
                a = weight[j] * (keep * qr[j] + spread)
                a_sum += a
                sum_ad += a * (m - xr[j])
        else:
            for j in range(C):
                a = keep * qr[j] + spread
                a_sum += a
                sum_ad += a * (m - xr[j])
        loss[i] = sum_ad + a_sum * math.log(s)
        if want_grad:
            ke = cast_like(a_sum * scale / s, xr)
            k_keep = cast_like(keep * scale, xr)
            k_spread = cast_like(spread * scale, xr)
            if has_w:
                for j in range(C):
                    gr[j] = gr[j] * ke - weight[j] * (k_keep * qr[j] + k_spread)
            else:
                for j in range(C):
                    gr[j] = gr[j] * ke - (k_keep * qr[j] + k_spread)


def _scale_rows(src, factor, out):
    """``out[i, :] = src[i, :] * factor[i]``: the cross-entropy backward."""
    for i in prange(src.shape[0]):
        f = cast_like(factor[i], src)
        sr = src[i]
        orow = out[i]
        for j in range(sr.shape[0]):
            orow[j] = sr[j] * f


softmax_forward = _twins(_softmax_forward)
softmax_backward = _twins(_softmax_backward)
log_softmax_forward = _twins(_log_softmax_forward)
log_softmax_backward = _twins(_log_softmax_backward)
cross_entropy_index = _twins(_cross_entropy_index)
cross_entropy_prob = _twins(_cross_entropy_prob)
scale_rows = _twins(_scale_rows)


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
