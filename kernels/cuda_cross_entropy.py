r"""Softmax cross-entropy kernels: the forward saves per-row statistics, the backward rebuilds the gradient.

For a row :math:`x` of :math:`C` logits with :math:`m = \max_c x_c`,
:math:`s = \sum_c e^{x_c - m}` and coefficients :math:`a_c` (class-index
target :math:`t`: :math:`a_c = (1 - \varepsilon) w_t [c = t] + \varepsilon w_c / C`;
class probabilities :math:`q`: :math:`a_c = w_c ((1 - \varepsilon) q_c + \varepsilon / C)`),
with :math:`A = \sum_c a_c`:

.. math::

    \ell = \sum_c a_c (\mathrm{lse} - x_c) = \sum_c a_c (m - x_c) + A \log s,
    \qquad
    \frac{\partial \ell}{\partial x_c} = A \frac{e^{x_c - m}}{s} - a_c .

The design moves each byte of the logits the fewest times a backward that
reads ``grad_output`` on the device allows: the forward reads the row once
(one pass: a running :math:`(m, s)` per thread, merged across the row) and
writes only the loss and :math:`(m, s, A)`; the backward reads the row once
more and writes the gradient, scaled by ``grad_output`` (and the mean's
denominator) read on the device. Nothing of size N x C is kept between the
two, and no pass scales a saved gradient.

The smoothing sum :math:`\sum_c w_c (m - x_c)` is accumulated in the same
pass as :math:`s`, against each thread's running max: when it rises by
:math:`\delta`, the sum so far grows by :math:`\delta` times the weight of
the finite elements seen. Every term is thus formed as :math:`m - x_c`
(never :math:`m W - \sum w_c x_c`, which cancels catastrophically for large
logits). A ``-inf`` logit adds :math:`w_c \cdot \infty` (the loss is then
infinite, or NaN for a zero weight, as in PyTorch).

NaN placement follows PyTorch: an ignored row gets loss 0 and a zero
gradient, unless its log-softmax is NaN (a NaN or ``+inf`` logit, or only
``-inf``: :math:`s` is NaN or 0), which makes its gradient NaN; a target
outside ``[0, C)`` that is not ``ignore_index`` gives NaN (never an
out-of-bounds read); a mean over kept targets of total weight 0 is NaN,
loss and gradient of the kept rows.

Launch shapes: ``warp`` (a warp per row, four rows per 128-thread block)
for short rows, ``block`` (a block per row, threads chosen by the host) for
the others. Two one-block kernels finish the job (:mod:`.cuda_ce_finish`):
one reduces the per-row losses (and the mean's denominator, into the last
row of ``saved``), the other finds the first bad class index.
"""

import math

from numba import cuda
from numba.cuda.types import boolean, int64, void

from .cuda_codec import SHORT, codec
from .cuda_reduce import FULL_MASK, MAX_WARPS, WARP, device, reducers, warp_row
from .cuda_softmax import UNROLL, WARP_BLOCK, _named

#: ``mode`` argument of the backward and :func:`finish` kernels.
NONE, SUM, MEAN = 0, 1, 2

#: Columns of ``saved`` per row: ``m``, ``s``, ``A``. Its last row holds the
#: mean's denominator in column 0.
SAVED_COLUMNS = 3


