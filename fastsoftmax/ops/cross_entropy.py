r"""Softmax cross-entropy, the torch side: layout, the ``torch.library`` ops, the autograd Function.

Per element, with :math:`\mathrm{lse} = m + \log \sum_c e^{x_c - m}`, class
weights :math:`w` and label smoothing :math:`\varepsilon`:

.. math::

    \ell = (1 - \varepsilon)\, w_t (\mathrm{lse} - x_t)
           + \frac{\varepsilon}{C} \sum_c w_c (\mathrm{lse} - x_c),
    \qquad
    \frac{\partial \ell}{\partial x_c} = A\, p_c - a_c

with :math:`a` the coefficients of the :math:`(\mathrm{lse} - x_c)` terms and
:math:`A = \sum_c a_c`. The fused forward computes the loss and the gradient
for a unit grad_output in one pass over the logits; the backward only scales
it.

* :func:`forward` / :func:`backward`: any supported layout to the backend's
  kernels and back.
* ``torch.ops.fastsoftmax.cross_entropy(...) -> (Tensor loss, Tensor grad)``
  and ``fastsoftmax::cross_entropy_backward``, what ``torch.compile`` sees.
* :class:`CrossEntropyFunction`, the same as a ``torch.autograd.Function``.
* :func:`composite`: the loss in our log-softmax and torch ops, for
  probability targets or weights that require grad themselves.
"""

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from .layout import as_rows, device, empty_moved, rows_last, to_dtype
from .softmax import log_softmax_op


def is_prob_target(input: Tensor, target: Tensor) -> bool:
    """PyTorch's rule: a target of the input's shape holds class probabilities."""
    return input.shape == target.shape


def _loss_shape(input: Tensor, reduction: str) -> list:
    if reduction != "none":
        return []
    shape = list(input.shape)
    del shape[0 if input.ndim == 1 else 1]
    return shape


def _grad_fake(input: Tensor, compute_grad: bool) -> Tensor:
    dev = device(input)
    compute = dev.compute_dtype(input.dtype)
    if not compute_grad:
        return input.new_empty((0,), dtype=compute)
    if input.ndim > 2 and dev.middle_shape(input, 1) is not None:
        return input.new_empty(input.shape, dtype=compute)  # the middle-axis kernel's layout
    return empty_moved(input, 0 if input.ndim == 1 else 1, compute)


def _reduce(loss_rows: Tensor, loss_shape, reduction: str, denom: float, squeeze: bool, dtype) -> Tensor:
    """The per-element losses (float64) reduced as ``reduction`` asks, in ``dtype``."""
    if reduction == "none":
        loss = loss_rows.view(loss_shape)
        if squeeze:
            loss = loss.reshape(())
    elif not loss_rows.is_cuda and (reduction == "sum" or denom != 0):
        # in NumPy and Python floats: three torch ops cost more than the
        # kernel on a (256, 10) batch
        total = float(loss_rows.numpy().sum())
        return torch.scalar_tensor(total if reduction == "sum" else total / denom, dtype=dtype)
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = loss_rows.sum() / denom  # 0 / 0 = NaN when every target is ignored, as in torch
    return to_dtype(loss, dtype)


def _forward_middle(dev, input, target, weight, ignore_index, reduction, label_smoothing, compute_grad, middle, compute):
    """:func:`forward` for ``(N, C, d1, ...)`` logits, reduced over C in place.

    No copy of the logits (or of probability targets) into rows, and the
    gradient comes back laid out like ``input``.
    """
    be, arr = dev.backend(), dev.array
    n_outer, n_classes, n_inner = middle
    x3 = to_dtype(input, compute).contiguous().view(middle)
    w = arr(rows_last(weight, 0, compute)) if weight is not None else None
    loss2 = dev.empty((n_outer, n_inner), torch.float64, input.device)
    grad = dev.empty(input.shape if compute_grad else (0, n_classes), compute, input.device)
    grad3 = grad.view(middle) if compute_grad else grad.view(0, n_classes, 1).expand(0, n_classes, n_inner)
    if is_prob_target(input, target):
        q3 = to_dtype(target, compute).contiguous().view(middle)
        denom = be.cross_entropy_prob_middle(arr(x3), arr(q3), w, label_smoothing, reduction, arr(loss2), arr(grad3))
        loss_shape = target.shape[:1] + target.shape[2:]
    else:
        t2 = to_dtype(target, torch.int64).contiguous().view(n_outer, n_inner)
        args = (arr(x3), arr(t2), w, ignore_index, label_smoothing, reduction, arr(loss2), arr(grad3))
        denom = be.cross_entropy_index_middle(*args)
        loss_shape = target.shape
    return _reduce(loss2.view(-1), loss_shape, reduction, denom, False, input.dtype), grad


