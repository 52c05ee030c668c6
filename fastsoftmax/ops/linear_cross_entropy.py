r"""Linear cross-entropy, the torch side: argument checks, the ``torch.library`` ops, the autograd Function.

The cross-entropy of the logits :math:`z_n = W x_n + b` (``W`` of shape
``(C, d1, ..., dK, H)`` flattened to ``(V, H)``, :math:`V = C D`), computed
without ever holding all of them:

.. math::

    \frac{\partial L}{\partial x_n} = G_n W, \qquad
    \frac{\partial L}{\partial W} = \sum_n G_n^\top x_n, \qquad
    \frac{\partial L}{\partial b} = \sum_n G_n

with :math:`G_n = \partial L / \partial z_n` the cross-entropy's gradient
(:mod:`.cross_entropy`). The chunk driver (:mod:`.linear_cross_entropy_chunks`)
takes rows in chunks of ``B``: beyond the gradients themselves, the extra
memory is one ``(B, V)`` buffer of logits (plus one for the softcap's
``tanh``, one for K-dim's class-last copy), ``B`` chosen by a byte budget.

* ``mean``/``sum``: the forward computes the gradients for a unit
  grad_output (the mean's denominator is known before the first chunk); the
  backward scales them. Three matrix products in all.
* ``none``: the forward computes the loss only (one product); the backward
  recomputes each chunk's logits and their gradient, each row times its
  grad_output, then the three products.
* double backward: the loss again in torch ops (:func:`loss_graph`), with
  its logits materialised.
* :func:`value_and_grad`: the loss and the gradients with no autograd graph,
  for a training step that applies them itself.

On CUDA the path is not yet fused: each chunk's logits go through
:func:`.cross_entropy.forward`, the z-loss gradient and the scaling in torch
ops (one host synchronisation, for the mean's denominator).
"""

import math
from typing import Optional

import torch
import torch.nn.functional as TF
from torch import Tensor
from torch.library import custom_op

from .. import validation
from .cross_entropy_graph import z_term_graph
from .direct import UnderTransforms
from .layout import device
from .linear_cross_entropy_chunks import backward_none, forward, is_prob, loss_shape


def check_arguments(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, options,
                    z_loss, softcap):
    """Every argument checked, as each public door takes them; returns what the chunk driver takes.

    ``(prob, ignore_index, reduction, label_smoothing, z_loss, softcap, rows, logits_shape)``; ``rows`` 0
    leaves the rows per chunk to the byte budget.
    """
    if validation.plain_linear_call(input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing):
        prob, eps, logits_shape = False, (label_smoothing if label_smoothing > 0.0 else 0.0), (input.shape[0], linear_weight.shape[0])
        ignore_index = -100 if ignore_index is None else ignore_index
    else:
        prob, ignore_index, eps, logits_shape = validation.check_linear_cross_entropy(
            input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing
        )
    if not (reduction == "mean" or reduction == "sum" or reduction == "none"):
        reduction = validation.reduction_of(reduction)
    z = z_loss if type(z_loss) is float else validation.as_float(z_loss, "z_loss", "linear_cross_entropy", 10)
    cap = None if softcap is None else validation.check_softcap(softcap, "linear_cross_entropy", 11)
    rows = 0
    if options is not None:
        width = math.prod(logits_shape[input.ndim - 1 :])
        rows = validation.chunk_rows_of(options, math.prod(input.shape[:-1]), input.shape[-1], width) or 0
    return prob, ignore_index, reduction, eps, z, cap, rows, logits_shape


def needs_logits(input, target, weight, prob: bool, logits_shape) -> bool:
    """Whether the loss must go through materialised logits: no classes, targets or weights that take a gradient
    (the kernels give none), or probabilities of a wider dtype than the input (torch promotes the loss)."""
    if math.prod(logits_shape[input.ndim - 1 :]) == 0:
        return True
    if torch.is_grad_enabled() and (target.requires_grad or (weight is not None and weight.requires_grad)):
        return True
    return prob and validation.result_dtype(input, target, weight, prob) != input.dtype


