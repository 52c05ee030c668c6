r"""Drop-in replacements for ``torch.nn.functional.softmax``, ``log_softmax``, ``softmin`` and ``cross_entropy``.

Same signatures, same semantics, same results to floating-point rounding,
the same exceptions (:mod:`fastsoftmax.errors`). In eager mode they run the
autograd Functions of :mod:`fastsoftmax.ops`; under ``torch.compile`` and
on meta tensors the registered ``torch.ops.fastsoftmax`` ops, so a model
that uses them compiles with ``fullgraph=True``.

The numerics. With :math:`m = \max_j x_j` and :math:`s = \sum_j e^{x_j - m}`
(every exponent :math:`\le 0`, so nothing overflows and :math:`s \ge 1`):

.. math::

    \mathrm{softmax}(x)_j = e^{x_j - m} / s, \qquad
    \mathrm{log\_softmax}(x)_j = (x_j - m) - \log s, \qquad
    \mathrm{lse}(x) = m + \log s.
"""

from typing import NamedTuple, Optional

import torch

from . import paths, validation
from .ops import cross_entropy as ce_op
from .ops import cross_entropy_cpu as ce_cpu
from .ops import softmax as softmax_op

__all__ = ["softmax", "log_softmax", "softmin", "cross_entropy", "CrossEntropyOutput", "linear_cross_entropy"]

_KERNEL_NAMES = {False: "softmax", True: "log_softmax"}


def _softmax(input, dim, stacklevel, dtype, log: bool, name: str):
    # (softmax and log_softmax try the book's rows themselves first: at 256 x 10 a Python frame counts)
    if paths.plain_softmax(input, dim, dtype) and paths.plain_call():
        dim %= input.ndim
        if input.requires_grad and torch.is_grad_enabled():
            return (softmax_op.LogSoftmaxCore if log else softmax_op.SoftmaxCore).apply(input, dim)
        return softmax_op.forward(input, dim, log)
    validation.check_tensor(input, "input", name)
    validation.check_layout(input, name)
    validation.check_device(input)
    validation.check_dtype_arg(dtype, name)
    if dim is None:
        dim = validation.implicit_dim(input.ndim, name, stacklevel)
    dim = validation.as_dim(dim, input.ndim, name)
    if dtype is not None:
        input = input.to(dtype)
    if input.dtype not in validation.FLOAT_DTYPES:
        if input.numel() == 0 and not input.is_complex():
            return torch.empty(input.shape, dtype=input.dtype, device=input.device)  # torch returns it too
        kernel = _KERNEL_NAMES[log] + ("_lastdim_kernel_impl" if dim == input.ndim - 1 or input.ndim <= 1 else "_kernel_impl")
        validation.check_float_input(input, kernel)
    if paths.torch_ops_only():
        # torch.func transforms (vmap, grad, ...): their wrapped tensors hold no storage for our kernels to
        # read, and they need ops with batching rules and derivatives (forward AD: a jvp): torch's own
        return (torch.log_softmax if log else torch.softmax)(input, dim)
    if input.device.type == "meta" or paths.recorded():
        return (softmax_op.log_softmax_op if log else softmax_op.softmax_op)(input, dim)
    if not (input.requires_grad and torch.is_grad_enabled()):
        return softmax_op.forward(input, dim, log)  # no graph to record: skip autograd.Function's cost
    return (softmax_op.LogSoftmaxCore if log else softmax_op.SoftmaxCore).apply(input, dim)


