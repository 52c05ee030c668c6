r"""CUDA kernel of the array API: log-sum-exp along the rows of a 2-D array, one read.

.. math:: \mathrm{logsumexp}(x) = m + \log \textstyle\sum_j e^{x_j - m}, \qquad m = \max_j x_j

One block per row (a grid-stride loop over rows): each thread folds its
elements (``j = thread, thread + T, ...``, so that a warp reads consecutive
elements) into a running pair ``(m, s)``, and the block merges the pairs in
a shared-memory tree (:func:`.rowmath.lse_merge`), which the CUDA simulator
runs too. The special values are SciPy's, not PyTorch's: NaN anywhere gives
NaN, else ``+inf`` gives ``+inf``; ``-inf`` only, or no elements, ``-inf``.
Each thread keeps two flags for NaN and ``+inf`` beside its pair, and folds
only the other elements. float16 is read as float16; the pairs accumulate
in float32 (float64 for float64 rows); the result is written in float64.

Self-contained (numba-cuda and :mod:`.rowmath` only, and the dtypes' short
names of :mod:`.cuda_codec`), so that it does not depend on how the softmax
kernels' helpers are laid out. It is compiled
like the others, by :func:`kernels.cuda.get` (family ``logsumexp``, with
its launch bounds), and gated offline with them; its only float64
instructions in a float32 or float16 kernel are those of the float64
result (see ``tests/test_cuda_offline.py``).
"""

import math
from functools import lru_cache

from numba import cuda
from numba.cuda.types import float16, float32, float64, int32, void

from . import rowmath
from .cuda_codec import SHORT

_device = cuda.jit(device=True, inline="always")
_lse_merge = _device(rowmath.lse_merge)

DTYPES = {"float32": float32, "float64": float64, "float16": float16}

#: Threads per block (one block per row): 8 warps, enough loads in flight to stream a long row.
THREADS = 256


@lru_cache(maxsize=None)
def logsumexp_rows(dtype: str, threads: int):
    """The kernel ``(x, out)``: ``out[i] = logsumexp(x[i, :])`` for ``x`` (R, C) of ``dtype``, ``out`` (R,) float64.

    Launch with ``threads`` threads per block (a power of two).
    """
    acc = float64 if dtype == "float64" else float32
    neg_inf = -math.inf
    pos_inf = math.inf

    def kernel(x, out):
        n_rows, n_cols = x.shape
        tid = cuda.threadIdx.x
        sm_m = cuda.shared.array(threads, acc)
        sm_s = cuda.shared.array(threads, acc)
        sm_f = cuda.shared.array(threads, int32)
        for r in range(cuda.blockIdx.x, n_rows, cuda.gridDim.x):
            m = acc(neg_inf)
            s = acc(0.0)
            flags = 0
            for j in range(tid, n_cols, threads):
                v = acc(x[r, j])
                if v != v:
                    flags |= 1
                elif v == pos_inf:
                    flags |= 2
                elif v > m:
                    s = s * math.exp(m - v) + acc(1.0)
                    m = v
                elif v != neg_inf:
                    s += math.exp(v - m)
            sm_m[tid] = m
            sm_s[tid] = s
            sm_f[tid] = flags
            cuda.syncthreads()
            stride = threads // 2
            while stride > 0:
                if tid < stride:
                    m2, s2 = _lse_merge(sm_m[tid], sm_s[tid], sm_m[tid + stride], sm_s[tid + stride])
                    sm_m[tid] = m2
                    sm_s[tid] = s2
                    sm_f[tid] |= sm_f[tid + stride]
                cuda.syncthreads()
                stride //= 2
            if tid == 0:
                f = sm_f[0]
                if f & 1:
                    out[r] = math.nan
                elif f & 2:
                    out[r] = pos_inf
                elif sm_s[0] > 0:
                    out[r] = float64(sm_m[0]) + math.log(float64(sm_s[0]))
                else:
                    out[r] = neg_inf
            cuda.syncthreads()

    # the name a profiler shows: op, dtype, launch shape (one block per row)
    kernel.__name__ = kernel.__qualname__ = kernel_name(dtype)
    return kernel


def kernel_name(dtype: str) -> str:
    """``logsumexp_f32_block``."""
    return f"logsumexp_{SHORT[dtype]}_block"


def signature(dtype: str):
    """The kernel's exact signature, for ``cuda.jit`` and ``compile_ptx``."""
    return void(DTYPES[dtype][:, ::1], float64[::1])


def spec(dtype: str):
    """``(name, pyfunc, signature, max_threads)`` of the kernel launched with :data:`THREADS` threads (see :func:`kernels.cuda.spec`)."""
    return kernel_name(dtype), logsumexp_rows(dtype, THREADS), signature(dtype), THREADS
