"""Drop-in parity: the same call to torch and to fastsoftmax gives the same result or the same kind of error.

Each case is a function of the module under test (``torch.nn.functional`` or
``fastsoftmax``). When torch raises, ours must raise an instance of torch's
exception class (ours may be a subclass, e.g. ``ShapeError(ValueError,
RuntimeError)``); otherwise the results must match in shape, dtype and value,
NaN where torch's is NaN, and so must the gradients.
"""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close, randn

import fastsoftmax
from fastsoftmax import errors

NAN, INF = float("nan"), float("inf")


def _x(*shape, dtype=torch.float32, seed=0):
    return randn(*shape, dtype=dtype, seed=seed)


def _bad_rows():
    """Rows torch's log-softmax makes NaN (NaN, +inf, only -inf) between ordinary ones."""
    return torch.tensor([[1.0, 2.0, 3.0], [NAN, 0.0, 1.0], [INF, 0.0, 1.0], [-INF, -INF, -INF], [0.5, 0.2, 0.1]])


T4 = torch.tensor([0, 1, 2, 3])

# name -> call(F), F the functional module under test
ERROR_CASES = {
    # cross-entropy: targets
    "target out of range": lambda F: F.cross_entropy(_x(4, 5), torch.tensor([0, 1, 2, 5])),
    "negative target": lambda F: F.cross_entropy(_x(4, 5), torch.tensor([0, -1, 2, 3])),
    "target shorter than the batch": lambda F: F.cross_entropy(_x(4, 5), torch.tensor([0, 1, 2])),
    "target longer than the batch": lambda F: F.cross_entropy(_x(4, 5), torch.tensor([0, 1, 2, 3, 4])),
    "target 2-D for 2-D input": lambda F: F.cross_entropy(_x(4, 5), T4.reshape(4, 1)),
    "target int32": lambda F: F.cross_entropy(_x(4, 5), T4.int()),
    "target bool": lambda F: F.cross_entropy(_x(4, 5), torch.tensor([True, False, True, True])),
    "target float, wrong shape": lambda F: F.cross_entropy(_x(4, 5), torch.rand(4)),
    "probabilities of another shape": lambda F: F.cross_entropy(_x(4, 5), torch.rand(4, 6)),
    "integer probabilities": lambda F: F.cross_entropy(_x(4, 5), torch.zeros(4, 5, dtype=torch.long)),
    "uint8 target with K-dim input": lambda F: F.cross_entropy(_x(3, 4, 2), torch.zeros(3, 2, dtype=torch.uint8)),
    "K-dim target of wrong size": lambda F: F.cross_entropy(_x(4, 5, 2), torch.zeros(4, 3, dtype=torch.long)),
    "K-dim target of wrong batch": lambda F: F.cross_entropy(_x(4, 5, 2), torch.zeros(3, 2, dtype=torch.long)),
    "1-D input, target of 2": lambda F: F.cross_entropy(_x(5), torch.tensor([1, 2])),
    "0-d input": lambda F: F.cross_entropy(torch.tensor(1.0), torch.tensor(0)),
    "0-d float input and target": lambda F: F.cross_entropy(torch.tensor(1.0), torch.tensor(0.0)),
    "(1, 5) input, 0-d target": lambda F: F.cross_entropy(_x(1, 5), torch.tensor(1)),
    "no classes, a kept target": lambda F: F.cross_entropy(torch.empty(4, 0), torch.zeros(4, dtype=torch.long)),
    # cross-entropy: input
    "integer logits": lambda F: F.cross_entropy(_x(4, 5).long(), T4),
    "boolean logits": lambda F: F.cross_entropy(_x(4, 5) > 0, T4),
    "sparse logits": lambda F: F.cross_entropy(_x(4, 5).to_sparse(), T4),
    # cross-entropy: weight
    "weight of length 1": lambda F: F.cross_entropy(_x(4, 5), T4, weight=torch.ones(1)),
    "weight (C, 1)": lambda F: F.cross_entropy(_x(4, 5), T4, weight=torch.ones(5, 1)),
    "weight float64 with float32 logits": lambda F: F.cross_entropy(_x(4, 5), T4, weight=torch.ones(5, dtype=torch.float64)),
    "weight float32 with bfloat16 logits": lambda F: F.cross_entropy(_x(4, 5).bfloat16(), T4, weight=torch.ones(5)),
    "weight int64": lambda F: F.cross_entropy(_x(4, 5), T4, weight=torch.ones(5, dtype=torch.long)),
    "weight a list": lambda F: F.cross_entropy(_x(4, 5), T4, weight=[1.0] * 5),
    "weight on meta": lambda F: F.cross_entropy(_x(4, 5), T4, weight=torch.ones(5, device="meta")),
    "weight of probabilities, wrong length": lambda F: F.cross_entropy(_x(4, 5), torch.rand(4, 5), weight=torch.ones(3)),
    # cross-entropy: options
    "reduction avg": lambda F: F.cross_entropy(_x(4, 5), T4, reduction="avg"),
    "reduction None": lambda F: F.cross_entropy(_x(4, 5), T4, reduction=None),
    "label_smoothing 1.5": lambda F: F.cross_entropy(_x(4, 5), T4, label_smoothing=1.5),
    "label_smoothing inf": lambda F: F.cross_entropy(_x(4, 5), T4, label_smoothing=INF),
    "label_smoothing a 1-d tensor": lambda F: F.cross_entropy(_x(4, 5), T4, label_smoothing=torch.tensor([0.1])),
    "label_smoothing None": lambda F: F.cross_entropy(_x(4, 5), T4, label_smoothing=None),
    "ignore_index 1.5": lambda F: F.cross_entropy(_x(4, 5), T4, ignore_index=1.5),
    "ignore_index True": lambda F: F.cross_entropy(_x(4, 5), T4, ignore_index=True),
    "ignore_index 2**63": lambda F: F.cross_entropy(_x(4, 5), T4, ignore_index=2**63),
    "ignore_index a float tensor": lambda F: F.cross_entropy(_x(4, 5), T4, ignore_index=torch.tensor(1.5)),
    "ignore_index with probabilities": lambda F: F.cross_entropy(_x(4, 5), torch.rand(4, 5), ignore_index=0),
    "target on meta": lambda F: F.cross_entropy(_x(4, 5), T4.to("meta")),
    "target a list": lambda F: F.cross_entropy(_x(4, 5), [0, 1, 2, 3]),
    # softmax family
    "softmax of integers": lambda F: F.softmax(torch.arange(6).reshape(2, 3), 1),
    "softmax of booleans": lambda F: F.softmax(torch.ones(2, 3, dtype=torch.bool), 1),
    "softmax of complex": lambda F: F.softmax(torch.ones(2, 3, dtype=torch.complex64), 1),
    "log_softmax of integers": lambda F: F.log_softmax(torch.arange(6).reshape(2, 3), 0),
    "softmin of booleans": lambda F: F.softmin(torch.ones(2, 3, dtype=torch.bool), 1),
    "softmax dim 2 of 2-D": lambda F: F.softmax(_x(2, 3), 2),
    "log_softmax dim -3 of 2-D": lambda F: F.log_softmax(_x(2, 3), -3),
    "softmax dim 1 of 0-d": lambda F: F.softmax(torch.tensor(1.0), 1),
    "softmax dim a float": lambda F: F.softmax(_x(2, 3), 1.0),
    "softmax dim a bool": lambda F: F.softmax(_x(2, 3), True),
    "softmax dim a string": lambda F: F.softmax(_x(2, 3), "x"),
    "softmax dim a 1-d tensor": lambda F: F.softmax(_x(2, 3), torch.tensor([1])),
    "softmax dtype a string": lambda F: F.softmax(_x(2, 3), 1, dtype="float64"),
    "softmax of a list": lambda F: F.softmax([1.0, 2.0], 0),
    "softmax of sparse COO": lambda F: F.softmax(_x(2, 3).to_sparse(), 1),
    "softmax of sparse CSR": lambda F: F.softmax(_x(2, 3).to_sparse_csr(), 1),
    "softmax to a complex dtype": lambda F: F.softmax(_x(2, 3), 1, dtype=torch.complex64),
}


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_same_exception_class_as_torch(name):
    call = ERROR_CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as theirs:
            call(TF)
        with pytest.raises(Exception) as ours:
            call(fastsoftmax)
    assert isinstance(ours.value, type(theirs.value)), f"torch raised {type(theirs.value).__mro__}, we {type(ours.value).__mro__}"
    # our own check, naming the problem; or torch's own op, which we call (softmin negates with torch)
    assert str(ours.value).startswith("fastsoftmax:") or str(ours.value) == str(theirs.value)