def softmax(input, dim=None, _stacklevel=3, dtype=None):
    r"""Softmax of ``input`` along ``dim``, as :func:`torch.nn.functional.softmax`.

    .. math:: y_j = \frac{e^{x_j - m}}{\sum_k e^{x_k - m}}, \quad m = \max_k x_k

    A row holding NaN or ``+inf``, or only ``-inf``, is NaN throughout, as in
    PyTorch; ``-inf`` entries of any other row get probability exactly 0.

    Args:
        input: floating-point tensor of any rank, any layout, CPU or CUDA.
        dim: the dimension to normalise over (``None``: torch's deprecated
            implicit choice, with its warning).
        dtype: if given, ``input`` is cast to it first (integer inputs too).

    Backward: :math:`\partial x = y \odot (\partial y - \sum_k y_k \partial y_k)`.
    """
    if dtype is None and (rows := paths.book_rows(input, dim)) is not None:
        if input.requires_grad and torch.is_grad_enabled():
            return softmax_op.book_apply(input, rows, False)
        return softmax_op.forward_book(input, rows, False)
    return _softmax(input, dim, _stacklevel + 1, dtype, log=False, name="softmax")


def log_softmax(input, dim=None, _stacklevel=3, dtype=None):
    r"""Log-softmax of ``input`` along ``dim``, as :func:`torch.nn.functional.log_softmax`.

    .. math:: y_j = (x_j - m) - \log \sum_k e^{x_k - m}, \quad m = \max_k x_k

    Backward: :math:`\partial x = \partial y - e^{y} \sum_k \partial y_k`.
    """
    if dtype is None and (rows := paths.book_rows(input, dim)) is not None:
        if input.requires_grad and torch.is_grad_enabled():
            return softmax_op.book_apply(input, rows, True)
        return softmax_op.forward_book(input, rows, True)
    return _softmax(input, dim, _stacklevel + 1, dtype, log=True, name="log_softmax")


def softmin(input, dim=None, _stacklevel=3, dtype=None):
    r"""Softmin of ``input`` along ``dim``, as :func:`torch.nn.functional.softmin`: :math:`\mathrm{softmax}(-x)`.

    As in torch, the input is negated in its own dtype before any ``dtype``
    cast (so an unsigned integer input wraps around).
    """
    validation.check_tensor(input, "input", "softmin")
    return _softmax(-input, dim, _stacklevel + 1, dtype, log=False, name="softmin")


class CrossEntropyOutput(NamedTuple):
    """What :func:`cross_entropy` returns when asked for more than the loss.

    ``z_loss`` is the reduced z-loss term (already included in ``loss``,
    detached: for logging); ``lse`` the log-sum-exp of every element's logits
    (the unreduced loss's shape, no gradient). Each is None unless asked for.
    """

    loss: torch.Tensor
    z_loss: Optional[torch.Tensor]
    lse: Optional[torch.Tensor]


