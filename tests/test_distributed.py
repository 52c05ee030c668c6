"""Vocabulary-parallel cross-entropy on 2 real processes over gloo, against fastsoftmax.cross_entropy on the whole logits.

One launch of two worker processes (tests/distributed_worker.py) runs every
case; each test here compares one case's loss (the same on both ranks, to
the bit) and each rank's gradient slice with the single-process result on
the concatenated logits, or checks that both ranks raised.
"""

import math
import multiprocessing
import warnings

import pytest
import torch
from distributed_worker import WORLD, LinearCase, cases, run_case

import fastsoftmax
from fastsoftmax import errors

CASES = cases()

# (rtol, atol as a fraction of the largest reference element): the sums of
# exponentials are regrouped by rank, so results match to rounding, not to
# the bit; a gradient element that cancels (A p_t - w_t near p_t = 1) is
# judged against the gradient's scale, not its own size. bfloat16: both
# round float32 results that differ in the last float32 bits, so they may
# land an ulp of bfloat16 apart (tests/helpers.py's rtol).
TOLERANCE = {torch.float32: (1e-6, 1e-6), torch.float64: (1e-12, 1e-12), torch.bfloat16: (1.6e-2, 1e-3)}

ERRORS = {
    "target out of range": (IndexError, IndexError),
    "negative target": (IndexError, IndexError),
    "slices with a gap": (errors.ArgumentError, errors.ArgumentError),
    "overlapping slices": (errors.ArgumentError, errors.ArgumentError),
    "vocab_start on one rank only": (errors.ArgumentError, errors.ArgumentError),
    # rank 1 raises its own error; rank 0 learns of it from the first collective instead of waiting
    "rank 1 passes a weight of the wrong length": (errors.ArgumentError, errors.ShapeError),
    "reduction avg": (errors.ArgumentError, errors.ArgumentError),
    "linear target out of range": (IndexError, IndexError),
    "linear rank 1 passes a layer of the wrong hidden size": (errors.ArgumentError, errors.ShapeError),
}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every case's result on each rank: ``[{name: (loss, grad) or exception}, ...]``, from one launch."""
    folder = tmp_path_factory.mktemp("gloo")
    context = multiprocessing.get_context("spawn")
    from distributed_worker import main

    outs = [folder / f"rank{r}.pt" for r in range(WORLD)]
    procs = [context.Process(target=main, args=(r, str(folder / "store"), str(outs[r]))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a worker did not finish: a collective hung"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(out, weights_only=False) for out in outs]


def _reference(case):
    """The single-process loss and gradient on the concatenated logits, split into the ranks' slices."""
    x = case.logits.clone().requires_grad_(case.grad_output != "none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = fastsoftmax.cross_entropy(
            x.movedim(-1, 1) if x.ndim > 2 else x, case.target, weight=case.weight, **case.kw
        )
    if case.grad_output == "none":
        return loss.detach(), [None] * len(case.widths)
    (grad,) = torch.autograd.grad(loss, x, case.grad_out(loss.shape))
    return loss.detach(), [case.shard(grad, r) for r in range(len(case.widths))]


def _close(actual, expected, dtype):
    rtol, scale = TOLERANCE[dtype]
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), "NaN placement differs"
    finite = expected[torch.isfinite(expected)]
    atol = scale * float(finite.abs().max()) if finite.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)


VALUE_CASES = [n for n in CASES if n not in ERRORS and not getattr(CASES[n], "opcheck", False)]
LINEAR = {n for n in VALUE_CASES if isinstance(CASES[n], LinearCase)}


@pytest.mark.parametrize("name", [n for n in VALUE_CASES if n not in LINEAR])
def test_same_loss_and_gradient_slices_as_one_process(ranks, name):
    case = CASES[name]
    results = [ranks[r][name] for r in range(WORLD)]
    for result in results:
        if isinstance(result, BaseException):
            raise result
    loss, grads = _reference(case)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0, equal_nan=True)  # the same bits on every rank
    _close(results[0][0], loss, case.logits.dtype)
    for r in range(WORLD):
        if grads[r] is None:
            assert results[r][1] is None
        else:
            _close(results[r][1], grads[r], case.logits.dtype)


def _linear_reference(case):
    """The single-process loss of ``hidden @ layer.T + bias`` and the gradients of hidden, each rank's rows of the layer and of the bias."""
    wants = case.grad_output != "none"
    h, layer = (t.clone().requires_grad_(wants) for t in (case.hidden, case.layer))
    bias = None if case.bias is None else case.bias.clone().requires_grad_(wants)
    x = h @ layer.T + (bias if bias is not None else 0.0)
    loss = fastsoftmax.cross_entropy(x.movedim(-1, 1) if x.ndim > 2 else x, case.target, weight=case.weight, **case.kw)
    if not wants:
        return loss.detach(), [None] * WORLD
    inputs = [h, layer] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(loss, inputs, case.grad_out(loss.shape))
    return loss.detach(), [[grads[0]] + [case.rows(g, r) for g in grads[1:]] for r in range(WORLD)]


