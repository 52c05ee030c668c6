"""Runs the CUDA kernels in numba-cuda's simulator against float64 references, through the backend.

Started by tests/test_cuda_offline.py in its own process with
NUMBA_ENABLE_CUDASIM=1 (the variable must be set before numba.cuda is
imported). :mod:`cuda_sim` adds the warp shuffles the simulator lacks and
shrinks the launch shapes, so rows of a few hundred columns reach every
kernel with 64-thread blocks (two real 32-lane warps): warp per row with a
partial last block (3 rows, 2 a block), block per row with the row in
registers, the online long-row kernels; one chunk a thread in registers
(float16, float64) and two (float32, bfloat16: the second chunk's loads,
math and stores, threads with and without one); aligned rows (the 16-byte vector
path) and unaligned ones (the element path); every dtype, bfloat16
included. Prints one line per case and exits non-zero on the first
mismatch. ``--torch`` also runs the torch side of the CUDA design
(:mod:`cuda_sim_torch`).
"""

import os
import sys

assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", "run me with NUMBA_ENABLE_CUDASIM=1"
sys.setswitchinterval(1e-3)  # the simulator's threads meet at every barrier: switch often
import warnings  # noqa: E402

# NumPy scalars stand for device floats: 1 / 0, inf - inf and friends are expected, as on the GPU
warnings.filterwarnings("ignore", category=RuntimeWarning)

import cuda_sim  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from helpers import TOLERANCES  # noqa: E402

cuda_sim.install()
cuda_sim.small_launch_shapes()

from fastsoftmax.kernels import cuda as kc  # noqa: E402
from fastsoftmax.kernels.cuda_codec import codec  # noqa: E402

from fastsoftmax.backends import cuda as be  # noqa: E402

RNG = np.random.default_rng(0)
TORCH = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
HALF = {"float16", "bfloat16"}


# --- storage: bfloat16 travels as uint16 bits -----------------------------------------


def encode(values, dtype):
    """float64 values -> the array the backend takes (rounded to ``dtype``)."""
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(TORCH[dtype])
    return t.view(torch.uint16).numpy().copy() if dtype == "bfloat16" else t.numpy().copy()


