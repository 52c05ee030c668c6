r"""Softmax and log-softmax, the torch side: layout, the ``torch.library`` ops, the autograd Functions.

With :math:`m = \max_j x_j` and :math:`s = \sum_j e^{x_j - m}`:

.. math::

    \mathrm{softmax}(x)_j = e^{x_j - m} / s, \qquad
    \mathrm{log\_softmax}(x)_j = (x_j - m) - \log s

and the gradients from the output :math:`y`:
:math:`\partial x = y \odot (\partial y - \langle \partial y, y \rangle)` (softmax),
:math:`\partial x = \partial y - e^{y} \sum_k \partial y_k` (log-softmax).

* :func:`forward` / :func:`backward`: any tensor, any ``dim``, to the
  backend's kernels and back.
* ``torch.ops.fastsoftmax.softmax(Tensor input, int dim)``, ``log_softmax``
  and their ``*_backward`` ops (which take the forward output): what
  ``torch.compile`` sees, opaque nodes with fake implementations and
  autograd formulas.
* :class:`SoftmaxFunction`, :class:`LogSoftmaxFunction`: the same as
  ``torch.autograd.Function`` classes, with less dispatch overhead in eager
  mode.
"""

import math

import torch
from torch import Tensor
from torch.library import custom_op

from .. import validation
from ..kernels import config
from . import layout
from .direct import UnderTransforms, direct_apply
from .layout import as_rows, device, numpy_of, rows_last, to_dtype

_KERNEL_DTYPES = (torch.float32, torch.float64)


_cpu_backend = layout._CPU.backend


def _small_rows(kernel, inputs, log):
    """A middle-axis kernel on rows of a few classes, transposed: ``(C, R)`` vectorises across the rows.

    The row kernels would take each row's few exponentials one at a time. For
    rows of at most 16 classes both kernels add in the same order, so the
    bits do not depend on the path. Inputs too small for threads take the
    kernels of ``kernels/cpu_small.py`` instead, which transpose inside one
    serial call.
    """
    n = inputs[0].shape[-1]
    cols = [t.detach().reshape(-1, n).t().contiguous() for t in inputs]
    rows = cols[0].shape[1]
    out = layout._CPU.empty((n, rows), inputs[0].dtype)
    kernel(*(numpy_of(c).reshape(1, n, rows) for c in cols), out.numpy().reshape(1, n, rows), log)
    return out.t().contiguous().view(inputs[0].shape)


