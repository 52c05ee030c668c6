"""One training step of the D2L softmax regression (batch 256, 784 -> 10, SGD), per loss.

    .venv/bin/python benchmarks/d2l_step.py [--repeats 30] [--steps 20] [--out FILE]

Each provider is the step ``fastsoftmax train`` runs (:func:`model.make_step`:
forward, loss, backward, SGD update), on its own copy of the model. The
providers are interleaved: each repetition times a block of ``--steps``
steps of every provider, in a new random order. A figure is the ratio of
the median step times; the quartiles of the per-repetition ratios (each
taken within one repetition) are printed beside it, since a shared machine
drifts during a run.

The goal (issue 16): ``fused-linear`` at least 1.5x ``torch`` (the step with
``torch.nn.functional.cross_entropy``), ``fused`` at least 1.0x.
"""

import argparse
import json
import os
import random
import statistics
import time

import torch

from fastsoftmax.apps import bench
from fastsoftmax.apps.d2l import model

PROVIDERS = ("torch", "fused", "fused-linear")


def steps(batch: int = 256, n_inputs: int = 784, n_classes: int = 10, seed: int = 0) -> dict:
    """A zero-argument step per provider, each on its own model, all on the same batch."""
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(batch, 1, 28, 28, generator=g).reshape(batch, n_inputs)
    y = torch.randint(0, n_classes, (batch,), generator=g)
    calls = {}
    for provider in PROVIDERS:
        net = model.SoftmaxRegression(n_inputs, n_classes, torch.Generator().manual_seed(seed))
        step = model.make_step(net, provider, lr=0.1)
        calls[provider] = lambda step=step: step(X, y)
    return calls


def run(repeats: int, block: int, seed: int = 0) -> dict:
    calls = steps()
    for call in calls.values():
        for _ in range(50):
            call()  # Numba's kernels load, torch's first-call paths warm up
    times = {p: [] for p in calls}
    order = random.Random(seed)
    for _ in range(repeats):
        for provider in order.sample(list(calls), len(calls)):
            call = calls[provider]
            start = time.perf_counter()
            for _ in range(block):
                call()
            times[provider].append((time.perf_counter() - start) / block)
    med = {p: statistics.median(t) for p, t in times.items()}
    figures = {}
    for provider in ("fused", "fused-linear"):
        per_rep = [t / f for t, f in zip(times["torch"], times[provider])]
        figures[provider] = {"speedup_over_torch": med["torch"] / med[provider], "per_repetition_quartiles": statistics.quantiles(per_rep, n=4)}
    return {"median_us": {p: s * 1e6 for p, s in med.items()}, "figures": figures, "times_s": times}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    load = os.getloadavg()
    result = run(args.repeats, args.steps)
    med = result["median_us"]
    print(f"load average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; torch threads: {torch.get_num_threads()}")
    print("median step: " + ", ".join(f"{p} {med[p]:.1f} us" for p in PROVIDERS))
    for provider, fig in result["figures"].items():
        q = fig["per_repetition_quartiles"]
        print(f"{provider}: {fig['speedup_over_torch']:.2f}x torch (per-repetition quartiles {q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": bench.machine(), "load_average": load, "repeats": args.repeats, "steps": args.steps, **result}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
