"""The per-call cost at the book's shape (256 x 10, float32, CPU): ours against torch, warm and cold caches.

    .venv/bin/python benchmarks/per_call.py [--calls 2000] [--out FILE]

Each op is timed call by call, ours and torch's alternating, in two
settings: *hot*, the same call over and over (everything it touches stays
in the caches), and *cold*, each call after a 16 MB in-place multiply (as a
training step leaves the caches after its matmuls). ``fastsoftmax bench``
times single interleaved calls instead; between the two lies a real
training loop. Medians, and the ratio torch / ours (above 1: we are faster).
"""

import argparse
import json
import os
import time

import torch
import torch.nn.functional as TF

import fastsoftmax


def cases(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 10, generator=g) * 3
    t = torch.randint(0, 10, (256,), generator=g)
    dy = torch.randn(256, 10, generator=g)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()

    def fwd_bwd(f, xg):
        def call():
            f(xg, -1).backward(dy)
            xg.grad = None

        return call

    def ce(f, xg):
        def call():
            f(xg, t).backward()
            xg.grad = None

        return call

    return {
        "softmax_fwd": (lambda: fastsoftmax.softmax(x, -1), lambda: TF.softmax(x, -1)),
        "log_softmax_fwd": (lambda: fastsoftmax.log_softmax(x, -1), lambda: TF.log_softmax(x, -1)),
        "softmax_fwd_bwd": (fwd_bwd(fastsoftmax.softmax, xa), fwd_bwd(TF.softmax, xb)),
        "cross_entropy_fwd_bwd": (ce(fastsoftmax.cross_entropy, xa), ce(TF.cross_entropy, xb)),
    }


class _Nothing(torch.autograd.Function):
    """A Function that does no work: what ``Function.apply`` itself costs, with our cross-entropy's arguments."""

    @staticmethod
    def forward(ctx, x, t, w, ignore_index, reduction, label_smoothing):
        ctx.save_for_backward(x, t, w)
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return (None,) * 6


def time_pair(ours, theirs, calls: int, cold: bool, sweep: torch.Tensor) -> tuple:
    """Median microseconds of ``ours`` and ``theirs``, alternating call by call."""
    times = ([], [])
    for _ in range(calls):
        for k, f in enumerate((ours, theirs)):
            if cold:
                sweep.mul_(1.0)
            start = time.perf_counter_ns()
            f()
            times[k].append(time.perf_counter_ns() - start)
    return tuple(sorted(t)[len(t) // 2] / 1e3 for t in times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    sweep = torch.randn(4096, 1000)
    pairs = cases()
    for ours, theirs in pairs.values():
        for _ in range(200):
            ours(), theirs()  # Numba's kernels load, torch's first-call paths warm up
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; torch threads: {torch.get_num_threads()}")
    rows = []
    for cold in (False, True):
        for op, (ours, theirs) in pairs.items():
            a, b = time_pair(ours, theirs, args.calls if not cold else max(1, args.calls // 5), cold, sweep)
            rows.append({"op": op, "caches": "cold" if cold else "hot", "ours_us": a, "torch_us": b, "speedup": b / a})
            print(f"{op:22s} {'cold' if cold else 'hot ':4s}  ours {a:7.1f} us  torch {b:7.1f} us  {b / a:5.2f}x")
    x = torch.randn(256, 10, requires_grad=True)
    t = torch.zeros(256, dtype=torch.int64)
    apply = lambda: _Nothing.apply(x, t, None, -100, "mean", 0.0)  # noqa: E731
    hot, cold = time_pair(apply, apply, args.calls, False, sweep)[0], time_pair(apply, apply, args.calls // 5, True, sweep)[0]
    rows.append({"op": "autograd.Function.apply of a no-op", "hot_us": hot, "cold_us": cold})
    print(f"a no-op autograd.Function.apply: hot {hot:.1f} us, cold {cold:.1f} us")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "torch": torch.__version__}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
