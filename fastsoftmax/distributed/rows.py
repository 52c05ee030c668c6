r"""Rows whose classes are split over ranks: the checks, the two collectives, the two passes over a rank's slice.

Rank ``r`` holds the logits of its classes ``[v0_r, v0_r + V_r)`` of ``C``.
Per row, from what each rank computes over its slice (pass 1,
:mod:`fastsoftmax.kernels.cpu_vocab`):

.. math::

    M = \max_r m_r, \qquad S = \sum_r s_r\, e^{m_r - M}, \qquad
    \mathrm{lse} = M + \log S,

    \ell = (1 - \varepsilon)\, w_t\, \big((M - x_t) + \log S\big)
         + \frac{\varepsilon}{C} \Big(\sum_c w_c (M - x_c) + W \log S\Big),

    \frac{\partial \ell}{\partial x_j} = A\, \frac{e^{x_j - M}}{S} - \frac{\varepsilon}{C} w_j
         - (1 - \varepsilon)\, w_t\, [j = t], \qquad A = (1 - \varepsilon) w_t + \frac{\varepsilon}{C} W,

with ``m_r``, ``s_r = sum_j exp(x_j - m_r)`` the rank's max and sum, ``C``
and ``W`` the number and total weight of all classes: the formulas of
:func:`fastsoftmax.kernels.rowmath.ce_index_loss` and ``ce_index_grad_coeffs``.

Two collectives for a batch of rows, no logits moved:

1. all-reduce MAX (:func:`exchange_max`) of the row maxima, preceded, the
   first time, by ``4P`` slots: each rank's slice width, its
   ``vocab_start``, whether its arguments were rejected and the rows it
   would take per chunk (one slot per rank, ``-inf`` elsewhere, so that
   MAX gathers them);
2. all-reduce SUM (:func:`exchange_sums`) of ``2N`` float64 (``S``,
   ``x_t``), ``+ N + 1`` with class weights (``w_t``, ``W``), ``+ N`` with
   label smoothing (the gap :math:`\sum_c w_c (M - x_c)`, summed from each
   rank's gap about its own max, every term non-negative). Only the rank
   holding the target adds ``x_t`` and ``w_t``, so those sums are exact.

Then pass 2 (:func:`gradient`) writes the rank's slice of the gradient.
On the CPU both passes are our Numba kernels; on CUDA tensors they are
torch ops, correct but not fused.
"""

import dataclasses
import math

import torch
import torch.distributed as dist
from torch import Tensor

from .. import validation
from ..errors import ArgumentError, DTypeError, ShapeError, bad_target
from ..kernels import rowmath
from ..ops.layout import device

FN = "vocab_parallel_cross_entropy"

#: Tests set this to run the torch-op passes (the CUDA path) on CPU tensors.
TORCH_OPS = False


