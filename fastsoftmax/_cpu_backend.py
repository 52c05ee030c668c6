"""The CPU backend: torch tensors in, NumPy views out, Numba kernels run.

Every function takes C-contiguous 2-D tensors ``(R, C)`` already in the
compute dtype, as prepared by :mod:`fastsoftmax._host`, and writes into the
outputs it is given. ``tensor.numpy()`` shares memory, so nothing is copied.

Work is split into :data:`config.CPU_CHUNKS_PER_THREAD` chunks per thread,
scheduled dynamically: on a shared or virtual machine one descheduled thread
then delays the op by one chunk rather than by half of it.
"""

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
_SERIAL = {torch.float32: np.empty((1, 0), np.float32), torch.float64: np.empty((1, 0), np.float64)}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _weight(weight, like: np.ndarray) -> np.ndarray:
    if weight is None:
        return _NO_WEIGHT[like.dtype.type]
    return _np(weight)


def _launch(kernel, n_rows: int, n_cols: int, *args, items_per_chunk: int = 1) -> None:
    """Run the serial twin of ``kernel`` on small inputs, else the parallel one, dynamically scheduled.

    ``items_per_chunk``: how many iterations of the kernel's parallel loop
    make one chunk (1 for kernels whose loop is already over chunks of rows).
    """
    if n_rows * n_cols < config.CPU_PARALLEL_MIN_ELEMENTS:
        return kernel[False](*args)
    previous = numba.set_parallel_chunksize(items_per_chunk)
    try:
        kernel[True](*args)
    finally:
        numba.set_parallel_chunksize(previous)


def _row_chunk(n_rows: int) -> int:
    return max(1, n_rows // (numba.get_num_threads() * config.CPU_CHUNKS_PER_THREAD))


def _scratch(out) -> np.ndarray:
    """The chunks of rows of a forward kernel: one scratch row each when ``out`` is too large for the cache.

    The kernels build each row in its chunk's scratch row and stream it to
    ``out`` with non-temporal stores (see :func:`kernels.cpu._softmax_forward`).
    """
    n_rows, n_cols = out.shape
    if n_rows * n_cols < config.CPU_PARALLEL_MIN_ELEMENTS:
        return _SERIAL[out.dtype]  # one chunk, nothing streamed
    chunks = min(n_rows, numba.get_num_threads() * config.CPU_CHUNKS_PER_THREAD)
    stream = out.numel() * out.element_size() >= config.CPU_STREAM_MIN_BYTES
    return np.empty((chunks, n_cols if stream else 0), dtype=_np(out).dtype)


def softmax_forward(x, y, log: bool) -> None:
    kernel = cpu.log_softmax_forward if log else cpu.softmax_forward
    _launch(kernel, *x.shape, _np(x), _np(y), _scratch(y))


def softmax_backward(y, dy, dx, log: bool) -> None:
    kernel = cpu.log_softmax_backward if log else cpu.softmax_backward
    _launch(kernel, *y.shape, _np(y), _np(dy), _np(dx), items_per_chunk=_row_chunk(y.shape[0]))


def _scale(denom: float, reduction: str) -> float:
    """The factor the reduction puts on each row's gradient."""
    if reduction != "mean":
        return 1.0
    return 1.0 / denom if denom else 0.0


def cross_entropy_index(x, target, weight, ignore_index, eps, reduction, loss, grad) -> float:
    """Checks the targets, runs the fused kernel, returns the mean's denominator (total kept weight)."""
    xn = _np(x)
    tn = _np(target)
    w = _weight(weight, xn)
    bad, denom, _ = cpu.check_targets(tn, x.shape[1], ignore_index, w)
    if bad >= 0:
        from ._host import raise_bad_target

        raise_bad_target(int(tn[bad]), bad, x.shape[1], ignore_index)
    if x.shape[0]:
        args = (xn, tn, w, ignore_index, eps, _scale(denom, reduction), _np(loss), _np(grad), _scratch(x))
        _launch(cpu.cross_entropy_index, *x.shape, *args)
    return denom


def cross_entropy_prob(x, q, weight, eps, reduction, loss, grad) -> float:
    denom = float(x.shape[0])
    if x.shape[0]:
        xn = _np(x)
        args = (xn, _np(q), _weight(weight, xn), eps, _scale(denom, reduction), _np(loss), _np(grad), _scratch(x))
        _launch(cpu.cross_entropy_prob, *x.shape, *args)
    return denom


def scale_rows(src, factor, out) -> None:
    _launch(cpu.scale_rows, *src.shape, _np(src), _np(factor), _np(out), items_per_chunk=_row_chunk(src.shape[0]))


def copy(src, out) -> None:
    np.copyto(_np(out), _np(src))
