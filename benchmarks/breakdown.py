"""Where the time goes in the two figures that miss their goals: softmax at 8192x32000 and cross-entropy at 256x10.

    .venv/bin/python benchmarks/breakdown.py [--repeats 15] [--out FILE]

1. Softmax forward, float32, 32000 columns. The row kernel's passes,
   rebuilt from its own pieces (``kernels.cpu_common``: ``row_max_of``, ``exp_sum``,
   ``stream_row``), timed over 100 rows that stay in the last-level cache:
   microseconds per row for max + exp (the exps stored in a scratch row) on
   one thread alone and on every thread at once (each over the same rows,
   into its own scratch row: do the threads share arithmetic units?), and
   for max + exp + the non-temporal write of the output on one thread.
   Then the whole op at 8192x32000 on one thread and on all, the same
   work with no output written (its arithmetic and its reads), and a copy
   of the array on all threads with the kernels' non-temporal stores (its
   memory traffic), beside ``np.copyto`` of the same array, interleaved.
2. Cross-entropy forward+backward at 256x10, interleaved: torch, ours, a
   trivial ``torch.autograd.Function`` with our signature (its forward
   returns a constant loss and saves a ready gradient, its backward returns
   that gradient: the floor of any Python autograd op), and our kernel
   alone (serial twin, outputs allocated once).

Medians of ``--repeats`` repetitions, one run.
"""

import argparse
import json
import statistics

import numba
import numpy as np
import torch
from fastsoftmax.kernels import cpu_common, cpu_rows, jit
from fastsoftmax.kernels.intrinsics import store_fence

import fastsoftmax
from fastsoftmax.apps import bench
from fastsoftmax.backends import cpu as cpu_backend

_JIT = dict(jit.OPTIONS, cache=False)


@numba.njit(parallel=True, **_JIT)
def _max_exp(x, scratch, reps, threads):
    """Max and exp passes of every row, ``reps`` times, on ``threads`` threads at once (each with its scratch row)."""
    total = np.zeros(threads)
    for w in numba.prange(threads):
        part = 0.0  # summed here, not in total[w]: the threads' totals share a cache line
        for _ in range(reps):
            for i in range(x.shape[0]):
                m = cpu_common.row_max_of(x[i])
                part += cpu_common.exp_sum(x[i], m, scratch[w], cpu_common.next_row(x, i))
        total[w] = part
    return total


@numba.njit(**_JIT)
def _max_exp_stream(x, y, scratch, reps):
    """As :func:`_max_exp`, then each row scaled and streamed to ``y``: the row kernel's three passes."""
    for _ in range(reps):
        for i in range(x.shape[0]):
            m = cpu_common.row_max_of(x[i])
            inv = jit.cast_like(1.0 / cpu_common.exp_sum(x[i], m, scratch, cpu_common.next_row(x, i)), x)
            cpu_common.stream_row(y[i], scratch, inv)
    store_fence()


@numba.njit(parallel=True, **_JIT)
def _without_output(x, scratch, queue):
    """The streaming softmax kernel with its output not written: each worker's max and exp passes over the rows it claims."""
    total = np.zeros(queue[2])
    for w in numba.prange(queue[2]):
        part = 0.0
        lo, hi = cpu_common.claim(queue, x.shape[0])
        while lo < hi:
            for i in range(lo, hi):
                m = cpu_common.row_max_of(x[i])
                part += cpu_common.exp_sum(x[i], m, scratch[w], cpu_common.next_row(x, i))
            lo, hi = cpu_common.claim(queue, x.shape[0])
        total[w] = part
    return total


@numba.njit(parallel=True, **_JIT)
def _stream_copy(x, y, queue):
    """``y = x`` with the kernels' row claims and non-temporal stores: the memory traffic of the op, nothing else."""
    for w in numba.prange(queue[2]):
        lo, hi = cpu_common.claim(queue, x.shape[0])
        while lo < hi:
            for i in range(lo, hi):
                cpu_common.stream_row(y[i], x[i], jit.cast_like(1.0, x))
            lo, hi = cpu_common.claim(queue, x.shape[0])
        store_fence()


def _one_worker_per_thread(f):
    """``f`` as a call that runs with a parallel chunk size of 1: each ``prange`` iteration (a worker) on its own thread."""

    def call():
        previous = numba.set_parallel_chunksize(1)
        try:
            f()
        finally:
            numba.set_parallel_chunksize(previous)

    return call


def _interleaved(calls: dict, repeats: int) -> dict:
    """Median seconds per call, the calls interleaved within each repetition (``fastsoftmax.bench.time_case``)."""
    case = bench.Case("softmax_fwd", 0, 0, torch.float32, "cpu", calls=calls)
    return {k: statistics.median(v) for k, v in bench.time_case(case, repeats).items()}