def cross_entropy(
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    label_smoothing=0.0,
    *,
    z_loss=0.0,
    softcap=None,
    return_lse=False,
    return_z_loss=False,
    inplace_backward=False,
):
    r"""Softmax cross-entropy, as :func:`torch.nn.functional.cross_entropy`, plus keyword-only options.

    ``input`` holds logits of shape ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.
    ``target`` holds class indices (int64, or uint8 for ``(N, C)``; the input's
    shape without the class dimension; entries equal to ``ignore_index`` are
    skipped) or class probabilities (floating point, the input's shape). Per
    element, with :math:`\mathrm{lse} = m + \log \sum_c e^{x_c - m}`, class
    weights :math:`w` and label smoothing :math:`\varepsilon`:

    .. math::

        \ell = (1 - \varepsilon)\, w_t (\mathrm{lse} - x_t)
               + \frac{\varepsilon}{C} \sum_c w_c (\mathrm{lse} - x_c)
               \;[+\; z\, \mathrm{lse}^2]

    (for probability targets :math:`q`: :math:`\ell = \sum_c w_c q'_c (\mathrm{lse} - x_c)`,
    :math:`q' = (1 - \varepsilon) q + \varepsilon / C`). ``reduction="mean"``
    divides the sum by :math:`\sum_i w_{t_i}` over non-ignored elements (index
    targets) or by the number of elements (probability targets); all targets
    ignored gives NaN, as in PyTorch. The gradient,
    :math:`\partial \ell / \partial x_c = (\sum_k a_k) p_c - a_c` with :math:`a`
    the coefficients above, is computed in the same pass as the loss.

    Keyword-only options torch does not have:

    * ``z_loss``: PaLM's auxiliary loss :math:`z \cdot \mathrm{lse}^2` per kept
      element, added to the loss (a mean divides it by the number of kept
      elements); its gradient is :math:`2 z\, \mathrm{lse}\, p_c`.
    * ``softcap``: Gemma 2's soft-capping, the loss of :math:`c \tanh(x / c)`
      instead of :math:`x`, differentiated through (:math:`1 - \tanh^2`).
    * ``return_lse``, ``return_z_loss``: return a :class:`CrossEntropyOutput`
      with the per-element log-sum-exp and the reduced z-loss beside the loss.
    * ``inplace_backward``: write the gradient into ``input``'s own memory
      (no logits-sized buffer at all; ``input`` no longer holds the logits
      afterwards, and an op that saved them raises in backward).

    Raises:
        IndexError: a class index outside ``[0, C)`` that is not ``ignore_index``.
        ValueError, TypeError, RuntimeError subclasses of :mod:`fastsoftmax.errors`:
            wrong shape, dtype, device, reduction or smoothing, as torch raises them.
    """
    if (
        weight is None
        and size_average is None
        and reduce is None
        and not (z_loss or return_lse or return_z_loss or inplace_backward)
        and softcap is None
    ):
        book = paths.book_arrays(input, target, ignore_index, reduction, label_smoothing) if paths.book_call() else None
        if book is not None:
            if input.requires_grad and torch.is_grad_enabled():
                return ce_op.plain_apply(input, target, book)
            return ce_cpu.forward_reduced(input, target, book)
        if paths.plain_cross_entropy(input, target, ignore_index, reduction, label_smoothing) and paths.plain_call():
            if input.requires_grad and torch.is_grad_enabled():
                return ce_op.CrossEntropyCore.apply(input, target, None, ignore_index, reduction, label_smoothing)
            return ce_op.forward(input, target, None, ignore_index, reduction, label_smoothing, False)[0]
    reduction = validation.reduction_of(reduction, size_average, reduce)
    prob, ignore_index, eps = validation.check_cross_entropy(input, target, weight, ignore_index, label_smoothing)
    z = validation.as_float(z_loss, "z_loss", "cross_entropy", 9)
    grad_mode = torch.is_grad_enabled()
    if grad_mode and weight is not None and weight.requires_grad and not prob:
        raise RuntimeError(
            "fastsoftmax: The function 'nll_loss_forward' is not differentiable with respect to argument 'weight'. "
            "This input cannot have requires_grad True: class weights of index targets take no gradient; detach them"
        )
    dtype = validation.result_dtype(input, target, weight, prob)
    if dtype != input.dtype:
        input = input.to(dtype)  # probability targets of higher precision promote the loss, as in torch
    if softcap is not None:
        cap = validation.as_float(softcap, "softcap", "cross_entropy", 10)
        if not cap > 0:
            raise validation.ArgumentError(f"fastsoftmax: softcap must be positive, got {cap}")
        input = cap * torch.tanh(input / cap)  # the chain rule through tanh is autograd's
    want_lse = return_lse
    extras = return_lse or return_z_loss
    composite = grad_mode and (target.requires_grad or (weight is not None and weight.requires_grad))
    if paths.torch_ops_only():  # torch.func transforms, forward AD: in torch's ops (see _softmax)
        loss, lse = _cross_entropy_torch_ops(input, target, weight, ignore_index, reduction, eps, z, want_lse or return_z_loss, prob)
    elif composite or input.device.type == "meta" or paths.recorded():
        loss, lse = _cross_entropy_op_path(input, target, weight, ignore_index, reduction, eps, z, want_lse or return_z_loss, composite)
    elif not (grad_mode and input.requires_grad):
        loss, _, lse = ce_op.forward(input, target, weight, ignore_index, reduction, eps, False, z, want_lse or return_z_loss)
    else:
        inplace = bool(inplace_backward) and softcap is None
        out = ce_op.CrossEntropyCore.apply(input, target, weight, ignore_index, reduction, eps, z, want_lse or return_z_loss, inplace)
        loss, lse = out if isinstance(out, tuple) else (out, None)
    if not extras:
        return loss
    z_value = _z_value(lse, target, ignore_index, prob, z, reduction, dtype) if return_z_loss else None
    return CrossEntropyOutput(loss, z_value, lse if return_lse else None)


