r"""Vocabulary-parallel softmax cross-entropy over ``torch.distributed``: each rank holds a slice of the classes.

With the classes split over the ranks of a process group (the output layer
of a language model under tensor parallelism), rank ``r`` holds the logits
of its classes ``[v0_r, v0_r + V_r)`` only. Per row, from what each rank
computes over its slice (:mod:`fastsoftmax.kernels.cpu_vocab`):

.. math::

    M = \max_r m_r, \qquad S = \sum_r s_r\, e^{m_r - M}, \qquad
    \mathrm{lse} = M + \log S,

    \ell = (1 - \varepsilon)\, w_t\, \big((M - x_t) + \log S\big)
         + \frac{\varepsilon}{C} \Big(\sum_c w_c (M - x_c) + W \log S\Big),

    \frac{\partial \ell}{\partial x_j} = A\, \frac{e^{x_j - M}}{S} - \frac{\varepsilon}{C} w_j
         - (1 - \varepsilon)\, w_t\, [j = t], \qquad A = (1 - \varepsilon) w_t + \frac{\varepsilon}{C} W,

with ``m_r``, ``s_r = sum_j exp(x_j - m_r)`` the rank's max and sum, ``C``
and ``W`` the number and total weight of all classes, the formulas of
:func:`fastsoftmax.kernels.rowmath.ce_index_loss` and ``ce_index_grad_coeffs``.

Per call, two collectives on the group, no logits moved:

1. all-reduce MAX of ``3P + N`` float64: each rank's slice width, its
   ``vocab_start`` and whether its arguments were rejected (one slot per
   rank, ``-inf`` elsewhere, so MAX gathers them), then the row maxima;
2. all-reduce SUM of ``2N`` float64 (``S``, ``x_t``), ``+ N + 1`` with
   weights (``w_t``, ``W``), ``+ N`` with label smoothing (the gap
   :math:`\sum_c w_c (M - x_c)`, summed from each rank's gap about its own
   max, every term non-negative). Only the rank holding the target adds
   ``x_t`` and ``w_t``, so those sums are exact.

The forward reads the rank's logits twice (pass 1 before the collectives,
pass 2 after, which writes the rank's slice of the gradient for a unit
grad_output); the backward only multiplies that slice by grad_output, with
no communication. Every rank returns the same loss.

On the CPU both passes are our Numba kernels. On CUDA tensors (NCCL) they
are torch ops (``amax``, ``exp``, ``sum``, ``gather``): correct, but not
fused, and half-precision logits are computed in a float32 copy.
"""

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.library import custom_op

from . import validation
from .errors import ArgumentError, DTypeError, ShapeError, bad_target
from .kernels import rowmath
from .ops import cross_entropy as ce_op
from .ops.layout import device, rows_last, to_dtype

__all__ = ["vocab_parallel_cross_entropy", "VocabParallelCrossEntropyFunction"]

_FN = "vocab_parallel_cross_entropy"

#: Tests set this to run the torch-op passes (the CUDA path) on CPU tensors.
_TORCH_OPS = False


def _process_group(group_name: str):
    if not (dist.is_available() and dist.is_initialized()):
        raise ArgumentError(f"fastsoftmax: {_FN} needs torch.distributed initialised (init_process_group) first")
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def _group_name(group) -> str:
    if not (dist.is_available() and dist.is_initialized()):
        raise ArgumentError(f"fastsoftmax: {_FN} needs torch.distributed initialised (init_process_group) first")
    return (group if group is not None else dist.group.WORLD).group_name


def _check_local(x, target, weight, vocab_start) -> None:
    """The checks whose outcome may differ between ranks (each rank's logits, weights, vocab_start)."""
    validation.check_tensor(x, "logits_shard", _FN)
    validation.check_layout(x, _FN)
    validation.check_device(x, "logits_shard")
    validation.check_float_input(x, "log_softmax_lastdim_kernel_impl", "logits_shard")
    if x.ndim == 0 or x.shape[:-1] != target.shape:
        raise ShapeError(
            f"fastsoftmax: {_FN}: logits_shard of shape {list(x.shape)} needs target of shape {list(x.shape[:-1])} "
            f"(the classes last), got {list(target.shape)}"
        )
    validation.check_same_device(x, target, "target")
    if vocab_start is not None and vocab_start < 0:
        raise ArgumentError(f"fastsoftmax: {_FN}: vocab_start must be >= 0, got {vocab_start}")
    if weight is not None:
        validation.check_tensor(weight, "weight", _FN)
        validation.check_same_device(x, weight, "weight")
        if weight.shape != x.shape[-1:]:
            raise ShapeError(
                f"fastsoftmax: {_FN}: weight holds the weights of this rank's {x.shape[-1]} classes, got shape {list(weight.shape)}"
            )
        if weight.dtype != x.dtype:
            raise DTypeError(f"fastsoftmax: {_FN}: weight is {weight.dtype}, logits_shard {x.dtype}: they must match")


