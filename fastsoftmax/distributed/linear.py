r"""Fused linear + vocabulary-parallel cross-entropy: each rank holds the output layer's rows of its classes.

With hidden states :math:`h` (N, H), the same on every rank, and the output
layer :math:`W` (C, H) split by rows (rank ``r`` holds :math:`W_r`, its
:math:`V_r` classes, and its part of the bias), the loss of the logits
:math:`x = h W^T + b` and its gradients are

.. math::

    \frac{\partial L}{\partial W_r} = g_r^T h, \qquad
    \frac{\partial L}{\partial b_r} = \textstyle\sum_i g_{r,i}, \qquad
    \frac{\partial L}{\partial h} = \sum_r g_r W_r,

:math:`g_r` the rank's slice of the gradient of the logits
(:mod:`.rows`). The rows go through in chunks: per chunk a matmul makes the
rank's logits of those rows, pass 1, the two collectives of :mod:`.rows`,
pass 2 in place of those logits, then the chunk's contributions to the
three gradients. So no rank ever holds all N rows of its logits, let alone
all C classes. The partial :math:`g_r W_r` are summed over the ranks by one
all-reduce of ``N * H`` values after the last chunk.

This is a minimal chunk loop of its own (``torch.addmm``), not yet the
single-device fused linear cross-entropy's chunk driver. Under
``torch.compile`` it runs as the ``torch.library`` op
``fastsoftmax::vocab_parallel_linear_cross_entropy``.
"""

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.library import custom_op

from .. import validation
from ..errors import ArgumentError, DTypeError, ShapeError
from ..ops import cross_entropy as ce_op
from ..ops.layout import to_dtype
from . import rows as R

FN = "vocab_parallel_linear_cross_entropy"

#: Rows per chunk when none is given: a chunk's logits take about this many bytes.
CHUNK_BYTES = 32 << 20


def _check_local(hidden, linear_weight, bias, target, weight, vocab_start, chunk_rows) -> None:
    """The checks whose outcome may differ between ranks."""
    validation.check_tensor(hidden, "hidden", FN)
    validation.check_tensor(linear_weight, "linear_weight", FN)
    for name, t in (("hidden", hidden), ("linear_weight", linear_weight)):
        validation.check_layout(t, FN)
        validation.check_device(t, name)
        validation.check_float_input(t, "addmm", name)
    if hidden.ndim == 0 or hidden.shape[:-1] != target.shape:
        raise ShapeError(f"fastsoftmax: {FN}: hidden of shape {list(hidden.shape)} needs target of shape {list(hidden.shape[:-1])}, got {list(target.shape)}")
    if linear_weight.ndim != 2 or linear_weight.shape[1] != hidden.shape[-1]:
        raise ShapeError(f"fastsoftmax: {FN}: linear_weight must be (V_r, {hidden.shape[-1]}), this rank's rows of the output layer; got {list(linear_weight.shape)}")
    if linear_weight.dtype != hidden.dtype:
        raise DTypeError(f"fastsoftmax: {FN}: linear_weight is {linear_weight.dtype}, hidden {hidden.dtype}: they must match")
    validation.check_same_device(hidden, linear_weight, "linear_weight")
    validation.check_same_device(hidden, target, "target")
    if bias is not None:
        validation.check_tensor(bias, "bias", FN)
        validation.check_same_device(hidden, bias, "bias")
        if bias.shape != linear_weight.shape[:1] or bias.dtype != hidden.dtype:
            raise ShapeError(f"fastsoftmax: {FN}: bias must be ({linear_weight.shape[0]},) {hidden.dtype}, got {list(bias.shape)} {bias.dtype}")
    R.check_vocab_start(vocab_start, FN)
    if weight is not None:
        R.check_class_weight(weight, hidden, linear_weight.shape[0], FN)
    if chunk_rows is not None and chunk_rows < 1:
        raise ArgumentError(f"fastsoftmax: {FN}: chunk_rows must be at least 1, got {chunk_rows}")


def _logits(h, lw, b) -> Tensor:
    """One chunk's logits ``h W_r^T + b_r`` (n, V_r): a fresh buffer, which pass 2 overwrites with the gradient."""
    return torch.addmm(b, h, lw.T) if b is not None else torch.mm(h, lw.T)


