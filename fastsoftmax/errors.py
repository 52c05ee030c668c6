"""The exceptions fastsoftmax raises, with no torch import (the NumPy API shares them).

Each is the precise Python type and, where PyTorch raises ``RuntimeError``
for the same mistake, a ``RuntimeError`` too, so that code written against
torch (``except RuntimeError``) catches ours.
"""


class ShapeError(ValueError, RuntimeError):
    """An argument's shape does not fit the input's (target, weight, grad_output)."""


class DTypeError(TypeError, RuntimeError):
    """An argument's dtype is not one the op takes."""


class DeviceError(ValueError, RuntimeError):
    """Arguments on different devices, or a device the kernels cannot run on."""


def bad_target(value: int, position: int, n_classes: int, ignore_index: int) -> IndexError:
    """The error for a class index outside ``[0, C)`` that is not ``ignore_index`` (torch raises IndexError too)."""
    return IndexError(
        f"fastsoftmax: target {value} at position {position} is out of bounds: "
        f"expected a class index in [0, {n_classes - 1}] or ignore_index={ignore_index}"
    )
