"""softmax and log_softmax against torch in float64, forward and backward."""

import warnings

import pytest
import torch
import torch.nn.functional as TF
from fastsoftmax.kernels import config
from helpers import FLOAT_DTYPES, assert_close, backward_reference, randn

import fastsoftmax
from fastsoftmax.backends import cpu as cpu_backend

OPS = [(fastsoftmax.softmax, TF.softmax), (fastsoftmax.log_softmax, TF.log_softmax)]
OP_IDS = ["softmax", "log_softmax"]

SHAPES = [
    ((7, 1), 1),  # one column: max is the element, probability exactly 1
    ((5, 13), 1),  # odd width: all scalar loop remainders
    ((64, 1000), 1),  # non power of two, vector body + remainder
    ((3, 40000), -1),  # wide rows, parallel path, row larger than L1
    ((4, 5, 6), 1),  # 3-D, middle dim, 6 inner positions: moved to last and back
    ((3, 7, 40), 1),  # middle dim, 40 inner positions: the middle-axis kernels, serial
    ((2, 300, 33), 1),  # middle axis of 300 classes: many blocks of partial sums
    ((2, 1000, 300), 1),  # middle axis, parallel, inner blocks of 256 and an uneven last one
    ((3, 40000), 0),  # first dim of a wide 2-D tensor: middle-axis kernels, inner of 40000
    ((2, 3, 4, 5), 0),  # 4-D, first dim
    ((2, 3, 4, 5), -1),  # 4-D, last dim
    ((11,), 0),  # 1-D
    ((), 0),  # 0-d: softmax of a scalar is 1
    ((0, 9), 1),  # empty batch
    ((9, 0), 1),  # empty reduced dim
]


@pytest.mark.parametrize("op,ref", OPS, ids=OP_IDS)
@pytest.mark.parametrize("shape,dim", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_forward_backward_against_float64(op, ref, shape, dim, dtype):
    x = randn(*shape, dtype=dtype).requires_grad_()
    y = op(x, dim)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ref(x.detach().double(), dim), dtype)
    dy = randn(*shape, dtype=dtype)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert dx.dtype == dtype
    assert_close(dx, backward_reference(op is fastsoftmax.log_softmax, y, dy, dim), dtype)


@pytest.mark.parametrize("op,ref", OPS, ids=OP_IDS)
def test_non_contiguous_input(op, ref):
    base = randn(40, 30, dtype=torch.float64)
    for x in (base.t(), base[::2, 1::3], base.unsqueeze(0).expand(3, 40, 30)):
        assert not x.is_contiguous()
        for dim in range(x.ndim):
            assert_close(op(x, dim), ref(x, dim))


@pytest.mark.parametrize("op,ref", OPS, ids=OP_IDS)
@pytest.mark.parametrize(
    "make,dim",
    [
        (lambda: randn(4, 5, 6), 0),
        (lambda: randn(4, 5, 6), 1),
        (lambda: randn(4, 6, 5).transpose(1, 2), 1),
        (lambda: randn(2, 3, 4, 5).to(memory_format=torch.channels_last), 1),
    ],
    ids=["dim0", "dim1", "transposed", "channels_last"],
)
def test_output_and_gradient_strides_match_torch(op, ref, make, dim):
    """Same strides as torch's result (contiguous), so ``.view`` works on ours wherever on theirs."""
    x = make().requires_grad_()
    ours, theirs = op(x, dim), ref(x, dim)
    assert ours.stride() == theirs.stride()
    g = randn(*x.shape)
    (dx_ours,) = torch.autograd.grad(ours, x, g)
    (dx_theirs,) = torch.autograd.grad(theirs, x, g)
    assert dx_ours.stride() == dx_theirs.stride()
    assert_close(ours, theirs)
    assert_close(dx_ours, dx_theirs)


