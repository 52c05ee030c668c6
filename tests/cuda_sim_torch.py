"""The torch side of the CUDA path, run in the CUDA simulator on CPU tensors.

Imported by ``cuda_sim_driver.py --torch`` (a NUMBA_ENABLE_CUDASIM=1
process). :func:`simulate_cuda_policy` makes the device policy of
:mod:`fastsoftmax.ops.layout` answer :class:`~fastsoftmax.ops.layout._CUDA`
for CPU tensors and hands the backend NumPy views instead of numba device
arrays (bfloat16 as ``uint16``, as on the device); everything else is the
real code: the CUDA design of the cross-entropy op (row statistics saved,
gradient rebuilt), its fakes, autograd, ``CrossEntropyFunction``, the
``torch.library`` ops under ``opcheck``, and ``torch.compile(fullgraph=True)``.
Results are compared with torch in float64.
"""

import sys

import torch
import torch.nn.functional as TF
from helpers import assert_close, backward_reference

import fastsoftmax
from fastsoftmax.ops import cross_entropy as ce_ops
from fastsoftmax.ops import layout
from fastsoftmax.ops import softmax as softmax_ops


def simulate_cuda_policy() -> None:
    def policy(x):
        return layout._CUDA

    def as_array(t):
        t = t.detach()
        return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()

    def poisoned_empty(shape, dtype, device=None):
        out = torch.empty(shape, dtype=dtype, device=device)
        if out.is_floating_point():
            out.fill_(float("nan"))  # an element the kernels forget to write fails the comparison
        return out

    for module in (layout, ce_ops, softmax_ops):
        module.device = policy
    layout._CUDA.array = staticmethod(as_array)
    layout._CUDA.empty = staticmethod(poisoned_empty)


def report(name):
    print(f"ok   torch side: {name}", flush=True)


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)


def check_softmax():
    cases = [
        (torch.float32, (2, 37), 1, fastsoftmax.softmax, TF.softmax),
        (torch.float32, (2, 37), 1, fastsoftmax.log_softmax, TF.log_softmax),
        (torch.bfloat16, (2, 300), -1, fastsoftmax.softmax, TF.softmax),  # a block per row
        (torch.float64, (3, 2, 2), 0, fastsoftmax.log_softmax, TF.log_softmax),  # dim 0: moved last and back
    ]
    for dtype, shape, dim, ours, theirs in cases:
        x = randn(*shape, dtype=dtype, seed=1).requires_grad_()
        y = ours(x, dim)
        dy = randn(*shape, dtype=dtype, seed=2)
        (dx,) = torch.autograd.grad(y, x, dy)
        assert_close(y, theirs(x.detach().double(), dim), dtype)
        log = ours is fastsoftmax.log_softmax
        assert_close(dx, backward_reference(log, y, dy, dim), dtype)
    report("softmax and log_softmax, forward and backward (float32, bfloat16 a block per row, float64 over dim 0)")


def cross_entropy_pair(x, target, go_seed=5, **kw):
    """(loss, grad) of ours and of torch in float64, for the same grad_output."""
    out = []
    ref_kw = dict(kw, weight=kw["weight"].double()) if kw.get("weight") is not None else kw
    for fn, xx in ((fastsoftmax.cross_entropy, x), (TF.cross_entropy, x.double())):
        leaf = xx.detach().clone().requires_grad_()
        if fn is TF.cross_entropy:
            loss = fn(leaf, target.double() if target.is_floating_point() else target, **ref_kw)
        else:
            loss = fn(leaf, target, **kw)
        go = randn(*loss.shape, dtype=torch.float64, seed=go_seed).abs() + 0.5
        (grad,) = torch.autograd.grad(loss, leaf, go.to(loss.dtype))
        out.append((loss, grad))
    return out


