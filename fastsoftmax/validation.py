"""Every check on the arguments of the PyTorch API, in the order torch makes them.

Each check raises before any kernel runs, with a message that names the
argument and what was wrong with it, and an exception of the class torch
raises for the same mistake (:mod:`fastsoftmax.errors`). The backends check
in addition what the kernels would otherwise read out of bounds (class
indices), and every public door (functions, modules, ``*Function.apply``,
``torch.ops.fastsoftmax.*``) runs these checks.
"""

import numbers
import operator
import warnings

import torch

from .errors import (
    ArgumentError,
    DeviceError,
    DTypeError,
    NotATensorError,
    ShapeError,
    UnsupportedDTypeError,
    UnsupportedLayoutError,
)

#: The dtypes the kernels compute (each backend says in what).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

REDUCTIONS = ("none", "mean", "sum")

_DEVICES = ("cpu", "cuda", "meta")

#: torch's short names of scalar types, as its messages print them
_SCALAR_NAMES = {
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.float32: "Float",
    torch.float64: "Double",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def scalar_name(dtype: torch.dtype) -> str:
    return _SCALAR_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _type_name(value) -> str:
    return "NoneType" if value is None else type(value).__name__


def check_tensor(value, name: str, fn: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise NotATensorError(f"fastsoftmax: {fn}(): argument '{name}' must be Tensor, not {_type_name(value)}")


def check_layout(x: torch.Tensor, fn: str) -> None:
    if x.layout != torch.strided:
        raise UnsupportedLayoutError(
            f"fastsoftmax: {fn} takes dense tensors, got a {str(x.layout).removeprefix('torch.')} tensor "
            "(torch's dense kernels refuse it too; torch.sparse.softmax reads unspecified entries as -inf)"
        )


def check_device(x: torch.Tensor, name: str = "input") -> None:
    if x.device.type not in _DEVICES:
        raise DeviceError(f"fastsoftmax: {name} is on device '{x.device}'; only CPU and CUDA tensors (and meta) are supported")


def check_same_device(x: torch.Tensor, other: torch.Tensor, name: str) -> None:
    if other.device != x.device:
        raise DeviceError(
            f"fastsoftmax: {name} is on {other.device} but input is on {x.device} "
            f"(Tensor on device {other.device} is not on the expected device {x.device}!)"
        )


def check_float_input(x: torch.Tensor, kernel: str, name: str = "input") -> None:
    """Logits must be floating point: torch's kernels raise NotImplementedError for any other dtype."""
    if x.dtype not in FLOAT_DTYPES:
        raise UnsupportedDTypeError(
            f'fastsoftmax: "{kernel}" not implemented for \'{scalar_name(x.dtype)}\': {name} must be a floating-point '
            f"tensor (float16, bfloat16, float32 or float64), got dtype {x.dtype}; pass dtype= to cast it"
        )


def as_int(value, name: str, fn: str, position: int, tensor_ndim: int = 1) -> int:
    """An int argument as torch's argument parser takes one: ints, NumPy ints and integer tensors, not bool.

    A tensor is taken when it holds one element in at most ``tensor_ndim``
    dimensions: torch takes ``tensor([1])`` as an ``ignore_index`` but only a
    0-d tensor as a ``dim``.
    """
    is_int_tensor = (
        isinstance(value, torch.Tensor)
        and value.numel() == 1
        and value.ndim <= tensor_ndim
        and not value.is_floating_point()
        and not value.is_complex()
        and value.dtype != torch.bool
    )
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral) or is_int_tensor):
        raise TypeError(f"fastsoftmax: {fn}(): argument '{name}' (position {position}) must be int, not {_type_name(value)}")
    value = operator.index(value)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ArgumentError(f"fastsoftmax: {fn}(): argument '{name}' is {value}: Overflow when unpacking long long")
    return value


def as_float(value, name: str, fn: str, position: int) -> float:
    """A float argument as torch's argument parser takes one: Python and NumPy numbers, 0-d tensors."""
    ok = isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.ndim == 0)
    if not ok or isinstance(value, str):
        raise TypeError(f"fastsoftmax: {fn}(): argument '{name}' (position {position}) must be float, not {_type_name(value)}")
    return float(value)


def as_dim(dim, ndim: int, fn: str) -> int:
    """``dim`` in ``[0, ndim)``; a 0-d tensor accepts 0 and -1, as in torch."""
    dim = as_int(dim, "dim", fn, 1, tensor_ndim=0)
    rank = max(ndim, 1)
    if not -rank <= dim < rank:
        raise IndexError(
            f"fastsoftmax: {fn}(): dim {dim} is out of range for a tensor of {ndim} dimension(s) "
            f"(Dimension out of range (expected to be in range of [{-rank}, {rank - 1}], but got {dim}))"
        )
    return dim % rank


