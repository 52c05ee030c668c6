"""Dtype, device and argument policy: every check on user input lives here.

Each check raises before any kernel runs, with a message that names the
argument and what was wrong with it.
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
