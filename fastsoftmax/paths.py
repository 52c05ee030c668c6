"""Which path a call takes: the checks that send it to the kernels, the registered ops or torch's own ops.

* :func:`book_rows` and :func:`book_arrays`: the book's calls (rows of a
  few classes, too few for threads), which the one-call kernels of
  ``kernels/cpu_small.py`` take at the tensors' addresses;
  :func:`plain_softmax` and :func:`plain_cross_entropy`: the common calls
  that need no argument conversion. Each holds every check the full path
  would make, so those calls skip the full path's checks.
* :func:`recorded`: a tracer records the call (``torch.compile``,
  ``torch.jit.trace``, ``make_fx``, ``FakeTensorMode``): the registered
  ``torch.ops.fastsoftmax`` ops, which tracers see, instead of the kernels.
* :func:`torch_ops_only`: ``torch.func`` transforms or forward-mode AD:
  torch's own ops compute the call.

(Those two, :func:`plain_call` and :func:`book_call` live in
``ops/direct.py``, whose ``UnderTransforms`` doors ask the same.)
"""

import torch

from . import validation
from .kernels import config
from .ops.direct import (
    book_call,
    dispatch_modes,
    forward_ad,
    is_compiling,
    jit_tracing,
    plain_call,
    recorded,
    torch_ops_only,
)

__all__ = [
    "book_arrays",
    "book_call",
    "book_rows",
    "plain_call",
    "plain_cross_entropy",
    "plain_softmax",
    "recorded",
    "torch_ops_only",
]

_PLAIN_DTYPES = (torch.float32, torch.float64)
_PLAIN_REDUCTIONS = frozenset(validation.REDUCTIONS)
_T32, _T64, _TI64 = torch.float32, torch.float64, torch.int64


def plain_softmax(input, dim, dtype) -> bool:
    """Whether a call is the common case that needs no conversion: a dense CPU float32/64 tensor, an int ``dim`` in range.

    Every argument check of the full path would pass for it, so it skips them
    (on rows of a few classes the checks cost more than the kernel).
    """
    return (
        dtype is None
        and type(input) is torch.Tensor
        and type(dim) is int
        and input.dtype in _PLAIN_DTYPES
        and input.is_cpu
        and input.layout is torch.strided
        and -input.ndim <= dim < input.ndim
    )


def book_rows(input, dim):
    """``(address, n_rows, n_cols)`` of the book's softmax input, or None: contiguous CPU float32/64 rows, ``dim`` the last.

    Rows of at most ``config.CPU_SMALL_CLASSES`` classes and fewer than
    ``config.CPU_PARALLEL_MIN_ELEMENTS`` elements, which the one-call
    kernels of ``kernels/cpu_small.py`` take at their address. At 256 x 10
    with the caches as cold as a training step leaves them each Python call
    here costs about a microsecond, and a NumPy view 15: so the tensor's own
    properties, read once. Not taken under a tracer, a transform or forward
    AD (:func:`book_call`), for a negative view (its memory holds the
    values negated), or for a tensor with no plain memory to read (nested,
    a functorch wrapper: ``shape`` or ``data_ptr`` raises; an efficient zero
    tensor: address 0).
    """
    if not (
        type(input) is torch.Tensor
        and type(dim) is int
        and (dim == -1 or dim == 1)
        # book_call(), written out: a frame fewer
        and not (is_compiling() or jit_tracing() or dispatch_modes() or forward_ad._current_level >= 0)
        and (input.dtype is _T32 or input.dtype is _T64)
        and input.is_cpu
        and input.layout is torch.strided
        and input.dim() == 2
        and input.is_contiguous()
        and not input.is_neg()
    ):
        return None
    try:
        n_rows, n_cols = input.shape
        address = input.data_ptr()
    except RuntimeError:
        return None
    if address and 0 < n_cols <= config.CPU_SMALL_CLASSES and 0 < n_rows * n_cols < config.CPU_PARALLEL_MIN_ELEMENTS:
        return address, n_rows, n_cols
    return None


def book_arrays(input, target, ignore_index, reduction, label_smoothing):
    """The book's call as its kernel takes it, ``(x, t, n_rows, n_cols, ignore_index, reduction, label_smoothing)``, or None.

    ``x`` and ``t`` are the addresses of the logits and the targets.

    The book's call: CPU float32/64 logits ``(N, C)``, contiguous, of at most
    ``config.CPU_SMALL_CLASSES`` classes and fewer than
    ``config.CPU_PARALLEL_MIN_ELEMENTS`` elements, contiguous CPU int64
    targets ``(N,)``, a mean or a sum, plain options: every check of
    :func:`validation.check_cross_entropy` would pass, and
    :class:`.ops.cross_entropy.PlainCrossEntropy` takes it. Each Python call
    or property read here costs about a microsecond with the caches as cold
    as a training step leaves them (a NumPy view 15: see :func:`book_rows`);
    so one function. Not for negative views (their memory holds the values
    negated) nor tensors with no plain memory (``shape`` or ``data_ptr``
    raises, or gives 0: an efficient zero tensor). The caller checks
    :func:`book_call`.
    """
    if not (
        type(input) is torch.Tensor
        and type(target) is torch.Tensor
        and type(reduction) is str
        and (reduction == "mean" or reduction == "sum")
        and type(ignore_index) is int
        and type(label_smoothing) is float
        and 0.0 <= label_smoothing <= 1.0
        and -(2**63) <= ignore_index < 2**63
        and (input.dtype is _T32 or input.dtype is _T64)
        and target.dtype is _TI64
        and input.is_cpu
        and target.is_cpu
        and input.layout is torch.strided
        and target.layout is torch.strided
        and input.dim() == 2
        and target.dim() == 1
        and input.is_contiguous()
        and target.is_contiguous()
        and not (input.is_neg() or target.is_neg())
    ):
        return None
    try:
        n_rows, n_cols = input.shape
        x, t = input.data_ptr(), target.data_ptr()
    except RuntimeError:
        return None
    if x and t and target.shape[0] == n_rows and 0 < n_cols <= config.CPU_SMALL_CLASSES and n_rows * n_cols < config.CPU_PARALLEL_MIN_ELEMENTS:
        return x, t, n_rows, n_cols, ignore_index, reduction, label_smoothing
    return None


def plain_cross_entropy(input, target, ignore_index, reduction, label_smoothing) -> bool:
    """Whether a call is the common case: CPU float32/64 logits ``(N, C)``, int64 targets ``(N,)``, plain options.

    Every check of :func:`validation.check_cross_entropy` would pass for it
    (at the book's 256 x 10 the checks cost as much as the kernel).
    """
    return (
        type(input) is torch.Tensor
        and type(target) is torch.Tensor
        and input.ndim == 2
        and target.ndim == 1
        and input.dtype in _PLAIN_DTYPES
        and target.dtype is torch.int64
        and input.is_cpu
        and target.is_cpu
        and input.layout is torch.strided
        and target.layout is torch.strided
        and target.shape[0] == input.shape[0]
        and input.shape[1] > 0
        and type(ignore_index) is int
        and -(2**63) <= ignore_index < 2**63
        and type(label_smoothing) is float
        and 0.0 <= label_smoothing <= 1.0
        and type(reduction) is str
        and reduction in _PLAIN_REDUCTIONS
    )
