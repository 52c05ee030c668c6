"""Host side of every op: reshape to rows, allocate, launch, reshape back.

The kernels see one layout only: a C-contiguous ``(R, C)`` array in the
compute dtype with the reduced dimension last. This module brings any tensor
to that layout (``movedim`` + ``contiguous``: a copy only when the reduced
dimension is not already last and dense), picks the backend by device, and
returns results in the caller's dtype. Softmax outputs are contiguous, as
PyTorch's are. On the CPU a reduced dimension that is not last, with enough
positions after it, goes to kernels that reduce it in place (an ``(outer, C,
inner)`` view, no copies); otherwise it is moved last, and the result copied
back from the rows-last buffer the kernels wrote. Cross-entropy on
``(N, C, d1, ...)`` logits (class indices or probabilities) takes the
middle-axis kernels on the CPU too (gradient laid out like the input);
otherwise its gradient stays a permuted view of the rows-last buffer
(autograd lays ``.grad`` out itself).
"""

import torch

from . import _cpu_backend


def backend(x: torch.Tensor):
    if x.is_cuda:
        from . import _cuda_backend

        return _cuda_backend
    return _cpu_backend


def rows_last(x: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``x`` with ``dim`` moved last, contiguous, in ``dtype`` (each step skipped when it would change nothing)."""
    if dim != x.ndim - 1:
        x = x.movedim(dim, -1)
    if x.dtype != dtype:
        x = x.to(dtype)
    return x if x.is_contiguous() else x.contiguous()


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """The ``(R, C)`` view of a contiguous tensor whose last dim is the reduced one."""
    return x if x.ndim == 2 else x.view(-1, x.shape[-1])


def to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def moved_shape(shape, dim: int) -> list:
    shape = list(shape)
    shape.append(shape.pop(dim))
    return shape


def empty_moved(x: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor shaped like ``x``, its ``dim`` stored last (for the fake ops)."""
    out = torch.empty(moved_shape(x.shape, dim), dtype=dtype, device=x.device)
    return out.movedim(-1, dim) if dim != x.ndim - 1 else out


def raise_bad_target(value: int, position: int, n_classes: int, ignore_index: int):
    raise IndexError(
        f"fastsoftmax: target {value} at position {position} is out of bounds: "
        f"expected a class index in [0, {n_classes - 1}] or ignore_index={ignore_index}"
    )


# --- softmax and log_softmax -------------------------------------------------


def _middle_shape(be, x: torch.Tensor, dim: int):
    """The ``(outer, C, inner)`` view for the backend's middle-axis kernels, or None (see ``_cpu_backend.middle_shape``)."""
    middle_shape = getattr(be, "middle_shape", None)
    return None if middle_shape is None else middle_shape(x, dim)


def softmax_forward(x: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    """softmax (or log_softmax) of ``x`` along ``dim``; ``dim`` already in range."""
    if x.ndim == 0:
        return softmax_forward(x.reshape(1), 0, log).reshape(())
    be = backend(x)
    compute = be.compute_dtype(x.dtype)
    middle = _middle_shape(be, x, dim)
    if middle is not None:
        xc = to_dtype(x, compute).contiguous()
        y = be.empty(x.shape, compute, x.device)
        if x.numel():
            be.softmax_forward_middle(xc.view(middle), y.view(middle), log)
        return to_dtype(y, x.dtype)
    xr = rows_last(x, dim, compute)
    y = be.empty(xr.shape, compute, x.device)
    if xr.numel():
        be.softmax_forward(as_rows(xr), as_rows(y), log)
    if dim != x.ndim - 1:
        y = y.movedim(-1, dim).contiguous()
    return to_dtype(y, x.dtype)


def softmax_backward(y: torch.Tensor, dy: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    """Gradient of :func:`softmax_forward` from its output ``y``."""
    if y.ndim == 0:
        return softmax_backward(y.reshape(1), dy.reshape(1), 0, log).reshape(())
    be = backend(y)
    compute = be.compute_dtype(y.dtype)
    middle = _middle_shape(be, y, dim)
    if middle is not None:
        yc, dyc = (to_dtype(t, compute).contiguous() for t in (y, dy))
        dx = be.empty(y.shape, compute, y.device)
        if y.numel():
            be.softmax_backward_middle(yc.view(middle), dyc.view(middle), dx.view(middle), log)
        return to_dtype(dx, y.dtype)
    yr = rows_last(y, dim, compute)
    dyr = rows_last(dy, dim, compute)
    dx = be.empty(yr.shape, compute, y.device)
    if yr.numel():
        be.softmax_backward(as_rows(yr), as_rows(dyr), as_rows(dx), log)
    if dim != y.ndim - 1:
        dx = dx.movedim(-1, dim).contiguous()
    return to_dtype(dx, y.dtype)


def softmax_backward_graph(y: torch.Tensor, dy: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    """:func:`softmax_backward` in torch ops, so that it is itself differentiable.

    The backward of the ops runs this instead of the kernel under
    ``create_graph=True`` (double backward, Hessian-vector products): ``y``
    then carries the graph of the forward.
    """
    if log:
        return dy - torch.exp(y) * dy.sum(dim, keepdim=True)
    return y * (dy - (dy * y).sum(dim, keepdim=True))


def no_double_backward() -> None:
    raise NotImplementedError(
        "fastsoftmax: cross_entropy has no double backward (its forward keeps the gradient, not the input); "
        "use torch.nn.functional.cross_entropy where create_graph=True is needed"
    )


def softmax_fake(x: torch.Tensor) -> torch.Tensor:
    """The layout :func:`softmax_forward` returns (contiguous), without computing it."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# --- cross-entropy -------------------------------------------------------------


def is_prob_target(input: torch.Tensor, target: torch.Tensor) -> bool:
    """PyTorch's rule: a target of the input's shape holds class probabilities."""
    return input.shape == target.shape


def ce_loss_shape(input: torch.Tensor, reduction: str) -> list:
    if reduction != "none":
        return []
    shape = list(input.shape)
    del shape[0 if input.ndim == 1 else 1]
    return shape


def ce_grad_fake(input: torch.Tensor, compute_grad: bool) -> torch.Tensor:
    compute = backend(input).compute_dtype(input.dtype)
    if not compute_grad:
        return input.new_empty((0,), dtype=compute)
    if input.ndim > 2 and _middle_shape(backend(input), input, 1) is not None:
        return input.new_empty(input.shape, dtype=compute)  # the middle-axis kernel's layout
    return empty_moved(input, 0 if input.ndim == 1 else 1, compute)


def _ce_reduce(loss_rows, loss_shape, reduction: str, denom: float, squeeze: bool, dtype) -> torch.Tensor:
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


def _cross_entropy_middle(be, input, target, weight, ignore_index, reduction, label_smoothing, compute_grad, middle, compute):
    """:func:`cross_entropy_forward` for ``(N, C, d1, ...)`` logits, reduced over C in place.

    No copy of the logits (or of probability targets) into rows, and the
    gradient comes back laid out like ``input``.
    """
    n_outer, n_classes, n_inner = middle
    x3 = to_dtype(input, compute).contiguous().view(middle)
    w = rows_last(weight, 0, compute) if weight is not None else None
    loss2 = be.empty((n_outer, n_inner), torch.float64, input.device)
    grad = be.empty(input.shape if compute_grad else (0, n_classes), compute, input.device)
    grad3 = grad.view(middle) if compute_grad else grad.view(0, n_classes, 1).expand(0, n_classes, n_inner)
    if is_prob_target(input, target):
        q3 = to_dtype(target, compute).contiguous().view(middle)
        denom = be.cross_entropy_prob_middle(x3, q3, w, label_smoothing, reduction, loss2, grad3)
        loss_shape = target.shape[:1] + target.shape[2:]
    else:
        t2 = to_dtype(target, torch.int64).contiguous().view(n_outer, n_inner)
        denom = be.cross_entropy_index_middle(x3, t2, w, ignore_index, label_smoothing, reduction, loss2, grad3)
        loss_shape = target.shape
    return _ce_reduce(loss2.view(-1), loss_shape, reduction, denom, False, input.dtype), grad


def cross_entropy_forward(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad):
    """Loss (reduced) and, if ``compute_grad``, d(loss)/d(input) for a unit grad_output.

    Arguments are already validated by :func:`fastsoftmax.functional.cross_entropy`
    except the target values, which the backend checks before its kernel runs.
    The gradient is returned in the compute dtype (float32 for half inputs on
    the CPU), laid out like ``input``.
    """
    be = backend(input)
    compute = be.compute_dtype(input.dtype)
    if input.ndim > 2:
        middle = _middle_shape(be, input, 1)
        if middle is not None:
            args = (ignore_index, reduction, label_smoothing, compute_grad, middle, compute)
            return _cross_entropy_middle(be, input, target, weight, *args)
    squeeze = input.ndim == 1
    if squeeze:
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    n_classes = input.shape[1]
    xr = rows_last(input, 1, compute)
    x2 = as_rows(xr)
    n_rows = x2.shape[0]
    w = rows_last(weight, 0, compute) if weight is not None else None
    loss_rows = be.empty((n_rows,), torch.float64, input.device)
    grad = be.empty((n_rows if compute_grad else 0, n_classes), compute, input.device)
    if is_prob_target(input, target):
        q = as_rows(rows_last(target, 1, compute))
        denom = be.cross_entropy_prob(x2, q, w, label_smoothing, reduction, loss_rows, grad)
        loss_shape = target.shape[:1] + target.shape[2:]
    else:
        t = to_dtype(target.reshape(-1), torch.int64)
        denom = be.cross_entropy_index(x2, t, w, ignore_index, label_smoothing, reduction, loss_rows, grad)
        loss_shape = target.shape
    loss = _ce_reduce(loss_rows, loss_shape, reduction, denom, squeeze, input.dtype)
    if compute_grad and input.ndim > 2:
        grad = grad.view(xr.shape).movedim(-1, 1)
    elif compute_grad and squeeze:
        grad = grad.squeeze(0)
    return loss, grad


def is_unit(grad_output: torch.Tensor) -> bool:
    """Whether grad_output is a single element equal to 1 (CPU only: on CUDA that would sync)."""
    return grad_output.numel() == 1 and not grad_output.is_cuda and grad_output.item() == 1.0


def cross_entropy_backward(grad: torch.Tensor, grad_output: torch.Tensor, input_dtype: torch.dtype) -> torch.Tensor:
    """``grad * grad_output``, broadcast over the class dimension.

    ``grad`` is the forward's gradient for a unit grad_output; ``grad_output``
    is a scalar (mean, sum) or holds one value per loss element (none).
    """
    if grad.ndim > 2 and grad.is_contiguous():
        # laid out like the input (the middle-axis kernel's gradient): moving
        # C last would copy, and torch's broadcast multiply is one pass
        factor = grad_output.to(grad.dtype)
        return to_dtype(grad * (factor.unsqueeze(1) if factor.ndim else factor), input_dtype)
    be = backend(grad)
    squeeze = grad.ndim == 1
    gr = grad.unsqueeze(0) if squeeze else grad.movedim(1, -1)
    gr = gr.contiguous()
    n_classes = gr.shape[-1]
    g2 = gr.view(-1, n_classes)
    out = be.empty(gr.shape, gr.dtype, grad.device)
    o2 = out.view(-1, n_classes)
    if g2.numel():
        if is_unit(grad_output):
            be.copy(g2, o2)
        else:
            factor = grad_output.to(torch.float64).reshape(-1).expand(g2.shape[0]).contiguous()
            be.scale_rows(g2, factor, o2)
    out = out.squeeze(0) if squeeze else out.movedim(-1, 1)
    return to_dtype(out, input_dtype)
