"""Which kernels an array goes to, and how results go back to the caller's kind of array.

* NumPy arrays (and Python numbers and lists, taken with ``np.asarray``):
  the CPU kernels (:data:`CPU`).
* Arrays exporting ``__cuda_array_interface__`` (CuPy's, numba's device
  arrays): the CUDA kernels, zero-copy, on CuPy's current stream, outputs
  allocated by CuPy (:mod:`._cuda`); the results are CuPy arrays.
* Any other array with ``__dlpack__`` (JAX, PyTorch, ...): taken through
  DLPack, zero-copy, as a NumPy array when it lives in host memory and as a
  CuPy array when it lives on a CUDA device; the results are handed back
  through DLPack as arrays of the caller's own kind (its array namespace's
  ``from_dlpack``).

Nothing here imports torch, CuPy or numba-cuda until an array of theirs
arrives.
"""

import importlib
import sys

import numpy as np

from ..backends import pool as _pool
from ..errors import ArgumentError, DeviceError, NotATensorError, UnsupportedDTypeError
from . import _layout
from ._checks import type_name

#: DLPack device types: host memory, and CUDA memory
_DLPACK_HOST = (1, 3)  # kDLCPU, kDLCUDAHost
_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged


class CPUDevice:
    """The CPU kernels (:mod:`fastsoftmax.backends.cpu`) on NumPy arrays."""

    name = "cpu"
    xp = np
    allow_middle = True
    #: whether outputs of a reduced loss / log-sum-exp of 0-d come back as NumPy scalars (as SciPy's do)
    scalars = True

    @staticmethod
    def backend():
        from ..backends import cpu

        return cpu

    @staticmethod
    def empty(shape, dtype):
        return _pool.empty(shape, dtype)

    @staticmethod
    def run(kernel, ins, outs, *extra):
        _layout.run(kernel, ins, outs, *extra)

    @staticmethod
    def compute_dtype(dtype):
        """float16 and bfloat16 are computed in float32."""
        dtype = np.dtype(dtype)
        return dtype if dtype in _layout.KERNEL_DTYPES else np.dtype(np.float32)

    @staticmethod
    def take_other(value, name: str, fn: str):
        """A second array argument (target, weight, dy, b, out) for the CPU: NumPy, DLPack from host memory, a list."""
        if hasattr(value, "__cuda_array_interface__"):
            raise DeviceError(f"fastsoftmax: {fn}(): {name} is a CUDA array but the input is in host memory")
        if isinstance(value, np.ndarray):
            return value
        if hasattr(value, "__dlpack__") and not isinstance(value, np.generic):
            return _from_dlpack_host(value, name, fn)
        return np.asarray(value)

    @staticmethod
    def scipy_log_softmax(xk, yk, kind: str) -> None:
        """SciPy's log-softmax of slices holding ``+inf`` and no NaN: NaN at each ``+inf``, ``-inf`` elsewhere.

        The kernels make such a slice NaN throughout (PyTorch's rule), so
        only slices whose first output is NaN are looked at again: one
        element per slice is read, and the slices found are read whole.
        """
        if yk.shape[1] == 0:
            return
        if kind == "rows":
            xs, ys, index = xk, yk, np.flatnonzero(np.isnan(yk[:, 0]))
        else:
            xs, ys = xk.transpose(0, 2, 1), yk.transpose(0, 2, 1)  # (O, I, C) views
            index = tuple(np.nonzero(np.isnan(yk[:, 0, :])))
        if not len(index[0] if kind != "rows" else index):
            return
        rows = xs[index]
        fix = ~np.isnan(rows).any(axis=-1) & (rows == np.inf).any(axis=-1)
        if fix.any():
            chosen = tuple(i[fix] for i in index) if kind != "rows" else index[fix]
            ys[chosen] = np.where(xs[chosen] == np.inf, np.nan, -np.inf)


CPU = CPUDevice()


def _cupy():
    """The cupy module, or an error that says what CUDA arrays need."""
    try:
        return importlib.import_module("cupy")
    except ImportError as error:
        raise DeviceError(
            "fastsoftmax: CUDA arrays are computed through CuPy and numba-cuda: pip install cupy-cuda12x "
            "(or cupy-cuda13x) and 'fastsoftmax[cuda12]' (or [cuda13])"
        ) from error


def cuda_device():
    """The device for CUDA arrays (built on first use: it imports CuPy and numba-cuda)."""
    from ._cuda import CUDADevice

    return CUDADevice.default()


def _from_dlpack_host(value, name: str, fn: str):
    try:
        return np.from_dlpack(value)
    except (BufferError, RuntimeError, TypeError, ValueError) as error:
        if "bfloat16" in str(getattr(value, "dtype", "")).lower():
            raise UnsupportedDTypeError(
                f"fastsoftmax: {fn}(): {name} is a bfloat16 array, which NumPy cannot take through DLPack; "
                "convert it to float32 first"
            ) from error
        raise ArgumentError(f"fastsoftmax: {fn}(): {name} could not be taken through DLPack: {error}") from error


def namespace_of(value):
    """The module whose ``from_dlpack`` makes arrays of ``value``'s kind."""
    get = getattr(value, "__array_namespace__", None)
    if get is not None:
        try:
            return get()
        except Exception:  # noqa: BLE001 - an array API version it does not speak: fall back on its module
            pass
    return sys.modules[type(value).__module__.partition(".")[0]]


def _identity(result):
    return result


class Taken:
    """An argument taken for the kernels: the array they read, the device, and the way results go back."""

    def __init__(self, array, device, back=_identity):
        self.array = array
        self.device = device
        self.back = back


def take(value, name: str, fn: str) -> Taken:
    """The first array argument of a call: it picks the device."""
    if hasattr(value, "__cuda_array_interface__"):  # before the ndarray test: a device array may subclass it
        device = cuda_device()
        return Taken(device.as_array(value), device)
    if isinstance(value, np.ndarray):
        return Taken(value, CPU)
    if hasattr(value, "__dlpack__") and not isinstance(value, np.generic):
        kind = value.__dlpack_device__()[0]
        namespace = namespace_of(value)

        def back(result):
            return namespace.from_dlpack(result)

        if kind in _DLPACK_HOST:
            return Taken(_from_dlpack_host(value, name, fn), CPU, back)
        if kind in _DLPACK_CUDA:
            device = cuda_device()
            return Taken(device.from_dlpack(value), device, back)
        raise DeviceError(f"fastsoftmax: {fn}(): {name} lives on DLPack device type {kind}; only host memory and CUDA are supported")
    if value is None or isinstance(value, (str, bytes, dict, set)):
        raise NotATensorError(f"fastsoftmax: {fn}(): argument '{name}' must be an array, not {type_name(value)}")
    try:
        return Taken(np.asarray(value), CPU)
    except (TypeError, ValueError) as error:
        raise NotATensorError(f"fastsoftmax: {fn}(): argument '{name}' must be an array, not {type_name(value)}") from error


def give_back(taken: Taken, result):
    """``result`` (an array, a tuple of arrays or None) in the caller's kind; 0-d NumPy results as NumPy scalars."""
    if isinstance(result, tuple):
        return tuple(give_back(taken, r) for r in result)
    if result is None:
        return None
    if taken.back is not _identity:
        return taken.back(result)
    if taken.device.scalars and isinstance(result, np.ndarray) and result.ndim == 0:
        return result[()]
    return result