@pytest.mark.parametrize("name", sorted(LINEAR))
def test_linear_same_loss_and_gradients_as_one_process(ranks, name):
    case = CASES[name]
    results = [ranks[r][name] for r in range(WORLD)]
    for result in results:
        if isinstance(result, BaseException):
            raise result
    loss, grads = _linear_reference(case)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0, equal_nan=True)
    _close(results[0][0], loss, case.hidden.dtype)
    for r in range(WORLD):
        if grads[r] is None:
            assert results[r][1] is None
            continue
        assert len(results[r][1]) == len(grads[r])
        for ours, ref in zip(results[r][1], grads[r]):
            _close(ours, ref, case.hidden.dtype)
        # no rank made more than a chunk of its logits at once
        assert results[r][2] <= (case.chunk_rows or case.target.numel())


@pytest.mark.parametrize("name", list(ERRORS))
def test_every_rank_raises(ranks, name):
    for r in range(WORLD):
        assert isinstance(ranks[r][name], ERRORS[name][r]), (r, repr(ranks[r][name]))


def test_error_messages_name_the_problem(ranks):
    assert "Target 20 is out of bounds" in str(ranks[0]["target out of range"])
    assert "class 7 is in no slice" in str(ranks[1]["slices with a gap"])
    assert "class 6 is in two slices" in str(ranks[0]["overlapping slices"])
    assert "rank(s) [1]" in str(ranks[0]["rank 1 passes a weight of the wrong length"])


@pytest.mark.parametrize("name", ["opcheck", "linear opcheck, fused"])
def test_opcheck_passed_on_both_ranks(ranks, name):
    for r in range(WORLD):
        result = ranks[r][name]
        if isinstance(result, BaseException):
            raise result


def test_reference_catches_a_wrong_slice(ranks):
    """The comparison can fail: rank 1's gradient slice against rank 0's reference slice."""
    case = CASES["f32 uneven 7+13, mean"]
    _, grads = _reference(case)
    with pytest.raises(AssertionError):
        _close(ranks[1]["f32 uneven 7+13, mean"][1][:, :7], grads[0], torch.float32)


def test_without_init_process_group_it_says_so():
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fastsoftmax.vocab_parallel_cross_entropy(x, torch.tensor([0, 1]))


def test_one_rank_in_process_is_the_single_process_kernel(tmp_path):
    """A group of one: the same bits as fastsoftmax.cross_entropy (nothing is regrouped)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        case = CASES["f32 weights and smoothing, mean"]
        case = type(case)(case.logits, case.target, widths=(20,), weight=case.weight, kw=case.kw)
        loss, grad = run_case(case, 0)
        ref_loss, ref_grads = _reference(case)
        assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grads[0])
    finally:
        dist.destroy_process_group()
    assert not math.isnan(float(loss))


@pytest.mark.parametrize(
    "widths, starts, expected",
    [
        ((3, 0, 5, 2), (-1, -1, -1, -1), [(0, 10), (3, 10), (3, 10), (8, 10)]),  # rank order; an empty slice
        ((3, 4, 5), (9, 0, 4), [(9, 12), (0, 12), (4, 12)]),  # any order
        ((0, 4, 0), (4, 0, 0), [(4, 4), (0, 4), (0, 4)]),  # empty slices anywhere in [0, C]
    ],
)
def test_class_layout_of_more_ranks(widths, starts, expected):
    from fastsoftmax.distributed.rows import class_layout

    got = [class_layout(list(widths), list(starts), r) for r in range(len(widths))]
    assert [(lay.v0, lay.n_classes) for lay in got] == expected
    assert [lay.width for lay in got] == list(widths)


@pytest.mark.parametrize(
    "widths, starts, message",
    [
        ((3, 4, 5), (0, 4, 8), "class 3 is in no slice"),
        ((3, 4, 5), (0, 2, 7), "class 2 is in two slices"),
        ((3, 4), (1, 4), "class 0 is in no slice"),
        ((3, 4), (0, -1), r"not on ranks \[1\]"),
    ],
)
def test_class_layout_rejects_slices_that_do_not_tile(widths, starts, message):
    from fastsoftmax.distributed.rows import class_layout

    with pytest.raises(errors.ArgumentError, match=message):
        class_layout(list(widths), list(starts), 0)