def loss_graph(input, linear_weight, target, linear_bias, weight, ignore_index, reduction, eps, z_loss, softcap):
    """The same loss in torch's ops, logits materialised: what double backward differentiates."""
    h, n_classes, out = input.shape[-1], linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    bias = None if linear_bias is None else linear_bias.reshape(-1)
    logits = TF.linear(input, linear_weight.reshape(-1, h), bias).reshape(*input.shape[:-1], n_classes, *out)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = TF.cross_entropy(logits, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps)
    if z_loss:
        loss = loss + z_term_graph(logits, target, ignore_index, z_loss, reduction)
    return loss


def backward_graph(saved, args, grad_output, needs):
    """The gradients recomputed in torch ops from the saved inputs, with their graph (double backward)."""
    input, linear_weight, target, linear_bias, weight = saved
    with torch.enable_grad():
        loss = loss_graph(input, linear_weight, target, linear_bias, weight, *args)
        wanted = [t for t, need in zip((input, linear_weight, linear_bias), needs) if need]
        grads = iter(torch.autograd.grad(loss, wanted, grad_output, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


def _no_gradient(name: str):
    return RuntimeError(f"fastsoftmax: linear_cross_entropy computed no gradient for {name} in its forward (it did not require grad then)")


# --- torch.library ops ----------------------------------------------------------------


@custom_op("fastsoftmax::linear_cross_entropy", mutates_args=(), device_types=("cpu", "cuda"))
def linear_cross_entropy_op(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Optional[Tensor],
    weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    chunk_rows: int,
    grad_input: bool,
    grad_weight: bool,
    grad_bias: bool,
    return_lse: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss, the three gradients (mean/sum; empty when not asked or for ``none``) and the lse (empty unless asked)."""
    reduction = validation.reduction_of(reduction)
    ii = None if is_prob(input, linear_weight, target) else ignore_index
    _, ii, eps, _ = validation.check_linear_cross_entropy(input, linear_weight, target, linear_bias, weight, ii, label_smoothing)
    cap = validation.check_softcap(softcap, "linear_cross_entropy", 9)
    needs = (grad_input, grad_weight, grad_bias and linear_bias is not None)
    loss, gx, gw, gb, lse = forward(
        input, linear_weight, target, linear_bias, weight, ii, reduction, eps, z_loss, cap, chunk_rows, needs, return_lse
    )
    return loss, *(input.new_empty((0,)) if g is None else g for g in (gx, gw, gb, lse))


@linear_cross_entropy_op.register_fake
def _(input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      chunk_rows, grad_input, grad_weight, grad_bias, return_lse):
    shape = loss_shape(input, linear_weight)
    reduced = reduction != "none"
    loss = input.new_empty(() if reduced else shape)
    gx = input.new_empty(input.shape if (reduced and grad_input) else (0,))
    gw = linear_weight.new_empty(linear_weight.shape) if (reduced and grad_weight) else input.new_empty((0,))
    gb = linear_bias.new_empty(linear_bias.shape) if (reduced and grad_bias and linear_bias is not None) else input.new_empty((0,))
    lse = input.new_empty(shape if return_lse else (0,), dtype=device(input).compute_dtype(input.dtype) if return_lse else input.dtype)
    return loss, gx, gw, gb, lse


@custom_op("fastsoftmax::linear_cross_entropy_backward", mutates_args=(), device_types=("cpu", "cuda"))
def linear_cross_entropy_backward_op(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Optional[Tensor],
    weight: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    chunk_rows: int,
    grad_output: Tensor,
    grad_input: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of the unreduced loss for ``grad_output`` (one value per loss element); empty where not asked."""
    ii = None if is_prob(input, linear_weight, target) else ignore_index
    _, ii, eps, _ = validation.check_linear_cross_entropy(input, linear_weight, target, linear_bias, weight, ii, label_smoothing)
    cap = validation.check_softcap(softcap, "linear_cross_entropy_backward", 9)
    shape = loss_shape(input, linear_weight)
    validation.check_tensor(grad_output, "grad_output", "linear_cross_entropy_backward")
    if tuple(grad_output.shape) != shape:
        raise validation.ShapeError(
            f"fastsoftmax: linear_cross_entropy_backward: grad_output of shape {list(grad_output.shape)} does not match the loss's {list(shape)}"
        )
    validation.check_same_device(input, grad_output, "grad_output")
    needs = (grad_input, grad_weight, grad_bias and linear_bias is not None)
    grads = backward_none(input, linear_weight, target, linear_bias, weight, ii, eps, z_loss, cap, chunk_rows, grad_output, needs)
    return tuple(input.new_empty((0,)) if g is None else g for g in grads)


@linear_cross_entropy_backward_op.register_fake
def _(input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing, z_loss, softcap, chunk_rows,
      grad_output, grad_input, grad_weight, grad_bias):
    gx = input.new_empty(input.shape if grad_input else (0,))
    gw = linear_weight.new_empty(linear_weight.shape) if grad_weight else input.new_empty((0,))
    gb = linear_bias.new_empty(linear_bias.shape) if (grad_bias and linear_bias is not None) else input.new_empty((0,))
    return gx, gw, gb


def _setup_context(ctx, inputs, output):
    input, linear_weight, target, linear_bias, weight, ii, reduction, eps, z, cap, rows = inputs[:11]
    ctx.args = (ii, reduction, eps, z, cap, rows)
    ctx.computed = inputs[11:14]
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(input, linear_weight, target, linear_bias, weight, *output[1:4])


def _autograd_backward(ctx, grad_loss, *_grads_of_outputs):
    input, linear_weight, target, linear_bias, weight, gx, gw, gb = ctx.saved_tensors
    ii, reduction, eps, z, cap, rows = ctx.args
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
    reduction = validation.reduction_of(reduction)
    if torch.is_grad_enabled():
        ii = -100 if is_prob(input, linear_weight, target) else ii
        saved = (input, linear_weight, target, linear_bias, weight)
        grads = backward_graph(saved, (ii, reduction, eps, z, cap), grad_loss, needs)
    elif reduction == "none":
        grads = linear_cross_entropy_backward_op(
            input, linear_weight, target, linear_bias, weight, ii, eps, z, cap, rows, grad_loss, *needs
        )
    else:
        for need, computed, name in zip(needs, ctx.computed, ("input", "linear_weight", "linear_bias")):
            if need and not computed:
                raise _no_gradient(name)
        grads = tuple(g * grad_loss if need else None for g, need in zip((gx, gw, gb), needs))
    gx, gw, gb = (g if need else None for g, need in zip(grads, needs))
    return gx, gw, None, gb, *((None,) * 11)


linear_cross_entropy_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# --- the autograd Function ---------------------------------------------------------------


class LinearCrossEntropyCore(torch.autograd.Function):
    """Fused linear cross-entropy with arguments already checked: what :func:`fastsoftmax.linear_cross_entropy` runs.

    ``apply(input, linear_weight, target, linear_bias, weight, ignore_index,
    reduction, label_smoothing, z_loss, softcap, chunk_rows, return_lse)``
    returns the loss, or ``(loss, lse)`` with ``return_lse`` (``lse`` takes
    no gradient). For ``mean``/``sum`` the forward computes the gradients
    and the backward scales them (a grad_output of exactly 1 returns them
    as they are, no copy); for ``none`` the backward recomputes the chunks.
    """

    @staticmethod
    def forward(ctx, input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing,
                z_loss=0.0, softcap=None, chunk_rows=0, return_lse=False):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
        loss, gx, gw, gb, lse = forward(
            input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing,
            z_loss, softcap, chunk_rows, needs, return_lse,
        )
        ctx.args = (ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_rows)
        ctx.save_for_backward(input, linear_weight, target, linear_bias, weight, gx, gw, gb)
        if return_lse:
            ctx.mark_non_differentiable(lse)
            return loss, lse
        return loss

    @staticmethod
    def backward(ctx, grad_output, *_grad_of_lse):
        input, linear_weight, target, linear_bias, weight, gx, gw, gb = ctx.saved_tensors
        ii, reduction, eps, z, cap, rows = ctx.args
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
        if torch.is_grad_enabled():
            saved = (input, linear_weight, target, linear_bias, weight)
            gx, gw, gb = backward_graph(saved, (ii, reduction, eps, z, cap), grad_output, needs)
        elif reduction == "none":
            gx, gw, gb = backward_none(input, linear_weight, target, linear_bias, weight, ii, eps, z, cap, rows, grad_output, needs)
        elif not (grad_output.numel() == 1 and not grad_output.is_cuda and grad_output.item() == 1.0):
            gx, gw, gb = (None if g is None else g * grad_output for g in (gx, gw, gb))
        return gx, gw, None, gb, *((None,) * 8)


class LinearCrossEntropyFunction(UnderTransforms, LinearCrossEntropyCore):
    """:class:`LinearCrossEntropyCore` behind the checks of :func:`fastsoftmax.linear_cross_entropy` (a public door).

    ``apply(input, linear_weight, target, linear_bias=None, weight=None, reduction="mean", ignore_index=None,
    label_smoothing=0.0, options=None, z_loss=0.0, softcap=None, return_lse=False)``.
    """

    @staticmethod
    def forward(ctx, input, linear_weight, target, linear_bias=None, weight=None, reduction="mean", ignore_index=None,
                label_smoothing=0.0, options=None, z_loss=0.0, softcap=None, return_lse=False):
        checked = check_arguments(
            input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, options, z_loss, softcap
        )
        args = (*checked[1:7], return_lse)
        return LinearCrossEntropyCore.forward(ctx, input, linear_weight, target, linear_bias, weight, *args)

    @staticmethod
    def through_functions(input, linear_weight, target, linear_bias=None, weight=None, reduction="mean", ignore_index=None,
                         label_smoothing=0.0, options=None, z_loss=0.0, softcap=None, return_lse=False):
        from ..functional import linear_cross_entropy

        out = linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction, ignore_index=ignore_index,
            label_smoothing=label_smoothing, options=options, z_loss=z_loss, softcap=softcap, return_lse=return_lse,
        )
        return (out.loss, out.lse) if return_lse else out


_WRT = ("input", "linear_weight", "linear_bias")


def value_and_grad(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean", ignore_index=None,
                   label_smoothing=0.0, options=None, z_loss=0.0, softcap=None, wrt=None):
    """``(loss, grad_input, grad_linear_weight, grad_linear_bias)`` of :func:`fastsoftmax.linear_cross_entropy`, no graph.

    The gradients of the reduced loss (``mean`` or ``sum``), computed in the
    same pass as the loss, for the tensors ``wrt`` names (some of
    ``"input"``, ``"linear_weight"``, ``"linear_bias"``; None: those that
    require grad), None for the others: what ``loss.backward()`` would
    accumulate, with no autograd graph to build and walk. For a training step
    that applies them itself (the D2L example's ``fused-linear`` step).
    """
    prob, ii, reduction, eps, z, cap, rows, shape = check_arguments(
        input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, options, z_loss, softcap
    )
    if reduction == "none":
        raise validation.ArgumentError("fastsoftmax: value_and_grad takes a reduced loss (reduction 'mean' or 'sum'), got 'none'")
    if wrt is None:
        needs = (input.requires_grad, linear_weight.requires_grad, linear_bias is not None and linear_bias.requires_grad)
    else:
        if isinstance(wrt, str) or not set(wrt) <= set(_WRT):
            raise validation.ArgumentError(f"fastsoftmax: value_and_grad(): wrt names some of {_WRT}, got {wrt!r}")
        needs = ("input" in wrt, "linear_weight" in wrt, "linear_bias" in wrt and linear_bias is not None)
    if torch.is_grad_enabled():
        # no graph: the gradients come from the kernels, and those of the target or the class weights are not returned
        input, linear_weight, target = input.detach(), linear_weight.detach(), target.detach()
        linear_bias = None if linear_bias is None else linear_bias.detach()
        weight = None if weight is None else weight.detach()
    if (prob or not all(shape[input.ndim - 1 :])) and needs_logits(input, target, weight, prob, shape):
        from ..functional import linear_cross_entropy

        leaves = [t.requires_grad_(need) if t is not None else None for t, need in zip((input, linear_weight, linear_bias), needs)]
        kw = dict(linear_bias=leaves[2], weight=weight, reduction=reduction, label_smoothing=eps, z_loss=z, softcap=cap)
        with torch.enable_grad():
            loss = linear_cross_entropy(leaves[0], leaves[1], target, ignore_index=None if prob else ii, **kw)
            grads = iter(torch.autograd.grad(loss, [t for t, need in zip(leaves, needs) if need]) if any(needs) else ())
        return (loss.detach(), *(next(grads) if need else None for need in needs))
    loss, gx, gw, gb, _ = forward(input, linear_weight, target, linear_bias, weight, ii, reduction, eps, z, cap, rows, needs)
    return loss, gx, gw, gb
