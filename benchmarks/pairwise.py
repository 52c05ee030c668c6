"""Ours against torch alone, call by call, at one shape: the same ops as ``fastsoftmax bench`` without its other providers.

    .venv/bin/python benchmarks/pairwise.py [--rows 4096] [--cols 1000] [--calls 150] [--out FILE]

``fastsoftmax bench`` interleaves five providers (the textbook's, torch's,
torch.compile's, ours and a copy) in a random order: each call finds the
caches as the one before left them. Here ours and torch's alternate with
nothing else between them, so the two settings can be told apart: what an
op costs after another op of the same size, and what it costs after
whatever the bench ran before it. Medians, and torch / ours (above 1: we
are faster).
"""

import argparse
import json
import os
import statistics
import time

import torch

from fastsoftmax.apps import bench


def run(n_rows: int, n_cols: int, calls: int) -> list:
    rows = []
    for op in bench.OPS:
        case = bench.make_case(op, n_rows, n_cols, providers=("fastsoftmax", "torch"))  # the bench's own calls
        ours, theirs = case.calls["fastsoftmax"], case.calls["torch"]
        for _ in range(5):
            ours()
            theirs()
        times = ([], [])
        for _ in range(calls):
            for k, f in enumerate((ours, theirs)):
                start = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - start)
        ours_s, torch_s = statistics.median(times[0]), statistics.median(times[1])
        rows.append({"op": op, "shape": [n_rows, n_cols], "ours_ms": ours_s * 1e3, "torch_ms": torch_s * 1e3, "speedup": torch_s / ours_s})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=150)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; torch threads: {torch.get_num_threads()}")
    rows = run(args.rows, args.cols, args.calls)
    for r in rows:
        print(f"{r['op']:22s} {args.rows}x{args.cols}  ours {r['ours_ms']:8.3f} ms  torch {r['torch_ms']:8.3f} ms  {r['speedup']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"load_average": load, "calls": args.calls, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