@pytest.mark.parametrize("op,ref", OPS, ids=OP_IDS)
def test_dtype_argument_casts_first(op, ref):
    x = randn(6, 50, dtype=torch.float32)
    y = op(x, 1, dtype=torch.float64)
    assert y.dtype == torch.float64
    assert_close(y, ref(x.double(), 1))


@pytest.mark.parametrize("op,ref", OPS, ids=OP_IDS)
def test_implicit_dim_warns_and_matches_torch(op, ref):
    for shape in [(5,), (4, 6), (2, 3, 4), (2, 3, 4, 5)]:
        x = randn(*shape, dtype=torch.float64)
        with pytest.warns(UserWarning, match="Implicit dimension"):
            y = op(x)
        with pytest.warns(UserWarning):
            assert_close(y, ref(x))


@pytest.mark.parametrize("op", [fastsoftmax.softmax, fastsoftmax.log_softmax], ids=OP_IDS)
@pytest.mark.parametrize("shape,dim", [((300, 257), 1), ((6, 257, 50), 1)], ids=["rows", "middle"])
def test_serial_and_parallel_kernels_agree(op, shape, dim, monkeypatch):
    """The two twins of each kernel give the same outputs, bit for bit (sums in one fixed order)."""
    x = randn(*shape, dtype=torch.float32).requires_grad_()
    g = randn(*shape, dtype=torch.float32)
    results = []
    for serial in (True, False):  # the serial twin (as a forked child runs it), then the parallel one
        monkeypatch.setattr(cpu_backend._Threads, "parallel", not serial)
        monkeypatch.setattr(config, "CPU_PARALLEL_MIN_ELEMENTS", 0)
        y = op(x, dim)
        results.append((y, *torch.autograd.grad(y, x, g)))
    (y_serial, dx_serial), (y_parallel, dx_parallel) = results
    assert torch.equal(y_parallel, y_serial)
    assert torch.equal(dx_parallel, dx_serial)


@pytest.mark.parametrize("op,ref", OPS, ids=OP_IDS)
@pytest.mark.parametrize("block_bytes", [1, 4096, 1 << 30], ids=["16-wide", "mid", "one-block"])
def test_middle_axis_blocks_of_any_width(op, ref, block_bytes, monkeypatch):
    """The inner positions split into blocks of 16, of a few dozen, or all in one: same result."""
    monkeypatch.setattr(config, "CPU_MIDDLE_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(config, "CPU_PARALLEL_MIN_ELEMENTS", 0)
    x = randn(3, 29, 70, dtype=torch.float64).requires_grad_()
    g = randn(3, 29, 70, dtype=torch.float64)
    y = op(x, 1)
    x64 = x.detach().requires_grad_()
    y64 = ref(x64, 1)
    assert_close(y, y64)
    assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y64, x64, g)[0])


