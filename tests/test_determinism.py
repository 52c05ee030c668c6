"""Batch invariance: a row's result is the same bits whatever else is computed with it.

Whatever the batch size, the row's position in it, the number of threads,
the serial or parallel compilation of the kernel, and whether that came from
Numba's on-disk cache (whose parallel kernels are optimised apart from fresh
ones, numba/numba#10617): the sums run in one fixed order
(``intrinsics.lane_sum``), and no fast-math flag lets LLVM reorder them.
Also here: processes and threads (fork, Numba's workqueue layer) and the
memory of half-precision inputs.
"""

import os
import subprocess
import sys
import textwrap

import numba
import pytest
import torch
from fastsoftmax.kernels import config
from helpers import randn

import fastsoftmax
from fastsoftmax.backends import cpu as cpu_backend


def _all_ops(x, t, q, w):
    """Every op's outputs and gradients for logits ``x``: a list of tensors."""
    out = []
    for op in (fastsoftmax.softmax, fastsoftmax.log_softmax):
        xx = x.clone().requires_grad_()
        y = op(xx, -1)
        out += [y, torch.autograd.grad(y, xx, torch.cos(x))[0]]
    for target, kw in ((t, dict(weight=w, label_smoothing=0.1, z_loss=0.01)), (q, dict(weight=w))):
        xx = x.clone().requires_grad_()
        loss = fastsoftmax.cross_entropy(xx, target, reduction="none", **kw)
        out += [loss, torch.autograd.grad(loss, xx, torch.ones_like(loss))[0]]
    return out


