"""linear_cross_entropy against torch's own, float64 references for the z-loss and the softcap, every door, memory."""

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as TF
from fastsoftmax.kernels import config
from helpers import TOLERANCES, assert_close

import fastsoftmax
from fastsoftmax import errors
from fastsoftmax.ops import linear_cross_entropy as lce
from fastsoftmax.ops import linear_cross_entropy_chunks as chunks

N, H, C = 7, 6, 5
OPTIONS = torch.nn.LinearCrossEntropyOptions


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(layout, kind, dtype=torch.float64, seed=0, n=N, h=H, c=C):
    """``(x, W, b, target, ignore_index)`` for a layout (``2d``, ``unbatched``, ``kdim``) and a kind of target."""
    g = _gen(seed)
    out = (3, 2) if layout == "kdim" else ()
    batch = () if layout == "unbatched" else (n,)
    x = torch.randn(*batch, h, generator=g, dtype=torch.float64)
    W = torch.randn(c, *out, h, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(c, *out, generator=g, dtype=torch.float64)
    ignore_index = None
    if kind == "prob":
        logits_shape = (*batch, c, *out)
        t = torch.softmax(torch.randn(logits_shape, generator=g, dtype=torch.float64) * 2, 1 if batch else 0)
    else:
        t = torch.randint(0, c, (*batch, *out), generator=g)
        if kind == "ignore" and t.numel() > 1:
            t.view(-1)[::3] = -100  # the default ignore_index
        elif kind == "ignore_index" and t.numel() > 1:
            ignore_index = 2  # a class index: its targets are skipped
        elif kind == "ignore_out_of_range":
            ignore_index = c + 5  # torch accepts one outside [0, C)
            t.view(-1)[::2] = c + 5
    return x.to(dtype), W.to(dtype), b.to(dtype), (t.to(dtype) if kind == "prob" else t), ignore_index


def _grads(fn, x, W, t, b, **kw):
    """The loss and its gradients for input, weight and bias under a non-unit grad_output."""
    leaves = [v.detach().clone().requires_grad_() for v in (x, W)] + ([b.detach().clone().requires_grad_()] if b is not None else [])
    loss = fn(leaves[0], leaves[1], t, linear_bias=leaves[2] if b is not None else None, **kw)
    go = torch.linspace(0.5, 2.0, max(loss.numel(), 1), dtype=torch.float64)[: loss.numel()].reshape(loss.shape).to(loss.dtype)
    return (loss, *torch.autograd.grad(loss, leaves, go))


@pytest.fixture(params=["plain", "chunked", "generic"])
def path(request, monkeypatch):
    """The three CPU code paths: one chunk (the straight loop body), chunks of 3 rows, and the device-agnostic (CUDA) path."""
    if request.param == "generic":
        monkeypatch.setattr(chunks, "FORCE_GENERIC", True)
    if request.param != "plain":
        monkeypatch.setattr(config, "LINEAR_CE_CHUNK_BYTES", 2 * 8 * C)  # 2 rows of float64 logits (K-dim: 1 row)
    return request.param


CASES = list(itertools.product(["2d", "unbatched", "kdim"], ["index", "ignore", "ignore_index", "prob"], ["mean", "sum", "none"]))


@pytest.mark.parametrize("layout,kind,reduction", CASES, ids=["-".join(c) for c in CASES])
def test_matches_torch_linear_cross_entropy(layout, kind, reduction, path):
    case = CASES.index((layout, kind, reduction))
    # the options that vary with the case: class weights, bias, smoothing
    weighted, biased, smoothing = case % 2 == 0, case % 3 != 0, (0.0, 0.2, 1.0)[case % 3]
    x, W, b, t, ii = _inputs(layout, kind, seed=case)
    w = torch.rand(C, generator=_gen(case), dtype=torch.float64) + 0.5 if weighted else None
    kw = dict(weight=w, reduction=reduction, ignore_index=ii, label_smoothing=smoothing)
    ours = _grads(fastsoftmax.linear_cross_entropy, x, W, t, b if biased else None, **kw)
    theirs = _grads(TF.linear_cross_entropy, x, W, t, b if biased else None, **kw)
    assert ours[0].shape == theirs[0].shape and ours[0].dtype == theirs[0].dtype
    for a, e in zip(ours, theirs):
        assert_close(a, e)


def _reference(x, W, t, b, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None):
    """The loss with the z-loss and the softcap in float64 torch ops (logits materialised), and its lse."""
    out = W.shape[1:-1]
    logits = (x @ W.reshape(-1, W.shape[-1]).T + (0 if b is None else b.reshape(-1))).reshape(*x.shape[:-1], W.shape[0], *out)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    dim = 1 if x.ndim == 2 else 0
    lse = torch.logsumexp(logits, dim)
    loss = TF.cross_entropy(logits, t, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    if z_loss:
        kept = torch.ones_like(lse, dtype=torch.bool) if t.is_floating_point() else t != ignore_index
        z = torch.where(kept, z_loss * lse**2, 0.0)
        loss = loss + (z if reduction == "none" else z.sum() / (kept.sum() if reduction == "mean" else 1))
    return loss, lse


ZCASES = list(itertools.product(["2d", "kdim"], ["ignore", "prob"], ["mean", "sum", "none"]))


@pytest.mark.parametrize("layout,kind,reduction", ZCASES, ids=["-".join(c) for c in ZCASES])
def test_z_loss_and_softcap_against_float64(layout, kind, reduction, path):
    # each of z-loss alone, softcap alone and both, on every path and layout
    z_loss, softcap = [(0.01, None), (0.0, 2.5), (0.02, 1.5)][ZCASES.index((layout, kind, reduction)) % 3]
    x, W, b, t, _ = _inputs(layout, kind, seed=3)
    x = x * 3  # logits of a few units: the cap bends them
    w = torch.rand(C, generator=_gen(1), dtype=torch.float64) + 0.5
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    ours = _grads(fastsoftmax.linear_cross_entropy, x, W, t, b, z_loss=z_loss, softcap=softcap, **kw)
    ref = _grads(lambda *a, **k: _reference(*a[:3], k.pop("linear_bias"), **k)[0], x, W, t, b, z_loss=z_loss, softcap=softcap, **kw)
    for a, e in zip(ours, ref):
        assert_close(a, e)
    out = fastsoftmax.linear_cross_entropy(x, W, t, linear_bias=b, z_loss=z_loss, softcap=softcap, return_lse=True, return_z_loss=True, **kw)
    loss_ref, lse_ref = _reference(x, W, t, b, z_loss=z_loss, softcap=softcap, **kw)
    assert isinstance(out, fastsoftmax.CrossEntropyOutput)
    assert_close(out.loss, loss_ref)
    assert_close(out.lse, lse_ref)
    no_z = _reference(x, W, t, b, softcap=softcap, **kw)[0]
    assert_close(out.z_loss, loss_ref - no_z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunked", [False, True])
def test_lower_precision_against_float64_of_the_same_inputs(dtype, chunked, monkeypatch):
    """float32 natively; half precision on the CPU in float32, rounded once at the end."""
    if chunked:
        monkeypatch.setattr(config, "LINEAR_CE_CHUNK_BYTES", 4 * 4 * 40)  # 4 rows of 40 float32 logits
    x, W, b, t, _ = _inputs("2d", "ignore", dtype=dtype, seed=5, n=33, h=16, c=40)
    ours = _grads(fastsoftmax.linear_cross_entropy, x, W, t, b, label_smoothing=0.1)
    ref = _grads(fastsoftmax.linear_cross_entropy, x.double(), W.double(), t, b.double(), label_smoothing=0.1)
    assert all(o.dtype == dtype for o in ours)
    rtol, atol = TOLERANCES[dtype]
    if dtype == torch.float32:
        rtol, atol = 1e-5, 1e-6  # float32 products over 16 inputs and 33 rows, not one rounding
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=atol)
    # torch's own reference rounds its logits to the half type: close, not equal
    theirs = _grads(TF.linear_cross_entropy, x, W, t, b, label_smoothing=0.1)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a.double(), e.double(), rtol=5e-2, atol=2e-2)


def test_options_set_the_chunk_rows_as_torch_computes_them():
    for n, h, c in [(8, 5, 4), (4096, 1024, 32000), (100, 7, 1000), (3, 64, 10)]:
        for method in ["aspect_ratio", "aspect_ratio:2", "aspect_ratio:4"]:
            adjusted = OPTIONS(chunking_method=method)._adjust(n, h, c, torch.float32, torch.device("cpu"))
            assert fastsoftmax.validation.chunk_rows_of(OPTIONS(chunking_method=method), n, h, c) == adjusted.batch_chunk_size
        assert fastsoftmax.validation.chunk_rows_of(OPTIONS(batch_chunk_size=3), n, h, c) == min(3, n)
        assert fastsoftmax.validation.chunk_rows_of(OPTIONS(), n, h, c) is None  # "auto": our byte budget
        assert fastsoftmax.validation.chunk_rows_of(OPTIONS(chunking_method=None), n, h, c) == n
    x, W, b, t, _ = _inputs("2d", "index")
    with pytest.raises(ValueError, match=re.escape("batch_chunk_size (=5) and chunking_method ('aspect_ratio') give different chunk sizes")):
        fastsoftmax.linear_cross_entropy(x, W, t, options=OPTIONS(batch_chunk_size=5, chunking_method="aspect_ratio"))
    with pytest.raises(TypeError, match="LinearCrossEntropyOptions"):
        fastsoftmax.linear_cross_entropy(x, W, t, options={"batch_chunk_size": 2})
    assert fastsoftmax.nn.LinearCrossEntropyOptions is OPTIONS


@pytest.mark.parametrize("rows", [1, 2, 4, N])
def test_any_chunk_size_gives_the_same_result(rows):
    x, W, b, t, ii = _inputs("kdim", "ignore", seed=2)
    whole = _grads(fastsoftmax.linear_cross_entropy, x, W, t, b, reduction="none")
    chunked = _grads(fastsoftmax.linear_cross_entropy, x, W, t, b, reduction="none", options=OPTIONS(batch_chunk_size=rows))
    for a, e in zip(chunked, whole):
        assert_close(a, e)


def _torch_message(call):
    with pytest.raises(Exception) as info:
        call()
    return info.value


ERRORS = [
    # (input, weight, target, kwargs): each raises in torch and in ours, with torch's class and message
    (torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), {}),  # input 3-D
    (torch.randn(4), torch.randn(4), torch.zeros((), dtype=torch.long), {}),  # weight 1-D
    (torch.randn(3, 4), torch.randn(5, 6), torch.zeros(3, dtype=torch.long), {}),  # in_features differ
    (torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), {"linear_bias": torch.randn(6)}),  # bias shape
    (torch.randn(4), torch.randn(5, 2, 4), torch.zeros(2, dtype=torch.long), {}),  # K-dim unbatched
    (torch.randn(3, 4), torch.randn(5, 4), torch.rand(3, 5), {"ignore_index": -100}),  # ignore_index with probabilities
    (torch.randn(3, 4), torch.randn(5, 4).double(), torch.zeros(3, dtype=torch.long), {}),  # weight dtype
    (torch.randn(3, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), {}),  # batch mismatch
    (torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 9, 1]), {}),  # class index past C
    (torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.int32), {}),  # int32 targets
    (torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), {"weight": torch.ones(4)}),  # class weights of length 4
    (torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), {"reduction": "avg"}),  # unknown reduction
    (torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), {"label_smoothing": 1.5}),  # smoothing above 1
    (torch.randn(3, 4).long(), torch.randn(5, 4).long(), torch.zeros(3, dtype=torch.long), {}),  # integer logits
    (torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, 5, dtype=torch.long), {}),  # long target of the logits' shape
    (torch.randn(3, 4), torch.randn(5, 2, 4), torch.zeros(3, 3, dtype=torch.long), {}),  # K-dim target of the wrong size
]


