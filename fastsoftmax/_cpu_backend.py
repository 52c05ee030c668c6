"""The CPU backend: torch tensors in, NumPy views out, Numba kernels run.

Every function takes C-contiguous 2-D tensors ``(R, C)`` already in the
compute dtype, as prepared by :mod:`fastsoftmax._host`, and writes into the
outputs it is given. ``tensor.numpy()`` shares memory, so nothing is copied.

The parallel kernels run one worker per thread; the workers claim rows from
a shared counter, :data:`config.CPU_CLAIMS_PER_THREAD` claims' worth per
thread (see :mod:`kernels.cpu`). On a shared or virtual machine, where one
thread often runs slower than the other, the faster one then takes more
rows instead of waiting for the slower one at the end.
"""

import math

import numba
import numpy as np
import torch

from . import _pool
from .kernels import config, cpu

#: The CPU kernels compute in float32 or float64: half-precision inputs are
#: converted to float32 first and results converted back.
_COMPUTE = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32, torch.float64: torch.float64}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return _COMPUTE[dtype]


def empty(shape, dtype: torch.dtype, device=None) -> torch.Tensor:
    return _pool.empty(shape, dtype)

_NO_WEIGHT = {np.float32: np.empty(0, np.float32), np.float64: np.empty(0, np.float64)}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _weight(weight, like: np.ndarray) -> np.ndarray:
    if weight is None:
        return _NO_WEIGHT[like.dtype.type]
    return _np(weight)


def _workers(n_rows: int, n_cols: int) -> int:
    """How many threads work on an ``(n_rows, n_cols)`` input: 1 (the serial twin) below :data:`config.CPU_PARALLEL_MIN_ELEMENTS`."""
    if n_rows * n_cols < config.CPU_PARALLEL_MIN_ELEMENTS:
        return 1
    return max(1, min(n_rows, numba.get_num_threads()))


def _queue(n_rows: int, n_cols: int, workers: int) -> np.ndarray:
    """A fresh work queue ``[next row, rows per claim, workers]`` for the kernels of :mod:`kernels.cpu`.

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
    stores (see :func:`kernels.cpu._softmax_forward`); otherwise the scratch
    has no columns and rows are built in place.
    """
    n_rows, n_cols = out.shape
    workers = _workers(n_rows, n_cols)
    stream = workers > 1 and out.numel() * out.element_size() >= config.CPU_STREAM_MIN_BYTES
    scratch = np.empty((workers, n_cols if stream else 0), dtype=_np(out).dtype)
    _launch(kernel, n_rows, n_cols, *args, scratch, workers=workers)


def softmax_forward(x, y, log: bool) -> None:
    kernel = cpu.log_softmax_forward if log else cpu.softmax_forward
    _launch_forward(kernel, y, _np(x), _np(y))


def softmax_backward(y, dy, dx, log: bool) -> None:
    _launch(cpu.softmax_backward, *y.shape, _np(y), _np(dy), _np(dx), last=(log,))


# --- softmax over a middle axis ---------------------------------------------------


def middle_shape(x: torch.Tensor, dim: int):
    """``(outer, C, inner)`` when the middle-axis kernels should reduce ``dim`` of ``x`` in place, else None.

    They are used when ``dim`` is not last, moving it last would copy (so not
    for, say, a channels-last tensor and ``dim=1``, whose classes are already
    stored last), and there are at least :data:`config.CPU_MIDDLE_MIN_INNER`
    inner positions to vectorise over.
    """
    if dim == x.ndim - 1 or x.movedim(dim, -1).is_contiguous():
        return None
    inner = math.prod(x.shape[dim + 1 :])
    if inner < config.CPU_MIDDLE_MIN_INNER:
        return None
    return math.prod(x.shape[:dim]), x.shape[dim], inner


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
    """Softmax (or log-softmax) over the middle axis of contiguous ``(O, C, I)`` tensors."""
    _launch_middle(cpu.softmax_forward_middle, _np(x), _np(y), last=(log,))


def softmax_backward_middle(y, dy, dx, log: bool) -> None:
    _launch_middle(cpu.softmax_backward_middle, _np(y), _np(dy), _np(dx), last=(log,))


def _scale(denom: float, reduction: str) -> float:
    """The factor the reduction puts on each row's gradient."""
    if reduction != "mean":
        return 1.0
    return 1.0 / denom if denom else 0.0


def _check_targets(targets: np.ndarray, n_classes: int, ignore_index: int, weight: np.ndarray) -> float:
    """Raise for a class index out of range; return the mean's denominator (total kept weight)."""
    flat = targets.reshape(-1)
    bad, denom, _ = cpu.check_targets(flat, n_classes, ignore_index, weight)
    if bad >= 0:
        from ._host import raise_bad_target

        raise_bad_target(int(flat[bad]), bad, n_classes, ignore_index)
    return denom


def cross_entropy_index(x, target, weight, ignore_index, eps, reduction, loss, grad) -> float:
    """Checks the targets, runs the fused kernel, returns the mean's denominator (total kept weight)."""
    xn = _np(x)
    tn = _np(target)
    w = _weight(weight, xn)
    denom = _check_targets(tn, x.shape[1], ignore_index, w)
    if x.shape[0]:
        args = (xn, tn, w, ignore_index, eps, _scale(denom, reduction), _np(loss), _np(grad))
        _launch_forward(cpu.cross_entropy_index, x, *args)
    return denom


def cross_entropy_index_middle(x, target, weight, ignore_index, eps, reduction, loss, grad) -> float:
    """:func:`cross_entropy_index` for logits ``(O, C, I)`` reduced over the middle axis, targets and loss ``(O, I)``."""
    xn = _np(x)
    tn = _np(target)
    w = _weight(weight, xn)
    denom = _check_targets(tn, x.shape[1], ignore_index, w)
    if x.numel():
        args = (tn, w, ignore_index, eps, _scale(denom, reduction), _np(loss), _np(grad))
        _launch_middle(cpu.cross_entropy_index_middle, xn, *args, scratch_rows=5)
    return denom


def cross_entropy_prob(x, q, weight, eps, reduction, loss, grad) -> float:
    denom = float(x.shape[0])
    if x.shape[0]:
        xn = _np(x)
        args = (xn, _np(q), _weight(weight, xn), eps, _scale(denom, reduction), _np(loss), _np(grad))
        _launch_forward(cpu.cross_entropy_prob, x, *args)
    return denom


def cross_entropy_prob_middle(x, q, weight, eps, reduction, loss, grad) -> float:
    """:func:`cross_entropy_prob` for logits and probabilities ``(O, C, I)`` reduced over the middle axis, loss ``(O, I)``."""
    denom = float(loss.numel())
    if x.numel():
        xn = _np(x)
        args = (_np(q), _weight(weight, xn), eps, _scale(denom, reduction), _np(loss), _np(grad))
        _launch_middle(cpu.cross_entropy_prob_middle, xn, *args, scratch_rows=3, total_rows=3)
    return denom


def scale_rows(src, factor, out) -> None:
    _launch(cpu.scale_rows, *src.shape, _np(src), _np(factor), _np(out))


def copy(src, out) -> None:
    np.copyto(_np(out), _np(src))
