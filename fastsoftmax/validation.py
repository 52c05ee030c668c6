"""Every check on the arguments of the PyTorch API.

Each check raises before any kernel runs, with a message that names the
argument and what was wrong with it. The backends check in addition what
the kernels would otherwise read out of bounds (class indices).
"""

import torch

#: The dtypes the ops accept (each backend says what it computes them in).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

REDUCTIONS = ("none", "mean", "sum")


def check_logits(x: torch.Tensor, name: str = "input") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastsoftmax: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"fastsoftmax: {name} must be a floating-point tensor "
            f"(float16, bfloat16, float32 or float64), got dtype {x.dtype}"
        )
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"fastsoftmax: {name} is on device '{x.device}'; only CPU and CUDA tensors are supported")


def check_same_device(x: torch.Tensor, other: torch.Tensor, name: str) -> None:
    if other.device != x.device:
        raise ValueError(f"fastsoftmax: {name} is on {other.device} but input is on {x.device}")


def normalize_dim(dim: int, ndim: int) -> int:
    """``dim`` in ``[0, ndim)``; a 0-d tensor accepts 0 and -1, as in torch."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"fastsoftmax: dim must be an int, got {type(dim).__name__}")
    rank = max(ndim, 1)
    if not -rank <= dim < rank:
        raise IndexError(
            f"fastsoftmax: dim {dim} is out of range for a tensor of {ndim} dimension(s) "
            f"(expected to be in [{-rank}, {rank - 1}])"
        )
    return dim % rank


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"fastsoftmax: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"fastsoftmax: label_smoothing must be in [0, 1], got {label_smoothing}")


def check_cross_entropy(input, target, weight, reduction, label_smoothing):
    check_logits(input)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"fastsoftmax: target must be a torch.Tensor, got {type(target).__name__}")
    check_same_device(input, target, "target")
    check_reduction(reduction)
    check_label_smoothing(label_smoothing)
    if input.ndim == 0:
        raise ValueError("fastsoftmax: input must have a class dimension: shape (C), (N, C) or (N, C, d1, ..., dk)")
    n_classes = input.shape[0 if input.ndim == 1 else 1]
    if n_classes == 0:
        raise ValueError(f"fastsoftmax: input of shape {tuple(input.shape)} has no classes")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError("fastsoftmax: weight must be a floating-point tensor")
        check_same_device(input, weight, "weight")
        if weight.shape != (n_classes,):
            raise ValueError(
                f"fastsoftmax: weight must have shape ({n_classes},), one per class, got {tuple(weight.shape)}"
            )
    if input.shape == target.shape:
        if not target.is_floating_point():
            raise TypeError(
                f"fastsoftmax: a target of the input's shape {tuple(input.shape)} holds class probabilities "
                f"and must be floating point, got dtype {target.dtype}"
            )
        return
    if target.is_floating_point():
        raise ValueError(
            f"fastsoftmax: probability targets must have the input's shape {tuple(input.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if target.dtype not in (torch.int64, torch.uint8):
        raise TypeError(f"fastsoftmax: class-index targets must be int64 (or uint8), got dtype {target.dtype}")
    expected = input.shape[:1] + input.shape[2:] if input.ndim > 1 else torch.Size([])
    if target.shape != expected:
        raise ValueError(
            f"fastsoftmax: for input of shape {tuple(input.shape)} class-index targets must have shape "
            f"{tuple(expected)}, got {tuple(target.shape)}"
        )
