"""gradcheck in float64, torch.library.opcheck on every op, torch.compile(fullgraph=True)."""

import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close, randn

import fastsoftmax
from fastsoftmax.ops import cross_entropy as ce_ops
from fastsoftmax.ops import softmax as softmax_ops


@pytest.mark.parametrize("fn", [fastsoftmax.softmax, fastsoftmax.log_softmax], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("shape,dim", [((3, 7), 1), ((2, 4, 3), 1), ((5,), 0)])
def test_gradcheck_softmax(fn, shape, dim):
    x = randn(*shape, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: fn(x, dim), (x,))


@pytest.mark.parametrize(
    "fn",
    [fastsoftmax.softmax, fastsoftmax.log_softmax, softmax_ops.softmax_op, softmax_ops.log_softmax_op],
    ids=["softmax", "log_softmax", "op_softmax", "op_log_softmax"],
)
@pytest.mark.parametrize("shape,dim", [((3, 7), 1), ((2, 4, 3), 1), ((5,), 0)])
def test_gradgradcheck_softmax(fn, shape, dim):
    x = randn(*shape, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: fn(x, dim), (x,))


def test_hessian_vector_product_matches_torch():
    x = randn(4, 9, dtype=torch.float64).requires_grad_()
    v = randn(4, 9, dtype=torch.float64)

    def hvp(softmax):
        loss = (softmax(x, 1) * torch.linspace(-1, 1, 9, dtype=torch.float64)).sum() ** 2
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), x)
        return h

    assert_close(hvp(fastsoftmax.log_softmax), hvp(TF.log_softmax))
    assert_close(hvp(fastsoftmax.softmax), hvp(TF.softmax))


@pytest.mark.parametrize("door", ["functional", "op"])
@pytest.mark.parametrize("kind,reduction", [("index", "mean"), ("index", "none"), ("prob", "sum")])
def test_cross_entropy_double_backward_matches_torch(door, kind, reduction):
    """Hessian-vector products through the loss, as torch gives them (the backward recomputes in torch ops)."""
    x = randn(4, 6, dtype=torch.float64).requires_grad_()
    t = torch.tensor([0, 5, -100, 1]) if kind == "index" else torch.softmax(randn(4, 6, dtype=torch.float64), 1)
    w = torch.rand(6, dtype=torch.float64) + 0.5
    v = randn(4, 6, dtype=torch.float64)

    def hvp(loss_fn):
        loss = loss_fn(x)
        go = torch.linspace(0.5, 2, loss.numel(), dtype=torch.float64).reshape(loss.shape)
        (g,) = torch.autograd.grad(loss, x, go, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), x)
        return h

    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    if door == "op":
        ii = -100 if kind == "index" else -1

        def ours(x):
            return ce_ops.cross_entropy_op(x, t, w, ii, reduction, 0.1, 0.0, True, False)[0]
    else:

        def ours(x):
            return fastsoftmax.cross_entropy(x, t, **kw)

    assert_close(hvp(ours), hvp(lambda x: TF.cross_entropy(x, t, **kw)))


def test_gradgradcheck_cross_entropy_with_z_loss():
    x = randn(3, 5, dtype=torch.float64).requires_grad_()
    t = torch.tensor([1, -100, 4])
    assert torch.autograd.gradgradcheck(lambda x: fastsoftmax.cross_entropy(x, t, z_loss=0.01, label_smoothing=0.2), (x,))


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_cross_entropy(kind, reduction):
    x = randn(4, 6, 2, dtype=torch.float64).requires_grad_()
    if kind == "prob":
        t = torch.softmax(randn(4, 6, 2, dtype=torch.float64), 1)
    else:
        t = torch.randint(0, 6, (4, 2))
    w = torch.rand(6, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda x: fastsoftmax.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=0.2), (x,)
    )


