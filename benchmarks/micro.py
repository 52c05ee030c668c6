"""The micro-benchmark of the core issue: the four figures it names, torch against fastsoftmax.

    .venv/bin/python benchmarks/micro.py [--repeats 15] [--out FILE]

Only torch, fastsoftmax and a plain copy (np.copyto into memory already
allocated) are interleaved, repetition by repetition; ``fastsoftmax bench``
runs the full matrix, where the naive version's large temporaries also
flush the caches between calls.

Each figure is a ratio of medians. On a shared virtual machine the memory
bandwidth drifts during a run, so the quartiles of the per-repetition
ratios (each taken within one repetition) are printed beside it.
"""

import argparse
import json
import statistics

import torch

from fastsoftmax.apps import bench

FIGURES = [
    # (op, shape, what the issue asks)
    ("cross_entropy_fwd_bwd", (4096, 1000), "at least 3x torch"),
    ("cross_entropy_fwd_bwd", (4096, 32000), "at least 6x torch"),
    ("softmax_fwd", (8192, 32000), "at least 2x torch and 0.8 of copy speed"),
]


def _span(q) -> str:
    return f"{q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    figures = []
    for op, (n_rows, n_cols), goal in FIGURES:
        case = bench.make_case(op, n_rows, n_cols, torch.float32, "cpu", providers=("torch", "fastsoftmax"))
        case.calls["copy"] = bench.copy_call(n_rows, n_cols, torch.float32, "cpu")
        times = bench.time_case(case, args.repeats)
        med = {p: statistics.median(t) for p, t in times.items()}
        per_rep = {
            "speedup_over_torch": [t / f for t, f in zip(times["torch"], times["fastsoftmax"])],
            "fraction_of_copy_speed": [c / f for c, f in zip(times["copy"], times["fastsoftmax"])],
        }
        quartiles = {k: statistics.quantiles(v, n=4) for k, v in per_rep.items()}
        figure = {
            "op": op,
            "shape": [n_rows, n_cols],
            "goal": goal,
            "median_ms": {p: s * 1e3 for p, s in med.items()},
            "speedup_over_torch": med["torch"] / med["fastsoftmax"],
            "fraction_of_copy_speed": med["copy"] / med["fastsoftmax"],
            "per_repetition_quartiles": quartiles,
        }
        figures.append(figure)
        print(
            f"{op} {n_rows}x{n_cols}: torch {med['torch'] * 1e3:.2f} ms, fastsoftmax {med['fastsoftmax'] * 1e3:.2f} ms, "
            f"copy {med['copy'] * 1e3:.2f} ms -> {figure['speedup_over_torch']:.2f}x torch, "
            f"{figure['fraction_of_copy_speed']:.2f} of copy speed ({goal}); per-repetition quartiles: "
            f"{_span(quartiles['speedup_over_torch'])}x torch, {_span(quartiles['fraction_of_copy_speed'])} of copy",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": bench.machine(), "repeats": args.repeats, "figures": figures}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