def run_chunked(dev, kernel, inputs, dtype, *extra):
    """``kernel(*arrays of inputs, array of the output, *extra)`` on tensors in the kernels' layout; returns the output.

    The output has the first input's shape and ``dtype`` (the storage dtype).
    Where the kernels compute in another dtype (float16 and bfloat16 on the
    CPU), whole tensors in float32 would take 5 times the input's memory
    (a float32 copy, a float32 output, the half output). Instead the rows
    (the first dimension) go through in chunks of about
    ``config.CPU_HALF_CHUNK_BYTES``, converted on the way in and out: the
    peak is the input, the output and two chunks.
    """
    compute = dev.compute_dtype(dtype)
    shape = inputs[0].shape
    if compute == dtype:
        out = dev.empty(shape, compute, inputs[0].device)
        if out.numel():
            kernel(*(dev.array(t) for t in inputs), dev.array(out), *extra)
        return out
    out = torch.empty(shape, dtype=dtype, device=inputs[0].device)
    row_bytes = max(1, math.prod(shape[1:]) * torch.finfo(compute).bits // 8)
    step = max(1, config.CPU_HALF_CHUNK_BYTES // row_bytes)
    for start in range(0, shape[0], step):
        chunk = [t[start : start + step].to(compute).contiguous() for t in inputs]
        result = dev.empty(chunk[0].shape, compute, out.device)
        if result.numel():
            kernel(*(dev.array(t) for t in chunk), dev.array(result), *extra)
        out[start : start + step] = result
    return out


def forward(x: Tensor, dim: int, log: bool) -> Tensor:
    """softmax (or log_softmax) of ``x`` along ``dim``; ``dim`` already in range.

    The output is contiguous, as PyTorch's is, in ``x``'s dtype.
    """
    if x.ndim == 0:
        return forward(x.reshape(1), 0, log).reshape(())
    if dim == x.ndim - 1 and x.dtype in _KERNEL_DTYPES and x.is_cpu and x.is_contiguous():
        # the plain call, with the fewest tensor operations (at 256 x 10 they cost more than the kernel)
        n = x.shape[-1]
        if 0 < n <= config.CPU_SMALL_CLASSES and x.numel():
            be = _cpu_backend()
            if be.small_rows(x.numel() // n, n):
                y, ya = layout._CPU.empty_array(x.shape, x.dtype)
                be.softmax_forward_small(numpy_of(x).reshape(-1, n), ya.reshape(-1, n), log)
                return y
            return _small_rows(be.softmax_forward_middle, [x], log)
        y = layout._CPU.empty(x.shape, x.dtype)
        if x.numel():
            _cpu_backend().softmax_forward(numpy_of(x).reshape(-1, n), y.numpy().reshape(-1, n), log)
        return y
    dev = device(x)
    be = dev.backend()
    middle = dev.middle_shape(x, dim)
    if middle is not None:
        y = run_chunked(dev, be.softmax_forward_middle, [x.contiguous().view(middle)], x.dtype, log)
        return y.view(x.shape)
    xr = rows_last(x, dim, x.dtype)
    y = run_chunked(dev, be.softmax_forward, [as_rows(xr)], x.dtype, log).view(xr.shape)
    if dim != x.ndim - 1:
        y = y.movedim(-1, dim).contiguous()
    return y


def backward(y: Tensor, dy: Tensor, dim: int, log: bool) -> Tensor:
    """Gradient of :func:`forward` from its output ``y``."""
    if y.ndim == 0:
        return backward(y.reshape(1), dy.reshape(1), 0, log).reshape(())
    if (
        dim == y.ndim - 1
        and y.dtype in _KERNEL_DTYPES
        and dy.dtype == y.dtype
        and y.is_cpu
        and y.is_contiguous()
    ):
        dy = dy.contiguous()  # the gradient of a sum arrives expanded from one element
        n = y.shape[-1]
        if 0 < n <= config.CPU_SMALL_CLASSES and y.numel():
            be = _cpu_backend()
            if be.small_rows(y.numel() // n, n):
                dx, dxa = layout._CPU.empty_array(y.shape, y.dtype)
                be.softmax_backward_small(numpy_of(y).reshape(-1, n), numpy_of(dy).reshape(-1, n), dxa.reshape(-1, n), log)
                return dx
            return _small_rows(be.softmax_backward_middle, [y, dy], log)
        dx = layout._CPU.empty(y.shape, y.dtype)
        if y.numel():
            _cpu_backend().softmax_backward(numpy_of(y).reshape(-1, n), numpy_of(dy).reshape(-1, n), dx.numpy().reshape(-1, n), log)
        return dx
    dev = device(y)
    be = dev.backend()
    middle = dev.middle_shape(y, dim)
    if middle is not None:
        inputs = [t.contiguous().view(middle) for t in (y, to_dtype(dy, y.dtype))]
        return run_chunked(dev, be.softmax_backward_middle, inputs, y.dtype, log).view(y.shape)
    yr = rows_last(y, dim, y.dtype)
    dyr = rows_last(dy, dim, y.dtype)
    dx = run_chunked(dev, be.softmax_backward, [as_rows(yr), as_rows(dyr)], y.dtype, log).view(yr.shape)
    if dim != y.ndim - 1:
        dx = dx.movedim(-1, dim).contiguous()
    return dx


def backward_graph(y: Tensor, dy: Tensor, dim: int, log: bool) -> Tensor:
    """:func:`backward` in torch ops, so that it is itself differentiable.

    The backward of the ops runs this instead of the kernel under
    ``create_graph=True`` (double backward, Hessian-vector products): ``y``
    then carries the graph of the forward.
    """
    if log:
        return dy - torch.exp(y) * dy.sum(dim, keepdim=True)
    return y * (dy - (dy * y).sum(dim, keepdim=True))


def _differentiable_backward(y: Tensor, dy: Tensor, dim: int, log: bool, kernel) -> Tensor:
    if torch.is_grad_enabled():  # create_graph=True: differentiate the backward too
        return backward_graph(y, dy, dim, log)
    return kernel(y, dy, dim)


# --- torch.library ops ----------------------------------------------------------------


def _check(input: Tensor, dim, fn: str) -> int:
    """The checks of every public door of these ops: a dense float tensor on a supported device, ``dim`` in range."""
    validation.check_tensor(input, "input", fn)
    validation.check_layout(input, fn)
    validation.check_device(input)
    validation.check_float_input(input, f"{fn}_lastdim_kernel_impl")
    return validation.as_dim(dim, input.ndim, fn)


def _register(name: str, log: bool):
    @custom_op(f"fastsoftmax::{name}", mutates_args=(), device_types=("cpu", "cuda"))
    def op(input: Tensor, dim: int) -> Tensor:
        return forward(input, _check(input, dim, name), log)

    @op.register_fake
    def _(input, dim):
        return torch.empty(input.shape, dtype=input.dtype, device=input.device)

    @custom_op(f"fastsoftmax::{name}_backward", mutates_args=(), device_types=("cpu", "cuda"))
    def backward_op(output: Tensor, grad_output: Tensor, dim: int) -> Tensor:
        dim = validation.check_softmax_backward(output, grad_output, dim, f"{name}_backward")
        return backward(output, grad_output, dim, log)

    @backward_op.register_fake
    def _(output, grad_output, dim):
        return torch.empty(output.shape, dtype=output.dtype, device=output.device)

    def setup_context(ctx, inputs, output):
        ctx.dim = inputs[1] % max(inputs[0].ndim, 1)
        ctx.save_for_backward(output)

    def autograd_backward(ctx, grad_output):
        (output,) = ctx.saved_tensors
        return _differentiable_backward(output, grad_output, ctx.dim, log, backward_op), None

    op.register_autograd(autograd_backward, setup_context=setup_context)
    return op, backward_op


softmax_op, softmax_backward_op = _register("softmax", log=False)
log_softmax_op, log_softmax_backward_op = _register("log_softmax", log=True)


# --- autograd Functions -------------------------------------------------------------------


def _function_forward(ctx, input, dim, log):
    y = forward(input, dim, log)
    ctx.dim = dim
    ctx.save_for_backward(y)
    return y


def _torchs_backward(y, grad_output, dim, log):
    """torch's own backward op: for gradients of another layout (sparse, ...), which it computes or refuses as torch does."""
    return (torch._log_softmax_backward_data if log else torch._softmax_backward_data)(grad_output, y, dim, y.dtype)


def _function_backward(ctx, grad_output, log):
    (y,) = ctx.saved_tensors
    if grad_output.layout is not torch.strided:
        return _torchs_backward(y, grad_output, ctx.dim, log), None
    if torch.is_grad_enabled():  # create_graph=True: differentiate the backward too
        return backward_graph(y, grad_output, ctx.dim, log), None
    return backward(y, grad_output if grad_output.dtype == y.dtype else grad_output.to(y.dtype), ctx.dim, log), None


class SoftmaxCore(torch.autograd.Function):
    """Softmax with ``dim`` already checked and in range: what :func:`fastsoftmax.softmax` runs."""

    @staticmethod
    def forward(ctx, input, dim):
        return _function_forward(ctx, input, dim, log=False)

    @staticmethod
    def backward(ctx, grad_output):
        return _function_backward(ctx, grad_output, log=False)


class LogSoftmaxCore(torch.autograd.Function):
    """Log-softmax with ``dim`` already checked and in range: what :func:`fastsoftmax.log_softmax` runs."""

    @staticmethod
    def forward(ctx, input, dim):
        return _function_forward(ctx, input, dim, log=True)

    @staticmethod
    def backward(ctx, grad_output):
        return _function_backward(ctx, grad_output, log=True)


def forward_book(input, rows, log: bool):
    """softmax (or log_softmax) of the book's rows, one call of the serial kernel of ``kernels/cpu_small.py``.

    ``rows = (address, n_rows, n_cols)`` of ``input``, contiguous CPU
    float32/64 rows of a few classes and too few for threads (checked by the
    caller, ``fastsoftmax.paths.book_rows``). The kernel reads and
    writes at the tensors' addresses: no NumPy views, which cost more than
    the kernel at this size (``kernels/pointers.py``).
    """
    address, n_rows, n_cols = rows
    y = torch.empty_like(input)
    (layout.CPU_BACKEND or layout.import_cpu_backend()).SOFTMAX_FORWARD[input.dtype](address, y.data_ptr(), n_rows, n_cols, log)
    return y


class BookSoftmax(torch.autograd.Function):
    """:class:`SoftmaxCore` and :class:`LogSoftmaxCore` for the book's rows, with the fewest steps.

    ``apply(input, rows, log)``: ``rows = (address, n_rows, n_cols)`` as
    :func:`forward_book` takes it, ``dim`` the last. Applied through
    :func:`book_apply` (no Python wrapper): at 256 x 10 each step here costs
    as much as the kernel.
    """

    @staticmethod
    def forward(ctx, input, rows, log):
        address, n_rows, n_cols = rows  # forward_book, written out: a frame fewer
        y = torch.empty_like(input)
        (layout.CPU_BACKEND or layout.import_cpu_backend()).SOFTMAX_FORWARD[input.dtype](address, y.data_ptr(), n_rows, n_cols, log)
        ctx.book = n_rows, n_cols, log
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        (y,) = ctx.saved_tensors  # also autograd's check that nothing wrote to y since
        # the engine gives grad_output y's shape, dtype and device; the kernel reads any strides of a plain tensor
        if grad_output.layout is not torch.strided:
            return _torchs_backward(y, grad_output, 1, ctx.book[2]), None, None
        if (
            torch.is_grad_enabled()
            or not (type(grad_output) is torch.Tensor and not grad_output.is_neg())
            or not (address := grad_output.data_ptr())
        ):
            # create_graph=True (differentiate the backward too), or a gradient with no plain memory to read
            # (a subclass, a negative view, an efficient zero tensor: address 0)
            return backward_graph(y, grad_output, 1, ctx.book[2]), None, None
        n_rows, n_cols, log = ctx.book
        row_stride, col_stride = grad_output.stride()  # an expanded one from a sum: (0, 0)
        dx = torch.empty_like(y)
        (layout.CPU_BACKEND or layout.import_cpu_backend()).SOFTMAX_BACKWARD[y.dtype](
            y.data_ptr(), address, dx.data_ptr(), n_rows, n_cols, row_stride, col_stride, log
        )
        return dx, None, None


def _book_under_transforms(input, x, log):
    """The book's softmax under functorch transforms: torch's own op (wrapped tensors hold no storage to read)."""
    return (torch.log_softmax if log else torch.softmax)(input, -1)


book_apply = direct_apply(BookSoftmax, 1, _book_under_transforms)


class SoftmaxFunction(UnderTransforms, SoftmaxCore):
    r"""Softmax along ``dim``: :math:`y_j = e^{x_j - m} / \sum_k e^{x_k - m}`, :math:`m = \max_k x_k`.

    ``SoftmaxFunction.apply(input, dim)`` checks its arguments as
    :func:`fastsoftmax.softmax` does. Backward:
    :math:`\partial x = y \odot (\partial y - \langle \partial y, y \rangle)`,
    by the kernel, or in torch ops under ``create_graph=True`` so that it can
    be differentiated again.
    """

    @staticmethod
    def forward(ctx, input, dim):
        return _function_forward(ctx, input, _check(input, dim, "softmax"), log=False)

    @staticmethod
    def through_functions(input, dim):
        from ..functional import softmax

        return softmax(input, _check(input, dim, "softmax"))


class LogSoftmaxFunction(UnderTransforms, LogSoftmaxCore):
    r"""Log-softmax along ``dim``: :math:`y_j = (x_j - m) - \log \sum_k e^{x_k - m}`.

    ``LogSoftmaxFunction.apply(input, dim)`` checks its arguments as
    :func:`fastsoftmax.log_softmax` does. Backward:
    :math:`\partial x = \partial y - e^{y} \sum_k \partial y_k` (double
    backward as in :class:`SoftmaxFunction`).
    """

    @staticmethod
    def forward(ctx, input, dim):
        return _function_forward(ctx, input, _check(input, dim, "log_softmax"), log=True)

    @staticmethod
    def through_functions(input, dim):
        from ..functional import log_softmax

        return log_softmax(input, _check(input, dim, "log_softmax"))
