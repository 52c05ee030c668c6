"""Building blocks of the CUDA kernels: element codecs and reductions over a warp or a block.

* :func:`codec`: load an element in the accumulation type and store one
  rounded to the storage dtype (float16 natively; bfloat16 as its ``uint16``
  bits, since PyTorch exports no bfloat16 array interface).
* :func:`reducers`: max, sum and log-sum-exp pair reductions over each group
  of consecutive threads (a warp, or the whole block), by warp shuffles on
  hardware or by shared-memory trees (which the CUDA simulator can run).

Device functions are inlined into their callers at Numba IR level
(``inline="always"``). Besides saving a call, this lets ``compile_ptx``
build the kernels on a machine with no GPU: a separately compiled device
function asks the driver for the current device's compute capability.
"""

from functools import lru_cache

from numba import cuda
from numba.cuda.types import float16, float32, float64, int64, uint16

from . import rowmath

device = cuda.jit(device=True, inline="always")

online_update = device(rowmath.online_update)
lse_merge = device(rowmath.lse_merge)
ce_index_loss = device(rowmath.ce_index_loss)
ce_index_grad_coeffs = device(rowmath.ce_index_grad_coeffs)

#: Storage dtypes, by name, and the numba array element type each is passed as.
DTYPES = {"float32": float32, "float64": float64, "float16": float16, "bfloat16": uint16}

FULL_MASK = 0xFFFFFFFF
WARP = 32


# --- loading and storing each dtype in the accumulation type ------------------


@lru_cache(maxsize=None)
def codec(dtype: str):
    """``(load, store, acc)``: read an element as ``acc``, write an ``acc`` rounded to the storage dtype."""
    if dtype == "bfloat16":
        from numba.cuda import bf16

        @device
        def load(a, i, j):
            return bf16.bfloat162float(bf16.ushort_as_bfloat16(a[i, j]))

        @device
        def store(a, i, j, v):
            a[i, j] = bf16.bfloat16_as_ushort(bf16.float2bfloat16_rn(v))

        return load, store, float32
    acc = float64 if dtype == "float64" else float32
    elem = DTYPES[dtype]

    @device
    def load(a, i, j):
        return acc(a[i, j])

    @device
    def store(a, i, j, v):
        a[i, j] = elem(v)

    return load, store, acc


# --- reductions over a group of threads (a warp or the whole block) ------------


@device
def _add(a, b):
    return a + b


@device
def _max(a, b):
    # NaN-ignoring, like the CPU's maxnum: a NaN reaches the result through the sum instead
    return b if b > a else a


@lru_cache(maxsize=None)
def reducers(group: int, threads: int, use_shuffle: bool):
    """Device functions reducing over each ``group`` of consecutive threads of a block.

    ``max_(v, sm)``, ``sum_(v, sm)``, ``lse_(m, s, sm_m, sm_s)`` return the
    group's result to every thread of the group; ``sm*`` are shared arrays of
    ``threads`` elements. Every thread of the block must call them (they
    synchronise the block).
    """
    if not use_shuffle:
        return _tree(_max, group), _tree(_add, group), _tree_lse(group)
    if group == WARP:
        return _warp(_max), _warp(_add), _warp_lse()
    n_warps = threads // WARP
    return _block(_max, n_warps), _block(_add, n_warps), _block_lse(n_warps)


# shared-memory trees over each group: no shuffles, so the CUDA simulator runs them


def _tree(combine, group):
    @device
    def reduce(v, sm):
        tid = cuda.threadIdx.x
        lane = tid % group
        cuda.syncthreads()
        sm[tid] = v
        cuda.syncthreads()
        stride = group // 2
        while stride > 0:
            if lane < stride:
                sm[tid] = combine(sm[tid], sm[tid + stride])
            cuda.syncthreads()
            stride //= 2
        return sm[tid - lane]

    return reduce


def _tree_lse(group):
    @device
    def reduce(m, s, sm_m, sm_s):
        tid = cuda.threadIdx.x
        lane = tid % group
        cuda.syncthreads()
        sm_m[tid] = m
        sm_s[tid] = s
        cuda.syncthreads()
        stride = group // 2
        while stride > 0:
            if lane < stride:
                a, b = lse_merge(sm_m[tid], sm_s[tid], sm_m[tid + stride], sm_s[tid + stride])
                sm_m[tid] = a
                sm_s[tid] = b
            cuda.syncthreads()
            stride //= 2
        base = tid - lane
        return sm_m[base], sm_s[base]

    return reduce


# warp shuffles (hardware): a butterfly leaves the result in every lane


def _warp(combine):
    @device
    def reduce(v, sm):
        offset = WARP // 2
        while offset > 0:
            v = combine(v, cuda.shfl_xor_sync(FULL_MASK, v, offset))
            offset //= 2
        return v

    return reduce


def _warp_lse():
    @device
    def reduce(m, s, sm_m, sm_s):
        offset = WARP // 2
        while offset > 0:
            m2 = cuda.shfl_xor_sync(FULL_MASK, m, offset)
            s2 = cuda.shfl_xor_sync(FULL_MASK, s, offset)
            m, s = lse_merge(m, s, m2, s2)
            offset //= 2
        return m, s

    return reduce


# a whole block: shuffles inside each warp, then every thread combines the
# warps' results from shared memory


def _block(combine, n_warps):
    in_warp = _warp(combine)

    @device
    def reduce(v, sm):
        tid = cuda.threadIdx.x
        v = in_warp(v, sm)
        cuda.syncthreads()
        if tid % WARP == 0:
            sm[tid // WARP] = v
        cuda.syncthreads()
        v = sm[0]
        for w in range(1, n_warps):
            v = combine(v, sm[w])
        return v

    return reduce


def _block_lse(n_warps):
    in_warp = _warp_lse()

    @device
    def reduce(m, s, sm_m, sm_s):
        tid = cuda.threadIdx.x
        m, s = in_warp(m, s, sm_m, sm_s)
        cuda.syncthreads()
        if tid % WARP == 0:
            sm_m[tid // WARP] = m
            sm_s[tid // WARP] = s
        cuda.syncthreads()
        m = sm_m[0]
        s = sm_s[0]
        for w in range(1, n_warps):
            m, s = lse_merge(m, s, sm_m[w], sm_s[w])
        return m, s

    return reduce


@device
def my_row(group, n_rows):
    """``(lane, row, active)`` of this thread: its lane in its group of ``group``
    threads, the row its group handles (64-bit; row 0 for the idle groups past
    the last row, which still join the block's reductions), and whether that
    row exists."""
    tid = cuda.threadIdx.x
    row = int64(cuda.blockIdx.x) * (cuda.blockDim.x // group) + tid // group
    active = row < n_rows
    return tid % group, (row if active else int64(0)), active