def _opcheck_cases():
    x = randn(6, 9, dtype=torch.float32).requires_grad_()
    x3 = randn(2, 5, 4, dtype=torch.float64).requires_grad_()
    yield "softmax", softmax_ops.softmax_op, (x, 1)
    yield "softmax_dim0_3d", softmax_ops.softmax_op, (x3, 0)
    yield "log_softmax", softmax_ops.log_softmax_op, (x3, 1)
    y = torch.softmax(x.detach(), 1)
    yield "softmax_backward", softmax_ops.softmax_backward_op, (y, randn(6, 9), 1)
    yield "log_softmax_backward", softmax_ops.log_softmax_backward_op, (torch.log(y), randn(6, 9), 1)
    t = torch.randint(0, 9, (6,))
    for reduction in ("mean", "none"):
        yield f"ce_{reduction}", ce_ops.cross_entropy_op, (x, t, None, -100, reduction, 0.1, 0.0, True, False)
    yield "ce_z_loss_lse", ce_ops.cross_entropy_op, (x, t, None, -100, "mean", 0.0, 0.01, True, True)
    w = torch.rand(5, dtype=torch.float64)
    yield "ce_kdim_weighted", ce_ops.cross_entropy_op, (x3, torch.randint(0, 5, (2, 4)), w, 1, "sum", 0.0, 0.0, True, False)
    q3 = torch.softmax(randn(2, 5, 4, dtype=torch.float64), 1)
    yield "ce_prob", ce_ops.cross_entropy_op, (x3, q3, None, -100, "mean", 0.0, 0.0, True, True)
    yield "ce_backward", ce_ops.cross_entropy_backward_op, (randn(6, 9), torch.tensor(0.5), torch.float32)
    # (N, C, d) with 16 positions: reduced over C in place, gradient laid out like the input
    xm = randn(2, 5, 16, dtype=torch.float32).requires_grad_()
    tm = torch.randint(0, 5, (2, 16))
    yield "ce_middle_index", ce_ops.cross_entropy_op, (xm, tm, None, -100, "none", 0.1, 0.02, True, True)
    qm = torch.softmax(randn(2, 5, 16, dtype=torch.float32), 1)
    yield "ce_middle_prob", ce_ops.cross_entropy_op, (xm, qm, None, -100, "mean", 0.1, 0.0, True, False)
    yield "ce_middle_backward", ce_ops.cross_entropy_backward_op, (randn(2, 5, 16), randn(2, 16), torch.float32)


#: opcheck's aot_dispatch tests trace each op through AOTAutograd, static and
#: dynamic, which takes seconds an op; they run on one op of each kind, the
#: cheaper checks (schema, autograd registration, fake tensors) on every case.
FULL_OPCHECK = {"softmax", "log_softmax_backward", "ce_mean", "ce_middle_index", "ce_backward"}


@pytest.mark.parametrize("name,op,args", list(_opcheck_cases()), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(name, op, args):
    if name in FULL_OPCHECK:
        torch.library.opcheck(op, args)
    else:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(20, 10)

    def forward(self, x, t):
        logits = self.linear(x)
        p = fastsoftmax.softmax(logits, -1)
        lp = fastsoftmax.log_softmax(logits, 1)
        return fastsoftmax.cross_entropy(logits, t, label_smoothing=0.1) + (p * lp).sum() * 0.01


def test_torch_compile_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    model = _Model().double()
    x = randn(32, 20, dtype=torch.float64)
    t = torch.randint(0, 10, (32,))
    eager_loss = model(x, t)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(x, t)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert_close(loss, eager_loss)
    for g, ge in zip(grads, eager_grads):
        assert_close(g, ge)


@pytest.mark.slow
def test_torch_compile_inductor_matches_torch():
    torch._dynamo.reset()
    x = randn(16, 30, dtype=torch.float32).requires_grad_()
    t = torch.randint(0, 30, (16,))
    fn = torch.compile(lambda x, t: fastsoftmax.cross_entropy(x, t) + fastsoftmax.softmax(x, 1).max(), fullgraph=True)
    loss = fn(x, t)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    ref = TF.cross_entropy(x64, t) + torch.softmax(x64, 1).max()
    ref.backward()
    assert_close(loss, ref, torch.float32)
    assert_close(x.grad, x64.grad, torch.float32)


@pytest.mark.parametrize("kind", ["prob requiring grad", "index, reduction none"])
def test_torch_compile_fullgraph_cross_entropy_over_a_middle_axis(kind):
    """(N, C, d) logits under torch.compile: the composed loss for targets that require grad, and the
    middle-axis op with a per-position grad_output; gradients as in eager torch."""
    torch._dynamo.reset()
    x = randn(4, 5, 16, dtype=torch.float64)
    if kind.startswith("prob"):
        target = torch.softmax(randn(4, 5, 16, dtype=torch.float64, seed=3), 1)
        kw = dict(label_smoothing=0.1)
    else:
        target = torch.randint(0, 5, (4, 16))
        kw = dict(reduction="none")
    results = []
    for fn in (torch.compile(fastsoftmax.cross_entropy, fullgraph=True, backend="aot_eager"), TF.cross_entropy):
        leaves = [x.clone().requires_grad_()]
        if target.is_floating_point():
            leaves.append(target.clone().requires_grad_())
        loss = fn(*leaves, **kw) if len(leaves) == 2 else fn(leaves[0], target, **kw)
        go = randn(*loss.shape, dtype=torch.float64, seed=4)
        results.append((loss, *torch.autograd.grad(loss, leaves, go)))
    for ours, theirs in zip(*results):
        assert_close(ours, theirs)