class _Grads:
    """The gradients of hidden (N, H), of this rank's rows of the layer (V_r, H) and of its bias, summed chunk by chunk."""

    def __init__(self, n_rows, lw, with_bias):
        self.hidden = lw.new_empty((n_rows, lw.shape[1]))
        self.layer = torch.zeros_like(lw)
        self.bias = lw.new_zeros(lw.shape[0]) if with_bias else None

    def add(self, rows: slice, g: Tensor, h: Tensor, lw: Tensor) -> None:
        torch.mm(g, lw, out=self.hidden[rows])
        self.layer.addmm_(g.T, h)
        if self.bias is not None:
            self.bias += g.sum(0)

    def finish(self, pg, reduction: str, denom: float, kept: Tensor) -> list:
        """Sum the hidden gradient over the ranks (one all-reduce of N * H), then divide by ``denom`` for a mean.

        A mean over zero kept weight is NaN, as torch's gradient of it: in
        every row with a kept target (so all of the layer's and the bias's
        gradient), while rows of ignored targets keep their 0.
        """
        dist.all_reduce(self.hidden, op=dist.ReduceOp.SUM, group=pg)
        grads = [self.hidden, self.layer] + ([self.bias] if self.bias is not None else [])
        if reduction == "mean" and denom:
            for g in grads:
                g.div_(denom)
        elif reduction == "mean" and bool(kept.any()):
            self.hidden[kept] = math.nan
            for g in grads[1:]:
                g.fill_(math.nan)
        return grads


