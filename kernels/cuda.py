"""The CUDA kernels (numba-cuda): which one runs for a row length, how it is compiled, and the list of all of them.

* :mod:`.cuda_softmax`: softmax and log-softmax, forward and backward.
* :mod:`.cuda_cross_entropy`: cross-entropy forward (loss and per-row
  statistics), backward (the gradient rebuilt from them), and two one-block
  helpers.
* :mod:`.cuda_lse`: the array API's log-sum-exp (:func:`array_kernels`;
  launched by :mod:`fastsoftmax.array`, not by the backend).
* :mod:`.cuda_codec`, :mod:`.cuda_reduce`, :mod:`.cuda_intrinsics`: 16-byte
  chunked row access per dtype, warp and block reductions, the intrinsics
  numba-cuda lacks.

Every kernel takes C-contiguous rows of its storage dtype (float16 and
bfloat16 as their ``uint16`` bits) and accumulates in float32 (float64 for
float64 rows). Each is one specialisation: op, dtype and launch shape are
fixed when it is built, with the chunks each thread keeps in registers a
compile-time constant, and its name says all three
(``softmax_fwd_bf16_block_c32768``, ``ce_bwd_f32_warp``). :func:`get`
compiles one (with numba-cuda's defaults, so with link-time optimisation
where nvJitLink is present, and with the kernel's launch bounds) the first
time it is asked for; :func:`all_kernels` and :func:`array_kernels` list
every one, for the offline gates that link them for sm_90a and sm_80
without a GPU.
"""

from functools import lru_cache

from numba import cuda
from numba.cuda.core import config

from . import cuda_ce_finish, cuda_cross_entropy, cuda_lse, cuda_softmax
from .cuda_codec import codec
from .cuda_reduce import WARP

DTYPES = ("float32", "float64", "float16", "bfloat16")
SHAPES = ("warp", "block", "online")

#: ``(family, *arguments) -> (name, pyfunc, signature, max_threads)``
FAMILIES = {
    "softmax_fwd": lambda dtype, log, shape: cuda_softmax.forward(dtype, log, shape),
    "softmax_bwd": lambda dtype, log, shape: cuda_softmax.backward(dtype, log, shape),
    "ce_fwd": cuda_cross_entropy.forward_index,
    "ce_bwd": cuda_cross_entropy.backward_index,
    "ce_prob_fwd": cuda_cross_entropy.forward_prob,
    "ce_prob_bwd": cuda_cross_entropy.backward_prob,
    "ce_finish": cuda_ce_finish.finish,
    "ce_check_targets": cuda_ce_finish.check_targets,
    "logsumexp": cuda_lse.spec,
}

#: Cross-entropy rows of at most this many chunks per lane of one warp run
#: warp per row; longer rows get a block with about this many chunks per thread.
CE_CHUNKS_PER_THREAD = 8


@lru_cache(maxsize=None)
def spec(family: str, *args):
    """``(name, pyfunc, signature, max_threads)`` of one kernel: ``max_threads`` is the most threads per block it is launched with."""
    return FAMILIES[family](*args)


#: Every kernel leaves room for this many resident threads per multiprocessor.
MIN_RESIDENT_THREADS = 512


def launch_bounds(max_threads: int):
    """``(max threads per block, min blocks per multiprocessor)`` a kernel is compiled with: its register budget.

    ptxas then keeps a thread within ``65536 / (max_threads * min_blocks)``
    registers: 128 for the warp-per-row kernels (128 threads, 4 blocks) and
    the 512-thread ones, 64 for the 1024-thread ones. The offline gates
    check that each kernel fits with no spills. Stating the second number
    matters on sm_90: given only the first, ptxas aims at a fuller
    multiprocessor on its own, and spilled (``ce_bwd_f64_block`` at 512
    threads: 64 registers and 96 bytes of spills, against 90 and none).
    """
    return (max_threads, max(1, MIN_RESIDENT_THREADS // max_threads))


def register_budget(max_threads: int) -> int:
    """The most registers a thread of a kernel launched with up to ``max_threads`` threads may use."""
    threads, blocks = launch_bounds(max_threads)
    return min(255, 65536 // (threads * blocks))


@lru_cache(maxsize=None)
def get(family: str, *args):
    """The launchable kernel (compiled on first use, for exactly its signature)."""
    _, pyfunc, signature, max_threads = spec(family, *args)
    if config.ENABLE_CUDASIM:  # the simulator takes no launch bounds
        return cuda.jit(signature)(pyfunc)
    return cuda.jit(signature, launch_bounds=launch_bounds(max_threads))(pyfunc)


def _round_warps(threads: int) -> int:
    return max(WARP, -(-threads // WARP) * WARP)


def softmax_plan(n_cols: int, dtype: str, log: bool, backward: bool):
    """``(shape, threads per block, rows per block)`` of the softmax kernel for rows of ``n_cols``.

    A warp per row while a warp's registers hold the row, then a block per
    row with just enough threads to hold it, then the online kernel.
    """
    direction = "bwd" if backward else "fwd"
    n_chunks = -(-n_cols // codec(dtype).vec)
    if n_chunks <= WARP * cuda_softmax.ITEMS[direction, "warp", dtype, log]:
        return "warp", cuda_softmax.WARP_BLOCK, cuda_softmax.WARP_BLOCK // WARP
    items = cuda_softmax.ITEMS[direction, "block", dtype, log]
    if n_chunks <= cuda_softmax.MAX_THREADS * items:
        return "block", _round_warps(-(-n_chunks // items)), 1
    return "online", cuda_softmax.MAX_THREADS, 1


def ce_plan(n_cols: int, dtype: str):
    """``(shape, threads per block, rows per block)`` of the cross-entropy kernels for rows of ``n_cols``."""
    n_chunks = -(-n_cols // codec(dtype).vec)
    if n_chunks <= WARP * CE_CHUNKS_PER_THREAD:
        return "warp", cuda_softmax.WARP_BLOCK, cuda_softmax.WARP_BLOCK // WARP
    threads = min(cuda_cross_entropy.BLOCK_THREADS, _round_warps(-(-n_chunks // CE_CHUNKS_PER_THREAD)))
    return "block", threads, 1


#: Threads of the one-block kernels.
ONE_BLOCK_THREADS = 1024


def all_kernels():
    """``[(family, args)]`` of every kernel the backend can launch: every dtype x launch shape x op."""
    out = []
    for dtype in DTYPES:
        for family in ("softmax_fwd", "softmax_bwd"):
            for log in (False, True):
                for shape in SHAPES:
                    out.append((family, (dtype, log, shape)))
        for family in ("ce_fwd", "ce_bwd", "ce_prob_fwd", "ce_prob_bwd"):
            for shape in ("warp", "block"):
                out.append((family, (dtype, shape)))
        out.append(("ce_finish", (dtype,)))
    out.append(("ce_check_targets", ()))
    return out


def array_kernels():
    """``[(family, args)]`` of the kernels of :mod:`fastsoftmax.array` alone: log-sum-exp, per dtype it takes."""
    return [("logsumexp", (dtype,)) for dtype in cuda_lse.DTYPES]