def test_softmax_rows_sum_to_one_and_shift_invariant():
    x = randn(128, 777, dtype=torch.float32)
    y = fastsoftmax.softmax(x, 1)
    torch.testing.assert_close(y.double().sum(1), torch.ones(128, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(fastsoftmax.softmax(x + 1000.0, 1), y, rtol=1e-4, atol=1e-7)


def test_modules_match_torch_modules():
    x = randn(4, 9, dtype=torch.float64)
    assert repr(fastsoftmax.nn.Softmax(dim=1)) == repr(torch.nn.Softmax(dim=1))
    assert_close(fastsoftmax.nn.Softmax(dim=1)(x), torch.nn.Softmax(dim=1)(x))
    assert_close(fastsoftmax.nn.LogSoftmax(dim=0)(x), torch.nn.LogSoftmax(dim=0)(x))


def test_large_output_comes_from_pool_and_is_reused():
    from fastsoftmax.ops import pool as _pool

    x = randn(512, 1024, dtype=torch.float32)  # 2 MiB: above POOL_MIN_BYTES
    y1 = fastsoftmax.softmax(x, 1)
    ptr = y1.data_ptr()
    y2 = fastsoftmax.softmax(x, 1)
    assert y2.data_ptr() != ptr, "a live output must never be handed out again"
    expected = y1.clone()
    del y1
    y3 = fastsoftmax.softmax(x * 2, 1)
    assert y3.data_ptr() == ptr, "a freed output should be reused"
    torch.testing.assert_close(y2, expected, rtol=0, atol=0)
    assert _pool.cached_bytes() >= 2 * x.numel() * 4


@pytest.mark.parametrize("op,ref", OPS, ids=OP_IDS)
def test_book_rows_read_at_the_right_address_or_not_at_all(op, ref):
    """The book's kernels read a tensor at its address: offsets, negative views, nested tensors and odd gradients."""
    from fastsoftmax import paths

    base = randn(40, 10, seed=31)
    # a slice from row 3: contiguous, its memory starts 30 elements into the storage
    x = base[3:]
    assert x.storage_offset() == 30 and paths.book_rows(x, -1) is not None
    assert_close(op(x, -1), ref(x.double(), -1), torch.float32)
    # a negative view holds the values negated in memory: not the book's path, and torch's values
    neg = torch._neg_view(base)
    assert neg.is_neg() and paths.book_rows(neg, -1) is None
    assert_close(op(neg, -1), ref(-base.double(), -1), torch.float32)
    # a nested tensor of vectors is 2-D and contiguous, but has no plain rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "prototype stage" note on strided nested tensors
        nested = torch.nested.nested_tensor([randn(10, seed=32), randn(10, seed=33)])
    assert paths.book_rows(nested, -1) is None
    # gradients of any strides, negated in memory, or a subclass: the same as torch's
    xg = base.clone().requires_grad_()
    y, y64 = op(xg, -1), ref(base.double(), -1)
    dy = randn(40, 10, seed=34)
    log = op is fastsoftmax.log_softmax
    for grad in (dy.t().contiguous().t(), dy[:, :1].expand(40, 10), torch._neg_view(-dy)):
        (dx,) = torch.autograd.grad(y, xg, grad, retain_graph=True)
        assert_close(dx, backward_reference(log, y64, grad.double(), -1), torch.float32)


@pytest.mark.parametrize("op,ref", OPS, ids=OP_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_book_rows_take_book_softmax_forward_backward_and_twice(op, ref, dtype, monkeypatch):
    """Rows of the book's shape go through ops.softmax.BookSoftmax: against float64, then its corner cases."""
    from fastsoftmax.ops import softmax as softmax_ops

    calls = []
    original = softmax_ops.BookSoftmax.forward
    monkeypatch.setattr(softmax_ops.BookSoftmax, "forward", staticmethod(lambda *a: calls.append(a) or original(*a)))
    x = randn(256, 10, dtype=dtype, seed=21).requires_grad_()
    dy = randn(256, 10, dtype=dtype, seed=22)
    y = op(x, -1)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert len(calls) == 1, "the book's rows did not take BookSoftmax"
    x64 = x.detach().double().requires_grad_()
    y64 = ref(x64, -1)
    assert_close(y, y64, dtype)
    log = op is fastsoftmax.log_softmax
    assert_close(dx, backward_reference(log, y.detach(), dy, -1), dtype)
    # the gradient of a sum arrives expanded (stride 0)
    (dx_sum,) = torch.autograd.grad(op(x, 1).sum(), x)
    assert_close(dx_sum, backward_reference(log, y.detach(), torch.ones_like(dy), -1), dtype)
    # double backward: a Hessian-vector product against torch's
    v = randn(256, 10, dtype=dtype, seed=23)
    hv = []
    for f, xx in ((op, x), (ref, x.detach().clone().requires_grad_())):
        (g,) = torch.autograd.grad((f(xx, -1) * dy).sum(), xx, create_graph=True)
        hv.append(torch.autograd.grad((g * v).sum(), xx)[0])
    assert_close(hv[0], hv[1], dtype)
    # the output written in place before the backward: autograd's error, as torch's
    for f in (op, ref):
        out = f(x, -1)
        out.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.backward(dy)
