r"""Drop-in replacements for ``torch.nn.functional.softmax``, ``log_softmax`` and ``cross_entropy``.

Same signatures, same semantics, same results to floating-point rounding.
In eager mode they run the autograd Functions of :mod:`fastsoftmax.ops`;
under ``torch.compile`` the registered ``torch.ops.fastsoftmax`` ops, so a
model that uses them compiles with ``fullgraph=True``.

The numerics. With :math:`m = \max_j x_j` and :math:`s = \sum_j e^{x_j - m}`
(every exponent :math:`\le 0`, so nothing overflows and :math:`s \ge 1`):

.. math::

    \mathrm{softmax}(x)_j = e^{x_j - m} / s, \qquad
    \mathrm{log\_softmax}(x)_j = (x_j - m) - \log s, \qquad
    \mathrm{lse}(x) = m + \log s.
"""

import warnings

import torch
from torch.nn import _reduction

from . import validation
from .ops import cross_entropy as ce_op
from .ops import softmax as softmax_op

__all__ = ["softmax", "log_softmax", "cross_entropy"]


def _implicit_dim(ndim: int, name: str, stacklevel: int) -> int:
    # torch.nn.functional._get_softmax_dim
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. Change the call to include dim=X as an argument.",
        stacklevel=stacklevel,
    )
    return 0 if ndim in (0, 1, 3) else 1


def _softmax(input, dim, stacklevel, dtype, log: bool):
    name = "log_softmax" if log else "softmax"
    validation.check_logits(input)
    if dim is None:
        dim = _implicit_dim(input.ndim, name, stacklevel)
    dim = validation.normalize_dim(dim, input.ndim)
    if dtype is not None:
        input = input.to(dtype)
        validation.check_logits(input)
    if torch.compiler.is_compiling():
        return (softmax_op.log_softmax_op if log else softmax_op.softmax_op)(input, dim)
    if not (input.requires_grad and torch.is_grad_enabled()):
        return softmax_op.forward(input, dim, log)  # no graph to record: skip autograd.Function's cost
    return (softmax_op.LogSoftmaxFunction if log else softmax_op.SoftmaxFunction).apply(input, dim)


def softmax(input, dim=None, _stacklevel=3, dtype=None):
    r"""Softmax of ``input`` along ``dim``, as :func:`torch.nn.functional.softmax`.

    .. math:: y_j = \frac{e^{x_j - m}}{\sum_k e^{x_k - m}}, \quad m = \max_k x_k

    A row holding NaN or ``+inf``, or only ``-inf``, is NaN throughout, as in
    PyTorch; ``-inf`` entries of any other row get probability exactly 0.

    Args:
        input: floating-point tensor of any rank, any layout, CPU or CUDA.
        dim: the dimension to normalise over.
        dtype: if given, ``input`` is cast to it first.

    Backward: :math:`\partial x = y \odot (\partial y - \sum_k y_k \partial y_k)`.
    """
    return _softmax(input, dim, _stacklevel + 1, dtype, log=False)


def log_softmax(input, dim=None, _stacklevel=3, dtype=None):
    r"""Log-softmax of ``input`` along ``dim``, as :func:`torch.nn.functional.log_softmax`.

    .. math:: y_j = (x_j - m) - \log \sum_k e^{x_k - m}, \quad m = \max_k x_k

    Backward: :math:`\partial x = \partial y - e^{y} \sum_k \partial y_k`.
    """
    return _softmax(input, dim, _stacklevel + 1, dtype, log=True)


def cross_entropy(
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    label_smoothing=0.0,
):
    r"""Softmax cross-entropy, as :func:`torch.nn.functional.cross_entropy`.

    ``input`` holds logits of shape ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.
    ``target`` holds class indices (int64, shape without the class dimension;
    entries equal to ``ignore_index`` are skipped) or class probabilities
    (floating point, the input's shape). Per element, with
    :math:`\mathrm{lse} = m + \log \sum_c e^{x_c - m}`, class weights :math:`w`
    and label smoothing :math:`\varepsilon`:

    .. math::

        \ell = (1 - \varepsilon)\, w_t (\mathrm{lse} - x_t)
               + \frac{\varepsilon}{C} \sum_c w_c (\mathrm{lse} - x_c)

    (for probability targets :math:`q`: :math:`\ell = \sum_c w_c q'_c (\mathrm{lse} - x_c)`,
    :math:`q' = (1 - \varepsilon) q + \varepsilon / C`). ``reduction="mean"``
    divides the sum by :math:`\sum_i w_{t_i}` over non-ignored elements (index
    targets) or by the number of elements (probability targets); all targets
    ignored gives NaN, as in PyTorch. The gradient,
    :math:`\partial \ell / \partial x_c = (\sum_k a_k) p_c - a_c` with :math:`a`
    the coefficients above, is computed in the same pass as the loss.
    Probability targets and weights that require grad get their gradients
    too, through :func:`fastsoftmax.ops.cross_entropy.composite`.

    Raises:
        IndexError: a class index outside ``[0, C)`` that is not ``ignore_index``.
        TypeError, ValueError: wrong dtype, shape, device, reduction or smoothing.
        RuntimeError: class-index targets with a weight that requires grad
            (in grad mode), which torch cannot differentiate either.
    """
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    validation.check_cross_entropy(input, target, weight, reduction, label_smoothing)
    label_smoothing = float(label_smoothing)
    grad_mode = torch.is_grad_enabled()
    if grad_mode and weight is not None and weight.requires_grad and not target.is_floating_point():
        # torch's nll_loss has no weight gradient either
        raise RuntimeError(
            "fastsoftmax: cross_entropy with class-index targets is not differentiable with respect to weight; "
            "detach the weight"
        )
    if grad_mode and (target.requires_grad or (weight is not None and weight.requires_grad)):
        return ce_op.composite(input, target, weight, reduction, label_smoothing, log_softmax)
    if torch.compiler.is_compiling():
        compute_grad = input.requires_grad and grad_mode
        loss, _ = ce_op.cross_entropy_op(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad)
        return loss
    if not (grad_mode and input.requires_grad):
        loss, _ = ce_op.forward(input, target, weight, ignore_index, reduction, label_smoothing, False)
        return loss
    return ce_op.CrossEntropyFunction.apply(input, target, weight, ignore_index, reduction, label_smoothing)