def check_dtype_arg(dtype, fn: str) -> None:
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"fastsoftmax: {fn}(): argument 'dtype' must be torch.dtype, not {_type_name(dtype)}")


def implicit_dim(ndim: int, name: str, stacklevel: int) -> int:
    """torch's choice of ``dim`` when none is given (``torch.nn.functional._get_softmax_dim``), with its warning."""
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. Change the call to include dim=X as an argument.",
        stacklevel=stacklevel,
    )
    return 0 if ndim in (0, 1, 3) else 1


def reduction_of(reduction, size_average=None, reduce=None) -> str:
    """The reduction to apply: the legacy ``size_average``/``reduce`` override it, as in torch (with its warnings)."""
    if size_average is not None or reduce is not None:
        size_average = True if size_average is None else size_average
        reduce = True if reduce is None else reduce
        reduction = "mean" if (size_average and reduce) else ("sum" if reduce else "none")
        warnings.warn(
            f"size_average and reduce args will be deprecated, please use reduction='{reduction}' instead.",
            stacklevel=4,
        )
        return reduction
    if reduction == "elementwise_mean":
        warnings.warn("reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.", stacklevel=4)
        return "mean"
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ArgumentError(f"fastsoftmax: {reduction} is not a valid value for reduction (expected one of {REDUCTIONS})")
    return reduction


def label_smoothing_of(value, fn: str = "cross_entropy_loss") -> float:
    """Smoothing as torch applies it: above 1 is an error, and only a value above 0 smooths (so -0.1 and NaN do not)."""
    eps = as_float(value, "label_smoothing", fn, 6)
    if eps > 1.0:
        raise ArgumentError(f"fastsoftmax: label_smoothing must be between 0.0 and 1.0. Got: {eps:g}")
    return eps if eps > 0.0 else 0.0


def _expected_target_shape(input: torch.Tensor) -> list:
    return [input.shape[0]] + list(input.shape[2:])


def _check_index_target(input: torch.Tensor, target: torch.Tensor) -> None:
    """The shape and dtype of class-index targets, in torch's order and with its exception classes."""
    n = input.shape[0] if input.ndim > 1 else 1
    if input.ndim <= 2:
        if target.ndim > 1:
            raise ShapeError("fastsoftmax: 0D or 1D target tensor expected, multi-target not supported")
        if input.ndim == 1 and target.ndim == 1 and target.shape[0] != 1:
            raise ShapeError(
                f"fastsoftmax: For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}"
            )
        batch = 0 if target.ndim == 0 else target.shape[0]
        if input.ndim == 2 and batch != n:
            raise ShapeError(f"fastsoftmax: Expected input batch_size ({n}) to match target batch_size ({batch}).")
        if target.is_floating_point() or target.dtype not in (torch.int64, torch.uint8):
            raise DTypeError(
                f"fastsoftmax: expected target dtype to be Long or Byte, but got {scalar_name(target.dtype)}: "
                "class-index targets are int64 (or uint8)"
            )
        return
    if target.ndim and target.shape[0] != input.shape[0]:
        raise ShapeError(
            f"fastsoftmax: Expected input batch_size ({input.shape[0]}) to match target batch_size ({target.shape[0]})."
        )
    expected = _expected_target_shape(input)
    if list(target.shape) != expected:
        raise ShapeError(
            f"fastsoftmax: Expected target size {expected}, got {list(target.shape)} "
            f"(class indices for input of shape {list(input.shape)} have its shape without the class dimension)"
        )
    if target.dtype != torch.int64:
        what = f"expected scalar type Long but found {scalar_name(target.dtype)}" if target.dtype == torch.uint8 else (
            f"expected target dtype to be Long or Byte, but got {scalar_name(target.dtype)}"
        )
        raise DTypeError(f"fastsoftmax: {what}: class-index targets of (N, C, d1, ...) logits are int64")


def _check_weight(input: torch.Tensor, weight, prob: bool) -> None:
    check_tensor(weight, "weight", "cross_entropy_loss")
    check_layout(weight, "cross_entropy")
    n_classes = input.shape[0 if input.ndim == 1 else 1]
    if weight.device != input.device:
        raise DeviceError(f"fastsoftmax: Tensor on device {weight.device} is not on the expected device {input.device}! (weight)")
    if weight.shape != (n_classes,):
        prefix = "cross_entropy: " if prob else ""
        raise ShapeError(
            f"fastsoftmax: {prefix}weight tensor should be defined either for all {n_classes} classes or no classes "
            f"but got weight tensor of shape: {list(weight.shape)}"
        )
    if not prob and weight.dtype != input.dtype:
        raise DTypeError(
            f"fastsoftmax: expected scalar type {scalar_name(input.dtype)} but found {scalar_name(weight.dtype)}: "
            "with class-index targets the weight must have the input's dtype"
        )


