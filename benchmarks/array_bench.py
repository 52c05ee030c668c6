"""fastsoftmax.array beside scipy.special, the D2L naive version and a plain copy, on NumPy (or CuPy) arrays.

    .venv/bin/python benchmarks/array_bench.py [--shapes 4096x1000 8192x32000] [--repeats 3] [--out DIR]
    .venv/bin/python benchmarks/array_bench.py --device cuda   # CuPy arrays: cupyx.scipy.special, naive CuPy

Per op and shape, every provider runs once per repetition, in a new random
order each time; figures are medians. The providers:

* ``fastsoftmax``: ``fastsoftmax.array`` writing into a preallocated
  ``out=``; ``fastsoftmax_alloc``: the same returning a new array (from
  the pool of large outputs on the CPU);
* ``scipy``: ``scipy.special.softmax`` / ``log_softmax`` / ``logsumexp``
  (``cupyx.scipy.special`` on CUDA);
* ``naive``: *Dive into Deep Learning*'s version in NumPy (CuPy):
  ``exp(x) / exp(x).sum(1)``, its log, and ``log(exp(x).sum(1))``;
* ``copy``: ``copyto`` into preallocated memory, the bound of an op that
  reads the array and writes one as large (softmax, log-softmax);
* ``read``: one parallel pass that reads every element (a row sum, Numba,
  both cores), the bound of an op that only reads it (logsumexp);
  ``np_sum``: NumPy's (single-threaded) row sum, for reference.

"of copy" is the time of ``copy`` over ours (the same bytes move: read
``x``, write ``y``), "of read" the time of ``read`` over ours (logsumexp
reads ``x`` once and writes one value per row). The machine's load
(``os.getloadavg``) is recorded before and after each op.
"""

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import fastsoftmax.array as fa

OPS = ("softmax", "log_softmax", "logsumexp")


def _naive(xp):
    def softmax(x):
        e = xp.exp(x)
        return e / e.sum(1, keepdims=True)

    return {
        "softmax": softmax,
        "log_softmax": lambda x: xp.log(softmax(x)),
        "logsumexp": lambda x: xp.log(xp.exp(x).sum(1)),
    }


def _read_pass():
    """A Numba row sum over both cores: every element read once, no stores but one per row."""
    from numba import njit, prange

    @njit(parallel=True, fastmath=True)
    def row_sums(x, out):
        for i in prange(x.shape[0]):
            s = np.float32(0.0)
            for j in range(x.shape[1]):
                s += x[i, j]
            out[i] = s

    return row_sums


def providers(op: str, x, device: str) -> dict:
    """name -> a call that runs the provider once on ``x`` (rows, reduced along axis 1)."""
    if device == "cuda":
        import cupy as xp
        import cupyx.scipy.special as special
    else:
        import scipy.special as special

        xp = np
    calls = {}
    if op == "logsumexp":
        out = xp.empty(x.shape[0], x.dtype)
        calls["fastsoftmax"] = lambda: fa.logsumexp(x, axis=1, out=out)
        calls["scipy"] = lambda: special.logsumexp(x, axis=1)
        calls["naive"] = lambda: _naive(xp)["logsumexp"](x)
        sums = xp.empty(x.shape[0], x.dtype)
        if device == "cuda":
            calls["read"] = lambda: x.sum(1, out=sums)
        else:
            row_sums = _read_pass()
            calls["read"] = lambda: row_sums(x, sums)
            calls["np_sum"] = lambda: np.sum(x, axis=1, out=sums)
        return calls
    out = xp.empty_like(x)
    dst = xp.empty_like(x)
    ours = getattr(fa, op)
    calls["fastsoftmax"] = lambda: ours(x, axis=1, out=out)
    calls["fastsoftmax_alloc"] = lambda: ours(x, axis=1)
    calls["scipy"] = lambda: getattr(special, op)(x, axis=1)
    calls["naive"] = lambda: _naive(xp)[op](x)
    calls["copy"] = lambda: xp.copyto(dst, x)
    return calls


