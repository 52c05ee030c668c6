r"""Drop-in replacements for ``torch.nn.functional.softmax``, ``log_softmax`` and ``cross_entropy``.

Same signatures, same semantics, same results to floating-point rounding.
In eager mode they run the :mod:`fastsoftmax.autograd` Functions; under
``torch.compile`` the registered ops of :mod:`fastsoftmax._ops`, so a model
that uses them compiles with ``fullgraph=True``.

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

from . import _dispatch, _host, _ops
from .autograd import CrossEntropyFunction, LogSoftmaxFunction, SoftmaxFunction

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
    _dispatch.check_logits(input)
    if dim is None:
        dim = _implicit_dim(input.ndim, name, stacklevel)
    dim = _dispatch.normalize_dim(dim, input.ndim)
    if dtype is not None:
        input = input.to(dtype)
        _dispatch.check_logits(input)
    if torch.compiler.is_compiling():
        return (_ops.log_softmax if log else _ops.softmax)(input, dim)
    if not (input.requires_grad and torch.is_grad_enabled()):
        return _host.softmax_forward(input, dim, log)  # no graph to record: skip autograd.Function's cost
    return (LogSoftmaxFunction if log else SoftmaxFunction).apply(input, dim)


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


def _check_cross_entropy(input, target, weight, reduction, label_smoothing):
    _dispatch.check_logits(input)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"fastsoftmax: target must be a torch.Tensor, got {type(target).__name__}")
    _dispatch.check_same_device(input, target, "target")
    _dispatch.check_reduction(reduction)
    _dispatch.check_label_smoothing(label_smoothing)
    if input.ndim == 0:
        raise ValueError("fastsoftmax: input must have a class dimension: shape (C), (N, C) or (N, C, d1, ..., dk)")
    n_classes = input.shape[0 if input.ndim == 1 else 1]
    if n_classes == 0:
        raise ValueError(f"fastsoftmax: input of shape {tuple(input.shape)} has no classes")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError("fastsoftmax: weight must be a floating-point tensor")
        _dispatch.check_same_device(input, weight, "weight")
        if weight.shape != (n_classes,):
            raise ValueError(
                f"fastsoftmax: weight must have shape ({n_classes},), one per class, got {tuple(weight.shape)}"
            )
    if input.shape == target.shape:
        if not target.is_floating_point():
            raise TypeError(
                f"fastsoftmax: a target of the input's shape {tuple(input.shape)} holds class probabilities "
                f"and must be floating point, got dtype {target.dtype}"
            )
        return
    if target.is_floating_point():
        raise ValueError(
            f"fastsoftmax: probability targets must have the input's shape {tuple(input.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if target.dtype not in (torch.int64, torch.uint8):
        raise TypeError(f"fastsoftmax: class-index targets must be int64 (or uint8), got dtype {target.dtype}")
    expected = input.shape[:1] + input.shape[2:] if input.ndim > 1 else torch.Size([])
    if target.shape != expected:
        raise ValueError(
            f"fastsoftmax: for input of shape {tuple(input.shape)} class-index targets must have shape "
            f"{tuple(expected)}, got {tuple(target.shape)}"
        )


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
    too, through :func:`_cross_entropy_composite`.

    Raises:
        IndexError: a class index outside ``[0, C)`` that is not ``ignore_index``.
        TypeError, ValueError: wrong dtype, shape, device, reduction or smoothing.
        RuntimeError: class-index targets with a weight that requires grad
            (in grad mode), which torch cannot differentiate either.
    """
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    _check_cross_entropy(input, target, weight, reduction, label_smoothing)
    label_smoothing = float(label_smoothing)
    grad_mode = torch.is_grad_enabled()
    if grad_mode and weight is not None and weight.requires_grad and not target.is_floating_point():
        # torch's nll_loss has no weight gradient either
        raise RuntimeError(
            "fastsoftmax: cross_entropy with class-index targets is not differentiable with respect to weight; "
            "detach the weight"
        )
    if grad_mode and (target.requires_grad or (weight is not None and weight.requires_grad)):
        return _cross_entropy_composite(input, target, weight, reduction, label_smoothing)
    if torch.compiler.is_compiling():
        compute_grad = input.requires_grad and grad_mode
        loss, _ = _ops.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad)
        return loss
    if not (grad_mode and input.requires_grad):
        loss, _ = _host.cross_entropy_forward(input, target, weight, ignore_index, reduction, label_smoothing, False)
        return loss
    return CrossEntropyFunction.apply(input, target, weight, ignore_index, reduction, label_smoothing)


def _cross_entropy_composite(input, target, weight, reduction, label_smoothing):
    r"""Cross-entropy with probability targets (or weights) that require grad.

    The fused kernel returns no gradient for ``target`` or ``weight``, so here
    the loss is composed of our :func:`log_softmax` and torch ops, as torch
    composes it, and autograd differentiates all three:
    :math:`\ell = -\sum_c w_c q'_c \log p_c`, :math:`\partial \ell / \partial q_c = -(1 - \varepsilon) w_c \log p_c`.
    """
    class_dim = 0 if input.ndim == 1 else 1
    n_classes = input.shape[class_dim]
    logp = log_softmax(input, class_dim)
    q = target if label_smoothing == 0.0 else target * (1 - label_smoothing) + label_smoothing / n_classes
    terms = logp * q
    if weight is not None:
        terms = terms * weight.view([n_classes] + [1] * (input.ndim - class_dim - 1))
    loss = -terms.sum(class_dim)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (input.numel() // n_classes)  # 0 / 0 = NaN for an empty batch, as in torch
