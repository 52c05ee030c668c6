"""Benchmarks: the textbook version, PyTorch eager, ``torch.compile`` and fastsoftmax.

Every op is timed for every provider on the same inputs, the providers
interleaved within each repetition (so that a slow moment of a shared
machine falls on all of them), in a new random order each time, after a warm-up that includes Numba's and
``torch.compile``'s compilation. A row reports the median time, the
effective bandwidth ``bytes / median`` for a stated byte count, that
bandwidth as a fraction of a plain copy of the same array (timed in the same
interleaved repetitions), and the speed-up over each other provider of the
same run.

Byte counts are what any implementation must move, for ``N`` elements of
``s`` bytes: softmax or log_softmax forward ``2 N s`` (read x, write y);
softmax forward+backward ``5 N s`` (and read y, dy, write dx);
cross-entropy forward+backward ``2 N s`` (read the logits, write their
gradient).
"""

import ctypes
import gc
import json
import os
import platform
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as TF

import fastsoftmax

from . import naive
from ._extras import pyplot

PROVIDERS = ("naive", "torch", "torch.compile", "fastsoftmax")
OPS = ("softmax_fwd", "softmax_fwd_bwd", "log_softmax_fwd", "cross_entropy_fwd_bwd")
BYTES_PER_ELEMENT = {"softmax_fwd": 2, "softmax_fwd_bwd": 5, "log_softmax_fwd": 2, "cross_entropy_fwd_bwd": 2}

CPU_SHAPES = ((256, 10), (4096, 1000), (4096, 32000), (8192, 32000))
GPU_SHAPES = CPU_SHAPES + ((32768, 131072),)
QUICK_SHAPES = ((256, 10), (4096, 1000))
#: each provider's timed calls of a case add up to at least this (more repetitions for small cases)
MIN_SECONDS = 0.1


def _functions(provider: str):
    """``(softmax, log_softmax, cross_entropy)`` of a provider, all over the last dim."""
    if provider == "naive":
        return naive.softmax, naive.log_softmax, naive.cross_entropy_loss
    if provider == "fastsoftmax":
        return (
            lambda x: fastsoftmax.softmax(x, -1),
            lambda x: fastsoftmax.log_softmax(x, -1),
            fastsoftmax.cross_entropy,
        )
    eager = (lambda x: torch.softmax(x, -1), lambda x: torch.log_softmax(x, -1), TF.cross_entropy)
    if provider == "torch":
        return eager
    if provider == "torch.compile":
        return tuple(torch.compile(f, dynamic=False) for f in eager)
    raise ValueError(f"unknown provider {provider!r}: expected one of {PROVIDERS}")


@dataclass
class Case:
    """Inputs for one (op, shape, dtype, device) and a zero-argument callable per provider."""

    op: str
    n_rows: int
    n_cols: int
    dtype: torch.dtype
    device: str
    calls: dict = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return BYTES_PER_ELEMENT[self.op] * self.n_rows * self.n_cols * torch.finfo(self.dtype).bits // 8


def make_case(op: str, n_rows: int, n_cols: int, dtype=torch.float32, device="cpu", providers=PROVIDERS, seed=0) -> Case:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}: expected one of {OPS}")
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n_rows, n_cols, generator=g) * 3).to(dtype=dtype, device=device)
    dy = torch.randn(n_rows, n_cols, generator=g).to(dtype=dtype, device=device)
    target = torch.randint(0, n_cols, (n_rows,), generator=g).to(device)
    case = Case(op, n_rows, n_cols, dtype, device)
    for provider in providers:
        softmax, log_softmax, cross_entropy = _functions(provider)
        if op == "softmax_fwd":
            case.calls[provider] = lambda f=softmax: f(x)
        elif op == "log_softmax_fwd":
            case.calls[provider] = lambda f=log_softmax: f(x)
        elif op == "softmax_fwd_bwd":
            xg = x.detach().clone().requires_grad_()

            def fwd_bwd(f=softmax, xg=xg):
                f(xg).backward(dy)
                xg.grad = None

            case.calls[provider] = fwd_bwd
        else:
            xg = x.detach().clone().requires_grad_()

            def ce(f=cross_entropy, xg=xg):
                f(xg, target).backward()
                xg.grad = None

            case.calls[provider] = ce
    return case


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_case(case: Case, repeats: int, warmup: int = 2, seed: int = 0, min_seconds: float = 0.0, max_repeats: int = 2000) -> dict:
    """Seconds per call, a list per provider: providers interleaved within each repetition.

    Each repetition runs the providers in a new random order (from ``seed``),
    so that none always follows the same one: a call that runs after a
    large copy or a cache-flushing naive op can find the caches, the
    write-combining buffers or the memory controller in a different state.

    At least ``repeats`` repetitions, and more (up to ``max_repeats``) until
    every provider's calls add up to ``min_seconds``: a call of tens of
    microseconds timed seven times gives a median that one interruption
    moves by a third, so small cases take hundreds of samples, each still
    one call in the same interleaved setting.
    """
    for call in case.calls.values():
        for _ in range(warmup):
            call()
    _sync(case.device)
    times = {p: [] for p in case.calls}
    totals = dict.fromkeys(case.calls, 0.0)
    order = random.Random(seed)
    done = 0
    while done < repeats or (done < max_repeats and min(totals.values(), default=min_seconds) < min_seconds):
        for provider in order.sample(list(case.calls), len(case.calls)):
            call = case.calls[provider]
            _sync(case.device)
            start = time.perf_counter()
            call()
            _sync(case.device)
            seconds = time.perf_counter() - start
            times[provider].append(seconds)
            totals[provider] += seconds
        done += 1
    return times