@pytest.mark.parametrize("case", range(len(ERRORS)))
def test_errors_match_torch_class_and_message(case):
    x, W, t, kw = ERRORS[case]
    theirs = _torch_message(lambda: TF.linear_cross_entropy(x, W, t, **kw))
    ours = _torch_message(lambda: fastsoftmax.linear_cross_entropy(x, W, t, **kw))
    assert isinstance(ours, type(theirs)), (type(ours), theirs)
    # our message holds torch's, apart from tensor shapes torch prints as [..] and we as (..)
    flat = lambda m: re.sub(r"[\[\]()]", "", str(m))  # noqa: E731
    first = flat(theirs).split(":")[0].split(" (")[0].rstrip(".")
    assert first.strip()[:30] in flat(ours), (str(theirs), str(ours))


def _door_functional(x, W, t, **kw):
    return fastsoftmax.linear_cross_entropy(x, W, t, **kw)


def _door_function(x, W, t, linear_bias=None, weight=None, reduction="mean", ignore_index=None, label_smoothing=0.0):
    return fastsoftmax.LinearCrossEntropyFunction.apply(x, W, t, linear_bias, weight, reduction, ignore_index, label_smoothing)


def _door_op(x, W, t, linear_bias=None, weight=None, reduction="mean", ignore_index=None, label_smoothing=0.0):
    ii = -100 if ignore_index is None else ignore_index
    return torch.ops.fastsoftmax.linear_cross_entropy(x, W, t, linear_bias, weight, ii, reduction, label_smoothing, 0.0, None, 0, True, True, True, False)[0]


