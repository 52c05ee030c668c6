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

The softmax kernels and the book's cross-entropy (:func:`_cross_entropy_book`:
no class weight, a reduced loss) write the middle-axis kernels' arithmetic
out for one block of all positions, in the same order and dtypes, without
their work queue, scratch layout and unused branches: the same bits from
half the compiled code, which is what counts when a training step has left
the caches cold. :func:`_cross_entropy_small` (weights aside, the other
options) calls the general kernel.
"""

import math
from functools import partial

import numpy as np
from numba import from_dtype, njit, types

from .cpu_common import STEP, WORKERS
from .cpu_middle import (
    _store_shifted_middle,
    cross_entropy_index_middle,
)
from .cpu_rows import ce_index_grad_coeffs, ce_index_loss, check_targets
from .exp import vexp_nonpos
from .intrinsics import maxnum
from .jit import OPTIONS, cast_like, inline, renamed
from .pointers import rows_at, strided_rows_at, vector_at

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
def _work(x, scratch_rows):
    """The middle-axis kernels' scratch, totals and work queue for one worker and one block of all R positions."""
    n_rows = x.shape[0]
    queue = np.zeros(3, np.int64)
    queue[STEP] = 1
    queue[WORKERS] = 1
    return np.empty((1, scratch_rows, n_rows), x.dtype), np.empty((1, 2, n_rows), np.float64), queue


@inline
def _rows(t, out):
    """``out`` (R, C) from ``t`` (1, C, R)."""
    for i in range(out.shape[0]):
        for c in range(out.shape[1]):
            out[i, c] = t[0, c, i]


def _cross_entropy_small(x, target, ignore_index, eps, mean, loss, grad):
    """The plain fused cross-entropy (no class weights) on rows ``x`` (R, C), with its target check.

    Checks the class indices first (:func:`.cpu_rows.check_targets`) and
    returns ``(position of the first bad target, -1 if none; total kept
    weight)`` before reading a logit when one is bad. Then the per-row loss
    of :func:`.cpu_middle._cross_entropy_index_middle` into ``loss`` (R,)
    and, when ``grad`` (R, C) has rows, the gradient scaled for the
    reduction: ``1 / total`` for a mean (NaN when the total is 0, as torch's
    0/0), 1 otherwise.
    """
    n_rows, n_classes = x.shape
    no_weight = np.empty(0, x.dtype)
    bad, denom, _ = check_targets(target, n_classes, ignore_index, np.empty(0, np.float64))
    if bad >= 0:
        return bad, denom
    scale = 1.0
    if mean:
        scale = 1.0 / denom if denom else np.nan
    gt = np.empty((1 if grad.shape[0] > 0 else 0, n_classes, n_rows), x.dtype)
    _cross_entropy_middle(
        _columns(x), target.reshape((1, n_rows)), no_weight, ignore_index, eps, scale, 0.0,
        loss.reshape((1, n_rows)), np.empty((0, n_rows), np.float64), gt, *_work(x, 6),
    )
    if grad.shape[0] > 0:
        _rows(gt, grad)
    return -1, denom


@inline
def _transpose_max(x, xt, m):
    """``xt`` (C, R) the transpose of the rows ``x`` (R, C), and ``m`` (R,) each row's max (NaN skipped), as the middle-axis kernels take it."""
    n_rows, n_classes = x.shape
    for i in range(n_rows):
        for c in range(n_classes):
            xt[c, i] = x[i, c]
    for i in range(n_rows):
        m[i] = xt[0, i]
    for c in range(1, n_classes):
        for i in range(n_rows):
            m[i] = maxnum(m[i], xt[c, i])


#: losses summed per block of this many, in 8 interleaved partial sums
_SUM_BLOCK = 128


