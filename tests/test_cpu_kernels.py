"""The CPU kernels' parallel machinery: the shared work queue and the non-temporal streaming path.

Through the public API, these paths only run on large inputs (at least
``config.CPU_PARALLEL_MIN_ELEMENTS`` elements, outputs of at least
``config.CPU_STREAM_MIN_BYTES``); here the thresholds are lowered so that
small inputs take them, with claim sizes that divide the rows unevenly and
row widths whose starts fall at every alignment.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from fastsoftmax.kernels import config, cpu_common, cpu_rows
from helpers import assert_close, backward_reference, randn
from numba import njit

import fastsoftmax

# (claims per thread, minimum elements per claim): one row per claim, a few
# rows per claim, and all rows in one claim (the other worker gets none)
CLAIMS = [(1 << 20, 1), (3, 1), (1, 1 << 30)]


@pytest.fixture(params=[False, True], ids=["cached", "streamed"])
def parallel_config(request, monkeypatch):
    monkeypatch.setattr(config, "CPU_PARALLEL_MIN_ELEMENTS", 0)
    monkeypatch.setattr(config, "CPU_STREAM_MIN_BYTES", 0 if request.param else 1 << 62)
    return monkeypatch


def _softmax_grad(op, x, go):
    x = x.detach().requires_grad_()
    y = op(x, 1)
    (dx,) = torch.autograd.grad(y, x, go)
    return y, dx


@pytest.mark.parametrize("claims", CLAIMS, ids=["row", "rows", "all"])
@pytest.mark.parametrize("n_cols", [1, 13, 1001])  # 1001 floats: row starts at every 4-byte offset mod 32
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_ops_with_claims_and_streaming(parallel_config, claims, n_cols, dtype, name):
    parallel_config.setattr(config, "CPU_CLAIMS_PER_THREAD", claims[0])
    parallel_config.setattr(config, "CPU_MIN_CLAIM_ELEMENTS", claims[1])
    x = randn(37, n_cols, dtype=dtype)
    go = randn(37, n_cols, dtype=dtype)
    y, dx = _softmax_grad(getattr(fastsoftmax, name), x, go)
    assert_close(y, getattr(torch, name)(x.double(), 1))
    assert_close(dx, backward_reference(name == "log_softmax", y, go, 1))


@pytest.mark.parametrize("claims", CLAIMS, ids=["row", "rows", "all"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_cross_entropy_with_claims_and_streaming(parallel_config, claims, kind):
    parallel_config.setattr(config, "CPU_CLAIMS_PER_THREAD", claims[0])
    parallel_config.setattr(config, "CPU_MIN_CLAIM_ELEMENTS", claims[1])
    x = randn(41, 1003, dtype=torch.float32)
    if kind == "index":
        target = torch.randint(0, 1003, (41,))
        target[::5] = -100
    else:
        target = torch.softmax(randn(41, 1003, dtype=torch.float32), 1)
    weight = torch.rand(1003, dtype=torch.float32) + 0.5
    results = []
    for fn, dt in ((fastsoftmax.cross_entropy, torch.float32), (TF.cross_entropy, torch.float64)):
        xx = x.to(dt).requires_grad_()
        tt = target.to(dt) if kind == "prob" else target
        loss = fn(xx, tt, weight=weight.to(dt), reduction="none", label_smoothing=0.1)
        go = randn(41, dtype=dt, seed=3)
        (dx,) = torch.autograd.grad(loss, xx, go)
        results.append((loss, dx))
    assert_close(results[0][0], results[1][0], dtype=torch.float32)
    assert_close(results[0][1], results[1][1], dtype=torch.float32)


@pytest.mark.parametrize("workers,per_claim", [(1, 1), (2, 100), (5, 3), (9, 1)])
def test_workers_beyond_threads_share_one_queue(workers, per_claim):
    """More workers than threads (or one): every row is still written exactly once, and the queue is drained."""
    x = randn(23, 333, dtype=torch.float32).numpy()
    y = np.full_like(x, np.nan)
    scratch = np.empty((workers, 333 + cpu_common.BLOCK), np.float32)  # a stream row, then the block
    queue = np.array([0, per_claim, workers], np.int64)
    cpu_rows.softmax_forward[True](x, y, scratch, queue)
    assert queue[0] >= 23
    ref = torch.softmax(torch.from_numpy(x).double(), 1)
    assert_close(torch.from_numpy(y), ref)


@pytest.mark.parametrize("claims", CLAIMS, ids=["row", "rows", "all"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_over_a_middle_axis_in_parallel(parallel_config, claims, smoothing):
    """(N, C, H, W) logits with class-index targets: the middle-axis kernel, parallel, blocks of 16 positions."""
    parallel_config.setattr(config, "CPU_CLAIMS_PER_THREAD", claims[0])
    parallel_config.setattr(config, "CPU_MIN_CLAIM_ELEMENTS", claims[1])
    parallel_config.setattr(config, "CPU_MIDDLE_BLOCK_BYTES", 1)
    x = randn(3, 11, 5, 9, dtype=torch.float32)
    target = torch.randint(0, 11, (3, 5, 9))
    target[0, 1, ::2] = -100
    with torch.no_grad():
        x[0, 3, 1, 2] = float("nan")  # at an ignored position: loss 0, but a NaN gradient column, as torch's
    weight = torch.rand(11, dtype=torch.float32) + 0.5
    results = []
    for fn, dt in ((fastsoftmax.cross_entropy, torch.float32), (TF.cross_entropy, torch.float64)):
        xx = x.to(dt).requires_grad_()
        loss = fn(xx, target, weight=weight.to(dt), reduction="sum", label_smoothing=smoothing)
        (dx,) = torch.autograd.grad(loss, xx)
        results.append((loss, dx))
    (loss, dx), (loss64, dx64) = results
    assert torch.isnan(loss) == torch.isnan(loss64)
    assert torch.isnan(dx[0, :, 1, 2]).all() and torch.isnan(dx).sum() == dx.shape[1]
    assert_close(dx, dx64, dtype=torch.float32)  # NaN where torch's is NaN (equal_nan), close elsewhere
    ok = randn(3, 11, 5, 9, dtype=torch.float32)
    assert_close(fastsoftmax.cross_entropy(ok, target, reduction="none"), TF.cross_entropy(ok.double(), target, reduction="none"), dtype=torch.float32)


@pytest.mark.parametrize("claims", CLAIMS, ids=["row", "rows", "all"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_with_probabilities_over_a_middle_axis_in_parallel(parallel_config, claims, reduction):
    """(N, C, H, W) logits and class probabilities: the middle-axis kernel, parallel, blocks of 16 positions.

    With ``reduction="none"`` the per-position grad_output scales the gradient
    in its own layout (no copy with C moved last).
    """
    parallel_config.setattr(config, "CPU_CLAIMS_PER_THREAD", claims[0])
    parallel_config.setattr(config, "CPU_MIN_CLAIM_ELEMENTS", claims[1])
    parallel_config.setattr(config, "CPU_MIDDLE_BLOCK_BYTES", 1)
    x = randn(3, 11, 5, 9, dtype=torch.float32)
    q = torch.softmax(2 * randn(3, 11, 5, 9, dtype=torch.float32, seed=2), 1)
    weight = torch.rand(11, dtype=torch.float32) + 0.5
    results = []
    for fn, dt in ((fastsoftmax.cross_entropy, torch.float32), (TF.cross_entropy, torch.float64)):
        xx = x.to(dt).requires_grad_()
        loss = fn(xx, q.to(dt), weight=weight.to(dt), reduction=reduction, label_smoothing=0.1)
        go = randn(*loss.shape, dtype=dt, seed=3)
        (dx,) = torch.autograd.grad(loss, xx, go)
        results.append((loss, dx))
    (loss, dx), (loss64, dx64) = results
    assert_close(loss, loss64, dtype=torch.float32)
    assert_close(dx, dx64, dtype=torch.float32)
    assert dx.is_contiguous()


@njit
def _row_max_of(x):
    return cpu_common.row_max_of(x)


@pytest.mark.parametrize("np_dtype", [np.float32, np.float64])
def test_row_max_over_every_tail_length_and_nan_position(np_dtype):
    """The explicit SIMD max (``intrinsics.row_max``): every length through four vectors and a tail,
    the max in every position, NaN skipped wherever it stands, -inf rows and empty rows."""
    rng = np.random.default_rng(7)
    for n in range(0, 70):
        x = rng.standard_normal(n).astype(np_dtype)
        assert _row_max_of(x) == (x.max() if n else -np.inf), n
        for k in range(n):
            peak = x.copy()
            peak[k] = 9.0
            assert _row_max_of(peak) == 9.0, (n, k)
            holed = x.copy()
            holed[k] = np.nan
            expected = np.nanmax(holed) if n > 1 else -np.inf
            assert _row_max_of(holed) == expected, (n, k)
    assert _row_max_of(np.full(37, -np.inf, np_dtype)) == -np.inf
    assert _row_max_of(np.full(37, np.nan, np_dtype)) == -np.inf
    assert _row_max_of(np.array([1.0, np.inf, 2.0] * 11, np_dtype)) == np.inf
    assert _row_max_of(np.linspace(-3e38, -1e38, 41).astype(np_dtype)) == np_dtype(-1e38)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 127, 128, 129, 1000, 100_003])
def test_loss_total_is_accurate_where_a_running_sum_is_not(n):
    """kernels.cpu_small._total, the sum every CPU path reduces its losses with: blocks of 8 lanes, then pairwise.

    One large term and many small ones: a running sum loses every small term
    (1e-16 each, below half an ulp of 1); here each lane and block sums them
    first, so only the few that share the large term's lane are lost.
    """
    import math

    from fastsoftmax.backends import cpu

    rng = np.random.default_rng(n)
    a = rng.random(n) * 1e-16
    if n:
        a[0] = 1.0
    exact = math.fsum(a)
    running = 0.0
    for v in a:
        running += v
    got = cpu.total(a)
    # at most the 15 small terms of the large one's lane lost, and one rounding of about 1 per level after
    bound = (16 + 8 + math.log2(n / 128 + 1)) * np.finfo(np.float64).eps / 2
    assert abs(got - exact) <= bound, (got, exact)
    if n >= 1000:
        assert abs(running - exact) > 10 * bound  # the test tells the two apart
    assert cpu.total(a.reshape(-1, 1)) == got  # any shape: the elements in order


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 2), (256, 10), (999, 16)])
def test_book_kernel_is_the_same_bits_as_the_general_kernel(dtype, shape):
    """kernels.cpu_small.cross_entropy_book against the general middle-axis kernel (cross_entropy_small) and
    _total: the same losses, gradient and reduced loss, bit for bit, with ignored targets, label smoothing,
    NaN and infinities, for a mean and a sum; and the same first bad target."""
    from fastsoftmax.kernels import cpu_small

    rng = np.random.default_rng(shape[0])
    n, c = shape
    for eps, scale, special in ((0.0, 3.0, None), (0.1, 30.0, None), (0.3, 1e4, None), (0.0, 3.0, np.nan), (0.2, 3.0, np.inf), (0.0, 3.0, -np.inf)):
        x = (rng.standard_normal(shape) * scale).astype(dtype)
        if special is not None:
            x[rng.integers(0, n), rng.integers(0, c)] = special
        t = rng.integers(0, c, n)
        t[::3] = -100
        for mean in (True, False):
            g_book, g_ref, loss = np.empty_like(x), np.empty_like(x), np.empty(n)
            bad, value = cpu_small.cross_entropy_book(x, t, -100, eps, mean, g_book)
            bad_ref, denom = cpu_small.cross_entropy_small(x, t, -100, eps, mean, loss, g_ref)
            ref = cpu_small.total(loss)
            if mean:
                ref = ref / denom if denom else np.nan
            assert bad == bad_ref == -1
            assert np.array(value).tobytes() == np.array(ref).tobytes(), (eps, special, mean)
            assert g_book.tobytes() == g_ref.tobytes(), (eps, special, mean)
    t[n // 2] = c  # a class index past C: reported, nothing read
    assert cpu_small.cross_entropy_book(x, t, -100, 0.0, True, np.empty((0, c), dtype))[0] == n // 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 2), (256, 10), (999, 16)])
@pytest.mark.parametrize("log", [False, True])
def test_small_softmax_kernels_are_the_same_bits_as_the_middle_axis_kernels(dtype, shape, log):
    """kernels.cpu_small's softmax forward and backward (written out) against the general middle-axis kernels
    on the transposed rows, bit for bit, with NaN and infinities and an expanded (stride 0) gradient."""
    from fastsoftmax.kernels import cpu_small

    from fastsoftmax.backends import cpu

    rng = np.random.default_rng(shape[0] + 7)
    n, c = shape
    for scale, special in ((3.0, None), (1e4, None), (3.0, np.nan), (3.0, np.inf), (3.0, -np.inf)):
        x = (rng.standard_normal(shape) * scale).astype(dtype)
        if special is not None:
            x[rng.integers(0, n), rng.integers(0, c)] = special
        y, y_ref = np.empty_like(x), np.empty((1, c, n), dtype)
        cpu_small.softmax_forward_small(x, y, log)
        cpu.softmax_forward_middle(np.ascontiguousarray(x.T).reshape(1, c, n), y_ref, log)
        assert y.tobytes() == np.ascontiguousarray(y_ref[0].T).tobytes()
        for dy in (rng.standard_normal(shape).astype(dtype), np.broadcast_to(dtype(0.5), shape)):
            dx, dx_ref = np.empty_like(x), np.empty((1, c, n), dtype)
            cpu_small.softmax_backward_small(y, dy, dx, log)
            cols = [np.ascontiguousarray(a.T).reshape(1, c, n) for a in (y, dy)]
            cpu.softmax_backward_middle(*cols, dx_ref, log)
            assert dx.tobytes() == np.ascontiguousarray(dx_ref[0].T).tobytes()
