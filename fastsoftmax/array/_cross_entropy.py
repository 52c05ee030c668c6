r"""Fused softmax cross-entropy for arrays: the loss and, from the same pass, its gradient.

Per slice along the class axis, with :math:`\mathrm{lse} = m + \log \sum_c e^{x_c - m}`,
class weights :math:`w` and label smoothing :math:`\varepsilon` (PyTorch's
``cross_entropy``):

.. math::

    \ell = (1 - \varepsilon)\, w_t (\mathrm{lse} - x_t)
           + \frac{\varepsilon}{C} \sum_c w_c (\mathrm{lse} - x_c),
    \qquad
    \frac{\partial \ell}{\partial x_c} = A\, p_c - a_c

(:math:`a` the coefficients of the :math:`\mathrm{lse} - x_c` terms,
:math:`A = \sum_c a_c`; class-probability targets :math:`q` put
:math:`w_c ((1 - \varepsilon) q_c + \varepsilon / C)` in :math:`a_c`). The
semantics are PyTorch's, as in the torch API: ignored targets add nothing;
a mean divides by the total weight of the kept targets and is NaN when
there are none; NaN placement in the gradient as in torch.
"""

import math

import numpy as np

from ..errors import ArgumentError, bad_target
from ..kernels import config
from . import _devices
from ._checks import (
    as_axes,
    as_int,
    check_float,
    check_targets_shape,
    check_weight,
    label_smoothing_of,
    reduction_of,
)
from ._layout import KERNEL_DTYPES, Layout


def _no_classes(dev, x, t, prob: bool, lay: Layout, ignore_index, reduction, eps, return_grad):
    """PyTorch's results for logits with no classes, where no kernel has anything to read."""
    xp = dev.xp
    if not prob:
        kept = t.reshape(-1) != ignore_index
        if bool(kept.any()):
            position = int(xp.flatnonzero(kept)[0])
            raise bad_target(int(t.reshape(-1)[position]), position, 0, ignore_index)
    # torch: eps / C is inf, and inf * 0 makes every smoothed element NaN; probability targets sum to -0.0
    fill = math.nan if (eps > 0 and not prob) else (-0.0 if prob else 0.0)
    elements = xp.full(lay.kept, fill, dtype=x.dtype)
    if reduction == "none":
        loss = elements
    elif reduction == "sum":
        loss = xp.asarray(elements.sum() if elements.size else (fill if prob else 0.0), dtype=x.dtype)
    else:
        loss = xp.asarray(math.nan, dtype=x.dtype)
    return loss, (xp.zeros(x.shape, dtype=x.dtype) if return_grad else None)


def _reduce(xp, loss, reduction: str, denom: float, dtype):
    if reduction == "none":
        return loss.astype(dtype)
    total = float(loss.sum()) if loss.size else 0.0
    if reduction == "mean":
        total = total / denom if denom else math.nan
    return xp.asarray(total, dtype=dtype)


