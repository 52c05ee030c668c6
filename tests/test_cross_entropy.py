"""cross_entropy against torch in float64: every option and their combinations."""

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as TF
from helpers import FLOAT_DTYPES, assert_close, randn

import fastsoftmax

SHAPES = [
    (5,),  # (C): a single example, loss is 0-d
    (16, 1),  # one class: loss 0, gradient 0
    (33, 10),  # the softmax-regression shape, odd batch
    (8, 1000),  # non power of two, vector body + remainder
    (4, 7, 3),  # (N, C, d1): class dim in the middle, moved last and back
    (2, 5, 3, 4),  # (N, C, d1, d2), 12 positions: moved last too
    (3, 6, 20),  # (N, C, d1), 20 positions: index targets reduced in place (middle-axis kernel)
    (2, 5, 4, 8),  # (N, C, d1, d2), 32 positions: in place
]


def _targets(shape, kind, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    if kind == "prob":
        return torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 2, 0 if len(shape) == 1 else 1)
    tshape = () if len(shape) == 1 else shape[:1] + shape[2:]
    t = torch.randint(0, n_classes, tshape, generator=g)
    if kind == "ignore" and t.numel() > 1:
        t.view(-1)[::3] = ignore_index
    return t


def _run(fn, x, target, **kw):
    x = x.detach().requires_grad_()
    loss = fn(x, target, **kw)
    go = randn(*loss.shape, dtype=torch.float64, seed=7)  # a non-unit grad_output, per element for "none"
    (dx,) = torch.autograd.grad(loss, x, go.to(loss.dtype))
    return loss, dx


CASES = list(
    itertools.product(
        SHAPES,
        ["index", "ignore", "prob"],
        [False, True],  # class weights
        ["mean", "sum", "none"],
        [0.0, 0.3],  # label smoothing
    )
)