def forward(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad):
    """Loss (reduced) and, if ``compute_grad``, d(loss)/d(input) for a unit grad_output.

    Arguments are already validated by :func:`fastsoftmax.functional.cross_entropy`
    except the target values, which the backend checks before its kernel runs.
    The gradient is returned in the compute dtype (float32 for half inputs on
    the CPU), laid out like ``input``.
    """
    dev = device(input)
    be, arr = dev.backend(), dev.array
    compute = dev.compute_dtype(input.dtype)
    if input.ndim > 2:
        middle = dev.middle_shape(input, 1)
        if middle is not None:
            args = (ignore_index, reduction, label_smoothing, compute_grad, middle, compute)
            return _forward_middle(dev, input, target, weight, *args)
    squeeze = input.ndim == 1
    if squeeze:
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    n_classes = input.shape[1]
    xr = rows_last(input, 1, compute)
    x2 = as_rows(xr)
    n_rows = x2.shape[0]
    w = arr(rows_last(weight, 0, compute)) if weight is not None else None
    loss_rows = dev.empty((n_rows,), torch.float64, input.device)
    grad = dev.empty((n_rows if compute_grad else 0, n_classes), compute, input.device)
    if is_prob_target(input, target):
        q = as_rows(rows_last(target, 1, compute))
        denom = be.cross_entropy_prob(arr(x2), arr(q), w, label_smoothing, reduction, arr(loss_rows), arr(grad))
        loss_shape = target.shape[:1] + target.shape[2:]
    else:
        t = to_dtype(target.reshape(-1), torch.int64)
        args = (arr(x2), arr(t), w, ignore_index, label_smoothing, reduction, arr(loss_rows), arr(grad))
        denom = be.cross_entropy_index(*args)
        loss_shape = target.shape
    loss = _reduce(loss_rows, loss_shape, reduction, denom, squeeze, input.dtype)
    if compute_grad and input.ndim > 2:
        grad = grad.view(xr.shape).movedim(-1, 1)
    elif compute_grad and squeeze:
        grad = grad.squeeze(0)
    return loss, grad


def is_unit(grad_output: Tensor) -> bool:
    """Whether grad_output is a single element equal to 1 (CPU only: on CUDA that would sync)."""
    return grad_output.numel() == 1 and not grad_output.is_cuda and grad_output.item() == 1.0


def backward(grad: Tensor, grad_output: Tensor, input_dtype: torch.dtype) -> Tensor:
    """``grad * grad_output``, broadcast over the class dimension.

    ``grad`` is the forward's gradient for a unit grad_output; ``grad_output``
    is a scalar (mean, sum) or holds one value per loss element (none).
    """
    if grad.ndim > 2 and grad.is_contiguous():
        # laid out like the input (the middle-axis kernel's gradient): moving
        # C last would copy, and torch's broadcast multiply is one pass
        factor = grad_output.to(grad.dtype)
        return to_dtype(grad * (factor.unsqueeze(1) if factor.ndim else factor), input_dtype)
    dev = device(grad)
    squeeze = grad.ndim == 1
    gr = grad.unsqueeze(0) if squeeze else grad.movedim(1, -1)
    gr = gr.contiguous()
    n_classes = gr.shape[-1]
    g2 = gr.view(-1, n_classes)
    out = dev.empty(gr.shape, gr.dtype, grad.device)
    o2 = out.view(-1, n_classes)
    if g2.numel():
        if is_unit(grad_output):
            o2.copy_(g2)
        else:
            factor = grad_output.to(torch.float64).reshape(-1).expand(g2.shape[0]).contiguous()
            dev.backend().scale_rows(dev.array(g2), dev.array(factor), dev.array(o2))
    out = out.squeeze(0) if squeeze else out.movedim(-1, 1)
    return to_dtype(out, input_dtype)


