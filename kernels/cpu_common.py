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


from . import config
from .exp import vexp_nonpos
from .intrinsics import (
    fetch_add,
    lane_dot64,
    lane_sum,
    lane_sum64,
    prefetch,
    row_max,
    stream_vector,
)
from .jit import cast_like, exact, inline

#: The forward kernels' sums (of exponentials, of logits) add the elements
#: of each block of this many in the input dtype, in the fixed order of
#: :func:`.intrinsics.lane_sum`, and the block sums in float64. A float64
#: accumulator would double the time of the exp loop, which bounds the
#: forward's speed; a float32 one over a whole row loses digits on long
#: rows (2.8e-6 relative at 32000 columns). Each kernel's scratch ends in a
#: block of this many elements per worker, where terms that are not stored
#: anyway are put before they are summed.
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


@inline
def _prefetch_block(ahead, b, end):
    for k in range(b, min(end, ahead.shape[0]), _LINE):
        prefetch(ahead, k)


@inline
def exp_sum(xr, m, out, blk, ahead):
    """``sum_j exp(x_j - m)`` in float64, each ``exp`` stored in ``out`` (or, if it is empty, in the block ``blk``).

    While it computes, it prefetches ``ahead`` (the next row, or empty), so
    that reading the next row from memory overlaps this row's arithmetic.
    ``out`` must not overlap ``xr`` (see :func:`exp_sum_inplace`).
    """
    n = xr.shape[0]
    store = out.shape[0] > 0
    total = 0.0
    for b in range(0, n, BLOCK):
        end = min(b + BLOCK, n)
        _prefetch_block(ahead, b, end)
        # zero-based loops over slices: LLVM then knows the index is never
        # negative and drops Numba's wraparound arithmetic from every load
        xb = xr[b:end]
        ob = out[b:end] if store else blk[: end - b]
        for j in range(xb.shape[0]):
            ob[j] = vexp_nonpos(xb[j] - m)
        total += lane_sum(ob)
    return total


@inline
def exp_sum_inplace(row, m, ahead):
    """:func:`exp_sum` that overwrites ``row`` with its exponentials (the in-place cross-entropy gradient).

    Written over one array, so that LLVM sees each element read then written
    at the same index and vectorises the loop, which it would not for two
    arrays that overlap.
    """
    n = row.shape[0]
    total = 0.0
    for b in range(0, n, BLOCK):
        end = min(b + BLOCK, n)
        _prefetch_block(ahead, b, end)
        rb = row[b:end]
        for j in range(rb.shape[0]):
            rb[j] = vexp_nonpos(rb[j] - m)
        total += lane_sum(rb)
    return total


@inline
def dot(a, b):
    """``sum_j a_j * b_j`` (``b`` empty: ``sum_j a_j``), products and sum in float64, in a fixed order.

    The backward kernels subtract this sum times a probability from each
    ``dy_j``; a float32 sum (within an ulp of ``sum_j |dy_j|``) put errors of
    ~100 ulps into gradients where that cancels. In float64 the products are
    exact.
    """
    if b.shape[0] > 0:
        return lane_dot64(a, b)
    return lane_sum64(a)


@inline
def gap_sum(xr, m, w, blk):
    """``sum_j w_j * (m - x_j)`` in float64 (``w`` empty: all ones), the terms of each block put in ``blk`` first."""
    n = xr.shape[0]
    total = 0.0
    for b in range(0, n, BLOCK):
        end = min(b + BLOCK, n)
        xb = xr[b:end]
        tb = blk[: end - b]
        if w.shape[0] > 0:
            wb = w[b:end]
            for j in range(xb.shape[0]):
                tb[j] = wb[j] * (m - xb[j])
        else:
            for j in range(xb.shape[0]):
                tb[j] = m - xb[j]
        total += lane_sum(tb)
    return total


@inline
def target_sums(xr, m, qr, w, keep, spread, blk):
    """``(sum_j a_j, sum_j a_j * (m - x_j))`` in float64, ``a_j = w_j * (keep * q_j + spread)`` (``w`` empty: ones)."""
    n = xr.shape[0]
    k = cast_like(keep, xr)
    e = cast_like(spread, xr)
    half = blk.shape[0] // 2
    a_total = 0.0
    ad_total = 0.0
    for b in range(0, n, half):
        end = min(b + half, n)
        xb, qb = xr[b:end], qr[b:end]
        ab, adb = blk[: end - b], blk[half : half + end - b]
        if w.shape[0] > 0:
            wb = w[b:end]
            for j in range(xb.shape[0]):
                ab[j] = wb[j] * (k * qb[j] + e)
        else:
            for j in range(xb.shape[0]):
                ab[j] = k * qb[j] + e
        for j in range(xb.shape[0]):
            adb[j] = ab[j] * (m - xb[j])
        a_total += lane_sum(ab)
        ad_total += lane_sum(adb)
    return a_total, ad_total


@inline
def holds_nan(xr):
    """Whether the row holds a NaN (an integer count, which LLVM vectorises without reordering any sum)."""
    count = 0
    for j in range(xr.shape[0]):
        count += xr[j] != xr[j]
    return count > 0


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