def _door_value_and_grad(x, W, t, **kw):
    return lce.value_and_grad(x, W, t, **kw)[0]


DOORS = {"functional": _door_functional, "Function.apply": _door_function, "torch.ops": _door_op, "value_and_grad": _door_value_and_grad}


@pytest.mark.parametrize("door", list(DOORS))
@pytest.mark.parametrize("case", [2, 3, 6, 7, 8, 9, 10, 11, 13, 15])
def test_every_door_checks_before_any_kernel(door, case):
    x, W, t, kw = ERRORS[case]
    if door == "torch.ops" and "reduction" in kw:
        kw = dict(kw)
    expected = type(_torch_message(lambda: TF.linear_cross_entropy(x, W, t, **kw)))
    with pytest.raises(expected):
        DOORS[door](x.requires_grad_() if x.is_floating_point() else x, W, t, **kw)


def test_our_own_argument_errors():
    x, W, b, t, _ = _inputs("2d", "index")
    with pytest.raises(errors.ArgumentError, match="softcap must be positive"):
        fastsoftmax.linear_cross_entropy(x, W, t, softcap=0.0)
    with pytest.raises(errors.DeviceError):
        fastsoftmax.linear_cross_entropy(x, W.to("meta"), t)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        fastsoftmax.linear_cross_entropy(x, W, t, weight=torch.ones(C, dtype=torch.float64, requires_grad=True))
    with pytest.raises(ValueError, match="reduced loss"):
        lce.value_and_grad(x, W, t, reduction="none")
    with pytest.raises(TypeError, match="3 positional"):
        fastsoftmax.linear_cross_entropy(x, W, t, b)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_all_ignored_and_zero_weights_as_torch(reduction):
    x, W, b, _, _ = _inputs("2d", "index")
    for t, w, xs in [
        (torch.zeros(0, dtype=torch.long), None, x[:0]),  # no rows: mean NaN, sum 0, zero gradients
        (torch.full((N,), -100), None, x),  # every target ignored: mean NaN with zero gradients
        (torch.tensor([0, 0, 1, -100, 0, 1, 0]), torch.tensor([0.0, 0.0, 1, 1, 1], dtype=torch.float64), x),  # kept weight 0: NaN gradients
    ]:
        ours = _grads(fastsoftmax.linear_cross_entropy, xs, W, t, b, weight=w, reduction=reduction)
        theirs = _grads(TF.linear_cross_entropy, xs, W, t, b, weight=w, reduction=reduction)
        for a, e in zip(ours, theirs):
            assert_close(a, e)