def time_op(calls: dict, repeats: int, sync, seed: int) -> dict:
    """Seconds of each call per repetition, the calls in a new random order each repetition (after one warm-up)."""
    order = list(calls)
    for name in order:
        calls[name]()
        sync()
    times = {name: [] for name in order}
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            result = calls[name]()
            sync()
            times[name].append(time.perf_counter() - start)
            del result
    return times


def _machine(device: str) -> dict:
    import importlib.metadata

    import numba

    try:
        scipy_version = importlib.metadata.version("scipy")  # the CPU baseline; CuPy's needs no SciPy
    except importlib.metadata.PackageNotFoundError:
        scipy_version = None
    info = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy_version,
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
    }
    if device == "cuda":
        import cupy

        info["cupy"] = cupy.__version__
        info["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x1000", "8192x32000"])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for array_bench.json and array_bench.log")
    args = parser.parse_args(argv)

    if args.device == "cuda":
        import cupy as xp

        def sync():
            xp.cuda.get_current_stream().synchronize()
    else:
        xp = np

        def sync():
            pass

    run = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
           "device": args.device, "dtype": args.dtype, "repeats": args.repeats, "machine": _machine(args.device), "results": []}
    lines = [f"# {run['command']}", f"# {json.dumps(run['machine'])}"]
    print(lines[0], flush=True)
    print(lines[1], flush=True)
    for spec in args.shapes:
        n_rows, n_cols = (int(v) for v in spec.split("x"))
        x = xp.asarray((np.random.default_rng(args.seed).standard_normal((n_rows, n_cols), dtype=np.float32) * 3).astype(args.dtype))
        nbytes = x.nbytes
        for op in args.ops:
            load_before = os.getloadavg()
            times = time_op(providers(op, x, args.device), args.repeats, sync, args.seed)
            load_after = os.getloadavg()
            med = {name: statistics.median(t) for name, t in times.items()}
            ours = med["fastsoftmax"]
            moved = nbytes if op == "logsumexp" else 2 * nbytes
            bound = med["read"] if op == "logsumexp" else med["copy"]
            row = {
                "op": op,
                "shape": [n_rows, n_cols],
                "median_ms": {name: round(s * 1e3, 3) for name, s in med.items()},
                "times_ms": {name: [round(s * 1e3, 3) for s in t] for name, t in times.items()},
                "gb_per_s": round(moved / ours / 1e9, 2),
                "speedup_over_scipy": round(med["scipy"] / ours, 2),
                "speedup_over_naive": round(med["naive"] / ours, 2),
                ("fraction_of_read_speed" if op == "logsumexp" else "fraction_of_copy_speed"): round(bound / ours, 3),
                "loadavg_before": [round(v, 2) for v in load_before],
                "loadavg_after": [round(v, 2) for v in load_after],
            }
            if "fastsoftmax_alloc" in med:
                row["alloc_fraction_of_copy_speed"] = round(bound / med["fastsoftmax_alloc"], 3)
            run["results"].append(row)
            bound_name = "read" if op == "logsumexp" else "copy"
            line = (
                f"{op:12s} {n_rows}x{n_cols} ours {ours * 1e3:9.2f} ms  {row['gb_per_s']:6.2f} GB/s  "
                f"of {bound_name} {bound / ours:5.2f}  vs scipy {row['speedup_over_scipy']:6.2f}x  "
                f"vs naive {row['speedup_over_naive']:6.2f}x  | "
                + "  ".join(f"{name} {s * 1e3:.1f}" for name, s in sorted(med.items()))
                + f"  | load {load_before[0]:.2f} -> {load_after[0]:.2f}"
            )
            lines.append(line)
            print(line, flush=True)
        del x
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "array_bench.json").write_text(json.dumps(run, indent=1) + "\n")
        with open(folder / "array_bench.log", "a") as log:
            log.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