def test_errors_are_precise_types_and_runtime_errors():
    """``except RuntimeError`` written against torch catches ours; the precise type is there too."""
    with pytest.raises(errors.ShapeError) as info:
        fastsoftmax.cross_entropy(_x(4, 5), T4, weight=torch.ones(1))
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)
    with pytest.raises(errors.DTypeError) as info:
        fastsoftmax.cross_entropy(_x(4, 5), T4.int())
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, TypeError)
    with pytest.raises(NotImplementedError, match="not implemented for 'Long'"):
        fastsoftmax.softmax(torch.arange(3), 0)
    with pytest.raises(IndexError, match="Target 5 is out of bounds"):
        fastsoftmax.cross_entropy(_x(4, 5), torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match=r"Expected input batch_size \(4\) to match target batch_size \(3\)"):
        fastsoftmax.cross_entropy(_x(4, 5), torch.tensor([0, 1, 2]))


# name -> (call(F) -> tensor or tuple, inputs to differentiate or None)
def _ce(x, t, **kw):
    return lambda F: F.cross_entropy(x, t, **kw)


_BAD = _bad_rows()
_T_IGN = torch.tensor([0, -100, -100, -100, 1])
_W = torch.tensor([1.0, 2.0, 3.0])
VALUE_CASES = {
    "ignored non-finite rows, mean": (_BAD, _T_IGN, dict()),
    "ignored non-finite rows, none": (_BAD, _T_IGN, dict(reduction="none")),
    "ignored non-finite rows, sum, weight, smoothing": (_BAD, _T_IGN, dict(reduction="sum", weight=_W, label_smoothing=0.1)),
    "kept non-finite rows": (_BAD, torch.tensor([0, 1, 1, 1, 1]), dict(reduction="none")),
    "zero kept weight, mean": (_x(3, 4), torch.tensor([0, 0, 0]), dict(weight=torch.tensor([0.0, 1, 1, 1]))),
    "zero kept weight, mean, smoothing": (_x(3, 4), torch.tensor([0, 0, 0]), dict(weight=torch.tensor([0.0, 1, 1, 1]), label_smoothing=0.1)),
    "zero kept weight, one ignored": (_x(3, 4), torch.tensor([0, -100, 0]), dict(weight=torch.tensor([0.0, 1, 1, 1]))),
    "all ignored, mean": (_x(3, 4), torch.tensor([-100] * 3), dict(label_smoothing=0.1)),
    "all ignored, sum": (_x(3, 4), torch.tensor([-100] * 3), dict(reduction="sum")),
    "masked logit, target elsewhere": (torch.tensor([[-INF, 0.0, 1.0]]), torch.tensor([2]), dict(reduction="none")),
    "masked target logit": (torch.tensor([[-INF, 0.0, 1.0]]), torch.tensor([0]), dict(reduction="none")),
    "masked logit, smoothing": (torch.tensor([[-INF, 0.0, 1.0]]), torch.tensor([2]), dict(label_smoothing=0.1)),
    "label_smoothing -0.1 is none": (_x(4, 5), T4, dict(label_smoothing=-0.1)),
    "label_smoothing NaN is none": (_x(4, 5), T4, dict(label_smoothing=NAN)),
    "label_smoothing 1": (_x(4, 5), T4, dict(label_smoothing=1)),
    "label_smoothing a 0-d tensor": (_x(4, 5), T4, dict(label_smoothing=torch.tensor(0.1))),
    "ignore_index a 0-d tensor": (_x(4, 5), T4, dict(ignore_index=torch.tensor(1))),
    "ignore_index a NumPy int": (_x(4, 5), T4, dict(ignore_index=np.int64(2))),
    "ignore_index beyond the classes": (_x(4, 5), torch.tensor([0, 7, 2, 7]), dict(ignore_index=7)),
    "negative ignore_index with probabilities": (_x(4, 5), torch.softmax(_x(4, 5, seed=1), 1), dict(ignore_index=-1)),
    "uint8 targets": (_x(3, 4), torch.tensor([0, 3, 1], dtype=torch.uint8), dict()),
    "uint8 ignore_index 255": (_x(3, 4), torch.tensor([0, 255, 1], dtype=torch.uint8), dict(ignore_index=255)),
    "1-D input, (1,) target": (_x(5), torch.tensor([3]), dict(reduction="none")),
    "1-D input, ignored 0-d target": (_x(5), torch.tensor(-100), dict()),
    # the loss takes the promoted dtype, as torch's; torch computes it at the logits' precision, we at the promoted
    "probabilities float64, logits float32": (_x(4, 5), torch.softmax(_x(4, 5, dtype=torch.float64, seed=2), 1), dict(), torch.float32),
    "probabilities float32, logits bfloat16": (
        _x(4, 5).bfloat16(),
        torch.softmax(_x(4, 5, seed=2), 1),
        dict(reduction="none"),
        torch.bfloat16,
    ),
    "probabilities, integer weight": (_x(4, 5), torch.softmax(_x(4, 5, seed=2), 1), dict(weight=torch.arange(5))),
    "(0, 0) input, none": (torch.empty(0, 0), torch.empty(0, dtype=torch.long), dict(reduction="none")),
    "(0, 0) input, mean": (torch.empty(0, 0), torch.empty(0, dtype=torch.long), dict()),
    "(3, 0) all ignored, sum": (torch.empty(3, 0), torch.full((3,), -100), dict(reduction="sum")),
    "(3, 0) all ignored, smoothing": (torch.empty(3, 0), torch.full((3,), -100), dict(reduction="none", label_smoothing=0.1)),
    "(3, 0) probabilities, none": (torch.empty(3, 0), torch.empty(3, 0), dict(reduction="none")),
    "(3, 0) probabilities, mean": (torch.empty(3, 0), torch.empty(3, 0), dict()),
    "(0, 5) input, sum": (torch.empty(0, 5), torch.empty(0, dtype=torch.long), dict(reduction="sum", weight=torch.ones(5))),
    "(2, 5, 0) input": (torch.empty(2, 5, 0), torch.empty(2, 0, dtype=torch.long), dict(reduction="none")),
    "K-dim ignored NaN position": (
        torch.tensor([[[0.1, NAN, -INF], [0.2, 1.0, -INF], [0.3, 2.0, -INF]]]),
        torch.tensor([[0, -100, -100]]),
        dict(reduction="none"),
    ),
    "elementwise_mean": (_x(4, 5), T4, dict(reduction="elementwise_mean")),
    "legacy size_average=False": (_x(4, 5), T4, dict(size_average=False, reduction="bogus")),
}


