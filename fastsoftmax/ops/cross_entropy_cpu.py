"""Cross-entropy on the CPU: the forward computes the loss and the gradient in one pass, and saves the gradient.

The backward then only scales it by grad_output, or hands it over as it is
when grad_output is exactly 1 (free to test on the CPU): one read and one
write of N x C for forward and backward together. Rows of logits go to the
row kernels; ``(N, C, d1, ...)`` logits to the middle-axis kernels, in
place; half precision through the float32 kernels in chunks of rows; the
plain call (contiguous float32/64 rows, int64 targets, no weight) reaches
the kernels with the fewest tensor operations, and rows of at most 16
classes go transposed to the middle-axis kernels, which vectorise across
them. The book's call (a few such rows, reduced) is one kernel call that
also reduces the loss (:func:`forward_reduced`); every path adds the
per-element losses in the same order (``kernels.cpu_small._total``).
"""

import math

import numpy as np
import torch
from torch import Tensor

from ..errors import bad_target
from ..kernels import config
from . import layout
from .layout import as_rows, device, numpy_of, rows_last, to_dtype


def is_prob_target(input: Tensor, target: Tensor) -> bool:
    """PyTorch's rule: a target of the input's shape holds class probabilities."""
    return input.shape == target.shape


def loss_shape(input: Tensor, reduction: str) -> list:
    if reduction != "none":
        return []
    shape = list(input.shape)
    del shape[0 if input.ndim == 1 else 1]
    return shape


def plain_rows(input, target, weight, z_loss, want_lse, inplace) -> bool:
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


def _reduce(loss: np.ndarray, lse, kept, z_loss: float, reduction: str, denom: float, count: int, dtype) -> Tensor:
    """The per-element losses (a float64 NumPy array, the loss's shape) plus the z-loss, reduced as ``reduction`` asks, in ``dtype``.

    A mean divides the cross-entropy by ``denom`` (the kept targets' total
    weight) and the z-loss by ``count`` (their number). torch's mean with a
    zero total is 0/0 whatever else the sum holds: NaN.
    """
    if z_loss:
        z = z_loss * lse.square()
        if kept is not None:
            z = torch.where(kept, z, 0.0)
    if reduction == "none":
        loss = torch.from_numpy(loss)
        return to_dtype(loss + z if z_loss else loss, dtype)
    # in Python floats: torch ops cost more than the kernel on a (256, 10) batch
    total = layout._CPU.backend().total(loss)
    z_total = float(z.sum()) if z_loss else 0.0
    if reduction == "sum":
        return torch.scalar_tensor(total + z_total, dtype=dtype)
    mean = total / denom if denom else math.nan
    if z_loss and count:
        mean += z_total / count
    return torch.scalar_tensor(mean, dtype=dtype)


def no_classes(input, target, ignore_index, reduction, label_smoothing, compute_grad, want_lse, prob):
    """torch's results for logits with no classes (C = 0), where no kernel has anything to read."""
    shape = loss_shape(input, "none")
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
    t = np.ascontiguousarray(numpy_of(target))  # a strided target (t[::2]) copied: the kernels view it as (1, N)
    loss = np.empty(n_rows)
    if be.small_rows(n_rows, n_classes):
        # a few classes and rows: one serial call checks the targets, transposes and runs the middle-axis kernel
        grad, grad_array = layout._CPU.empty_array(input.shape if compute_grad else (0, n_classes), input.dtype)
        denom = be.cross_entropy_small(numpy_of(input), t, ignore_index, eps, reduction, loss, grad_array)
        return _reduce(loss, None, None, 0.0, reduction, denom, 0, input.dtype), (grad if compute_grad else grad.view(0)), _NO_LSE[input.dtype]
    denom, count = be.check_targets(t, n_classes, ignore_index, None)
    scale, _ = be.scales(denom, count, reduction, 0.0)
    if n_classes <= config.CPU_SMALL_CLASSES and n_rows:
        # a few classes: the rows transposed, so that the middle-axis kernel vectorises across them
        # (the row kernel would compute each row's few exponentials one at a time)
        x3 = input.detach().t().contiguous().view(1, n_classes, n_rows)
        g3 = layout._CPU.empty((1, n_classes, n_rows) if compute_grad else (0, n_classes, n_rows), input.dtype)
        args = (numpy_of(x3), t.reshape(1, n_rows), None, ignore_index, eps, scale, 0.0)
        be.cross_entropy_index_middle(*args, loss.reshape(1, n_rows), _empty_of(torch.float64, 2), g3.numpy())
        grad = g3.view(n_classes, n_rows).t() if compute_grad else g3.view(0)
    else:
        grad = layout._CPU.empty(input.shape if compute_grad else (0, n_classes), input.dtype)
        args = (numpy_of(input), t, None, ignore_index, eps, scale, 0.0, loss)
        be.cross_entropy_index(*args, _empty_of(torch.float64), grad.numpy())
        grad = grad if compute_grad else grad.view(0)
    return _reduce(loss, None, None, 0.0, reduction, denom, 0, input.dtype), grad, _NO_LSE[input.dtype]


