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

import numba
import numpy as np

from ..errors import bad_target
from ..kernels import config, cpu_middle, cpu_rows

_NO_WEIGHT = {np.float32: np.empty(0, np.float32), np.float64: np.empty(0, np.float64)}


def _weight(weight, like: np.ndarray) -> np.ndarray:
    return _NO_WEIGHT[like.dtype.type] if weight is None else weight


def _workers(n_rows: int, n_cols: int) -> int:
    """How many threads work on an ``(n_rows, n_cols)`` input: 1 (the serial twin) below :data:`config.CPU_PARALLEL_MIN_ELEMENTS`."""
    if n_rows * n_cols < config.CPU_PARALLEL_MIN_ELEMENTS:
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
    """Run ``kernel`` (its serial twin for one worker) on ``args``, a fresh work queue, then ``last``."""
    workers = _workers(n_rows, n_cols) if workers is None else workers
    queue = _queue(n_rows, n_cols, workers)
    if workers == 1:
        return kernel[False](*args, queue, *last)
    # one loop iteration per chunk, so that no thread runs two workers
    previous = numba.set_parallel_chunksize(1)
    try:
        kernel[True](*args, queue, *last)
    finally:
        numba.set_parallel_chunksize(previous)


def _launch_forward(kernel, out, *args) -> None:
    """:func:`_launch` for a forward kernel, with its scratch rows (one per worker) before the queue.

    When ``out`` is too large for the cache, the kernels build each row in
    their worker's scratch row and stream it to ``out`` with non-temporal
    stores (see :func:`kernels.cpu_rows._softmax_forward`); otherwise the scratch
    has no columns and rows are built in place.
    """
    n_rows, n_cols = out.shape
    workers = _workers(n_rows, n_cols)
    stream = workers > 1 and out.nbytes >= config.CPU_STREAM_MIN_BYTES
    scratch = np.empty((workers, n_cols if stream else 0), dtype=out.dtype)
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


def _scale(denom: float, reduction: str) -> float:
    """The factor the reduction puts on each row's gradient."""
    if reduction != "mean":
        return 1.0
    return 1.0 / denom if denom else 0.0


def _check_targets(targets: np.ndarray, n_classes: int, ignore_index: int, weight: np.ndarray) -> float:
    """Raise for a class index out of range; return the mean's denominator (total kept weight)."""
    flat = targets.reshape(-1)
    bad, denom, _ = cpu_rows.check_targets(flat, n_classes, ignore_index, weight)
    if bad >= 0:
        raise bad_target(int(flat[bad]), bad, n_classes, ignore_index)
    return denom


def cross_entropy_index(x, target, weight, ignore_index, eps, reduction, loss, grad) -> float:
    """Checks the targets, runs the fused kernel, returns the mean's denominator (total kept weight)."""
    w = _weight(weight, x)
    denom = _check_targets(target, x.shape[1], ignore_index, w)
    if x.shape[0]:
        args = (x, target, w, ignore_index, eps, _scale(denom, reduction), loss, grad)
        _launch_forward(cpu_rows.cross_entropy_index, x, *args)
    return denom


def cross_entropy_index_middle(x, target, weight, ignore_index, eps, reduction, loss, grad) -> float:
    """:func:`cross_entropy_index` for logits ``(O, C, I)`` reduced over the middle axis, targets and loss ``(O, I)``."""
    w = _weight(weight, x)
    denom = _check_targets(target, x.shape[1], ignore_index, w)
    if x.size:
        args = (target, w, ignore_index, eps, _scale(denom, reduction), loss, grad)
        _launch_middle(cpu_middle.cross_entropy_index_middle, x, *args, scratch_rows=5)
    return denom


def cross_entropy_prob(x, q, weight, eps, reduction, loss, grad) -> float:
    denom = float(x.shape[0])
    if x.shape[0]:
        args = (x, q, _weight(weight, x), eps, _scale(denom, reduction), loss, grad)
        _launch_forward(cpu_rows.cross_entropy_prob, x, *args)
    return denom


def cross_entropy_prob_middle(x, q, weight, eps, reduction, loss, grad) -> float:
    """:func:`cross_entropy_prob` for logits and probabilities ``(O, C, I)`` reduced over the middle axis, loss ``(O, I)``."""
    denom = float(loss.size)
    if x.size:
        args = (q, _weight(weight, x), eps, _scale(denom, reduction), loss, grad)
        _launch_middle(cpu_middle.cross_entropy_prob_middle, x, *args, scratch_rows=3, total_rows=3)
    return denom


def scale_rows(src, factor, out) -> None:
    _launch(cpu_rows.scale_rows, *src.shape, src, factor, out)