def _class_layout(widths: list, starts: list, rank: int) -> tuple:
    """``(v0, C)``: this rank's first class and the number of classes, from every rank's width and vocab_start (-1: none)."""
    total = sum(widths)
    given = [s >= 0 for s in starts]
    if not any(given):
        return sum(widths[:rank]), total
    if not all(given):
        missing = [r for r, g in enumerate(given) if not g]
        raise ArgumentError(f"fastsoftmax: {_FN}: vocab_start was given on some ranks but not on ranks {missing}: give it on all or none")
    end = 0
    for start, width, r in sorted(zip(starts, widths, range(len(widths)))):
        if start != end:
            what = f"class {end} is in no slice" if start > end else f"class {start} is in two slices"
            raise ArgumentError(
                f"fastsoftmax: {_FN}: the slices [vocab_start, vocab_start + V_r) must tile [0, C) with no gap or "
                f"overlap, but {what} (rank {r} starts at {start}); vocab_start by rank {starts}, widths {widths}"
            )
        end = start + width
    return starts[rank], total


def _check_targets(t: Tensor, n_classes: int, ignore_index: int) -> None:
    bad = (t != ignore_index) & ((t < 0) | (t >= n_classes))
    if bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        raise bad_target(int(t[position]), position, n_classes, ignore_index)


def _partials_torch(x: Tensor, w, want_gap: bool) -> tuple:
    """Pass 1 in torch ops: ``(m_r, s_r, g_r)`` float64, as :func:`kernels.cpu_vocab._vocab_partials` computes them."""
    rows = x.shape[0]
    if x.shape[1] == 0:
        zeros = x.new_zeros(rows, dtype=torch.float64)
        return torch.full_like(zeros, -math.inf), zeros, zeros
    m = x.amax(1)  # NaN where the row holds one, which s then carries
    s = torch.exp(x - m[:, None]).sum(1, dtype=torch.float64)
    empty = m == -math.inf
    s = torch.where(empty, 0.0, s)
    base = torch.where(empty, 0.0, m)
    gap = ((base[:, None] - x) * (w if w is not None else 1.0)).sum(1, dtype=torch.float64) if want_gap else None
    return torch.where(torch.isnan(m), -math.inf, m).double(), s, gap


def _partials_kernel(x: Tensor, w, want_gap: bool) -> tuple:
    dev = device(x)
    rows = x.shape[0]
    m, s = (dev.empty((rows,), torch.float64) for _ in range(2))
    gap = dev.empty((rows if want_gap else 0,), torch.float64)
    arr = dev.array
    dev.backend().vocab_partials(arr(x), arr(w) if w is not None else None, arr(m), arr(s), arr(gap))
    return m, s, (gap if want_gap else None)


def _gradient_torch(x, t, v0, w, ignore_index, eps, n_classes, w_sum, scale, row_max, row_sum, w_t) -> Tensor:
    """Pass 2 in torch ops, rounded in the order of :func:`kernels.cpu_vocab._vocab_gradient`."""
    k_exp, k_w, k_hot = rowmath.ce_index_grad_coeffs(row_sum, w_t, w_sum, eps, n_classes, scale)
    cd = x.dtype
    g = torch.exp(x - row_max[:, None].to(cd)) * k_exp[:, None].to(cd)
    g = g - (k_w * w if w is not None else torch.tensor(k_w, dtype=cd))
    local = t - v0
    owner = (t != ignore_index) & (local >= 0) & (local < x.shape[1])
    rows = owner.nonzero()[:, 0]
    g[rows, local[rows]] -= k_hot[rows].to(cd)
    ignored_fill = torch.where(torch.isnan(row_sum), math.nan, 0.0).to(cd)
    return torch.where((t == ignore_index)[:, None], ignored_fill[:, None], g)