def test_odd_layouts_and_target_dtypes():
    x, W, b, t, _ = _inputs("2d", "index")
    Wt = W.T.contiguous().T  # a transposed weight, as the D2L model passes W.T
    xt = x.T.contiguous().T
    for args in [(xt, Wt, t), (x, W, t.to(torch.uint8)), (x[:, :0], W[:, :0], t)]:  # no input features: logits are the bias
        ours = _grads(fastsoftmax.linear_cross_entropy, *args, b, label_smoothing=0.1)
        theirs = _grads(TF.linear_cross_entropy, *args, b, label_smoothing=0.1)
        for a, e in zip(ours, theirs):
            assert_close(a, e)
    # an ignore_index outside [0, C), which torch accepts, on the plain and the chunked paths
    x, W, b, t, ii = _inputs("2d", "ignore_out_of_range")
    for options in (None, OPTIONS(batch_chunk_size=3)):
        ours = _grads(fastsoftmax.linear_cross_entropy, x, W, t, b, ignore_index=ii, options=options)
        theirs = _grads(TF.linear_cross_entropy, x, W, t, b, ignore_index=ii)
        for a, e in zip(ours, theirs):
            assert_close(a, e)
    # prob targets of float64 with float32 logits: torch promotes the loss
    loss = fastsoftmax.linear_cross_entropy(x.float(), W.float(), torch.softmax(torch.randn(N, C, dtype=torch.float64), 1))
    assert loss.dtype == torch.float64


