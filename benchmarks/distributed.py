"""Vocabulary-parallel cross-entropy on gloo processes against all_gather + fastsoftmax.cross_entropy (issue 18, item 4).

    .venv/bin/python benchmarks/distributed.py [--rows 4096] [--cols-per-rank 64000] [--ranks 2] [--repeats 5] [--out-dir DIR]

Each of ``--ranks`` processes holds ``(rows, cols-per-rank)`` float32 logits
(its slice of the classes) and the same targets. Timed, per repetition,
with a barrier before each call and the slowest rank's time kept:

* ``vocab_parallel``: :func:`fastsoftmax.vocab_parallel_cross_entropy`,
  forward and backward (the rank's gradient slice);
* ``vocab_parallel_loss_only``: the same under ``torch.no_grad()`` (pass 1,
  the collectives and the loss: what pass 2 adds is the difference);
* ``all_gather_then_ce``: ``dist.all_gather`` of the slices, ``torch.cat``
  into ``(rows, C)`` logits, :func:`fastsoftmax.cross_entropy` with
  ``inplace_backward=True`` (the gradient written into the gathered logits,
  the least memory the single-device op needs), backward, and the rank's
  slice of the gradient copied out;
* ``all_gather_only``: the gather and the cat alone.

The bytes are counted from the collectives each provider calls (wrapped
``dist.all_reduce`` and ``dist.all_gather``): the payload, the tensors'
sizes, and what a ring algorithm sends per rank (all-reduce ``2 (P-1)/P``
of its tensor, all-gather ``(P-1)/P`` of its output). The processes share
the machine's cores: each runs ``cores // ranks`` threads (torch and Numba).
Rank 0 writes ``distributed.log`` (appended) and ``distributed.json`` to
``--out-dir``, with the load average before and after.
"""

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PROVIDERS = ("vocab_parallel", "vocab_parallel_loss_only", "all_gather_then_ce", "all_gather_only")