def _rows(n_rows, n_cols, dtype, seed=0):
    x = randn(n_rows, n_cols, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, n_cols, (n_rows,), generator=g)
    t[::7] = -100
    q = torch.softmax(randn(n_rows, n_cols, dtype=dtype, seed=seed + 1), -1)
    return x, t, q


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n_cols", [7, 333, 5003])
def test_a_row_is_the_same_bits_alone_and_anywhere_in_a_batch(dtype, n_cols):
    w = torch.rand(n_cols, dtype=dtype, generator=torch.Generator().manual_seed(9)) + 0.5
    x, t, q = _rows(96, n_cols, dtype)  # 96 x 5003: the parallel kernels; a few rows: the serial ones
    batch = _all_ops(x, t, q, w)
    for i in (0, 1, 37, 95):
        alone = _all_ops(x[i : i + 1], t[i : i + 1], q[i : i + 1], w)
        for a, b in zip(alone, batch):
            assert torch.equal(a[0], b[i]), f"row {i} differs alone and in the batch"
    shifted = _all_ops(x[5:], t[5:], q[5:], w)  # every row at another position, another batch size
    for a, b in zip(shifted, batch):
        assert torch.equal(a, b[5:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rows_of_a_few_classes_same_bits_in_one_call_and_on_threads(dtype):
    """The book's 10 classes: a small batch is one serial call (kernels/cpu_small.py), a large one the
    threaded middle-axis kernels on a transposed copy; the plain calls of all three ops."""
    x, t, _ = _rows(4000, 10, dtype)
    assert cpu_backend.small_rows(100, 10) and not cpu_backend.small_rows(4000, 10)

    def ops(x, t):
        out = []
        for op in (fastsoftmax.softmax, fastsoftmax.log_softmax):
            xx = x.clone().requires_grad_()
            y = op(xx, -1)
            out += [y, torch.autograd.grad(y, xx, torch.cos(x))[0]]
        xx = x.clone().requires_grad_()
        loss = fastsoftmax.cross_entropy(xx, t, reduction="none", label_smoothing=0.1)
        return out + [loss, torch.autograd.grad(loss, xx, torch.ones_like(loss))[0]]

    for a, b in zip(ops(x[:100], t[:100]), ops(x, t)):
        assert torch.equal(a, b[:100])


def test_same_bits_whatever_the_thread_count_and_the_twin(monkeypatch):
    x, t, q = _rows(257, 1001, torch.float32)
    w = torch.rand(1001) + 0.5
    monkeypatch.setattr(config, "CPU_PARALLEL_MIN_ELEMENTS", 0)
    reference = _all_ops(x, t, q, w)
    previous = numba.get_num_threads()
    try:
        for threads in range(1, numba.config.NUMBA_NUM_THREADS + 1):
            numba.set_num_threads(threads)
            for a, b in zip(_all_ops(x, t, q, w), reference):
                assert torch.equal(a, b), f"{threads} threads"
    finally:
        numba.set_num_threads(previous)
    monkeypatch.setattr(cpu_backend._Threads, "parallel", False)  # the serial twins, as a forked child runs them
    for a, b in zip(_all_ops(x, t, q, w), reference):
        assert torch.equal(a, b)


def test_middle_axis_positions_are_the_same_bits_in_any_batch():
    x = randn(6, 21, 9, 11, dtype=torch.float32)
    t = torch.randint(0, 21, (6, 9, 11), generator=torch.Generator().manual_seed(1))
    y = fastsoftmax.log_softmax(x, 1)
    loss = fastsoftmax.cross_entropy(x, t, reduction="none", label_smoothing=0.1)
    for n in (0, 3, 5):
        assert torch.equal(fastsoftmax.log_softmax(x[n : n + 1], 1), y[n : n + 1])
        assert torch.equal(fastsoftmax.cross_entropy(x[n : n + 1], t[n : n + 1], reduction="none", label_smoothing=0.1), loss[n : n + 1])


_HASHES = textwrap.dedent(
    """
    import hashlib, torch, fastsoftmax
    from fastsoftmax.backends import cpu
    from fastsoftmax.kernels import config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1001, generator=g) * 3
    t = torch.randint(0, 1001, (64,), generator=g)
    digest = hashlib.sha256()
    config.CPU_PARALLEL_MIN_ELEMENTS = 0  # the parallel twin, the one every process but a forked child runs
    xx = x.clone().requires_grad_()
    loss = fastsoftmax.cross_entropy(xx, t, reduction="none", label_smoothing=0.1)
    for o in (loss, torch.autograd.grad(loss, xx, torch.ones_like(loss))[0]):
        digest.update(o.detach().numpy().tobytes())
    print(digest.hexdigest())
    """
)


def test_fresh_and_cached_kernels_give_the_same_bits(tmp_path):
    """A fresh compile and the same kernel loaded from Numba's cache: one result (the serial twin is the
    same code compiled without prange; the fork test covers its bits)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))

    def run():
        proc = subprocess.run([sys.executable, "-c", _HASHES], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.strip()

    fresh = run()
    assert any((tmp_path / "cache").rglob("*.nbi"))
    assert run() == fresh


_FORK = textwrap.dedent(
    """
    import torch, fastsoftmax
    from torch.utils.data import DataLoader, Dataset
    x = torch.randn(512, 1000, generator=torch.Generator().manual_seed(0))
    t = torch.zeros(512, dtype=torch.long)
    fastsoftmax.softmax(x, 1)  # a parallel kernel in the parent first (GNU OpenMP's pool then exists)

    class Rows(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return fastsoftmax.softmax(x * (i + 1), 1), fastsoftmax.cross_entropy(x, t, reduction="none")

    if __name__ == "__main__":
        out = list(DataLoader(Rows(), batch_size=None, num_workers=2, multiprocessing_context="fork"))
        same = all(torch.equal(y, fastsoftmax.softmax(x * (i + 1), 1)) for i, (y, _) in enumerate(out))
        print("same" if same else "different")
    """
)


def test_dataloader_workers_forked_after_a_parallel_kernel(tmp_path):
    """Forked workers run the serial twins (GNU OpenMP's pool is unusable there) and get the parent's bits."""
    script = tmp_path / "fork.py"
    script.write_text(_FORK)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "same"


_THREADS = textwrap.dedent(
    """
    import threading, torch, numba, fastsoftmax
    x = torch.randn(256, 2000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = torch.softmax(x, 1)
    bad = []

    def run():
        for _ in range(10):
            if not torch.allclose(fastsoftmax.softmax(x, 1), ref):
                bad.append(1)

    threads = [threading.Thread(target=run) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(numba.threading_layer(), len(bad))
    """
)


def test_python_threads_under_the_workqueue_layer_do_not_abort():
    """Numba's workqueue layer is not thread-safe (concurrent launches abort the process): launches are serialised."""
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    proc = subprocess.run([sys.executable, "-c", _THREADS], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["workqueue", "0"]


_MEMORY = textwrap.dedent(
    """
    import resource, torch, fastsoftmax
    fastsoftmax.softmax(torch.randn(64, 64).half(), 1)  # compile outside the measurement
    fastsoftmax.cross_entropy(torch.randn(64, 64).half(), torch.zeros(64, dtype=torch.long))
    x = torch.empty(8192, 8192, dtype=torch.half).normal_()  # no float32 temporary before the baseline
    t = torch.zeros(8192, dtype=torch.long)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    op = {op!r}
    if op == "softmax":
        y = fastsoftmax.softmax(x, 1)
    else:
        x.requires_grad_()
        fastsoftmax.cross_entropy(x, t).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print((peak - base) / (x.numel() * x.element_size()))
    """
)


@pytest.mark.parametrize("op", ["softmax", "cross_entropy"])
def test_half_precision_takes_at_most_two_more_inputs_of_memory(op):
    """float16 on the CPU: the output (or gradient) and a chunk, not float32 copies of everything (5x before)."""
    proc = subprocess.run([sys.executable, "-c", _MEMORY.format(op=op)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = float(proc.stdout.strip())
    assert growth <= 2.0, f"peak grew by {growth:.2f} times the input (input itself excluded)"