def check_cross_entropy(input, target, weight, ignore_index, label_smoothing, ignore_index_given=True):
    """Check every argument of :func:`fastsoftmax.cross_entropy`; returns ``(prob, ignore_index, label_smoothing)``.

    ``prob`` is torch's rule: a target of the input's shape holds class
    probabilities. ``ignore_index_given`` is False when the caller left it at
    its default (torch rejects a non-negative one with probabilities).
    """
    fn = "cross_entropy_loss"
    check_tensor(input, "input", fn)
    check_tensor(target, "target", fn)
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise TypeError(f"fastsoftmax: {fn}(): argument 'weight' (position 3) must be Tensor, not {_type_name(weight)}")
    ignore_index = as_int(ignore_index, "ignore_index", fn, 5)
    eps_arg = as_float(label_smoothing, "label_smoothing", fn, 6)
    check_layout(input, "cross_entropy")
    check_device(input)
    prob = input.shape == target.shape
    if prob:
        if not (target.is_floating_point() or target.layout != torch.strided):
            raise DTypeError(
                f"fastsoftmax: Expected floating point type for target with class probabilities, got {scalar_name(target.dtype)}"
            )
        if ignore_index_given and ignore_index >= 0:
            raise ArgumentError(
                f"fastsoftmax: ignore_index is not supported for floating point target (got ignore_index={ignore_index}: "
                "probability targets have no class to ignore)"
            )
    eps = label_smoothing_of(eps_arg)
    check_float_input(input, "log_softmax_lastdim_kernel_impl" if input.ndim <= 2 else "log_softmax_kernel_impl")
    if input.ndim == 0:
        raise IndexError(
            "fastsoftmax: input must have a class dimension: shape (C), (N, C) or (N, C, d1, ..., dk), got a 0-d tensor "
            "(Dimension specified as 1 but tensor has no dimensions)"
        )
    if target.device != input.device:
        raise DeviceError(f"fastsoftmax: Tensor on device {target.device} is not on the expected device {input.device}! (target)")
    if not prob:
        _check_index_target(input, target)
    elif target.layout != torch.strided:
        raise UnsupportedLayoutError("fastsoftmax: cross_entropy takes dense probability targets, got a sparse tensor")
    if weight is not None:
        _check_weight(input, weight, prob)
    return prob, ignore_index, eps


def result_dtype(input, target, weight, prob: bool) -> torch.dtype:
    """The loss's dtype: the input's, or, for probability targets, torch's promotion with the target and the weight."""
    if not prob:
        return input.dtype
    dtype = torch.promote_types(input.dtype, target.dtype)
    if weight is not None and weight.is_floating_point():
        dtype = torch.promote_types(dtype, weight.dtype)
    return dtype


def check_softmax_backward(output: torch.Tensor, grad_output: torch.Tensor, dim: int, fn: str) -> int:
    """The arguments of a softmax backward op: two float tensors of one shape, dtype and device."""
    check_tensor(output, "output", fn)
    check_tensor(grad_output, "grad_output", fn)
    check_float_input(output, fn, "output")
    if grad_output.shape != output.shape:
        raise ShapeError(
            f"fastsoftmax: {fn}: grad_output of shape {list(grad_output.shape)} does not match the output's {list(output.shape)}"
        )
    if grad_output.dtype != output.dtype:
        raise DTypeError(f"fastsoftmax: {fn}: grad_output is {grad_output.dtype}, the output {output.dtype}")
    check_same_device(output, grad_output, "grad_output")
    return as_dim(dim, output.ndim, fn)


def check_grad_output(grad: torch.Tensor, grad_output: torch.Tensor, n_elements: int, fn: str) -> None:
    """grad_output of a cross-entropy backward: one value, or one per loss element, on the gradient's device."""
    check_tensor(grad_output, "grad_output", fn)
    if grad_output.numel() not in (1, n_elements):
        raise ShapeError(
            f"fastsoftmax: {fn}: grad_output has {grad_output.numel()} elements; expected 1 or one per loss element ({n_elements})"
        )
    check_same_device(grad, grad_output, "grad_output")
    if not grad_output.is_floating_point():
        raise DTypeError(f"fastsoftmax: {fn}: grad_output must be floating point, got {grad_output.dtype}")
