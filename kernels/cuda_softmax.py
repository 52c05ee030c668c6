r"""Softmax and log-softmax kernels, forward and backward, over the rows of C-contiguous 2-D arrays.

With :math:`m = \max_j x_j` and :math:`s = \sum_j e^{x_j - m}`:

.. math::

    y_j = e^{x_j - m} / s, \qquad \log y_j = (x_j - m) - \log s,

    \partial x = y \odot (\partial y - \langle \partial y, y \rangle) \;\text{(softmax)}, \qquad
    \partial x = \partial y - e^{y} \textstyle\sum_k \partial y_k \;\text{(log-softmax, from its output } y).

Three launch shapes, chosen by :func:`kernels.cuda.softmax_plan` from the row length:

* ``warp``: one warp per row, four rows per 128-thread block; each lane
  keeps ``items`` chunks of the row in registers.
* ``block``: one block per row, up to 1024 threads, each keeping ``items``
  chunks in registers. Forward and backward move the bytes that must move:
  one read and one write (forward), two reads and one write (backward).
* ``online``: one block of 1024 threads per row for rows too long for the
  registers. The forward folds the row into each thread's running
  :math:`(m, s)` in one read, merges them, and reads the row again to write
  the output; the backward reads ``dy`` twice and ``y`` once (log-softmax:
  3 reads + 1 write) or twice (softmax: 4 reads + 1 write).

``items`` (chunks per thread) is a compile-time constant of each kernel, so
the loops over them unroll and the row stays in registers. Each exponential
is taken once per element per pass over memory; the forward keeps
:math:`e^{x_j - m}` in registers between the sum and the write.
"""

from numba import cuda
from numba.cuda.types import boolean, void

from .cuda_codec import SHORT, codec
from .cuda_intrinsics import sign_word
from .cuda_reduce import MAX_WARPS, WARP, reducers, warp_row

#: Chunks per thread kept in registers, by (direction, shape, dtype, log).
#: Forward: ``items * vec`` values of the accumulation type, 32 registers
#: (float64 warp kernels: 8 values, 16 registers). Backward: ``y`` and
#: ``dy`` as raw chunks (half-precision values two to a register), 32
#: registers for both in a warp kernel. Register budgets
#: (:func:`kernels.cuda.launch_bounds`): 128 a thread for the warp kernels,
#: 64 for the 1024-thread block kernels; where the warp kernel's count
#: spills there (ptxas's reports, gated offline), the block kernel keeps
#: fewer chunks.
ITEMS = {}
for _dtype, _fwd_warp, _fwd_block, _log_fwd_block, _bwd_block, _log_bwd_block in (
    ("float32", 8, 8, 6, 4, 4),
    ("float64", 4, 8, 7, 4, 3),
    ("float16", 4, 4, 4, 4, 4),
    ("bfloat16", 4, 4, 4, 4, 4),
):
    for _log in (False, True):
        ITEMS["fwd", "warp", _dtype, _log] = _fwd_warp
        ITEMS["bwd", "warp", _dtype, _log] = 4
    ITEMS["fwd", "block", _dtype, False] = _fwd_block
    ITEMS["fwd", "block", _dtype, True] = _log_fwd_block
    ITEMS["bwd", "block", _dtype, False] = _bwd_block
    ITEMS["bwd", "block", _dtype, True] = _log_bwd_block
del _dtype, _fwd_warp, _fwd_block, _log_fwd_block, _bwd_block, _log_bwd_block, _log

#: Threads per block: warp-per-row kernels run four rows a block, the others
#: up to ``MAX_THREADS`` per row. These are also the kernels' launch bounds,
#: so their register budgets (:func:`kernels.cuda.launch_bounds`).
WARP_BLOCK = 128
MAX_THREADS = 1024

#: Chunks each thread of an online kernel loads before using any: loads in flight.
UNROLL = 2


def _signature(dtype: str, n_arrays: int):
    mat = codec(dtype).storage[:, ::1]
    return void(*([mat] * n_arrays), boolean)


def _named(kernel, name: str):
    """Give a kernel its profiler name (the entry point's name is built from ``__qualname__``)."""
    kernel.__name__ = kernel.__qualname__ = name
    return kernel


def kernel_name(op: str, direction: str, dtype: str, shape: str, cap: int) -> str:
    """``softmax_fwd_f32_warp_c1024``: op, direction, dtype, launch shape and the longest row it takes."""
    return f"{op}_{direction}_{SHORT[dtype]}_{shape}" + (f"_c{cap}" if shape != "online" else "")


def capacity(dtype: str, log: bool, shape: str, backward: bool) -> int:
    """The longest row (columns) a ``warp`` or ``block`` kernel keeps in registers."""
    items = ITEMS["bwd" if backward else "fwd", shape, dtype, log]
    threads = WARP if shape == "warp" else MAX_THREADS
    return threads * items * codec(dtype).vec


