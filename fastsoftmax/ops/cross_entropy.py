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

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from .. import validation
from ..errors import ShapeError
from ..kernels import config
from . import cross_entropy_cpu as cpu_design
from . import cross_entropy_cuda as cuda_design
from .cross_entropy_graph import (  # noqa: F401  (composite, lse_graph, z_term_graph: for functional)
    backward_graph,
    composite,
    forward_torch_ops,
    is_prob_target,
    lse_graph,
    z_term_graph,
)
from .direct import UnderTransforms, direct_apply
from .layout import device, empty_moved, to_dtype


def _grad_fake(input: Tensor, compute_grad: bool, target=None, weight=None, z_loss=0.0, want_lse=False) -> Tensor:
    dev = device(input)
    compute = dev.compute_dtype(input.dtype)
    if not compute_grad:
        return input.new_empty((0,), dtype=compute)
    small = target is not None and 0 < input.shape[-1] <= config.CPU_SMALL_CLASSES and input.shape[0] > 0
    if dev.name == "cpu" and small and cpu_design.plain_rows(input, target, weight, z_loss, want_lse, False):
        if not dev.backend().small_rows(*input.shape):
            return input.new_empty((input.shape[1], input.shape[0]), dtype=compute).t()  # cross_entropy_cpu._forward_rows's transposed layout
        return input.new_empty(input.shape, dtype=compute)
    if input.ndim > 2 and dev.middle_shape(input, 1) is not None:
        return input.new_empty(input.shape, dtype=compute)  # the middle-axis kernel's layout
    return empty_moved(input, 0 if input.ndim == 1 else 1, compute)


def forward(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad, z_loss=0.0, want_lse=False, inplace=False):
    """``(loss, saved, lse)``: the reduced loss, what the backward needs, the per-element log-sum-exp.

    ``saved`` is d(loss)/d(input) for a unit grad_output (empty unless
    ``compute_grad``; in the compute dtype, float32 for half inputs on the
    CPU; laid out like ``input``; with ``inplace``, written into ``input``
    itself), or, on CUDA, the row statistics from which the backward rebuilds
    the gradient (:mod:`.cross_entropy_cuda`); a caller that asks for the
    gradient in place gets the gradient on CUDA too. ``lse`` (the loss's unreduced
    shape) is empty unless ``want_lse``. ``z_loss`` adds ``z_loss * lse**2``
    per kept element (a mean over their number). Arguments are validated by
    :mod:`fastsoftmax.validation` except the class indices, which the
    backend checks before its kernel runs.
    """
    prob = is_prob_target(input, target)
    n_classes = input.shape[0 if input.ndim == 1 else 1]
    if n_classes == 0:
        return cpu_design.no_classes(input, target, ignore_index, reduction, label_smoothing, compute_grad, want_lse, prob)
    dev = device(input)
    if dev.name == "cpu":
        return cpu_design.forward(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, compute_grad, want_lse, inplace)
    if cuda_design.rebuilds_gradient(dev, z_loss, want_lse) and not inplace:
        loss_shape = cpu_design.loss_shape(input, "none")
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
    loss = input.new_empty(cpu_design.loss_shape(input, reduction))
    dev = device(input)
    compute = dev.compute_dtype(input.dtype)
    lse = input.new_empty(cpu_design.loss_shape(input, "none") if return_lse else (0,), dtype=compute)
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
        # not into a negative view: its memory holds the values negated, and the kernels read a copy
        inplace = bool(inplace_backward) and compute_grad and not input.is_cuda and not input.is_neg()
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


class PlainCrossEntropy(torch.autograd.Function):
    """:class:`CrossEntropyCore` for the book's call, with the fewest steps: what :func:`fastsoftmax.cross_entropy` runs for it.

    ``apply(input, target, book)``: ``book = (x, t, n_rows, n_cols,
    ignore_index, reduction, label_smoothing)``, with ``x`` and ``t`` the
    addresses of ``input`` and ``target``, which are contiguous CPU
    float32/64 logits ``(N, C)`` of a few classes and rows and int64
    targets ``(N,)``; no weight, a mean or a sum; all checked by the caller
    (``fastsoftmax.paths.book_arrays``).
    One kernel call checks the targets, computes the loss and its gradient
    and reduces the loss (:func:`.cross_entropy_cpu.forward_reduced`); the
    backward hands the gradient over (or scales it), as
    :class:`CrossEntropyCore`'s. Applied through :data:`plain_apply` (no
    Python wrapper) with three arguments: at 256 x 10 each step here, each
    argument ``Function.apply`` sorts through, costs as much as a few rows
    of the kernel.
    """

    @staticmethod
    def forward(ctx, input, target, book):
        grad = torch.empty_like(input)
        loss = cpu_design.forward_reduced(input, target, book, grad)
        ctx.save_for_backward(grad, input, target)
        ctx.book = book
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad, input, target = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the loss again in torch ops, differentiable
            ignore_index, reduction, label_smoothing = ctx.book[4:]
            grad = backward_graph(input, target, None, ignore_index, reduction, label_smoothing, 0.0, grad_output)
        elif grad_output.item() != 1.0:  # a scalar: the loss is reduced
            grad = grad * grad_output
        return grad, None, None


def _plain_under_transforms(input, target, book):
    """The book's call under functorch transforms: torch's own cross-entropy (wrapped tensors hold no storage to read)."""
    ignore_index, reduction, label_smoothing = book[4:]
    return torch.nn.functional.cross_entropy(input, target, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)


plain_apply = direct_apply(PlainCrossEntropy, 2, _plain_under_transforms)


class CrossEntropyFunction(UnderTransforms, CrossEntropyCore):
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

    @staticmethod
    def through_functions(input, target, weight, ignore_index, reduction, label_smoothing, z_loss=0.0, return_lse=False, inplace_backward=False):
        from ..functional import cross_entropy

        kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)
        if not return_lse:
            return cross_entropy(input, target, weight, **kw)
        out = cross_entropy(input, target, weight, return_lse=True, **kw)
        return out.loss, out.lse


