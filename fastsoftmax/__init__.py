"""fastsoftmax: fused, numerically stable softmax, log-softmax and cross-entropy.

Numba kernels for the CPU and NVIDIA GPUs behind the signatures of
``torch.nn.functional``. Swap one import::

    import fastsoftmax as F          # instead of: import torch.nn.functional as F
    loss = F.cross_entropy(logits, target, label_smoothing=0.1)

Importing this package is cheap: torch, Numba and the kernels load on first
use of a name that needs them (PEP 562), so the command line answers at
once. When torch is already imported, the ``torch.ops.fastsoftmax`` ops are
registered right away, so that they exist for code that calls them directly.

:mod:`fastsoftmax.array` runs the same kernels on NumPy and CuPy arrays
without torch, even where it is not installed (``pip install --no-deps
fastsoftmax numpy numba``); a name that needs torch then says so.
"""

import importlib
import sys

__version__ = "0.1.0"

#: public name -> the module that defines it
_LAZY = {
    "softmax": "fastsoftmax.functional",
    "log_softmax": "fastsoftmax.functional",
    "softmin": "fastsoftmax.functional",
    "cross_entropy": "fastsoftmax.functional",
    "CrossEntropyOutput": "fastsoftmax.functional",
    "linear_cross_entropy": "fastsoftmax.functional",
    "LinearCrossEntropyFunction": "fastsoftmax.ops.linear_cross_entropy",
    "SoftmaxFunction": "fastsoftmax.ops.softmax",
    "LogSoftmaxFunction": "fastsoftmax.ops.softmax",
    "CrossEntropyFunction": "fastsoftmax.ops.cross_entropy",
    "empty_cache": "fastsoftmax.ops.pool",
    "vocab_parallel_cross_entropy": "fastsoftmax.distributed",
    "vocab_parallel_linear_cross_entropy": "fastsoftmax.distributed",
}

#: submodules reachable as attributes (``fastsoftmax.nn.CrossEntropyLoss``)
_SUBMODULES = {"nn", "functional", "ops", "errors", "validation", "backends", "kernels", "distributed", "array"}

_ALIASES = {"naive": "fastsoftmax.apps.naive"}

__all__ = [
    "softmax",
    "log_softmax",
    "softmin",
    "cross_entropy",
    "CrossEntropyOutput",
    "SoftmaxFunction",
    "LogSoftmaxFunction",
    "CrossEntropyFunction",
    "linear_cross_entropy",
    "LinearCrossEntropyFunction",
    "nn",
    "naive",
    "empty_cache",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]


def _import(module: str, name: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != "torch":
            raise
        raise ModuleNotFoundError(
            f"fastsoftmax.{name} needs PyTorch, which is not installed: pip install torch "
            "(fastsoftmax.array runs on NumPy arrays without it)",
            name="torch",
        ) from error


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_import(_LAZY[name], name), name)
    elif name in _SUBMODULES:
        value = _import(f"{__name__}.{name}", name)
    elif name in _ALIASES:
        value = _import(_ALIASES[name], name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)


if sys.modules.get("torch") is not None:
    from . import ops  # noqa: F401  (registers torch.ops.fastsoftmax.*)