def _state_ops(dtype: str):
    """Device functions merging the running state ``(m, s, t, f, a)`` of two parts of a row.

    ``t`` is the weighted sum of ``m - x_c`` over the part, ``f`` the weight
    of its finite elements (what ``t`` grows by per unit rise of ``m``) and
    ``a`` the weight of all of them.
    """
    cd, rd = codec(dtype), reducers(dtype)
    exp, neg_inf = cd.exp, rd.neg_inf

    @device
    def merge(m1, s1, t1, f1, a1, m2, s2, t2, f2, a2):
        if m2 > m1:
            m1, s1, t1, f1, m2, s2, t2, f2 = m2, s2, t2, f2, m1, s1, t1, f1
        if m2 == neg_inf:  # nothing finite on that side: nothing to shift
            return m1, s1 + s2, t1 + t2, f1 + f2, a1 + a2
        return m1, s1 + s2 * exp(m2 - m1), t1 + t2 + f2 * (m1 - m2), f1 + f2, a1 + a2

    @device
    def warp_merge(m, s, t, f, a):
        offset = WARP // 2
        while offset > 0:
            m2 = cuda.shfl_xor_sync(FULL_MASK, m, offset)
            s2 = cuda.shfl_xor_sync(FULL_MASK, s, offset)
            t2 = cuda.shfl_xor_sync(FULL_MASK, t, offset)
            f2 = cuda.shfl_xor_sync(FULL_MASK, f, offset)
            a2 = cuda.shfl_xor_sync(FULL_MASK, a, offset)
            m, s, t, f, a = merge(m, s, t, f, a, m2, s2, t2, f2, a2)
            offset //= 2
        return m, s, t, f, a

    @device
    def block_merge(m, s, t, f, a, sm):
        m, s, t, f, a = warp_merge(m, s, t, f, a)
        tid = cuda.threadIdx.x
        cuda.syncthreads()
        if tid % WARP == 0:
            w = tid // WARP
            sm[0, w] = m
            sm[1, w] = s
            sm[2, w] = t
            sm[3, w] = f
            sm[4, w] = a
        cuda.syncthreads()
        m, s, t, f, a = sm[0, 0], sm[1, 0], sm[2, 0], sm[3, 0], sm[4, 0]
        for w in range(1, cuda.blockDim.x // WARP):
            m, s, t, f, a = merge(m, s, t, f, a, sm[0, w], sm[1, w], sm[2, w], sm[3, w], sm[4, w])
        return m, s, t, f, a

    return warp_merge, block_merge


@device
def clear_last_row(saved, n_rows):
    """Zero the row after the statistics: :func:`finish` puts the mean's denominator there, and an op's outputs are never left unwritten."""
    for k in range(SAVED_COLUMNS):
        saved[n_rows, k] = 0


def _name(op: str, dtype: str, shape: str) -> str:
    return f"{op}_{SHORT[dtype]}_{shape}"


#: Most threads of a ``block`` kernel: 512 leaves up to 128 registers a
#: thread for the running state, two chunks of logits, targets or weights in
#: flight, and the unpacked half-precision values.
BLOCK_THREADS = 512


def _max_threads(shape: str) -> int:
    return WARP_BLOCK if shape == "warp" else BLOCK_THREADS


def forward_index(dtype: str, shape: str):
    """``(name, pyfunc, signature, max_threads)`` of the class-index forward.

    Kernel ``(x, target, weight, has_w, ignore_index, eps, loss, saved, aligned)``:
    ``x`` (R, C) logits, ``target`` (R,) int64, ``weight`` (C,) in the
    accumulation type (read only if ``has_w``), ``eps`` the label smoothing.
    Writes ``loss[r]`` (unreduced, accumulation type) and ``saved[r] = (m, s, A)``.
    """
    cd, rd = codec(dtype), reducers(dtype)
    acc, vec, exp, log, load, load_acc, get = cd.acc, cd.vec, cd.exp, cd.log, cd.load, cd.load_acc, cd.get
    neg_inf, zero, one, inf, nan = rd.neg_inf, rd.zero, acc(1.0), acc(math.inf), acc(math.nan)
    max_, warp_lse, block_lse = rd.max_, rd.warp_lse, rd.block_lse
    warp_merge, block_merge = _state_ops(dtype)
    per_warp = shape == "warp"
    n_buf = UNROLL * vec

    def kernel(x, target, weight, has_w, ignore_index, eps, loss, saved, aligned):
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
        sm = cuda.shared.array((5, MAX_WARPS), acc)
        xr = x[r]
        n_chunks = (n_cols + vec - 1) // vec
        smooth = eps > zero
        xs = cuda.local.array(n_buf, acc)
        ws = cuda.local.array(n_buf, acc)
        m, s, t, f, a = neg_inf, zero, zero, zero, zero
        for c0 in range(lane, n_chunks, UNROLL * group):
            for u in range(UNROLL):
                c = c0 + u * group
                if c < n_chunks:
                    load(xr, c, n_cols, aligned, neg_inf, xs, u * vec)
                    if smooth and has_w:
                        load_acc(weight, c, n_cols, aligned, zero, ws, u * vec)
                else:
                    for e in range(vec):
                        xs[u * vec + e] = neg_inf
            for u in range(UNROLL):
                c = c0 + u * group
                cm = xs[u * vec]
                for e in range(1, vec):
                    cm = max_(cm, xs[u * vec + e])
                if cm > m:
                    if smooth and m != neg_inf:
                        t += f * (cm - m)
                    s = s * exp(m - cm)
                    m = cm
                for e in range(vec):
                    v = xs[u * vec + e]
                    if v != neg_inf:
                        s += exp(v - m)
                    if smooth and c * vec + e < n_cols:
                        w = ws[u * vec + e] if has_w else one
                        a += w
                        if v == neg_inf:
                            t += w * inf
                        else:
                            t += w * (m - v)
                            f += w
        if smooth:
            if per_warp:
                m, s, t, f, a = warp_merge(m, s, t, f, a)
            else:
                m, s, t, f, a = block_merge(m, s, t, f, a, sm)
        elif per_warp:
            m, s = warp_lse(m, s)
        else:
            m, s = block_lse(m, s, sm[0], sm[1])
        if lane == 0:
            tr = target[r]
            ignored = tr == ignore_index
            valid = tr >= 0 and tr < n_cols
            big_a = zero
            if ignored:
                out = zero
            elif not valid:
                out = nan
            else:
                w_t = weight[tr] if has_w else one
                log_s = log(s)
                out = w_t * ((m - get(xr, tr)) + log_s)
                big_a = w_t
                if smooth:
                    spread = eps / acc(n_cols)
                    out = (one - eps) * out + spread * (t + a * log_s)
                    big_a = (one - eps) * w_t + spread * a
            loss[r] = out
            saved[r, 0] = m
            saved[r, 1] = s
            saved[r, 2] = big_a
            if r == 0:
                clear_last_row(saved, n_rows)

    name = _name("ce_fwd", dtype, shape)
    mat, acc_vec = cd.storage[:, ::1], acc[::1]
    sig = void(mat, int64[::1], acc_vec, boolean, int64, acc, acc_vec, acc[:, ::1], boolean)
    return name, _named(kernel, name), sig, _max_threads(shape)


def backward_index(dtype: str, shape: str):
    """``(name, pyfunc, signature, max_threads)`` of the class-index backward.

    Kernel ``(x, target, weight, has_w, ignore_index, eps, mode, saved, grad_out, grad, aligned)``:
    ``grad[r, c] = g * (A e^{x_c - m} / s - eps w_c / C - (1 - eps) w_t [c = t])``
    with ``g = grad_out[r]`` (``mode`` :data:`NONE`), ``grad_out[0]``
    (:data:`SUM`) or ``grad_out[0] / saved[R, 0]`` (:data:`MEAN`).
    """
    cd, rd = codec(dtype), reducers(dtype)
    acc, vec, exp, load, store, load_acc, get = cd.acc, cd.vec, cd.exp, cd.load, cd.store, cd.load_acc, cd.get
    neg_inf, zero, one, nan = rd.neg_inf, rd.zero, acc(1.0), acc(math.nan)
    per_warp = shape == "warp"
    n_buf = UNROLL * vec

    def kernel(x, target, weight, has_w, ignore_index, eps, mode, saved, grad_out, grad, aligned):
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
        xr = x[r]
        gr = grad[r]
        n_chunks = (n_cols + vec - 1) // vec
        m = saved[r, 0]
        s = saved[r, 1]
        big_a = saved[r, 2]
        tr = target[r]
        ignored = tr == ignore_index
        valid = tr >= 0 and tr < n_cols
        if mode == NONE:
            g = get(grad_out, r)
        else:
            g = get(grad_out, 0)
        if mode == MEAN:
            denom = saved[n_rows, 0]
            g = g / denom if denom != zero else nan
        # a whole row of one value: 0 (ignored), NaN (ignored but its log-softmax is NaN, or a bad target)
        fill = ignored or not valid
        fill_value = zero if ignored and s > zero else nan
        w_t = weight[tr] if has_w and valid and not ignored else one
        k_exp = g * big_a / s
        k_w = g * (eps / acc(n_cols))
        k_hot = g * (one - eps) * w_t
        xs = cuda.local.array(n_buf, acc)
        ws = cuda.local.array(n_buf, acc)
        for c0 in range(lane, n_chunks, UNROLL * group):
            if fill:
                for i in range(n_buf):
                    xs[i] = fill_value
            else:
                for u in range(UNROLL):
                    c = c0 + u * group
                    if c < n_chunks:
                        load(xr, c, n_cols, aligned, neg_inf, xs, u * vec)
                        if has_w:
                            load_acc(weight, c, n_cols, aligned, zero, ws, u * vec)
                for u in range(UNROLL):
                    c = c0 + u * group
                    for e in range(vec):
                        i = u * vec + e
                        w = ws[i] if has_w else one
                        v = k_exp * exp(xs[i] - m) - k_w * w
                        if c * vec + e == tr:
                            v -= k_hot
                        xs[i] = v
            for u in range(UNROLL):
                c = c0 + u * group
                if c < n_chunks:
                    store(gr, c, n_cols, aligned, xs, u * vec)

    name = _name("ce_bwd", dtype, shape)
    mat, acc_vec = cd.storage[:, ::1], acc[::1]
    sig = void(mat, int64[::1], acc_vec, boolean, int64, acc, int64, acc[:, ::1], cd.storage[::1], mat, boolean)
    return name, _named(kernel, name), sig, _max_threads(shape)


def forward_prob(dtype: str, shape: str):
    """``(name, pyfunc, signature, max_threads)`` of the class-probability forward.

    Kernel ``(x, q, weight, has_w, eps, loss, saved, aligned)``: ``q`` (R, C)
    probabilities in ``x``'s dtype. Writes ``loss[r]`` and ``saved[r] = (m, s, A)``.
    """
    cd, rd = codec(dtype), reducers(dtype)
    acc, vec, exp, log, load, load_acc = cd.acc, cd.vec, cd.exp, cd.log, cd.load, cd.load_acc
    neg_inf, zero, one, inf = rd.neg_inf, rd.zero, acc(1.0), acc(math.inf)
    max_ = rd.max_
    warp_merge, block_merge = _state_ops(dtype)
    per_warp = shape == "warp"
    n_buf = UNROLL * vec

    def kernel(x, q, weight, has_w, eps, loss, saved, aligned):
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
        sm = cuda.shared.array((5, MAX_WARPS), acc)
        xr = x[r]
        qr = q[r]
        n_chunks = (n_cols + vec - 1) // vec
        keep = one - eps
        spread = eps / acc(n_cols)
        xs = cuda.local.array(n_buf, acc)
        qs = cuda.local.array(n_buf, acc)
        ws = cuda.local.array(n_buf, acc)
        m, s, t, f, a = neg_inf, zero, zero, zero, zero
        for c0 in range(lane, n_chunks, UNROLL * group):
            for u in range(UNROLL):
                c = c0 + u * group
                if c < n_chunks:
                    load(xr, c, n_cols, aligned, neg_inf, xs, u * vec)
                    load(qr, c, n_cols, aligned, zero, qs, u * vec)
                    if has_w:
                        load_acc(weight, c, n_cols, aligned, zero, ws, u * vec)
                else:
                    for e in range(vec):
                        xs[u * vec + e] = neg_inf
            for u in range(UNROLL):
                c = c0 + u * group
                cm = xs[u * vec]
                for e in range(1, vec):
                    cm = max_(cm, xs[u * vec + e])
                if cm > m:
                    if m != neg_inf:
                        t += f * (cm - m)
                    s = s * exp(m - cm)
                    m = cm
                for e in range(vec):
                    i = u * vec + e
                    v = xs[i]
                    if v != neg_inf:
                        s += exp(v - m)
                    if c * vec + e < n_cols:
                        w = keep * qs[i] + spread
                        if has_w:
                            w *= ws[i]
                        a += w
                        if v == neg_inf:
                            t += w * inf
                        else:
                            t += w * (m - v)
                            f += w
        if per_warp:
            m, s, t, f, a = warp_merge(m, s, t, f, a)
        else:
            m, s, t, f, a = block_merge(m, s, t, f, a, sm)
        if lane == 0:
            loss[r] = t + a * log(s)
            saved[r, 0] = m
            saved[r, 1] = s
            saved[r, 2] = a
            if r == 0:
                clear_last_row(saved, n_rows)

    name = _name("ce_prob_fwd", dtype, shape)
    mat, acc_vec = cd.storage[:, ::1], acc[::1]
    sig = void(mat, mat, acc_vec, boolean, acc, acc_vec, acc[:, ::1], boolean)
    return name, _named(kernel, name), sig, _max_threads(shape)


def backward_prob(dtype: str, shape: str):
    """``(name, pyfunc, signature, max_threads)`` of the class-probability backward.

    Kernel ``(x, q, weight, has_w, eps, mode, saved, grad_out, grad, aligned)``:
    ``grad[r, c] = g * (A e^{x_c - m} / s - w_c ((1 - eps) q_c + eps / C))``,
    ``g`` as in :func:`backward_index` with the mean over rows.
    """
    cd, rd = codec(dtype), reducers(dtype)
    acc, vec, exp, load, store, load_acc, get = cd.acc, cd.vec, cd.exp, cd.load, cd.store, cd.load_acc, cd.get
    neg_inf, zero, one = rd.neg_inf, rd.zero, acc(1.0)
    per_warp = shape == "warp"
    n_buf = UNROLL * vec

    def kernel(x, q, weight, has_w, eps, mode, saved, grad_out, grad, aligned):
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
        xr = x[r]
        qr = q[r]
        gr = grad[r]
        n_chunks = (n_cols + vec - 1) // vec
        m = saved[r, 0]
        s = saved[r, 1]
        big_a = saved[r, 2]
        if mode == NONE:
            g = get(grad_out, r)
        else:
            g = get(grad_out, 0)
        if mode == MEAN:
            g = g / acc(n_rows)
        k_exp = g * big_a / s
        k_keep = g * (one - eps)
        k_spread = g * (eps / acc(n_cols))
        xs = cuda.local.array(n_buf, acc)
        qs = cuda.local.array(n_buf, acc)
        ws = cuda.local.array(n_buf, acc)
        for c0 in range(lane, n_chunks, UNROLL * group):
            for u in range(UNROLL):
                c = c0 + u * group
                if c < n_chunks:
                    load(xr, c, n_cols, aligned, neg_inf, xs, u * vec)
                    load(qr, c, n_cols, aligned, zero, qs, u * vec)
                    if has_w:
                        load_acc(weight, c, n_cols, aligned, zero, ws, u * vec)
            for i in range(n_buf):
                coef = k_keep * qs[i] + k_spread
                if has_w:
                    coef *= ws[i]
                xs[i] = k_exp * exp(xs[i] - m) - coef
            for u in range(UNROLL):
                c = c0 + u * group
                if c < n_chunks:
                    store(gr, c, n_cols, aligned, xs, u * vec)

    name = _name("ce_prob_bwd", dtype, shape)
    mat, acc_vec = cd.storage[:, ::1], acc[::1]
    sig = void(mat, mat, acc_vec, boolean, acc, int64, acc[:, ::1], cd.storage[::1], mat, boolean)
    return name, _named(kernel, name), sig, _max_threads(shape)