def test_gradient_of_a_transposed_weight_comes_in_its_layout():
    x, W, b, t, _ = _inputs("2d", "index")
    param = torch.nn.Parameter(W.T.contiguous())  # (H, C), as in the D2L model
    fastsoftmax.linear_cross_entropy(x, param.T, t, linear_bias=b).backward()
    assert param.grad.is_contiguous()
    loss, _, gw, gb = lce.value_and_grad(x, param.T, t, linear_bias=b.requires_grad_())
    assert gw.T.is_contiguous()
    assert_close(gw.T, param.grad)
    assert gb is not None


def test_value_and_grad_matches_autograd():
    x, W, b, t, _ = _inputs("kdim", "ignore")
    leaves = [x.requires_grad_(), W.requires_grad_(), b]
    for kw in [dict(), dict(z_loss=0.01, softcap=2.0, label_smoothing=0.1, reduction="sum")]:
        loss, gx, gw, gb = lce.value_and_grad(x, W, t, linear_bias=b, **kw)
        ref = fastsoftmax.linear_cross_entropy(x, W, t, linear_bias=b, **kw)
        ex, ew = torch.autograd.grad(ref, leaves[:2])
        assert loss.grad_fn is None and gb is None
        assert_close(loss, ref)
        assert_close(gx, ex)
        assert_close(gw, ew)


def test_value_and_grad_wrt_names_the_gradients():
    x, W, b, t, _ = _inputs("2d", "ignore")
    ref = [v.clone().requires_grad_() for v in (x, W, b)]
    TF.linear_cross_entropy(ref[0], ref[1], t, linear_bias=ref[2], label_smoothing=0.1).backward()
    with torch.no_grad():  # as the D2L step calls it: plain tensors, no graph anywhere
        loss, gx, gw, gb = lce.value_and_grad(x, W, t, linear_bias=b, label_smoothing=0.1, wrt=("linear_weight", "linear_bias"))
    assert gx is None
    assert_close(gw, ref[1].grad)
    assert_close(gb, ref[2].grad)
    _, gx, gw, gb = lce.value_and_grad(x, W, t, wrt=("input",))
    assert gw is None and gb is None
    assert_close(gx, torch.autograd.grad(TF.linear_cross_entropy(ref[0], W, t), ref[0])[0])
    for bad in ["input", ("weight",)]:
        with pytest.raises(ValueError, match="wrt names some of"):
            lce.value_and_grad(x, W, t, wrt=bad)


