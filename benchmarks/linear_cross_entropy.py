"""linear_cross_entropy forward+backward at N=2048, H=512, V=128256, float32: time and peak memory, one process each.

    .venv/bin/python benchmarks/linear_cross_entropy.py [--repeats 3] [--shape 2048 512 128256] [--out FILE]

Providers: ``torch`` (eager ``F.cross_entropy(F.linear(x, W), t)``),
``torch.chunked`` (``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``)
and ``fastsoftmax`` (``fastsoftmax.linear_cross_entropy``). Every call runs
in a fresh Python process (:func:`bench_linear.in_subprocess`): a warm-up on
8 rows, then one timed forward+backward, whose peak is the growth of the
resident high-water mark. Repetitions alternate the providers, in a new
random order each, so that a slow minute of a shared machine falls on all
of them; a figure is a median.

``--providers fastsoftmax:32 fastsoftmax:128`` runs ours with chunks of 32
and 128 MiB of logits (the default is 64).

The goal (issue 16): beyond the gradients the call must return (input and
weight), fastsoftmax's peak growth at most 5% of torch eager's and below
the chunked path's, in at most torch eager's time.
"""

import argparse
import json
import os
import random
import statistics

from fastsoftmax.apps import bench, bench_linear


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, default=[2048, 512, 128256], metavar=("N", "H", "V"))
    parser.add_argument("--providers", nargs="+", default=list(bench_linear.PROVIDERS))
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    n, h, v = args.shape
    grads = (n + v) * h * 4
    runs = {p: [] for p in args.providers}
    loads = [os.getloadavg()]
    order = random.Random(0)
    for rep in range(args.repeats):
        for provider in order.sample(args.providers, len(args.providers)):
            result = bench_linear.in_subprocess(provider, n, h, v)
            runs[provider].append(result)
            loads.append(os.getloadavg())
            print(f"repeat {rep + 1}: {provider:<14} {result['seconds']:8.2f} s  peak +{result['peak_bytes'] / 1e6:8.1f} MB  (load {loads[-1][0]:.2f})", flush=True)
    summary = {}
    for provider, results in runs.items():
        peak = statistics.median(r["peak_bytes"] for r in results)
        summary[provider] = {
            "median_s": statistics.median(r["seconds"] for r in results),
            "median_peak_bytes": peak,
            "beyond_gradients_bytes": peak - grads,
        }
    print(f"N={n} H={h} V={v} float32, {6 * n * h * v / 1e9:.0f} GFLOP; gradients of input and weight {grads / 1e6:.1f} MB")
    for provider, s in summary.items():
        print(f"  {provider:<14} {s['median_s']:8.2f} s  peak +{s['median_peak_bytes'] / 1e6:8.1f} MB, beyond the gradients {s['beyond_gradients_bytes'] / 1e6:8.1f} MB")
    if {"torch", "fastsoftmax"} <= set(summary):
        ours, eager = summary["fastsoftmax"], summary["torch"]
        print(f"fastsoftmax: {eager['median_s'] / ours['median_s']:.2f}x torch eager's speed, "
              f"{100 * ours['beyond_gradients_bytes'] / eager['beyond_gradients_bytes']:.1f}% of its memory beyond the gradients", end="")
        if "torch.chunked" in summary:
            chunked = summary["torch.chunked"]
            print(f"; {chunked['median_s'] / ours['median_s']:.2f}x the chunked path's speed, "
                  f"{ours['beyond_gradients_bytes'] / chunked['beyond_gradients_bytes']:.2f} of its memory beyond the gradients", end="")
        print()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": bench.machine(), "shape": args.shape, "gradient_bytes": grads, "load_averages": loads, "runs": runs, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
