"""Tensors to the layouts the kernels take, and back: the torch side shared by every op.

The row kernels see one layout only: a C-contiguous ``(R, C)`` array in the
compute dtype with the reduced dimension last. :func:`rows_last` brings any
tensor to it (``movedim`` + ``contiguous``: a copy only when the reduced
dimension is not already last and dense). On the CPU a reduced dimension
that is not last, with enough positions after it, goes instead to kernels
that reduce it in place (:func:`middle_shape`: an ``(outer, C, inner)``
view, no copies).

:func:`device` picks, by the tensor's device, the backend that launches the
kernels, the dtype they compute in, the allocator of outputs and the view of
a tensor that the backend takes.
"""

import contextlib
import functools
import math

import numpy as np
import torch

from ..kernels import config
from . import pool

#: The CPU kernels compute in float32 or float64: half-precision inputs are
#: converted to float32 first and results converted back. The CUDA kernels
#: read and write every float dtype natively.
_CPU_COMPUTE = {
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
}


def import_cpu_backend():
    """The CPU backend, imported on first use (it loads Numba and the kernels) and kept in :data:`CPU_BACKEND`.

    Hot paths read ``layout.CPU_BACKEND or layout.import_cpu_backend()``:
    at 256 x 10 with cold caches, an import statement or one more Python
    call on every op costs a fifth of the kernel.
    """
    global CPU_BACKEND
    from ..backends import cpu

    CPU_BACKEND = cpu
    return cpu


CPU_BACKEND = None


def numpy_of(t: torch.Tensor) -> np.ndarray:
    """A NumPy array of a CPU tensor's values, to read: its memory, shared, wherever the memory holds the values.

    A negative view (``torch._neg_view``: its memory holds the values
    negated) and an efficient zero tensor (autograd's ``_efficientzerotensor``:
    no memory at all, ``data_ptr()`` 0) are copied first. Outputs are
    written through ``.numpy()`` of fresh tensors, never through this.
    """
    if t._is_zerotensor():
        return torch.zeros(t.shape, dtype=t.dtype).numpy()
    return t.numpy(force=True)


class _CPU:
    name = "cpu"

    @staticmethod
    def backend():
        return CPU_BACKEND or import_cpu_backend()

    @staticmethod
    def compute_dtype(dtype: torch.dtype) -> torch.dtype:
        return _CPU_COMPUTE[dtype]

    @staticmethod
    def empty(shape, dtype: torch.dtype, device=None) -> torch.Tensor:
        return pool.empty(shape, dtype)

    @staticmethod
    def empty_array(shape, dtype: torch.dtype) -> tuple:
        """A small uninitialised float32/64 output as ``(tensor, its NumPy array)``, made by NumPy.

        One call into torch fewer than :meth:`empty` and then ``.numpy()``;
        at the book's 256 x 10, with the caches cold as a training step
        leaves them, each such call costs 10-15 us, more than the kernel.
        For outputs below ``config.POOL_MIN_BYTES`` (the pool's threshold).
        """
        a = np.empty(shape, pool.NUMPY_DTYPES[dtype])
        return torch.from_numpy(a), a

    @staticmethod
    def array(t: torch.Tensor):
        """The NumPy view the CPU backend takes (shares memory; see :func:`numpy_of` for the tensors it copies)."""
        return numpy_of(t)

    @staticmethod
    def middle_shape(x: torch.Tensor, dim: int):
        """``(outer, C, inner)`` when the middle-axis kernels should reduce ``dim`` of ``x`` in place, else None.

        They are used when ``dim`` is not last, moving it last would copy (so
        not for a channels-last tensor and ``dim=1``, whose classes are
        already stored last), and there are at least
        :data:`config.CPU_MIDDLE_MIN_INNER` inner positions to vectorise over.
        """
        if dim == x.ndim - 1 or x.movedim(dim, -1).is_contiguous():
            return None
        inner = math.prod(x.shape[dim + 1 :])
        if inner < config.CPU_MIDDLE_MIN_INNER:
            return None
        return math.prod(x.shape[:dim]), x.shape[dim], inner


