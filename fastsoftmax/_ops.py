"""The ops registered with ``torch.library``: what ``torch.compile`` sees.

Dynamo cannot trace into Numba. Registered as custom ops with fake (meta)
implementations and autograd formulas, our kernels are opaque nodes of the
graph, so a model that calls them compiles with ``fullgraph=True``.

* ``fastsoftmax::softmax(Tensor input, int dim) -> Tensor`` and its
  ``log_softmax`` twin; backward ops take the forward output.
* ``fastsoftmax::cross_entropy(...) -> (Tensor loss, Tensor grad)``: the
  fused forward returns the gradient for a unit grad_output beside the loss;
  ``fastsoftmax::cross_entropy_backward`` scales it by the real grad_output.
"""

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from . import _host


def _softmax_pair(name: str, log: bool):
    @custom_op(f"fastsoftmax::{name}", mutates_args=(), device_types=("cpu", "cuda"))
    def forward(input: Tensor, dim: int) -> Tensor:
        return _host.softmax_forward(input, dim, log)

    @forward.register_fake
    def _(input, dim):
        return _host.softmax_fake(input)

    @custom_op(f"fastsoftmax::{name}_backward", mutates_args=(), device_types=("cpu", "cuda"))
    def backward(output: Tensor, grad_output: Tensor, dim: int) -> Tensor:
        return _host.softmax_backward(output, grad_output, dim, log)

    @backward.register_fake
    def _(output, grad_output, dim):
        return _host.softmax_fake(output)

    def setup_context(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)

    def autograd_backward(ctx, grad_output):
        (output,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the backward too
            return _host.softmax_backward_graph(output, grad_output, ctx.dim, log), None
        return backward(output, grad_output, ctx.dim), None

    forward.register_autograd(autograd_backward, setup_context=setup_context)
    return forward, backward


softmax, softmax_backward = _softmax_pair("softmax", log=False)
log_softmax, log_softmax_backward = _softmax_pair("log_softmax", log=True)


@custom_op("fastsoftmax::cross_entropy", mutates_args=(), device_types=("cpu", "cuda"))
def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    return _host.cross_entropy_forward(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad)


@cross_entropy.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad):
    loss = input.new_empty(_host.ce_loss_shape(input, reduction))
    return loss, _host.ce_grad_fake(input, compute_grad)


@custom_op("fastsoftmax::cross_entropy_backward", mutates_args=(), device_types=("cpu", "cuda"))
def cross_entropy_backward(grad: Tensor, grad_output: Tensor, input_dtype: torch.dtype) -> Tensor:
    return _host.cross_entropy_backward(grad, grad_output, input_dtype)


@cross_entropy_backward.register_fake
def _(grad, grad_output, input_dtype):
    return torch.empty_like(grad, dtype=input_dtype)


def _ce_setup_context(ctx, inputs, output):
    input, *_, compute_grad = inputs
    ctx.input_dtype = input.dtype
    ctx.compute_grad = compute_grad
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _ce_autograd_backward(ctx, grad_loss, _grad_of_grad):
    if not ctx.compute_grad:
        raise RuntimeError(
            "fastsoftmax: cross_entropy was called with compute_grad=False, so it kept no gradient to propagate"
        )
    if torch.is_grad_enabled():
        _host.no_double_backward()
    (grad,) = ctx.saved_tensors
    return cross_entropy_backward(grad, grad_loss, ctx.input_dtype), None, None, None, None, None, None


cross_entropy.register_autograd(_ce_autograd_backward, setup_context=_ce_setup_context)