def _forward(x, target, weight, group_name, vocab_start, ignore_index, reduction, eps, compute_grad):
    """``(loss, grad)``: the reduced loss (the same on every rank) and this rank's slice of d(loss)/d(logits) for a unit grad_output.

    ``grad`` is in the compute dtype (float32 for half logits), shaped like
    ``x``; empty unless ``compute_grad``.
    """
    pg = _process_group(group_name)
    n_ranks, rank = dist.get_world_size(pg), dist.get_rank(pg)
    validation.check_tensor(target, "target", _FN)
    if target.is_floating_point() or target.dtype not in (torch.int64, torch.uint8):
        raise DTypeError(f"fastsoftmax: {_FN}: target must hold class indices (int64 or uint8), got {target.dtype}")
    try:
        _check_local(x, target, weight, vocab_start)
        problem = None
    except (ValueError, TypeError, RuntimeError, IndexError) as error:
        problem = error
    if problem is not None and not isinstance(x, Tensor):
        raise problem
    n_rows = target.numel()
    torch_ops = x.is_cuda or _TORCH_OPS
    dev = device(x)
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    want_gap = eps > 0.0
    xr = w = None
    head = torch.full((3 * n_ranks + n_rows,), -math.inf, dtype=torch.float64, device=x.device)
    if problem is None:
        xr = rows_last(x, x.ndim - 1, compute).view(n_rows, x.shape[-1])
        w = rows_last(weight, 0, compute) if weight is not None else None
        m_r, s_r, gap_r = (_partials_torch if torch_ops else _partials_kernel)(xr, w, want_gap)
        head[3 * n_ranks :] = m_r
    head[rank] = x.shape[-1] if problem is None else 0
    head[n_ranks + rank] = -1 if vocab_start is None else vocab_start
    head[2 * n_ranks + rank] = 0.0 if problem is None else 1.0
    dist.all_reduce(head, op=dist.ReduceOp.MAX, group=pg)
    meta = [int(v) for v in head[: 3 * n_ranks].tolist()]
    rejected = [r for r in range(n_ranks) if meta[2 * n_ranks + r]]
    if problem is not None:
        raise problem
    if rejected:
        raise ArgumentError(f"fastsoftmax: {_FN}: the arguments of rank(s) {rejected} were rejected there (see that rank's error)")
    v0, n_classes = _class_layout(meta[:n_ranks], meta[n_ranks : 2 * n_ranks], rank)
    t = to_dtype(target.reshape(-1), torch.int64)
    _check_targets(t, n_classes, ignore_index)

    row_max = head[3 * n_ranks :]
    width = xr.shape[1]
    kept = t != ignore_index
    local = t - v0
    owner = kept & (local >= 0) & (local < width)
    idx = torch.where(owner, local, 0)[:, None]
    cols = [s_r * torch.exp(m_r - row_max)]  # NaN for a row of only -inf (-inf - -inf), as torch's
    cols.append(torch.where(owner, xr.gather(1, idx)[:, 0].double(), 0.0) if width else torch.zeros_like(s_r))
    if w is not None:
        cols.append(torch.where(owner, w[idx[:, 0]].double(), 0.0) if width else torch.zeros_like(s_r))
    w_local = w.double().sum() if w is not None else float(width)
    if want_gap:
        base = torch.where(m_r == -math.inf, 0.0, m_r)
        cols.append(gap_r + (row_max - base) * w_local)
    if w is not None:
        cols.append(w_local.reshape(1))
    body = torch.cat(cols)
    dist.all_reduce(body, op=dist.ReduceOp.SUM, group=pg)

    row_sum, x_t = body[:n_rows], body[n_rows : 2 * n_rows]
    k = 2
    if w is not None:
        w_t, k = body[2 * n_rows : 3 * n_rows], 3
        w_sum = float(body[-1])
    else:
        w_t, w_sum = kept.double(), float(n_classes)
    gap = body[k * n_rows : (k + 1) * n_rows] if want_gap else 0.0
    loss_rows = rowmath.ce_index_loss(row_max, torch.log(row_sum), x_t, w_t, gap, w_sum, eps, n_classes)
    loss_rows = torch.where(kept, loss_rows, 0.0)
    denom = float(w_t.sum())
    scale = 1.0 if reduction != "mean" else (1.0 / denom if denom else math.nan)
    if reduction == "none":
        loss = to_dtype(loss_rows.view(target.shape), x.dtype)
    else:
        total = loss_rows.sum()
        loss = to_dtype(total if reduction == "sum" else (total / denom if denom else total * math.nan), x.dtype)

    if not compute_grad:
        return loss, x.new_empty((0,), dtype=compute)
    args = (v0, w, ignore_index, eps, n_classes, w_sum, scale, row_max, row_sum, w_t)
    if torch_ops:
        grad = _gradient_torch(xr, t, *args)
    else:
        grad = dev.empty(xr.shape, compute)
        arr = dev.array
        dev.backend().vocab_gradient(
            arr(xr), arr(t), v0, arr(w) if w is not None else None, ignore_index, eps, n_classes, w_sum, scale,
            arr(row_max), arr(row_sum), arr(w_t.contiguous()), arr(grad),
        )
    return loss, grad.view(x.shape)