def test_retain_graph_and_partial_requires_grad():
    x, W, b, t, _ = _inputs("2d", "ignore")
    for reduction in ["mean", "none"]:
        leaves = [x.clone().requires_grad_(), W.clone().requires_grad_()]
        loss = fastsoftmax.linear_cross_entropy(*leaves, t, linear_bias=b, reduction=reduction).sum()
        loss.backward(retain_graph=True)
        once = [v.grad.clone() for v in leaves]
        loss.backward()
        for v, g in zip(leaves, once):
            assert_close(v.grad, 2 * g)
    only_bias = b.clone().requires_grad_()
    (gb,) = torch.autograd.grad(fastsoftmax.linear_cross_entropy(x, W, t, linear_bias=only_bias), only_bias)
    (eb,) = torch.autograd.grad(TF.linear_cross_entropy(x, W, t, linear_bias=only_bias), only_bias)
    assert_close(gb, eb)
    with torch.no_grad():
        assert fastsoftmax.linear_cross_entropy(x, W.requires_grad_(), t).grad_fn is None


@pytest.mark.parametrize("layout,reduction", [("kdim", "mean"), ("2d", "none")])
def test_gradcheck_and_gradgradcheck(layout, reduction):
    x, W, b, t, _ = _inputs(layout, "ignore", n=3, h=3, c=3)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    leaves = [v.requires_grad_() for v in (x, W, b)]

    def fn(x, W, b):
        return fastsoftmax.linear_cross_entropy(x, W, t, linear_bias=b, weight=w, reduction=reduction, label_smoothing=0.2, z_loss=0.01, softcap=3.0)

    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves, fast_mode=True)


def test_gradcheck_probability_targets_that_require_grad():
    x, W, b, t, _ = _inputs("2d", "prob", n=3, h=4, c=3)
    leaves = [v.requires_grad_() for v in (x, W, b, t)]
    assert torch.autograd.gradcheck(lambda x, W, b, t: fastsoftmax.linear_cross_entropy(x, W, t, linear_bias=b, label_smoothing=0.1), leaves)


def _opcheck_cases():
    x, W, b, t, _ = _inputs("2d", "ignore")
    x, W, b = (v.float().requires_grad_() for v in (x, W, b))
    yield "mean", lce.linear_cross_entropy_op, (x, W, t, b, None, -100, "mean", 0.1, 0.0, None, 0, True, True, True, False)
    yield "none_lse", lce.linear_cross_entropy_op, (x, W, t, None, None, -100, "none", 0.0, 0.01, 2.0, 2, True, True, False, True)
    xk, Wk, bk, tk, _ = _inputs("kdim", "prob")
    yield "kdim_prob", lce.linear_cross_entropy_op, (xk.requires_grad_(), Wk.requires_grad_(), tk, bk, None, -100, "sum", 0.0, 0.0, None, 3, True, True, False, False)
    go = torch.rand(N)
    # called by the backward with grad mode off, never differentiated itself: no inputs that require grad
    args = (x.detach(), W.detach(), t, b.detach(), None, -100, 0.1, 0.0, None, 0, go, True, True, True)
    yield "backward", lce.linear_cross_entropy_backward_op, args


@pytest.mark.parametrize("name,op,args", list(_opcheck_cases()), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(H, H)
        self.head = fastsoftmax.nn.LinearCrossEntropyLoss(H, C, bias=True, label_smoothing=0.1, z_loss=0.01)

    def forward(self, x, t):
        return self.head(torch.tanh(self.proj(x)), t)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(reduction):
    torch.manual_seed(0)
    model = _Head().double()
    model.head.reduction = reduction
    x, _, _, t, _ = _inputs("2d", "ignore")
    eager = model(x, t).sum()
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(x, t).sum()
    for g, e in zip(torch.autograd.grad(loss, list(model.parameters())), eager_grads):
        assert_close(g, e)
    assert_close(loss, eager)


def test_meta_tensors_give_shapes():
    for layout, reduction, shape in [("2d", "mean", ()), ("2d", "none", (N,)), ("kdim", "none", (N, 3, 2)), ("unbatched", "none", ())]:
        x, W, b, t, _ = (v.to("meta") if isinstance(v, torch.Tensor) else v for v in _inputs(layout, "index"))
        x.requires_grad_()
        W.requires_grad_()
        loss = fastsoftmax.linear_cross_entropy(x, W, t, linear_bias=b, reduction=reduction)
        assert loss.shape == shape and loss.device.type == "meta"
        gx, gw = torch.autograd.grad(loss, [x, W], torch.ones_like(loss))
        assert gx.shape == x.shape and gw.shape == W.shape


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (fastsoftmax.linear_cross_entropy, TF.linear_cross_entropy),
        (fastsoftmax.nn.LinearCrossEntropyLoss.__init__, torch.nn.LinearCrossEntropyLoss.__init__),
    ],
    ids=["functional", "module"],
)
def test_torch_signature_is_a_prefix_of_ours(ours, theirs):
    import inspect

    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    mine, torchs = params(ours), params(theirs)
    assert mine[: len(torchs)] == torchs
    assert [p[0] for p in mine[len(torchs) :]] in (["z_loss", "softcap", "return_lse", "return_z_loss"], ["z_loss", "softcap"])
    assert all(p[1] == inspect.Parameter.KEYWORD_ONLY for p in mine[len(torchs) :])


