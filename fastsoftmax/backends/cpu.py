"""The CPU backend: NumPy arrays in, Numba kernels of :mod:`fastsoftmax.kernels` run.

No torch here. Every function takes C-contiguous arrays already in the
compute dtype (float32 or float64): ``(R, C)`` rows for the row kernels,
``(O, C, I)`` for the middle-axis ones. It writes into the outputs it is
given, after checking what the kernels cannot (Numba does no bounds checks).

The parallel kernels run one worker per thread; the workers claim rows from
a shared counter, :data:`config.CPU_CLAIMS_PER_THREAD` claims' worth per
thread (see :mod:`kernels.cpu_common`). On a shared or virtual machine, where one
thread often runs slower than the other, the faster one then takes more
rows instead of waiting for the slower one at the end.
"""

import contextlib
import math
import os
import threading

import numba
import numpy as np

from ..errors import bad_target
from ..kernels import config, cpu_common, cpu_lse, cpu_middle, cpu_rows, cpu_small

_NO_WEIGHT = {np.float32: np.empty(0, np.float32), np.float64: np.empty(0, np.float64)}
_F64 = _NO_WEIGHT[np.float64]


def _weight(weight, like: np.ndarray) -> np.ndarray:
    """``weight``, or an empty array of ``like``'s dtype for none (the kernels take the two as one type)."""
    return _NO_WEIGHT[like.dtype.type] if weight is None else weight


class _Threads:
    """Whether the parallel twins may run here, and the lock that serialises them where Numba needs it.

    * In a child forked from a process that has run a parallel kernel, GNU
      OpenMP's thread pool is gone and using it aborts the process ("fork()
      called from a process already using GNU OpenMP"); torch drops to one
      thread there, and so do we: the child runs the serial twins, which
      compute the same bits (the sums have one fixed order).
    * Numba's ``workqueue`` layer (no OpenMP, no TBB installed) is not
      thread-safe: two Python threads launching parallel kernels at once
      abort the process. Under it, parallel launches take a lock.
    """

    parallel = True
    lock = None
    _init = threading.Lock()

    @classmethod
    def after_fork_in_child(cls):
        cls.parallel = False

    @classmethod
    def launch_lock(cls):
        if cls.lock is None:
            with cls._init:
                if cls.lock is None:
                    from numba.np.ufunc import parallel as numba_parallel

                    numba_parallel._launch_threads()  # picks the layer, as a first parallel launch would
                    layer = numba.threading_layer()
                    cls.lock = threading.Lock() if layer == "workqueue" else contextlib.nullcontext()
        return cls.lock


os.register_at_fork(after_in_child=_Threads.after_fork_in_child)


def _workers(n_rows: int, n_cols: int) -> int:
    """How many threads work on an ``(n_rows, n_cols)`` input: 1 below :data:`config.CPU_PARALLEL_MIN_ELEMENTS`."""
    if n_rows * n_cols < config.CPU_PARALLEL_MIN_ELEMENTS or not _Threads.parallel:
        return 1
    return max(1, min(n_rows, numba.get_num_threads()))