def decode(array, dtype):
    """The backend's array -> float64 values."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    return (t.view(torch.bfloat16) if dtype == "bfloat16" else t).double().numpy()


def empty(shape, dtype):
    """A poisoned output: NaN everywhere (all-ones bits for bfloat16, a NaN)."""
    if dtype == "bfloat16":
        return np.full(shape, 0xFFFF, dtype=np.uint16)
    return np.full(shape, np.nan, dtype={"float16": np.float16, "float32": np.float32, "float64": np.float64}[dtype])


def misaligned(array):
    """The same values, C-contiguous, at an address that is not a multiple of 16 bytes."""
    raw = np.empty(array.nbytes + 16, dtype=np.uint8)
    offset = (-raw.ctypes.data) % 16 + array.itemsize
    out = raw[offset : offset + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


def check(name, got, want, dtype, loose=1.0):
    """NaN exactly where the reference has NaN, infinities equal, the rest within the dtype's tolerance.

    The reference is rounded to ``dtype`` first: a value past the dtype's
    range is infinite there (log-softmax of ``[-3e38, 3e38]`` is ``[-inf, 0]``
    in float32, in torch too).
    """
    rtol, atol = TOLERANCES[TORCH[dtype]]
    rtol, atol = rtol * loose, atol * loose
    got = np.asarray(got, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        want = decode(encode(np.atleast_1d(np.asarray(want, np.float64)), dtype), dtype).reshape(np.shape(want))
    same_nan = np.array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    same_inf = np.array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)])
    err = np.abs(got[finite] - want[finite]) - (atol + rtol * np.abs(want[finite]))
    ok = same_nan and same_inf and (err.size == 0 or err.max() <= 0)
    worst = float(np.max(np.abs(got[finite] - want[finite]), initial=0.0))
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max abs err {worst:.1e}{'' if same_nan else ' NaN pattern differs'}", flush=True)
    if not ok:
        print("got ", got, "\nwant", want, sep="\n")
        sys.exit(1)


# --- float64 references ---------------------------------------------------------


def softmax64(x):
    m = x.max(1, keepdims=True)
    e = np.exp(x - m)
    s = e.sum(1, keepdims=True)
    return e / s, (x - m) - np.log(s)


def ce_index64(x, t, w, ignore, eps, reduction, go):
    n_rows, n_cols = x.shape
    w = np.ones(n_cols) if w is None else w
    _, lp = softmax64(x)
    kept = t != ignore
    valid = kept & (t >= 0) & (t < n_cols)
    tt = np.where(valid, t, 0)
    rows = np.arange(n_rows)
    with np.errstate(invalid="ignore"):
        nll = -w[tt] * lp[rows, tt]
        smooth = -(w * lp).sum(1) if eps else np.zeros(n_rows)
        loss = np.where(kept, (1 - eps) * nll + eps / n_cols * smooth, 0.0)
        loss = np.where(kept & ~valid, np.nan, loss)
        a = (1 - eps) * np.eye(n_cols)[tt] * w[tt][:, None] + eps / n_cols * w
        grad = a.sum(1, keepdims=True) * np.exp(lp) - a
        nan_row = np.isnan(lp).any(1)
        grad = np.where(kept[:, None], grad, np.where(nan_row[:, None], np.nan, 0.0))
        grad = np.where((kept & ~valid)[:, None], np.nan, grad)
        denom = w[tt][valid].sum()
        if reduction == "none":
            return loss, grad * go[:, None]
        if reduction == "sum":
            return loss.sum(), grad * go
        if denom == 0:
            return np.nan, np.where(kept[:, None], np.nan, grad)
        return loss.sum() / denom, grad * go / denom


def ce_prob64(x, q, w, eps, reduction, go):
    n_rows, n_cols = x.shape
    w = np.ones(n_cols) if w is None else w
    _, lp = softmax64(x)
    a = w * ((1 - eps) * q + eps / n_cols)
    with np.errstate(invalid="ignore"):
        loss = -(a * lp).sum(1)
        grad = a.sum(1, keepdims=True) * np.exp(lp) - a
    if reduction == "none":
        return loss, grad * go[:, None]
    if reduction == "sum":
        return loss.sum(), grad * go
    return loss.sum() / n_rows, grad * go / n_rows


# --- cases ------------------------------------------------------------------------


def columns(dtype, shape, aligned, items=1):
    """A row length reaching ``shape`` with ``items`` chunks a thread and 64-thread blocks, whole chunks or not.

    With two chunks a thread the row has more chunks than threads, so every
    thread's first chunk is loaded and some threads' second: the warp's 32
    lanes hold 48 chunks, the block's 64 threads 100 (36 of them a second).
    Unaligned rows end on a partial chunk, a second chunk with two.
    """
    vec = codec(dtype).vec
    n_chunks = {1: {"warp": 16, "block": 50, "online": 90}, 2: {"warp": 48, "block": 100, "online": 150}}[items][shape]
    return n_chunks * vec if aligned else n_chunks * vec - vec // 2 - 1 if vec > 2 else n_chunks * vec - 1


def softmax_rows(n_rows, n_cols, dtype, special):
    x = RNG.standard_normal((n_rows, n_cols)) * 3
    x[0, 1::7] = -np.inf  # masked entries: probability exactly 0
    big = {"float16": 6e4, "bfloat16": 1e38, "float32": 1e30, "float64": 1e300}[dtype]
    if special == "nan":
        x[-1, 3] = np.nan
    elif special == "inf":
        x[-1, 2] = np.inf
    elif special == "all -inf":
        x[-1, :] = -np.inf
    elif special == "huge":
        x[-1, :] *= big / 4
    return x


def softmax_cases():
    plans = {
        "float32": [("warp", True), ("warp", False), ("block", True), ("block", False), ("online", True), ("online", False)],
        "bfloat16": [("warp", True), ("warp", False), ("block", True), ("block", False), ("online", True), ("online", False)],
        "float16": [("warp", False), ("block", True), ("online", False)],
        "float64": [("warp", True), ("block", False), ("online", True)],
    }
    specials = ["all -inf", "nan", "huge", "inf"]
    k = 0
    for dtype, shapes in plans.items():
        for shape, aligned in shapes:
            n_rows = 3 if shape == "warp" else 2
            n_cols = columns(dtype, shape, aligned, cuda_sim.softmax_items(dtype))
            for log in (False, True):  # forward and backward run the same shape
                for backward in (False, True):
                    assert kc.softmax_plan(n_cols, dtype, log, backward)[0] == shape, (dtype, n_cols, log, backward)
            x = encode(softmax_rows(n_rows, n_cols, dtype, specials[k % len(specials)]), dtype)
            k += 1
            items = f", {cuda_sim.softmax_items(dtype)} chunks a thread" if shape != "online" else ""
            label = f"{dtype} {shape} C={n_cols}{items} {'aligned' if aligned else 'unaligned'} ({specials[(k - 1) % len(specials)]})"
            if dtype == "float32" and shape == "block" and aligned:
                x = misaligned(x)  # whole chunks, but the base is not 16-byte aligned: element path
                label += " misaligned base"
            yield dtype, shape, x, label


def run_softmax():
    for dtype, shape, x, label in softmax_cases():
        x64 = decode(x, dtype)
        with np.errstate(invalid="ignore", over="ignore"):
            p, logp = softmax64(x64)
        for log, ref in ((False, p), (True, logp)):
            op = "log_softmax" if log else "softmax"
            y = empty(x.shape, dtype)
            be.softmax_forward(x, y, log)
            check(f"{op} forward {label}", decode(y, dtype), ref, dtype)
            dy = encode(RNG.standard_normal(x.shape), dtype)
            yd, dyd = decode(y, dtype), decode(dy, dtype)
            with np.errstate(invalid="ignore", over="ignore"):
                want = dyd - np.exp(yd) * dyd.sum(1, keepdims=True) if log else yd * (dyd - (dyd * yd).sum(1, keepdims=True))
            dx = empty(x.shape, dtype)
            be.softmax_backward(y, dy, dx, log)
            check(f"{op} backward {label}", decode(dx, dtype), want, dtype, loose=4.0 if dtype in HALF else 1.0)


def acc_array(values, dtype):
    return np.ascontiguousarray(values, dtype=np.float64 if dtype == "float64" else np.float32)


def run_cross_entropy():
    cases = [
        # dtype, shape, aligned, reduction, weights, eps, rows (what each row tests)
        ("float32", "warp", True, "mean", True, 0.1, ["kept", "ignored, NaN logit", "kept, a -inf logit"]),
        ("float32", "block", False, "none", False, 0.0, ["kept", "bad target"]),
        ("float32", "warp", False, "mean", True, 0.0, ["zero-weight target", "ignored"]),
        ("float32", "warp", True, "mean", False, 0.2, ["ignored", "ignored, all -inf"]),
        ("bfloat16", "warp", True, "mean", True, 0.1, ["kept", "ignored, NaN logit", "kept"]),
        ("bfloat16", "block", False, "sum", True, 0.05, ["kept", "ignored, +inf logit"]),
        ("bfloat16", "block", True, "none", False, 0.0, ["kept", "kept, a -inf logit"]),
        ("float16", "block", True, "mean", True, 0.1, ["kept", "ignored"]),
        ("float64", "warp", False, "sum", True, 0.1, ["kept", "kept", "ignored, all -inf"]),
    ]
    for dtype, shape, aligned, reduction, weighted, eps, rows in cases:
        n_rows, n_cols = len(rows), columns(dtype, "warp" if shape == "warp" else "online", aligned)
        assert kc.ce_plan(n_cols, dtype)[0] == shape
        x64 = RNG.standard_normal((n_rows, n_cols)) * 3
        t = RNG.integers(0, n_cols, n_rows)
        w = RNG.random(n_cols) + 0.5 if weighted else None
        for i, what in enumerate(rows):
            if "ignored" in what:
                t[i] = -100
            if "NaN" in what:
                x64[i, 5] = np.nan
            if "+inf" in what:
                x64[i, 4] = np.inf
            if "all -inf" in what:
                x64[i] = -np.inf
            if "a -inf" in what:
                x64[i, (t[i] + 1) % n_cols] = -np.inf
            if "bad target" in what:
                t[i] = n_cols + 3
            if "zero-weight" in what:
                w[t[i]] = 0.0
        x = encode(x64, dtype)
        x64 = decode(x, dtype)
        wa = acc_array(w, dtype) if weighted else None
        go64 = RNG.random(n_rows) + 0.5 if reduction == "none" else np.array([0.75])
        go = encode(go64, dtype)
        go64 = decode(go, dtype)
        loss = np.full(n_rows, np.nan, dtype=np.float64 if dtype == "float64" else np.float32)
        out = empty(1, dtype)
        saved = np.full((n_rows + 1, 3), np.nan, dtype=loss.dtype)
        be.cross_entropy_index(x, t, wa, -100, eps, reduction, loss, out, saved)
        grad = empty(x.shape, dtype)
        be.cross_entropy_index_backward(x, t, wa, -100, eps, reduction, saved, go, grad)
        w64 = None if w is None else wa.astype(np.float64)
        want_loss, want_grad = ce_index64(x64, t, w64, -100, eps, reduction, go64 if reduction == "none" else go64[0])
        got_loss = loss if reduction == "none" else decode(out, dtype)[0]
        label = f"{dtype} {shape} C={n_cols} {reduction} eps={eps} {'weights ' if weighted else ''}rows: {', '.join(rows)}"
        loss_dtype = "float64" if dtype == "float64" else "float32" if reduction == "none" else dtype
        check(f"cross_entropy loss {label}", got_loss, want_loss, loss_dtype, loose=4.0)
        check(f"cross_entropy grad {label}", decode(grad, dtype), want_grad, dtype, loose=2.0)
    prob_cases = [
        ("float32", "warp", False, "mean", True, 0.1),
        ("bfloat16", "block", True, "none", False, 0.0),
        ("float64", "block", False, "sum", True, 0.2),
        ("float16", "warp", True, "mean", False, 0.0),
    ]
    for dtype, shape, aligned, reduction, weighted, eps in prob_cases:
        n_rows = 3 if shape == "warp" else 2
        n_cols = columns(dtype, "warp" if shape == "warp" else "online", aligned)
        x64 = RNG.standard_normal((n_rows, n_cols)) * 3
        x64[0, 3] = -np.inf  # a zero probability target there: 0 * inf is NaN, as in torch
        q64 = np.exp(RNG.standard_normal((n_rows, n_cols)))
        q64 /= q64.sum(1, keepdims=True)
        x, q = encode(x64, dtype), encode(q64, dtype)
        x64, q64 = decode(x, dtype), decode(q, dtype)
        w = RNG.random(n_cols) + 0.5 if weighted else None
        wa = acc_array(w, dtype) if weighted else None
        go64 = RNG.random(n_rows) + 0.5 if reduction == "none" else np.array([1.25])
        go = encode(go64, dtype)
        go64 = decode(go, dtype)
        loss = np.full(n_rows, np.nan, dtype=np.float64 if dtype == "float64" else np.float32)
        out = empty(1, dtype)
        saved = np.full((n_rows + 1, 3), np.nan, dtype=loss.dtype)
        be.cross_entropy_prob(x, q, wa, eps, reduction, loss, out, saved)
        grad = empty(x.shape, dtype)
        be.cross_entropy_prob_backward(x, q, wa, eps, reduction, saved, go, grad)
        w64 = None if w is None else wa.astype(np.float64)
        want_loss, want_grad = ce_prob64(x64, q64, w64, eps, reduction, go64 if reduction == "none" else go64[0])
        got_loss = loss if reduction == "none" else decode(out, dtype)[0]
        label = f"{dtype} {shape} C={n_cols} {reduction} eps={eps}{' weights' if weighted else ''}"
        loss_dtype = "float64" if dtype == "float64" else "float32" if reduction == "none" else dtype
        check(f"cross_entropy prob loss {label}", got_loss, want_loss, loss_dtype, loose=4.0)
        check(f"cross_entropy prob grad {label}", decode(grad, dtype), want_grad, dtype, loose=2.0)


def run_target_check():
    t = np.array([0, 3, -100, 7, 2, 5], dtype=np.int64)
    be.check_targets(t, 8, -100)  # 7 is in range
    t[4] = 8
    try:
        be.check_targets(t, 8, -100)
    except IndexError as error:
        assert "Target 8 is out of bounds" in str(error) and "position 4" in str(error), error
        print(f"ok   target check: {error}", flush=True)
    else:
        print("FAIL target check raised nothing for target 8 of 8 classes")
        sys.exit(1)


def main():
    run_softmax()
    run_cross_entropy()
    run_target_check()
    if "--torch" in sys.argv:
        import cuda_sim_torch

        cuda_sim_torch.main()
    print("all simulator checks passed")


if __name__ == "__main__":
    main()
