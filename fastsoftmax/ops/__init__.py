"""The torch side of each op, one module per op; importing this registers ``torch.ops.fastsoftmax.*``.

* :mod:`.softmax`: softmax and log-softmax.
* :mod:`.cross_entropy`: fused softmax cross-entropy.
* :mod:`.linear_cross_entropy`: the cross-entropy of a linear layer's output, in chunks of rows.
* :mod:`.layout`: tensors to the kernels' layouts and back, device policy.
* :mod:`.pool`: the caching allocator of large CPU outputs.
"""

from . import cross_entropy, linear_cross_entropy, softmax  # noqa: F401  (registers the torch.library ops)