def test_module_is_torchs_with_our_forward():
    torch.manual_seed(0)
    kw = dict(out_features=(3, 2), bias=True, dtype=torch.float64, label_smoothing=0.1, weight=torch.rand(C, dtype=torch.float64) + 0.5)
    ours = fastsoftmax.nn.LinearCrossEntropyLoss(H, C, z_loss=0.0, **kw)
    theirs = torch.nn.LinearCrossEntropyLoss(H, C, **kw)
    theirs.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict()) and repr(ours) == repr(theirs)
    x, _, _, t, _ = _inputs("kdim", "ignore")
    for m in (ours, theirs):
        m(x, t).backward()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad)
    with pytest.raises(RuntimeError, match="label_smoothing to be in range"):
        fastsoftmax.nn.LinearCrossEntropyLoss(H, C, label_smoothing=2.0)
    capped = fastsoftmax.nn.LinearCrossEntropyLoss(H, C, softcap=2.0, z_loss=0.1)
    assert capped.softcap == 2.0 and capped.z_loss == 0.1


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the resident high-water mark starts again from the current size
        return True
    except OSError:
        return False


def test_peak_memory_is_one_chunk_of_logits_not_all_of_them(monkeypatch):
    """N=256, V=32000: all the logits would be 33 MB; with a 1 MiB budget the peak is the gradients and about one chunk."""
    from fastsoftmax.apps import bench

    if not _reset_peak():
        pytest.skip("no /proc/self/clear_refs to reset the peak resident size")
    budget = 1 << 20
    monkeypatch.setattr(config, "LINEAR_CE_CHUNK_BYTES", budget)
    n, h, v = 256, 32, 32000
    x = torch.randn(n, h, requires_grad=True)
    W = (torch.randn(v, h) * 0.05).requires_grad_()
    t = torch.randint(0, v, (n,))
    fastsoftmax.linear_cross_entropy(x[:8], W, t[:8]).backward()  # kernels loaded, gradient buffers seen once
    x.grad = W.grad = None
    bench._release_cpu_memory()
    base = bench._rss()
    _reset_peak()
    fastsoftmax.linear_cross_entropy(x, W, t).backward()
    grown = _hwm() - base
    grads = (n + v) * h * 4
    logits = n * v * 4
    print(f"peak grew {grown / 2**20:.2f} MiB: gradients {grads / 2**20:.2f} MiB, chunk budget {budget / 2**20:.2f} MiB")
    assert grown < grads + 4 * budget + (2 << 20), f"peak grew {grown / 2**20:.1f} MiB; gradients {grads / 2**20:.1f} MiB"
    assert grown < logits / 3


