r"""Softmax cross-entropy, the torch side: layout, the ``torch.library`` ops, the autograd Function.

Per element, with :math:`\mathrm{lse} = m + \log \sum_c e^{x_c - m}`, class
weights :math:`w` and label smoothing :math:`\varepsilon`:

.. math::

    \ell = (1 - \varepsilon)\, w_t (\mathrm{lse} - x_t)
           + \frac{\varepsilon}{C} \sum_c w_c (\mathrm{lse} - x_c),
    \qquad
    \frac{\partial \ell}{\partial x_c} = A\, p_c - a_c

with :math:`a` the coefficients of the :math:`(\mathrm{lse} - x_c)` terms and
:math:`A = \sum_c a_c`.

Two designs, one per device, behind the same doors (the functional API,
:class:`CrossEntropyFunction`, ``torch.ops.fastsoftmax.*``, ``torch.compile``):

* CPU: the forward computes the loss and the gradient for a unit
  grad_output in one pass over the logits, and *saves the gradient*; the
  backward only scales it (or, for a grad_output of exactly 1, which is free
  to test on the CPU, returns it): one read and one write of N x C.
* CUDA: the forward reads the logits once and *saves per-row statistics*
  ``(m, s, A)`` (and the mean's denominator), an ``(R + 1, 3)`` tensor; the
  backward reads the logits again and writes the gradient, scaled by
  grad_output read on the device (no synchronisation). Two reads and one
  write of N x C, however grad_output is scaled, no N x C buffer kept from
  the forward to the backward and no scaling pass.

``saved`` is the op's second output either way (:func:`rebuilds_gradient`
says which); the backward ops are ``fastsoftmax::cross_entropy_backward``
(scale a saved gradient) and ``fastsoftmax::cross_entropy_grad`` (rebuild
it from the logits and the statistics).

* :func:`forward` / :func:`backward` / :func:`grad_from_stats`: any
  supported layout to the backend's kernels and back.
* ``torch.ops.fastsoftmax.cross_entropy(...) -> (Tensor loss, Tensor saved)``
  and the two backward ops, what ``torch.compile`` sees.
* :class:`CrossEntropyFunction`, the same as a ``torch.autograd.Function``.
* :func:`composite`: the loss in our log-softmax and torch ops, for
  probability targets or weights that require grad themselves.
"""

import math
from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from ..kernels import config
from .layout import as_rows, device, empty_moved, launch_scope, rows_last, to_dtype
from .softmax import log_softmax_op

#: Columns of the CUDA design's saved statistics: ``m``, ``s``, ``A`` per row
#: (and the mean's denominator in the first column of one more row).
STATS_COLUMNS = 3


def rebuilds_gradient(dev) -> bool:
    """Whether the device's forward saves row statistics and the backward rebuilds the gradient (CUDA), or the forward saves the gradient (CPU)."""
    return dev.name == "cuda"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _saved_fake(input: Tensor, compute_grad: bool) -> Tensor:
    """The forward op's second output: the gradient (CPU) or the row statistics (CUDA)."""
    if rebuilds_gradient(device(input)):
        return input.new_empty((_n_rows(input) + 1, STATS_COLUMNS), dtype=_acc_dtype(input.dtype))
    return _grad_fake(input, compute_grad)


def _n_rows(input: Tensor) -> int:
    """Loss elements of ``input``: the product of its sizes other than the class dimension."""
    shape = list(input.shape)
    del shape[0 if input.ndim == 1 else 1]
    return math.prod(shape)


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
    """Loss (reduced) and what the backward needs: see :func:`rebuilds_gradient`.

    CPU: if ``compute_grad``, d(loss)/d(input) for a unit grad_output, in the
    compute dtype (float32 for half inputs), laid out like ``input``. CUDA:
    the row statistics, whatever ``compute_grad`` (they also carry the mean's
    denominator). Arguments are already validated by
    :func:`fastsoftmax.functional.cross_entropy` except the target values,
    which the backend checks before its kernel runs.
    """
    dev = device(input)
    if rebuilds_gradient(dev):
        return _forward_stats(dev, input, target, weight, ignore_index, reduction, label_smoothing)
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


