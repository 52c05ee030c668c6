"""Large CPU output tensors from the shared pool of :mod:`fastsoftmax.backends.pool`."""

import numpy as np
import torch

from ..backends.pool import cached_bytes, empty_cache, take  # noqa: F401  (fastsoftmax.empty_cache)
from ..kernels import config

NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor, from the pool when it is large."""
    np_dtype = NUMPY_DTYPES.get(dtype)
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * (np_dtype().itemsize if np_dtype else 0)
    if np_dtype is None or nbytes < config.POOL_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(take(nbytes).view(np_dtype).reshape(shape))