@pytest.mark.parametrize("loss", ["fused-linear"])
def test_d2l_fused_linear_trains_like_torch(loss):
    from fastsoftmax.apps.d2l import data, model

    images = torch.rand(256, 28, 28, generator=_gen(0))
    labels = torch.randint(0, 10, (256,), generator=_gen(1))
    images[torch.arange(256), 2 * labels, :] = 1.0  # each class lights a row: learnable
    ds = data.Dataset("planted", images[:192], labels[:192], images[192:], labels[192:], tuple(str(i) for i in range(10)))
    params = {}
    for name in (loss, "torch"):
        cfg = model.TrainConfig(epochs=2, lr=0.1, batch_size=64, loss=name, seed=3)
        trained, metrics = model.train(ds, cfg, log=lambda *_: None, progress=False)
        params[name] = [p.detach().clone() for p in trained.parameters()]
        params[name + " metrics"] = metrics["epochs"]
    for a, b in zip(params[loss], params["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float32 rounding over 6 SGD steps
    for a, b in zip(params[loss + " metrics"], params["torch metrics"]):
        assert a["train_acc"] == b["train_acc"] and math.isclose(a["train_loss"], b["train_loss"], rel_tol=1e-5)
    with pytest.raises(ValueError, match="unknown loss"):
        model.make_step(model.SoftmaxRegression(4, 2), "fused-linearly", 0.1)


def test_cli_train_fused_linear_end_to_end(tmp_path, capsys):
    import json

    from fastsoftmax.apps import cli

    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "digits", "--epochs", "3", "--loss", "fused-linear", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "loss=fused-linear" in printed and "epoch 3, loss" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["loss"] == "fused-linear" and metrics["epochs"][-1]["test_acc"] > 0.5
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_bench_linear_rows_and_worker(monkeypatch):
    from fastsoftmax.apps import bench_linear

    monkeypatch.setattr(config, "LINEAR_CE_CHUNK_BYTES", config.LINEAR_CE_CHUNK_BYTES)  # restored after the worker below sets it
    providers = ("torch", "fastsoftmax")  # torch's chunked path spends seconds on its first call
    rows = bench_linear.run([(16, 8, 50)], providers=providers, repeats=2, memory=False, log=lambda *_: None)
    assert [r["provider"] for r in rows] == list(providers)
    by = {r["provider"]: r for r in rows}
    for r in rows:
        assert r["flops"] == 6 * 16 * 8 * 50 and r["tflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e12)
        for other, ratio in r["speedup_over"].items():
            assert ratio == pytest.approx(by[other]["median_s"] / r["median_s"])
    assert "vs chunked" in bench_linear.format_rows(rows)
    # the providers compute the same loss, or the benchmark compares different work
    losses = {p: bench_linear.call(p, 16, 8, 50, dtype=torch.float64)() for p in providers}
    assert_close(losses["fastsoftmax"], losses["torch"])
    measured = bench_linear.worker("fastsoftmax:1", 64, 16, 500, "float32", "cpu")
    assert measured["seconds"] > 0 and measured["peak_bytes"] >= 0
    assert config.LINEAR_CE_CHUNK_BYTES == 1 << 20  # the provider's suffix set the chunk budget


def test_torch_func_transforms_give_torchs_results():
    """torch.func.grad and per-sample gradients (vmap of grad) over linear_cross_entropy, as over torch's:
    under transforms the logits are made by torch.nn.functional.linear and the loss in torch's ops."""
    g = torch.Generator().manual_seed(41)
    x = torch.randn(8, 5, dtype=torch.float64, generator=g)
    W = torch.randn(4, 5, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g)
    t = torch.tensor([0, 3, -100, 1, 2, 2, 3, 0])
    grads = [
        torch.func.grad(lambda W, b, f=f: f(x, W, t, linear_bias=b, label_smoothing=0.1), argnums=(0, 1))(W, b)
        for f in (fastsoftmax.linear_cross_entropy, TF.linear_cross_entropy)
    ]
    for ours, theirs in zip(*grads):
        assert_close(ours, theirs)
    per_sample = [
        torch.func.vmap(torch.func.grad(lambda W, xi, ti, f=f: f(xi[None], W, ti[None], reduction="sum")), in_dims=(None, 0, 0))(W, x, t)
        for f in (fastsoftmax.linear_cross_entropy, TF.linear_cross_entropy)
    ]
    assert per_sample[0].shape == (8, 4, 5)
    assert_close(per_sample[0], per_sample[1])
