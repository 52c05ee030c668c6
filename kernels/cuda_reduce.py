r"""Reductions over a warp or a block, and the running log-sum-exp state they merge.

Every reduction leaves its result in every thread of the group: a butterfly
of ``shfl_xor_sync`` inside each warp, then (block reductions) lane 0 of
each warp writes to shared memory and every thread folds the warps' values
in the same order, so all threads agree bit for bit. Every thread of the
group must call them: they synchronise the warp (and the block).

The running state of a row is :math:`(m, s)` with :math:`m` the largest
element seen and :math:`s = \sum e^{x - m}` over the elements seen, starting
from :math:`(-\infty, 0)`; :func:`Reducers.lse_merge` merges two. NaN
follows PyTorch's two-pass form: a NaN or ``+inf`` element makes
:math:`s` NaN, ``-inf`` elements add nothing, and a row of ``-inf`` only
ends with :math:`s = 0` (its softmax ``exp(-inf - -inf)`` is NaN, as in
torch).
"""

import math
from dataclasses import dataclass
from functools import lru_cache

from numba import cuda
from numba.cuda.types import int64

from .cuda_codec import codec, device

FULL_MASK = 0xFFFFFFFF
WARP = 32
#: Most warps in a block (1024 threads): the size of the shared arrays of a block reduction.
MAX_WARPS = 32


@device
def warp_row(n_rows):
    """``(lane, row, active)`` for warp-per-row kernels: this thread's lane, its warp's row (64-bit), whether it exists."""
    tid = cuda.threadIdx.x
    row = int64(cuda.blockIdx.x) * (cuda.blockDim.x // WARP) + tid // WARP
    return tid % WARP, row, row < n_rows


@dataclass(frozen=True)
class Reducers:
    """Device functions for one accumulation type (see the module docstring)."""

    neg_inf: object
    zero: object
    max_: object  # NaN-skipping max of two values
    lse_merge: object  # (m, s) of two partial rows -> (m, s) of both
    warp_max: object
    warp_sum: object
    warp_lse: object
    block_max: object  # (v, sm): sm a shared array of MAX_WARPS
    block_sum: object
    block_lse: object  # (m, s, sm_m, sm_s)


@lru_cache(maxsize=None)
def reducers(dtype: str) -> Reducers:
    """The :class:`Reducers` for rows of storage dtype ``dtype`` (float64 rows accumulate in float64, others in float32)."""
    cd = codec(dtype)
    acc, exp = cd.acc, cd.exp
    neg_inf = acc(-math.inf)
    zero = acc(0.0)

    @device
    def max_(a, b):
        # NaN-skipping, like PTX max.f32: a NaN reaches the result through the sum instead
        return b if b > a else a

    @device
    def add(a, b):
        return a + b

    @device
    def lse_merge(m1, s1, m2, s2):
        if m2 > m1:
            m1, s1, m2, s2 = m2, s2, m1, s1
        if m2 == neg_inf:  # nothing finite on that side: it adds its 0 (or its NaN)
            return m1, s1 + s2
        return m1, s1 + s2 * exp(m2 - m1)

    def warp_reduce(combine):
        @device
        def reduce(v):
            offset = WARP // 2
            while offset > 0:
                v = combine(v, cuda.shfl_xor_sync(FULL_MASK, v, offset))
                offset //= 2
            return v

        return reduce

    warp_max = warp_reduce(max_)
    warp_sum = warp_reduce(add)

    @device
    def warp_lse(m, s):
        offset = WARP // 2
        while offset > 0:
            m, s = lse_merge(m, s, cuda.shfl_xor_sync(FULL_MASK, m, offset), cuda.shfl_xor_sync(FULL_MASK, s, offset))
            offset //= 2
        return m, s

    def block_reduce(combine, in_warp):
        @device
        def reduce(v, sm):
            v = in_warp(v)
            tid = cuda.threadIdx.x
            cuda.syncthreads()  # the previous reduction's readers are done with sm
            if tid % WARP == 0:
                sm[tid // WARP] = v
            cuda.syncthreads()
            v = sm[0]
            for w in range(1, cuda.blockDim.x // WARP):
                v = combine(v, sm[w])
            return v

        return reduce

    @device
    def block_lse(m, s, sm_m, sm_s):
        m, s = warp_lse(m, s)
        tid = cuda.threadIdx.x
        cuda.syncthreads()
        if tid % WARP == 0:
            sm_m[tid // WARP] = m
            sm_s[tid // WARP] = s
        cuda.syncthreads()
        m = sm_m[0]
        s = sm_s[0]
        for w in range(1, cuda.blockDim.x // WARP):
            m, s = lse_merge(m, s, sm_m[w], sm_s[w])
        return m, s

    return Reducers(
        neg_inf=neg_inf,
        zero=zero,
        max_=max_,
        lse_merge=lse_merge,
        warp_max=warp_max,
        warp_sum=warp_sum,
        warp_lse=warp_lse,
        block_max=block_reduce(max_, warp_max),
        block_sum=block_reduce(add, warp_sum),
        block_lse=block_lse,
    )
