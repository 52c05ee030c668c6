"""The D2L step split into its stages, torch's loss against ours, and the size of the book's kernels.

    .venv/bin/python benchmarks/book_path.py [--repeats 40] [--steps 20] [--no-asm] [--out FILE]

*Stages*: the step of ``fastsoftmax train`` (batch 256, 784 -> 10, SGD)
with ``torch.nn.functional.cross_entropy`` and with
``fastsoftmax.cross_entropy``, each stage timed apart (the forward matmul,
the loss, the backward, the SGD update), the two losses interleaved in
blocks of ``--steps`` steps in a new random order each repetition; medians
in microseconds and the ratio torch / ours per stage (above 1: ours is
faster). This is where ``benchmarks/results/cpu-xeon-2core/NOTES.md``'s
per-stage figures come from: at this size the loss costs Python and
autograd machinery more than arithmetic, and the step shows which stage
pays it.

*Kernel size*: the instructions LLVM emitted for the book's kernels
(``kernels.cpu_small``: ``cross_entropy_book``, ``softmax_forward_small``,
``softmax_backward_small``) and, for comparison, for ``cross_entropy_small``,
which runs the general middle-axis kernel on the same rows. Compiled afresh
in a temporary Numba cache (Numba does not keep the assembly of cached
code), in a subprocess, float32 rows of 256 x 10.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as TF

import fastsoftmax
from fastsoftmax.apps import bench
from fastsoftmax.apps.d2l import model

STAGES = ("forward", "loss", "backward", "sgd")

_ASM = """
import numpy as np
from fastsoftmax.kernels import cpu_small
x = np.random.default_rng(0).standard_normal((256, 10)).astype(np.float32)
t = np.arange(256) % 10
out = {}
calls = {
    "cross_entropy_book": (cpu_small.cross_entropy_book, (x, t, -100, 0.0, True, np.empty_like(x))),
    "cross_entropy_small (general kernel)": (cpu_small.cross_entropy_small, (x, t, -100, 0.0, True, np.empty(256), np.empty_like(x))),
    "softmax_forward_small": (cpu_small.softmax_forward_small, (x, np.empty_like(x), False)),
    "softmax_backward_small": (cpu_small.softmax_backward_small, (x, x, np.empty_like(x), False)),
}
for name, (kernel, args) in calls.items():
    kernel(*args)
    asm = "".join(kernel.inspect_asm().values())
    out[name] = sum(1 for line in asm.splitlines() if line.startswith("\\t") and not line.startswith("\\t."))
print(out)
"""


def kernel_sizes() -> dict:
    """Instructions per kernel, compiled in a fresh Numba cache in a subprocess."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        done = subprocess.run([sys.executable, "-c", _ASM], env=env, capture_output=True, text=True, check=True)
    return eval(done.stdout.strip().splitlines()[-1], {})  # a dict literal of str -> int printed by _ASM


def staged_steps(repeats: int, block: int, seed: int = 0) -> dict:
    """Median microseconds per stage for each loss, and the per-stage ratio torch / ours."""
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(256, 784, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)

    def make(loss_fn):
        net = model.SoftmaxRegression(784, 10, torch.Generator().manual_seed(seed))
        params = list(net.parameters())

        def step():
            t0 = time.perf_counter_ns()
            logits = net(X)
            t1 = time.perf_counter_ns()
            loss = loss_fn(logits, y)
            t2 = time.perf_counter_ns()
            loss.backward()
            t3 = time.perf_counter_ns()
            model._sgd(params, 0.1)
            t4 = time.perf_counter_ns()
            return t1 - t0, t2 - t1, t3 - t2, t4 - t3

        return step

    steps = {"torch": make(TF.cross_entropy), "fastsoftmax": make(fastsoftmax.cross_entropy)}
    for step in steps.values():
        for _ in range(100):
            step()  # Numba's kernels load, torch's first-call paths warm up
    times = {p: [] for p in steps}
    order = random.Random(seed)
    for _ in range(repeats):
        for provider in order.sample(list(steps), len(steps)):
            times[provider] += [steps[provider]() for _ in range(block)]
    medians = {}
    for provider, rows in times.items():
        stages = list(zip(*rows))
        medians[provider] = {s: statistics.median(v) / 1e3 for s, v in zip(STAGES, stages)}
        medians[provider]["step"] = statistics.median(sum(r) for r in rows) / 1e3
    ratio = {s: medians["torch"][s] / medians["fastsoftmax"][s] for s in (*STAGES, "step")}
    return {"median_us": medians, "torch_over_ours": ratio}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--no-asm", action="store_true", help="skip the kernel sizes (they compile afresh: about a minute)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    result = staged_steps(args.repeats, args.steps)
    print(f"load average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; torch threads: {torch.get_num_threads()}")
    print(f"{'':12s}" + "".join(f"{s:>10s}" for s in (*STAGES, "step")))
    for provider, stages in result["median_us"].items():
        print(f"{provider:12s}" + "".join(f"{stages[s]:10.1f}" for s in (*STAGES, "step")))
    print(f"{'torch/ours':12s}" + "".join(f"{result['torch_over_ours'][s]:9.2f}x" for s in (*STAGES, "step")))
    if not args.no_asm:
        result["instructions"] = kernel_sizes()
        for name, count in result["instructions"].items():
            print(f"instructions of {name}: {count}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": bench.machine(), "load_average": load, **vars(args), **result}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