def group_name(group, fn: str = FN) -> str:
    """The name of ``group`` (default: the world), which the ``torch.library`` ops take in its place."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ArgumentError(f"fastsoftmax: {fn} needs torch.distributed initialised (init_process_group) first")
    return (group if group is not None else dist.group.WORLD).group_name


def process_group(name: str, fn: str = FN):
    if not (dist.is_available() and dist.is_initialized()):
        raise ArgumentError(f"fastsoftmax: {fn} needs torch.distributed initialised (init_process_group) first")
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the passes run in: float32 for half precision (a converted copy), else the logits' own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_target(target, fn: str = FN) -> None:
    """Class indices, the same on every rank (so a failure here is every rank's)."""
    validation.check_tensor(target, "target", fn)
    if target.is_floating_point() or target.dtype not in (torch.int64, torch.uint8):
        raise DTypeError(f"fastsoftmax: {fn}: target must hold class indices (int64 or uint8), got {target.dtype}")


def check_class_weight(weight, like: Tensor, width: int, fn: str = FN) -> None:
    """This rank's class weights: ``(V_r,)``, of the logits' dtype and device."""
    validation.check_tensor(weight, "weight", fn)
    validation.check_same_device(like, weight, "weight")
    if weight.shape != (width,):
        raise ShapeError(f"fastsoftmax: {fn}: weight holds the weights of this rank's {width} classes, got shape {list(weight.shape)}")
    if weight.dtype != like.dtype:
        raise DTypeError(f"fastsoftmax: {fn}: weight is {weight.dtype}, the logits {like.dtype}: they must match")


def check_vocab_start(vocab_start, fn: str = FN) -> None:
    if vocab_start is not None and vocab_start < 0:
        raise ArgumentError(f"fastsoftmax: {fn}: vocab_start must be >= 0, got {vocab_start}")


def local_problem(check, *args):
    """The exception ``check(*args)`` raises, or None: a rank's own mistake, reported to all ranks by :func:`exchange_max`."""
    try:
        check(*args)
    except (ValueError, TypeError, RuntimeError, IndexError) as error:
        return error
    return None


@dataclasses.dataclass
class Layout:
    """Where this rank's classes lie: ``[v0, v0 + width)`` of ``n_classes``."""

    v0: int
    width: int
    n_classes: int
    chunk_rows: int = 0  # the fewest rows per chunk any rank asked for (the linear op's chunks), 0: none asked


def class_layout(widths: list, starts: list, rank: int) -> Layout:
    """This rank's :class:`Layout`, from every rank's width and vocab_start (-1: not given); checks that the slices tile ``[0, C)``."""
    total = sum(widths)
    given = [s >= 0 for s in starts]
    if not any(given):
        return Layout(sum(widths[:rank]), widths[rank], total)
    if not all(given):
        missing = [r for r, g in enumerate(given) if not g]
        raise ArgumentError(f"fastsoftmax: {FN}: vocab_start was given on some ranks but not on ranks {missing}: give it on all or none")
    end = 0
    for start, width, r in sorted(zip(starts, widths, range(len(widths)))):
        if start != end:
            what = f"class {end} is in no slice" if start > end else f"class {start} is in two slices"
            raise ArgumentError(
                f"fastsoftmax: {FN}: the slices [vocab_start, vocab_start + V_r) must tile [0, C) with no gap or "
                f"overlap, but {what} (rank {r} starts at {start}); vocab_start by rank {starts}, widths {widths}"
            )
        end = start + width
    return Layout(starts[rank], widths[rank], total)


def check_targets(t: Tensor, n_classes: int, ignore_index: int) -> None:
    bad = (t != ignore_index) & ((t < 0) | (t >= n_classes))
    if bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        raise bad_target(int(t[position]), position, n_classes, ignore_index)


def exchange_max(pg, row_max: Tensor, header=None):
    """All-reduce MAX of ``row_max`` (float64, in place); with ``header = (width, vocab_start, problem, chunk_rows)`` also the class layout.

    With a header, every rank learns every rank's slice width, vocab_start,
    whether its arguments were rejected and its rows per chunk, from the
    same collective; then each raises: the rejected rank its own error, the
    others one that names it, so that no rank is left waiting in a later
    collective. Returns the :class:`Layout` (with a header) or None.
    """
    if header is None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=pg)
        return None
    n_ranks, rank = dist.get_world_size(pg), dist.get_rank(pg)
    width, vocab_start, problem, chunk_rows = header
    head = torch.full((4, n_ranks), -math.inf, dtype=torch.float64, device=row_max.device)
    head[:, rank] = torch.tensor([width, -1 if vocab_start is None else vocab_start, problem is not None, chunk_rows], dtype=torch.float64)
    both = torch.cat([head.view(-1), row_max])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=pg)
    row_max.copy_(both[4 * n_ranks :])
    widths, starts, rejected, chunks = (list(map(int, v)) for v in both[: 4 * n_ranks].view(4, n_ranks).tolist())
    if problem is not None:
        raise problem
    if any(rejected):
        bad = [r for r in range(n_ranks) if rejected[r]]
        raise ArgumentError(f"fastsoftmax: {FN}: the arguments of rank(s) {bad} were rejected there (see that rank's error)")
    layout = class_layout(widths, starts, rank)
    layout.chunk_rows = min(chunks)
    return layout


def partials(x: Tensor, w, want_gap: bool, torch_ops: bool) -> tuple:
    """Pass 1 over ``x`` (R, V) in the compute dtype: ``(m_r, s_r, g_r)`` per row, float64 (``g_r`` None without smoothing)."""
    if torch_ops:
        return _partials_torch(x, w, want_gap)
    dev = device(x)
    rows = x.shape[0]
    m, s = (dev.empty((rows,), torch.float64) for _ in range(2))
    gap = dev.empty((rows if want_gap else 0,), torch.float64)
    arr = dev.array
    dev.backend().vocab_partials(arr(x), arr(w) if w is not None else None, arr(m), arr(s), arr(gap))
    return m, s, (gap if want_gap else None)


def _partials_torch(x: Tensor, w, want_gap: bool) -> tuple:
    """Pass 1 in torch ops, as :func:`kernels.cpu_vocab._vocab_partials` computes it."""
    rows = x.shape[0]
    if x.shape[1] == 0:
        zeros = x.new_zeros(rows, dtype=torch.float64)
        return torch.full_like(zeros, -math.inf), zeros, (zeros if want_gap else None)
    m = x.amax(1)  # NaN where the row holds one, which s then carries
    s = torch.exp(x - m[:, None]).sum(1, dtype=torch.float64)
    empty = m == -math.inf
    s = torch.where(empty, 0.0, s)
    base = torch.where(empty, 0.0, m)
    gap = ((base[:, None] - x) * (w if w is not None else 1.0)).sum(1, dtype=torch.float64) if want_gap else None
    return torch.where(torch.isnan(m), -math.inf, m).double(), s, gap


