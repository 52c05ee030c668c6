"""The options of ours that torch lacks: z-loss, soft-capping, the log-sum-exp, the in-place gradient.

Each against a float64 reference written here from the formulas, not from
the code under test: with ``lse = logsumexp(x)`` over the classes,

* z-loss: ``loss + z * lse**2`` per kept element (a mean divides the z part
  by the number of kept elements, the cross-entropy by their total weight);
* softcap: the loss of ``c * tanh(x / c)``, differentiated through ``tanh``;
* ``return_lse``: ``lse`` per element, the loss's unreduced shape;
* ``inplace_backward``: the gradient written into the logits' own memory.
"""

import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close, randn

import fastsoftmax


def _reference(x, t, z=0.0, cap=None, reduction="mean", **kw):
    """The loss in float64 torch ops (torch's own cross-entropy plus the z term)."""
    x = x.double()
    if cap is not None:
        x = cap * torch.tanh(x / cap)
    class_dim = 0 if x.ndim == 1 else 1
    ce = TF.cross_entropy(x, t.double() if t.is_floating_point() else t, reduction=reduction, **kw)
    if not z:
        return ce
    zterm = z * torch.logsumexp(x, class_dim) ** 2
    kept = torch.ones_like(zterm, dtype=torch.bool) if t.is_floating_point() else t != kw.get("ignore_index", -100)
    zterm = torch.where(kept, zterm, 0.0)
    if reduction == "none":
        return ce + zterm
    if reduction == "sum":
        return ce + zterm.sum()
    return ce + zterm.sum() / kept.sum()


CASES = [
    ((16, 9), "index"),  # rows
    ((4, 7, 20), "index"),  # (N, C, d): the middle-axis kernel
    ((6, 11), "prob"),
    ((9,), "index"),  # unbatched
]


def _target(shape, kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    class_dim = 0 if len(shape) == 1 else 1
    if kind == "prob":
        return torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), class_dim)
    t = torch.randint(0, shape[class_dim], shape[:1] + shape[2:] if len(shape) > 1 else (), generator=g)
    if t.ndim:
        t.view(-1)[::4] = -100
    return t


@pytest.mark.parametrize("shape,kind", CASES, ids=[f"{s}-{k}" for s, k in CASES])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_z_loss_and_its_gradient(shape, kind, reduction, dtype):
    x = randn(*shape, dtype=dtype, scale=4.0)
    t = _target(shape, kind)
    w = torch.rand(shape[0 if len(shape) == 1 else 1], dtype=dtype) + 0.5
    kw = dict(weight=w, label_smoothing=0.1, reduction=reduction)
    xg = x.clone().requires_grad_()
    out = fastsoftmax.cross_entropy(xg, t.to(dtype) if kind == "prob" else t, z_loss=1e-2, return_z_loss=True, **kw)
    x64 = x.double().requires_grad_()
    ref = _reference(x64, t, z=1e-2, **dict(kw, weight=w.double()))
    assert_close(out.loss, ref, dtype)
    ref_z = _reference(x.double(), t, z=1e-2, **dict(kw, weight=w.double())) - _reference(x.double(), t, **dict(kw, weight=w.double()))
    assert_close(out.z_loss, ref_z, dtype)
    go = torch.rand_like(ref)
    (dx,) = torch.autograd.grad(out.loss, xg, go.to(dtype))
    (dx64,) = torch.autograd.grad(ref, x64, go)
    assert_close(dx, dx64, dtype)


@pytest.mark.parametrize("shape,kind", CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_softcap_is_differentiated_through(shape, kind):
    x = randn(*shape, dtype=torch.float64, scale=30.0)
    t = _target(shape, kind)
    xg = x.clone().requires_grad_()
    loss = fastsoftmax.cross_entropy(xg, t, softcap=15.0, reduction="sum")
    ref = _reference(x.clone().requires_grad_(), t, cap=15.0, reduction="sum")
    assert_close(loss, ref)
    x64 = x.clone().requires_grad_()
    (dx64,) = torch.autograd.grad(_reference(x64, t, cap=15.0, reduction="sum"), x64)
    (dx,) = torch.autograd.grad(loss, xg)
    assert_close(dx, dx64)
    with pytest.raises(ValueError, match="softcap must be positive"):
        fastsoftmax.cross_entropy(x, t, softcap=0.0)


@pytest.mark.parametrize("shape,kind", CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_return_lse(shape, kind):
    x = randn(*shape, dtype=torch.float32, scale=5.0)
    t = _target(shape, kind)
    out = fastsoftmax.cross_entropy(x, t.float() if kind == "prob" else t, return_lse=True)
    assert isinstance(out, fastsoftmax.CrossEntropyOutput) and out.z_loss is None
    ref = torch.logsumexp(x.double(), 0 if x.ndim == 1 else 1)
    assert out.lse.shape == ref.shape and not out.lse.requires_grad
    assert_close(out.lse, ref, torch.float32)


@pytest.mark.parametrize("shape,kind", CASES, ids=[f"{s}-{k}" for s, k in CASES])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_gradient_uses_the_logits_memory(shape, kind, reduction):
    x = randn(*shape, dtype=torch.float32)
    t = _target(shape, kind)
    t = t.float() if kind == "prob" else t
    go = None
    expected = []
    for inplace in (False, True):
        leaf = x.clone().requires_grad_()
        logits = leaf * 1.0  # a non-leaf, as a model's logits are
        address = logits.data_ptr()
        loss = fastsoftmax.cross_entropy(logits, t, reduction=reduction, label_smoothing=0.1, inplace_backward=inplace)
        go = torch.rand_like(loss) if go is None else go
        (g,) = torch.autograd.grad(loss, logits, go)
        expected.append(g)
        if inplace:
            assert g.data_ptr() == address  # the gradient lives where the logits were: no new buffer
    assert_close(expected[1], expected[0])


def test_inplace_gradient_is_caught_by_ops_that_saved_the_logits():
    leaf = randn(5, 6).requires_grad_()
    logits = leaf * leaf  # saves leaf, not logits: fine
    fastsoftmax.cross_entropy(logits, torch.tensor([0, 1, 2, 3, 4]), inplace_backward=True).backward()
    leaf.grad = None
    logits = leaf.exp()  # exp saves its output, the logits: overwriting them must fail loudly
    loss = fastsoftmax.cross_entropy(logits, torch.tensor([0, 1, 2, 3, 4]), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_options_under_torch_compile():
    x = randn(8, 10).requires_grad_()
    t = torch.randint(0, 10, (8,))

    def f(x):
        out = fastsoftmax.cross_entropy(x, t, z_loss=1e-3, return_lse=True)
        return out.loss, out.lse

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss, lse = compiled(x)
    assert_close(loss, _reference(x.detach(), t, z=1e-3), torch.float32)
    assert_close(lse, torch.logsumexp(x.detach().double(), 1), torch.float32)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