def no_double_backward() -> None:
    raise NotImplementedError(
        "fastsoftmax: cross_entropy has no double backward (its forward keeps the gradient, not the input); "
        "use torch.nn.functional.cross_entropy where create_graph=True is needed"
    )


# --- torch.library ops ----------------------------------------------------------------


@custom_op("fastsoftmax::cross_entropy", mutates_args=(), device_types=("cpu", "cuda"))
def cross_entropy_op(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    return forward(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad)


@cross_entropy_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad):
    loss = input.new_empty(_loss_shape(input, reduction))
    return loss, _grad_fake(input, compute_grad)


@custom_op("fastsoftmax::cross_entropy_backward", mutates_args=(), device_types=("cpu", "cuda"))
def cross_entropy_backward_op(grad: Tensor, grad_output: Tensor, input_dtype: torch.dtype) -> Tensor:
    return backward(grad, grad_output, input_dtype)


@cross_entropy_backward_op.register_fake
def _(grad, grad_output, input_dtype):
    return torch.empty_like(grad, dtype=input_dtype)


def _setup_context(ctx, inputs, output):
    input, *_, compute_grad = inputs
    ctx.input_dtype = input.dtype
    ctx.compute_grad = compute_grad
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _autograd_backward(ctx, grad_loss, _grad_of_grad):
    if not ctx.compute_grad:
        raise RuntimeError(
            "fastsoftmax: cross_entropy was called with compute_grad=False, so it kept no gradient to propagate"
        )
    if torch.is_grad_enabled():
        no_double_backward()
    (grad,) = ctx.saved_tensors
    return cross_entropy_backward_op(grad, grad_loss, ctx.input_dtype), None, None, None, None, None, None


cross_entropy_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# --- the autograd Function ---------------------------------------------------------------


class CrossEntropyFunction(torch.autograd.Function):
    r"""Fused softmax cross-entropy (see :func:`fastsoftmax.cross_entropy`).

    The forward computes the loss and, when the input requires grad, the
    gradient :math:`\partial L / \partial x = A p - a` (one-hot or
    probability targets, weights and label smoothing folded into ``a``) in
    the same pass over the logits; the backward only multiplies it by
    grad_output.

    For a grad_output of exactly 1 (``loss.backward()`` on a reduced loss)
    the backward returns the saved gradient itself, no copy: unless the graph
    is retained, autograd releases its saved tensors before the gradient
    reaches ``AccumulateGrad``, which then takes the tensor over as ``.grad``
    instead of cloning it. With ``retain_graph=True`` it is cloned (correct,
    one copy slower).

    There is no double backward: under ``create_graph=True`` the backward
    raises ``NotImplementedError`` rather than return a gradient that silently
    does not depend on the input.
    """

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing):
        compute_grad = ctx.needs_input_grad[0]
        loss, grad = forward(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad)
        ctx.input_dtype = input.dtype
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            no_double_backward()
        (grad,) = ctx.saved_tensors
        if grad.dtype == ctx.input_dtype and is_unit(grad_output):
            return grad, None, None, None, None, None
        return backward(grad, grad_output, ctx.input_dtype), None, None, None, None, None


def composite(input, target, weight, reduction, label_smoothing, log_softmax=None):
    r"""Cross-entropy with probability targets (or weights) that require grad.

    The fused kernel returns no gradient for ``target`` or ``weight``, so here
    the loss is composed of our log-softmax and torch ops, as torch composes
    it, and autograd differentiates all three:
    :math:`\ell = -\sum_c w_c q'_c \log p_c`, :math:`\partial \ell / \partial q_c = -(1 - \varepsilon) w_c \log p_c`.
    """
    class_dim = 0 if input.ndim == 1 else 1
    n_classes = input.shape[class_dim]
    logp = (log_softmax or log_softmax_op)(input, class_dim)
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
