"""CUDA kernels (numba-cuda): the same ops as :mod:`kernels.cpu`, on device arrays.

Launch shape by row length ``C`` (see :func:`plan`):

* ``C <= config.CUDA_WARP_ROW_MAX_COLS``: one warp per row, several rows per
  block; each lane keeps its ``C / 32`` elements in registers, so the row is
  read from global memory once.
* ``C <= config.CUDA_BLOCK_ROW_MAX_COLS``: one block per row, the row kept
  in registers across the block's threads, read once.
* longer rows: one block per row, online pass: each thread folds its
  elements into a running ``(max, sum of exp)`` pair (:func:`rowmath.online_update`),
  the pairs are merged across the block (:func:`rowmath.lse_merge`), and a
  second pass over the row (from L2 when it fits) writes the output.

Reductions use warp shuffles on hardware. The CUDA simulator has no
shuffles, so with ``config.CUDA_USE_SHUFFLE = False`` every reduction is a
shared-memory tree instead; the simulator tests run that path.

Every kernel accumulates in float32 (float64 for float64 inputs). float16
arrays are read and written as float16; bfloat16 arrays are passed as their
``uint16`` bits (PyTorch exports no bfloat16 array interface) and converted
with round-to-nearest-even. Row offsets are 64-bit, so tensors past 2**31
elements index correctly.

Kernels are built per (op, dtype, launch shape) by factories and cached;
:func:`ptx_signatures` lists every one for the no-GPU compile test.
"""

import math
from functools import lru_cache

from numba import cuda
from numba.cuda.types import boolean, float32, float64, int64, void

from . import config
from .cuda_reduce import (
    DTYPES,
    WARP,
    ce_index_grad_coeffs,
    ce_index_loss,
    codec,
    my_row,
    online_update,
    reducers,
)

# --- launch plans --------------------------------------------------------------


