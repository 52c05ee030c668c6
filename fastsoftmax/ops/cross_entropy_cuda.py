"""Cross-entropy on CUDA: the forward saves row statistics, the backward rebuilds the gradient.

The CPU saves the gradient the forward computes (one read and one write of
N x C, the backward free when grad_output is 1, which the CPU can test for
nothing). On CUDA that test would synchronise, and scaling a saved gradient
costs a second read and write. Here the forward reads the logits once and
saves ``(m, s, A)`` per row (and the mean's denominator): an ``(R + 1, 3)``
tensor; the backward reads the logits again and writes
``g * (A * exp(x - m) / s - a)`` with grad_output ``g`` read on the device.
Two reads and one write of N x C, no synchronisation, no N x C buffer kept
from the forward to the backward.
"""

import math

import torch
from torch import Tensor

from ..kernels import config
from .layout import as_rows, launch_scope, rows_last, to_dtype

#: Columns of the saved statistics: ``m``, ``s``, ``A`` per row (and the
#: mean's denominator in the first column of one more row).
STATS_COLUMNS = 3


def rebuilds_gradient(dev, z_loss: float = 0.0, want_lse: bool = False) -> bool:
    """Whether the forward saves row statistics and the backward rebuilds the gradient (CUDA).

    The CUDA kernels have no z-loss and no log-sum-exp output yet: those
    calls take the torch-op path (:func:`.cross_entropy_graph.forward_torch_ops`),
    which saves a gradient like the CPU.
    """
    return dev.name == "cuda" and not z_loss and not want_lse


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def n_rows(input: Tensor) -> int:
    """Loss elements of ``input``: the product of its sizes other than the class dimension."""
    shape = list(input.shape)
    del shape[0 if input.ndim == 1 else 1]
    return math.prod(shape)


def stats_fake(input: Tensor) -> Tensor:
    return input.new_empty((n_rows(input) + 1, STATS_COLUMNS), dtype=acc_dtype(input.dtype))


def _rows(input: Tensor, target: Tensor, prob: bool):
    """``(x, t, rows shape)``: the logits as ``(R, C)`` rows in their own dtype, the targets as rows
    (int64 indices, or probabilities in the logits' dtype), and the shape of the logits with C last."""
    if input.ndim == 1:
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    xr = rows_last(input, 1, input.dtype)
    t = as_rows(rows_last(target, 1, input.dtype)) if prob else to_dtype(target.reshape(-1), torch.int64).contiguous()
    return as_rows(xr), t, xr.shape


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def forward_stats(dev, input, target, weight, ignore_index, reduction, label_smoothing, prob, loss_shape):
    """The loss, and the ``(R + 1, 3)`` statistics :func:`grad_from_stats` needs."""
    be, arr = dev.kernels(), dev.array
    x2, t2, _ = _rows(input, target, prob)
    rows = x2.shape[0]
    acc = acc_dtype(input.dtype)
    w = arr(rows_last(weight, 0, acc)) if weight is not None else None  # float32 weights, never rounded to the input's dtype
    loss_rows = dev.empty((rows,), acc, input.device)
    saved = dev.empty((rows + 1, STATS_COLUMNS), acc, input.device)
    out = dev.empty((1,), input.dtype, input.device) if reduction != "none" else None
    x, loss_a, out_a, saved_a = arr(x2), arr(loss_rows), (arr(out) if out is not None else None), arr(saved)
    with launch_scope(x) as stream:
        if prob:
            be.cross_entropy_prob(x, arr(t2), w, label_smoothing, reduction, loss_a, out_a, saved_a, stream)
        else:
            check = config.CUDA_CHECK_TARGETS and not _capturing()  # the one host synchronisation
            be.cross_entropy_index(x, arr(t2), w, ignore_index, label_smoothing, reduction, loss_a, out_a, saved_a, stream, check)
    loss = out.view(()) if out is not None else to_dtype(loss_rows.view(loss_shape), input.dtype)
    return loss, saved


def grad_from_stats(dev, input, target, weight, saved, grad_output, ignore_index, reduction, label_smoothing, prob) -> Tensor:
    """d(loss)/d(input) from the logits and :func:`forward_stats`'s statistics, times ``grad_output``.

    ``grad_output`` stays on the device: a scalar (mean, sum) or one value
    per loss element (none). The gradient is laid out like the CPU's.
    """
    be, arr = dev.kernels(), dev.array
    x2, t2, rows_shape = _rows(input, target, prob)
    acc = acc_dtype(input.dtype)
    w = arr(rows_last(weight, 0, acc)) if weight is not None else None
    grad = dev.empty(x2.shape, input.dtype, input.device)
    go = to_dtype(grad_output, input.dtype).reshape(-1).contiguous()
    x, t, g = arr(x2), arr(t2), arr(grad)
    with launch_scope(x) as stream:
        if prob:
            be.cross_entropy_prob_backward(x, t, w, label_smoothing, reduction, arr(saved), arr(go), g, stream)
        else:
            be.cross_entropy_index_backward(x, t, w, ignore_index, label_smoothing, reduction, arr(saved), arr(go), g, stream)
    if input.ndim == 1:
        return grad.squeeze(0)
    return grad.view(rows_shape).movedim(-1, 1) if input.ndim > 2 else grad