@dataclasses.dataclass
class Rows:
    """The all-reduced values of a batch of rows (float64): what the loss and pass 2 need."""

    row_max: Tensor  # M
    row_sum: Tensor  # S
    x_t: Tensor
    w_t: Tensor  # 0 for ignored rows
    gap: object  # sum_c w_c (M - x_c), or 0.0 without smoothing
    w_sum: float  # W

    def losses(self, kept: Tensor, eps: float, n_classes: int) -> Tensor:
        """Each row's loss (0 where ignored), float64."""
        loss = rowmath.ce_index_loss(self.row_max, torch.log(self.row_sum), self.x_t, self.w_t, self.gap, self.w_sum, eps, n_classes)
        return torch.where(kept, loss, 0.0)


def exchange_sums(pg, x: Tensor, t: Tensor, w, layout: Layout, ignore_index: int, eps: float, m_r, s_r, gap_r, row_max) -> Rows:
    """All-reduce SUM of this rank's share of ``S``, ``x_t``, ``w_t``, the smoothing gap and ``W`` (see the module)."""
    n_rows = t.shape[0]
    kept = t != ignore_index
    local = t - layout.v0
    owner = kept & (local >= 0) & (local < layout.width)
    idx = torch.where(owner, local, 0)
    none = torch.zeros_like(s_r)
    cols = [s_r * torch.exp(m_r - row_max)]  # NaN for a row of only -inf (-inf - -inf), as torch's
    cols.append(torch.where(owner, x.gather(1, idx[:, None])[:, 0].double(), 0.0) if layout.width else none)
    if w is not None:
        cols.append(torch.where(owner, w[idx].double(), 0.0) if layout.width else none)
    w_local = w.double().sum() if w is not None else float(layout.width)
    if eps > 0.0:
        base = torch.where(m_r == -math.inf, 0.0, m_r)
        cols.append(gap_r + (row_max - base) * w_local)
    if w is not None:
        cols.append(w_local.reshape(1))
    body = torch.cat(cols)
    dist.all_reduce(body, op=dist.ReduceOp.SUM, group=pg)
    row_sum, x_t = body[:n_rows], body[n_rows : 2 * n_rows]
    k = 2
    if w is not None:
        w_t, k = body[2 * n_rows : 3 * n_rows], 3
        w_sum = float(body[-1])
    else:
        w_t, w_sum = kept.double(), float(layout.n_classes)
    gap = body[k * n_rows : (k + 1) * n_rows] if eps > 0.0 else 0.0
    return Rows(row_max, row_sum, x_t, w_t, gap, w_sum)


def gradient(x: Tensor, t: Tensor, w, layout: Layout, ignore_index: int, eps: float, scale: float, rows: Rows, out: Tensor, torch_ops: bool) -> Tensor:
    """Pass 2: this rank's slice of d(loss)/dx (R, V) for a unit grad_output, times ``scale``, written into ``out`` (may be ``x``)."""
    args = (layout.v0, w, ignore_index, eps, layout.n_classes, rows.w_sum, scale, rows.row_max, rows.row_sum, rows.w_t)
    if torch_ops:
        return out.copy_(_gradient_torch(x, t, *args))
    dev = device(x)
    arr = dev.array
    dev.backend().vocab_gradient(
        arr(x), arr(t), layout.v0, arr(w) if w is not None else None, ignore_index, eps, layout.n_classes, rows.w_sum, scale,
        arr(rows.row_max), arr(rows.row_sum), arr(rows.w_t.contiguous()), arr(out),
    )
    return out


def _gradient_torch(x, t, v0, w, ignore_index, eps, n_classes, w_sum, scale, row_max, row_sum, w_t) -> Tensor:
    """Pass 2 in torch ops, rounded in the order of :func:`kernels.cpu_vocab._vocab_gradient`."""
    k_exp, k_w, k_hot = rowmath.ce_index_grad_coeffs(row_sum, w_t, w_sum, eps, n_classes, scale)
    cd = x.dtype
    g = torch.exp(x - row_max[:, None].to(cd)) * k_exp[:, None].to(cd)
    g = g - (k_w * w if w is not None else torch.tensor(k_w, dtype=cd))
    local = t - v0
    owner = (t != ignore_index) & (local >= 0) & (local < x.shape[1])
    hit = owner.nonzero()[:, 0]
    g[hit, local[hit]] -= k_hot[hit].to(cd)
    ignored_fill = torch.where(torch.isnan(row_sum), math.nan, 0.0).to(cd)
    return torch.where((t == ignore_index)[:, None], ignored_fill[:, None], g)


def mean_scale(reduction: str, denom: float) -> float:
    """The factor the reduction puts on each row's gradient: ``1 / total kept weight`` for a mean (NaN when it is 0, as torch's)."""
    if reduction != "mean":
        return 1.0
    return 1.0 / denom if denom else math.nan


def reduce_losses(loss_rows: Tensor, reduction: str, denom: float, shape, dtype: torch.dtype) -> Tensor:
    """The per-row losses (float64) reduced as ``reduction`` asks, in ``dtype``."""
    if reduction == "none":
        return loss_rows.view(shape).to(dtype)
    total = loss_rows.sum()
    if reduction == "mean":
        total = total / denom if denom else total * math.nan
    return total.to(dtype)