def forward(dtype: str, log: bool, shape: str):
    """``(name, pyfunc, signature, max_threads)`` of the forward kernel ``(x, y, aligned)``."""
    if shape == "online":
        return _forward_online(dtype, log)
    cd, rd = codec(dtype), reducers(dtype)
    acc, vec, exp, log_ = cd.acc, cd.vec, cd.exp, cd.log
    load, store = cd.load, cd.store
    items = ITEMS["fwd", shape, dtype, log]
    n_vals = items * vec
    neg_inf, zero, one = rd.neg_inf, rd.zero, acc(1.0)
    max_ = rd.max_
    per_warp = shape == "warp"
    warp_max, warp_sum, block_max, block_sum = rd.warp_max, rd.warp_sum, rd.block_max, rd.block_sum

    def kernel(x, y, aligned):
        n_rows, n_cols = x.shape
        if per_warp:
            lane, r, active = warp_row(n_rows)
            if not active:
                return
            group = WARP
        else:
            lane = cuda.threadIdx.x
            r = cuda.blockIdx.x
            group = cuda.blockDim.x
        sm = cuda.shared.array(MAX_WARPS, acc)
        xr = x[r]
        n_chunks = (n_cols + vec - 1) // vec
        vals = cuda.local.array(n_vals, acc)
        m = neg_inf
        for k in range(items):
            c = lane + k * group
            if c < n_chunks:
                load(xr, c, n_cols, aligned, neg_inf, vals, k * vec)
            else:
                for e in range(vec):
                    vals[k * vec + e] = neg_inf
            for e in range(vec):
                m = max_(m, vals[k * vec + e])
        m = warp_max(m) if per_warp else block_max(m, sm)
        s = zero
        if log:
            for i in range(n_vals):
                d = vals[i] - m
                vals[i] = d
                s += exp(d)
        else:
            for i in range(n_vals):
                p = exp(vals[i] - m)
                vals[i] = p
                s += p
        s = warp_sum(s) if per_warp else block_sum(s, sm)
        if log:
            log_s = log_(s)
            for i in range(n_vals):
                vals[i] = vals[i] - log_s
        else:
            inv = one / s
            for i in range(n_vals):
                vals[i] = vals[i] * inv
        yr = y[r]
        for k in range(items):
            c = lane + k * group
            if c < n_chunks:
                store(yr, c, n_cols, aligned, vals, k * vec)

    op = "log_softmax" if log else "softmax"
    name = kernel_name(op, "fwd", dtype, shape, capacity(dtype, log, shape, False))
    return name, _named(kernel, name), _signature(dtype, 2), WARP_BLOCK if per_warp else MAX_THREADS


def _forward_online(dtype: str, log: bool):
    cd, rd = codec(dtype), reducers(dtype)
    acc, vec, exp, log_ = cd.acc, cd.vec, cd.exp, cd.log
    load, store = cd.load, cd.store
    neg_inf, zero, one = rd.neg_inf, rd.zero, acc(1.0)
    max_, block_lse = rd.max_, rd.block_lse
    n_buf = UNROLL * vec

    def kernel(x, y, aligned):
        n_rows, n_cols = x.shape
        r = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        group = cuda.blockDim.x
        sm_m = cuda.shared.array(MAX_WARPS, acc)
        sm_s = cuda.shared.array(MAX_WARPS, acc)
        xr = x[r]
        yr = y[r]
        n_chunks = (n_cols + vec - 1) // vec
        buf = cuda.local.array(n_buf, acc)
        m = neg_inf
        s = zero
        for c0 in range(tid, n_chunks, UNROLL * group):
            for u in range(UNROLL):
                c = c0 + u * group
                if c < n_chunks:
                    load(xr, c, n_cols, aligned, neg_inf, buf, u * vec)
                else:
                    for e in range(vec):
                        buf[u * vec + e] = neg_inf
            for u in range(UNROLL):
                cm = buf[u * vec]
                for e in range(1, vec):
                    cm = max_(cm, buf[u * vec + e])
                if cm > m:
                    s = s * exp(m - cm)
                    m = cm
                for e in range(vec):
                    v = buf[u * vec + e]
                    if v != neg_inf:  # no exp(-inf - -inf) while m is still -inf
                        s += exp(v - m)
        m, s = block_lse(m, s, sm_m, sm_s)
        shift = log_(s) if log else zero
        inv = one / s
        for c in range(tid, n_chunks, group):
            load(xr, c, n_cols, aligned, neg_inf, buf, 0)
            for e in range(vec):
                if log:
                    buf[e] = (buf[e] - m) - shift
                else:
                    buf[e] = exp(buf[e] - m) * inv
            store(yr, c, n_cols, aligned, buf, 0)

    name = kernel_name("log_softmax" if log else "softmax", "fwd", dtype, "online", 0)
    return name, _named(kernel, name), _signature(dtype, 2), MAX_THREADS