def _total(a):
    """The sum of a 1-D float64 array, in a fixed order that does not depend on how it was computed.

    Blocks of :data:`_SUM_BLOCK` elements are summed in 8 interleaved partial
    sums, and the block sums pairwise: an error bound of about
    ``(16 + log2(n / 128)) * eps`` relative to the sum of magnitudes, where
    one running sum has ``n * eps``. Every CPU path reduces its per-element
    losses with this function (:func:`_cross_entropy_book` inside
    its kernel call, the others through :func:`fastsoftmax.backends.cpu.total`),
    so a loss has the same bits whichever path computed it.
    """
    n = a.shape[0]
    n_blocks = (n + _SUM_BLOCK - 1) // _SUM_BLOCK
    sums = np.zeros(max(n_blocks, 1))
    lanes = np.empty(8)
    for b in range(n_blocks):
        start = b * _SUM_BLOCK
        stop = min(n, start + _SUM_BLOCK)
        lanes[:] = 0.0
        for i in range(start, stop):
            lanes[(i - start) & 7] += a[i]
        sums[b] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
    while n_blocks > 1:
        half = (n_blocks + 1) // 2
        for i in range(n_blocks // 2):
            sums[i] = sums[2 * i] + sums[2 * i + 1]
        if n_blocks % 2:
            sums[half - 1] = sums[n_blocks - 1]
        n_blocks = half
    return sums[0]


def _cross_entropy_book(x, target, ignore_index, eps, mean, grad):
    """The book's cross-entropy in one call: ``(first bad target or -1, loss)``, the gradient into ``grad``.

    Rows ``x`` (R, C) of at most 16 classes, no class weight: checks the
    targets (:func:`.cpu_rows.check_targets`, before any logit is read),
    then computes the per-row losses and, when ``grad`` has rows, the
    gradient scaled for the reduction (``1 / total kept`` for a ``mean``,
    NaN when that is 0, as torch's 0/0), and returns the loss summed
    (:func:`_total`) and, for a ``mean``, divided. The per-element
    arithmetic is that of :func:`.cpu_middle._cross_entropy_index_middle`
    with no class weight, log-sum-exp or z-loss, in the same order and
    dtypes, on one block of all R positions (so the same bits as every other
    path), without the general kernel's branches, work queue and scratch
    layout: the compiled code is a fraction of the size, which is what
    counts with caches as cold as a training step leaves them.
    """
    n_rows, n_classes = x.shape
    bad, denom, _ = check_targets(target, n_classes, ignore_index, np.empty(0, np.float64))
    if bad >= 0:
        return bad, 0.0
    scale = 1.0
    if mean:
        scale = 1.0 / denom if denom else np.nan
    want_grad = grad.shape[0] > 0
    w_sum = float(n_classes)
    one = cast_like(1.0, x)
    # x-dtype rows: the logits and the exponentials transposed (C, R each), then m, part, k_exp, k_w, k_hot, x_t
    work = np.empty((2 * n_classes + 6, n_rows), x.dtype)
    xt, gt = work[:n_classes], work[n_classes : 2 * n_classes]
    m, part, k_exp = work[2 * n_classes], work[2 * n_classes + 1], work[2 * n_classes + 2]
    k_w, k_hot, x_t = work[2 * n_classes + 3], work[2 * n_classes + 4], work[2 * n_classes + 5]
    sums = np.empty((3, n_rows))  # float64: s, sum_c (m - x_c), the per-row losses
    s, sum_wd, loss = sums[0], sums[1], sums[2]
    _transpose_max(x, xt, m)
    sum_wd[:] = 0.0
    if eps > 0.0:
        for c in range(n_classes):
            for i in range(n_rows):
                sum_wd[i] += 1.0 * (np.float64(m[i]) - np.float64(xt[c, i]))
    for i in range(n_rows):
        t = target[i]
        x_t[i] = xt[0 if t == ignore_index else t, i]
    # C <= 16: one block of partial sums (cpu_middle._MIDDLE_BLOCK), added to a float64 0
    s[:] = 0.0
    part[:] = 0
    for c in range(n_classes):
        for i in range(n_rows):
            e = vexp_nonpos(xt[c, i] - m[i])
            gt[c, i] = e
            part[i] += e
    for i in range(n_rows):
        s[i] += part[i]
    for i in range(n_rows):
        t = target[i]
        log_s = math.log(s[i])
        if t == ignore_index:
            loss[i] = 0.0
            k_exp[i] = 0
            k_w[i] = 0
            continue
        loss[i] = ce_index_loss(m[i], log_s, x_t[i], 1.0, sum_wd[i], w_sum, eps, n_classes)
        ke, kw, kh = ce_index_grad_coeffs(s[i], 1.0, w_sum, eps, n_classes, scale)
        k_exp[i] = cast_like(ke, k_exp)
        k_w[i] = cast_like(kw, k_w)
        k_hot[i] = cast_like(kh, k_hot)
    if want_grad:
        for c in range(n_classes):
            for i in range(n_rows):
                gt[c, i] = gt[c, i] * k_exp[i] - k_w[i] * one
        for i in range(n_rows):
            t = target[i]
            if t == ignore_index:
                fill = math.nan if s[i] != s[i] else 0.0
                for c in range(n_classes):
                    gt[c, i] = fill
            else:
                gt[t, i] -= k_hot[i]
        for i in range(n_rows):
            for c in range(n_classes):
                grad[i, c] = gt[c, i]
    value = total(loss)
    if mean:
        value = value / denom if denom else np.nan
    return -1, value


def _softmax_forward_small(x, y, log):
    """``y = softmax(x)`` (or ``log_softmax``) over the rows of ``(R, C)`` arrays in one serial call.

    The per-element arithmetic of :func:`.cpu_middle._softmax_forward_middle`
    on one block of all R positions, in the same order and dtypes (so the
    same bits), without its work queue and scratch layout.
    """
    n_rows, n_classes = x.shape
    work = np.empty((2 * n_classes + 2, n_rows), x.dtype)
    xt, yt = work[:n_classes], work[n_classes : 2 * n_classes]
    m, k = work[2 * n_classes], work[2 * n_classes + 1]
    total = np.zeros(n_rows)
    _transpose_max(x, xt, m)
    # C <= 16: one block of partial sums (cpu_middle._MIDDLE_BLOCK), added to a float64 0
    k[:] = 0
    for c in range(n_classes):
        for i in range(n_rows):
            e = vexp_nonpos(xt[c, i] - m[i])
            if not log:
                yt[c, i] = e
            k[i] += e
    for i in range(n_rows):
        total[i] += k[i]
    if log:
        for i in range(n_rows):
            k[i] = cast_like(math.log(total[i]), k)
        for c in range(n_classes):
            _store_shifted_middle(xt[c], yt[c], m, k)
    else:
        for i in range(n_rows):
            k[i] = cast_like(1.0 / total[i], k)
        for c in range(n_classes):
            for i in range(n_rows):
                yt[c, i] *= k[i]
    for i in range(n_rows):
        for c in range(n_classes):
            y[i, c] = yt[c, i]


def _softmax_backward_small(y, dy, dx, log):
    """The gradient of :func:`_softmax_forward_small` from its output ``y``, rows ``(R, C)``.

    The per-element arithmetic of :func:`.cpu_middle._softmax_backward_middle`, as the forward.
    """
    n_rows, n_classes = y.shape
    work = np.empty((3 * n_classes + 1, n_rows), y.dtype)
    yt, dyt, dxt = work[:n_classes], work[n_classes : 2 * n_classes], work[2 * n_classes : 3 * n_classes]
    d = work[3 * n_classes]
    total = np.zeros(n_rows)
    for i in range(n_rows):
        for c in range(n_classes):
            yt[c, i] = y[i, c]
            dyt[c, i] = dy[i, c]
    for c in range(n_classes):
        for i in range(n_rows):
            if log:
                total[i] += np.float64(dyt[c, i])
            else:
                total[i] += np.float64(dyt[c, i]) * np.float64(yt[c, i])
    for i in range(n_rows):
        d[i] = cast_like(total[i], d)
    for c in range(n_classes):
        for i in range(n_rows):
            if log:
                dxt[c, i] = dyt[c, i] - vexp_nonpos(yt[c, i]) * d[i]
            else:
                dxt[c, i] = yt[c, i] * (dyt[c, i] - d[i])
    for i in range(n_rows):
        for c in range(n_classes):
            dx[i, c] = dxt[c, i]


softmax_forward_small = njit(**OPTIONS)(renamed(_softmax_forward_small, "_serial"))
softmax_backward_small = njit(**OPTIONS)(renamed(_softmax_backward_small, "_serial"))
cross_entropy_small = njit(**OPTIONS)(renamed(_cross_entropy_small, "_serial"))
total = njit(**OPTIONS)(renamed(_total, "_serial"))
cross_entropy_book = njit(**OPTIONS)(renamed(_cross_entropy_book, "_serial"))


def _softmax_forward_at(like, x, y, n_rows, n_cols, log):
    """:func:`_softmax_forward_small` on C-contiguous ``(n_rows, n_cols)`` rows at the addresses ``x`` and ``y``."""
    softmax_forward_small(rows_at(x, n_rows, n_cols, like), rows_at(y, n_rows, n_cols, like), log)


def _softmax_backward_at(like, y, dy, dx, n_rows, n_cols, dy_row_stride, dy_col_stride, log):
    """:func:`_softmax_backward_small` on rows at addresses: ``y``, ``dx`` C-contiguous, ``dy`` of the strides given (in elements)."""
    softmax_backward_small(
        rows_at(y, n_rows, n_cols, like),
        strided_rows_at(dy, n_rows, n_cols, dy_row_stride, dy_col_stride, like),
        rows_at(dx, n_rows, n_cols, like),
        log,
    )


def _cross_entropy_book_at(like, x, target, grad, loss, n_rows, n_cols, ignore_index, eps, mean):
    """:func:`_cross_entropy_book` on memory at addresses: returns ``bad`` (-1: all targets valid), stores the loss at ``loss``.

    ``x`` C-contiguous ``(n_rows, n_cols)`` logits, ``target`` ``n_rows``
    contiguous int64, ``grad`` C-contiguous rows like ``x`` or 0 (no
    gradient), ``loss`` one element of ``like``'s type (left as it was when
    a target is bad).
    """
    bad, value = cross_entropy_book(
        rows_at(x, n_rows, n_cols, like),
        vector_at(target, n_rows, np.int64(0)),
        ignore_index,
        eps,
        mean,
        rows_at(grad, n_rows if grad else 0, n_cols, like),
    )
    if bad < 0:
        out = vector_at(loss, 1, like)
        out[0] = cast_like(value, out)
    return bad


softmax_forward_at = njit(**OPTIONS)(renamed(_softmax_forward_at))
softmax_backward_at = njit(**OPTIONS)(renamed(_softmax_backward_at))
cross_entropy_book_at = njit(**OPTIONS)(renamed(_cross_entropy_book_at))


class _Entries(dict):
    """One kernel's compiled entry points by element type: the call without Numba's type dispatch.

    ``entries[dtype](*arguments)`` calls the kernel compiled (or loaded from
    the on-disk cache) for ``signature(numba element type)`` on first use,
    with a value of that type bound as its first argument, ``like`` (the
    kernels of :mod:`.pointers` take it for the element type of the
    addresses they read). ``dtype`` is a NumPy dtype or a torch dtype (by
    its name: this module works without torch). Numba's dispatch works out
    the types of every argument on each call, a few microseconds with cold
    caches at the book's 256 x 10; the entry point only unboxes them, and
    addresses and sizes are integers. **Nothing checks the addresses**:
    callers hold each guarantee :mod:`.pointers` states.
    """

    def __init__(self, kernel, signature):
        super().__init__()
        self.kernel, self.signature = kernel, signature

    def __missing__(self, dtype):
        element = np.dtype(str(dtype).removeprefix("torch."))
        entry = self.kernel.compile(self.signature(from_dtype(element)))
        self[dtype] = entry = partial(entry, element.type(0))
        return entry


_I64 = types.int64

#: ``[dtype](x, y, n_rows, n_cols, log)``: addresses of C-contiguous (n_rows, n_cols) rows
SOFTMAX_FORWARD = _Entries(softmax_forward_at, lambda f: (f, _I64, _I64, _I64, _I64, types.boolean))
#: ``[dtype](y, dy, dx, n_rows, n_cols, dy_row_stride, dy_col_stride, log)``: y, dx C-contiguous, dy of any strides (elements)
SOFTMAX_BACKWARD = _Entries(softmax_backward_at, lambda f: (f,) + (_I64,) * 7 + (types.boolean,))


#: ``[dtype](x, target, grad, loss, n_rows, n_cols, ignore_index, eps, mean) -> bad`` of :func:`cross_entropy_book_at`
CROSS_ENTROPY_BOOK = _Entries(cross_entropy_book_at, lambda f: (f,) + (_I64,) * 7 + (types.float64, types.boolean))
