"""The one-block kernels around the cross-entropy kernels of :mod:`.cuda_cross_entropy`.

* :func:`finish`: the per-row losses reduced (sum or mean) in a fixed order,
  and the mean's denominator stored for the backward;
* :func:`check_targets`: the first class index outside ``[0, C)`` that is
  not ``ignore_index``, for the host's one optional synchronisation.
"""

import math

from numba import cuda
from numba.cuda.types import boolean, int64, void

from .cuda_codec import SHORT, codec
from .cuda_cross_entropy import MEAN, SUM
from .cuda_reduce import FULL_MASK, MAX_WARPS, WARP, device, reducers
from .cuda_softmax import MAX_THREADS, _named


def finish(dtype: str):
    """``(name, pyfunc, signature, max_threads)`` of the one-block reduction of the per-row losses.

    Kernel ``(loss, target, weight, has_w, n_cols, ignore_index, mode, by_rows, saved, out)``:
    ``out[0]`` = the sum of ``loss`` (:data:`SUM`) or the mean (:data:`MEAN`):
    divided by the number of rows (``by_rows``: probability targets) or by
    the total weight of the kept targets, which it also writes to
    ``saved[R, 0]`` for the backward (0 there otherwise; :data:`NONE`
    writes only that row). Rows are summed in a fixed order, so the result
    does not vary from run to run.
    """
    cd, rd = codec(dtype), reducers(dtype)
    acc, put = cd.acc, cd.put
    zero, one, nan = rd.zero, acc(1.0), acc(math.nan)
    block_sum = rd.block_sum

    def kernel(loss, target, weight, has_w, n_cols, ignore_index, mode, by_rows, saved, out):
        n_rows = loss.shape[0]
        tid = cuda.threadIdx.x
        sm = cuda.shared.array(MAX_WARPS, acc)
        total = zero
        kept = zero
        for i in range(tid, n_rows, cuda.blockDim.x):
            total += loss[i]
            if mode == MEAN and not by_rows:
                tr = target[i]
                if tr != ignore_index and tr >= 0 and tr < n_cols:
                    kept += weight[tr] if has_w else one
        total = block_sum(total, sm)
        if mode == MEAN:
            kept = acc(n_rows) if by_rows else block_sum(kept, sm)
        if tid == 0:
            saved[n_rows, 0] = kept if mode == MEAN else zero
            saved[n_rows, 1] = zero
            saved[n_rows, 2] = zero
            if mode == MEAN:
                put(out, 0, total / kept if kept != zero or by_rows else nan)
            elif mode == SUM:
                put(out, 0, total)

    name = f"ce_finish_{SHORT[dtype]}"
    acc_vec = acc[::1]
    sig = void(acc_vec, int64[::1], acc_vec, boolean, int64, int64, int64, boolean, acc[:, ::1], cd.storage[::1])
    return name, _named(kernel, name), sig, MAX_THREADS


def check_targets():
    """``(name, pyfunc, signature, max_threads)`` of the one-block target check.

    Kernel ``(target, n_cols, ignore_index, bad)``: ``bad[0]`` = the first
    position whose target is neither ``ignore_index`` nor in ``[0, n_cols)``,
    or -1.
    """
    none = int64(-1)

    @device
    def first(a, b):
        if a < 0:
            return b
        if b < 0:
            return a
        return a if a < b else b

    def kernel(target, n_cols, ignore_index, bad):
        tid = cuda.threadIdx.x
        sm = cuda.shared.array(MAX_WARPS, int64)
        pos = none
        for i in range(tid, target.shape[0], cuda.blockDim.x):
            tr = target[i]
            if pos < 0 and tr != ignore_index and (tr < 0 or tr >= n_cols):
                pos = i
        offset = WARP // 2
        while offset > 0:
            pos = first(pos, cuda.shfl_xor_sync(FULL_MASK, pos, offset))
            offset //= 2
        if tid % WARP == 0:
            sm[tid // WARP] = pos
        cuda.syncthreads()
        if tid == 0:
            for w in range(1, cuda.blockDim.x // WARP):
                pos = first(pos, sm[w])
            bad[0] = pos

    name = "ce_check_targets"
    return name, _named(kernel, name), void(int64[::1], int64, int64, int64[::1]), MAX_THREADS
