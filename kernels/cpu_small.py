"""CPU kernels for a few rows of a few classes (the book's 256 x 10): one serial call, transposed inside.

A row kernel takes a row's few exponentials one at a time; the middle-axis
kernels of :mod:`.cpu_middle` vectorise across positions instead. So rows
``(R, C)`` of at most ``config.CPU_SMALL_CLASSES`` classes are transposed to
``(1, C, R)`` and reduced there (the two kernels add a row's terms in the
same order, so the bits do not depend on the path). For small inputs these
wrappers make the transposed copies inside one serial compiled call and
write the results back in rows: no tensor operations around the kernel,
which at this size cost more than the kernel itself. Larger inputs take the
parallel middle-axis kernels on copies made by the host.
"""

import numpy as np
from numba import njit

from .cpu_middle import (
    cross_entropy_index_middle,
    softmax_backward_middle,
    softmax_forward_middle,
)
from .jit import OPTIONS, inline, renamed

_forward_middle = softmax_forward_middle[False]
_backward_middle = softmax_backward_middle[False]
_cross_entropy_middle = cross_entropy_index_middle[False]


@inline
def _columns(x):
    """A copy of ``x`` (R, C) laid out as ``(1, C, R)``."""
    n_rows, n_classes = x.shape
    t = np.empty((1, n_classes, n_rows), x.dtype)
    for i in range(n_rows):
        for c in range(n_classes):
            t[0, c, i] = x[i, c]
    return t


@inline
def _rows(t, out):
    """``out`` (R, C) from ``t`` (1, C, R)."""
    for i in range(out.shape[0]):
        for c in range(out.shape[1]):
            out[i, c] = t[0, c, i]


def _softmax_forward_small(x, y, scratch, totals, queue, log):
    """``y = softmax(x)`` (or ``log_softmax``) over the rows of ``(R, C)`` arrays, through the middle-axis kernel."""
    yt = np.empty((1, x.shape[1], x.shape[0]), y.dtype)
    _forward_middle(_columns(x), yt, scratch, totals, queue, log)
    _rows(yt, y)


def _softmax_backward_small(y, dy, dx, scratch, totals, queue, log):
    """The gradient of :func:`_softmax_forward_small` from its output ``y``, rows ``(R, C)``."""
    dxt = np.empty((1, y.shape[1], y.shape[0]), dx.dtype)
    _backward_middle(_columns(y), _columns(dy), dxt, scratch, totals, queue, log)
    _rows(dxt, dx)


def _cross_entropy_index_small(x, target, weight, ignore_index, eps, scale, z_scale, loss, lse, grad, scratch, totals, queue):
    """:func:`.cpu_middle._cross_entropy_index_middle` on rows ``x`` (R, C), targets and losses ``(R,)``, ``grad`` (R, C) or no rows."""
    n_rows, n_classes = x.shape
    want_grad = grad.shape[0] > 0
    gt = np.empty((1 if want_grad else 0, n_classes, n_rows), x.dtype)
    lse2 = lse.reshape((1, n_rows)) if lse.shape[0] > 0 else lse.reshape((0, n_rows))
    _cross_entropy_middle(
        _columns(x), target.reshape((1, n_rows)), weight, ignore_index, eps, scale, z_scale,
        loss.reshape((1, n_rows)), lse2, gt, scratch, totals, queue,
    )
    if want_grad:
        _rows(gt, grad)


softmax_forward_small = njit(**OPTIONS)(renamed(_softmax_forward_small, "_serial"))
softmax_backward_small = njit(**OPTIONS)(renamed(_softmax_backward_small, "_serial"))
cross_entropy_index_small = njit(**OPTIONS)(renamed(_cross_entropy_index_small, "_serial"))
