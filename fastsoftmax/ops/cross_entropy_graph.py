r"""Cross-entropy in torch's own ops, where the fused kernel does not fit.

* :func:`composite`: probability targets or class weights that require
  grad (the kernel returns only the gradient of the logits);
* :func:`backward_graph`: double backward, the gradient rebuilt from the
  saved input so that autograd can differentiate it again;
* :func:`forward_torch_ops`: the z-loss and the log-sum-exp on CUDA, whose
  kernels return neither yet;
* :func:`lse_graph`, :func:`z_term_graph`: PaLM's z-loss
  :math:`z\,\mathrm{lse}^2`, reduced as :func:`fastsoftmax.cross_entropy` reduces it.
"""

import torch
from torch import Tensor


def is_prob_target(input: Tensor, target: Tensor) -> bool:
    """PyTorch's rule: a target of the input's shape holds class probabilities."""
    return input.shape == target.shape


def lse_graph(input: Tensor) -> Tensor:
    """The per-element log-sum-exp in torch ops (over the class dimension)."""
    return torch.logsumexp(input, 0 if input.ndim == 1 else 1)


def z_term_graph(input, target, ignore_index, z_loss, reduction):
    """``z_loss * lse**2`` over the kept elements, reduced, in torch ops (differentiable)."""
    z = z_loss * lse_graph(input).square()
    prob = is_prob_target(input, target)
    if not prob:
        z = torch.where(target != ignore_index, z, 0.0)
    if reduction == "none":
        return z
    if reduction == "sum":
        return z.sum()
    n = z.numel() if prob else int((target != ignore_index).sum())
    return z.sum() / n if n else z.sum() * 0


def composite(input, target, weight, reduction, label_smoothing, log_softmax=None):
    r"""Cross-entropy with probability targets (or weights) that require grad.

    The fused kernel returns no gradient for ``target`` or ``weight``, so here
    the loss is composed of our log-softmax and torch ops, as torch composes
    it, and autograd differentiates all three:
    :math:`\ell = -\sum_c w_c q'_c \log p_c`, :math:`\partial \ell / \partial q_c = -(1 - \varepsilon) w_c \log p_c`.
    """
    class_dim = 0 if input.ndim == 1 else 1
    n_classes = input.shape[class_dim]
    logp = (log_softmax or torch.log_softmax)(input, class_dim)
    q = target if label_smoothing == 0.0 else target * (1 - label_smoothing) + label_smoothing / n_classes
    terms = logp * q
    if weight is not None:
        terms = terms * weight.view([n_classes] + [1] * (input.ndim - class_dim - 1))
    loss = -terms.sum(class_dim)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (input.numel() // n_classes)  # 0 / 0 = NaN for an empty batch, as in torch


def backward_graph(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, grad_output):
    """The gradient in torch ops, from the input, so that it can be differentiated again.

    Under ``create_graph=True`` (double backward) the backward recomputes the
    loss with torch's own ops from the saved input, and returns its gradient
    with the graph attached.
    """
    with torch.enable_grad():
        x = input if input.requires_grad else input.detach().requires_grad_()
        loss = torch.nn.functional.cross_entropy(
            x, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
        )
        if z_loss:
            loss = loss + z_term_graph(x, target, ignore_index, z_loss, reduction)
        (grad,) = torch.autograd.grad(loss, x, grad_output, create_graph=True)
    return grad


def forward_torch_ops(input, target, weight, ignore_index, reduction, eps, compute_grad, z_loss, want_lse):
    """The loss, its gradient and the log-sum-exp in torch ops: the CUDA path for the z-loss and ``return_lse``.

    The CUDA kernels return neither yet; this is exact, at the cost of torch's
    extra passes and buffers.
    """
    with torch.enable_grad():
        x = input.detach().requires_grad_(compute_grad)
        loss = torch.nn.functional.cross_entropy(x, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps)
        if z_loss:
            loss = loss + z_term_graph(x, target, ignore_index, z_loss, reduction)
        grad = torch.autograd.grad(loss, x, torch.ones_like(loss))[0] if compute_grad else input.new_empty((0,))
    lse = lse_graph(input.detach()) if want_lse else input.new_empty((0,))
    return loss.detach(), grad, lse
