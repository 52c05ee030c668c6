"""How the CPU kernels are compiled: flags, on-disk cache names, serial/parallel twins.

* :data:`OPTIONS` for loops LLVM may vectorise and reassociate, and
  :data:`EXACT` for code that must be evaluated as written (range
  reductions, ``(x - m) - log_s``): with ``reassoc`` LLVM rewrote
  ``(x - m) - log_s`` as ``x - (m + log_s)``, which rounds the sum at the
  magnitude of ``m``. The flags stay on the instructions after inlining.
* Numba's on-disk cache checks only the file that defines a function, while
  our kernels compile in code from every module of this package. Each cached
  kernel carries a digest of all of them in its cache name
  (:func:`renamed`), so an edit anywhere means fresh compiles.
* :func:`twins` compiles a kernel twice, parallel and serial: for small
  inputs waking the thread pool costs more than the work.
"""

import hashlib
from pathlib import Path
from types import FunctionType

from numba import njit
from numba.extending import overload
from numba.np.numpy_support import as_dtype

from . import config

OPTIONS = dict(fastmath=set(config.FASTMATH), cache=True, nogil=True, error_model="numpy")
EXACT = dict(fastmath=set(config.FASTMATH_EXACT), cache=True, nogil=True, error_model="numpy")


def _sources_tag() -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if not path.name.startswith("cuda"):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


TAG = _sources_tag()


def renamed(fn, suffix: str = ""):
    """A copy of ``fn`` whose qualified name, Numba's cache key, ends in ``suffix`` and :data:`TAG`."""
    copy = FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = f"{fn.__qualname__}{suffix}_{TAG}"
    copy.__doc__ = fn.__doc__
    return copy


def exact(fn):
    """``njit`` with the :data:`EXACT` flags, cached under a :func:`renamed` name."""
    return njit(**EXACT)(renamed(fn))


def inline(fn):
    """A helper inlined into the kernels that call it (:data:`OPTIONS` flags)."""
    return njit(inline="always", **OPTIONS)(fn)


def twins(fn):
    """``{True: parallel, False: serial}`` compilations of the kernel ``fn``, cached apart."""
    return {True: njit(parallel=True, **OPTIONS)(renamed(fn)), False: njit(**OPTIONS)(renamed(fn, "_serial"))}


def cast_like(value, array):
    """``value`` converted to the element type of ``array`` (inside jitted code)."""
    return array.dtype.type(value)


@overload(cast_like, inline="always")
def _cast_like_impl(value, array):
    to = as_dtype(array.dtype).type

    def impl(value, array):
        return to(value)

    return impl
