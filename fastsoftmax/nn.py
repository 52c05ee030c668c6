"""Modules: PyTorch's own, with the forward swapped for ours.

Subclassing keeps constructor arguments, ``repr``, ``state_dict`` (the
cross-entropy ``weight`` buffer), pickling and ``extra_repr`` identical to
torch's.
"""

import torch

from . import functional as F

__all__ = ["Softmax", "LogSoftmax", "Softmin", "Softmax2d", "CrossEntropyLoss", "LinearCrossEntropyLoss", "LinearCrossEntropyOptions"]

#: torch's own options class, re-exported: :func:`fastsoftmax.linear_cross_entropy` reads its chunk size
LinearCrossEntropyOptions = torch.nn.LinearCrossEntropyOptions


class Softmax(torch.nn.Softmax):
    """:class:`torch.nn.Softmax` computed by :func:`fastsoftmax.softmax`."""

    def forward(self, input):
        return F.softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(torch.nn.LogSoftmax):
    """:class:`torch.nn.LogSoftmax` computed by :func:`fastsoftmax.log_softmax`."""

    def forward(self, input):
        return F.log_softmax(input, self.dim, _stacklevel=5)


class Softmin(torch.nn.Softmin):
    """:class:`torch.nn.Softmin` computed by :func:`fastsoftmax.softmin`."""

    def forward(self, input):
        return F.softmin(input, self.dim, _stacklevel=5)


class Softmax2d(torch.nn.Softmax2d):
    """:class:`torch.nn.Softmax2d` (softmax over the channels of ``(N, C, H, W)`` or ``(C, H, W)``) computed by ours."""

    def forward(self, input):
        if input.dim() not in (3, 4):
            raise ValueError(f"Softmax2d: expected input to be 3D or 4D, got {input.dim()}D instead")
        return F.softmax(input, -3, _stacklevel=5)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss` computed by :func:`fastsoftmax.cross_entropy`.

    Torch's arguments, then two keyword-only ones of ours, stored as
    attributes: ``z_loss`` (PaLM's ``z * lse**2``) and ``softcap`` (Gemma 2's
    ``c * tanh(x / c)``); see :func:`fastsoftmax.cross_entropy`.
    """

    def __init__(
        self,
        weight=None,
        size_average=None,
        ignore_index=-100,
        reduce=None,
        reduction="mean",
        label_smoothing=0.0,
        *,
        z_loss=0.0,
        softcap=None,
    ):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, input, target):
        return F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=getattr(self, "z_loss", 0.0),
            softcap=getattr(self, "softcap", None),
        )


class LinearCrossEntropyLoss(torch.nn.LinearCrossEntropyLoss):
    """:class:`torch.nn.LinearCrossEntropyLoss` computed by :func:`fastsoftmax.linear_cross_entropy`.

    Torch's arguments (its ``Linear`` of ``C * prod(out_features)`` outputs,
    its checks, ``state_dict`` and ``repr``), then two keyword-only ones of
    ours, stored as attributes: ``z_loss`` and ``softcap``.
    """

    def __init__(
        self,
        in_features,
        num_classes,
        *,
        out_features=(),
        bias=False,
        device=None,
        dtype=None,
        reduction="mean",
        weight=None,
        ignore_index=None,
        label_smoothing=0.0,
        options=None,
        z_loss=0.0,
        softcap=None,
    ):
        super().__init__(
            in_features,
            num_classes,
            out_features=out_features,
            bias=bias,
            device=device,
            dtype=dtype,
            reduction=reduction,
            weight=weight,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            options=options,
        )
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, input, target):
        weight = self.linear.weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
        bias = self.linear.bias
        if bias is not None:
            bias = bias.reshape((self.num_classes, *self.out_features))
        return F.linear_cross_entropy(
            input,
            weight,
            target,
            linear_bias=bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            options=self.options,
            z_loss=getattr(self, "z_loss", 0.0),
            softcap=getattr(self, "softcap", None),
        )
