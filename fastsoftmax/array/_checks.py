"""The argument checks of the array API: the torch API's checks (:mod:`fastsoftmax.validation`), array flavoured.

No torch here. Each check raises before any kernel runs, with the exception
class the torch API raises for the same mistake (:mod:`fastsoftmax.errors`)
and a message that names the argument. Axes are NumPy's: an int, a tuple of
ints or None (every axis); an axis out of range raises NumPy's ``AxisError``,
which is both the ``IndexError`` torch raises and the ``ValueError`` NumPy
code expects.
"""

import numbers
import operator

import numpy as np

from ..errors import ArgumentError, DTypeError, ShapeError, UnsupportedDTypeError

AxisError = getattr(np, "exceptions", np).AxisError

REDUCTIONS = ("none", "mean", "sum")

#: Storage dtypes of logits, by name (``bfloat16`` is ml_dtypes' NumPy dtype).
FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def type_name(value) -> str:
    return "NoneType" if value is None else type(value).__name__


def is_float_dtype(dtype) -> bool:
    return np.dtype(dtype).name in FLOAT_NAMES


def check_float(a, name: str, fn: str) -> None:
    """Logits (and outputs of the forward) must be floating point: torch raises NotImplementedError for others."""
    if not is_float_dtype(a.dtype):
        raise UnsupportedDTypeError(
            f"fastsoftmax: {fn}(): {name} must be a floating-point array (float16, float32 or float64), "
            f"got dtype {np.dtype(a.dtype).name}; convert it first, e.g. {name}.astype(np.float64)"
        )


def as_int(value, name: str, fn: str) -> int:
    """An int argument: Python and NumPy ints, not bool."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"fastsoftmax: {fn}(): argument '{name}' must be int, not {type_name(value)}")
    return operator.index(value)


def as_float(value, name: str, fn: str) -> float:
    if isinstance(value, (bool, np.bool_, str)) or not isinstance(value, numbers.Real):
        raise TypeError(f"fastsoftmax: {fn}(): argument '{name}' must be float, not {type_name(value)}")
    return float(value)


def as_axes(axis, ndim: int, fn: str) -> tuple:
    """``axis`` (int, tuple of ints or None) as a sorted tuple of axes in ``[0, ndim)``.

    A 0-d array has one axis to reduce, as in NumPy's reductions: ``None``,
    ``0`` and ``-1`` all name it; the tuple is then empty.
    """
    if axis is None:
        return tuple(range(ndim))
    items = axis if isinstance(axis, tuple) else (axis,)
    axes = []
    for item in items:
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, numbers.Integral):
            raise TypeError(f"fastsoftmax: {fn}(): axis must be an int, a tuple of ints or None, not {type_name(item)}")
        item = operator.index(item)
        rank = max(ndim, 1)
        if not -rank <= item < rank:
            raise AxisError(item, ndim, f"fastsoftmax: {fn}()")
        axes.append(item % rank)
    if len(set(axes)) != len(axes):
        raise ArgumentError(f"fastsoftmax: {fn}(): repeated axis in {axis!r}")
    return tuple(sorted(axes)) if ndim else ()


def reduction_of(reduction) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ArgumentError(f"fastsoftmax: {reduction!r} is not a valid value for reduction (expected one of {REDUCTIONS})")
    return reduction


def label_smoothing_of(value) -> float:
    """Smoothing as torch applies it: above 1 is an error, and only a value above 0 smooths."""
    eps = as_float(value, "label_smoothing", "cross_entropy")
    if eps > 1.0:
        raise ArgumentError(f"fastsoftmax: label_smoothing must be between 0.0 and 1.0. Got: {eps:g}")
    return eps if eps > 0.0 else 0.0


def check_pair(y, dy, fn: str) -> None:
    """The two arrays of a backward: floating point, of one shape and one dtype."""
    check_float(y, "y", fn)
    if tuple(dy.shape) != tuple(y.shape):
        raise ShapeError(f"fastsoftmax: {fn}(): dy of shape {tuple(dy.shape)} does not match y's {tuple(y.shape)}")
    if dy.dtype != y.dtype:
        raise DTypeError(f"fastsoftmax: {fn}(): dy is {np.dtype(dy.dtype).name}, y {np.dtype(y.dtype).name}: pass them in one dtype")


def check_out(out, shape: tuple, dtype, fn: str) -> None:
    """``out=`` must have the result's exact shape and dtype and be writeable."""
    if tuple(out.shape) != tuple(shape):
        raise ShapeError(f"fastsoftmax: {fn}(): out has shape {tuple(out.shape)}, the result {tuple(shape)}")
    if np.dtype(out.dtype) != np.dtype(dtype):
        raise DTypeError(f"fastsoftmax: {fn}(): out is {np.dtype(out.dtype).name}, the result {np.dtype(dtype).name}")
    flags = getattr(out, "flags", None)
    if flags is not None and not flags.writeable:
        raise ArgumentError(f"fastsoftmax: {fn}(): out is read-only")


def check_targets_shape(logits_shape: tuple, axis: int, target, fn: str = "cross_entropy") -> bool:
    """Whether ``target`` holds class probabilities (the logits' shape) rather than class indices.

    Index targets have the logits' shape without ``axis`` and an integer
    dtype; probability targets the logits' shape and a float dtype.
    """
    if tuple(target.shape) == tuple(logits_shape):
        if not is_float_dtype(target.dtype):
            raise DTypeError(
                f"fastsoftmax: {fn}(): Expected floating point type for target with class probabilities, "
                f"got {np.dtype(target.dtype).name}"
            )
        return True
    expected = tuple(n for k, n in enumerate(logits_shape) if k != axis)
    if tuple(target.shape) != expected:
        raise ShapeError(
            f"fastsoftmax: {fn}(): Expected target size {expected} (class indices: the logits' shape "
            f"{tuple(logits_shape)} without axis {axis}) or {tuple(logits_shape)} (class probabilities), "
            f"got {tuple(target.shape)}"
        )
    kind = np.dtype(target.dtype).kind
    if kind not in "iu":
        raise DTypeError(
            f"fastsoftmax: {fn}(): expected an integer dtype for class-index targets, got {np.dtype(target.dtype).name}"
        )
    return False


def check_weight(weight, n_classes: int, fn: str = "cross_entropy") -> None:
    if tuple(weight.shape) != (n_classes,):
        raise ShapeError(
            f"fastsoftmax: {fn}(): weight tensor should be defined either for all {n_classes} classes or no classes "
            f"but got weight tensor of shape: {list(weight.shape)}"
        )
    if not is_float_dtype(weight.dtype):
        raise DTypeError(f"fastsoftmax: {fn}(): weight must be floating point, got {np.dtype(weight.dtype).name}")
