"""Fuzzing every op against torch in float64: random rank, dim, strides, dtypes, +-inf and NaN, every option.

The budget is small in the default run; ``FASTSOFTMAX_FUZZ_EXAMPLES=5000``
runs a large one (each example is one configuration). The reference is
torch's own op on the same, already rounded, input in float64, rounded to
the dtype under test; NaN must sit where the reference's does, and values
agree within the dtype's tolerance relative to the largest value of the
result (gradients cancel, so an elementwise relative bound would be wrong).
"""

import os

import pytest
import torch
import torch.nn.functional as TF
from helpers import TOLERANCES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastsoftmax

EXAMPLES = int(os.environ.get("FASTSOFTMAX_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=EXAMPLES <= 100)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SPECIALS = [float("nan"), float("inf"), float("-inf"), 0.0, 1e30, -1e30]


@st.composite
def logits(draw, min_rank=1):
    """A tensor of random shape, dtype, scale and layout, with a few special values."""
    rank = draw(st.integers(min_rank, 4))
    shape = draw(st.lists(st.integers(0 if rank > 1 else 1, 7), min_size=rank, max_size=rank))
    if rank and draw(st.booleans()):  # now and then a long axis: the streaming and SIMD paths
        shape[draw(st.integers(0, rank - 1))] = draw(st.sampled_from([33, 257, 1100]))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 3.0, 30.0]))
    if x.numel() and draw(st.booleans()):
        flat = x.view(-1)
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from(SPECIALS))
    x = x.to(dtype)
    if rank > 1 and draw(st.booleans()):  # non-contiguous: a transposed view
        a, b = draw(st.permutations(range(rank)))[:2]
        x = x.transpose(a, b).contiguous().transpose(a, b)
    return x


def _close(ours, ref, dtype):
    """``ours`` against the float64 ``ref`` rounded to ``dtype``: same NaN and inf, values within tolerance."""
    ref = ref.to(dtype).double()
    ours = ours.double()
    assert ours.shape == ref.shape
    assert torch.equal(torch.isnan(ours), torch.isnan(ref)), "NaN placement differs"
    finite = torch.isfinite(ref)
    assert torch.equal(ours[~finite & ~torch.isnan(ref)], ref[~finite & ~torch.isnan(ref)]), "infinities differ"
    if finite.any():
        rtol, atol = TOLERANCES[dtype]
        scale = ref[finite].abs().max().item()
        torch.testing.assert_close(ours[finite], ref[finite], rtol=rtol, atol=max(atol, 4 * rtol * scale))


@FUZZ
@given(x=logits(min_rank=0), data=st.data())
def test_fuzz_softmax_and_log_softmax(x, data):
    dim = data.draw(st.integers(-max(x.ndim, 1), max(x.ndim, 1) - 1))
    name = data.draw(st.sampled_from(["softmax", "log_softmax", "softmin"]))
    xg = x.clone().requires_grad_()
    y = getattr(fastsoftmax, name)(xg, dim)
    x64 = x.double().requires_grad_()
    y64 = getattr(TF, name)(x64, dim)
    _close(y.detach(), y64.detach(), x.dtype)
    if x.numel() and torch.isfinite(y).all():
        # the gradient in the output's dtype, and the reference from the same rounded values
        go = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
        (dx,) = torch.autograd.grad(y, xg, go)
        go = go.double()
        # the backward reads the rounded output, as torch's does: reference from that output
        yd = y.detach().double()
        dx64 = go - yd.exp() * go.sum(dim, keepdim=True) if name == "log_softmax" else yd * (go - (go * yd).sum(dim, keepdim=True))
        if name == "softmin":
            dx64 = -dx64
        _close(dx, dx64, x.dtype)


@FUZZ
@given(x=logits(min_rank=1), data=st.data())
def test_fuzz_cross_entropy(x, data):
    n_classes = x.shape[0 if x.ndim == 1 else 1]
    prob = data.draw(st.booleans())
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    loss_shape = [] if x.ndim == 1 else [x.shape[0], *x.shape[2:]]
    kw = dict(reduction=data.draw(st.sampled_from(["mean", "sum", "none"])))
    kw["label_smoothing"] = data.draw(st.sampled_from([0.0, 0.0, 0.1, 1.0]))
    if prob:
        target = torch.softmax(torch.randn(x.shape, generator=g, dtype=torch.float64), 0 if x.ndim == 1 else 1).to(x.dtype)
    else:
        if n_classes == 0:
            return
        target = torch.randint(0, n_classes, loss_shape, generator=g)
        ignore = data.draw(st.sampled_from([-100, 0, n_classes - 1]))
        kw["ignore_index"] = ignore
        if target.numel() and data.draw(st.booleans()):
            target.view(-1)[0] = ignore
    if data.draw(st.booleans()) and n_classes:
        kw["weight"] = (torch.rand(n_classes, generator=g, dtype=torch.float64) + 0.25).to(x.dtype)
    xg = x.clone().requires_grad_()
    loss = fastsoftmax.cross_entropy(xg, target, **kw)
    x64 = x.double().requires_grad_()
    kw64 = dict(kw, weight=kw["weight"].double()) if "weight" in kw else kw
    loss64 = TF.cross_entropy(x64, target.double() if prob else target, **kw64)
    assert loss.dtype == x.dtype
    _close(loss.detach(), loss64.detach(), x.dtype)
    if x.numel() and torch.isfinite(loss64).all():
        (dx,) = torch.autograd.grad(loss, xg, torch.ones_like(loss))
        (dx64,) = torch.autograd.grad(loss64, x64, torch.ones_like(loss64))
        _close(dx, dx64, x.dtype)


def test_fuzz_budget_is_set():
    assert EXAMPLES >= 1
    if EXAMPLES > 100:
        pytest.skip(f"large fuzz run: {EXAMPLES} examples per test")
