"""The CUDA backend: torch CUDA tensors in, kernels of :mod:`fastsoftmax.kernels.cuda` on torch's stream.

Zero-copy: each tensor is handed to numba-cuda through its
``__cuda_array_interface__`` (bfloat16 as its ``uint16`` bits), without the
stream synchronisation numba would otherwise insert, and every kernel is
launched on ``torch.cuda.current_stream()``. Outputs are allocated by torch
(its caching allocator). Nothing here synchronises with the host, except the
target check of :func:`cross_entropy_index` when
``config.CUDA_CHECK_TARGETS`` is on and no CUDA graph is being captured.
"""

import numpy as np
import torch

try:
    from numba import cuda
    from numba.cuda.cudadrv.error import CudaSupportError  # noqa: F401  (present only with numba-cuda)

    from ..kernels import cuda as kernels
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError(
        "fastsoftmax: CUDA tensors need numba-cuda and the CUDA toolkit wheels: "
        "pip install 'fastsoftmax[cuda12]' or 'fastsoftmax[cuda13]' (matching your driver)"
    ) from error

from ..errors import bad_target
from ..kernels import config

_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _array(t: torch.Tensor):
    if t.dtype == torch.bfloat16:
        t = t.view(torch.uint16)
    return cuda.as_cuda_array(t.detach(), sync=False)


def _stream(t: torch.Tensor):
    return cuda.external_stream(torch.cuda.current_stream(t.device).cuda_stream)


def _launch(t: torch.Tensor, make, n_rows: int, n_cols: int, *args) -> None:
    """Build (or fetch) the kernel for ``t``'s dtype and this row length, and launch it."""
    group, threads, items = kernels.plan(n_cols)
    kernel = kernels.jit(make(_NAMES[t.dtype], group, threads, items, config.CUDA_USE_SHUFFLE))
    with torch.cuda.device(t.device):
        kernel[kernels.grid(n_rows, group, threads), threads, _stream(t)](*args)


def softmax_forward(x, y, log: bool) -> None:
    def make(dtype, group, threads, items, shuffle):
        return kernels.softmax_forward(dtype, log, group, threads, items, shuffle)

    _launch(x, make, *x.shape, _array(x), _array(y))


def softmax_backward(y, dy, dx, log: bool) -> None:
    def make(dtype, group, threads, items, shuffle):
        return kernels.softmax_backward(dtype, log, group, threads, items, shuffle)

    _launch(y, make, *y.shape, _array(y), _array(dy), _array(dx))


def _weight(weight, x):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if weight is None:
        return torch.empty(1, dtype=acc, device=x.device), False
    return weight.to(acc).contiguous(), True


def _acc_scalar(value: float, dtype: torch.dtype):
    """A Python float as the kernel's accumulation type (the kernels are typed by it)."""
    return (np.float64 if dtype == torch.float64 else np.float32)(value)


def _scale(denom: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction != "mean":
        return torch.ones(1, dtype=torch.float64, device=denom.device)
    return torch.where(denom > 0, 1.0 / denom, torch.zeros_like(denom)).reshape(1)


def cross_entropy_index(x, target, weight, ignore_index, eps, reduction, loss, grad):
    """Runs the fused kernel; returns the mean's denominator as a 0-d device tensor (no sync)."""
    n_rows, n_cols = x.shape
    kept = target != ignore_index
    safe = torch.where(kept, target, torch.zeros_like(target)).clamp_(0, n_cols - 1)
    w, has_w = _weight(weight, x)
    denom = (w[safe].double() * kept).sum() if has_w else kept.sum().double()
    if config.CUDA_CHECK_TARGETS and not torch.cuda.is_current_stream_capturing():
        bad = kept & ((target < 0) | (target >= n_cols))
        if bool(bad.any()):  # the one host synchronisation, opt-out via config
            position = int(bad.nonzero()[0, 0])
            raise bad_target(int(target[position]), position, n_cols, ignore_index)
    if n_rows:
        want_grad = grad.shape[0] > 0
        g = grad if want_grad else torch.empty((1, n_cols), dtype=x.dtype, device=x.device)

        def make(dtype, group, threads, items, shuffle):
            return kernels.cross_entropy_index(dtype, group, threads, items, shuffle)

        _launch(
            x, make, n_rows, n_cols,
            _array(x), _array(target), _array(w), has_w, ignore_index,
            _acc_scalar(eps, w.dtype), _array(_scale(denom, reduction)), _array(loss), _array(g), want_grad,
        )
    return denom


def cross_entropy_prob(x, q, weight, eps, reduction, loss, grad):
    n_rows, n_cols = x.shape
    denom = float(n_rows)
    if n_rows:
        w, has_w = _weight(weight, x)
        want_grad = grad.shape[0] > 0
        g = grad if want_grad else torch.empty((1, n_cols), dtype=x.dtype, device=x.device)
        scale = torch.full((1,), 1.0 / denom if reduction == "mean" else 1.0, dtype=torch.float64, device=x.device)

        def make(dtype, group, threads, items, shuffle):
            return kernels.cross_entropy_prob(dtype, group, threads, shuffle)

        _launch(
            x, make, n_rows, n_cols,
            _array(x), _array(q), _array(w), has_w, _acc_scalar(eps, w.dtype), _array(scale), _array(loss), _array(g), want_grad,
        )
    return denom


def scale_rows(src, factor, out) -> None:
    n_rows, n_cols = src.shape
    kernel = kernels.jit(kernels.scale_rows(_NAMES[src.dtype]))
    threads = config.CUDA_THREADS_PER_BLOCK
    blocks = max(1, min(-(-n_rows * n_cols // threads), 65535))
    with torch.cuda.device(src.device):
        kernel[blocks, threads, _stream(src)](_array(src), _array(factor), _array(out))
