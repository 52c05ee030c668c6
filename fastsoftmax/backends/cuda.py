"""The CUDA backend: device arrays in, kernels of :mod:`fastsoftmax.kernels.cuda` launched on a given stream.

No torch here, as in :mod:`.cpu`. Every function takes CUDA arrays (numba
device arrays, or anything numba launches with: objects exporting
``__cuda_array_interface__``; NumPy arrays in the CUDA simulator), already
in the layout the kernels take: C-contiguous ``(R, C)`` rows of float32,
float64 or float16, or bfloat16 passed as its ``uint16`` bits (no array
interface knows bfloat16, so a ``uint16`` array here *is* bfloat16), and a
``stream`` (a numba stream, or ``0`` for the default stream). A caller
with its own streams wraps them: ``numba.cuda.external_stream(handle)``.

Nothing here waits for the device, except :func:`cross_entropy_index` when
asked to check the targets (``check_targets``): then one small copy to the
host tells whether a class index lies outside ``[0, C)``, so that the error
is raised before the loss kernels run.

The vectorised (16-byte) path of a kernel is taken when every row array of
the launch starts on a 16-byte boundary and rows are a whole number of
16-byte chunks; otherwise the same kernel reads and writes element by
element.
"""

import numpy as np

try:
    from numba import cuda
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError(
        "fastsoftmax: CUDA arrays need numba-cuda and the CUDA toolkit wheels: "
        "pip install 'fastsoftmax[cuda12]' or 'fastsoftmax[cuda13]' (matching your driver)"
    ) from error

from ..errors import bad_target
from ..kernels import cuda as kernels
from ..kernels.cuda_codec import codec
from ..kernels.cuda_cross_entropy import MEAN, NONE, SUM

#: The storage dtype of each array dtype (bfloat16 arrives as its uint16 bits).
_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64", np.dtype(np.float16): "float16", np.dtype(np.uint16): "bfloat16"}
_REDUCTIONS = {"none": NONE, "sum": SUM, "mean": MEAN}


def _address(a) -> int:
    interface = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
    return interface["data"][0]


def _aligned(n_cols: int, dtype: str, *arrays) -> bool:
    """Whether every row of every array starts on a 16-byte boundary: the kernels' vector path."""
    if n_cols % codec(dtype).vec:
        return False
    return all(a is None or _address(a) % 16 == 0 for a in arrays)


def _dtype(a) -> str:
    return _DTYPES[np.dtype(a.dtype)]


def _bits(a):
    """The array as the kernels take it: float16 as its uint16 bits (the kernels convert them themselves)."""
    return a.view(np.uint16) if a is not None and np.dtype(a.dtype) == np.float16 else a


def _acc_scalar(value: float, dtype: str):
    """A Python float as the kernels' accumulation type (their signatures are exact)."""
    return (np.float64 if dtype == "float64" else np.float32)(value)