def _compare(ours, theirs, precision=None):
    """Same type, shape, dtype, NaN placement, and values within the tolerance of ``precision`` (the result's dtype)."""
    assert type(ours) is type(theirs)
    if isinstance(theirs, torch.Tensor):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        if not theirs.is_floating_point():
            assert torch.equal(ours, theirs)
            return
        assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
        assert_close(ours, theirs, dtype=precision or theirs.dtype)
    else:
        for a, b in zip(ours, theirs):
            _compare(a, b)


@pytest.mark.parametrize("name", list(VALUE_CASES))
def test_same_values_and_nan_placement_as_torch(name):
    x, t, kw, *precision = VALUE_CASES[name]
    precision = precision[0] if precision else None
    results = []
    for F in (TF, fastsoftmax):
        xx = x.detach().clone().requires_grad_(x.numel() > 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = F.cross_entropy(xx, t, **kw)
        grad = None
        if xx.requires_grad:
            try:
                (grad,) = torch.autograd.grad(loss, xx, torch.ones_like(loss))
            except RuntimeError:
                assert F is TF, "our backward raised"  # torch's backward of a (5,) input with a (1,) target does
        results.append((loss, grad))
    (loss, grad), (ref, ref_grad) = results[1], results[0]
    _compare(loss.detach(), ref.detach(), precision)
    if ref_grad is not None:
        _compare(grad, ref_grad, precision)


SOFTMAX_VALUE_CASES = {
    "integers with dtype=float64": lambda F: F.softmax(torch.arange(6).reshape(2, 3), 1, dtype=torch.float64),
    "booleans with dtype=float32": lambda F: F.log_softmax(torch.tensor([[True, False]]), 1, dtype=torch.float32),
    "uint8 softmin wraps around": lambda F: F.softmin(torch.tensor([1, 0, 2], dtype=torch.uint8), 0, dtype=torch.float32),
    "empty integers pass through": lambda F: F.softmax(torch.ones(0, 3, dtype=torch.long), 1),
    "dim a 0-d tensor": lambda F: F.softmax(_x(2, 3), torch.tensor(1)),
    "dim a NumPy int": lambda F: F.log_softmax(_x(2, 3), np.int64(0)),
    "0-d input": lambda F: F.log_softmax(torch.tensor(2.0), -1),
    "(0, 5) input": lambda F: F.softmax(torch.empty(0, 5), 1),
    "(5, 0) input": lambda F: F.softmax(torch.empty(5, 0), 0),
    "half input to float32": lambda F: F.softmax(_x(3, 7).half(), 1, dtype=torch.float32),
    "NaN rows": lambda F: F.softmax(_bad_rows(), 1),
    "softmin NaN rows": lambda F: F.softmin(_bad_rows(), 1),
    "log_softmax overflow of x - max": lambda F: F.log_softmax(torch.tensor([[-3.4e38, 3.4e38, 0.0]]), 1),
}


@pytest.mark.parametrize("name", list(SOFTMAX_VALUE_CASES))
def test_softmax_family_values_as_torch(name):
    call = SOFTMAX_VALUE_CASES[name]
    _compare(call(fastsoftmax), call(TF))


NEG = torch._neg_view  # a view whose memory holds the values negated (torch resolves it on reading)

NEGATIVE_VIEW_CASES = {
    "softmax, book's rows": lambda F: F.softmax(NEG(_x(6, 4)), 1),
    "softmax, 3-D over dim 0": lambda F: F.softmax(NEG(_x(3, 4, 5)), 0),
    "log_softmax, long rows": lambda F: F.log_softmax(NEG(_x(4, 300)), -1),
    "cross_entropy, book's call": lambda F: F.cross_entropy(NEG(_x(6, 4)), torch.tensor([0, 1, 2, 3, 0, 1])),
    "cross_entropy, negated targets": lambda F: F.cross_entropy(_x(4, 5), NEG(-T4)),
    "cross_entropy, weights and none": lambda F: F.cross_entropy(_x(4, 5), T4, weight=NEG(-torch.arange(1.0, 6.0)), reduction="none"),
    "cross_entropy, K-dim": lambda F: F.cross_entropy(NEG(_x(2, 5, 3)), torch.tensor([[0, 1, 4], [2, 3, 0]])),
    "cross_entropy, probabilities": lambda F: F.cross_entropy(_x(4, 5), NEG(-torch.softmax(_x(4, 5, seed=3), 1))),
}


@pytest.mark.parametrize("name", list(NEGATIVE_VIEW_CASES))
def test_negative_views_read_as_torch(name):
    """Negative views (``torch._neg_view``) are read as their values, as torch reads them, gradients included."""
    call = NEGATIVE_VIEW_CASES[name]
    _compare(call(fastsoftmax), call(TF))


def test_negative_views_through_every_door():
    x, dy = _x(6, 4), _x(6, 4, seed=1)
    t = torch.tensor([0, 1, 2, 3, 0, 1])
    want = TF.softmax(-x, 1)
    assert_close(fastsoftmax.SoftmaxFunction.apply(NEG(x), 1), want)
    assert_close(torch.ops.fastsoftmax.softmax(NEG(x), 1), want)
    # gradients: into a negative view of a leaf (the view's gradient is negated back), and a negated grad_output
    def log_softmax_grad(F):
        leaf = x.clone().requires_grad_()
        F.log_softmax(NEG(leaf), 1).backward(NEG(-dy))
        return leaf.grad

    assert_close(log_softmax_grad(fastsoftmax), log_softmax_grad(TF))

    # the in-place gradient option never writes into a negative view's memory (it holds the values negated)
    def cross_entropy_grad(F, **kw):
        leaf = x.clone().requires_grad_()
        F.cross_entropy(NEG(leaf), t, **kw).backward()
        return leaf.grad

    assert_close(cross_entropy_grad(fastsoftmax, inplace_backward=True), cross_entropy_grad(TF))
    W = _x(5, 4, seed=2)
    ref = TF.cross_entropy(_x(3, 4, seed=3) @ (-W).t(), torch.tensor([0, 4, 2]))
    assert_close(fastsoftmax.linear_cross_entropy(_x(3, 4, seed=3), NEG(W), torch.tensor([0, 4, 2])), ref)


@pytest.mark.parametrize("op", ["softmax", "log_softmax", "softmin"])
def test_softmax_gradient_nan_rows_as_torch(op):
    grads = []
    for F in (TF, fastsoftmax):
        x = _bad_rows().requires_grad_()
        y = getattr(F, op)(x, 1)
        (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
        grads.append(g)
    _compare(grads[1], grads[0])


def test_softmin_and_softmax2d_modules_match_torch():
    x = _x(2, 3, 4, 5, dtype=torch.float64)
    for ours, theirs in ((fastsoftmax.nn.Softmin(1), torch.nn.Softmin(1)), (fastsoftmax.nn.Softmax2d(), torch.nn.Softmax2d())):
        assert repr(ours) == repr(theirs)
        assert_close(ours(x), theirs(x))
        assert_close(ours(x[0]), theirs(x[0]))
    with pytest.raises(ValueError, match="Softmax2d: expected input to be 3D or 4D, got 2D instead"):
        fastsoftmax.nn.Softmax2d()(x[0, 0])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_meta_tensors_give_meta_results_of_torch_shapes(reduction, kind):
    x = torch.empty(4, 5, 3, device="meta", requires_grad=True)
    t = torch.empty(4, 3, dtype=torch.long, device="meta") if kind == "index" else torch.empty(4, 5, 3, device="meta")
    for F in (TF, fastsoftmax):
        loss = F.cross_entropy(x, t, reduction=reduction)
        assert loss.device.type == "meta"
        results = (loss.shape, loss.dtype)
        if F is TF:
            expected = results
    assert results == expected
    y = fastsoftmax.log_softmax(x, 1)
    assert y.device.type == "meta" and y.shape == x.shape


def test_dim_none_chooses_and_warns_as_torch():
    for rank in range(5):
        x = _x(*([2] * rank))
        with pytest.warns(UserWarning, match="Implicit dimension choice for softmax"):
            ours = fastsoftmax.softmax(x)
        with pytest.warns(UserWarning):
            theirs = TF.softmax(x)
        assert_close(ours, theirs)


def test_nn_modules_keep_torch_construction():
    ours = fastsoftmax.nn.CrossEntropyLoss(reduction="bogus", label_smoothing=2.0, ignore_index=1.5)  # torch checks at call
    assert ours.reduction == "bogus"
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        ours(_x(4, 5), T4)
    assert fastsoftmax.nn.CrossEntropyLoss(size_average=False).reduction == "sum"
    assert math.isclose(
        float(fastsoftmax.nn.CrossEntropyLoss(z_loss=0.5)(_x(4, 5), T4)),
        float(fastsoftmax.cross_entropy(_x(4, 5), T4, z_loss=0.5)),
    )


def test_function_doors_under_torch_func_transforms():
    """The ``*Function.apply`` doors under grad and vmap give torch's results (torch refuses Functions without
    setup_context there; ours then compute in torch's ops, as fastsoftmax's functions do)."""
    x = _x(6, 5, dtype=torch.float64)
    t = torch.tensor([0, 4, -100, 1, 2, 3])
    W = _x(5, 5, dtype=torch.float64, seed=1)
    for door, ref in (
        (lambda z: fastsoftmax.SoftmaxFunction.apply(z, 1), lambda z: TF.softmax(z, 1)),
        (lambda z: fastsoftmax.LogSoftmaxFunction.apply(z, -1), lambda z: TF.log_softmax(z, -1)),
        (
            lambda z: fastsoftmax.CrossEntropyFunction.apply(z, t, None, -100, "mean", 0.1),
            lambda z: TF.cross_entropy(z, t, label_smoothing=0.1),
        ),
        (
            lambda z: fastsoftmax.CrossEntropyFunction.apply(z, t, None, -100, "sum", 0.0, 0.0, True)[0],
            lambda z: TF.cross_entropy(z, t, reduction="sum"),
        ),
        (
            lambda z: fastsoftmax.LinearCrossEntropyFunction.apply(z, W, t, None, None, "mean"),
            lambda z: TF.linear_cross_entropy(z, W, t),
        ),
    ):
        assert_close(torch.func.grad(lambda z: door(z).sum())(x), torch.func.grad(lambda z: ref(z).sum())(x))
        assert_close(torch.func.vmap(door)(x[None].expand(3, 6, 5)), torch.func.vmap(ref)(x[None].expand(3, 6, 5)))
    # outside transforms the doors are the Functions themselves
    y = fastsoftmax.SoftmaxFunction.apply(x.clone().requires_grad_(), 1)
    assert type(y.grad_fn).__name__ == "SoftmaxFunctionBackward"
    _, lse = fastsoftmax.CrossEntropyFunction.apply(x, t, None, -100, "none", 0.0, 0.0, True)
    assert_close(lse, torch.logsumexp(x, 1))
    _, lse_t = torch.func.vmap(lambda z: fastsoftmax.CrossEntropyFunction.apply(z, t, None, -100, "none", 0.0, 0.0, True))(x[None])
    assert_close(lse_t[0], lse)


ZERO = torch._efficientzerotensor  # autograd's zeros with no memory (data_ptr 0)


@pytest.mark.parametrize("shape", [(8, 5), (40, 300)], ids=["book", "long rows"])
def test_tensors_without_memory_as_torch(shape):
    """Efficient zero tensors (inputs, targets, gradients) and functionalize's wrappers: torch's results, no crash."""
    n, c = shape
    t = torch.arange(n) % c
    x = _x(n, c)
    for F in (fastsoftmax,):
        _compare(F.softmax(ZERO(shape), -1), TF.softmax(torch.zeros(shape), -1))
        _compare(F.cross_entropy(x, ZERO((n,), dtype=torch.long)), TF.cross_entropy(x, torch.zeros(n, dtype=torch.long)))
        for op, ref in ((F.softmax, TF.softmax), (F.log_softmax, TF.log_softmax)):
            grads = []
            for f in (op, ref):
                leaf = x.clone().requires_grad_()
                y = f(leaf, -1)
                y.register_hook(lambda g: ZERO(g.shape))
                y.sum().backward()
                grads.append(leaf.grad)
            _compare(grads[0], grads[1])
        W = _x(c, 7, seed=2)
        xi = _x(n, 7, seed=3)
        _compare(F.linear_cross_entropy(xi, W, ZERO((n,), dtype=torch.long)), TF.linear_cross_entropy(xi, W, torch.zeros(n, dtype=torch.long)))
    for ours, theirs in (
        (lambda a: fastsoftmax.softmax(a, -1), lambda a: TF.softmax(a, -1)),
        (lambda a: fastsoftmax.cross_entropy(a, t), lambda a: TF.cross_entropy(a, t)),
        (lambda a: fastsoftmax.linear_cross_entropy(a, _x(4, c, seed=5), t % 4), lambda a: TF.linear_cross_entropy(a, _x(4, c, seed=5), t % 4)),
    ):
        _compare(torch.func.functionalize(ours)(x), theirs(x))


@pytest.mark.parametrize("shape", [(4, 3), (40, 300)], ids=["book", "long rows"])
def test_sparse_gradients_as_torch(shape):
    """A sparse grad_output: torch's own backward op decides (today it raises NotImplementedError), for ours too."""
    g = _x(*shape, seed=1).to_sparse()
    errors_seen = []
    for F in (TF, fastsoftmax):
        for op in (F.softmax, F.log_softmax):
            x = _x(*shape).requires_grad_()
            try:
                op(x, 1).backward(g)
                errors_seen.append(None)
            except Exception as e:  # noqa: BLE001 (the class is what is compared)
                errors_seen.append(type(e))
    assert errors_seen[:2] == errors_seen[2:], errors_seen


_T8 = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
_W = _x(3, 5, seed=4)

#: name -> (ours, torch's), on an (8, 5) input: the functions and the *Function.apply doors
TRACED_CALLS = {
    "softmax": (lambda a: fastsoftmax.softmax(a, -1), lambda a: TF.softmax(a, -1)),
    "log_softmax": (lambda a: fastsoftmax.log_softmax(a, 1), lambda a: TF.log_softmax(a, 1)),
    "cross_entropy": (lambda a: fastsoftmax.cross_entropy(a, _T8, label_smoothing=0.1), lambda a: TF.cross_entropy(a, _T8, label_smoothing=0.1)),
    "linear_cross_entropy": (lambda a: fastsoftmax.linear_cross_entropy(a, _W, _T8 % 3), lambda a: TF.linear_cross_entropy(a, _W, _T8 % 3)),
    "SoftmaxFunction": (lambda a: fastsoftmax.SoftmaxFunction.apply(a, 1), lambda a: TF.softmax(a, 1)),
    "LogSoftmaxFunction": (lambda a: fastsoftmax.LogSoftmaxFunction.apply(a, 1), lambda a: TF.log_softmax(a, 1)),
    "CrossEntropyFunction": (
        lambda a: fastsoftmax.CrossEntropyFunction.apply(a, _T8, None, -100, "mean", 0.1),
        lambda a: TF.cross_entropy(a, _T8, label_smoothing=0.1),
    ),
    "LinearCrossEntropyFunction": (
        lambda a: fastsoftmax.LinearCrossEntropyFunction.apply(a, _W, _T8 % 3),
        lambda a: TF.linear_cross_entropy(a, _W, _T8 % 3),
    ),
}


@pytest.mark.parametrize("name", list(TRACED_CALLS))
def test_tracers_fake_tensors_and_forward_ad_as_torch(name):
    """torch.jit.trace, make_fx and FakeTensorMode see the registered torch.ops.fastsoftmax ops (a traced graph
    recomputes on new inputs; fake inputs give fake results of torch's shapes); forward-mode AD computes torch's
    tangents. For the functions and the doors alike."""
    import torch.autograd.forward_ad as fwAD
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    ours, theirs = TRACED_CALLS[name]
    x, x2, v = _x(8, 5), _x(8, 5, seed=9), _x(8, 5, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(ours, (x,), check_trace=False)
    _compare(traced(x2), theirs(x2))
    gm = make_fx(ours)(x)
    assert "fastsoftmax" in gm.code
    _compare(gm(x2), theirs(x2))
    with FakeTensorMode(allow_non_fake_inputs=True):
        out, expected = ours(x), theirs(x)
    assert type(out).__name__ == type(expected).__name__ == "FakeTensor"
    assert out.shape == expected.shape and out.dtype == expected.dtype
    tangents = []
    for f in (ours, theirs):
        with fwAD.dual_level():
            out = fwAD.unpack_dual(f(fwAD.make_dual(x, v)))
            assert out.tangent is not None
            tangents.append(out.tangent)
    _compare(tangents[0], tangents[1])
