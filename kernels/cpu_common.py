"""Building blocks of the CPU kernels: the work queue, row passes, streamed stores.

Every kernel of :mod:`.cpu_rows` and :mod:`.cpu_middle` takes a work queue,
a 3-element int64 array ``[next row, rows per claim, workers]``. The
parallel twin runs one worker per thread (``prange`` over workers), and each
worker claims rows from the shared counter (:func:`claim`) until none are
left; the serial twin runs one worker. A thread that runs slower
(descheduled by the OS, a busy sibling core on a virtual machine) then takes
fewer rows instead of holding up the op with a fixed share.

Each row is read from memory once: its first pass streams it into the cache,
the passes after it (``C`` floats: 128 KiB at ``C = 32000``) run from L2.
Inner loops are branch-free so that LLVM vectorises them.
"""

import numpy as np

from . import config
from .exp import vexp_nonpos
from .intrinsics import fetch_add, prefetch, row_max, stream_vector
from .jit import cast_like, exact, inline

#: The forward kernels' sums (of exponentials, of logits) run in SIMD lanes of
#: the input dtype over blocks of this many elements; the block sums are added
#: in float64. A float64 accumulator doubled the time of the exp loop, which
#: bounds the forward's speed; a plain float32 one loses digits on long rows
#: (2.8e-6 relative at 32000 columns). The backward's sums are plain float64
#: (:func:`dot`).
BLOCK = 256


@inline
def row_max_of(xr):
    """The max of a C-contiguous row (the kernels' rows all are), NaN skipped (:func:`.intrinsics.row_max`).

    A NaN in the row reaches the results through ``sum_j exp(x_j - m)``.
    """
    return row_max(xr)


#: Elements per 64-byte cache line, for prefetching: a float32 count, so
#: float64 rows are prefetched every other line too.
_LINE = 16


def _exp_loop(store: bool):
    """The loop of :func:`exp_sum`, compiled with each ``exp`` stored into ``out`` or not."""

    def exp_sum(xr, m, out, ahead):
        n = xr.shape[0]
        total = 0.0
        for b in range(0, n, BLOCK):
            end = min(b + BLOCK, n)
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

    return inline(exp_sum)


_exp_sum_stored, _exp_sum_only = _exp_loop(True), _exp_loop(False)


@inline
def exp_sum(xr, m, out, ahead):
    """``sum_j exp(x_j - m)`` in float64; each ``exp`` also stored in ``out`` if it is non-empty.

    While it computes, it prefetches ``ahead`` (the next row, or empty), so
    that reading the next row from memory overlaps this row's arithmetic.
    Whether to store is decided once per row, here, so that the loop
    itself carries no test.
    """
    if out.shape[0] > 0:
        return _exp_sum_stored(xr, m, out, ahead)
    return _exp_sum_only(xr, m, out, ahead)


@inline
def dot(a, b):
    """``sum_j a_j * b_j`` (``b`` empty: ``sum_j a_j``), products and sum in float64.

    The backward kernels subtract this sum times a probability from each
    ``dy_j``; a float32 sum (within an ulp of ``sum_j |dy_j|``) put errors of
    ~100 ulps into gradients where that cancels. In float64 the products are
    exact and the loop still vectorises, in a pass bound by memory anyway.
    """
    total = 0.0
    if b.shape[0] > 0:
        for j in range(a.shape[0]):
            total += np.float64(a[j]) * np.float64(b[j])
    else:
        for j in range(a.shape[0]):
            total += np.float64(a[j])
    return total


@inline
def gap_dot(xr, m, w):
    """``sum_j w_j * (m - x_j)`` in float64 (``w`` empty: all ones)."""
    n = xr.shape[0]
    total = 0.0
    for k in range(0, n, BLOCK):
        end = min(k + BLOCK, n)
        part = cast_like(0.0, xr)
        if w.shape[0] > 0:
            for j in range(k, end):
                part += w[j] * (m - xr[j])
        else:
            for j in range(k, end):
                part += m - xr[j]
        total += part
    return total


@inline
def target_sums(xr, m, qr, w, keep, spread):
    """``(sum_j a_j, sum_j a_j * (m - x_j))`` in float64, ``a_j = w_j * (keep * q_j + spread)`` (``w`` empty: ones)."""
    n = xr.shape[0]
    k = cast_like(keep, xr)
    e = cast_like(spread, xr)
    a_total = 0.0
    ad_total = 0.0
    for b in range(0, n, BLOCK):
        end = min(b + BLOCK, n)
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


@inline
def next_row(x, i):
    """The row to prefetch while row ``i`` is computed, or an empty row past the end."""
    return x[i + _AHEAD] if i + _AHEAD < x.shape[0] else x[i, :0]


@exact
def stream_row(dst, src, scale):
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


@inline
def flush(out, buf, pending, scale):
    """Write the finished row held in ``buf`` to ``out[pending]`` (times ``scale``), if one is pending; returns -1: none is.

    The streaming kernels write row ``i`` out only after the max pass of the
    row after it, so that the stores of one row overlap the loads of the next.
    """
    if pending >= 0:
        stream_row(out[pending], buf, scale)
    return -1


#: The fields of a work queue.
NEXT, STEP, WORKERS = 0, 1, 2


@inline
def claim(queue, n_rows):
    """The next rows ``[lo, hi)`` of the work ``queue``; empty once all ``n_rows`` are taken.

    One atomic add on the shared counter, so no two workers get the same row.
    """
    step = queue[STEP]
    lo = min(fetch_add(queue, NEXT, step), n_rows)
    return lo, min(lo + step, n_rows)

