"""CPU kernels: Numba ``@njit``, parallel over rows, SIMD along each row.

The row kernels work on a C-contiguous 2-D view ``(R, C)`` with the reduced
dimension last; the middle-axis kernels (at the end) on ``(O, C, I)`` views
reduced over ``C``. All take float32 or float64 and write into outputs the
caller allocated. Each row is read from memory once: its first pass streams it into
the cache, the passes after it (``C`` floats: 128 KiB at ``C = 32000``) run
from L2. Inner loops are branch-free so LLVM vectorises them; sums are
accumulated in float64 whatever the input dtype.

Each kernel comes as a pair, ``parallel`` and ``serial``: for small inputs
waking the thread pool costs more than the work (see
:data:`config.CPU_PARALLEL_MIN_ELEMENTS`; the host picks). Both take a work
queue, a 3-element int64 array ``[next row, rows per claim, workers]``: the
parallel twin runs one worker per thread, and each worker claims rows from
the shared counter (:func:`_claim`) until none are left. A thread that runs
slower (descheduled by the OS, a busy sibling core on a virtual machine)
then takes fewer rows, instead of holding up the op with a fixed share.
"""

import hashlib
import math
from pathlib import Path
from types import FunctionType

import numpy as np
from numba import njit, prange

from . import _llvm, config, rowmath
from ._llvm import fetch_add, maxnum, prefetch, row_max, store_fence, stream_vector
from .rowmath import cast_like, vexp_nonpos

_OPTIONS = dict(fastmath=set(config.FASTMATH), cache=True, nogil=True, error_model="numpy")

# Code that must be evaluated as written is compiled without ``reassoc``: with
# it, LLVM turns ``(x - m) - log_s`` into ``x - (m + log_s)``, hoists the sum
# out of the loop and rounds it at the magnitude of ``m`` (an error of 5e-4 at
# logits of -1e4). The flags stay on the instructions after LLVM inlines these.
_EXACT = dict(fastmath=set(config.FASTMATH_EXACT), cache=True, nogil=True, error_model="numpy")


def _sources_tag() -> str:
    """A digest of the modules whose code and constants the kernels compile in.

    Numba's on-disk cache checks only the file that defines a function, so an
    edit to ``rowmath.py``, ``_llvm.py`` or ``config.py`` alone would leave
    stale machine code in use. Every cached kernel of this module carries the
    digest in its cache name (:func:`_renamed`): changed sources, new names,
    fresh compiles.
    """
    digest = hashlib.sha256()
    for module in (rowmath, _llvm, config):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:12]


_TAG = _sources_tag()


def _renamed(fn, suffix: str = ""):
    """A copy of ``fn`` whose qualified name, Numba's cache key, ends in ``suffix`` and :data:`_TAG`."""
    copy = FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = f"{fn.__qualname__}{suffix}_{_TAG}"
    copy.__doc__ = fn.__doc__
    return copy


def _exact(fn):
    """``njit`` with the :data:`_EXACT` flags, cached under a :func:`_renamed` name."""
    return njit(**_EXACT)(_renamed(fn))


ce_index_loss = njit(**_EXACT)(rowmath.ce_index_loss)
ce_index_grad_coeffs = njit(**_EXACT)(rowmath.ce_index_grad_coeffs)


@_exact
def _store_shifted(xr, yr, m, log_s):
    """``yr = (xr - m) - log_s``, in that order."""
    for j in range(xr.shape[0]):
        yr[j] = (xr[j] - m) - log_s


def _twins(fn):
    """Compile ``fn`` twice: parallel (``prange`` over workers) and serial.

    The twins are copies under two qualified names, so that Numba's on-disk
    cache keeps them apart.
    """
    return {True: njit(parallel=True, **_OPTIONS)(_renamed(fn)), False: njit(**_OPTIONS)(_renamed(fn, "_serial"))}


#: The forward kernels' sums (of exponentials, of logits) run in SIMD lanes of
#: the input dtype over blocks of this many elements; the block sums are added
#: in float64. A float64 accumulator doubled the time of the exp loop, which
#: bounds the forward's speed; a plain float32 one loses digits on long rows
#: (2.8e-6 relative at 32000 columns). The backward's sums are plain float64
#: (:func:`_dot`).
_BLOCK = 256