# --- the CUDA design: row statistics forward, gradient rebuilt in the backward ------------


def _stats_rows(input: Tensor, target: Tensor):
    """``(x, t, rows shape)``: the logits as ``(R, C)`` rows in their own dtype, the targets as rows
    (int64 indices, or probabilities in the logits' dtype), and the shape of the logits with C last."""
    if input.ndim == 1:
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    xr = rows_last(input, 1, input.dtype)
    if is_prob_target(input, target):
        t = as_rows(rows_last(target, 1, input.dtype))
    else:
        t = to_dtype(target.reshape(-1), torch.int64).contiguous()
    return as_rows(xr), t, xr.shape


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _forward_stats(dev, input, target, weight, ignore_index, reduction, label_smoothing):
    """:func:`forward` on CUDA: the loss, and the ``(R + 1, 3)`` statistics :func:`grad_from_stats` needs."""
    be, arr = dev.kernels(), dev.array
    x2, t2, _ = _stats_rows(input, target)
    n_rows = x2.shape[0]
    acc = _acc_dtype(input.dtype)
    w = arr(rows_last(weight, 0, acc)) if weight is not None else None  # float32 weights, never rounded to the input's dtype
    loss_rows = dev.empty((n_rows,), acc, input.device)
    saved = dev.empty((n_rows + 1, STATS_COLUMNS), acc, input.device)
    out = dev.empty((1,), input.dtype, input.device) if reduction != "none" else None
    x, loss_a, out_a, saved_a = arr(x2), arr(loss_rows), (arr(out) if out is not None else None), arr(saved)
    with launch_scope(x) as stream:
        if is_prob_target(input, target):
            be.cross_entropy_prob(x, arr(t2), w, label_smoothing, reduction, loss_a, out_a, saved_a, stream)
        else:
            check = config.CUDA_CHECK_TARGETS and not _capturing()  # the one host synchronisation
            be.cross_entropy_index(x, arr(t2), w, ignore_index, label_smoothing, reduction, loss_a, out_a, saved_a, stream, check)
    loss = out.view(()) if out is not None else to_dtype(loss_rows.view(_loss_shape(input, "none")), input.dtype)
    return loss, saved


def grad_from_stats(input, target, weight, saved, grad_output, ignore_index, reduction, label_smoothing) -> Tensor:
    """The CUDA backward: d(loss)/d(input) from the logits and :func:`forward`'s statistics, times ``grad_output``.

    ``grad_output`` stays on the device: a scalar (mean, sum) or one value
    per loss element (none). The gradient is laid out like the CPU's.
    """
    dev = device(input)
    be, arr = dev.kernels(), dev.array
    x2, t2, rows_shape = _stats_rows(input, target)
    acc = _acc_dtype(input.dtype)
    w = arr(rows_last(weight, 0, acc)) if weight is not None else None
    grad = dev.empty(x2.shape, input.dtype, input.device)
    go = to_dtype(grad_output, input.dtype).reshape(-1).contiguous()
    x, t, g = arr(x2), arr(t2), arr(grad)
    with launch_scope(x) as stream:
        if is_prob_target(input, target):
            be.cross_entropy_prob_backward(x, t, w, label_smoothing, reduction, arr(saved), arr(go), g, stream)
        else:
            be.cross_entropy_index_backward(x, t, w, ignore_index, label_smoothing, reduction, arr(saved), arr(go), g, stream)
    if input.ndim == 1:
        return grad.squeeze(0)
    return grad.view(rows_shape).movedim(-1, 1) if input.ndim > 2 else grad


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
    return loss, _saved_fake(input, compute_grad)


