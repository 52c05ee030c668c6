r"""Vocabulary-parallel cross-entropy of logits whose classes are split over the ranks: the op, its autograd, the function.

The forward reads the rank's logits twice (pass 1 before the two
collectives of :mod:`.rows`, pass 2 after, which writes the rank's slice of
the gradient for a unit grad_output); the backward only multiplies that
slice by grad_output, with no communication. Every rank returns the same
loss.
"""

import math
from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from .. import validation
from ..errors import ShapeError
from ..ops import cross_entropy as ce_op
from ..ops.layout import device, rows_last, to_dtype
from . import rows as R


def _check_local(x, target, weight, vocab_start) -> None:
    """The checks whose outcome may differ between ranks (each rank's logits, weights, vocab_start)."""
    validation.check_tensor(x, "logits_shard", R.FN)
    validation.check_layout(x, R.FN)
    validation.check_device(x, "logits_shard")
    validation.check_float_input(x, "log_softmax_lastdim_kernel_impl", "logits_shard")
    if x.ndim == 0 or x.shape[:-1] != target.shape:
        raise ShapeError(
            f"fastsoftmax: {R.FN}: logits_shard of shape {list(x.shape)} needs target of shape {list(x.shape[:-1])} "
            f"(the classes last), got {list(target.shape)}"
        )
    validation.check_same_device(x, target, "target")
    R.check_vocab_start(vocab_start)
    if weight is not None:
        R.check_class_weight(weight, x, x.shape[-1])


def forward(x, target, weight, group_name, vocab_start, ignore_index, reduction, eps, compute_grad):
    """``(loss, grad)``: the reduced loss (the same on every rank) and this rank's slice of d(loss)/d(logits) for a unit grad_output.

    ``grad`` is in the compute dtype (float32 for half logits), shaped like
    ``x``; empty unless ``compute_grad``.
    """
    pg = R.process_group(group_name)
    R.check_target(target)
    problem = R.local_problem(_check_local, x, target, weight, vocab_start)
    if problem is not None and not isinstance(x, Tensor):
        raise problem
    n_rows = target.numel()
    torch_ops = x.is_cuda or R.TORCH_OPS
    compute = R.compute_dtype(x.dtype)
    m_r = torch.full((n_rows,), -math.inf, dtype=torch.float64, device=x.device)
    row_max = m_r.clone()
    if problem is None:
        xr = rows_last(x, x.ndim - 1, compute).view(n_rows, x.shape[-1])
        w = rows_last(weight, 0, compute) if weight is not None else None
        m_r, s_r, gap_r = R.partials(xr, w, eps > 0.0, torch_ops)
        row_max.copy_(m_r)
    width = x.shape[-1] if problem is None else 0
    layout = R.exchange_max(pg, row_max, (width, vocab_start, problem, 0))
    t = to_dtype(target.reshape(-1), torch.int64)
    R.check_targets(t, layout.n_classes, ignore_index)
    rows = R.exchange_sums(pg, xr, t, w, layout, ignore_index, eps, m_r, s_r, gap_r, row_max)
    kept = t != ignore_index
    loss_rows = rows.losses(kept, eps, layout.n_classes)
    denom = float(rows.w_t.sum())
    loss = R.reduce_losses(loss_rows, reduction, denom, target.shape, x.dtype)
    if not compute_grad:
        return loss, x.new_empty((0,), dtype=compute)
    grad = device(x).empty(xr.shape, compute, x.device)
    R.gradient(xr, t, w, layout, ignore_index, eps, R.mean_scale(reduction, denom), rows, grad, torch_ops)
    return loss, grad.view(x.shape)


def scale(grad: Tensor, grad_output: Tensor, input_dtype: torch.dtype) -> Tensor:
    """``grad * grad_output`` (a scalar, or one value per row), with the classes last; no communication."""
    g2 = grad.reshape(math.prod(grad.shape[:-1]), grad.shape[-1])  # -1 is ambiguous for no classes
    go = grad_output.reshape(-1) if grad_output.ndim else grad_output
    return ce_op.backward(g2, go, input_dtype).view(grad.shape)


# --- the torch.library op: what torch.compile sees -----------------------------------------