def _scale(grad: Tensor, grad_output: Tensor, input_dtype: torch.dtype) -> Tensor:
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
    return _forward(logits_shard, target, weight, group_name, vocab_start, ignore_index, reduction, label_smoothing, compute_grad)


@vocab_parallel_op.register_fake
def _(logits_shard, target, weight, group_name, vocab_start, ignore_index, reduction, label_smoothing, compute_grad):
    loss = logits_shard.new_empty(target.shape if reduction == "none" else ())
    compute = torch.float32 if logits_shard.dtype in (torch.float16, torch.bfloat16) else logits_shard.dtype
    grad = logits_shard.new_empty(logits_shard.shape if compute_grad else (0,), dtype=compute)
    return loss, grad


@custom_op("fastsoftmax::vocab_parallel_cross_entropy_backward", mutates_args=(), device_types=("cpu", "cuda"))
def vocab_parallel_backward_op(grad: Tensor, grad_output: Tensor, input_dtype: torch.dtype) -> Tensor:
    return _scale(grad, grad_output, input_dtype)


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
        raise RuntimeError(f"fastsoftmax: {_FN} was called with compute_grad=False, so it kept no gradient to propagate")
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
        loss, grad = _forward(logits_shard, target, weight, group_name, vocab_start, ignore_index, reduction, label_smoothing, compute_grad)
        ctx.input_dtype = logits_shard.dtype
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if grad.dtype == ctx.input_dtype and ce_op.is_unit(grad_output):
            return (grad,) + (None,) * 7
        return (_scale(grad, grad_output, ctx.input_dtype),) + (None,) * 7


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

    with ``lse`` from the all-reduced max and sum of exponentials (see the
    module). The forward computes this rank's gradient slice in the same
    pass that needs the collectives' results; the backward only scales it.
    A mean divides by the total weight of the kept targets (NaN when it is
    0, as torch's); rows holding NaN or ``+inf``, or only ``-inf``, on any
    rank are NaN, as in torch.

    Raises (on every rank at once, after the first collective, so that no
    rank is left waiting): IndexError for a target outside ``[0, C)`` that
    is not ``ignore_index``; :class:`fastsoftmax.errors.ArgumentError` for
    slices that do not tile ``[0, C)`` or arguments one rank rejected (that
    rank raises its own error: shape, dtype, device of its logits or weight).
    """
    reduction = validation.reduction_of(reduction)
    ignore_index = validation.as_int(ignore_index, "ignore_index", _FN, 5)
    eps = validation.label_smoothing_of(label_smoothing, _FN)
    if vocab_start is not None:
        vocab_start = validation.as_int(vocab_start, "vocab_start", _FN, 8)
    name = _group_name(group)
    if torch.compiler.is_compiling() or (isinstance(logits_shard, Tensor) and logits_shard.device.type == "meta"):
        compute_grad = logits_shard.requires_grad and torch.is_grad_enabled()
        loss, _ = vocab_parallel_op(logits_shard, target, weight, name, vocab_start, ignore_index, reduction, eps, compute_grad)
        return loss
    if not (torch.is_grad_enabled() and isinstance(logits_shard, Tensor) and logits_shard.requires_grad):
        return _forward(logits_shard, target, weight, name, vocab_start, ignore_index, reduction, eps, False)[0]
    return VocabParallelCrossEntropyFunction.apply(logits_shard, target, weight, name, vocab_start, ignore_index, reduction, eps)
