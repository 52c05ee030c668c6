"""What the CUDA simulator needs to run our kernels: warp shuffles, and launch shapes small enough for tiny rows.

Import this before ``fastsoftmax.kernels.cuda`` in a process started with
``NUMBA_ENABLE_CUDASIM=1``, then call :func:`install`.

* ``cuda.shfl_xor_sync`` is missing from numba-cuda's simulator. It is
  emulated by a block-wide exchange: each thread posts its value under the
  round's number, the block synchronises, and each reads its partner's
  (lane ``lane ^ mask`` of its own 32-lane warp). That is exact for our
  kernels because every thread of a block that is still running calls the
  reductions, in the same order (whole warps leave warp-per-row kernels
  together, before any shuffle). A partner that did not post raises instead
  of returning stale data.
* :func:`small_launch_shapes` shrinks the tiers so that rows of a few dozen
  to a few hundred columns reach every launch shape with 64-thread blocks:
  two real warps per block, and two rows per warp-per-row block. The
  softmax kernels of :data:`TWO_CHUNKS` keep two chunks a thread, the
  others one, so that both the single-chunk kernels and the unrolled
  loops' later chunks run (:func:`softmax_items`).
"""

import threading

_lock = threading.Lock()


def _thread():
    t = threading.current_thread()
    if not hasattr(t, "_manager"):
        raise RuntimeError("a warp intrinsic was called outside a simulated kernel")
    return t


def shfl_xor_sync(self, mask, value, lane_mask):
    t = _thread()
    manager = t._manager
    with _lock:
        posted = manager.__dict__.setdefault("_shuffles", {})
    round_ = getattr(t, "_shuffle_round", 0) + 1
    t._shuffle_round = round_
    tid = t.thread_id
    posted[round_, tid] = value  # one slot per round: no second barrier before reuse
    t.syncthreads()
    lane = tid % 32
    partner = tid - lane + ((lane ^ lane_mask) & 31)
    if (round_, partner) not in posted:
        raise RuntimeError(f"shuffle: thread {partner} did not take part in round {round_} (thread {tid})")
    return posted[round_, partner]


def install() -> None:
    from numba.cuda.core import config

    if not config.ENABLE_CUDASIM:
        raise RuntimeError("tests/cuda_sim.py is for NUMBA_ENABLE_CUDASIM=1 processes")
    from numba.cuda.simulator import kernelapi

    kernelapi.FakeCUDAModule.shfl_xor_sync = shfl_xor_sync


#: Dtypes whose softmax kernels keep two chunks a thread in the simulator (the others keep one).
TWO_CHUNKS = ("float32", "bfloat16")


def softmax_items(dtype: str) -> int:
    """Chunks a thread of a ``warp`` or ``block`` softmax kernel keeps, under :func:`small_launch_shapes`."""
    return 2 if dtype in TWO_CHUNKS else 1


def small_launch_shapes() -> None:
    """One or two chunks per thread in registers (:func:`softmax_items`; one for cross-entropy), 64-thread blocks, 2 rows per warp-per-row block."""
    from fastsoftmax.kernels import cuda, cuda_cross_entropy, cuda_softmax

    for key in cuda_softmax.ITEMS:
        direction, shape, dtype, log = key
        cuda_softmax.ITEMS[key] = softmax_items(dtype)
    cuda_softmax.WARP_BLOCK = 64
    cuda_softmax.MAX_THREADS = 64
    cuda_cross_entropy.BLOCK_THREADS = 64
    cuda.CE_CHUNKS_PER_THREAD = 1
    cuda.ONE_BLOCK_THREADS = 64