def forward(hidden, linear_weight, bias, target, weight, group_name, vocab_start, ignore_index, reduction, eps, chunk_rows, fused):
    """``(loss, grads, state)``.

    ``grads``: with ``fused``, the gradients of hidden, linear_weight (and
    bias) for a unit grad_output, computed chunk by chunk in this pass (the
    hidden one summed over the ranks); else None. ``state`` (float64): what
    :func:`backward` needs to rebuild them (``reduction="none"``): each
    row's ``M``, ``S`` and ``w_t``, then the class layout and ``W``.
    """
    pg = R.process_group(group_name, FN)
    R.check_target(target, FN)
    problem = R.local_problem(_check_local, hidden, linear_weight, bias, target, weight, vocab_start, chunk_rows)
    if problem is not None and not (isinstance(hidden, Tensor) and isinstance(linear_weight, Tensor)):
        raise problem
    n_rows = target.numel()
    torch_ops = hidden.is_cuda or R.TORCH_OPS
    compute = R.compute_dtype(hidden.dtype)
    dev = hidden.device
    f64 = dict(dtype=torch.float64, device=dev)
    t = to_dtype(target.reshape(-1), torch.int64)
    kept = t != ignore_index
    loss_rows = torch.zeros(n_rows, **f64)
    stats = [torch.full((n_rows,), math.nan, **f64) for _ in range(3)]  # M, S, w_t per row
    step = 0
    if problem is None:
        h2 = hidden.reshape(n_rows, hidden.shape[-1]).to(compute)
        lw = linear_weight.to(compute)
        b = bias.to(compute) if bias is not None else None
        w = weight.to(compute) if weight is not None else None
        width = lw.shape[0]
        step = chunk_rows or max(1, CHUNK_BYTES // max(1, width * torch.finfo(compute).bits // 8))
    # every rank must cut the same chunks, or their collectives would differ in size: the fewest rows any asked for
    layout = R.exchange_max(pg, torch.empty(0, **f64), (width if problem is None else 0, vocab_start, problem, step))
    R.check_targets(t, layout.n_classes, ignore_index)
    step = layout.chunk_rows
    grads = _Grads(n_rows, lw, b is not None) if fused else None
    denom, w_sum = 0.0, 0.0
    for start in range(0, n_rows, step):
        part = slice(start, min(start + step, n_rows))
        x = _logits(h2[part], lw, b)
        m_r, s_r, gap_r = R.partials(x, w, eps > 0.0, torch_ops)
        row_max = m_r.clone()
        R.exchange_max(pg, row_max)
        rows = R.exchange_sums(pg, x, t[part], w, layout, ignore_index, eps, m_r, s_r, gap_r, row_max)
        loss_rows[part] = rows.losses(kept[part], eps, layout.n_classes)
        denom += float(rows.w_t.sum())
        w_sum = rows.w_sum
        for saved, value in zip(stats, (rows.row_max, rows.row_sum, rows.w_t)):
            saved[part] = value
        if fused:
            g = R.gradient(x, t[part], w, layout, ignore_index, eps, 1.0, rows, x, torch_ops)
            grads.add(part, g, h2[part], lw)
    loss = R.reduce_losses(loss_rows, reduction, denom, target.shape, hidden.dtype)
    out = None
    if fused:
        out = [g.to(like.dtype) for g, like in zip(grads.finish(pg, reduction, denom, kept), (hidden, linear_weight, bias))]
        out[0] = out[0].view(hidden.shape)
    tail = torch.tensor([layout.v0, layout.width, layout.n_classes, step, w_sum], **f64)
    return loss, out, torch.cat(stats + [tail])


def _unpack(state: Tensor, n_rows: int) -> tuple:
    """``(M, S, w_t, layout, w_sum)`` from the state :func:`forward` returns (three float64 a row, then the layout)."""
    v0, width, n_classes, step, w_sum = state[3 * n_rows :].tolist()
    layout = R.Layout(int(v0), int(width), int(n_classes), int(step))
    return state[:n_rows], state[n_rows : 2 * n_rows], state[2 * n_rows : 3 * n_rows], layout, w_sum


def backward(hidden, linear_weight, bias, target, weight, group_name, ignore_index, eps, state, grad_output) -> list:
    """The gradients for a per-row grad_output (``reduction="none"``): each chunk's logits made again, pass 2 from the saved rows.

    No collective but the all-reduce of the hidden gradient.
    """
    pg = R.process_group(group_name, FN)
    compute = R.compute_dtype(hidden.dtype)
    n_rows = target.numel()
    torch_ops = hidden.is_cuda or R.TORCH_OPS
    h2 = hidden.reshape(n_rows, hidden.shape[-1]).to(compute)
    lw = linear_weight.to(compute)
    b = bias.to(compute) if bias is not None else None
    w = weight.to(compute) if weight is not None else None
    t = to_dtype(target.reshape(-1), torch.int64)
    go = grad_output.reshape(-1).to(compute)
    grads = _Grads(n_rows, lw, b is not None)
    row_max, row_sum, w_t, layout, w_sum = _unpack(state, n_rows)
    for start in range(0, n_rows, layout.chunk_rows):
        part = slice(start, min(start + layout.chunk_rows, n_rows))
        x = _logits(h2[part], lw, b)
        rows = R.Rows(row_max[part], row_sum[part], None, w_t[part], None, w_sum)
        g = R.gradient(x, t[part], w, layout, ignore_index, eps, 1.0, rows, x, torch_ops)
        g.mul_(go[part, None])
        grads.add(part, g, h2[part], lw)
    out = [g.to(like.dtype) for g, like in zip(grads.finish(pg, "none", 1.0, None), (hidden, linear_weight, bias))]
    out[0] = out[0].view(hidden.shape)
    return out


# --- the torch.library ops: what torch.compile sees ------------------------------------------


@custom_op("fastsoftmax::vocab_parallel_linear_cross_entropy", mutates_args=(), device_types=("cpu", "cuda"))
def linear_op(
    hidden: Tensor,
    linear_weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    group_name: str,
    vocab_start: Optional[int],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    chunk_rows: Optional[int],
    fused: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, grad of hidden, of linear_weight, of bias, state)``; the gradients empty unless ``fused``."""
    args = (target, weight, group_name, vocab_start, ignore_index, reduction, label_smoothing, chunk_rows, fused)
    loss, grads, state = forward(hidden, linear_weight, bias, *args)
    grads = grads or [hidden.new_empty((0,)), hidden.new_empty((0,))]  # two tensors: outputs may not alias
    return loss, grads[0], grads[1], grads[2] if len(grads) > 2 else hidden.new_empty((0,)), state


@linear_op.register_fake
def _(hidden, linear_weight, bias, target, weight, group_name, vocab_start, ignore_index, reduction, label_smoothing, chunk_rows, fused):
    loss = hidden.new_empty(target.shape if reduction == "none" else ())
    grads = (torch.empty_like(hidden), torch.empty_like(linear_weight)) if fused else (hidden.new_empty((0,)), hidden.new_empty((0,)))
    grad_bias = torch.empty_like(bias) if fused and bias is not None else hidden.new_empty((0,))
    return loss, *grads, grad_bias, hidden.new_empty((3 * target.numel() + 5,), dtype=torch.float64)


@custom_op("fastsoftmax::vocab_parallel_linear_cross_entropy_backward", mutates_args=(), device_types=("cpu", "cuda"))
def linear_backward_op(
    hidden: Tensor,
    linear_weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    group_name: str,
    ignore_index: int,
    label_smoothing: float,
    state: Tensor,
    grad_output: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    grads = backward(hidden, linear_weight, bias, target, weight, group_name, ignore_index, label_smoothing, state, grad_output)
    return grads[0], grads[1], grads[2] if len(grads) > 2 else hidden.new_empty((0,))


@linear_backward_op.register_fake
def _(hidden, linear_weight, bias, target, weight, group_name, ignore_index, label_smoothing, state, grad_output):
    grad_bias = torch.empty_like(bias) if bias is not None else hidden.new_empty((0,))
    return torch.empty_like(hidden), torch.empty_like(linear_weight), grad_bias


def _setup_context(ctx, inputs, output):
    hidden, linear_weight, bias, target, weight, group_name, _, ignore_index, _, label_smoothing, _, fused = inputs
    ctx.fused = fused
    ctx.with_bias = bias is not None
    ctx.args = (group_name, ignore_index, label_smoothing)
    ctx.mark_non_differentiable(*output[1:])
    if fused:
        ctx.save_for_backward(*output[1:4])
    else:
        ctx.save_for_backward(hidden, linear_weight, bias, target, weight, output[4])


def _op_backward(ctx, grad_loss, *_):
    if ctx.fused:
        grads = [g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
    else:
        hidden, linear_weight, bias, target, weight, state = ctx.saved_tensors
        grads = list(linear_backward_op(hidden, linear_weight, bias, target, weight, *ctx.args, state, grad_loss))
    return grads[0], grads[1], grads[2] if ctx.with_bias else None, *(None,) * 9


linear_op.register_autograd(_op_backward, setup_context=_setup_context)


# --- eager: the autograd Function and the public function ----------------------------------


class VocabParallelLinearCrossEntropyFunction(torch.autograd.Function):
    """``apply(hidden, linear_weight, bias, target, weight, group_name, vocab_start, ignore_index, reduction, label_smoothing, chunk_rows)``.

    A mean or a sum: the gradients are computed in the forward, and the
    backward only scales them by grad_output (no communication).
    ``reduction="none"``: the forward keeps each row's ``M``, ``S`` and
    ``w_t`` (three float64 a row), and the backward makes each chunk's
    logits again, with one all-reduce (the hidden gradient).
    """

    @staticmethod
    def forward(ctx, hidden, linear_weight, bias, target, weight, group_name, vocab_start, ignore_index, reduction, label_smoothing, chunk_rows):
        compute_grad = any(ctx.needs_input_grad[:3])
        fused = compute_grad and reduction != "none"
        args = (target, weight, group_name, vocab_start, ignore_index, reduction, label_smoothing, chunk_rows)
        loss, grads, state = forward(hidden, linear_weight, bias, *args, fused)
        ctx.fused = fused
        ctx.with_bias = bias is not None
        if fused:
            ctx.save_for_backward(*grads)
        elif compute_grad:
            ctx.save_for_backward(hidden, linear_weight, bias, target, weight, state)
            ctx.args = (group_name, ignore_index, label_smoothing)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.fused:
            grads = list(ctx.saved_tensors)
            if not ce_op.is_unit(grad_output):
                grads = [g * grad_output.to(g.dtype) for g in grads]
        else:
            hidden, linear_weight, bias, target, weight, state = ctx.saved_tensors
            grads = backward(hidden, linear_weight, bias, target, weight, *ctx.args, state, grad_output)
        if not ctx.with_bias:
            grads.append(None)
        return (*grads, None, None, None, None, None, None, None, None)


def vocab_parallel_linear_cross_entropy(
    hidden: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    group=None,
    *,
    bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    vocab_start: Optional[int] = None,
    chunk_rows: Optional[int] = None,
) -> Tensor:
    r"""Cross-entropy of ``hidden @ W.T + b`` with the output layer ``W`` split by rows (classes) over the ranks of ``group``.

    Equal to :func:`fastsoftmax.cross_entropy` of the full logits (to
    rounding), with no rank holding more than ``chunk_rows`` rows of its
    own logits at a time.

    Args:
        hidden: ``(..., H)``, the same on every rank.
        linear_weight: ``(V_r, H)``, the rows of the output layer for this
            rank's classes (in the order of the classes).
        target: ``(...)`` class indices into all ``C = sum_r V_r`` classes.
        group, weight, ignore_index, reduction, label_smoothing,
        vocab_start: as in :func:`vocab_parallel_cross_entropy`.
        bias: ``(V_r,)`` this rank's part of the output layer's bias, or None.
        chunk_rows: rows per chunk (default: about 32 MiB of logits).

    A mean or a sum computes the gradients in the forward (backward only
    scales them); ``reduction="none"`` keeps three float64 per row and
    builds the gradients in backward. Per chunk, the two collectives of
    :func:`vocab_parallel_cross_entropy`; once per call, one all-reduce of
    the ``N * H`` hidden gradient. Half-precision inputs are computed in
    float32 copies.
    """
    reduction = validation.reduction_of(reduction)
    ignore_index = validation.as_int(ignore_index, "ignore_index", FN, 6)
    eps = validation.label_smoothing_of(label_smoothing, FN)
    if vocab_start is not None:
        vocab_start = validation.as_int(vocab_start, "vocab_start", FN, 9)
    if chunk_rows is not None:
        chunk_rows = validation.as_int(chunk_rows, "chunk_rows", FN, 10)
    name = R.group_name(group, FN)
    needs = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (hidden, linear_weight, bias))
    args = (target, weight, name, vocab_start, ignore_index, reduction, eps, chunk_rows)
    if torch.compiler.is_compiling():
        return linear_op(hidden, linear_weight, bias, *args, needs and reduction != "none")[0]
    if not needs:
        return forward(hidden, linear_weight, bias, *args, False)[0]
    return VocabParallelLinearCrossEntropyFunction.apply(hidden, linear_weight, bias, *args)
