"""``torch.autograd.Function`` classes for every op.

They call the same host code as the registered ops in
:mod:`fastsoftmax._ops`, with less dispatch overhead; the functions in
:mod:`fastsoftmax.functional` use them in eager mode and the registered ops
under ``torch.compile``. Arguments are validated by those functions, not here.
"""

import torch

from . import _host


class SoftmaxFunction(torch.autograd.Function):
    r"""Softmax along ``dim``: :math:`y_j = e^{x_j - m} / \sum_k e^{x_k - m}`, :math:`m = \max_k x_k`.

    Backward: :math:`\partial x = y \odot (\partial y - \langle \partial y, y \rangle)`,
    by the kernel, or in torch ops under ``create_graph=True`` so that it can
    be differentiated again.
    """

    @staticmethod
    def forward(ctx, input, dim):
        y = _host.softmax_forward(input, dim, log=False)
        ctx.dim = dim
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        (y,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the backward too
            return _host.softmax_backward_graph(y, grad_output, ctx.dim, log=False), None
        return _host.softmax_backward(y, grad_output, ctx.dim, log=False), None


class LogSoftmaxFunction(torch.autograd.Function):
    r"""Log-softmax along ``dim``: :math:`y_j = (x_j - m) - \log \sum_k e^{x_k - m}`.

    Backward: :math:`\partial x = \partial y - e^{y} \sum_k \partial y_k` (double
    backward as in :class:`SoftmaxFunction`).
    """

    @staticmethod
    def forward(ctx, input, dim):
        y = _host.softmax_forward(input, dim, log=True)
        ctx.dim = dim
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        (y,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the backward too
            return _host.softmax_backward_graph(y, grad_output, ctx.dim, log=True), None
        return _host.softmax_backward(y, grad_output, ctx.dim, log=True), None


class CrossEntropyFunction(torch.autograd.Function):
    r"""Fused softmax cross-entropy (see :func:`fastsoftmax.cross_entropy`).

    The forward computes the loss and, when the input requires grad, the
    gradient :math:`\partial L / \partial x = A p - a` (one-hot or
    probability targets, weights and label smoothing folded into ``a``) in
    the same pass over the logits; the backward only multiplies it by
    grad_output.

    For a grad_output of exactly 1 (``loss.backward()`` on a reduced loss)
    the backward returns the saved gradient itself, no copy: unless the graph
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
        loss, grad = _host.cross_entropy_forward(
            input, target, weight, ignore_index, reduction, label_smoothing, compute_grad
        )
        ctx.input_dtype = input.dtype
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            _host.no_double_backward()
        (grad,) = ctx.saved_tensors
        if grad.dtype == ctx.input_dtype and _host.is_unit(grad_output):
            return grad, None, None, None, None, None
        return _host.cross_entropy_backward(grad, grad_output, ctx.input_dtype), None, None, None, None, None