def copy_call(n_rows: int, n_cols: int, dtype, device: str):
    """A plain copy of an array of this shape into memory already allocated (``np.copyto`` on the CPU)."""
    src = torch.randn(n_rows, n_cols).to(dtype=dtype, device=device)
    dst = torch.empty_like(src)
    if device == "cpu" and dtype in (torch.float32, torch.float64):
        a, b = src.numpy(), dst.numpy()
        return lambda: np.copyto(b, a)
    return lambda: dst.copy_(src)


# --- peak memory of one forward+backward ---------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_cpu_memory() -> None:
    gc.collect()
    fastsoftmax.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def peak_memory(call, device: str) -> int:
    """Peak bytes a call adds: GPU from torch's allocator stats; CPU from the process's resident set, sampled at ~2 kHz."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    _release_cpu_memory()
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    call()
    peak[0] = max(peak[0], _rss())
    done.set()
    sampler.join()
    return peak[0] - base


# --- the whole matrix ----------------------------------------------------------------------


def machine() -> dict:
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "fastsoftmax": fastsoftmax.__version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import numba

    info["numba"] = numba.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def run(shapes, ops=OPS, dtypes=(torch.float32,), device="cpu", providers=PROVIDERS, repeats=7, memory=True, log=print, min_seconds=MIN_SECONDS):
    """Benchmark the matrix; returns the results dictionary written to ``results.json``.

    Each case runs ``repeats`` interleaved repetitions or more, until each
    provider's calls add up to ``min_seconds`` (see :func:`time_case`).
    """
    rows = []
    for dtype in dtypes:
        for n_rows, n_cols in shapes:
            for op in ops:
                case = make_case(op, n_rows, n_cols, dtype, device, providers)
                # the copy is timed inside the same interleaved repetitions, under the same conditions
                case.calls["copy"] = copy_call(n_rows, n_cols, dtype, device)
                times = time_case(case, repeats, min_seconds=min_seconds)
                del case.calls["copy"]
                copy_s = statistics.median(times.pop("copy"))
                copy_gbps = 2 * n_rows * n_cols * torch.finfo(dtype).bits // 8 / copy_s / 1e9
                medians = {p: statistics.median(t) for p, t in times.items()}
                for provider, seconds in medians.items():
                    row = {
                        "op": op,
                        "shape": [n_rows, n_cols],
                        "dtype": str(dtype).removeprefix("torch."),
                        "device": device,
                        "provider": provider,
                        "median_s": seconds,
                        "times_s": times[provider],
                        "bytes": case.bytes,
                        "gbps": case.bytes / seconds / 1e9,
                        "copy_gbps": copy_gbps,
                        "fraction_of_copy": case.bytes / seconds / 1e9 / copy_gbps,
                        "speedup_over": {other: medians[other] / seconds for other in medians if other != provider},
                    }
                    if memory:
                        row["peak_bytes"] = peak_memory(case.calls[provider], device)
                    rows.append(row)
                log(format_rows([r for r in rows if r["op"] == op and r["shape"] == [n_rows, n_cols] and r["dtype"] == str(dtype).removeprefix("torch.")]))
                del case
                _release_cpu_memory()
    return {"machine": machine(), "device": device, "repeats": repeats, "min_seconds": min_seconds, "byte_counts": BYTES_PER_ELEMENT, "rows": rows}


def format_rows(rows) -> str:
    if not rows:
        return ""
    r0 = rows[0]
    head = f"{r0['op']}  {r0['shape'][0]}x{r0['shape'][1]}  {r0['dtype']}  {r0['device']}  ({r0['bytes'] / 1e6:.1f} MB must move; copy {r0['copy_gbps']:.1f} GB/s)"
    lines = [head, f"  {'provider':<14}{'median ms':>11}{'GB/s':>9}{'of copy':>9}{'vs naive':>10}{'vs torch':>10}{'vs compile':>11}{'peak MB':>9}"]
    for r in rows:
        sp = r["speedup_over"]

        def ratio(p):
            return f"{sp[p]:.2f}x" if p in sp else "-"

        peak = f"{r['peak_bytes'] / 1e6:.1f}" if "peak_bytes" in r else "-"
        lines.append(
            f"  {r['provider']:<14}{r['median_s'] * 1e3:>11.3f}{r['gbps']:>9.1f}{r['fraction_of_copy']:>9.2f}"
            f"{ratio('naive'):>10}{ratio('torch'):>10}{ratio('torch.compile'):>11}{peak:>9}"
        )
    return "\n".join(lines)


def plot(results: dict, out: Path) -> None:
    """``bandwidth.png`` (GB/s against columns, per provider) and ``speedup.png`` (ours over each baseline)."""
    plt = pyplot("plot")

    rows = results["rows"]
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(1, len(ops), figsize=(4.2 * len(ops), 3.6), squeeze=False)
    for ax, op in zip(axes[0], ops):
        for dtype in dtypes:
            for provider in PROVIDERS:
                sel = [r for r in rows if r["op"] == op and r["provider"] == provider and r["dtype"] == dtype]
                if sel:
                    sel.sort(key=lambda r: r["shape"][0] * r["shape"][1])
                    label = provider if len(dtypes) == 1 else f"{provider} {dtype}"
                    ax.plot([f"{r['shape'][0]}x{r['shape'][1]}" for r in sel], [r["gbps"] for r in sel], "o-", label=label)
        copies = sorted({(r["shape"][0] * r["shape"][1], f"{r['shape'][0]}x{r['shape'][1]}", r["copy_gbps"]) for r in rows if r["op"] == op})
        ax.plot([c[1] for c in copies], [c[2] for c in copies], "k:", label="plain copy")
        ax.set(title=op, ylabel="effective GB/s", yscale="log")
        ax.tick_params(axis="x", rotation=30, labelsize=7)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"effective bandwidth, {results['machine'].get('gpu') or results['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "bandwidth.png", dpi=100)
    plt.close(fig)

    ours = [r for r in rows if r["provider"] == "fastsoftmax"]
    baselines = [p for p in PROVIDERS + ("torch.chunked",) if p != "fastsoftmax" and any(p in r["speedup_over"] for r in ours)]
    labels = [f"{r['op']}\n{'x'.join(map(str, r['shape']))} {r['dtype']}" for r in ours]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(ours)), 4))
    width = 0.8 / max(1, len(baselines))
    for k, baseline in enumerate(baselines):
        ax.bar(
            [i + k * width for i in range(len(ours))],
            [r["speedup_over"].get(baseline, float("nan")) for r in ours],
            width,
            label=f"over {baseline}",
        )
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + width * (len(baselines) - 1) / 2 for i in range(len(ours))], labels, rotation=60, fontsize=6, ha="right")
    ax.set(ylabel="speed-up of fastsoftmax (x)", yscale="log", title="fastsoftmax speed-up, same run")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=100)
    plt.close(fig)


def main(args) -> int:
    device = args.device
    shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if device.startswith("cuda") else CPU_SHAPES)
    dtypes = [torch.float32]
    if device.startswith("cuda") and not args.quick:
        dtypes += [torch.bfloat16, torch.float16]
    repeats = args.repeats or (5 if args.quick else 7)
    results = run(shapes, dtypes=dtypes, device=device, repeats=repeats, memory=not args.no_memory)
    from . import bench_linear

    linear_shapes = bench_linear.QUICK_SHAPES if args.quick else bench_linear.SHAPES
    results["rows"] += bench_linear.run(linear_shapes, device=device, repeats=min(repeats, 3), memory=not args.no_memory)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out)
    print(f"wrote {out / 'results.json'}, {out / 'bandwidth.png'}, {out / 'speedup.png'}")
    return 0
