"""The exceptions fastsoftmax raises, with no torch import (the NumPy API shares them).

Each is the precise Python type and, where PyTorch raises ``RuntimeError``
(or its subclass ``NotImplementedError``) for the same mistake, that too, so
that code written against torch (``except RuntimeError``) catches ours. Where
torch raises a plain ``ValueError`` (a batch-size mismatch, an unknown
reduction), ``TypeError`` (an argument of the wrong type) or ``IndexError``
(a class index out of range, ``dim`` out of range), so do we.
"""


class ShapeError(ValueError, RuntimeError):
    """An argument's shape does not fit the input's (target, weight, grad_output)."""


class DTypeError(TypeError, RuntimeError):
    """An argument's dtype is not one the op takes with this input (target, weight)."""


class UnsupportedDTypeError(TypeError, NotImplementedError):
    """Logits of a dtype no kernel computes (integer, boolean, complex): torch's kernels raise NotImplementedError."""


class UnsupportedLayoutError(TypeError, NotImplementedError):
    """A sparse tensor: the kernels take dense (strided) tensors, and torch's dense ops refuse sparse ones too."""


class NotATensorError(TypeError, AttributeError):
    """An argument that must be a tensor is not one (torch's softmax then fails on a missing method, an AttributeError)."""


class DeviceError(ValueError, RuntimeError):
    """Arguments on different devices, or a device the kernels cannot run on."""


class ArgumentError(ValueError, RuntimeError):
    """An argument's value is out of its range (label smoothing above 1, ignore_index with probabilities, ...)."""


def bad_target(value: int, position: int, n_classes: int, ignore_index: int) -> IndexError:
    """The error for a class index outside ``[0, C)`` that is not ``ignore_index`` (torch raises IndexError too)."""
    return IndexError(
        f"fastsoftmax: Target {value} is out of bounds: the class index at position {position} must lie in "
        f"[0, {n_classes - 1}] or equal ignore_index={ignore_index}"
    )