@custom_op("fastsoftmax::vocab_parallel_cross_entropy", mutates_args=(), device_types=("cpu", "cuda"))
def vocab_parallel_op(
    logits_shard: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    group_name: str,
    vocab_start: Optional[int],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    return forward(logits_shard, target, weight, group_name, vocab_start, ignore_index, reduction, label_smoothing, compute_grad)


@vocab_parallel_op.register_fake
def _(logits_shard, target, weight, group_name, vocab_start, ignore_index, reduction, label_smoothing, compute_grad):
    loss = logits_shard.new_empty(target.shape if reduction == "none" else ())
    compute = R.compute_dtype(logits_shard.dtype)
    grad = logits_shard.new_empty(logits_shard.shape if compute_grad else (0,), dtype=compute)
    return loss, grad


@custom_op("fastsoftmax::vocab_parallel_cross_entropy_backward", mutates_args=(), device_types=("cpu", "cuda"))
def vocab_parallel_backward_op(grad: Tensor, grad_output: Tensor, input_dtype: torch.dtype) -> Tensor:
    return scale(grad, grad_output, input_dtype)


@vocab_parallel_backward_op.register_fake
def _(grad, grad_output, input_dtype):
    return torch.empty_like(grad, dtype=input_dtype)


def _setup_context(ctx, inputs, output):
    ctx.input_dtype = inputs[0].dtype
    ctx.compute_grad = inputs[8]
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _op_backward(ctx, grad_loss, _grad_of_grad):
    if not ctx.compute_grad:
        raise RuntimeError(f"fastsoftmax: {R.FN} was called with compute_grad=False, so it kept no gradient to propagate")
    (grad,) = ctx.saved_tensors
    return vocab_parallel_backward_op(grad, grad_loss, ctx.input_dtype), None, None, None, None, None, None, None, None


vocab_parallel_op.register_autograd(_op_backward, setup_context=_setup_context)


# --- eager: the autograd Function and the public function ----------------------------------


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """The op as an autograd Function: ``apply(logits_shard, target, weight, group_name, vocab_start, ignore_index, reduction, label_smoothing)``.

    The forward keeps this rank's gradient slice for a unit grad_output; the
    backward returns it as it is for a grad_output of exactly 1, otherwise
    scaled (no communication either way).
    """

    @staticmethod
    def forward(ctx, logits_shard, target, weight, group_name, vocab_start, ignore_index, reduction, label_smoothing):
        compute_grad = ctx.needs_input_grad[0]
        loss, grad = forward(logits_shard, target, weight, group_name, vocab_start, ignore_index, reduction, label_smoothing, compute_grad)
        ctx.input_dtype = logits_shard.dtype
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if grad.dtype == ctx.input_dtype and ce_op.is_unit(grad_output):
            return (grad,) + (None,) * 7
        return (scale(grad, grad_output, ctx.input_dtype),) + (None,) * 7


def vocab_parallel_cross_entropy(
    logits_shard: Tensor,
    target: Tensor,
    group=None,
    *,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    vocab_start: Optional[int] = None,
) -> Tensor:
    r"""Cross-entropy of logits whose classes are split over the ranks of ``group``; every rank gets the same loss.

    Equal to :func:`fastsoftmax.cross_entropy` of the logits concatenated
    over the classes (to rounding), without ever gathering them.

    Args:
        logits_shard: ``(..., V_r)``, this rank's classes last (``(N, V_r)``
            for a batch of rows); any float dtype.
        target: ``(...)`` class indices into all ``C = sum_r V_r`` classes,
            the same on every rank.
        group: the process group the classes are split over (default: the
            whole world). Gloo for CPU tensors, NCCL for CUDA tensors.
        weight: ``(V_r,)`` the class weights of this rank's classes, or None
            on every rank.
        ignore_index, reduction, label_smoothing: as in
            :func:`torch.nn.functional.cross_entropy` (``reduction="none"``
            returns the target's shape).
        vocab_start: this rank's first class. None (on every rank): the
            slices follow each other in rank order. Given on every rank,
            the slices must tile ``[0, C)``.

    The loss and its gradient are

    .. math::

        \ell = (1 - \varepsilon) w_t (\mathrm{lse} - x_t) + \frac{\varepsilon}{C} \sum_c w_c (\mathrm{lse} - x_c),
        \qquad \frac{\partial \ell}{\partial x_j} = A p_j - \frac{\varepsilon}{C} w_j - (1 - \varepsilon) w_t [j = t],

    with ``lse`` from the all-reduced max and sum of exponentials
    (:mod:`fastsoftmax.distributed.rows`). Two collectives per call: an
    all-reduce MAX of ``N + 4P`` and an all-reduce SUM of ``2N`` to
    ``4N + 1`` float64. The forward computes this rank's gradient slice in
    the pass that follows them; the backward only scales it. A mean divides
    by the total weight of the kept targets (NaN when it is 0, as torch's);
    rows holding NaN or ``+inf``, or only ``-inf``, on any rank are NaN, as
    in torch. On CUDA tensors the passes are torch ops, not fused kernels.

    Raises (on every rank at once, after the first collective, so that no
    rank is left waiting): IndexError for a target outside ``[0, C)`` that
    is not ``ignore_index``; :class:`fastsoftmax.errors.ArgumentError` for
    slices that do not tile ``[0, C)`` or arguments one rank rejected (that
    rank raises its own error: shape, dtype, device of its logits or weight).
    """
    reduction = validation.reduction_of(reduction)
    ignore_index = validation.as_int(ignore_index, "ignore_index", R.FN, 5)
    eps = validation.label_smoothing_of(label_smoothing, R.FN)
    if vocab_start is not None:
        vocab_start = validation.as_int(vocab_start, "vocab_start", R.FN, 8)
    name = R.group_name(group)
    if torch.compiler.is_compiling() or (isinstance(logits_shard, Tensor) and logits_shard.device.type == "meta"):
        compute_grad = logits_shard.requires_grad and torch.is_grad_enabled()
        loss, _ = vocab_parallel_op(logits_shard, target, weight, name, vocab_start, ignore_index, reduction, eps, compute_grad)
        return loss
    if not (torch.is_grad_enabled() and isinstance(logits_shard, Tensor) and logits_shard.requires_grad):
        return forward(logits_shard, target, weight, name, vocab_start, ignore_index, reduction, eps, False)[0]
    return VocabParallelCrossEntropyFunction.apply(logits_shard, target, weight, name, vocab_start, ignore_index, reduction, eps)
