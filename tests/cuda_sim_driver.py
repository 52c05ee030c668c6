"""Runs the CUDA kernels in the CUDA simulator against float64 NumPy references.

Started by tests/test_cuda.py in its own process with
NUMBA_ENABLE_CUDASIM=1 (the variable must be set before numba.cuda is
imported). Blocks are made small so that tiny inputs exercise every launch
shape: warp per row (C <= 8), block per row with the row in registers
(C <= 32) and the online long-row path (C > 32). The simulator has no warp
shuffles, so the shared-memory reductions run. Prints one line per case and
exits non-zero on the first mismatch.
"""

import os
import sys

assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", "run me with NUMBA_ENABLE_CUDASIM=1"

import numpy as np  # noqa: E402

from fastsoftmax.kernels import config  # noqa: E402

config.CUDA_THREADS_PER_BLOCK = 16
config.CUDA_WARP_ROW_MAX_COLS = 8
config.CUDA_BLOCK_ROW_MAX_COLS = 32
config.CUDA_USE_SHUFFLE = False

from numba import cuda  # noqa: E402

from fastsoftmax.kernels import cuda as kc  # noqa: E402
from fastsoftmax.kernels import cuda_reduce  # noqa: E402

# the simulator runs a warp as 32 threads only if the block holds one; a
# "warp" group of 8 lanes keeps the blocks small (the reductions take any
# power-of-two group)
kc.WARP = cuda_reduce.WARP = 8

RNG = np.random.default_rng(0)
COLUMNS = {"warp per row": 5, "block, row in registers": 27, "block, online long row": 70}
DTYPES = {"float32": (np.float32, 2e-6), "float64": (np.float64, 1e-12), "float16": (np.float16, 2e-3)}


def softmax64(x):
    z = x - x.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True), z - np.log(e.sum(1, keepdims=True))


def check(name, got, want, tol):
    err = float(np.max(np.abs(got.astype(np.float64) - want) / (np.abs(want) + 1e-3)))
    ok = err <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max rel err {err:.2e} (tol {tol:.0e})", flush=True)
    if not ok:
        sys.exit(1)


def launch(pyfunc, n_rows, n_cols, *args):
    group, threads, _ = kc.plan(n_cols)
    cuda.jit(pyfunc)[kc.grid(n_rows, group, threads), threads](*args)


def main():
    for path, n_cols in COLUMNS.items():
        group, threads, items = kc.plan(n_cols)
        for dtype, (np_dtype, tol) in DTYPES.items():
            acc = np.float64 if dtype == "float64" else np.float32
            n_rows = 3
            x = (RNG.standard_normal((n_rows, n_cols)) * 3).astype(np_dtype)
            x[1, 2] = -np.inf  # a masked entry: probability exactly 0
            x64 = x.astype(np.float64)
            p, logp = softmax64(x64)
            for log, ref in ((False, p), (True, logp)):
                op = "log_softmax" if log else "softmax"
                y = np.full_like(x, np.nan)
                launch(kc.softmax_forward(dtype, log, group, threads, items, False), n_rows, n_cols, x, y)
                finite = np.isfinite(ref)
                assert np.array_equal(np.isfinite(y), finite), f"{op} {dtype} {path}: non-finite pattern differs"
                check(f"{op} forward {dtype} {path}", np.where(finite, y, 0), np.where(finite, ref, 0), tol)
                dy = RNG.standard_normal((n_rows, n_cols)).astype(np_dtype)
                yr = y.astype(np.float64)
                dx_ref = dy - np.exp(yr) * dy.sum(1, keepdims=True) if log else yr * (dy - (dy * yr).sum(1, keepdims=True))
                dx = np.full_like(x, np.nan)
                launch(kc.softmax_backward(dtype, log, group, threads, items, False), n_rows, n_cols, y, dy, dx)
                check(f"{op} backward {dtype} {path}", dx, dx_ref, tol)
            # fused cross-entropy, class-index targets, weights, smoothing, one ignored row
            t = np.array([0, 3, 4], dtype=np.int64) % n_cols
            t[2] = -100
            w = (RNG.random(n_cols) + 0.5).astype(acc)
            eps = 0.1
            kept = t != -100
            denom = w[t[kept]].sum()
            loss = np.full(n_rows, np.nan)
            grad = np.full_like(x, np.nan)
            scale = np.array([1.0 / denom])
            launch(kc.cross_entropy_index(dtype, group, threads, items, False), n_rows, n_cols,
                   x, t, w, True, -100, acc(eps), scale, loss, grad, True)
            w64 = w.astype(np.float64)
            lse = np.log(np.exp(x64 - x64.max(1, keepdims=True)).sum(1)) + x64.max(1)
            nll = lse - x64[np.arange(n_rows), np.where(kept, t, 0)]
            smooth = (w64 * (lse[:, None] - np.where(np.isfinite(x64), x64, 0))).sum(1)
            ref_loss = np.where(kept, (1 - eps) * w64[np.where(kept, t, 0)] * nll + eps / n_cols * smooth, 0.0)
            a = (1 - eps) * np.eye(n_cols)[np.where(kept, t, 0)] * w64[np.where(kept, t, 0)][:, None] + eps / n_cols * w64
            ref_grad = np.where(kept[:, None], (a.sum(1, keepdims=True) * p - a) / denom, 0.0)
            if not np.isfinite(x64).all():
                # the masked logit: smoothing puts eps/C weight on it -> infinite loss in row 1, as in torch
                ref_loss[1] = loss[1]
            check(f"cross_entropy loss {dtype} {path}", np.where(np.isfinite(ref_loss), loss, 0), np.where(np.isfinite(ref_loss), ref_loss, 0), tol)
            check(f"cross_entropy grad {dtype} {path}", grad, ref_grad, tol)
            # a target out of range: NaN, never an out-of-bounds read
            bad = np.array([0, n_cols + 7, 1], dtype=np.int64)
            launch(kc.cross_entropy_index(dtype, group, threads, items, False), n_rows, n_cols,
                   x, bad, w, False, -100, acc(0.0), np.array([1.0]), loss, grad, True)
            assert np.isnan(loss[1]) and np.isnan(grad[1].astype(np.float64)).all(), "bad target must give NaN"
            print(f"ok   bad target gives NaN {dtype} {path}", flush=True)
            # probability targets
            q = softmax64(RNG.standard_normal((n_rows, n_cols)))[0].astype(np_dtype)
            xf = np.where(np.isfinite(x), x, 0).astype(np_dtype)
            pf, lpf = softmax64(xf.astype(np.float64))
            launch(kc.cross_entropy_prob(dtype, group, threads, False), n_rows, n_cols,
                   xf, q, w, False, acc(0.0), np.array([1.0 / n_rows]), loss, grad, True)
            q64 = q.astype(np.float64)
            check(f"cross_entropy prob loss {dtype} {path}", loss, -(q64 * lpf).sum(1), tol)
            check(f"cross_entropy prob grad {dtype} {path}", grad, (q64.sum(1, keepdims=True) * pf - q64) / n_rows, tol)
    src = RNG.standard_normal((4, 9)).astype(np.float32)
    factor = RNG.standard_normal(4)
    out = np.full_like(src, np.nan)
    cuda.jit(kc.scale_rows("float32"))[2, 16](src, factor, out)
    check("scale_rows float32", out, src * factor[:, None], 2e-7)
    print("all simulator checks passed")


if __name__ == "__main__":
    main()