def backward(dtype: str, log: bool, shape: str):
    """``(name, pyfunc, signature, max_threads)`` of the backward kernel ``(y, dy, dx, aligned)``."""
    if shape == "online":
        return _backward_online(dtype, log)
    cd, rd = codec(dtype), reducers(dtype)
    acc, vec, exp = cd.acc, cd.vec, cd.exp
    store, load_raw, raw_value = cd.store, cd.load_raw, cd.raw_value
    items = ITEMS["bwd", shape, dtype, log]
    raw = cd.raw_per_chunk
    zero = rd.zero
    per_warp = shape == "warp"
    warp_sum, block_sum = rd.warp_sum, rd.block_sum
    raw_type, raw_zero = cd.raw_type, cd.raw_type(0)
    n_raw = items * raw
    # Half precision keeps two values to a word, and the sum decodes both
    # operands. ptxas then keeps those decoded floats for the second loop
    # instead of decoding the words again: 64 floats held across the
    # reduction instead of 32 words, and the 1024-thread kernels spill at
    # their 64 registers. Or-ing dy's words with a zero neither compiler can
    # see (sign_word of the row length) after the reduction makes them new
    # values there, which ptxas decodes again.
    halves = raw != vec

    def kernel(y, dy, dx, aligned):
        n_rows, n_cols = y.shape
        if per_warp:
            lane, r, active = warp_row(n_rows)
            if not active:
                return
            group = WARP
        else:
            lane = cuda.threadIdx.x
            r = cuda.blockIdx.x
            group = cuda.blockDim.x
        sm = cuda.shared.array(MAX_WARPS, acc)
        yr = y[r]
        dyr = dy[r]
        n_chunks = (n_cols + vec - 1) // vec
        ys = cuda.local.array(n_raw, raw_type)
        gs = cuda.local.array(n_raw, raw_type)
        t = zero
        for k in range(items):
            c = lane + k * group
            if c < n_chunks:
                load_raw(yr, c, n_cols, aligned, raw_zero, ys, k * raw)
                load_raw(dyr, c, n_cols, aligned, raw_zero, gs, k * raw)
            else:
                for i in range(raw):
                    ys[k * raw + i] = raw_zero
                    gs[k * raw + i] = raw_zero
            for e in range(vec):
                g = raw_value(gs, k * raw, e)
                t += g if log else g * raw_value(ys, k * raw, e)
        t = warp_sum(t) if per_warp else block_sum(t, sm)
        if halves:
            word_zero = sign_word(n_cols)  # 0: a row length is never negative
            for i in range(n_raw):
                gs[i] = gs[i] | word_zero
        out = cuda.local.array(vec, acc)
        dxr = dx[r]
        for k in range(items):
            c = lane + k * group
            if c < n_chunks:
                for e in range(vec):
                    yv = raw_value(ys, k * raw, e)
                    g = raw_value(gs, k * raw, e)
                    out[e] = g - exp(yv) * t if log else yv * (g - t)
                store(dxr, c, n_cols, aligned, out, 0)

    op = "log_softmax" if log else "softmax"
    name = kernel_name(op, "bwd", dtype, shape, capacity(dtype, log, shape, True))
    return name, _named(kernel, name), _signature(dtype, 3), WARP_BLOCK if per_warp else MAX_THREADS


def _backward_online(dtype: str, log: bool):
    cd, rd = codec(dtype), reducers(dtype)
    acc, vec, exp = cd.acc, cd.vec, cd.exp
    load, store = cd.load, cd.store
    zero = rd.zero
    block_sum = rd.block_sum
    n_buf = UNROLL * vec

    def kernel(y, dy, dx, aligned):
        n_rows, n_cols = y.shape
        r = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        group = cuda.blockDim.x
        sm = cuda.shared.array(MAX_WARPS, acc)
        yr = y[r]
        dyr = dy[r]
        dxr = dx[r]
        n_chunks = (n_cols + vec - 1) // vec
        ys = cuda.local.array(n_buf, acc)
        gs = cuda.local.array(n_buf, acc)
        t = zero
        for c0 in range(tid, n_chunks, UNROLL * group):
            for u in range(UNROLL):
                c = c0 + u * group
                if c < n_chunks:
                    load(dyr, c, n_cols, aligned, zero, gs, u * vec)
                    if not log:
                        load(yr, c, n_cols, aligned, zero, ys, u * vec)
                else:
                    for e in range(vec):
                        gs[u * vec + e] = zero
                        ys[u * vec + e] = zero
            for i in range(UNROLL * vec):
                t += gs[i] if log else gs[i] * ys[i]
        t = block_sum(t, sm)
        for c in range(tid, n_chunks, group):
            load(yr, c, n_cols, aligned, zero, ys, 0)
            load(dyr, c, n_cols, aligned, zero, gs, 0)
            for e in range(vec):
                ys[e] = gs[e] - exp(ys[e]) * t if log else ys[e] * (gs[e] - t)
            store(dxr, c, n_cols, aligned, ys, 0)

    name = kernel_name("log_softmax" if log else "softmax", "bwd", dtype, "online", 0)
    return name, _named(kernel, name), _signature(dtype, 3), MAX_THREADS
