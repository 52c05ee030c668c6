r"""Linear cross-entropy, the chunk driver: the operands in the loop's layout, the loop, the reduction.

Rows of the logits :math:`z = x W^\top + b` go through in chunks of ``B``: per
chunk, ``torch.addmm`` into one reused ``(B, V)`` buffer, the fused
cross-entropy kernel turning it into :math:`G = \partial L / \partial z` in place
(loss, log-sum-exp and gradient in one sweep), then
:math:`\partial x_{chunk} = G W`, :math:`\partial W \mathrel{+}= G^\top x_{chunk}`,
:math:`\partial b \mathrel{+}= \sum_n G_n`. K-dim logits ``(B, C, D)`` are copied
class-last ``(B D, C)`` for the kernel and back; the softcap keeps
:math:`\tanh` in a second buffer for its derivative :math:`1 - \tanh^2`.
"""

import functools
import math

import numpy as np
import torch
from torch import Tensor

from ..errors import bad_target
from ..kernels import config
from . import cross_entropy as ce_op
from .cross_entropy_cpu import forward_reduced
from .layout import device, numpy_of

_NO_ROWS = np.empty(0)

#: Run the device-agnostic path (the CUDA one) on the CPU too: tests set it, so that path cannot rot.
FORCE_GENERIC = False


def loss_shape(input: Tensor, linear_weight: Tensor) -> tuple:
    """The unreduced loss's shape: ``(N, d1, ..., dK)``, or ``()`` for unbatched input."""
    return (*input.shape[:-1], *linear_weight.shape[1:-1])


def is_prob(input: Tensor, linear_weight: Tensor, target: Tensor) -> bool:
    """torch's rule: a target of the logits' shape ``(N, C, d1, ..., dK)`` holds class probabilities."""
    return tuple(target.shape) == (*input.shape[:-1], *linear_weight.shape[:-1])


