"""CuPy arrays on the CUDA kernels: zero-copy, on CuPy's current stream, outputs allocated by CuPy.

Each array is handed to numba-cuda as a view of the same memory
(``numba.cuda.as_cuda_array(a, sync=False)``: no wait on the exporter's
stream), and every kernel is launched on ``cupy.cuda.get_current_stream()``
wrapped with ``numba.cuda.external_stream``. Layout changes (moving the
reduced axes last, broadcasting ``b``) are CuPy operations on the same
stream. Nothing here synchronises with the host, except the class-index
check of the cross-entropy (``config.CUDA_CHECK_TARGETS``).

The softmax and cross-entropy launches go through :mod:`fastsoftmax.backends.cuda`
in its array-and-stream form (``softmax_forward(x, y, log, stream)``,
``cross_entropy_index(x, target, weight, ignore_index, eps, reduction, loss,
out, saved, stream, check)`` and their backwards); log-sum-exp runs
:mod:`fastsoftmax.kernels.cuda_lse`. The weighted log-sum-exp (``b=``) is
CuPy elementwise operations and reductions, a slower path.
"""

import numpy as np

from ..errors import DeviceError
from ..kernels import config

#: Columns of the saved row statistics of the CUDA cross-entropy: ``m``, ``s``, ``A`` per row (and the denominator).
_STATS_COLUMNS = 3


class CUDADevice:
    """The CUDA kernels on CuPy arrays; ``backend`` the CUDA backend module, ``view`` and ``stream`` the numba glue."""

    name = "cuda"
    allow_middle = False
    scalars = False
    _default = None

    def __init__(self, cupy, backend, view, stream, lse_kernel, lse_threads: int = 256):
        self.xp = cupy
        self._backend = backend
        self._view = view
        self._stream = stream
        self._lse_kernel = lse_kernel
        self._lse_threads = lse_threads

    @classmethod
    def default(cls):
        if cls._default is None:
            from ._devices import _cupy

            cupy = _cupy()  # first: without CuPy, say what to install

            from numba import cuda

            from ..backends import cuda as backend
            from ..kernels import cuda as kernels
            from ..kernels import cuda_lse

            def view(a):
                return None if a is None else cuda.as_cuda_array(a, sync=False)

            def stream():
                handle = cupy.cuda.get_current_stream().ptr
                return cuda.external_stream(handle) if handle else 0

            def lse_kernel(dtype: str):
                return kernels.get("logsumexp", dtype)  # built for cuda_lse.THREADS threads

            cls._default = cls(cupy, backend, view, stream, lse_kernel, cuda_lse.THREADS)
        return cls._default

    # --- arrays ---------------------------------------------------------------

    def as_array(self, value):
        return value if isinstance(value, self.xp.ndarray) else self.xp.asarray(value)

    def from_dlpack(self, value):
        return self.xp.from_dlpack(value)

    def take_other(self, value, name: str, fn: str):
        if isinstance(value, self.xp.ndarray) or hasattr(value, "__cuda_array_interface__"):
            return self.as_array(value)
        if isinstance(value, np.ndarray):
            raise DeviceError(f"fastsoftmax: {fn}(): {name} is a NumPy array but the input is on a CUDA device")
        if hasattr(value, "__dlpack__") and not isinstance(value, np.generic):
            return self.from_dlpack(value)
        return self.xp.asarray(value)

    def empty(self, shape, dtype):
        return self.xp.empty(shape, dtype=dtype)

    @staticmethod
    def compute_dtype(dtype):
        return np.dtype(dtype)

    @staticmethod
    def run(kernel, ins, outs, *extra):
        kernel(*ins, *outs, *extra)

    @staticmethod
    def scipy_log_softmax(xk, yk, kind: str) -> None:
        """Not on CUDA: finding such slices would wait for the device (see :func:`fastsoftmax.array.log_softmax`)."""

    def backend(self):
        return self

    # --- the kernels, as the array API calls them -------------------------------

    def softmax_forward(self, x, y, log: bool) -> None:
        self._backend.softmax_forward(self._view(x), self._view(y), log, stream=self._stream())

    def softmax_backward(self, y, dy, dx, log: bool) -> None:
        self._backend.softmax_backward(self._view(y), self._view(dy), self._view(dx), log, stream=self._stream())

    def logsumexp(self, x, out) -> None:
        """``out[i] = logsumexp(x[i])`` (float64) by :mod:`fastsoftmax.kernels.cuda_lse`."""
        if not x.shape[0]:
            return
        kernel = self._lse_kernel(np.dtype(x.dtype).name)
        blocks = min(x.shape[0], 65535)
        kernel[blocks, self._lse_threads, self._stream()](self._view(x), self._view(out))

    def logsumexp_weighted(self, x, b, out, sign) -> None:
        """SciPy's weighted log-sum-exp in CuPy operations on the current stream (terms with ``b = 0`` left out)."""
        xp = self.xp
        x64, b64 = x.astype(xp.float64), b.astype(xp.float64)
        kept = xp.where(b64 != 0, x64, -xp.inf)
        m = xp.nanmax(kept, axis=1, keepdims=True) if kept.shape[1] else xp.full((kept.shape[0], 1), -xp.inf)
        finite = xp.isfinite(m)
        shift = xp.where(finite, m, 0.0)
        terms = xp.where(finite & (b64 == 0), 0.0, b64 * xp.exp(xp.where(finite, kept, x64) - shift))
        total = terms.sum(axis=1)
        sign[...] = xp.sign(total)
        out[...] = xp.where(total == 0, -xp.inf, shift[:, 0] + xp.log(xp.abs(total)))

    def cross_entropy(self, x, t, q, w, ignore_index: int, reduction: str, eps: float, return_grad: bool):
        """``(loss, grad or None)`` for rows ``x`` (R, C): the forward, then the backward for a unit gradient of the loss."""
        xp = self.xp
        n_rows = x.shape[0]
        acc = xp.float64 if x.dtype == xp.float64 else xp.float32
        w = None if w is None else w.astype(acc)
        loss_rows = xp.empty((n_rows,), acc)
        saved = xp.empty((n_rows + 1, _STATS_COLUMNS), acc)
        out = xp.empty((1,), x.dtype) if reduction != "none" else None
        v, stream = self._view, self._stream()
        if q is None:
            self._backend.cross_entropy_index(
                v(x), v(t), v(w), ignore_index, eps, reduction, v(loss_rows), v(out), v(saved), stream, config.CUDA_CHECK_TARGETS
            )
        else:
            self._backend.cross_entropy_prob(v(x), v(q), v(w), eps, reduction, v(loss_rows), v(out), v(saved), stream)
        loss = out.reshape(()) if out is not None else loss_rows.astype(x.dtype)
        if not return_grad:
            return loss, None
        grad = xp.empty(x.shape, x.dtype)
        ones = xp.ones((1,) if reduction != "none" else (n_rows,), x.dtype)
        if q is None:
            self._backend.cross_entropy_index_backward(
                v(x), v(t), v(w), ignore_index, eps, reduction, v(saved), v(ones), v(grad), stream
            )
        else:
            self._backend.cross_entropy_prob_backward(v(x), v(q), v(w), eps, reduction, v(saved), v(ones), v(grad), stream)
        return loss, grad
