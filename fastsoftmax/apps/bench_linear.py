"""Benchmarks of the linear cross-entropy: torch eager, torch's chunked path and fastsoftmax, time and peak memory.

Forward+backward of the loss of ``x @ W.T`` (``x`` ``(N, H)``, ``W``
``(V, H)``, float32): the providers interleaved in one process for time
(:func:`bench.time_case`), each in a fresh process for its peak, the growth
of the resident high-water mark during one call. TFLOP/s count the three
products, ``6 N H V`` flops.
"""

import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as TF

import fastsoftmax

from ..kernels import config
from .bench import Case, _release_cpu_memory, _rss, peak_memory, time_case

PROVIDERS = ("torch", "torch.chunked", "fastsoftmax")
#: (N, H, V): the D2L step's shape, a 32k vocabulary, Llama 3's 128k vocabulary
SHAPES = ((256, 784, 10), (2048, 512, 32000), (2048, 512, 128256))
QUICK_SHAPES = ((256, 784, 10), (512, 256, 8000))


def _loss_fn(provider: str):
    if provider == "torch":
        return lambda x, W, t: TF.cross_entropy(TF.linear(x, W), t)
    if provider == "torch.chunked":
        return lambda x, W, t: TF.linear_cross_entropy(x, W, t, options=torch.nn.LinearCrossEntropyOptions())
    if provider == "fastsoftmax":
        return fastsoftmax.linear_cross_entropy
    raise ValueError(f"unknown provider {provider!r}: expected one of {PROVIDERS}")


def call(provider: str, n: int, h: int, v: int, dtype=torch.float32, device="cpu", seed=0, rows=None):
    """A zero-argument forward+backward of ``provider``'s linear cross-entropy (its gradients dropped after each call).

    ``rows`` limits the call to the first rows of the batch (a warm-up).
    """
    fn = _loss_fn(provider)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(dtype=dtype, device=device).requires_grad_()
    W = (torch.randn(v, h, generator=g) * h**-0.5).to(dtype=dtype, device=device).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(device)

    def call(rows=rows):
        loss = fn(x[:rows], W, t[:rows]) if rows else fn(x, W, t)
        loss.backward()
        x.grad = W.grad = None
        return loss.detach()

    return call


def _reset_peak() -> bool:
    """Start the resident high-water mark (VmHWM) again from the current size (Linux 4.0 and later)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def worker(provider: str, n: int, h: int, v: int, dtype: str, device: str) -> dict:
    """One forward+backward in this (fresh) process after a warm-up on 8 rows: ``{"seconds", "peak_bytes"}``.

    The peak is the growth of the resident high-water mark (exact, no
    sampling) on the CPU, of torch's allocator on CUDA. It includes the
    gradients the call returns. ``"fastsoftmax:128"`` is ours with chunks of
    128 MiB of logits.
    """
    provider, _, chunk_mib = provider.partition(":")
    if chunk_mib:
        config.LINEAR_CE_CHUNK_BYTES = int(chunk_mib) << 20
    run_once = call(provider, n, h, v, getattr(torch, dtype), device)
    run_once(rows=8)  # kernels load, first-call paths run
    _release_cpu_memory()
    if device.startswith("cuda"):
        start = time.perf_counter()
        peak = peak_memory(run_once, device)
        return {"seconds": time.perf_counter() - start, "peak_bytes": peak}
    base = _rss()
    exact = _reset_peak()
    start = time.perf_counter()
    if exact:
        run_once()
        seconds, peak = time.perf_counter() - start, _peak_rss() - base
    else:
        peak = peak_memory(run_once, device)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": peak}


def in_subprocess(provider: str, n: int, h: int, v: int, dtype="float32", device="cpu") -> dict:
    """:func:`worker` in a fresh Python process: nothing of an earlier call is left in its memory."""
    code = "import json, sys; from fastsoftmax.apps import bench_linear; print(json.dumps(bench_linear.worker(*json.loads(sys.argv[1]))))"
    args = json.dumps([provider, n, h, v, dtype, device])
    done = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(shapes, device="cpu", providers=PROVIDERS, repeats=5, memory=True, log=print) -> list:
    """Rows of ``results.json``, float32: median time, TFLOP/s, speed-ups, and each provider's peak growth in a fresh process."""
    rows = []
    for n, h, v in shapes:
        case = Case("linear_cross_entropy_fwd_bwd", n, v, torch.float32, device)
        for provider in providers:
            case.calls[provider] = call(provider, n, h, v, device=device)
        times = time_case(case, repeats, warmup=1)
        del case
        _release_cpu_memory()
        medians = {p: statistics.median(t) for p, t in times.items()}
        flops = 6 * n * h * v
        for provider, seconds in medians.items():
            row = {
                "op": "linear_cross_entropy_fwd_bwd",
                "shape": [n, h, v],
                "dtype": "float32",
                "device": device,
                "provider": provider,
                "median_s": seconds,
                "times_s": times[provider],
                "flops": flops,
                "tflops": flops / seconds / 1e12,
                "speedup_over": {other: medians[other] / seconds for other in medians if other != provider},
                "gradient_bytes": (n + v) * h * 4,
            }
            if memory:
                row["peak_bytes"] = in_subprocess(provider, n, h, v, device=device)["peak_bytes"]
            rows.append(row)
        log(format_rows(rows[-len(medians):]))
    return rows


def format_rows(rows) -> str:
    r0 = rows[0]
    n, h, v = r0["shape"]
    head = f"{r0['op']}  N={n} H={h} V={v}  {r0['dtype']}  {r0['device']}  ({r0['flops'] / 1e9:.1f} GFLOP; gradients {r0['gradient_bytes'] / 1e6:.1f} MB)"
    lines = [head, f"  {'provider':<15}{'median ms':>11}{'TFLOP/s':>9}{'vs torch':>10}{'vs chunked':>11}{'peak MB':>9}{'beyond grads':>14}"]
    for r in rows:
        sp = r["speedup_over"]

        def ratio(p):
            return f"{sp[p]:.2f}x" if p in sp else "-"

        peak = f"{r['peak_bytes'] / 1e6:.1f}" if "peak_bytes" in r else "-"
        beyond = f"{(r['peak_bytes'] - r['gradient_bytes']) / 1e6:.1f}" if "peak_bytes" in r else "-"
        lines.append(
            f"  {r['provider']:<15}{r['median_s'] * 1e3:>11.2f}{r['tflops']:>9.3f}"
            f"{ratio('torch'):>10}{ratio('torch.chunked'):>11}{peak:>9}{beyond:>14}"
        )
    return "\n".join(lines)