@pytest.mark.parametrize("shape,kind,weighted,reduction,smoothing", CASES, ids=[str(c) for c in CASES])
def test_every_option_against_float64(shape, kind, weighted, reduction, smoothing):
    x = randn(*shape, dtype=torch.float64, seed=1)
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    target = _targets(shape, kind, ignore_index=2 if kind == "ignore" else -100)
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    if kind == "ignore":
        kw["ignore_index"] = 2
        target = target.clamp(min=0)  # -100 placeholders become class 0 ...
        target.view(-1)[::3] = 2  # ... and every third target is the ignored class 2
    if weighted:
        kw["weight"] = torch.rand(n_classes, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
    loss, dx = _run(fastsoftmax.cross_entropy, x, target, **kw)
    ref_loss, ref_dx = _run(TF.cross_entropy, x, target, **kw)
    assert loss.shape == ref_loss.shape
    assert_close(loss, ref_loss)
    assert_close(dx, ref_dx)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dtypes(dtype, reduction):
    x = randn(64, 300, dtype=dtype, seed=4)
    target = _targets((64, 300), "index")
    loss, dx = _run(fastsoftmax.cross_entropy, x, target, reduction=reduction)
    ref_loss, ref_dx = _run(TF.cross_entropy, x.double(), target, reduction=reduction)
    assert loss.dtype == dtype and dx.dtype == dtype
    assert_close(loss, ref_loss, dtype)
    assert_close(dx, ref_dx, dtype)


def test_unit_grad_output_fast_path_and_retain_graph():
    x = randn(40, 77, dtype=torch.float64, seed=5).requires_grad_()
    target = _targets((40, 77), "index")
    loss = fastsoftmax.cross_entropy(x, target)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()  # a second backward through the same graph accumulates the same gradient
    assert_close(x.grad, 2 * first)
    x64 = x.detach().requires_grad_()
    TF.cross_entropy(x64, target).backward()
    assert_close(first, x64.grad)


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shape", [(3, 6, 20), (2, 5, 4, 8)], ids=str)
def test_gradient_over_a_middle_axis_is_laid_out_like_the_input(shape, kind, reduction):
    """(N, C, d...) logits reduced in place: the op's own gradient (not only ``.grad``) has torch's strides.

    Forward and backward, with a per-position grad_output for "none", run
    without moving C last.
    """
    x = randn(*shape, dtype=torch.float64, seed=8)
    target = _targets(shape, kind)
    grads = []
    for fn in (fastsoftmax.cross_entropy, TF.cross_entropy):
        xx = x.clone().requires_grad_()
        loss = fn(xx, target, reduction=reduction)
        grads += torch.autograd.grad(loss, xx, randn(*loss.shape, dtype=torch.float64, seed=9))
    assert grads[0].stride() == grads[1].stride()
    assert_close(grads[0], grads[1])


def test_uint8_targets_and_non_contiguous_logits():
    x = randn(12, 10, dtype=torch.float64, seed=6).t()  # (10, 12) view with strides (1, 10)
    assert not x.is_contiguous()
    target = torch.randint(0, 12, (10,)).to(torch.uint8)
    assert_close(fastsoftmax.cross_entropy(x, target), TF.cross_entropy(x, target))


def test_all_ignored_is_nan_for_mean_and_zero_for_sum():
    x = randn(4, 6, dtype=torch.float64).requires_grad_()
    t = torch.full((4,), -100)
    assert torch.isnan(fastsoftmax.cross_entropy(x, t))
    loss = fastsoftmax.cross_entropy(x, t, reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_empty_batch():
    x = torch.empty(0, 5, requires_grad=True)
    t = torch.empty(0, dtype=torch.long)
    assert torch.isnan(fastsoftmax.cross_entropy(x, t)) and torch.isnan(TF.cross_entropy(x, t))
    loss = fastsoftmax.cross_entropy(x, t, reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0, 5)
    assert fastsoftmax.cross_entropy(x, t, reduction="none").shape == (0,)


def test_no_grad_path_computes_no_gradient():
    x = randn(8, 9)
    t = _targets((8, 9), "index")
    with torch.no_grad():
        assert_close(fastsoftmax.cross_entropy(x, t), TF.cross_entropy(x.double(), t), torch.float32)


def test_module_matches_torch_module_and_state_dict():
    w = torch.rand(10, dtype=torch.float64) + 0.1
    ours = fastsoftmax.nn.CrossEntropyLoss(weight=w, ignore_index=3, label_smoothing=0.1, reduction="sum")
    ref = torch.nn.CrossEntropyLoss(weight=w, ignore_index=3, label_smoothing=0.1, reduction="sum")
    assert repr(ours) == repr(ref)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = randn(20, 10, dtype=torch.float64)
    t = _targets((20, 10), "index")
    assert_close(ours(x, t), ref(x, t))


def test_legacy_size_average_and_reduce():
    x = randn(6, 4, dtype=torch.float64)
    t = _targets((6, 4), "index")
    for size_average, reduce in [(False, None), (None, False), (True, True)]:
        assert_close(
            fastsoftmax.cross_entropy(x, t, size_average=size_average, reduce=reduce),
            TF.cross_entropy(x, t, size_average=size_average, reduce=reduce),
        )


@pytest.mark.parametrize("shape", [(5,), (6, 7), (3, 4, 18)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.25])
def test_probability_targets_and_weights_that_require_grad(shape, reduction, smoothing):
    """Gradients flow to probability targets and class weights too, as in torch (not silently None)."""
    class_dim = 0 if len(shape) == 1 else 1
    x = randn(*shape, dtype=torch.float64, seed=10)
    q = torch.softmax(randn(*shape, dtype=torch.float64, seed=11), class_dim)
    w = torch.rand(shape[class_dim], dtype=torch.float64, generator=torch.Generator().manual_seed(12)) + 0.5
    results = []
    for fn in (fastsoftmax.cross_entropy, TF.cross_entropy):
        leaves = [t.clone().requires_grad_() for t in (x, q, w)]
        loss = fn(leaves[0], leaves[1], weight=leaves[2], reduction=reduction, label_smoothing=smoothing)
        go = randn(*loss.shape, dtype=torch.float64, seed=13)
        results.append((loss, *torch.autograd.grad(loss, leaves, go)))
    for ours, theirs in zip(*results):
        assert_close(ours, theirs)


def test_weight_of_index_targets_is_not_differentiable_as_in_torch():
    x = randn(4, 6, dtype=torch.float64).requires_grad_()
    t = torch.randint(0, 6, (4,))
    w = torch.rand(6, dtype=torch.float64).requires_grad_()
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        fastsoftmax.cross_entropy(x, t, weight=w)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        TF.cross_entropy(x, t, weight=w)
    with torch.no_grad():  # no graph, no gradient asked for: fine in both
        assert_close(fastsoftmax.cross_entropy(x, t, weight=w), TF.cross_entropy(x, t, weight=w))


@pytest.mark.parametrize("op", ["softmax", "log_softmax", "cross_entropy"])
def test_no_graph_is_recorded_when_no_gradient_is_wanted(op):
    """Inputs that do not require grad (or no_grad mode) skip autograd, and the results match torch."""
    x = randn(9, 13, dtype=torch.float64, seed=14)
    args = (torch.randint(0, 13, (9,)),) if op == "cross_entropy" else (1,)
    ours = getattr(fastsoftmax, op)(x, *args)
    assert ours.grad_fn is None and not ours.requires_grad
    assert_close(ours, getattr(TF, op)(x, *args))
    with torch.no_grad():
        xg = x.clone().requires_grad_()
        ours = getattr(fastsoftmax, op)(xg, *args)
        assert ours.grad_fn is None and not ours.requires_grad
        assert_close(ours, getattr(TF, op)(x, *args))


# --- the book's call: one kernel call, loss reduced inside (cross_entropy_cpu.forward_reduced) ---------------


def _book_call(dtype=torch.float32, n=256, c=10, seed=3):
    x = randn(n, c, dtype=dtype, seed=seed)
    t = _targets((n, c), "ignore", seed=seed)
    return x, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_book_call_takes_the_reduced_kernel_and_matches_torch(dtype, reduction, smoothing, monkeypatch):
    from fastsoftmax import paths
    from fastsoftmax.ops import cross_entropy_cpu

    x, t = _book_call(dtype)
    assert paths.book_arrays(x, t, -100, reduction, smoothing) is not None
    calls = []
    original = cross_entropy_cpu.forward_reduced
    monkeypatch.setattr(cross_entropy_cpu, "forward_reduced", lambda *a: calls.append(a) or original(*a))
    loss, dx = _run(fastsoftmax.cross_entropy, x, t, reduction=reduction, label_smoothing=smoothing)
    assert len(calls) == 1, "the book's call did not take the one-call reduced kernel"
    ref_loss, ref_dx = _run(TF.cross_entropy, x.double(), t, reduction=reduction, label_smoothing=smoothing)
    assert loss.dtype == dtype and loss.shape == ()
    assert_close(loss, ref_loss, dtype)
    assert_close(dx, ref_dx, dtype)
    with torch.no_grad():  # and without a graph: the same kernel, no gradient
        assert torch.equal(fastsoftmax.cross_entropy(x, t, reduction=reduction, label_smoothing=smoothing), loss)
    assert len(calls) == 2


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_book_call_is_the_same_bits_as_the_general_path(reduction):
    """The reduced kernel and _reduce add the per-row losses in the same order (kernels.cpu_small._total)."""
    x, t = _book_call(torch.float32, n=777, c=7)
    general = x.t().contiguous().t()  # the same values, not contiguous: the general path
    xa, xb = x.clone().requires_grad_(), general.clone().requires_grad_()
    la = fastsoftmax.cross_entropy(xa, t, reduction=reduction, label_smoothing=0.1)
    lb = fastsoftmax.cross_entropy(xb, t, reduction=reduction, label_smoothing=0.1)
    assert torch.equal(la, lb)
    la.backward()
    lb.backward()
    assert torch.equal(xa.grad, xb.grad)


def test_book_call_backward_scales_retains_and_differentiates_twice():
    x, t = _book_call(torch.float64, n=40)
    xa = x.clone().requires_grad_()
    loss = fastsoftmax.cross_entropy(xa, t)
    (3.5 * loss).backward(retain_graph=True)  # a grad_output of 3.5
    first = xa.grad.clone()
    loss.backward()  # grad_output 1 with the graph retained: accumulated, the saved gradient untouched
    xr = x.clone().requires_grad_()
    TF.cross_entropy(xr, t).backward()
    assert_close(first, 3.5 * xr.grad)
    assert_close(xa.grad, 4.5 * xr.grad)
    # double backward: a Hessian-vector product, against torch's
    v = randn(*x.shape, dtype=torch.float64, seed=11)
    hv = []
    for f in (fastsoftmax.cross_entropy, TF.cross_entropy):
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(f(xx, t, label_smoothing=0.2), xx, create_graph=True)
        hv.append(torch.autograd.grad((g * v).sum(), xx)[0])
    assert_close(hv[0], hv[1])


def test_book_call_reads_at_the_right_addresses_or_not_at_all():
    """The book's kernel reads the logits and targets at their addresses: offsets, negative views, nested tensors."""
    from fastsoftmax import paths

    x, t = _book_call(torch.float32, n=40)
    xs, ts = x[5:], t[5:]  # contiguous, 50 and 5 elements into their storage
    assert paths.book_arrays(xs, ts, -100, "mean", 0.0) is not None
    xa = xs.clone().requires_grad_()
    loss, dx = _run(fastsoftmax.cross_entropy, xs, ts)
    ref_loss, ref_dx = _run(TF.cross_entropy, xs.double(), ts)
    assert_close(loss, ref_loss, torch.float32)
    assert_close(dx, ref_dx, torch.float32)
    del xa
    # negative views hold the values negated in memory: not the book's path, and torch's values
    for logits, targets in ((torch._neg_view(x), t), (x, torch._neg_view(-t))):
        assert paths.book_arrays(logits, targets, -100, "mean", 0.0) is None
        assert_close(fastsoftmax.cross_entropy(logits, targets), TF.cross_entropy(logits.double(), targets.resolve_neg()), torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "prototype stage" note on strided nested tensors
        nested = torch.nested.nested_tensor([randn(10, seed=32), randn(10, seed=33)])
    assert paths.book_arrays(nested, t[:2], -100, "mean", 0.0) is None
    assert paths.book_arrays(x, t.view(1, -1), -100, "mean", 0.0) is None  # targets (1, N) against rows (N, C)


def test_book_call_errors_and_nan_as_torch():
    x, t = _book_call(torch.float32, n=30)
    bad = t.clone()
    bad[17] = 10
    xa = x.clone().requires_grad_()
    with pytest.raises(IndexError, match="10"):
        fastsoftmax.cross_entropy(xa, bad)
    ignored = torch.full_like(t, -100)
    loss = fastsoftmax.cross_entropy(xa, ignored)  # every target ignored: 0/0
    assert torch.isnan(loss) and torch.isnan(TF.cross_entropy(x, ignored))
    loss.backward()
    xr = x.clone().requires_grad_()
    TF.cross_entropy(xr, ignored).backward()
    assert torch.equal(xa.grad, xr.grad)  # zeros, as torch's: ignored rows take no gradient
    assert fastsoftmax.cross_entropy(x, ignored, reduction="sum").item() == 0.0


def test_direct_apply_binds_the_backward_and_falls_back_without_internals(monkeypatch):
    """ops.direct: the node calls backward straight away; without torch's internals, the public apply."""
    from fastsoftmax.ops import direct
    from fastsoftmax.ops.cross_entropy import PlainCrossEntropy

    x, t = _book_call(torch.float32, n=8)
    assert direct.direct_apply(PlainCrossEntropy, 2) is not PlainCrossEntropy.apply
    # the node calls backward straight away, also when called by hand
    assert PlainCrossEntropy._backward_cls.apply is PlainCrossEntropy.backward
    xa = x.clone().requires_grad_()
    loss = fastsoftmax.cross_entropy(xa, t)
    xr = x.clone().requires_grad_()
    TF.cross_entropy(xr, t).backward()
    assert_close(loss.grad_fn.apply(torch.tensor(2.0))[0], 2 * xr.grad)
    monkeypatch.setattr(direct, "_INTERNALS", None)  # a torch without the internals: the public apply itself
    assert direct.direct_apply(PlainCrossEntropy, 2) == PlainCrossEntropy.apply


@pytest.mark.parametrize("shape", [(8, 10), (6, 1000), (4, 5, 3)], ids=str)
def test_torch_func_transforms_give_torchs_results(shape):
    """torch.func.grad, vmap (per-sample gradients) and jacrev over fastsoftmax's functions, as over torch's:
    under transforms the calls are computed in torch's ops (wrapped tensors hold no storage for the kernels)."""
    x = randn(*shape, dtype=torch.float64, seed=31)
    t = _targets(shape, "ignore", seed=31)
    q = _targets(shape, "prob", seed=32)
    w = torch.rand(shape[1], dtype=torch.float64) + 0.5
    for target, kw in ((t, dict(label_smoothing=0.1)), (q, dict(weight=w))):
        grads = [torch.func.grad(lambda x, f=f: f(x, target, **kw))(x) for f in (fastsoftmax.cross_entropy, TF.cross_entropy)]
        assert_close(grads[0], grads[1])
    per_sample = [
        torch.func.vmap(torch.func.grad(lambda xi, ti, f=f: f(xi.unsqueeze(0), ti.unsqueeze(0), reduction="sum")))(x, t)
        for f in (fastsoftmax.cross_entropy, TF.cross_entropy)
    ]
    assert_close(per_sample[0], per_sample[1])
    for ours, theirs in ((fastsoftmax.softmax, TF.softmax), (fastsoftmax.log_softmax, TF.log_softmax)):
        assert_close(torch.func.vmap(lambda r: ours(r, -1))(x), torch.func.vmap(lambda r: theirs(r, -1))(x))
        row = x.reshape(-1, shape[-1])[0]
        assert_close(torch.func.jacrev(lambda r: ours(r, 0))(row), torch.func.jacrev(lambda r: theirs(r, 0))(row))
    # a plain tensor that requires grad, used under a transform: the book's path falls back too
    leaf = randn(8, 10, dtype=torch.float32, seed=33).requires_grad_()
    tt = _targets((8, 10), "index", seed=33)
    scale = torch.tensor(2.0)
    got = torch.func.grad(lambda s: s * fastsoftmax.cross_entropy(leaf, tt))(scale)
    assert_close(got, TF.cross_entropy(leaf, tt).detach())



@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n_classes", [10, 1000])
def test_strided_targets_and_logits(reduction, n_classes):
    """Targets and logits that are views with strides (t[::2]), on the book's shape and a wide one."""
    x = randn(16, 2 * n_classes, dtype=torch.float32, seed=4)[:, ::2]
    t = _targets((32, n_classes), "ignore", seed=4)[::2]
    assert not x.is_contiguous() and not t.is_contiguous()
    for xs in (x, x.contiguous()):
        loss, dx = _run(fastsoftmax.cross_entropy, xs, t, reduction=reduction)
        ref_loss, ref_dx = _run(TF.cross_entropy, xs.double(), t, reduction=reduction)
        assert_close(loss, ref_loss, torch.float32)
        assert_close(dx, ref_dx, torch.float32)