_NO_LSE = {dtype: torch.empty(0, dtype=dtype) for dtype in _KERNEL_DTYPES}


#: 0-d templates of the book's loss, by dtype
SCALAR_TEMPLATES = {dtype: torch.empty((), dtype=dtype) for dtype in _KERNEL_DTYPES}


def forward_reduced(input, target, book: tuple, grad=None):
    """The book's loss, reduced, as a new 0-d tensor: one kernel call checks the targets, computes and reduces it.

    ``book = (x, t, n_rows, n_cols, ignore_index, reduction, eps)``: the
    addresses of ``input``, contiguous CPU float32/64 logits ``(N, C)`` of
    at most ``config.CPU_SMALL_CLASSES`` classes and fewer than
    ``config.CPU_PARALLEL_MIN_ELEMENTS`` elements, and of ``target``,
    contiguous int64 ``(N,)``; no weight; a mean or a sum (checked by the
    caller: ``fastsoftmax.paths.book_arrays``). ``grad``: None, or a
    contiguous tensor like ``input`` (``input`` itself too: the kernel reads
    all the logits first) that takes the gradient for a unit grad_output.
    The same kernels and bits as :func:`_forward_rows`; the kernel reads and
    writes at the tensors' addresses (``kernels/pointers.py``).
    """
    x, t, n_rows, n_cols, ignore_index, reduction, eps = book
    loss = torch.empty_like(SCALAR_TEMPLATES[input.dtype])  # a third cheaper than torch.empty((), dtype=...) with cold caches
    bad = (layout.CPU_BACKEND or layout.import_cpu_backend()).CROSS_ENTROPY_BOOK[input.dtype](
        x, t, 0 if grad is None else grad.data_ptr(), loss.data_ptr(), n_rows, n_cols, ignore_index, eps, reduction == "mean"
    )
    if bad >= 0:
        raise bad_target(int(target[bad]), bad, n_cols, ignore_index)
    return loss


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


def forward(input, target, weight, ignore_index, reduction, eps, z_loss, compute_grad, want_lse, inplace):
    """:func:`forward` on the CPU: the logits as rows ``(R, C)`` or, for ``(N, C, d1, ...)``, as ``(O, C, I)``.

    Half-precision logits go through the float32 kernels in chunks of rows
    (see :func:`.softmax.run_chunked`), each chunk's gradient computed in
    place in its float32 copy and stored in the input's dtype: the peak is
    the input, the gradient and one chunk.
    """
    if plain_rows(input, target, weight, z_loss, want_lse, inplace):
        return _forward_rows(input, target, ignore_index, reduction, eps, compute_grad)
    dev = device(input)
    be, arr = dev.backend(), dev.array
    dtype = input.dtype
    compute = dev.compute_dtype(dtype)
    prob = is_prob_target(input, target)
    shape = loss_shape(input, "none")
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
    kept = None if (prob or not z_loss) else (target != ignore_index).reshape(shape)
    lse_out = lse.view(shape) if lse.numel() or not elements[0] else lse
    total = _reduce(loss.numpy().reshape(shape), lse_out, kept, z_loss, reduction, denom, count, dtype)
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