def plan(n_cols: int):
    """``(group, threads, items)``: threads per row, per block, and row elements kept per thread."""
    threads = config.CUDA_THREADS_PER_BLOCK
    if n_cols <= config.CUDA_WARP_ROW_MAX_COLS:
        return WARP, threads, max(1, -(-config.CUDA_WARP_ROW_MAX_COLS // WARP))
    return threads, threads, max(1, -(-config.CUDA_BLOCK_ROW_MAX_COLS // threads))


def grid(n_rows: int, group: int, threads: int) -> int:
    rows_per_block = threads // group
    return -(-n_rows // rows_per_block)


# --- softmax and log_softmax ------------------------------------------------------


@lru_cache(maxsize=None)
def softmax_forward(dtype: str, log: bool, group: int, threads: int, items: int, use_shuffle: bool):
    """Kernel ``(x, y)``: ``y = softmax(x)`` (``log``: ``log_softmax``) along the last axis of 2-D arrays."""
    load, store, acc = codec(dtype)
    max_, sum_, lse_ = reducers(group, threads, use_shuffle)
    neg_inf = -math.inf

    def kernel(x, y):
        n_rows, n_cols = x.shape
        lane, r, active = my_row(group, n_rows)
        sm_a = cuda.shared.array(threads, acc)
        sm_b = cuda.shared.array(threads, acc)
        if n_cols <= group * items:
            # the row in registers: one read of global memory
            vals = cuda.local.array(items, acc)
            m = acc(neg_inf)
            for k in range(items):
                j = lane + k * group
                v = load(x, r, j) if j < n_cols else acc(neg_inf)
                vals[k] = v
                m = v if v > m else m
            m = max_(m, sm_a)
            s = acc(0.0)
            for k in range(items):
                if lane + k * group < n_cols:
                    s += math.exp(vals[k] - m)
            s = sum_(s, sm_b)
            if active:
                if log:
                    log_s = math.log(s)
                    for k in range(items):
                        j = lane + k * group
                        if j < n_cols:
                            store(y, r, j, (vals[k] - m) - log_s)
                else:
                    inv = acc(1.0) / s
                    for k in range(items):
                        j = lane + k * group
                        if j < n_cols:
                            store(y, r, j, math.exp(vals[k] - m) * inv)
        else:
            # long rows: online (max, sum) in one pass, the output in a second
            m = acc(neg_inf)
            s = acc(0.0)
            for j in range(lane, n_cols, group):
                m, s = online_update(m, s, load(x, r, j))
            m, s = lse_(m, s, sm_a, sm_b)
            if active:
                if log:
                    log_s = math.log(s)
                    for j in range(lane, n_cols, group):
                        store(y, r, j, (load(x, r, j) - m) - log_s)
                else:
                    inv = acc(1.0) / s
                    for j in range(lane, n_cols, group):
                        store(y, r, j, math.exp(load(x, r, j) - m) * inv)

    return kernel


@lru_cache(maxsize=None)
def softmax_backward(dtype: str, log: bool, group: int, threads: int, items: int, use_shuffle: bool):
    """Kernel ``(y, dy, dx)``: ``dx = y * (dy - sum(dy * y))`` (``log``: ``dx = dy - exp(y) * sum(dy)``)."""
    load, store, acc = codec(dtype)
    _, sum_, _ = reducers(group, threads, use_shuffle)

    def kernel(y, dy, dx):
        n_rows, n_cols = y.shape
        lane, r, active = my_row(group, n_rows)
        sm = cuda.shared.array(threads, acc)
        t = acc(0.0)
        for j in range(lane, n_cols, group):
            if log:
                t += load(dy, r, j)
            else:
                t += load(dy, r, j) * load(y, r, j)
        t = sum_(t, sm)
        if active:
            for j in range(lane, n_cols, group):
                if log:
                    store(dx, r, j, load(dy, r, j) - math.exp(load(y, r, j)) * t)
                else:
                    yj = load(y, r, j)
                    store(dx, r, j, yj * (load(dy, r, j) - t))

    return kernel


# --- cross-entropy ------------------------------------------------------------------


@lru_cache(maxsize=None)
def cross_entropy_index(dtype: str, group: int, threads: int, items: int, use_shuffle: bool):
    """Kernel ``(x, target, weight, has_w, ignore_index, eps, scale, loss, grad, want_grad)``.

    The fused forward of :func:`kernels.cpu._cross_entropy_index`: one row per
    group, loss (float64, unreduced) and ``grad`` = d(reduced loss)/dx for a
    unit grad_output. ``scale`` is a one-element float64 device array (the
    reduction's factor, computed on the device: no host synchronisation).
    ``weight`` has ``C`` elements (ignored unless ``has_w``). A target outside
    ``[0, C)`` that is not ``ignore_index`` gives a NaN loss and NaN gradient
    row, never an out-of-bounds read.
    """
    load, store, acc = codec(dtype)
    _, sum_, lse_ = reducers(group, threads, use_shuffle)
    neg_inf = -math.inf
    nan = math.nan

    def kernel(x, target, weight, has_w, ignore_index, eps, scale, loss, grad, want_grad):
        n_rows, n_cols = x.shape
        lane, r, active = my_row(group, n_rows)
        sm_a = cuda.shared.array(threads, acc)
        sm_b = cuda.shared.array(threads, acc)
        t = target[r]
        ignored = t == ignore_index
        valid = ignored or (t >= 0 and t < n_cols)
        tt = t if (valid and not ignored) else int64(0)
        # (max, sum of exp): in registers for short rows, online for long ones
        in_regs = n_cols <= group * items
        vals = cuda.local.array(items, acc)
        m = acc(neg_inf)
        s = acc(0.0)
        if in_regs:
            for k in range(items):
                j = lane + k * group
                v = load(x, r, j) if j < n_cols else acc(neg_inf)
                vals[k] = v
                if j < n_cols:
                    m, s = online_update(m, s, v)
        else:
            for j in range(lane, n_cols, group):
                m, s = online_update(m, s, load(x, r, j))
        m, s = lse_(m, s, sm_a, sm_b)
        w_t = acc(weight[tt]) if has_w else acc(1.0)
        w_sum_part = acc(0.0)
        for j in range(lane, n_cols, group):
            w_sum_part += acc(weight[j]) if has_w else acc(1.0)
        w_sum = sum_(w_sum_part, sm_a)
        k_exp, k_w, k_hot = ce_index_grad_coeffs(s, w_t, w_sum, eps, n_cols, acc(scale[0]))
        k_exp = acc(k_exp)
        k_w = acc(k_w)
        k_hot = acc(k_hot)
        sum_wd = acc(0.0)
        for k in range(items if in_regs else 0):
            j = lane + k * group
            if j < n_cols:
                wj = acc(weight[j]) if has_w else acc(1.0)
                sum_wd += wj * (m - vals[k])
                if active and want_grad:
                    g = math.exp(vals[k] - m) * k_exp - k_w * wj
                    if j == tt:
                        g -= k_hot
                    store(grad, r, j, g if (valid and not ignored) else (acc(nan) if not valid else acc(0.0)))
        if not in_regs:
            for j in range(lane, n_cols, group):
                xj = load(x, r, j)
                wj = acc(weight[j]) if has_w else acc(1.0)
                sum_wd += wj * (m - xj)
                if active and want_grad:
                    g = math.exp(xj - m) * k_exp - k_w * wj
                    if j == tt:
                        g -= k_hot
                    store(grad, r, j, g if (valid and not ignored) else (acc(nan) if not valid else acc(0.0)))
        sum_wd = sum_(sum_wd, sm_b)
        if active and lane == 0:
            if ignored:
                loss[r] = 0.0
            elif not valid:
                loss[r] = nan
            else:
                loss[r] = ce_index_loss(m, math.log(s), load(x, r, tt), w_t, sum_wd, w_sum, eps, n_cols)

    return kernel


@lru_cache(maxsize=None)
def cross_entropy_prob(dtype: str, group: int, threads: int, use_shuffle: bool):
    """Kernel ``(x, q, weight, has_w, eps, scale, loss, grad, want_grad)``: probability targets.

    ``a_j = w_j * ((1 - eps) * q_j + eps / C)``, ``loss = sum_j a_j * (m - x_j) + A * log s``,
    ``grad = (A * p_j - a_j) * scale``. Three passes over the row: (max, sum),
    (A, sum a_j (m - x_j)), gradient.
    """
    load, store, acc = codec(dtype)
    _, sum_, lse_ = reducers(group, threads, use_shuffle)
    neg_inf = -math.inf

    def kernel(x, q, weight, has_w, eps, scale, loss, grad, want_grad):
        n_rows, n_cols = x.shape
        lane, r, active = my_row(group, n_rows)
        sm_a = cuda.shared.array(threads, acc)
        sm_b = cuda.shared.array(threads, acc)
        m = acc(neg_inf)
        s = acc(0.0)
        for j in range(lane, n_cols, group):
            m, s = online_update(m, s, load(x, r, j))
        m, s = lse_(m, s, sm_a, sm_b)
        keep = acc(1.0) - eps
        spread = eps / n_cols
        a_sum = acc(0.0)
        sum_ad = acc(0.0)
        for j in range(lane, n_cols, group):
            wj = acc(weight[j]) if has_w else acc(1.0)
            a = wj * (keep * load(q, r, j) + spread)
            a_sum += a
            sum_ad += a * (m - load(x, r, j))
        a_sum = sum_(a_sum, sm_a)
        sum_ad = sum_(sum_ad, sm_b)
        if active:
            if lane == 0:
                loss[r] = sum_ad + a_sum * math.log(s)
            if want_grad:
                sc = acc(scale[0])
                k = a_sum * sc / s
                for j in range(lane, n_cols, group):
                    wj = acc(weight[j]) if has_w else acc(1.0)
                    a = wj * (keep * load(q, r, j) + spread)
                    store(grad, r, j, math.exp(load(x, r, j) - m) * k - a * sc)

    return kernel


@lru_cache(maxsize=None)
def scale_rows(dtype: str):
    """Kernel ``(src, factor, out)``: ``out[i, j] = src[i, j] * factor[i]``, one thread per element."""
    load, store, acc = codec(dtype)

    def kernel(src, factor, out):
        n_rows, n_cols = src.shape
        i = int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        stride = int64(cuda.gridDim.x) * cuda.blockDim.x
        total = n_rows * n_cols
        while i < total:
            r = i // n_cols
            c = i - r * n_cols
            store(out, r, c, load(src, r, c) * acc(factor[r]))
            i += stride

    return kernel


@lru_cache(maxsize=None)
def jit(pyfunc):
    """The launchable kernel for a factory's Python function."""
    return cuda.jit(pyfunc)


# --- every kernel signature, for the PTX compile test ---------------------------------


def ptx_signatures():
    """``(name, pyfunc, signature)`` for every kernel and dtype the backend launches."""
    out = []
    shuffle = config.CUDA_USE_SHUFFLE
    threads = config.CUDA_THREADS_PER_BLOCK
    for dtype, elem in DTYPES.items():
        acc = float64 if dtype == "float64" else float32
        mat = elem[:, ::1]
        for group, _, items in (plan(1), plan(config.CUDA_WARP_ROW_MAX_COLS + 1)):
            shape = f"group{group}"
            for log in (False, True):
                op = "log_softmax" if log else "softmax"
                out.append((f"{op}_forward[{dtype},{shape}]", softmax_forward(dtype, log, group, threads, items, shuffle), void(mat, mat)))
                out.append((f"{op}_backward[{dtype},{shape}]", softmax_backward(dtype, log, group, threads, items, shuffle), void(mat, mat, mat)))
            wvec = acc[::1]
            out.append(
                (
                    f"cross_entropy_index[{dtype},{shape}]",
                    cross_entropy_index(dtype, group, threads, items, shuffle),
                    void(mat, int64[::1], wvec, boolean, int64, acc, float64[::1], float64[::1], mat, boolean),
                )
            )
            out.append(
                (
                    f"cross_entropy_prob[{dtype},{shape}]",
                    cross_entropy_prob(dtype, group, threads, shuffle),
                    void(mat, mat, wvec, boolean, acc, float64[::1], float64[::1], mat, boolean),
                )
            )
        out.append((f"scale_rows[{dtype}]", scale_rows(dtype), void(mat, float64[::1], mat)))
    return out