class _CUDA:
    """CUDA tensors: the torch-free :mod:`fastsoftmax.backends.cuda`, on torch's current stream.

    Tensors reach the backend as numba device arrays over the same memory
    (:meth:`array`: no copy, no stream synchronisation; bfloat16 as its
    ``uint16`` bits), and each launch goes to the current torch stream of
    the arrays' device (:func:`launch_scope`). The kernels read and write
    every float dtype natively.
    """

    name = "cuda"

    @staticmethod
    def backend():
        return _CudaRows

    @staticmethod
    def kernels():
        """The torch-free backend itself, for the ops that pass streams themselves (cross-entropy)."""
        from ..backends import cuda

        return cuda

    @staticmethod
    def compute_dtype(dtype: torch.dtype) -> torch.dtype:
        return dtype

    @staticmethod
    def empty(shape, dtype: torch.dtype, device=None) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    @staticmethod
    def array(t: torch.Tensor):
        """The numba device array over ``t``'s memory (bfloat16 as ``uint16``; no array interface knows it)."""
        from numba import cuda

        t = t.detach().resolve_neg()  # a negative view holds its values negated in memory
        if t._is_zerotensor():  # an efficient zero tensor has no memory (data_ptr 0)
            t = torch.zeros(t.shape, dtype=t.dtype, device=t.device)
        if t.dtype == torch.bfloat16:
            t = t.view(torch.uint16)
        with torch.cuda.device(t.device):
            return cuda.as_cuda_array(t, sync=False)

    @staticmethod
    def middle_shape(x: torch.Tensor, dim: int):
        return None


@contextlib.contextmanager
def launch_scope(array):
    """Run launches for ``array`` (from :meth:`_CUDA.array`) on its device, on torch's current stream there.

    Yields the numba stream to launch on; ``0`` for arrays that belong to no
    device (NumPy arrays in the CUDA simulator).
    """
    gpu_data = getattr(array, "gpu_data", None)
    if gpu_data is None:
        yield 0
        return
    index = gpu_data.context.device.id
    with torch.cuda.device(index):
        yield _external_stream(index, torch.cuda.current_stream(index).cuda_stream)


@functools.lru_cache(maxsize=64)
def _external_stream(index: int, handle: int):
    from numba import cuda

    return cuda.external_stream(handle)


class _CudaRows:
    """The CUDA backend with the CPU backend's row-kernel signatures (what :mod:`.softmax` calls)."""

    @staticmethod
    def softmax_forward(x, y, log: bool) -> None:
        with launch_scope(x) as stream:
            _CUDA.kernels().softmax_forward(x, y, log, stream)

    @staticmethod
    def softmax_backward(y, dy, dx, log: bool) -> None:
        with launch_scope(y) as stream:
            _CUDA.kernels().softmax_backward(y, dy, dx, log, stream)


def device(x: torch.Tensor):
    """The device policy for ``x``: :class:`_CPU` or :class:`_CUDA`."""
    return _CUDA if x.is_cuda else _CPU


def rows_last(x: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``x`` with ``dim`` moved last, contiguous, in ``dtype`` (each step skipped when it would change nothing)."""
    if dim != x.ndim - 1:
        x = x.movedim(dim, -1)
    if x.dtype != dtype:
        x = x.to(dtype)
    return x if x.is_contiguous() else x.contiguous()


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """The ``(R, C)`` view of a contiguous tensor whose last dim is the reduced one."""
    return x if x.ndim == 2 else x.view(math.prod(x.shape[:-1]), x.shape[-1])  # -1 is ambiguous for 0 columns


def to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def empty_moved(x: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor shaped like ``x``, its ``dim`` stored last (for the fake ops)."""
    shape = list(x.shape)
    shape.append(shape.pop(dim))
    out = torch.empty(shape, dtype=dtype, device=x.device)
    return out.movedim(-1, dim) if dim != x.ndim - 1 else out