def _cross_entropy_op_path(input, target, weight, ignore_index, reduction, eps, z, want_lse, composite):
    """The loss through the registered op (compile, meta) or, for targets or weights that require grad, in torch ops."""
    if composite:
        loss = ce_op.composite(input, target, weight, reduction, eps, log_softmax)
        if z:
            loss = loss + ce_op.z_term_graph(input, target, ignore_index, z, reduction)
        lse = ce_op.lse_graph(input).detach() if want_lse else None
        return loss, lse
    compute_grad = input.requires_grad and torch.is_grad_enabled()
    loss, _, lse = ce_op.cross_entropy_op(input, target, weight, ignore_index, reduction, eps, z, compute_grad, want_lse)
    return loss, (lse if want_lse else None)


def _cross_entropy_torch_ops(input, target, weight, ignore_index, reduction, eps, z, want_lse, prob):
    """The loss in torch's own ops, for calls under torch.func transforms: ``(loss, lse or None)``."""
    kw = dict(weight=weight, reduction=reduction, label_smoothing=eps)
    if not prob:
        kw["ignore_index"] = ignore_index
    loss = torch.nn.functional.cross_entropy(input, target, **kw)
    if z:
        loss = loss + ce_op.z_term_graph(input, target, ignore_index, z, reduction)
    return loss, (ce_op.lse_graph(input).detach() if want_lse else None)


def _z_value(lse, target, ignore_index, prob, z, reduction, dtype):
    """The z-loss term of the loss, reduced (detached): ``z * lse**2`` over the kept elements."""
    term = z * lse.detach().to(torch.float64).square()
    kept = None if prob else (target != ignore_index)
    if kept is not None:
        term = torch.where(kept, term, 0.0)
    if reduction == "none":
        return term.to(dtype)
    total = term.sum()
    if reduction == "mean":
        n = int(kept.sum()) if kept is not None else term.numel()
        total = total / n if n else total * 0
    return total.to(dtype)


