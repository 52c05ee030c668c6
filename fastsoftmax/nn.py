"""Modules: PyTorch's own, with the forward swapped for ours.

Subclassing keeps constructor arguments, ``repr``, ``state_dict`` (the
cross-entropy ``weight`` buffer) and ``extra_repr`` identical to torch's.
"""

import torch

from . import functional as F

__all__ = ["Softmax", "LogSoftmax", "CrossEntropyLoss"]


class Softmax(torch.nn.Softmax):
    """:class:`torch.nn.Softmax` computed by :func:`fastsoftmax.softmax`."""

    def forward(self, input):
        return F.softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(torch.nn.LogSoftmax):
    """:class:`torch.nn.LogSoftmax` computed by :func:`fastsoftmax.log_softmax`."""

    def forward(self, input):
        return F.log_softmax(input, self.dim, _stacklevel=5)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss` computed by :func:`fastsoftmax.cross_entropy`."""

    def forward(self, input, target):
        return F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )
