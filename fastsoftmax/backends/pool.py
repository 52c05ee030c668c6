"""A small caching allocator for large CPU outputs, shared by the torch API and the array API (no torch here).

A fresh multi-megabyte ``np.empty`` or ``torch.empty`` is backed by new
pages from the operating system, and the first write to each 4 KiB page
faults and zeroes it: allocating and filling 1 GiB costs about 6 times a
copy into memory already mapped, several times the softmax itself.
PyTorch's CUDA allocator caches freed blocks for this reason; its CPU
allocator does not. This pool does, for our outputs only: outputs of at
least :data:`config.POOL_MIN_BYTES` are views of cached ``uint8`` blocks
(NumPy asks the kernel for huge pages on large allocations). A tensor made
by ``torch.from_numpy`` keeps its view alive, and NumPy collapses the base
of every view of a view onto the block that owns the memory, so the
block's reference count tells exactly whether anything still uses it: a
block is handed out again only when nothing but the pool refers to it.
"""

import sys
import threading

import numpy as np

from ..kernels import config

_lock = threading.Lock()
_blocks: dict[int, list[np.ndarray]] = {}
_cached_bytes = 0

# references to a cached, unused block while it is inspected: the pool's list, the loop variable, getrefcount's argument
_FREE_REFCOUNT = 3


def take(nbytes: int) -> np.ndarray:
    """A free cached block of ``nbytes`` bytes, or a new one (cached while the pool is under its budget)."""
    global _cached_bytes
    with _lock:
        bucket = _blocks.setdefault(nbytes, [])
        for block in bucket:
            if sys.getrefcount(block) == _FREE_REFCOUNT:
                return block
        block = np.empty(nbytes, dtype=np.uint8)
        if _cached_bytes + nbytes <= config.POOL_MAX_CACHED_BYTES:
            bucket.append(block)
            _cached_bytes += nbytes
        return block


def empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array, from the pool when it is large."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < config.POOL_MIN_BYTES:
        return np.empty(shape, dtype=dtype)
    return take(nbytes).view(dtype).reshape(shape)


def empty_cache() -> int:
    """Release every cached block that no array uses; returns the bytes freed."""
    global _cached_bytes
    freed = 0
    with _lock:
        for nbytes, bucket in _blocks.items():
            keep = [b for b in bucket if sys.getrefcount(b) > _FREE_REFCOUNT]
            freed += nbytes * (len(bucket) - len(keep))
            bucket[:] = keep
        _cached_bytes -= freed
    return freed


def cached_bytes() -> int:
    """Bytes the pool holds, in use or not."""
    return _cached_bytes