def _queue(n_rows: int, n_cols: int, workers: int) -> np.ndarray:
    """A fresh work queue ``[next row, rows per claim, workers]`` for the kernels of :mod:`kernels.cpu_common`.

    About :data:`config.CPU_CLAIMS_PER_THREAD` claims per worker, each of at
    least :data:`config.CPU_MIN_CLAIM_ELEMENTS` elements.
    """
    per_claim = max(-(-n_rows // (workers * config.CPU_CLAIMS_PER_THREAD)), -(-config.CPU_MIN_CLAIM_ELEMENTS // max(n_cols, 1)))
    return np.array([0, per_claim, workers], dtype=np.int64)


def _launch(kernel, n_rows: int, n_cols: int, *args, workers: int | None = None, last: tuple = ()) -> None:
    """Run ``kernel`` on ``args``, a fresh work queue, then ``last``: its serial twin for one worker.

    The serial twin also runs where no thread pool may be used (a forked
    child); it computes the same bits as the parallel one. Small inputs take
    it too: waking the pool for one loop iteration costs from microseconds to
    hundreds of them on a busy machine, more than the work.
    """
    workers = _workers(n_rows, n_cols) if workers is None else workers
    queue = _queue(n_rows, n_cols, workers)
    if workers == 1 or not _Threads.parallel:
        return kernel[False](*args, queue, *last)
    with _Threads.launch_lock():
        # one loop iteration per chunk, so that no thread runs two workers
        previous = numba.set_parallel_chunksize(1)
        try:
            kernel[True](*args, queue, *last)
        finally:
            numba.set_parallel_chunksize(previous)


def _launch_forward(kernel, out, *args) -> None:
    """:func:`_launch` for a forward kernel, with its scratch rows (one per worker) before the queue.

    Each scratch row ends in a block of ``cpu_common.BLOCK`` elements. When
    ``out`` is too large for the cache, the kernels build each row in the
    part before it and stream it to ``out`` with non-temporal stores (see
    :func:`kernels.cpu_rows._softmax_forward`); otherwise that part has no
    columns and rows are built in place.
    """
    n_rows, n_cols = out.shape
    workers = _workers(n_rows, n_cols)
    stream = workers > 1 and out.nbytes >= config.CPU_STREAM_MIN_BYTES
    scratch = np.empty((workers, (n_cols if stream else 0) + cpu_common.BLOCK), dtype=out.dtype)
    _launch(kernel, n_rows, n_cols, *args, scratch, workers=workers)


def softmax_forward(x, y, log: bool) -> None:
    kernel = cpu_rows.log_softmax_forward if log else cpu_rows.softmax_forward
    _launch_forward(kernel, y, x, y)


def softmax_backward(y, dy, dx, log: bool) -> None:
    _launch(cpu_rows.softmax_backward, *y.shape, y, dy, dx, last=(log,))


# --- softmax over a middle axis ---------------------------------------------------


def _launch_middle(kernel, x: np.ndarray, *args, scratch_rows: int = 2, total_rows: int = 2, last: tuple = ()) -> None:
    """Run a middle-axis kernel on ``x`` (O, C, I) and ``args``, then its scratch, a work queue and ``last``.

    Scratch: ``(workers, scratch_rows, W)`` in ``x``'s dtype and ``(workers, total_rows, W)`` float64.
    """
    n_outer, n_classes, n_inner = x.shape
    width = config.CPU_MIDDLE_BLOCK_BYTES // (2 * n_classes * x.itemsize)
    width = min(n_inner, max(16, width // 16 * 16))
    n_items = n_outer * -(-n_inner // width)
    workers = _workers(n_items, n_classes * width)
    scratch = np.empty((workers, scratch_rows, width), dtype=x.dtype)
    totals = np.empty((workers, total_rows, width), dtype=np.float64)
    _launch(kernel, n_items, n_classes * width, x, *args, scratch, totals, workers=workers, last=last)


def softmax_forward_middle(x, y, log: bool) -> None:
    """Softmax (or log-softmax) over the middle axis of contiguous ``(O, C, I)`` arrays."""
    _launch_middle(cpu_middle.softmax_forward_middle, x, y, last=(log,))


def softmax_backward_middle(y, dy, dx, log: bool) -> None:
    _launch_middle(cpu_middle.softmax_backward_middle, y, dy, dx, last=(log,))


# --- rows of a few classes, small inputs: one serial call ------------------------


def small_rows(n_rows: int, n_classes: int) -> bool:
    """Whether rows ``(R, C)`` take the one-call kernels of :mod:`kernels.cpu_small`: few classes, no threads."""
    return 0 < n_classes <= config.CPU_SMALL_CLASSES and 0 < n_rows * n_classes < config.CPU_PARALLEL_MIN_ELEMENTS


def softmax_forward_small(x, y, log: bool) -> None:
    cpu_small.softmax_forward_small(x, y, log)


def softmax_backward_small(y, dy, dx, log: bool) -> None:
    cpu_small.softmax_backward_small(y, dy, dx, log)


def cross_entropy_small(x, target, ignore_index: int, eps: float, reduction: str, loss, grad) -> float:
    """The plain cross-entropy (no weights) on :func:`small_rows`, targets checked in the same call; returns the kept total.

    ``loss`` (R,) gets the per-row losses, ``grad`` (R, C) or no rows the
    gradient scaled for ``reduction``. A bad class index raises IndexError
    before any logit is read.
    """
    bad, denom = cpu_small.cross_entropy_small(x, target, ignore_index, eps, reduction == "mean", loss, grad)
    if bad >= 0:
        raise bad_target(int(target[bad]), bad, x.shape[1], ignore_index)
    return denom


#: The book's one-call kernels (:mod:`kernels.cpu_small`), by dtype (NumPy's or torch's), called without Numba's
#: type dispatch and with the tensors' addresses: ``SOFTMAX_FORWARD[dtype](x, y, n_rows, n_cols, log)``,
#: ``SOFTMAX_BACKWARD[dtype](y, dy, dx, n_rows, n_cols, dy_row_stride, dy_col_stride, log)``,
#: ``CROSS_ENTROPY_BOOK[dtype](x, target, grad, loss, n_rows, n_cols, ignore_index, eps, mean) -> bad``.
#: Nothing checks the addresses: callers hold the guarantees of :mod:`kernels.pointers`.
SOFTMAX_FORWARD = cpu_small.SOFTMAX_FORWARD
SOFTMAX_BACKWARD = cpu_small.SOFTMAX_BACKWARD
CROSS_ENTROPY_BOOK = cpu_small.CROSS_ENTROPY_BOOK


def total(losses: np.ndarray) -> float:
    """The sum of float64 per-element losses, in the fixed order every CPU path uses (:func:`kernels.cpu_small._total`)."""
    return cpu_small.total(losses.reshape(-1)) if losses.size else 0.0


def scales(denom: float, count: int, reduction: str, z_loss: float) -> tuple:
    """``(scale, z_scale)``: the factors the reduction puts on each row's cross-entropy gradient and on ``lse**2``.

    A mean divides the cross-entropy by the total weight of the kept targets
    (torch's rule) and the z-loss by their number (PaLM's, Liger's). When
    that total is 0 torch's mean is 0/0, so its gradient is NaN: the scale
    is NaN too.
    """
    if reduction != "mean":
        return 1.0, z_loss
    return (1.0 / denom if denom else math.nan), (z_loss / count if count else 0.0)


def check_targets(targets: np.ndarray, n_classes: int, ignore_index: int, weight) -> tuple:
    """Raise IndexError for a class index out of range; return ``(total kept weight, kept count)``."""
    flat = targets.reshape(-1)
    bad, denom, count = cpu_rows.check_targets(flat, n_classes, ignore_index, _weight(weight, _F64))
    if bad >= 0:
        raise bad_target(int(flat[bad]), bad, n_classes, ignore_index)
    return denom, count


def cross_entropy_index(x, target, weight, ignore_index, eps, scale, z_scale, loss, lse, grad) -> None:
    """The fused kernel on rows ``x`` (R, C), targets already checked (:func:`check_targets`).

    ``lse`` and ``grad`` may be empty (not wanted); ``grad`` may be ``x`` (in place).
    """
    if x.shape[0]:
        args = (x, target, _weight(weight, x), ignore_index, eps, scale, z_scale, loss, lse, grad)
        _launch_forward(cpu_rows.cross_entropy_index, x, *args)


def cross_entropy_index_middle(x, target, weight, ignore_index, eps, scale, z_scale, loss, lse, grad) -> None:
    """:func:`cross_entropy_index` for logits ``(O, C, I)`` reduced over the middle axis, targets, loss and lse ``(O, I)``."""
    if x.size:
        args = (target, _weight(weight, x), ignore_index, eps, scale, z_scale, loss, lse, grad)
        _launch_middle(cpu_middle.cross_entropy_index_middle, x, *args, scratch_rows=6)


def cross_entropy_prob(x, q, weight, eps, scale, z_scale, loss, lse, grad) -> None:
    """Fused cross-entropy with class probabilities ``q`` (R, C); arguments as in :func:`cross_entropy_index`."""
    if x.shape[0]:
        args = (x, q, _weight(weight, x), eps, scale, z_scale, loss, lse, grad)
        _launch_forward(cpu_rows.cross_entropy_prob, x, *args)


def cross_entropy_prob_middle(x, q, weight, eps, scale, z_scale, loss, lse, grad) -> None:
    """:func:`cross_entropy_prob` for logits and probabilities ``(O, C, I)`` reduced over the middle axis."""
    if x.size:
        args = (q, _weight(weight, x), eps, scale, z_scale, loss, lse, grad)
        _launch_middle(cpu_middle.cross_entropy_prob_middle, x, *args, scratch_rows=3, total_rows=3)


def scale_rows(src, factor, out) -> None:
    """``out = src * factor[:, None]`` (``out`` may be ``src``)."""
    _launch(cpu_rows.scale_rows, *src.shape, src, factor, out)


# --- vocabulary-parallel cross-entropy: one rank's slice of the classes ------------------

from ..kernels import cpu_vocab  # noqa: E402  (appended with its section)


def vocab_partials(x, weight, row_max, row_sum, gap) -> None:
    """Pass 1 of :mod:`kernels.cpu_vocab` on the rank's logits ``x`` (R, V): local max, sum of exponentials, smoothing gap.

    ``gap`` may be empty (no label smoothing); outputs are float64 (R,).
    """
    if x.shape[0]:
        workers = _workers(*x.shape)
        scratch = np.empty((workers, cpu_common.BLOCK), dtype=x.dtype)
        args = (x, _weight(weight, x), row_max, row_sum, gap, scratch)
        _launch(cpu_vocab.vocab_partials, *x.shape, *args, workers=workers)


def vocab_gradient(x, target, v0, weight, ignore_index, eps, n_classes, w_sum, scale, row_max, row_sum, w_t, grad) -> None:
    """Pass 2 of :mod:`kernels.cpu_vocab`: the rank's slice ``grad`` (R, V) of the gradient, from the all-reduced rows."""
    if x.shape[0] and x.shape[1]:
        args = (x, target, v0, _weight(weight, x), ignore_index, eps, n_classes, w_sum, scale, row_max, row_sum, w_t, grad)
        _launch_forward(cpu_vocab.vocab_gradient, grad, *args)


# --- log-sum-exp (the array API) ---------------------------------------------------


def _lse_scratch(n_rows: int, n_cols: int, dtype) -> tuple:
    workers = _workers(n_rows, n_cols)
    return workers, np.empty((workers, cpu_common.BLOCK), dtype=dtype)


def logsumexp(x, out) -> None:
    """``out[i] = log(sum_j exp(x[i, j]))`` (float64, (R,)) for C-contiguous ``x`` (R, C): one read of ``x``."""
    if x.shape[0]:
        workers, scratch = _lse_scratch(*x.shape, x.dtype)
        _launch(cpu_lse.logsumexp_rows, *x.shape, x, out, scratch, workers=workers)


def logsumexp_middle(x, out) -> None:
    """``out[o, i] = log(sum_c exp(x[o, c, i]))`` (float64, (O, I)) for C-contiguous ``x`` (O, C, I)."""
    if x.size:
        _launch_middle(cpu_lse.logsumexp_middle, x, out, total_rows=1)


def logsumexp_weighted(x, b, out, sign) -> None:
    """``out[i] = log|sum_j b[i, j] exp(x[i, j])|``, ``sign[i]`` its sign (both float64, (R,)); ``x``, ``b`` (R, C) of one dtype."""
    if x.shape[0]:
        workers, scratch = _lse_scratch(*x.shape, x.dtype)
        _launch(cpu_lse.logsumexp_weighted_rows, *x.shape, x, b, out, sign, scratch, workers=workers)