def softmax_passes(repeats: int) -> dict:
    n_cols, cached_rows, reps = 32000, 100, 10
    threads = numba.get_num_threads()
    g = torch.Generator().manual_seed(0)
    xs = (torch.randn(cached_rows, n_cols, generator=g) * 3).numpy()
    ys = np.empty_like(xs)
    scratch = np.empty((threads, n_cols), np.float32)

    med = _interleaved(
        {
            "max+exp, 1 thread": _one_worker_per_thread(lambda: _max_exp(xs, scratch, reps, 1)),
            f"max+exp, {threads} threads at once": _one_worker_per_thread(lambda: _max_exp(xs, scratch, reps, threads)),
            "max+exp+write, 1 thread": lambda: _max_exp_stream(xs, ys, scratch[0], reps),
        },
        repeats,
    )
    per_row_us = {k: v / (reps * cached_rows) * 1e6 for k, v in med.items()}

    x = torch.randn(8192, n_cols, generator=g) * 3
    copy = bench.copy_call(8192, n_cols, torch.float32, "cpu")

    def on(n):
        def call():
            numba.set_num_threads(n)
            try:
                fastsoftmax.softmax(x, -1)
            finally:
                numba.set_num_threads(threads)

        return call

    xn, yn = x.numpy(), np.empty((8192, n_cols), np.float32)
    wide = np.empty((threads, n_cols), np.float32)

    def queue():  # a fresh work queue, as the op makes for itself
        return cpu_backend._queue(8192, n_cols, threads)

    whole = _interleaved(
        {
            "1 thread": on(1),
            f"{threads} threads": on(threads),
            f"{threads} threads, max+exp only (no output)": _one_worker_per_thread(lambda: _without_output(xn, wide, queue())),
            f"{threads}-thread non-temporal copy": _one_worker_per_thread(lambda: _stream_copy(xn, yn, queue())),
            "np.copyto": copy,
        },
        repeats,
    )
    return {"per_row_us_in_cache": per_row_us, "whole_op_ms": {k: v * 1e3 for k, v in whole.items()}}


class _Floor(torch.autograd.Function):
    """The cheapest Python autograd op with cross-entropy's signature."""

    @staticmethod
    def forward(ctx, input, target, grad):
        ctx.save_for_backward(grad)
        return input.new_ones(())

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad, None, None


def cross_entropy_small(repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=g).requires_grad_()
    t = torch.randint(0, 10, (256,), generator=g)
    ready = torch.randn(256, 10, generator=g)
    xn, tn = x.detach().numpy(), t.numpy()
    loss, grad = np.empty(256), np.empty((256, 10), np.float32)
    no_weight, no_scratch = np.empty(0, np.float32), np.empty((1, 0), np.float32)

    def fwd_bwd(f, *extra):
        def call():
            f(x, t, *extra).backward()
            x.grad = None

        return call

    def kernel():
        queue = np.array([0, 256, 1], np.int64)
        cpu_rows.cross_entropy_index[False](xn, tn, no_weight, -100, 0.0, 1 / 256, loss, grad, no_scratch, queue)

    calls = {
        "torch": fwd_bwd(torch.nn.functional.cross_entropy),
        "fastsoftmax": fwd_bwd(fastsoftmax.cross_entropy),
        "trivial autograd.Function": fwd_bwd(_Floor.apply, ready),
        "our kernel alone": kernel,
    }
    # microsecond calls: each repetition times a batch of 200
    batched = {k: (lambda f=f: [f() for _ in range(200)]) for k, f in calls.items()}
    med = _interleaved(batched, repeats)
    return {"fwd_bwd_us": {k: v / 200 * 1e6 for k, v in med.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    soft = softmax_passes(args.repeats)
    per_row = soft["per_row_us_in_cache"]
    print(
        "softmax, 32000 columns, rows in cache, per row and thread: " + ", ".join(f"{k} {v:.1f} us" for k, v in per_row.items()),
        flush=True,
    )
    print("softmax 8192x32000: " + ", ".join(f"{k} {v:.1f} ms" for k, v in soft["whole_op_ms"].items()), flush=True)
    small = cross_entropy_small(args.repeats)
    print(
        "cross-entropy fwd+bwd 256x10: " + ", ".join(f"{k} {v:.1f} us" for k, v in small["fwd_bwd_us"].items()),
        flush=True,
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": bench.machine(), "repeats": args.repeats, "softmax": soft, "cross_entropy": small}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