@custom_op("fastsoftmax::cross_entropy_backward", mutates_args=(), device_types=("cpu", "cuda"))
def cross_entropy_backward_op(grad: Tensor, grad_output: Tensor, input_dtype: torch.dtype) -> Tensor:
    return backward(grad, grad_output, input_dtype)


@cross_entropy_backward_op.register_fake
def _(grad, grad_output, input_dtype):
    return torch.empty_like(grad, dtype=input_dtype)


@custom_op("fastsoftmax::cross_entropy_grad", mutates_args=(), device_types=("cpu", "cuda"))
def cross_entropy_grad_op(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    saved: Tensor,
    grad_output: Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> Tensor:
    """The CUDA design's backward (:func:`grad_from_stats`); ``saved`` is the forward op's statistics."""
    if not rebuilds_gradient(device(input)):
        raise NotImplementedError("fastsoftmax: on the CPU the cross_entropy forward saves the gradient; use cross_entropy_backward")
    return grad_from_stats(input, target, weight, saved, grad_output, ignore_index, reduction, label_smoothing)


@cross_entropy_grad_op.register_fake
def _(input, target, weight, saved, grad_output, ignore_index, reduction, label_smoothing):
    return empty_moved(input, 0 if input.ndim == 1 else 1, input.dtype)


def _save(ctx, input, target, weight, saved, ignore_index, reduction, label_smoothing):
    """Keep what the device's backward needs: the gradient (CPU), or the logits, targets, weights and statistics (CUDA)."""
    ctx.input_dtype = input.dtype
    ctx.rebuild = rebuilds_gradient(device(input))
    ctx.options = (ignore_index, reduction, label_smoothing)
    if ctx.rebuild:
        ctx.save_for_backward(input, target, weight, saved)
    else:
        ctx.save_for_backward(saved)


def _setup_context(ctx, inputs, output):
    input, target, weight, ignore_index, reduction, label_smoothing, compute_grad = inputs
    ctx.compute_grad = compute_grad
    ctx.mark_non_differentiable(output[1])
    _save(ctx, input, target, weight, output[1], ignore_index, reduction, label_smoothing)


def _autograd_backward(ctx, grad_loss, _grad_of_grad):
    if not ctx.compute_grad:
        raise RuntimeError(
            "fastsoftmax: cross_entropy was called with compute_grad=False, so it kept no gradient to propagate"
        )
    if torch.is_grad_enabled():
        no_double_backward()
    if ctx.rebuild:
        input, target, weight, saved = ctx.saved_tensors
        grad = cross_entropy_grad_op(input, target, weight, saved, grad_loss, *ctx.options)
    else:
        (saved,) = ctx.saved_tensors
        grad = cross_entropy_backward_op(saved, grad_loss, ctx.input_dtype)
    return grad, None, None, None, None, None, None


cross_entropy_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# --- the autograd Function ---------------------------------------------------------------


class CrossEntropyFunction(torch.autograd.Function):
    r"""Fused softmax cross-entropy (see :func:`fastsoftmax.cross_entropy`).

    On the CPU the forward computes the loss and, when the input requires
    grad, the gradient :math:`\partial L / \partial x = A p - a` (one-hot or
    probability targets, weights and label smoothing folded into ``a``) in
    the same pass over the logits; the backward only multiplies it by
    grad_output. On CUDA the forward keeps per-row statistics and the
    backward rebuilds the gradient from the logits (see the module docstring).

    For a grad_output of exactly 1 (``loss.backward()`` on a reduced loss),
    on the CPU the backward returns the saved gradient itself, no copy: unless the graph
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
        loss, saved = forward(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad)
        _save(ctx, input, target, weight, saved, ignore_index, reduction, label_smoothing)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            no_double_backward()
        if ctx.rebuild:
            input, target, weight, saved = ctx.saved_tensors
            return grad_from_stats(input, target, weight, saved, grad_output, *ctx.options), None, None, None, None, None
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