class _Counter:
    """Wraps the collectives to add up what each call moves."""

    def __init__(self, world: int):
        self.world = world
        self.payload = 0
        self.ring = 0.0
        self.calls = []
        self._reduce, self._gather = dist.all_reduce, dist.all_gather
        dist.all_reduce, dist.all_gather = self.all_reduce, self.all_gather

    def all_reduce(self, tensor, *args, **kwargs):
        nbytes = tensor.numel() * tensor.element_size()
        self.payload += nbytes
        self.ring += 2 * (self.world - 1) / self.world * nbytes
        self.calls.append(("all_reduce", nbytes))
        return self._reduce(tensor, *args, **kwargs)

    def all_gather(self, outputs, tensor, *args, **kwargs):
        nbytes = sum(t.numel() * t.element_size() for t in outputs)
        self.payload += nbytes
        self.ring += (self.world - 1) / self.world * nbytes
        self.calls.append(("all_gather", nbytes))
        return self._gather(outputs, tensor, *args, **kwargs)

    def take(self) -> dict:
        out = {"payload_bytes": self.payload, "ring_bytes_sent_per_rank": self.ring, "collectives": list(self.calls)}
        self.payload, self.ring, self.calls = 0, 0.0, []
        return out


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _worker(rank: int, args, store: str, queue) -> None:
    threads = max(1, (os.cpu_count() or 1) // args.ranks)
    os.environ["NUMBA_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    import fastsoftmax

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=args.ranks)
    n, v, world = args.rows, args.cols_per_rank, args.ranks
    gen = torch.Generator().manual_seed(1 + rank)
    shard = torch.randn(n, v, generator=gen) * 3
    target = torch.randint(0, v * world, (n,), generator=torch.Generator().manual_seed(0))
    counter = _Counter(world)

    def vocab_parallel():
        x = shard.requires_grad_()
        loss = fastsoftmax.vocab_parallel_cross_entropy(x, target)
        loss.backward()
        x.grad = None
        shard.requires_grad_(False)
        return float(loss.detach())

    def vocab_parallel_loss_only():
        with torch.no_grad():
            return float(fastsoftmax.vocab_parallel_cross_entropy(shard, target))

    def gathered():
        parts = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(parts, shard)
        full = torch.cat(parts, 1)
        del parts
        return full

    def all_gather_then_ce():
        full = gathered().requires_grad_()
        loss = fastsoftmax.cross_entropy(full, target, inplace_backward=True)
        loss.backward()
        grad = full.grad[:, rank * v : (rank + 1) * v].contiguous()
        del full, grad
        return float(loss.detach())

    def all_gather_only():
        gathered()
        return 0.0

    calls = dict(zip(PROVIDERS, (vocab_parallel, vocab_parallel_loss_only, all_gather_then_ce, all_gather_only)))
    bytes_per_call, peak_rss, losses = {}, {}, {}
    for name, fn in calls.items():  # warm-up: compiles, first touches; counts bytes and the peak memory so far
        dist.barrier()
        losses[name] = fn()
        bytes_per_call[name] = counter.take()
        peak_rss[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, fn in calls.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            counter._reduce(elapsed, op=dist.ReduceOp.MAX)  # the call ends when its slowest rank does
            times[name].append(float(elapsed))
    counter.take()
    queue.put((rank, {"times": times, "bytes": bytes_per_call, "peak_rss": peak_rss, "losses": losses, "threads": threads}))
    dist.destroy_process_group()


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols-per-rank", type=int, default=64000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results", "cpu-epyc-2core"))
    args = parser.parse_args()
    load_before = _uptime()
    context = mp.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        procs = [context.Process(target=_worker, args=(r, args, os.path.join(folder, "store"), queue)) for r in range(args.ranks)]
        for p in procs:
            p.start()
        results = dict(queue.get() for _ in procs)
        for p in procs:
            p.join()
    load_after = _uptime()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    r0 = results[0]
    logits_bytes = args.rows * args.cols_per_rank * args.ranks * 4
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": commit,
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads_per_rank": r0["threads"],
        "torch": torch.__version__,
        "ranks": args.ranks,
        "rows": args.rows,
        "cols_per_rank": args.cols_per_rank,
        "dtype": "float32",
        "full_logits_bytes": logits_bytes,
        "load_before": load_before,
        "load_after": load_after,
        "median_s": {k: statistics.median(v) for k, v in r0["times"].items()},
        "times_s": r0["times"],
        "bytes_per_call": r0["bytes"],
        "peak_rss_bytes_by_rank": {r: res["peak_rss"] for r, res in results.items()},
        "losses": r0["losses"],
    }
    med = report["median_s"]
    b = report["bytes_per_call"]
    lines = [
        f"# {report['date']} commit {commit}: {report['command']}",
        f"# {report['cpu']}, {report['cores']} cores, {args.ranks} gloo processes x {r0['threads']} threads, torch {torch.__version__}",
        f"# load before: {load_before}",
        f"# load after:  {load_after}",
        f"N={args.rows}, V={args.ranks}x{args.cols_per_rank} float32 (full logits {logits_bytes / 2**30:.2f} GiB), {args.repeats} repetitions, slowest rank:",
    ]
    for name in PROVIDERS:
        t = sorted(r0["times"][name])
        lines.append(
            f"  {name:26s} median {med[name] * 1e3:9.1f} ms  (min {t[0] * 1e3:.1f}, max {t[-1] * 1e3:.1f}); "
            f"{b[name]['payload_bytes']:>13,d} B payload, {b[name]['ring_bytes_sent_per_rank']:>15,.0f} B sent per rank on a ring; "
            f"peak RSS after it, rank 0: {report['peak_rss_bytes_by_rank'][0][name] / 2**30:.2f} GiB"
        )
    lines.append(
        f"  all_gather_then_ce / vocab_parallel: {med['all_gather_then_ce'] / med['vocab_parallel']:.2f}x the time, "
        f"{b['all_gather_then_ce']['payload_bytes'] / b['vocab_parallel']['payload_bytes']:,.0f}x the payload"
    )
    lines.append(f"  losses: {r0['losses']}")
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "distributed.log"), "a") as log:
        log.write(text + "\n")
    with open(os.path.join(args.out_dir, "distributed.json"), "w") as out:
        json.dump(report, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
