"""The CPU backend: torch tensors in, NumPy views out, Numba kernels run.

Every function takes C-contiguous 2-D tensors ``(R, C)`` already in the
compute dtype, as prepared by :mod:`fastsoftmax._host`, and writes into the
outputs it is given. ``tensor.numpy()`` shares memory, so nothing is copied.
"""

import numpy as np
import torch

from . import _pool
from .kernels import cpu

empty = _pool.empty

_NO_WEIGHT = {np.float32: np.empty(0, np.float32), np.float64: np.empty(0, np.float64)}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _weight(weight, like: np.ndarray) -> np.ndarray:
    if weight is None:
        return _NO_WEIGHT[like.dtype.type]
    return _np(weight)


def softmax_forward(x, y, log: bool) -> None:
    kernel = cpu.log_softmax_forward if log else cpu.softmax_forward
    cpu.pick(kernel, x.numel())(_np(x), _np(y))


def softmax_backward(y, dy, dx, log: bool) -> None:
    kernel = cpu.log_softmax_backward if log else cpu.softmax_backward
    cpu.pick(kernel, y.numel())(_np(y), _np(dy), _np(dx))


def check_targets(target, n_classes: int, ignore_index: int, weight, like):
    """(first bad position or -1, total weight of kept rows, kept rows)."""
    w = _weight(weight, _np(like)) if weight is not None else _NO_WEIGHT[np.float64]
    return cpu.check_targets(_np(target), n_classes, ignore_index, w)


def cross_entropy_index(x, target, weight, ignore_index, eps, scale, loss, grad) -> None:
    xn = _np(x)
    cpu.pick(cpu.cross_entropy_index, x.numel())(
        xn, _np(target), _weight(weight, xn), ignore_index, eps, scale, _np(loss), _np(grad)
    )


def cross_entropy_prob(x, q, weight, eps, scale, loss, grad) -> None:
    xn = _np(x)
    cpu.pick(cpu.cross_entropy_prob, x.numel())(xn, _np(q), _weight(weight, xn), eps, scale, _np(loss), _np(grad))


def scale_rows(src, factor, out) -> None:
    cpu.pick(cpu.scale_rows, src.numel())(_np(src), _np(factor), _np(out))


def copy(src, out) -> None:
    np.copyto(_np(out), _np(src))


def is_one(t) -> bool:
    """Whether a one-element tensor is exactly 1 (the grad_output of ``loss.backward()``)."""
    return t.item() == 1.0
