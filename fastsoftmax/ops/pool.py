"""A small caching allocator for large CPU outputs.

A fresh multi-megabyte ``torch.empty`` is backed by new pages from the
operating system, and the first write to each 4 KiB page faults and zeroes it:
measured here, allocating and filling 1 GiB costs about 6 times a copy into
memory already mapped. PyTorch's CUDA allocator caches freed blocks for
this reason; its CPU allocator does not. This pool does, for our outputs only.

Each block is a NumPy ``uint8`` array (NumPy asks the kernel for huge pages on
large allocations). A block is handed out as a tensor that views it; the
tensor keeps the block alive through its NumPy base. A block is free again
when nothing but the pool refers to it, which the reference count tells
exactly, so a block is never handed out twice while any view of it lives.
"""

import sys
import threading

import numpy as np
import torch

from ..kernels import config

_lock = threading.Lock()
_blocks: dict[int, list[np.ndarray]] = {}
_cached_bytes = 0

# references to a cached, unused block while _take inspects it: the pool's
# list, the loop variable and getrefcount's own argument
_FREE_REFCOUNT = 3

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _take(nbytes: int) -> np.ndarray:
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


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor, from the pool when it is large."""
    np_dtype = _NUMPY_DTYPES.get(dtype)
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * (np_dtype().itemsize if np_dtype else 0)
    if np_dtype is None or nbytes < config.POOL_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(_take(nbytes).view(np_dtype).reshape(shape))


def empty_cache() -> int:
    """Release every cached block that is not in use; returns the bytes freed."""
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