def linear_cross_entropy(
    input,
    linear_weight,
    target,
    *,
    linear_bias=None,
    weight=None,
    reduction="mean",
    ignore_index=None,
    label_smoothing=0.0,
    options=None,
    z_loss=0.0,
    softcap=None,
    return_lse=False,
    return_z_loss=False,
):
    r"""Cross-entropy of linearly transformed inputs, as :func:`torch.nn.functional.linear_cross_entropy`, never holding all the logits.

    The loss of :func:`cross_entropy` on the logits
    :math:`z_{n, c, d} = x_n \cdot W_{c, d} + b_{c, d}`: ``input`` ``(H)`` or
    ``(N, H)``, ``linear_weight`` ``(C, H)`` or ``(C, d1, ..., dK, H)``,
    ``linear_bias`` ``(C, d1, ..., dK)``; class-index targets ``()``, ``(N)``
    or ``(N, d1, ..., dK)`` (``ignore_index`` None means -100) or class
    probabilities of the logits' shape ``(C)``, ``(N, C, d1, ..., dK)``.

    Rows go through in chunks: per chunk the logits by ``torch.addmm`` into
    one reused buffer, the fused kernel turning them into their gradient
    :math:`G = \partial L / \partial z` in place, then :math:`\partial x = G W`,
    :math:`\partial W \mathrel{+}= G^\top x`, :math:`\partial b \mathrel{+}= \sum_n G_n`. Peak
    extra memory is one chunk of logits (64 MiB by default; twice that with a
    softcap or K-dim weights), not ``N x V``. ``options`` takes torch's
    :class:`torch.nn.LinearCrossEntropyOptions`: its ``batch_chunk_size`` or
    explicit ``chunking_method`` sets the rows per chunk; ``acc_policy``,
    ``acc_dtype`` and ``allow_retain_graph`` change nothing here (half
    precision is accumulated in float32 on the CPU, ``retain_graph`` always
    works). Half-precision inputs are computed in float32 on the CPU, natively
    on CUDA, where the path is not yet fused (the logits of each chunk go
    through :func:`cross_entropy`'s kernels and torch ops).

    Keyword-only options beyond torch's, as in :func:`cross_entropy`:
    ``z_loss`` (:math:`z \cdot \mathrm{lse}^2` per kept element), ``softcap``
    (the loss of :math:`c \tanh(z / c)`), ``return_lse`` and
    ``return_z_loss`` (return a :class:`CrossEntropyOutput`).

    Probability targets or class weights that require grad, zero classes, and
    probability targets of a wider dtype than the input go through
    :func:`cross_entropy` on materialised logits. Double backward recomputes
    the loss in torch ops; forward-mode AD and ``torch.func`` transforms are
    not supported. Where torch rounds half-precision logits before the loss,
    ours stay float32, so results differ from torch's by about an ulp of the
    half type.
    """
    from .ops import linear_cross_entropy as lce_op

    prob, ignore_index, reduction, eps, z, cap, rows, logits_shape = lce_op.check_arguments(
        input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, options, z_loss, softcap
    )
    grad_mode = torch.is_grad_enabled()
    if grad_mode and weight is not None and weight.requires_grad and not prob:
        raise RuntimeError(
            "fastsoftmax: The function 'nll_loss_forward' is not differentiable with respect to argument 'weight'. "
            "This input cannot have requires_grad True: class weights of index targets take no gradient; detach them"
        )
    want_lse = return_lse or return_z_loss
    # the logits first where the chunked path cannot take the call; under torch.func transforms too, whose wrapped
    # tensors hold no storage for the kernels to read (cross_entropy then computes in torch's ops)
    if paths.torch_ops_only() or lce_op.needs_logits(input, target, weight, prob, logits_shape):
        bias = None if linear_bias is None else linear_bias.reshape(-1)
        logits = torch.nn.functional.linear(input, linear_weight.reshape(-1, input.shape[-1]), bias)
        return cross_entropy(
            logits.reshape(logits_shape), target, weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=eps, z_loss=z, softcap=cap, return_lse=return_lse, return_z_loss=return_z_loss,
        )
    needs = (input.requires_grad, linear_weight.requires_grad, linear_bias is not None and linear_bias.requires_grad)
    needs = needs if grad_mode else (False, False, False)
    args = (input, linear_weight, target, linear_bias, weight, ignore_index, reduction, eps, z, cap, rows)
    if input.device.type == "meta" or paths.recorded():
        loss, _, _, _, lse = lce_op.linear_cross_entropy_op(*args, *needs, want_lse)
    elif not any(needs):
        loss, _, _, _, lse = lce_op.forward(*args, want_lse=want_lse)
    else:
        out = lce_op.LinearCrossEntropyCore.apply(*args, want_lse)
        loss, lse = out if want_lse else (out, None)
    if not (return_lse or return_z_loss):
        return loss
    z_value = _z_value(lse, target, ignore_index, prob, z, reduction, input.dtype) if return_z_loss else None
    return CrossEntropyOutput(loss, z_value, lse if return_lse else None)
