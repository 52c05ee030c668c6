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
* :class:`CrossEntropyFunction`, the same as a ``torch.autograd.Function``
  (:class:`CrossEntropyCore` without the argument checks).
* The loss in torch's ops where the kernel does not fit (double backward,
  targets or weights that require grad): :mod:`.cross_entropy_graph`.
"""

import math
from typing import Optional

import numpy as np

import torch
from torch import Tensor
from torch.library import custom_op

from .. import validation
from ..errors import ShapeError, bad_target
from ..kernels import config
from . import cross_entropy_cuda as cuda_design
from . import layout
from .layout import as_rows, device, empty_moved, rows_last, to_dtype
from .cross_entropy_graph import (  # noqa: F401  (composite, lse_graph, z_term_graph: for functional)
    backward_graph,
    composite,
    forward_torch_ops,
    is_prob_target,
    lse_graph,
    z_term_graph,
)


def _loss_shape(input: Tensor, reduction: str) -> list:
    if reduction != "none":
        return []
    shape = list(input.shape)
    del shape[0 if input.ndim == 1 else 1]
    return shape


def _plain_rows(input, target, weight, z_loss, want_lse, inplace) -> bool:
    """Whether :func:`_forward_cpu` takes :func:`_forward_rows` (also what the fake must mirror)."""
    return (
        input.ndim == 2
        and weight is None
        and not (z_loss or want_lse or inplace)
        and input.dtype in _KERNEL_DTYPES
        and target.ndim == 1
        and target.dtype == torch.int64
        and input.is_contiguous()
    )


def _grad_fake(input: Tensor, compute_grad: bool, target=None, weight=None, z_loss=0.0, want_lse=False) -> Tensor:
    dev = device(input)
    compute = dev.compute_dtype(input.dtype)
    if not compute_grad:
        return input.new_empty((0,), dtype=compute)
    small = target is not None and 0 < input.shape[-1] <= config.CPU_SMALL_CLASSES and input.shape[0] > 0
    if dev.name == "cpu" and small and _plain_rows(input, target, weight, z_loss, want_lse, False):
        return input.new_empty((input.shape[1], input.shape[0]), dtype=compute).t()  # _forward_rows's transposed layout
    if input.ndim > 2 and dev.middle_shape(input, 1) is not None:
        return input.new_empty(input.shape, dtype=compute)  # the middle-axis kernel's layout
    return empty_moved(input, 0 if input.ndim == 1 else 1, compute)


def _reduce(loss: Tensor, lse, kept, z_loss: float, reduction: str, denom: float, count: int, dtype) -> Tensor:
    """The per-element losses (float64, the loss's shape) plus the z-loss, reduced as ``reduction`` asks, in ``dtype``.

    A mean divides the cross-entropy by ``denom`` (the kept targets' total
    weight) and the z-loss by ``count`` (their number). torch's mean with a
    zero total is 0/0 whatever else the sum holds: NaN.
    """
    if z_loss:
        z = z_loss * lse.square()
        if kept is not None:
            z = torch.where(kept, z, 0.0)
    if reduction == "none":
        return to_dtype(loss + z if z_loss else loss, dtype)
    # in NumPy and Python floats: torch ops cost more than the kernel on a (256, 10) batch
    total = float(loss.numpy().sum()) if loss.numel() else 0.0
    z_total = float(z.sum()) if z_loss else 0.0
    if reduction == "sum":
        return torch.scalar_tensor(total + z_total, dtype=dtype)
    mean = total / denom if denom else math.nan
    if z_loss and count:
        mean += z_total / count
    return torch.scalar_tensor(mean, dtype=dtype)


def _no_classes(input, target, ignore_index, reduction, label_smoothing, compute_grad, want_lse, prob):
    """torch's results for logits with no classes (C = 0), where no kernel has anything to read."""
    shape = _loss_shape(input, "none")
    if not prob:
        kept = target != ignore_index
        if bool(kept.any()):
            position = int(kept.reshape(-1).nonzero()[0, 0])
            raise bad_target(int(target.reshape(-1)[position]), position, 0, ignore_index)
    # torch: eps / C is inf, and inf * 0 makes every smoothed element NaN; probability targets sum to -0.0
    fill = math.nan if (label_smoothing > 0 and not prob) else (-0.0 if prob else 0.0)
    elements = torch.full(shape, fill, dtype=input.dtype, device=input.device)
    if reduction == "none":
        loss = elements
    elif reduction == "sum":
        loss = elements.sum() if elements.numel() else torch.tensor(fill if prob else 0.0, dtype=input.dtype)
    else:
        loss = torch.tensor(math.nan, dtype=input.dtype, device=input.device)
    grad = torch.zeros(input.shape if compute_grad else (0,), dtype=input.dtype, device=input.device)
    lse = torch.full(shape if want_lse else (0,), -math.inf, dtype=input.dtype, device=input.device)
    return loss, grad, lse


_KERNEL_DTYPES = (torch.float32, torch.float64)
_EMPTY = {}


def _empty_of(dtype, ndim: int = 1):
    """A cached empty array of ``dtype``: the kernels' "not wanted" for the log-sum-exp."""
    if (dtype, ndim) not in _EMPTY:
        _EMPTY[dtype, ndim] = torch.empty((0,) * ndim, dtype=dtype).numpy()
    return _EMPTY[dtype, ndim]


def _forward_rows(input, target, ignore_index, reduction, eps, compute_grad):
    """:func:`_forward_cpu` for the plain call: contiguous float32/64 rows ``(N, C)``, int64 targets, no weight.

    The same kernels and results with the fewest tensor operations: at the
    book's 256 x 10 they cost more than the kernel.
    """
    be = device(input).backend()
    n_rows, n_classes = input.shape
    t = target.numpy()
    denom, count = be.check_targets(t, n_classes, ignore_index, None)
    scale, _ = be.scales(denom, count, reduction, 0.0)
    loss = np.empty(n_rows)
    if n_classes <= config.CPU_SMALL_CLASSES and n_rows:
        # a few classes: the rows transposed, so that the middle-axis kernel vectorises across them
        # (the row kernel would compute each row's few exponentials one at a time)
        x3 = input.detach().t().contiguous().view(1, n_classes, n_rows)
        g3 = layout._CPU.empty((1, n_classes, n_rows) if compute_grad else (0, n_classes, n_rows), input.dtype)
        args = (x3.numpy(), t.reshape(1, n_rows), None, ignore_index, eps, scale, 0.0)
        be.cross_entropy_index_middle(*args, loss.reshape(1, n_rows), _empty_of(torch.float64, 2), g3.numpy())
        grad = g3.view(n_classes, n_rows).t() if compute_grad else g3.view(0)
    else:
        grad = layout._CPU.empty(input.shape if compute_grad else (0, n_classes), input.dtype)
        args = (input.detach().numpy(), t, None, ignore_index, eps, scale, 0.0, loss)
        be.cross_entropy_index(*args, _empty_of(torch.float64), grad.numpy())
        grad = grad if compute_grad else grad.view(0)
    if reduction == "none":
        total = torch.from_numpy(loss).to(input.dtype)
    else:
        value = float(loss.sum()) if loss.size else 0.0
        total = torch.scalar_tensor(value if reduction == "sum" else (value / denom if denom else math.nan), dtype=input.dtype)
    return total, grad, _NO_LSE[input.dtype]


_NO_LSE = {dtype: torch.empty(0, dtype=dtype) for dtype in _KERNEL_DTYPES}


def _chunked(kernel, x, targets, w, prob, ignore_index, eps, scale, z_scale, loss, lse, grad, compute_grad, compute):
    """The fused kernel over half-precision logits, in chunks of rows converted to ``compute`` on the way.

    Each chunk's gradient is built in place in its float32 copy, then stored
    in the logits' dtype (see :func:`.softmax.run_chunked`).
    """
    arr = device(x).array
    step = max(1, config.CPU_HALF_CHUNK_BYTES // max(1, math.prod(x.shape[1:]) * 4))
    for start in range(0, x.shape[0], step):
        part = slice(start, start + step)
        xc = x[part].to(compute).contiguous()
        gc = xc if compute_grad else grad[part]
        lc = lse[part] if lse.numel() else lse
        if prob:
            kernel(arr(xc), arr(targets[part].to(compute).contiguous()), w, eps, scale, z_scale, arr(loss[part]), arr(lc), arr(gc))
        else:
            kernel(arr(xc), arr(targets[part]), w, ignore_index, eps, scale, z_scale, arr(loss[part]), arr(lc), arr(gc))
        if compute_grad:
            grad[part] = gc


def _forward_cpu(input, target, weight, ignore_index, reduction, eps, z_loss, compute_grad, want_lse, inplace):
    """:func:`forward` on the CPU: the logits as rows ``(R, C)`` or, for ``(N, C, d1, ...)``, as ``(O, C, I)``.

    Half-precision logits go through the float32 kernels in chunks of rows
    (see :func:`.softmax.run_chunked`), each chunk's gradient computed in
    place in its float32 copy and stored in the input's dtype: the peak is
    the input, the gradient and one chunk.
    """
    if _plain_rows(input, target, weight, z_loss, want_lse, inplace):
        return _forward_rows(input, target, ignore_index, reduction, eps, compute_grad)
    dev = device(input)
    be, arr = dev.backend(), dev.array
    dtype = input.dtype
    compute = dev.compute_dtype(dtype)
    prob = is_prob_target(input, target)
    loss_shape = _loss_shape(input, "none")
    middle = dev.middle_shape(input, 1) if input.ndim > 2 else None
    if middle is not None:
        x = input.contiguous().view(middle)
        elements = (middle[0], middle[2])
        q = target.contiguous().view(middle) if prob else None
        t = None if prob else to_dtype(target, torch.int64).contiguous().view(elements)
    else:
        rows = input.unsqueeze(0) if input.ndim == 1 else input
        xr = rows_last(rows, 1, dtype)
        x = as_rows(xr)
        elements = (x.shape[0],)
        q = as_rows(rows_last(target.unsqueeze(0) if input.ndim == 1 else target, 1, target.dtype)) if prob else None
        t = None if prob else to_dtype(target.reshape(-1), torch.int64)
    w = arr(rows_last(weight, 0, compute)) if weight is not None else None
    if prob:
        denom = count = math.prod(elements)
    else:
        denom, count = be.check_targets(arr(t), x.shape[1], ignore_index, w)
    scale, z_scale = be.scales(denom, count, reduction, z_loss)
    loss = dev.empty(elements, torch.float64, input.device)
    lse = dev.empty(elements if (want_lse or z_loss) else (0,) * len(elements), torch.float64, input.device)
    in_place = compute_grad and inplace and x.data_ptr() == input.data_ptr() and x.is_contiguous()
    if not compute_grad:
        grad = dev.empty((0,) + x.shape[1:], compute, input.device)
    elif in_place:
        grad = x
    else:
        grad = dev.empty(x.shape, compute, input.device) if compute == dtype else torch.empty(x.shape, dtype=dtype)
    kernel = (be.cross_entropy_prob_middle if middle is not None else be.cross_entropy_prob) if prob else (
        be.cross_entropy_index_middle if middle is not None else be.cross_entropy_index
    )
    if compute == dtype:
        targets = arr(to_dtype(q, compute).contiguous()) if prob else arr(t)
        if prob:
            kernel(arr(x), targets, w, eps, scale, z_scale, arr(loss), arr(lse), arr(grad))
        else:
            kernel(arr(x), targets, w, ignore_index, eps, scale, z_scale, arr(loss), arr(lse), arr(grad))
    else:
        _chunked(kernel, x, q if prob else t, w, prob, ignore_index, eps, scale, z_scale, loss, lse, grad, compute_grad, compute)
    kept = None if (prob or not z_loss) else (target != ignore_index).reshape(loss_shape)
    lse_out = lse.view(loss_shape) if lse.numel() or not elements[0] else lse
    total = _reduce(loss.view(loss_shape), lse_out, kept, z_loss, reduction, denom, count, dtype)
    if in_place:
        grad = input  # the kernel wrote through a view of it; the tensor itself, not a view, goes to autograd
    elif compute_grad and middle is None:
        if input.ndim > 2:
            grad = grad.view(xr.shape).movedim(-1, 1)
        elif input.ndim == 1:
            grad = grad.squeeze(0)
    elif compute_grad:
        grad = grad.view(input.shape)
    if compute_grad and inplace and not in_place:
        input.copy_(grad)  # a layout the kernels cannot write in place: one copy, still no new buffer kept
        grad = input
    lse_ret = to_dtype(lse_out, compute) if want_lse else input.new_empty((0,), dtype=compute)
    return total, grad, lse_ret


def forward(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad, z_loss=0.0, want_lse=False, inplace=False):
    """``(loss, saved, lse)``: the reduced loss, what the backward needs, the per-element log-sum-exp.

    ``saved`` is d(loss)/d(input) for a unit grad_output (empty unless
    ``compute_grad``; in the compute dtype, float32 for half inputs on the
    CPU; laid out like ``input``; with ``inplace``, written into ``input``
    itself), or, on CUDA, the row statistics from which the backward rebuilds
    the gradient (:mod:`.cross_entropy_cuda`). ``lse`` (the loss's unreduced
    shape) is empty unless ``want_lse``. ``z_loss`` adds ``z_loss * lse**2``
    per kept element (a mean over their number). Arguments are validated by
    :mod:`fastsoftmax.validation` except the class indices, which the
    backend checks before its kernel runs.
    """
    prob = is_prob_target(input, target)
    n_classes = input.shape[0 if input.ndim == 1 else 1]
    if n_classes == 0:
        return _no_classes(input, target, ignore_index, reduction, label_smoothing, compute_grad, want_lse, prob)
    dev = device(input)
    if dev.name == "cpu":
        return _forward_cpu(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, compute_grad, want_lse, inplace)
    if cuda_design.rebuilds_gradient(dev, z_loss, want_lse):
        loss_shape = _loss_shape(input, "none")
        loss, saved = cuda_design.forward_stats(dev, input, target, weight, ignore_index, reduction, label_smoothing, prob, loss_shape)
        return loss, saved, input.new_empty((0,))
    loss, grad, lse = forward_torch_ops(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad, z_loss, want_lse)
    if compute_grad and inplace:
        input.copy_(grad)
        grad = input
    return loss, grad, lse


def is_unit(grad_output: Tensor) -> bool:
    """Whether grad_output is a single element equal to 1 (CPU only: on CUDA that would sync)."""
    return grad_output.numel() == 1 and not grad_output.is_cuda and grad_output.item() == 1.0


def backward(grad: Tensor, grad_output: Tensor, input_dtype: torch.dtype, inplace: bool = False) -> Tensor:
    """``grad * grad_output``, broadcast over the class dimension (``inplace``: into ``grad`` itself).

    ``grad`` is the forward's gradient for a unit grad_output; ``grad_output``
    is a scalar (mean, sum) or holds one value per loss element (none).
    """
    if inplace:
        factor = grad_output.to(grad.dtype)
        return grad.mul_(factor.unsqueeze(0 if grad.ndim == 1 else 1) if factor.ndim else factor)
    if (grad.ndim > 2 and grad.is_contiguous()) or grad.dtype not in (torch.float32, torch.float64) or grad.is_cuda:
        # laid out like the input (the middle-axis kernel's gradient): moving
        # C last would copy, and torch's broadcast multiply is one pass; also
        # the half-precision gradients, which no CPU kernel takes
        factor = grad_output.to(torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype)
        factor = factor.reshape(factor.shape[:1] + (1,) + factor.shape[1:]) if factor.ndim and grad.ndim > 1 else factor
        return to_dtype(grad * factor, input_dtype)
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


def _double_backward_needs_input() -> None:
    raise RuntimeError(
        "fastsoftmax: cross_entropy with inplace_backward=True overwrote its input with the gradient, "
        "so it cannot be differentiated twice; drop inplace_backward for create_graph=True"
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
    z_loss: float,
    compute_grad: bool,
    return_lse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    reduction = validation.reduction_of(reduction)
    _, ignore_index, eps = validation.check_cross_entropy(input, target, weight, ignore_index, label_smoothing)
    loss, grad, lse = forward(input, target, weight, ignore_index, reduction, eps, compute_grad, z_loss, return_lse)
    return loss, grad, lse


@cross_entropy_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, compute_grad, return_lse):
    loss = input.new_empty(_loss_shape(input, reduction))
    dev = device(input)
    compute = dev.compute_dtype(input.dtype)
    lse = input.new_empty(_loss_shape(input, "none") if return_lse else (0,), dtype=compute)
    if cuda_design.rebuilds_gradient(dev, z_loss, return_lse):
        return loss, cuda_design.stats_fake(input), lse
    return loss, _grad_fake(input, compute_grad, target, weight, z_loss, return_lse), lse


@custom_op("fastsoftmax::cross_entropy_backward", mutates_args=(), device_types=("cpu", "cuda"))
def cross_entropy_backward_op(grad: Tensor, grad_output: Tensor, input_dtype: torch.dtype) -> Tensor:
    validation.check_tensor(grad, "grad", "cross_entropy_backward")
    elements = grad.numel() // grad.shape[0 if grad.ndim == 1 else 1] if grad.ndim and grad.numel() else 0
    validation.check_grad_output(grad, grad_output, elements, "cross_entropy_backward")
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
    """The CUDA backward (:func:`.cross_entropy_cuda.grad_from_stats`); ``saved`` is the forward op's statistics."""
    dev = device(input)
    if not cuda_design.rebuilds_gradient(dev):
        raise NotImplementedError("fastsoftmax: on the CPU the cross_entropy forward saves the gradient; use cross_entropy_backward")
    reduction = validation.reduction_of(reduction)
    prob, ignore_index, eps = validation.check_cross_entropy(input, target, weight, ignore_index, label_smoothing)
    rows = cuda_design.n_rows(input)
    if saved.shape != (rows + 1, cuda_design.STATS_COLUMNS) or saved.dtype != cuda_design.acc_dtype(input.dtype):
        raise ShapeError(f"fastsoftmax: cross_entropy_grad: saved statistics of shape {list(saved.shape)} do not fit the input")
    validation.check_grad_output(input, grad_output, rows, "cross_entropy_grad")
    return cuda_design.grad_from_stats(dev, input, target, weight, saved, grad_output, ignore_index, reduction, eps, prob)


@cross_entropy_grad_op.register_fake
def _(input, target, weight, saved, grad_output, ignore_index, reduction, label_smoothing):
    return empty_moved(input, 0 if input.ndim == 1 else 1, input.dtype)


def _save(ctx, input, target, weight, saved, ignore_index, reduction, label_smoothing, z_loss, want_lse, keep_input=True):
    """Keep what the device's backward needs: the gradient (CPU), or the statistics (CUDA), with the logits and targets.

    The input is kept in both cases: double backward recomputes the loss from it.
    """
    ctx.input_dtype = input.dtype
    ctx.rebuild = cuda_design.rebuilds_gradient(device(input), z_loss, want_lse)
    ctx.args = (ignore_index, reduction, label_smoothing, z_loss)
    ctx.save_for_backward(saved, input if keep_input else None, target, weight)


def _backward(ctx, grad_output, function: bool):
    """The input's gradient: rebuilt (CUDA), the saved one scaled (CPU), or, under create_graph, in torch ops."""
    saved, input, target, weight = ctx.saved_tensors
    ignore_index, reduction, label_smoothing, z_loss = ctx.args
    if torch.is_grad_enabled():
        if input is None:
            _double_backward_needs_input()
        return backward_graph(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, grad_output)
    if ctx.rebuild:
        if function:
            prob = is_prob_target(input, target)
            args = (ignore_index, reduction, label_smoothing, prob)
            return cuda_design.grad_from_stats(device(input), input, target, weight, saved, grad_output, *args)
        return cross_entropy_grad_op(input, target, weight, saved, grad_output, ignore_index, reduction, label_smoothing)
    if function:
        if saved.dtype == ctx.input_dtype and is_unit(grad_output):
            return saved
        return backward(saved, grad_output, ctx.input_dtype, inplace=getattr(ctx, "inplace", False))
    return cross_entropy_backward_op(saved, grad_output, ctx.input_dtype)


def _setup_context(ctx, inputs, output):
    input, target, weight, ignore_index, reduction, label_smoothing, z_loss, compute_grad, return_lse = inputs
    ctx.compute_grad = compute_grad
    ctx.mark_non_differentiable(output[1], output[2])
    _save(ctx, input, target, weight, output[1], ignore_index, reduction, label_smoothing, z_loss, return_lse)


def _autograd_backward(ctx, grad_loss, _grad_of_saved, _grad_of_lse):
    if not ctx.compute_grad:
        raise RuntimeError(
            "fastsoftmax: cross_entropy was called with compute_grad=False, so it kept no gradient to propagate"
        )
    return _backward(ctx, grad_loss, function=False), None, None, None, None, None, None, None, None


cross_entropy_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# --- the autograd Function ---------------------------------------------------------------


class CrossEntropyCore(torch.autograd.Function):
    r"""Fused softmax cross-entropy with arguments already checked: what :func:`fastsoftmax.cross_entropy` runs.

    ``apply(input, target, weight, ignore_index, reduction, label_smoothing,
    z_loss=0.0, return_lse=False, inplace_backward=False)`` returns the loss,
    or ``(loss, lse)`` with ``return_lse`` (``lse`` takes no gradient).

    The forward computes the loss and, when the input requires grad, the
    gradient :math:`\partial L / \partial x = A p - a` (one-hot or
    probability targets, weights and label smoothing folded into ``a``) in
    the same pass over the logits; the backward only multiplies it by
    grad_output. With ``inplace_backward`` the gradient is written into the
    input's own memory (no new buffer), which the input then no longer holds.

    For a grad_output of exactly 1 (``loss.backward()`` on a reduced loss)
    the backward returns the saved gradient itself, no copy: unless the graph
    is retained, autograd releases its saved tensors before the gradient
    reaches ``AccumulateGrad``, which then takes the tensor over as ``.grad``
    instead of cloning it. With ``retain_graph=True`` it is cloned (correct,
    one copy slower).

    Double backward (``create_graph=True``) recomputes the loss in torch ops
    from the saved input (:func:`backward_graph`).
    """

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, z_loss=0.0, return_lse=False, inplace_backward=False):
        compute_grad = ctx.needs_input_grad[0]
        inplace = bool(inplace_backward) and compute_grad and not input.is_cuda
        loss, saved, lse = forward(
            input, target, weight, ignore_index, reduction, label_smoothing, compute_grad, z_loss, return_lse, inplace
        )
        if inplace:
            # the input now holds the gradient: any other node that saved it must fail loudly, not read it
            torch.autograd.graph.increment_version(input)
        ctx.inplace = inplace
        _save(ctx, input, target, weight, saved, ignore_index, reduction, label_smoothing, z_loss, return_lse, not inplace)
        if return_lse:
            ctx.mark_non_differentiable(lse)
            return loss, lse
        return loss

    @staticmethod
    def backward(ctx, grad_output, *_grad_of_lse):
        return (_backward(ctx, grad_output, function=True),) + (None,) * 8


class CrossEntropyFunction(CrossEntropyCore):
    """:class:`CrossEntropyCore` behind the checks of :func:`fastsoftmax.cross_entropy` (a public door).

    ``CrossEntropyFunction.apply(input, target, weight, ignore_index, reduction,
    label_smoothing, z_loss=0.0, return_lse=False, inplace_backward=False)``.
    """

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, z_loss=0.0, return_lse=False, inplace_backward=False):
        reduction = validation.reduction_of(reduction)
        prob, ignore_index, eps = validation.check_cross_entropy(input, target, weight, ignore_index, label_smoothing)
        z = validation.as_float(z_loss, "z_loss", "cross_entropy", 7)
        args = (ignore_index, reduction, eps, z, return_lse, inplace_backward)
        return CrossEntropyCore.forward(ctx, input, target, weight, *args)


