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


# --- linear cross-entropy -----------------------------------------------------------------


def _check_optional_tensor(value, name: str, fn: str) -> None:
    if value is not None and not isinstance(value, torch.Tensor):
        raise TypeError(f"fastsoftmax: {fn}(): argument '{name}' must be Tensor or None, not {_type_name(value)}")


def check_linear_cross_entropy(input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing):
    """Check every argument of :func:`fastsoftmax.linear_cross_entropy`, in the order torch checks them.

    First torch's own checks of ``F.linear_cross_entropy`` (dimensions,
    ``in_features``, the bias's shape, K-dim needing a batch, ``ignore_index``
    with probabilities), then those its ``F.linear`` and ``F.cross_entropy``
    make, on the logits' shape ``(N, C, d1, ..., dK)`` without computing them.
    Returns ``(prob, ignore_index, label_smoothing, logits_shape)``.
    """
    if plain_linear_call(input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing):
        eps = label_smoothing if label_smoothing > 0.0 else 0.0
        return False, -100 if ignore_index is None else ignore_index, eps, (input.shape[0], linear_weight.shape[0])
    fn = "linear_cross_entropy"
    check_tensor(input, "input", fn)
    check_tensor(linear_weight, "linear_weight", fn)
    check_tensor(target, "target", fn)
    _check_optional_tensor(linear_bias, "linear_bias", fn)
    _check_optional_tensor(weight, "weight", fn)
    if ignore_index is not None:
        ignore_index = as_int(ignore_index, "ignore_index", fn, 6)
    if not 1 <= input.dim() <= 2:
        raise ShapeError(f"fastsoftmax: expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise ShapeError(f"fastsoftmax: expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    in_features = input.shape[-1]
    if in_features != linear_weight.shape[-1]:
        raise ShapeError(
            "fastsoftmax: expected equal input and linear_weight last dimensions (in_features), "
            f"got {in_features} and {linear_weight.shape[-1]}, respectively"
        )
    n_classes, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (n_classes, *out_features):
        raise ShapeError(f"fastsoftmax: expected linear_bias shape {(n_classes, *out_features)}, got {tuple(linear_bias.shape)}")
    if out_features and input.dim() == 1:
        raise ShapeError(
            f"fastsoftmax: K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires"
            f" batched input, (N, {in_features}), got unbatched input with shape {tuple(input.shape)}"
        )
    logits_shape = (*input.shape[:-1], n_classes, *out_features)
    prob = tuple(target.shape) == logits_shape
    if prob and ignore_index is not None:
        raise ArgumentError("fastsoftmax: ignore_index cannot be specified when target contains probabilities")
    for name, t in (("input", input), ("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is not None:
            check_layout(t, fn)
            check_device(t, name)
            if t is not input:
                check_same_device(input, t, name)
    if linear_weight.dtype != input.dtype:
        raise DTypeError(
            "fastsoftmax: expected m1 and m2 to have the same dtype, but got: "
            f"{str(input.dtype).removeprefix('torch.')} != {str(linear_weight.dtype).removeprefix('torch.')}"
        )
    if linear_bias is not None and linear_bias.dtype != input.dtype:
        raise DTypeError(
            f"fastsoftmax: self and mat2 must have the same dtype, but got {scalar_name(linear_bias.dtype)} "
            f"and {scalar_name(input.dtype)}: linear_bias must have the input's dtype"
        )
    # a stand-in for the logits: their shape, dtype and device, no memory
    logits = input.new_empty(()).expand(logits_shape)
    _, ignore_index, eps = check_cross_entropy(
        logits, target, weight, -100 if ignore_index is None else ignore_index, label_smoothing, ignore_index_given=False
    )
    return prob, ignore_index, eps, logits_shape


def plain_linear_call(input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing) -> bool:
    """Whether this is the common CPU call, ``(N, H)`` input, ``(C, H)`` weight, ``(N,)`` int64 targets, no class
    weights, and every check of :func:`check_linear_cross_entropy` holds: the same checks, in a few attribute reads."""
    if not (isinstance(input, torch.Tensor) and isinstance(linear_weight, torch.Tensor) and isinstance(target, torch.Tensor)):
        return False
    if not (input.is_cpu and linear_weight.is_cpu and target.is_cpu):
        return False
    dtype = input.dtype
    x_shape, w_shape = input.shape, linear_weight.shape
    if linear_bias is not None and not (
        isinstance(linear_bias, torch.Tensor)
        and linear_bias.is_cpu
        and linear_bias.ndim == 1
        and linear_bias.dtype == dtype
        and linear_bias.layout == torch.strided
        and linear_bias.shape[0] == w_shape[0]
    ):
        return False
    return (
        weight is None
        and (ignore_index is None or (type(ignore_index) is int and _INT64_MIN <= ignore_index <= _INT64_MAX))
        and type(label_smoothing) in (float, int)
        and 0.0 <= label_smoothing <= 1.0
        and len(x_shape) == 2
        and len(w_shape) == 2
        and target.ndim == 1
        and target.dtype == torch.int64
        and dtype in FLOAT_DTYPES
        and linear_weight.dtype == dtype
        and x_shape[1] == w_shape[1]
        and target.shape[0] == x_shape[0]
        and input.layout == torch.strided
        and linear_weight.layout == torch.strided
    )


def check_softcap(softcap, fn: str, position: int):
    """``softcap`` as a positive float, or None."""
    if softcap is None:
        return None
    cap = as_float(softcap, "softcap", fn, position)
    if not cap > 0:
        raise ArgumentError(f"fastsoftmax: softcap must be positive, got {cap}")
    return cap


def chunk_rows_of(options, n_rows: int, in_features: int, n_classes: int):
    """The rows per chunk that a :class:`torch.nn.LinearCrossEntropyOptions` asks for, or None to use the memory budget.

    ``batch_chunk_size`` is taken as given; an explicit ``chunking_method``
    (``"aspect_ratio[:f]"``) is torch's formula, and the two must agree, as
    torch requires; ``"auto"`` alone leaves the choice to us.
    """
    if options is None:
        return None
    if not isinstance(options, torch.nn.LinearCrossEntropyOptions):
        raise TypeError(
            f"fastsoftmax: linear_cross_entropy(): argument 'options' must be LinearCrossEntropyOptions or None, "
            f"not {_type_name(options)}"
        )
    method, size = options.chunking_method, options.batch_chunk_size
    if method == "auto":
        return None if size is None else max(1, min(size, n_rows))
    if method is None:
        return max(1, n_rows if size is None else min(size, n_rows))
    factor = int(method.split(":", 1)[1]) if ":" in method else 1
    target = -(-n_rows // max(1, -(-n_classes // max(in_features, 1))))
    rows = min((1 << (target - 1).bit_length()) // factor, n_rows) if target else 0
    if size is not None and size != rows:
        raise ArgumentError(
            f"fastsoftmax: batch_chunk_size (={size}) and chunking_method ('{method}') give different "
            f"chunk sizes ({size} vs {rows}); pass only one."
        )
    return max(1, rows)
