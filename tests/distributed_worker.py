"""The cases of tests/test_distributed.py and the worker process that runs them on one rank of a gloo group.

Every case is built from fixed seeds, so the test process (which computes
the single-process reference) and each worker build the same tensors. One
launch of :data:`WORLD` workers runs every case in the same order on each
rank and saves, per case, the rank's loss and gradient slice, or the
exception it raised.
"""

import dataclasses
import datetime
import os
import sys
import traceback
from typing import Optional

import torch

WORLD = 2
NAN, INF = float("nan"), float("inf")


def logits(*shape, dtype=torch.float32, seed=0, scale=3.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


def targets(n, n_classes, seed=0, ignored=(), low=0):
    g = torch.Generator().manual_seed(seed + 1000)
    t = torch.randint(low, n_classes, (n,), generator=g)
    t[list(ignored)] = -100
    return t


def weights(n_classes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + 2000)
    return (torch.rand(n_classes, generator=g, dtype=torch.float64) + 0.5).to(dtype)


@dataclasses.dataclass
class Case:
    logits: torch.Tensor  # all the classes, last
    target: torch.Tensor
    widths: tuple = (7, 13)
    starts: Optional[tuple] = None  # each rank's vocab_start; None: rank order, vocab_start not passed
    weight: Optional[torch.Tensor] = None
    kw: dict = dataclasses.field(default_factory=dict)
    grad_output: str = "ones"  # "ones", "random" (a random scalar, or one value per row for reduction="none"), "none" (no grad)
    torch_ops: bool = False  # the CUDA path's torch-op passes
    compiled: bool = False  # under torch.compile(fullgraph=True)
    bad_weight_rank: Optional[int] = None  # this rank passes a weight of the wrong length
    opcheck: bool = False

    def start(self, rank):
        return self.starts[rank] if self.starts and self.starts[rank] is not None else sum(self.widths[:rank])

    def shard(self, t, rank):
        return t[..., self.start(rank) : self.start(rank) + self.widths[rank]]

    def grad_out(self, loss_shape):
        if self.grad_output == "random":
            g = torch.Generator().manual_seed(7)
            return (torch.rand(loss_shape, generator=g, dtype=torch.float64) + 0.5).to(self.logits.dtype)
        return torch.ones(loss_shape, dtype=self.logits.dtype)


@dataclasses.dataclass
class LinearCase:
    """Hidden states (the same on every rank) and the output layer ``(C, H)``, whose rows the ranks split."""

    hidden: torch.Tensor
    layer: torch.Tensor
    target: torch.Tensor
    widths: tuple = (7, 13)
    starts: Optional[tuple] = None
    bias: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    kw: dict = dataclasses.field(default_factory=dict)
    grad_output: str = "ones"
    torch_ops: bool = False
    chunk_rows: Optional[int] = None
    bad_layer_rank: Optional[int] = None
    compiled: bool = False
    opcheck: bool = False

    start = Case.start
    grad_out = Case.grad_out

    @property
    def logits(self):  # the dtype and the reference's logits
        x = self.hidden @ self.layer.T
        return x + self.bias if self.bias is not None else x

    def rows(self, t, rank):
        return t[self.start(rank) : self.start(rank) + self.widths[rank]]


def _linear_cases() -> dict:
    found = {}
    t16 = targets(16, 20, ignored=(3, 11))
    for dtype, tag in ((torch.float32, "f32"), (torch.float64, "f64")):
        h = logits(16, 8, dtype=dtype, seed=11, scale=1.0)
        layer = logits(20, 8, dtype=dtype, seed=12, scale=0.7)
        b = logits(20, dtype=dtype, seed=13, scale=0.5)
        w = weights(20, dtype)
        found.update({
            f"linear {tag} mean, chunks of 6 rows": LinearCase(h, layer, t16, chunk_rows=6),
            f"linear {tag} bias, weights, smoothing, sum": LinearCase(h, layer, t16, bias=b, weight=w, kw=dict(reduction="sum", label_smoothing=0.1), chunk_rows=5),
            f"linear {tag} none, per-row grad_output, bias, weights, smoothing": LinearCase(
                h, layer, t16, bias=b, weight=w, kw=dict(reduction="none", label_smoothing=0.1), grad_output="random", chunk_rows=5
            ),
            f"linear {tag} mean, grad_output 0.7, one chunk": LinearCase(h, layer, t16, weight=w, kw=dict(label_smoothing=0.2), grad_output="random"),
        })
    h = logits(16, 8, seed=11, scale=1.0)
    layer = logits(20, 8, seed=12, scale=0.7)
    found.update({
        "linear vocab_start reversed, none": LinearCase(h, layer, t16, starts=(13, 0), kw=dict(reduction="none"), grad_output="random", chunk_rows=7),
        "linear torch ops, smoothing, none": LinearCase(h, layer, t16, kw=dict(reduction="none", label_smoothing=0.1), grad_output="random", torch_ops=True, chunk_rows=4),
        "linear torch ops, weights, mean": LinearCase(h, layer, t16, weight=weights(20), torch_ops=True, chunk_rows=4),
        "linear rank 0 holds none of the targets": LinearCase(h, layer, targets(16, 20, seed=3, low=7), chunk_rows=3),
        "linear all ignored, mean (NaN)": LinearCase(h, layer, torch.full((16,), -100), chunk_rows=6),
        "linear zero kept weight, mean (NaN gradient)": LinearCase(
            h, layer, t16.clamp(max=0), weight=weights(20).index_fill(0, torch.tensor([0]), 0.0), chunk_rows=6
        ),
        "linear (B, T, H) hidden, sum": LinearCase(logits(2, 8, 8, seed=14, scale=1.0), layer, t16.view(2, 8), kw=dict(reduction="sum"), chunk_rows=5),
        "linear no grad: loss only": LinearCase(h, layer, t16, kw=dict(label_smoothing=0.1), grad_output="none", chunk_rows=5),
        "linear torch.compile fullgraph, none, bias, weights": LinearCase(
            h, layer, t16, bias=logits(20, seed=13, scale=0.5), weight=weights(20), kw=dict(reduction="none"),
            grad_output="random", chunk_rows=6, compiled=True,
        ),
        "linear opcheck, fused": LinearCase(
            h.double(), layer.double(), t16, bias=logits(20, dtype=torch.float64, seed=13), kw=dict(label_smoothing=0.1), chunk_rows=6, opcheck=True
        ),
        "linear target out of range": LinearCase(h, layer, t16.index_fill(0, torch.tensor([9]), 20), chunk_rows=5),
        "linear rank 1 passes a layer of the wrong hidden size": LinearCase(h, layer, t16, bad_layer_rank=1),
    })
    return found


def _bad_rows(dtype=torch.float32):
    """Rows torch makes NaN or inf, placed across the two slices (classes 0-6 on rank 0, 7-19 on rank 1)."""
    x = logits(9, 20, dtype=dtype, seed=5)
    x[0, 2] = NAN  # NaN on rank 0 only
    x[1, 15] = INF  # +inf on rank 1 only
    x[2, :] = -INF  # only -inf, both ranks
    x[3, :7] = -INF  # rank 0's slice only -inf, rank 1's finite
    x[4, 10] = -INF  # the target's logit is -inf: loss inf
    x[5, 3] = NAN  # as row 0, ignored
    x[6, :] = -INF  # as row 2, ignored
    x[7, 7:] = -INF  # rank 1's slice only -inf
    x[8, 8] = NAN
    x[8, :7] = -INF  # rank 0 only -inf, rank 1 holds a NaN
    return x


def cases() -> dict:
    t16 = targets(16, 20, ignored=(3, 11))
    t_bad = torch.tensor([1, 2, 3, 4, 10, -100, -100, 12, 5])
    found = {}
    for dtype, tag in ((torch.float32, "f32"), (torch.float64, "f64")):
        x = logits(16, 20, dtype=dtype, seed=1)
        w = weights(20, dtype)
        found.update({
            f"{tag} uneven 7+13, mean": Case(x, t16),
            f"{tag} weights, sum": Case(x, t16, weight=w, kw=dict(reduction="sum")),
            f"{tag} smoothing, mean, grad_output 0.7": Case(x, t16, kw=dict(label_smoothing=0.1), grad_output="random"),
            f"{tag} weights and smoothing, mean": Case(x, t16, weight=w, kw=dict(label_smoothing=0.25)),
            f"{tag} none, per-row grad_output, weights, smoothing": Case(
                x, t16, weight=w, kw=dict(reduction="none", label_smoothing=0.1), grad_output="random"
            ),
            f"{tag} rank 0 holds none of the targets": Case(x, targets(16, 20, seed=3, low=7), weight=w, kw=dict(label_smoothing=0.1)),
            f"{tag} rank 1 holds none of the targets": Case(x, targets(16, 7, seed=4), kw=dict(reduction="sum")),
            f"{tag} vocab_start reversed (rank 0 holds 13-19)": Case(
                x, t16, widths=(7, 13), starts=(13, 0), weight=w, kw=dict(label_smoothing=0.1, reduction="none"), grad_output="random"
            ),
            f"{tag} rank 0 holds no classes": Case(x, t16, widths=(0, 20), weight=w, kw=dict(label_smoothing=0.1)),
            f"{tag} ignore_index 5 (a real class)": Case(x, t16.clamp(min=0), kw=dict(ignore_index=5, reduction="sum")),
            f"{tag} non-finite rows, none": Case(_bad_rows(dtype), t_bad, kw=dict(reduction="none")),
            f"{tag} non-finite rows, weights, smoothing, sum": Case(_bad_rows(dtype), t_bad, weight=w, kw=dict(reduction="sum", label_smoothing=0.1)),
            f"{tag} large logits (1e4), smoothing": Case(logits(16, 20, dtype=dtype, seed=2, shift=1e4), t16, kw=dict(label_smoothing=0.1)),
            f"{tag} torch ops, weights, smoothing, none": Case(
                x, t16, weight=w, kw=dict(reduction="none", label_smoothing=0.1), grad_output="random", torch_ops=True
            ),
            f"{tag} torch ops, non-finite rows, smoothing, mean": Case(_bad_rows(dtype), t_bad, kw=dict(label_smoothing=0.1), torch_ops=True),
            f"{tag} torch ops, rank 0 holds no classes": Case(x, t16, widths=(0, 20), kw=dict(reduction="sum"), torch_ops=True),
        })
    x = logits(16, 20, seed=1)
    w = weights(20)
    found.update({
        "all ignored, mean (NaN)": Case(x, torch.full((16,), -100), kw=dict(label_smoothing=0.1)),
        "all ignored, sum": Case(x, torch.full((16,), -100), kw=dict(reduction="sum")),
        "zero kept weight, mean (NaN gradient)": Case(x, torch.zeros(16, dtype=torch.long), weight=w.index_fill(0, torch.tensor([0]), 0.0)),
        "empty batch, mean": Case(logits(0, 20), torch.zeros(0, dtype=torch.long)),
        "empty batch, none": Case(logits(0, 20), torch.zeros(0, dtype=torch.long), kw=dict(reduction="none")),
        "(B, T, V_r) logits, none": Case(logits(3, 5, 20, seed=6), targets(15, 20, ignored=(4,)).view(3, 5), kw=dict(reduction="none"), grad_output="random"),
        "uint8 targets": Case(x, targets(16, 20).to(torch.uint8), kw=dict(reduction="sum")),
        "bfloat16 logits, weights": Case(x.bfloat16(), t16, weight=w.bfloat16(), kw=dict(label_smoothing=0.1)),
        "no grad: loss only": Case(x, t16, weight=w, kw=dict(label_smoothing=0.1), grad_output="none"),
        "long rows (2x 3000 classes, several blocks)": Case(logits(6, 6000, seed=9), targets(6, 6000, ignored=(2,)), widths=(2500, 3500), kw=dict(label_smoothing=0.1)),
        "torch.compile fullgraph": Case(
            x, t16, weight=w, kw=dict(reduction="none", label_smoothing=0.1), compiled=True, grad_output="random"
        ),
        "opcheck": Case(x.double(), t16, weight=w.double(), kw=dict(label_smoothing=0.1), opcheck=True),
        # errors, raised on both ranks
        "target out of range": Case(x, t16.index_fill(0, torch.tensor([5]), 20)),
        "negative target": Case(x, t16.index_fill(0, torch.tensor([2]), -3)),
        "slices with a gap": Case(x, t16, widths=(7, 12), starts=(0, 8)),
        "overlapping slices": Case(x, t16, starts=(0, 6)),
        "vocab_start on one rank only": Case(x, t16, starts=(0, None)),
        "rank 1 passes a weight of the wrong length": Case(x, t16, weight=w, bad_weight_rank=1),
        "reduction avg": Case(x, t16, kw=dict(reduction="avg")),
    })
    found.update(_linear_cases())
    return found


def run_linear_case(case: LinearCase, rank: int):
    """``(loss, (grad of hidden, of the rank's rows of the layer, of its bias), most rows of logits made at once)``."""
    import fastsoftmax
    from fastsoftmax.distributed import linear, rows

    rows.TORCH_OPS = case.torch_ops
    made = []
    real_logits = linear._logits

    def logits_spy(h, lw, b):
        made.append(h.shape[0])
        return real_logits(h, lw, b)

    linear._logits = logits_spy
    try:
        wants = case.grad_output != "none"
        h = case.hidden.clone().requires_grad_(wants)
        lw = case.rows(case.layer, rank).clone().requires_grad_(wants)
        if case.bad_layer_rank == rank:
            lw = lw[:, :-1]
        b = None if case.bias is None else case.rows(case.bias, rank).clone().requires_grad_(wants)
        w = None if case.weight is None else case.rows(case.weight, rank)
        kw = dict(case.kw, weight=w, bias=b, chunk_rows=case.chunk_rows)
        if case.starts is not None:
            kw["vocab_start"] = case.starts[rank]
        if case.opcheck:
            args = (h, lw, b, case.target, w, rows.group_name(None), None, -100, "mean", kw["label_smoothing"], case.chunk_rows, True)
            torch.library.opcheck(linear.linear_op, args)
            return torch.zeros(()), None, 0

        def loss_of(h, lw, b):
            return fastsoftmax.vocab_parallel_linear_cross_entropy(h, lw, case.target, **dict(kw, bias=b))

        fn = torch.compile(loss_of, fullgraph=True, backend="aot_eager") if case.compiled else loss_of
        loss = fn(h, lw, b)
        if not wants:
            return loss.detach(), None, max(made)
        inputs = [h, lw] + ([b] if b is not None else [])
        grads = torch.autograd.grad(loss, inputs, case.grad_out(loss.shape))
        return loss.detach(), grads, max(made)
    finally:
        linear._logits = real_logits


def run_case(case: Case, rank: int):
    """``(loss, gradient slice)`` of ``case`` on this rank (the gradient None without one)."""
    if isinstance(case, LinearCase):
        return run_linear_case(case, rank)
    import fastsoftmax
    from fastsoftmax.distributed import cross_entropy, rows

    rows.TORCH_OPS = case.torch_ops
    x = case.shard(case.logits, rank).clone().requires_grad_(case.grad_output != "none")
    w = None if case.weight is None else case.shard(case.weight, rank)
    if case.bad_weight_rank == rank:
        w = w[:-1]
    kw = dict(case.kw, weight=w)
    if case.starts is not None:
        kw["vocab_start"] = case.starts[rank]
    if case.opcheck:
        kw.pop("weight")
        args = (x, case.target, w, rows.group_name(None), None, -100, "mean", kw["label_smoothing"], True)
        torch.library.opcheck(cross_entropy.vocab_parallel_op, args)
        return torch.zeros(()), None

    def loss_of(xx):
        return fastsoftmax.vocab_parallel_cross_entropy(xx, case.target, **kw)

    fn = torch.compile(loss_of, fullgraph=True, backend="aot_eager") if case.compiled else loss_of
    loss = fn(x)
    if case.grad_output == "none":
        return loss.detach(), None
    (grad,) = torch.autograd.grad(loss, x, case.grad_out(loss.shape))
    return loss.detach(), grad


def _poison_outputs():
    """As tests/conftest.py: every output buffer starts as NaN, so an element a kernel forgets to write shows."""
    from fastsoftmax.ops import layout

    real_empty = layout._CPU.empty

    def poisoned(shape, dtype, device=None):
        out = real_empty(shape, dtype, device)
        if out.is_floating_point():
            out.fill_(NAN)
        return out

    layout._CPU.empty = staticmethod(poisoned)


def main(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    _poison_outputs()
    results = {}
    try:
        for name, case in cases().items():
            try:
                results[name] = run_case(case, rank)
            except Exception as error:  # the test process checks which, and that every rank raised
                error.__traceback__ = None
                results[name] = error
    finally:
        torch.save(results, out)
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
    except Exception:
        traceback.print_exc()
        sys.exit(1)