def _grid(n_rows: int, rows_per_block: int) -> int:
    return -(-n_rows // rows_per_block)


def softmax_forward(x, y, log: bool, stream=0) -> None:
    """``y = softmax(x)`` (``log``: log-softmax) along the rows of ``x`` (R, C)."""
    n_rows, n_cols = x.shape
    if not n_rows or not n_cols:
        return
    dtype = _dtype(x)
    shape, threads, rows = kernels.softmax_plan(n_cols, dtype, log, backward=False)
    kernel = kernels.get("softmax_fwd", dtype, log, shape)
    x, y = _bits(x), _bits(y)
    kernel[_grid(n_rows, rows), threads, stream](x, y, _aligned(n_cols, dtype, x, y))


def softmax_backward(y, dy, dx, log: bool, stream=0) -> None:
    """The gradient ``dx`` of :func:`softmax_forward` from its output ``y`` and ``dy``."""
    n_rows, n_cols = y.shape
    if not n_rows or not n_cols:
        return
    dtype = _dtype(y)
    shape, threads, rows = kernels.softmax_plan(n_cols, dtype, log, backward=True)
    kernel = kernels.get("softmax_bwd", dtype, log, shape)
    y, dy, dx = _bits(y), _bits(dy), _bits(dx)
    kernel[_grid(n_rows, rows), threads, stream](y, dy, dx, _aligned(n_cols, dtype, y, dy, dx))


_PLACEHOLDERS = {}


def _placeholder_targets():
    """A one-element int64 device array for kernels that take targets they will not read (per context)."""
    key = id(cuda.current_context()) if not _simulated() else None
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = cuda.device_array(1, dtype=np.int64)
    return _PLACEHOLDERS[key]


def _simulated() -> bool:
    from numba.cuda.core import config

    return bool(config.ENABLE_CUDASIM)


def _to_host(a, stream):
    return a.copy_to_host(stream=stream) if hasattr(a, "copy_to_host") else np.asarray(a)


def check_targets(target, n_cols: int, ignore_index: int, stream=0) -> None:
    """Raise IndexError for the first class index outside ``[0, n_cols)`` that is not ``ignore_index``.

    The one host synchronisation of the CUDA path: a one-block scan, then
    the position (and that target) copied back.
    """
    if not target.shape[0]:
        return
    bad = cuda.device_array(1, dtype=np.int64, stream=stream)
    kernel = kernels.get("ce_check_targets")
    kernel[1, kernels.ONE_BLOCK_THREADS, stream](target, n_cols, ignore_index, bad)
    position = int(_to_host(bad, stream)[0])
    if position >= 0:
        value = int(_to_host(target[position : position + 1], stream)[0])
        raise bad_target(value, position, n_cols, ignore_index)


def _finish(x, loss, target, weight, n_cols, ignore_index, reduction, by_rows, saved, out, stream, dtype):
    """The reduced loss into ``out``, and the last row of ``saved`` (the mean's denominator).

    With ``reduction="none"`` the forward kernel writes that row itself,
    unless there are no rows.
    """
    if reduction == "none" and x.shape[0]:
        return
    kernel = kernels.get("ce_finish", dtype)
    has_w = weight is not None
    kernel[1, kernels.ONE_BLOCK_THREADS, stream](
        loss, target, weight if has_w else loss, has_w, n_cols, ignore_index, _REDUCTIONS[reduction], by_rows, saved,
        out if out is not None else x.reshape(-1),  # not written for "none"
    )


def cross_entropy_index(
    x, target, weight, ignore_index: int, eps: float, reduction: str, loss, out, saved,
    stream=0, check: bool = False,
) -> None:
    """Forward of the cross-entropy with class-index targets.

    ``x`` (R, C) logits, ``target`` (R,) int64, ``weight`` (C,) in the
    accumulation type or None. Writes ``loss`` (R,), the unreduced losses in
    the accumulation type; for ``reduction`` "mean" or "sum", ``out`` (1,)
    in ``x``'s dtype, the reduced loss; and ``saved`` (R + 1, 3), what
    :func:`cross_entropy_index_backward` needs: each row's ``(m, s, A)`` and,
    for "mean", the total weight of the kept targets in ``saved[R, 0]``.
    ``check``: raise IndexError for a bad target first (one synchronisation).
    """
    n_rows, n_cols = x.shape
    dtype = _dtype(x)
    if check:
        check_targets(target, n_cols, ignore_index, stream)
    x, out = _bits(x), _bits(out)
    has_w = weight is not None
    if n_rows:
        shape, threads, rows = kernels.ce_plan(n_cols, dtype)
        kernel = kernels.get("ce_fwd", dtype, shape)
        aligned = _aligned(n_cols, dtype, x, weight)
        kernel[_grid(n_rows, rows), threads, stream](
            x, target, weight if has_w else loss, has_w, ignore_index, _acc_scalar(eps, dtype), loss, saved, aligned
        )
    _finish(x, loss, target, weight, n_cols, ignore_index, reduction, False, saved, out, stream, dtype)


def cross_entropy_index_backward(
    x, target, weight, ignore_index: int, eps: float, reduction: str, saved, grad_out, grad,
    stream=0,
) -> None:
    """The gradient of :func:`cross_entropy_index`'s loss, from ``x`` and ``saved``, scaled by ``grad_out``.

    ``grad_out``: the loss's gradient, read on the device, in ``x``'s dtype:
    (R,) for "none", (1,) otherwise. Writes ``grad`` (R, C).
    """
    n_rows, n_cols = x.shape
    if not n_rows or not n_cols:
        return
    dtype = _dtype(x)
    x, grad_out, grad = _bits(x), _bits(grad_out), _bits(grad)
    has_w = weight is not None
    shape, threads, rows = kernels.ce_plan(n_cols, dtype)
    kernel = kernels.get("ce_bwd", dtype, shape)
    aligned = _aligned(n_cols, dtype, x, grad, weight)
    kernel[_grid(n_rows, rows), threads, stream](
        x, target, weight if has_w else saved[0], has_w, ignore_index, _acc_scalar(eps, dtype),
        _REDUCTIONS[reduction], saved, grad_out, grad, aligned,
    )


def cross_entropy_prob(x, q, weight, eps: float, reduction: str, loss, out, saved, stream=0) -> None:
    """Forward of the cross-entropy with class-probability targets ``q`` (R, C), in ``x``'s dtype.

    Outputs as in :func:`cross_entropy_index`; the mean is over rows.
    """
    n_rows, n_cols = x.shape
    dtype = _dtype(x)
    x, q, out = _bits(x), _bits(q), _bits(out)
    has_w = weight is not None
    if n_rows:
        shape, threads, rows = kernels.ce_plan(n_cols, dtype)
        kernel = kernels.get("ce_prob_fwd", dtype, shape)
        aligned = _aligned(n_cols, dtype, x, q, weight)
        kernel[_grid(n_rows, rows), threads, stream](
            x, q, weight if has_w else loss, has_w, _acc_scalar(eps, dtype), loss, saved, aligned
        )
    _finish(x, loss, _placeholder_targets(), weight, n_cols, -100, reduction, True, saved, out, stream, dtype)


def cross_entropy_prob_backward(
    x, q, weight, eps: float, reduction: str, saved, grad_out, grad, stream=0
) -> None:
    """The gradient of :func:`cross_entropy_prob`'s loss (arguments as in :func:`cross_entropy_index_backward`)."""
    n_rows, n_cols = x.shape
    if not n_rows or not n_cols:
        return
    dtype = _dtype(x)
    x, q, grad_out, grad = _bits(x), _bits(q), _bits(grad_out), _bits(grad)
    has_w = weight is not None
    shape, threads, rows = kernels.ce_plan(n_cols, dtype)
    kernel = kernels.get("ce_prob_bwd", dtype, shape)
    aligned = _aligned(n_cols, dtype, x, q, grad, weight)
    kernel[_grid(n_rows, rows), threads, stream](
        x, q, weight if has_w else saved[0], has_w, _acc_scalar(eps, dtype), _REDUCTIONS[reduction], saved, grad_out, grad, aligned
    )