@njit(inline="always", **_OPTIONS)
def _row_max(xr):
    """The max of a C-contiguous row (the kernels' rows all are), NaN skipped (:func:`._llvm.row_max`).

    A NaN in the row reaches the results through ``sum_j exp(x_j - m)``.
    """
    return row_max(xr)


#: Elements per 64-byte cache line, for prefetching: a float32 count, so
#: float64 rows are prefetched every other line too.
_LINE = 16


def _exp_loop(store: bool):
    """The loop of :func:`_exp_sum`, compiled with each ``exp`` stored into ``out`` or not."""

    def exp_sum(xr, m, out, ahead):
        n = xr.shape[0]
        total = 0.0
        for b in range(0, n, _BLOCK):
            end = min(b + _BLOCK, n)
            for k in range(b, min(end, ahead.shape[0]), _LINE):
                prefetch(ahead, k)
            part = cast_like(0.0, xr)
            # zero-based loops over slices: LLVM then knows the index is never
            # negative and drops Numba's wraparound arithmetic from every load
            xb = xr[b:end]
            ob = out[b:end]
            for j in range(xb.shape[0]):
                e = vexp_nonpos(xb[j] - m)
                if store:  # a constant of this closure: no branch in the compiled loop
                    ob[j] = e
                part += e
            total += part
        return total

    return njit(inline="always", **_OPTIONS)(exp_sum)


_exp_sum_stored, _exp_sum_only = _exp_loop(True), _exp_loop(False)


@njit(inline="always", **_OPTIONS)
def _exp_sum(xr, m, out, ahead):
    """``sum_j exp(x_j - m)`` in float64; each ``exp`` also stored in ``out`` if it is non-empty.

    While it computes, it prefetches ``ahead`` (the next row, or empty), so
    that reading the next row from memory overlaps this row's arithmetic.
    Whether to store is decided once, here: with the test inside the block
    loop, softmax at 8192x32000 ran 6% slower (2-core EPYC, median of paired
    ratios, 25 repetitions with the variants in random order).
    """
    if out.shape[0] > 0:
        return _exp_sum_stored(xr, m, out, ahead)
    return _exp_sum_only(xr, m, out, ahead)


@njit(inline="always", **_OPTIONS)
def _dot(a, b):
    """``sum_j a_j * b_j`` (``b`` empty: ``sum_j a_j``), products and sum in float64.

    The backward kernels subtract this sum times a probability from each
    ``dy_j``; a float32 sum (within an ulp of ``sum_j |dy_j|``) put errors of
    ~100 ulps into gradients where that cancels. In float64 the products are
    exact and the loop still vectorises: 12% slower than float32 blocks on
    4096x1000, a pass that is bound by memory anyway.
    """
    total = 0.0
    if b.shape[0] > 0:
        for j in range(a.shape[0]):
            total += np.float64(a[j]) * np.float64(b[j])
    else:
        for j in range(a.shape[0]):
            total += np.float64(a[j])
    return total


@njit(inline="always", **_OPTIONS)
def _gap_dot(xr, m, w):
    """``sum_j w_j * (m - x_j)`` in float64 (``w`` empty: all ones)."""
    n = xr.shape[0]
    total = 0.0
    for k in range(0, n, _BLOCK):
        end = min(k + _BLOCK, n)
        part = cast_like(0.0, xr)
        if w.shape[0] > 0:
            for j in range(k, end):
                part += w[j] * (m - xr[j])
        else:
            for j in range(k, end):
                part += m - xr[j]
        total += part
    return total


@njit(inline="always", **_OPTIONS)
def _target_sums(xr, m, qr, w, keep, spread):
    """``(sum_j a_j, sum_j a_j * (m - x_j))`` in float64, ``a_j = w_j * (keep * q_j + spread)`` (``w`` empty: ones)."""
    n = xr.shape[0]
    k = cast_like(keep, xr)
    e = cast_like(spread, xr)
    a_total = 0.0
    ad_total = 0.0
    for b in range(0, n, _BLOCK):
        end = min(b + _BLOCK, n)
        a_part = cast_like(0.0, xr)
        ad_part = cast_like(0.0, xr)
        if w.shape[0] > 0:
            for j in range(b, end):
                a = w[j] * (k * qr[j] + e)
                a_part += a
                ad_part += a * (m - xr[j])
        else:
            for j in range(b, end):
                a = k * qr[j] + e
                a_part += a
                ad_part += a * (m - xr[j])
        a_total += a_part
        ad_total += ad_part
    return a_total, ad_total