def _forward_cpu(x, t, q, w, lay: Layout, ignore_index, reduction, eps, return_grad):
    """The fused CPU kernels over the kernel layout; half-precision logits in float32 chunks, gradients in place in them."""
    be = _devices.CPU.backend()
    middle = lay.kind == "middle"
    compute = _devices.CPU.compute_dtype(x.dtype)
    elements = (lay.shape[0], lay.shape[2]) if middle else (lay.shape[0],)
    if q is None:
        denom, count = be.check_targets(t, lay.n_classes, ignore_index, w)
    else:
        denom = count = math.prod(elements)
    scale, z_scale = be.scales(denom, count, reduction, 0.0)
    loss = np.empty(elements, np.float64)
    lse = np.empty((0,) * len(elements), np.float64)
    if return_grad:
        grad = _devices.CPU.empty(lay.shape, x.dtype)
    else:
        grad = np.empty((0,) + lay.shape[1:], compute)
    if q is None:
        kernel = be.cross_entropy_index_middle if middle else be.cross_entropy_index
    else:
        kernel = be.cross_entropy_prob_middle if middle else be.cross_entropy_prob
    n0 = lay.shape[0]
    converted = np.dtype(x.dtype) not in KERNEL_DTYPES
    step = max(1, n0) if not converted else max(1, config.CPU_HALF_CHUNK_BYTES // max(1, math.prod(lay.shape[1:]) * 4))
    for start in range(0, max(n0, 1), step):
        part = slice(start, start + step)
        xc = x[part] if not converted else x[part].astype(compute)
        # a converted chunk is a private copy: its gradient is built in place in it
        gc = (xc if converted else grad[part]) if return_grad else grad
        targets = t[part] if q is None else q[part]
        if q is None:
            kernel(xc, targets, w, ignore_index, eps, scale, z_scale, loss[part], lse, gc)
        else:
            kernel(xc, targets, w, eps, scale, z_scale, loss[part], lse, gc)
        if return_grad and converted:
            grad[part] = gc
    return loss, denom, (grad if return_grad else None)


def cross_entropy(logits, target, axis=-1, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, return_grad=False):
    r"""Softmax cross-entropy of ``logits`` against ``target`` along the class axis ``axis``; with ``return_grad``, also its gradient.

    .. math::

        \ell = (1 - \varepsilon)\, w_t (\mathrm{lse} - x_t) + \frac{\varepsilon}{C} \sum_c w_c (\mathrm{lse} - x_c),
        \qquad \frac{\partial \ell}{\partial x_c} = A\, p_c - a_c

    PyTorch's ``cross_entropy`` with the class axis last by default:

    * ``target``: class indices (an integer array of the logits' shape
      without ``axis``; ``ignore_index`` marks entries left out) or class
      probabilities (a float array of the logits' shape);
    * ``weight``: one weight per class, or None;
    * ``reduction``: ``"mean"`` (over the total weight of the kept
      targets; NaN when none is kept), ``"sum"`` or ``"none"``;
    * ``label_smoothing`` in [0, 1].

    Returns the loss (a scalar for ``"mean"`` and ``"sum"``, one value per
    element for ``"none"``), in the logits' dtype; with ``return_grad``,
    ``(loss, grad)``: ``grad`` is d(loss)/d(logits), of the logits' shape
    and dtype, computed in the same pass over the logits (for ``"none"``
    the gradient of the sum of the elements). A class index outside
    ``[0, C)`` that is not ``ignore_index`` raises IndexError before any
    kernel runs.
    """
    fn = "cross_entropy"
    taken = _devices.take(logits, "logits", fn)
    dev, x = taken.device, taken.array
    xp = dev.xp
    tt = dev.take_other(target, "target", fn)
    w = None if weight is None else dev.take_other(weight, "weight", fn)
    ignore_index = as_int(ignore_index, "ignore_index", fn)
    reduction = reduction_of(reduction)
    eps = label_smoothing_of(label_smoothing)
    check_float(x, "logits", fn)
    if x.ndim == 0:
        raise IndexError(
            "fastsoftmax: cross_entropy(): logits must have a class axis: shape (C), (N, C) or (..., C, ...), got a 0-d array"
        )
    (axis,) = as_axes(as_int(axis, "axis", fn), x.ndim, fn)
    prob = check_targets_shape(tuple(x.shape), axis, tt, fn)
    if prob and ignore_index >= 0:
        raise ArgumentError(
            f"fastsoftmax: ignore_index is not supported for floating point target (got ignore_index={ignore_index}: "
            "probability targets have no class to ignore)"
        )
    if w is not None:
        check_weight(w, x.shape[axis], fn)
    lay = Layout(x, (axis,), dev.allow_middle)
    if lay.n_classes == 0:
        loss, grad = _no_classes(dev, x, tt, prob, lay, ignore_index, reduction, eps, return_grad)
    else:
        compute = dev.compute_dtype(x.dtype)
        xk = lay.to_kernel(xp, x)
        wk = None if w is None else xp.ascontiguousarray(w, dtype=compute)
        if prob:
            t, q = None, lay.to_kernel(xp, tt.astype(compute, copy=False))
        else:
            elements = (lay.shape[0], lay.shape[2]) if lay.kind == "middle" else (lay.shape[0],)
            t, q = xp.ascontiguousarray(tt, dtype=xp.int64).reshape(elements), None
        if dev.name == "cpu":
            loss_k, denom, grad_k = _forward_cpu(xk, t, q, wk, lay, ignore_index, reduction, eps, return_grad)
            loss = _reduce(xp, loss_k.reshape(lay.kept), reduction, denom, x.dtype)
        else:
            loss, grad_k = dev.cross_entropy(xk, t, q, wk, ignore_index, reduction, eps, return_grad)
            loss = loss.reshape(lay.kept) if reduction == "none" else loss
        grad = lay.back(grad_k) if return_grad else None
    if return_grad:
        return _devices.give_back(taken, (loss, grad))
    return _devices.give_back(taken, loss)