def chunk_rows(n_rows: int, width: int, itemsize: int = 4, buffers: int = 1) -> int:
    """Rows per chunk: as many as fit :data:`config.LINEAR_CE_CHUNK_BYTES` with ``buffers`` buffers of ``width`` elements a row."""
    return max(1, min(n_rows, config.LINEAR_CE_CHUNK_BYTES // max(1, width * itemsize * buffers)))


class _Problem:
    """One call's operands in the chunk loop's layout, built once per call.

    ``x`` ``(N, H)``; ``w`` ``(V, H)`` in the compute dtype, rows ordered
    ``(c, d)``; ``b`` ``(V,)`` or None; targets in the kernel's row order
    ``(n, d)``: class indices ``t`` ``(N D,)`` or probabilities read per chunk.
    """

    def __init__(self, input, linear_weight, target, linear_bias, weight, ignore_index, eps, softcap, rows):
        self.dev = device(input)
        self.generic = FORCE_GENERIC or input.is_cuda
        self.dtype = input.dtype
        self.compute = compute = self.dev.compute_dtype(input.dtype)
        self.x = input if input.ndim == 2 else input.unsqueeze(0)
        self.n, self.h = self.x.shape
        self.c = linear_weight.shape[0]
        self.d = math.prod(linear_weight.shape[1:-1])
        self.v = self.c * self.d
        w = linear_weight if linear_weight.ndim == 2 else linear_weight.reshape(self.v, self.h)
        self.w = w if w.dtype == compute else w.to(compute)
        self.wt = self.w.T
        b = linear_bias if (linear_bias is None or linear_bias.ndim == 1) else linear_bias.reshape(self.v)
        self.b = b if (b is None or b.dtype == compute) else b.to(compute)
        self.prob = is_prob(input, linear_weight, target)
        self.target = target
        if self.prob:
            self.t = None
        else:
            t = target if target.ndim == 1 else target.reshape(-1)
            self.t = t if t.dtype == torch.int64 else t.to(torch.int64)
        self.weight = weight
        self.ignore_index, self.eps, self.softcap = ignore_index, eps, softcap
        buffers = 1 + (softcap is not None) + (self.d > 1)
        self.rows = min(self.n, rows) if rows > 0 else chunk_rows(self.n, self.v, compute.itemsize, buffers)
        if not self.generic:
            self.be = self.dev.backend()
            self.w_np = None if weight is None else numpy_of(weight.detach().to(compute).contiguous())
            self.t_np = None if self.prob else numpy_of(self.t)
            self.no_grad = np.empty((0, self.c), dtype=np.float32 if compute == torch.float32 else np.float64)

    def empty(self, shape, dtype):
        if self.generic:
            return torch.empty(shape, dtype=dtype, device=self.x.device)
        return self.dev.empty(shape, dtype)

    def q_rows(self, s: int, e: int) -> Tensor:
        """The probability targets of rows ``s:e``, class-last ``(B D, C)``, contiguous, in the compute dtype."""
        q = self.target.unsqueeze(0) if self.target.ndim == 1 else self.target[s:e]
        if self.d > 1:
            q = q.reshape(e - s, self.c, self.d).transpose(1, 2).reshape(-1, self.c)
        return q.to(self.compute).contiguous()

    def denominators(self) -> tuple:
        """``(total weight, count)`` of the kept targets, after checking every class index (before any kernel)."""
        if self.prob:
            return self.n * self.d, self.n * self.d
        if not self.generic:
            return self.be.check_targets(self.t_np, self.c, self.ignore_index, self.w_np)
        t = self.t
        kept = t != self.ignore_index
        bad = kept & ((t < 0) | (t >= self.c))
        if bool(bad.any()):
            position = int(bad.nonzero()[0, 0])
            raise bad_target(int(t[position]), position, self.c, self.ignore_index)
        count = int(kept.sum())
        if self.weight is None:
            return float(count), count
        return float(torch.where(kept, self.weight.double()[t.clamp(0, max(self.c - 1, 0))], 0.0).sum()), count


def _scales(denom: float, count: int, reduction: str, z_loss: float) -> tuple:
    """The factors on each row's cross-entropy gradient and on ``lse**2``: a mean divides them by the weight and the count kept."""
    if reduction != "mean":
        return 1.0, z_loss
    return (1.0 / denom if denom else math.nan), (z_loss / count if count else 0.0)


def _ce_rows_cpu(p, rows, r0, r1, scale, z_scale, loss, lse, want_grad):
    """The fused kernel on rows ``(R, C)``: per-row loss (float64, no z-loss), lse, and, in place, their gradient."""
    x = rows.numpy()
    grad = x if want_grad else p.no_grad
    if p.prob:
        p.be.cross_entropy_prob(x, p.q_rows(r0 // p.d, r1 // p.d).numpy(), p.w_np, p.eps, scale, z_scale, loss, lse, grad)
    else:
        p.be.cross_entropy_index(x, p.t_np[r0:r1], p.w_np, p.ignore_index, p.eps, scale, z_scale, loss, lse, grad)


def _ce_rows_generic(p, rows, r0, r1, scale, z_scale, loss, lse, want_grad):
    """:func:`_ce_rows_cpu` through :func:`.cross_entropy.forward` and torch ops: any device."""
    target = p.q_rows(r0 // p.d, r1 // p.d) if p.prob else p.t[r0:r1]
    want_lse = lse.numel() > 0 or z_scale != 0.0
    inplace = want_grad and z_scale == 0.0
    out, grad, lse_rows = ce_op.forward(rows, target, p.weight, p.ignore_index, "none", p.eps, want_grad, 0.0, want_lse, inplace)
    loss.copy_(out)
    if lse.numel():
        lse.copy_(lse_rows)
    if not want_grad:
        return
    kept = None if p.prob else (target != p.ignore_index)
    # ignored rows keep their 0 (or NaN) whatever the scale, as in the kernel
    if kept is None:
        grad.mul_(scale)
    else:
        grad.mul_(torch.full(kept.shape, scale, dtype=grad.dtype, device=grad.device).masked_fill_(~kept, 1.0)[:, None])
    if z_scale != 0.0:
        col = lse_rows.to(rows.dtype)[:, None]
        z_grad = torch.exp(rows - col) * (2.0 * z_scale * col)
        grad.add_(z_grad if kept is None else z_grad * kept[:, None])
        rows.copy_(grad)


def _sweep(p, scale, z_scale, needs, want_lse, factor=None):
    """The chunk loop: ``(loss rows, lse rows, grad x, grad W, grad b)``, gradients for ``needs``, in the compute dtype.

    Loss and lse rows are float64, NumPy arrays on the CPU (the kernels'
    outputs), tensors elsewhere. ``factor`` (one per row in the kernel's
    order) multiplies each row's gradient: the ``none`` backward's grad_output.
    """
    need_x, need_w, need_b = needs
    want_grad = need_x or need_w or need_b
    n, d, c, compute = p.n, p.d, p.c, p.compute
    rows_shape = (n * d,) if want_lse else (0,)
    if p.generic:
        loss = torch.full((n * d,), math.nan, dtype=torch.float64, device=p.x.device)
        lse = torch.full(rows_shape, math.nan, dtype=torch.float64, device=p.x.device)
    else:
        loss, lse = np.empty(n * d), (np.empty(n * d) if want_lse else _NO_ROWS)
    gx = p.empty((n, p.h), compute) if need_x else None
    gw = p.empty((p.v, p.h), compute) if need_w else None
    gb = p.empty((p.v,), compute) if need_b else None
    if n == 0:
        for g in (gw, gb):
            if g is not None:
                g.zero_()
    cap = p.softcap
    buf = p.empty((min(p.rows, n), p.v), compute)
    tanh_buf = p.empty(buf.shape, compute) if (cap is not None and want_grad) else None
    perm = p.empty((buf.shape[0] * d, c), compute) if d > 1 else None
    ce_rows = _ce_rows_generic if p.generic else _ce_rows_cpu
    for s in range(0, n, p.rows):
        e = min(n, s + p.rows)
        xc = p.x[s:e] if p.x.dtype == compute else p.x[s:e].to(compute)
        z = buf[: e - s] if e - s < buf.shape[0] else buf
        if p.b is None:
            torch.mm(xc, p.wt, out=z)
        else:
            torch.addmm(p.b, xc, p.wt, out=z)
        if cap is not None:
            if tanh_buf is None:
                z.div_(cap).tanh_().mul_(cap)
            else:
                th = tanh_buf[: e - s]
                torch.tanh(z.div_(cap), out=th)
                torch.mul(th, cap, out=z)
        rows = z
        if d > 1:
            rows = perm[: (e - s) * d]
            rows.view(e - s, d, c).copy_(z.view(e - s, c, d).transpose(1, 2))
        r0, r1 = s * d, e * d
        ce_rows(p, rows, r0, r1, scale, z_scale, loss[r0:r1], lse[r0:r1] if want_lse else lse, want_grad)
        if not want_grad:
            continue
        if factor is not None:
            rows.mul_(factor[r0:r1, None])
        if d > 1:
            z.view(e - s, c, d).copy_(rows.view(e - s, d, c).transpose(1, 2))
        if tanh_buf is not None:
            z.addcmul_(z, th.square_(), value=-1.0)  # d(c tanh(u / c)) / du = 1 - tanh(u / c)**2
        if need_x:
            torch.mm(z, p.w, out=gx[s:e])
        if need_w:
            gw.addmm_(z.T, xc, beta=0.0 if s == 0 else 1.0)
        if need_b:
            if s == 0:
                torch.sum(z, 0, out=gb)
            else:
                gb.add_(z.sum(0))
    return loss, lse, gx, gw, gb


def _reduce(loss, lse, t, ignore_index, reduction, denom, count, z_loss, shape, dtype):
    """The per-row losses (float64) plus the z-loss over the kept rows (``t``: class indices, None for probabilities), reduced.

    ``loss`` and ``lse`` are NumPy arrays (the CPU kernels' outputs) or tensors.
    """
    if isinstance(loss, np.ndarray):
        if reduction != "none" and not z_loss:
            # in NumPy and Python floats: torch ops cost more than the work at small shapes
            total = float(loss.sum()) if len(loss) else 0.0
            if reduction == "mean":
                total = total / denom if denom else math.nan
            return torch.scalar_tensor(total, dtype=dtype)
        loss, lse = torch.from_numpy(loss), torch.from_numpy(lse)
    if z_loss:
        z = z_loss * lse.square()
        if t is not None:
            z = torch.where(t != ignore_index, z, 0.0)
    if reduction == "none":
        return (loss + z if z_loss else loss).reshape(shape).to(dtype)
    total = loss.sum()
    if reduction == "sum":
        return (total + z.sum() if z_loss else total).to(dtype)
    total = total / denom if denom else total * math.nan
    return (total + z.sum() / count if (z_loss and count) else total).to(dtype)


def _to_param(grad, like):
    """A computed gradient in the shape, dtype and layout of the tensor it belongs to (None stays None).

    A transposed weight (``W.T`` of an ``(H, C)`` parameter) gets its
    gradient transposed too, so that the parameter's own update reads it
    contiguously.
    """
    if grad is None:
        return None
    if grad.shape != like.shape:
        grad = grad.view(like.shape)
    if like.is_contiguous():
        return grad if grad.dtype == like.dtype else grad.to(like.dtype)
    return torch.empty_like(like).copy_(grad)


def forward(input, linear_weight, target, linear_bias, weight, ignore_index, reduction, eps, z_loss=0.0, softcap=None,
            rows=0, needs=(False, False, False), want_lse=False):
    """``(loss, grad_input, grad_weight, grad_bias, lse)``, arguments already checked.

    The gradients (of the reduced loss, for a unit grad_output) are computed
    for the ``mean`` and ``sum`` reductions and the inputs ``needs`` names
    (input, weight, bias), else None; ``lse`` (the unreduced loss's shape, the
    compute dtype) is None unless ``want_lse``. ``rows``: rows per chunk,
    0 for :data:`config.LINEAR_CE_CHUNK_BYTES`' worth.
    """
    if reduction == "none":
        needs = (False, False, False)
    if _plain(input, linear_weight, target, softcap, rows):
        return _forward_plain(input, linear_weight, target, linear_bias, weight, ignore_index, reduction, eps, z_loss, needs, want_lse)
    p = _Problem(input, linear_weight, target, linear_bias, weight, ignore_index, eps, softcap, rows)
    denom, count = p.denominators()
    scale, z_scale = _scales(denom, count, reduction, z_loss)
    loss_rows, lse_rows, gx, gw, gb = _sweep(p, scale, z_scale, needs, want_lse or bool(z_loss))
    shape = loss_shape(input, linear_weight)
    loss = _reduce(loss_rows, lse_rows, p.t, ignore_index, reduction, denom, count, z_loss, shape, p.dtype)
    lse = torch.as_tensor(lse_rows).reshape(shape).to(p.compute) if want_lse else None
    return loss, _to_param(gx, input), _to_param(gw, linear_weight), _to_param(gb, linear_bias), lse


@functools.cache
def _cpu_backend():
    from ..backends import cpu

    return cpu


def _plain(input, linear_weight, target, softcap, rows) -> bool:
    """Whether :func:`_forward_plain` takes the call: CPU, ``(N, H)`` float32 or float64 input, ``(C, H)`` weight,
    ``(N,)`` int64 targets, no softcap, and logits that fit one chunk."""
    return (
        softcap is None
        and not (FORCE_GENERIC or input.is_cuda)
        and input.ndim == 2
        and linear_weight.ndim == 2
        and target.ndim == 1
        and target.dtype == torch.int64
        and (input.dtype == torch.float32 or input.dtype == torch.float64)
        and (rows == 0 or rows >= input.shape[0])
        and input.shape[0] * linear_weight.shape[0] * input.element_size() <= config.LINEAR_CE_CHUNK_BYTES
    )


def _forward_plain(input, linear_weight, target, linear_bias, weight, ignore_index, reduction, eps, z_loss, needs, want_lse):
    """:func:`forward` for the common call of :func:`_plain`: the chunk loop's one iteration, straight, for small batches."""
    be = _cpu_backend()
    need_x, need_w, need_b = needs
    if (
        weight is None
        and not (z_loss or want_lse or target._is_zerotensor())
        and reduction != "none"
        and be.small_rows(*target.shape, linear_weight.shape[0])
    ):
        return _forward_book(input, linear_weight, target.resolve_neg().contiguous(), linear_bias, ignore_index, reduction, eps, needs)
    t = numpy_of(target)
    w = None if weight is None else numpy_of(weight.detach().contiguous())
    denom, count = be.check_targets(t, linear_weight.shape[0], ignore_index, w)
    scale, z_scale = _scales(denom, count, reduction, z_loss)
    z = _logits(input, linear_weight, linear_bias)
    x = z.numpy()
    loss = np.empty(x.shape[0])
    lse = np.empty(x.shape[0]) if (want_lse or z_loss) else _NO_ROWS
    grad = x if (need_x or need_w or need_b) else x[:0]
    be.cross_entropy_index(x, t, w, ignore_index, eps, scale, z_scale, loss, lse, grad)
    if reduction == "none" or z_loss:
        total = _reduce(loss, lse, target, ignore_index, reduction, denom, count, z_loss, tuple(target.shape), input.dtype)
    else:
        total = float(loss.sum()) if x.shape[0] else 0.0
        total = torch.scalar_tensor(total if reduction == "sum" else (total / denom if denom else math.nan), dtype=input.dtype)
    return (total, *_gradients(z, input, linear_weight, needs), torch.from_numpy(lse).to(input.dtype) if want_lse else None)


def _logits(input, linear_weight, linear_bias):
    return torch.mm(input, linear_weight.T) if linear_bias is None else torch.addmm(linear_bias, input, linear_weight.T)


def _gradients(z, input, linear_weight, needs) -> tuple:
    """The gradients of input, weight and bias from the gradient of the logits ``z`` (held in the logits' memory)."""
    need_x, need_w, need_b = needs
    gx = torch.mm(z, linear_weight) if need_x else None
    gw = _to_param(torch.mm(z.T, input), linear_weight) if need_w else None
    gb = z.sum(0) if need_b else None
    return gx, gw, gb


def _forward_book(input, linear_weight, target, linear_bias, ignore_index, reduction, eps, needs):
    """:func:`_forward_plain` for the book's few rows and classes, no class weight, a mean or a sum.

    The kernel of ``fastsoftmax.cross_entropy``'s book path
    (:func:`.cross_entropy_cpu.forward_reduced`: the targets checked, the loss reduced and the gradient written
    over the logits in one serial call) instead of the threaded row kernel, whose launch costs more than the work here.
    """
    z = _logits(input, linear_weight, linear_bias)
    n_rows, n_cols = z.shape
    book = (z.data_ptr(), target.data_ptr(), n_rows, n_cols, ignore_index, reduction, eps)
    if not (book[0] and book[1]):  # fake tensors (FakeTensorMode) have no memory
        raise RuntimeError(
            "fastsoftmax: linear_cross_entropy's CPU kernels need tensors with memory; under a dispatch mode "
            "(FakeTensorMode, make_fx) call fastsoftmax.linear_cross_entropy or torch.ops.fastsoftmax.linear_cross_entropy"
        )
    loss = forward_reduced(z, target, book, z if any(needs) else None)
    return (loss, *_gradients(z, input, linear_weight, needs), None)


def backward_none(input, linear_weight, target, linear_bias, weight, ignore_index, eps, z_loss, softcap, rows, grad_output, needs):
    """``(grad_input, grad_weight, grad_bias)`` of the unreduced loss for ``grad_output``: the logits recomputed per chunk."""
    p = _Problem(input, linear_weight, target, linear_bias, weight, ignore_index, eps, softcap, rows)
    p.denominators()
    factor = grad_output.reshape(-1).to(p.compute).contiguous()
    _, _, gx, gw, gb = _sweep(p, 1.0, z_loss, needs, False, factor)
    return _to_param(gx, input), _to_param(gw, linear_weight), _to_param(gb, linear_bias)