def check_cross_entropy():
    n_cols = 37
    w = torch.rand(n_cols, dtype=torch.float64) + 0.5
    t = torch.randint(0, n_cols, (4,))
    t[2] = -100
    for dtype, reductions in ((torch.float32, ("mean", "sum", "none")), (torch.bfloat16, ("mean",))):
        x = randn(4, n_cols, dtype=dtype, seed=3)
        for reduction in reductions:
            (loss, grad), (ref, ref_grad) = cross_entropy_pair(x, t, weight=w.to(dtype), reduction=reduction, label_smoothing=0.1)
            assert loss.dtype == dtype and grad.dtype == dtype and loss.shape == ref.shape
            assert_close(loss, ref, dtype)
            assert_close(grad, ref_grad, dtype)
    report("index targets, weights, ignore_index, smoothing, three reductions (float32; bfloat16 mean)")
    q = torch.softmax(randn(2, 20, dtype=torch.float64, seed=6), 1).float()
    (loss, grad), (ref, ref_grad) = cross_entropy_pair(randn(2, 20, seed=7), q, label_smoothing=0.2)
    assert_close(loss, ref)
    assert_close(grad, ref_grad)
    report("probability targets")
    x3 = randn(2, 7, 2, seed=8)
    t3 = torch.randint(0, 7, (2, 2))
    (loss, grad), (ref, ref_grad) = cross_entropy_pair(x3, t3, reduction="none")
    assert loss.shape == (2, 2) and grad.shape == x3.shape
    assert_close(loss, ref)
    assert_close(grad, ref_grad)
    (loss, grad), (ref, ref_grad) = cross_entropy_pair(randn(9, seed=9), torch.tensor(4))
    assert_close(loss, ref)
    assert_close(grad, ref_grad)
    report("(N, C, d) logits with a per-position grad_output; (C) logits with a 0-d target")
    # NaN placement: an ignored row holding NaN has loss 0 and a NaN gradient; zero total weight: NaN
    x = randn(3, 6, seed=10)
    x[1, 2] = float("nan")
    t = torch.tensor([0, -100, 3])
    (loss, grad), (ref, ref_grad) = cross_entropy_pair(x, t, reduction="none")
    assert loss[1] == 0 and torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 2]]).all()
    assert_close(grad, ref_grad)
    w0 = torch.ones(6)
    w0[[0, 3]] = 0
    x[1, 2] = 0.5
    (loss, grad), (ref, ref_grad) = cross_entropy_pair(x, t, weight=w0)
    assert torch.isnan(loss) and torch.isnan(ref)
    assert torch.isnan(grad[[0, 2]]).all() and (grad[1] == 0).all()
    report("NaN placement: ignored NaN row, zero total weight in a mean")
    try:
        fastsoftmax.cross_entropy(randn(4, 5), torch.tensor([0, 1, 9, 2]))
    except IndexError as error:
        assert "Target 9 is out of bounds" in str(error) and "position 2" in str(error)
    else:
        raise AssertionError("a target of 9 for 5 classes raised nothing")
    report("a bad target raises IndexError")


def check_doors():
    x = randn(6, 9, seed=11).requires_grad_()
    t = torch.randint(0, 9, (6,))
    loss, saved, _ = ce_ops.cross_entropy_op(x, t, None, -100, "mean", 0.1, 0.0, True, False)
    assert saved.shape == (7, 3) and saved.dtype == torch.float32  # the CUDA design's statistics
    (grad,) = torch.autograd.grad(loss, x)
    ref = TF.cross_entropy(x.detach().double().requires_grad_(), t, label_smoothing=0.1)
    assert_close(loss, ref)
    loss_f = ce_ops.CrossEntropyFunction.apply(x, t, None, -100, "mean", 0.1)
    (grad_f,) = torch.autograd.grad(loss_f, x)
    assert_close(grad_f, grad)
    report("torch.ops.fastsoftmax.cross_entropy returns (loss, statistics); CrossEntropyFunction agrees")
    # (1, 5, 2) logits: two rows, one simulated block a launch; probabilities exercise the (N, C, d) layout
    x3 = randn(1, 5, 2, dtype=torch.float64, seed=12).requires_grad_()
    q3 = torch.softmax(randn(1, 5, 2, dtype=torch.float64, seed=13), 1)
    cases = [
        (ce_ops.cross_entropy_op, (x3, q3, torch.rand(5, dtype=torch.float64) + 0.5, -100, "mean", 0.1, 0.0, True, False)),
        (ce_ops.cross_entropy_grad_op, (x[:2].detach(), t[:2], None, saved[[0, 1, 6]], torch.tensor(0.5), -100, "sum", 0.1)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
    report("torch.library.opcheck on the forward op and cross_entropy_grad")
    torch._dynamo.reset()
    fn = torch.compile(lambda x, t: fastsoftmax.cross_entropy(x, t, label_smoothing=0.1) + fastsoftmax.softmax(x, 1)[:, 0].sum(), fullgraph=True, backend="aot_eager")
    loss = fn(x, t)
    (grad,) = torch.autograd.grad(loss, x)
    x64 = x.detach().double().requires_grad_()
    ref = TF.cross_entropy(x64, t, label_smoothing=0.1) + torch.softmax(x64, 1)[:, 0].sum()
    (ref_grad,) = torch.autograd.grad(ref, x64)
    assert_close(loss, ref, torch.float32)
    assert_close(grad, ref_grad, torch.float32)
    report("torch.compile(fullgraph=True), forward and backward")


def main():
    simulate_cuda_policy()
    check_softmax()
    check_cross_entropy()
    check_doors()


if __name__ == "__main__":
    sys.exit("run through cuda_sim_driver.py --torch")
