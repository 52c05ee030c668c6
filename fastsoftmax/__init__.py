"""fastsoftmax: fused, numerically stable softmax, log-softmax and cross-entropy.

Numba kernels for the CPU and NVIDIA GPUs behind the signatures of
``torch.nn.functional``. Swap one import::

    import fastsoftmax as F          # instead of: import torch.nn.functional as F
    loss = F.cross_entropy(logits, target, label_smoothing=0.1)
"""

from . import _ops, naive, nn  # noqa: F401  (_ops registers the torch.library ops)
from ._pool import empty_cache
from .autograd import CrossEntropyFunction, LogSoftmaxFunction, SoftmaxFunction
from .functional import cross_entropy, log_softmax, softmax

__version__ = "0.1.0"

__all__ = [
    "softmax",
    "log_softmax",
    "cross_entropy",
    "SoftmaxFunction",
    "LogSoftmaxFunction",
    "CrossEntropyFunction",
    "nn",
    "naive",
    "empty_cache",
]
