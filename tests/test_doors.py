"""Every public door checks its arguments before a kernel runs: no crash, no out-of-bounds read.

Numba does no bounds checks, so a target shorter than the batch, a weight
shorter than the classes or a grad_output shorter than the output would be
read past its end. The doors: ``fastsoftmax.*``, ``fastsoftmax.nn.*``, the
``*Function.apply`` classes and ``torch.ops.fastsoftmax.*``. Each malformed
call here once crashed or read out of bounds through one of them.
"""

import pytest
import torch
from helpers import assert_close, randn

import fastsoftmax
from fastsoftmax import errors

X = randn(4, 5, seed=0)
T = torch.tensor([0, 1, 2, 3])
OPS = torch.ops.fastsoftmax


def _ce_function(x, t, w=None, ignore_index=-100, reduction="mean", eps=0.0):
    return fastsoftmax.CrossEntropyFunction.apply(x, t, w, ignore_index, reduction, eps)


def _ce_op(x, t, w=None, ignore_index=-100, reduction="mean", eps=0.0):
    return OPS.cross_entropy(x, t, w, ignore_index, reduction, eps, 0.0, True, False)[0]


def _ce_functional(x, t, w=None, ignore_index=-100, reduction="mean", eps=0.0):
    return fastsoftmax.cross_entropy(x, t, w, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps)


CE_DOORS = {"functional": _ce_functional, "Function.apply": _ce_function, "torch.ops": _ce_op}


@pytest.mark.parametrize("door", list(CE_DOORS))
@pytest.mark.parametrize(
    "args,error",
    [
        ((X, T[:3]), ValueError),  # a target shorter than the batch
        ((X, torch.tensor([0, 1, 2, 3, 4, 0])), ValueError),  # longer
        ((X, T, torch.ones(1)), RuntimeError),  # a weight of length 1
        ((X, T, torch.ones(5, dtype=torch.float64)), RuntimeError),  # a weight of another dtype
        ((X, torch.tensor([0, 1, 2, 9])), IndexError),  # a class index past C
        ((X, torch.tensor([0, -7, 2, 3])), IndexError),  # a negative one
        ((X, T.int()), RuntimeError),  # int32 targets
        ((X.long(), T), NotImplementedError),  # integer logits
        ((randn(4, 5, 3), torch.zeros(4, 2, dtype=torch.long)), RuntimeError),  # K-dim target of the wrong size
        ((X, T, None, -100, "avg"), ValueError),  # an unknown reduction
        ((X, torch.rand(4, 5), None, 0), RuntimeError),  # ignore_index with probabilities
    ],
    ids=lambda v: "" if isinstance(v, (tuple, type)) else str(v),
)
def test_cross_entropy_doors_check(door, args, error):
    with pytest.raises(error):
        CE_DOORS[door](*args)


def test_cross_entropy_backward_op_checks_grad_output():
    grad = randn(6, 9)
    with pytest.raises(errors.ShapeError, match="grad_output has 3 elements"):
        OPS.cross_entropy_backward(grad, torch.ones(3), torch.float32)
    with pytest.raises(errors.ShapeError):
        OPS.cross_entropy_backward(grad, torch.ones(7), torch.float32)
    out = OPS.cross_entropy_backward(grad, torch.full((6,), 2.0), torch.float32)
    assert_close(out, grad * 2)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_ops_check_and_normalise_dim(name):
    op = getattr(OPS, name)
    with pytest.raises(NotImplementedError, match="not implemented for 'Long'"):
        op(torch.arange(6).reshape(2, 3), 1)
    with pytest.raises(IndexError, match="out of range"):
        op(X, 2)
    xt = randn(7, 4).t()  # transposed: dim -1 is the non-contiguous one
    assert_close(op(xt, -1), getattr(torch, name)(xt.double(), -1), dtype=torch.float32)
    backward = getattr(OPS, f"{name}_backward")
    y = op(X, 1)
    with pytest.raises(errors.ShapeError, match="does not match"):
        backward(y, torch.ones(4, 4), 1)  # a grad_output shorter than the output
    with pytest.raises(errors.DTypeError):
        backward(y, torch.ones(4, 5, dtype=torch.float64), 1)


@pytest.mark.parametrize("cls", [fastsoftmax.SoftmaxFunction, fastsoftmax.LogSoftmaxFunction])
def test_softmax_functions_check(cls):
    with pytest.raises(NotImplementedError):
        cls.apply(torch.arange(6).reshape(2, 3), 1)
    with pytest.raises(IndexError):
        cls.apply(X, -3)
    x = X.clone().requires_grad_()
    y = cls.apply(x, -1)  # a negative dim is normalised
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_modules_check_too():
    with pytest.raises(ValueError):
        fastsoftmax.nn.CrossEntropyLoss()(X, T[:3])
    with pytest.raises(RuntimeError):
        fastsoftmax.nn.CrossEntropyLoss(weight=torch.ones(2))(X, T)
    with pytest.raises(IndexError):
        fastsoftmax.nn.Softmax(dim=3)(X)
