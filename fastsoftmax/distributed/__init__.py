"""Cross-entropy over classes split across the ranks of a ``torch.distributed`` group (tensor parallelism of the output layer).

* :func:`vocab_parallel_cross_entropy`: each rank passes its slice of the
  logits (:mod:`.cross_entropy`);
* :func:`vocab_parallel_linear_cross_entropy`: each rank passes its rows of
  the output layer and the hidden states, and no rank holds its whole slice
  of the logits (:mod:`.linear`).

Both need two small collectives per batch of rows (:mod:`.rows`), never the
logits themselves.
"""

from .cross_entropy import (
    VocabParallelCrossEntropyFunction,
    vocab_parallel_cross_entropy,
)
from .linear import (
    VocabParallelLinearCrossEntropyFunction,
    vocab_parallel_linear_cross_entropy,
)

__all__ = [
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "VocabParallelCrossEntropyFunction",
    "VocabParallelLinearCrossEntropyFunction",
]
