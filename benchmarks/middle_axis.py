"""Softmax, and cross-entropy, over a dimension that is not last (dim 1 of NCHW, say): torch against fastsoftmax.

    .venv/bin/python benchmarks/middle_axis.py [--repeats 15] [--out FILE]

These shapes run the middle-axis kernels (``kernels/cpu_middle.py``), which reduce
the dimension in place instead of moving it last and back. Providers are
interleaved within each repetition (``fastsoftmax.bench.time_case``), with a
plain copy of the input as the bandwidth yardstick; each figure is a ratio of
medians from one run. Forward+backward is ``y = f(x); y.backward(dy)``;
for cross-entropy, ``f(x, target).backward()`` with class-index targets of
shape (N, d1, ...), every 7th ignored, and with class probabilities of the
input's shape.
"""

import argparse
import json
import statistics

import torch
from fastsoftmax.kernels import config

import fastsoftmax
from fastsoftmax.apps import bench

SHAPES = [
    ((32, 21, 128, 128), 1),  # semantic segmentation: 21 classes per pixel, NCHW
    ((64, 1000, 196), 1),  # 1000 classes over 14x14 positions
    ((1000, 4096), 0),  # the first dim of a matrix
    ((8, 64, 64, 256), 2),  # attention-like scores, softmax over the query dim
]

CE_SHAPES = [(16, 21, 128, 128), (8, 150, 64, 64), (4, 1000, 14, 14)]


def _ce_calls(shape, kind: str) -> dict:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).requires_grad_()
    if kind == "index":
        target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
        target.view(-1)[::7] = -100
    else:
        target = torch.softmax(torch.randn(shape, generator=g), 1)
    calls = {}
    for provider, f in (("torch", torch.nn.functional.cross_entropy), ("fastsoftmax", fastsoftmax.cross_entropy)):

        def fwd_bwd(f=f):
            f(x, target).backward()
            x.grad = None

        calls[provider] = fwd_bwd

    def moved_last():
        """Ours with the middle-axis kernels switched off: C moved last for the row kernels, as before them."""
        saved = config.CPU_MIDDLE_MIN_INNER
        config.CPU_MIDDLE_MIN_INNER = 1 << 62
        try:
            calls["fastsoftmax"]()
        finally:
            config.CPU_MIDDLE_MIN_INNER = saved

    calls["fastsoftmax, C moved last"] = moved_last
    return calls


def _calls(shape, dim, op: str) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3
    dy = torch.randn(shape, generator=g)
    calls = {}
    for provider, f in (("torch", getattr(torch, op)), ("fastsoftmax", getattr(fastsoftmax, op))):
        calls[f"{provider} fwd"] = lambda f=f: f(x, dim)
        xg = x.clone().requires_grad_()

        def fwd_bwd(f=f, xg=xg):
            f(xg, dim).backward(dy)
            xg.grad = None

        calls[f"{provider} fwd+bwd"] = fwd_bwd
    n_rows, n_cols = x.shape[0], x.numel() // x.shape[0]
    calls["copy"] = bench.copy_call(n_rows, n_cols, torch.float32, "cpu")
    return calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    rows = []
    for shape, dim in SHAPES:
        for op in ("softmax", "log_softmax"):
            case = bench.Case("softmax_fwd", 0, 0, torch.float32, "cpu", calls=_calls(shape, dim, op))
            med = {p: statistics.median(t) for p, t in bench.time_case(case, args.repeats).items()}
            row = {"op": op, "shape": list(shape), "dim": dim, "median_ms": {p: s * 1e3 for p, s in med.items()}}
            for kind in ("fwd", "fwd+bwd"):
                row[f"speedup_over_torch {kind}"] = med[f"torch {kind}"] / med[f"fastsoftmax {kind}"]
            row["fraction_of_copy_speed fwd"] = med["copy"] / med["fastsoftmax fwd"]
            rows.append(row)
            print(
                f"{op} {tuple(shape)} dim={dim}: fwd torch {med['torch fwd'] * 1e3:.2f} ms, ours {med['fastsoftmax fwd'] * 1e3:.2f} ms "
                f"({row['speedup_over_torch fwd']:.2f}x, {row['fraction_of_copy_speed fwd']:.2f} of copy); "
                f"fwd+bwd torch {med['torch fwd+bwd'] * 1e3:.2f} ms, ours {med['fastsoftmax fwd+bwd'] * 1e3:.2f} ms "
                f"({row['speedup_over_torch fwd+bwd']:.2f}x)",
                flush=True,
            )
    for kind in ("index", "prob"):
        for shape in CE_SHAPES:
            case = bench.Case("cross_entropy_fwd_bwd", 0, 0, torch.float32, "cpu", calls=_ce_calls(shape, kind))
            med = {p: statistics.median(t) for p, t in bench.time_case(case, args.repeats).items()}
            row = {"op": "cross_entropy", "target": kind, "shape": list(shape), "dim": 1}
            row["median_ms"] = {p: s * 1e3 for p, s in med.items()}
            row["speedup_over_torch fwd+bwd"] = med["torch"] / med["fastsoftmax"]
            row["speedup_over_torch fwd+bwd, C moved last"] = med["torch"] / med["fastsoftmax, C moved last"]
            rows.append(row)
            print(
                f"cross_entropy ({kind} targets) {tuple(shape)} dim=1: fwd+bwd torch {med['torch'] * 1e3:.2f} ms, "
                f"ours {med['fastsoftmax'] * 1e3:.2f} ms ({row['speedup_over_torch fwd+bwd']:.2f}x); "
                f"ours with C moved last {med['fastsoftmax, C moved last'] * 1e3:.2f} ms "
                f"({row['speedup_over_torch fwd+bwd, C moved last']:.2f}x)",
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": bench.machine(), "repeats": args.repeats, "figures": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