_AHEAD = config.CPU_PREFETCH_ROWS


@njit(inline="always", **_OPTIONS)
def _next_row(x, i):
    """The row to prefetch while row ``i`` is computed, or an empty row past the end."""
    return x[i + _AHEAD] if i + _AHEAD < x.shape[0] else x[i, :0]


@_exact
def _stream_row(dst, src, scale):
    """``dst[:] = src * scale`` with non-temporal stores for the 32-byte-aligned body."""
    n = dst.shape[0]
    width = 32 // dst.itemsize
    head = min(((-dst.ctypes.data) % 32) // dst.itemsize, n)
    for j in range(head):
        dst[j] = src[j] * scale
    j = head
    while j + width <= n:
        stream_vector(dst, src, j, scale)
        j += width
    for k in range(j, n):
        dst[k] = src[k] * scale


@njit(inline="always", **_OPTIONS)
def _flush(out, buf, pending, scale):
    """Write the finished row held in ``buf`` to ``out[pending]`` (times ``scale``), if one is pending; returns -1: none is.

    The streaming kernels write row ``i`` out only after the max pass of the
    row after it: on the 2-core EPYC, softmax at 8192x32000 took 3% less time
    than with each row written out as soon as it is done (median of paired
    ratios, 25 repetitions with the variants in random order).
    """
    if pending >= 0:
        _stream_row(out[pending], buf, scale)
    return -1


#: The fields of a work queue.
_NEXT, _STEP, _WORKERS = 0, 1, 2


@njit(inline="always", **_OPTIONS)
def _claim(queue, n_rows):
    """The next rows ``[lo, hi)`` of the work ``queue``; empty once all ``n_rows`` are taken.

    One atomic add on the shared counter, so no two workers get the same row.
    """
    step = queue[_STEP]
    lo = min(fetch_add(queue, _NEXT, step), n_rows)
    return lo, min(lo + step, n_rows)


def _softmax_forward(x, y, scratch, queue):
    """``y = exp(x - m) / sum(exp(x - m))`` per row, ``m`` the row max.

    Rows are claimed from ``queue`` (see the module docstring). ``scratch``
    has a row per worker; when it has columns (the output is larger than the
    cache), each row is built in its worker's scratch row and written to ``y``
    with non-temporal stores, which saves reading ``y`` into the cache before
    writing it, once the worker has the max of its next row (:func:`_flush`);
    one fence per worker then makes those stores visible. A NaN anywhere in a row
    makes the whole row NaN (through the sum); a row of all ``-inf`` gives NaN,
    as in PyTorch.
    """
    stream = scratch.shape[1] > 0
    for w in prange(queue[_WORKERS]):
        pending, pending_inv = -1, cast_like(1.0, x)  # the row whose exps scratch[w] holds, not yet in y
        lo, hi = _claim(queue, x.shape[0])
        while lo < hi:
            for i in range(lo, hi):
                xr = x[i]
                buf = scratch[w] if stream else y[i]
                m = _row_max(xr)
                if stream:
                    pending = _flush(y, buf, pending, pending_inv)
                inv = cast_like(1.0 / _exp_sum(xr, m, buf, _next_row(x, i)), xr)
                if stream:
                    pending, pending_inv = i, inv
                else:
                    for j in range(buf.shape[0]):
                        buf[j] *= inv
            lo, hi = _claim(queue, x.shape[0])
        if stream:
            _flush(y, scratch[w], pending, pending_inv)
            store_fence()


def _softmax_backward(y, dy, dx, queue, log):
    """The gradient from the forward output ``y``, per row.

    softmax: ``dx = y * (dy - sum(dy * y))``; log-softmax (``log``):
    ``dx = dy - exp(y) * sum(dy)``.
    """
    for w in prange(queue[_WORKERS]):
        lo, hi = _claim(queue, y.shape[0])
        while lo < hi:
            for i in range(lo, hi):
                yr, gr, out = y[i], dy[i], dx[i]
                d = cast_like(_dot(gr, gr[:0] if log else yr), yr)
                if log:
                    for j in range(yr.shape[0]):
                        out[j] = gr[j] - vexp_nonpos(yr[j]) * d
                else:
                    for j in range(yr.shape[0]):
                        out[j] = yr[j] * (gr[j] - d)
            lo, hi = _claim(queue, y.shape[0])


def _log_softmax_forward(x, y, scratch, queue):
    """``y = (x - m) - log(sum(exp(x - m)))`` per row (``scratch`` as in :func:`_softmax_forward`)."""
    stream = scratch.shape[1] > 0
    no_store = x[0, :0]
    one = cast_like(1.0, x)
    for w in prange(queue[_WORKERS]):
        pending = -1
        lo, hi = _claim(queue, x.shape[0])
        while lo < hi:
            for i in range(lo, hi):
                xr = x[i]
                buf = scratch[w] if stream else y[i]
                m = _row_max(xr)
                if stream:
                    pending = _flush(y, buf, pending, one)
                _store_shifted(xr, buf, m, cast_like(math.log(_exp_sum(xr, m, no_store, _next_row(x, i))), xr))
                if stream:
                    pending = i
            lo, hi = _claim(queue, x.shape[0])
        if stream:
            _flush(y, scratch[w], pending, one)
            store_fence()


@njit(inline="always", **_OPTIONS)
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
    w_sum = _dot(weight, weight[:0]) if has_w else float(C)
    stream = want_grad and scratch.shape[1] > 0
    one = cast_like(1.0, x)
    for w in prange(queue[_WORKERS]):
        pending = -1
        lo, hi = _claim(queue, R)
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
                m = _row_max(xr)
                if stream:
                    pending = _flush(grad, buf, pending, one)
                s = _exp_sum(xr, m, buf, _next_row(x, i))
                sum_wd = _gap_dot(xr, m, weight) if eps > 0.0 else 0.0
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
            lo, hi = _claim(queue, R)
        if stream:
            _flush(grad, scratch[w], pending, one)
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
    for w in prange(queue[_WORKERS]):
        pending = -1
        lo, hi = _claim(queue, R)
        while lo < hi:
            for i in range(lo, hi):
                xr = x[i]
                qr = q[i]
                buf = _grad_row(scratch, grad, w, i)
                m = _row_max(xr)
                if stream:
                    pending = _flush(grad, buf, pending, one)
                s = _exp_sum(xr, m, buf, _next_row(x, i))
                a_sum, sum_ad = _target_sums(xr, m, qr, weight, keep, spread)
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
            lo, hi = _claim(queue, R)
        if stream:
            _flush(grad, scratch[w], pending, one)
            store_fence()


def _scale_rows(src, factor, out, queue):
    """``out[i, :] = src[i, :] * factor[i]``: the cross-entropy backward."""
    for w in prange(queue[_WORKERS]):
        lo, hi = _claim(queue, src.shape[0])
        while lo < hi:
            for i in range(lo, hi):
                f = cast_like(factor[i], src)
                sr = src[i]
                orow = out[i]
                for j in range(sr.shape[0]):
                    orow[j] = sr[j] * f
            lo, hi = _claim(queue, src.shape[0])


# --- reductions over a middle axis ---------------------------------------------
#
# An (O, C, I) array reduced over its middle axis C, the I inner positions
# contiguous: softmax over dim 1 of an NCHW tensor, say. Moving C last would
# cost a copy in and a copy back; these kernels instead sweep C for a block
# of W inner positions at a time, SIMD along the block, and the block (C x W
# elements of input and output) stays in cache between the sweeps (see
# config.CPU_MIDDLE_BLOCK_BYTES). A work item is one block of one outer
# index. Scratch per worker: rows of W in the input dtype (the block's
# maxima, partial sums, coefficients) and two rows of W float64 sums.
#
# Each lane of a partial sum here adds classes one after another, so the
# partial sums span fewer terms than the row kernels' (whose SIMD lanes and
# final reduction split a block of 256 into short chains): with 256, the
# float32 rounding of the sum reached 1e-6 relative at C = 1000, and a
# log-softmax column off by that much gave gradients 4x outside tolerance.
_MIDDLE_BLOCK = 16


@njit(inline="always", **_OPTIONS)
def _middle_blocks(n_outer, n_inner, scratch):
    """``(W, blocks per outer index, work items)`` of a middle-axis kernel, ``W = scratch.shape[2]``."""
    width = scratch.shape[2]
    n_blocks = (n_inner + width - 1) // width
    return width, n_blocks, n_outer * n_blocks


@njit(inline="always", **_OPTIONS)
def _middle_item(item, n_blocks, width, n_inner):
    """The outer index and inner range ``[i0, i1)`` of work item ``item``."""
    i0 = (item % n_blocks) * width
    return item // n_blocks, i0, min(i0 + width, n_inner)


@njit(inline="always", **_OPTIONS)
def _middle_max(xs, i0, i1, m):
    """``m = max_c xs[c, i0:i1]``."""
    first = xs[0, i0:i1]
    for i in range(m.shape[0]):
        m[i] = first[i]
    for c in range(1, xs.shape[0]):
        xr = xs[c, i0:i1]
        for i in range(m.shape[0]):
            m[i] = maxnum(m[i], xr[i])


@njit(inline="always", **_OPTIONS)
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


@njit(inline="always", **_OPTIONS)
def _middle_dot(a, b, i0, i1, total):
    """``total = sum_c a[c, i0:i1] * b[c, i0:i1]`` (``b`` without rows: ``sum_c a``), in float64 (see :func:`_dot`)."""
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


@_exact
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
    for w in prange(queue[_WORKERS]):
        lo, hi = _claim(queue, n_items)
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
            lo, hi = _claim(queue, n_items)


def _softmax_backward_middle(y, dy, dx, scratch, totals, queue, log):
    """The gradient of :func:`_softmax_forward_middle` from its output ``y``.

    softmax: ``dx = y * (dy - sum_c(dy * y))``; log-softmax:
    ``dx = dy - exp(y) * sum_c(dy)``. Arguments as in the forward.
    """
    n_outer, n_classes, n_inner = y.shape
    width, n_blocks, n_items = _middle_blocks(n_outer, n_inner, scratch)
    for w in prange(queue[_WORKERS]):
        lo, hi = _claim(queue, n_items)
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
            lo, hi = _claim(queue, n_items)


def _cross_entropy_index_middle(x, target, weight, ignore_index, eps, scale, loss, grad, scratch, totals, queue):
    """Fused cross-entropy over the middle axis: logits ``x`` (O, C, I), class indices ``target`` (O, I).

    The loss of :func:`_cross_entropy_index` for every position ``(o, i)``,
    written to ``loss`` (O, I), and, when ``grad`` has rows, its gradient
    (O, C, I), laid out like ``x``. Blocks of W positions as in
    :func:`_softmax_forward_middle`; scratch ``(workers, 5, W)``: maxima,
    partial sums, and per position the factor of ``exp(x - m)``, the factor
    of ``w_c`` and the one-hot term of the gradient.
    """
    n_outer, n_classes, n_inner = x.shape
    has_w = weight.shape[0] > 0
    want_grad = grad.shape[0] > 0
    w_sum = _dot(weight, weight[:0]) if has_w else float(n_classes)
    width, n_blocks, n_items = _middle_blocks(n_outer, n_inner, scratch)
    for w in prange(queue[_WORKERS]):
        lo, hi = _claim(queue, n_items)
        while lo < hi:
            for item in range(lo, hi):
                o, i0, i1 = _middle_item(item, n_blocks, width, n_inner)
                m, part = scratch[w, 0, : i1 - i0], scratch[w, 1, : i1 - i0]
                k_exp, k_w, k_hot = scratch[w, 2, : i1 - i0], scratch[w, 3, : i1 - i0], scratch[w, 4, : i1 - i0]
                s, sum_wd = totals[w, 0, : i1 - i0], totals[w, 1, : i1 - i0]
                xs = x[o]
                _middle_max(xs, i0, i1, m)
                _middle_exp_sum(xs, i0, i1, m, grad[o] if want_grad else xs[:0], part, s)
                sum_wd[:] = 0.0
                if eps > 0.0:
                    for c in range(n_classes):
                        xr = xs[c, i0:i1]
                        w_c = weight[c] if has_w else 1.0
                        for i in range(sum_wd.shape[0]):
                            sum_wd[i] += w_c * (np.float64(m[i]) - np.float64(xr[i]))
                for i in range(m.shape[0]):
                    t = target[o, i0 + i]
                    if t == ignore_index:
                        loss[o, i0 + i] = 0.0
                        k_exp[i] = 0
                        k_w[i] = 0
                        continue
                    w_t = weight[t] if has_w else 1.0
                    loss[o, i0 + i] = ce_index_loss(m[i], math.log(s[i]), xs[t, i0 + i], w_t, sum_wd[i], w_sum, eps, n_classes)
                    ke, kw, kh = ce_index_grad_coeffs(s[i], w_t, w_sum, eps, n_classes, scale)
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
                        for c in range(n_classes):
                            g[c, i0 + i] = 0  # exactly, even where a logit is NaN
                    else:
                        g[t, i0 + i] -= k_hot[i]
            lo, hi = _claim(queue, n_items)


def _cross_entropy_prob_middle(x, q, weight, eps, scale, loss, grad, scratch, totals, queue):
    """Fused cross-entropy over the middle axis with class probabilities: ``x`` and ``q`` (O, C, I).

    The loss of :func:`_cross_entropy_prob` for every position ``(o, i)``,
    written to ``loss`` (O, I), and, when ``grad`` has rows, its gradient
    (O, C, I), laid out like ``x``: with ``a_c = w_c * ((1 - eps) * q_c + eps / C)``
    and ``A = sum_c a_c``, ``loss = sum_c a_c * (m - x_c) + A * log(s)`` and
    ``d loss / d x_c = A * exp(x_c - m) / s - a_c``. Scratch ``(workers, 3, W)``:
    maxima, partial sums, the factor ``A * scale / s``; totals
    ``(workers, 3, W)`` float64: ``s``, ``A`` and ``sum_c a_c * (m - x_c)``.
    """
    n_outer, n_classes, n_inner = x.shape
    has_w = weight.shape[0] > 0
    want_grad = grad.shape[0] > 0
    keep = 1.0 - eps
    spread = eps / n_classes
    k_keep = cast_like(keep * scale, x)
    k_spread = cast_like(spread * scale, x)
    width, n_blocks, n_items = _middle_blocks(n_outer, n_inner, scratch)
    for w in prange(queue[_WORKERS]):
        lo, hi = _claim(queue, n_items)
        while lo < hi:
            for item in range(lo, hi):
                o, i0, i1 = _middle_item(item, n_blocks, width, n_inner)
                m, part, k_exp = scratch[w, 0, : i1 - i0], scratch[w, 1, : i1 - i0], scratch[w, 2, : i1 - i0]
                s, a_sum, ad_sum = totals[w, 0, : i1 - i0], totals[w, 1, : i1 - i0], totals[w, 2, : i1 - i0]
                xs, qs = x[o], q[o]
                _middle_max(xs, i0, i1, m)
                _middle_exp_sum(xs, i0, i1, m, grad[o] if want_grad else xs[:0], part, s)
                a_sum[:] = 0.0
                ad_sum[:] = 0.0
                for c in range(n_classes):
                    xr, qr = xs[c, i0:i1], qs[c, i0:i1]
                    w_c = np.float64(weight[c]) if has_w else 1.0
                    for i in range(a_sum.shape[0]):
                        a = w_c * (keep * np.float64(qr[i]) + spread)
                        a_sum[i] += a
                        ad_sum[i] += a * (np.float64(m[i]) - np.float64(xr[i]))
                for i in range(m.shape[0]):
                    loss[o, i0 + i] = ad_sum[i] + a_sum[i] * math.log(s[i])
                    k_exp[i] = cast_like(a_sum[i] * scale / s[i], k_exp)
                if not want_grad:
                    continue
                for c in range(n_classes):
                    gr, qr = grad[o, c, i0:i1], qs[c, i0:i1]
                    w_c = weight[c] if has_w else cast_like(1.0, weight)
                    for i in range(gr.shape[0]):
                        gr[i] = gr[i] * k_exp[i] - w_c * (k_keep * qr[i] + k_spread)
            lo, hi = _claim(queue, n_items)


softmax_forward = _twins(_softmax_forward)
softmax_backward = _twins(_softmax_backward)
log_softmax_forward = _twins(_log_softmax_forward)
cross_entropy_index = _twins(_cross_entropy_index)
cross_entropy_prob = _twins(_cross_entropy_prob)
scale_rows = _twins(_scale_rows)
softmax_forward_middle = _twins(_softmax_forward_middle)
softmax_backward_middle = _twins(_softmax_backward_middle)
cross_entropy_index_middle = _twins(_cross_entropy_index_middle)
cross_entropy_prob_middle = _twins(_cross_entropy_prob_middle)


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
