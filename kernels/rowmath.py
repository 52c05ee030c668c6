"""Row math shared by the CPU and the CUDA kernels.

Everything here is scalar code over one row of logits ``x`` of length ``C``:

* the running max / sum-of-exponentials pair ``(m, s)`` with
  ``s = sum_j exp(x_j - m)``, updated one element at a time
  (:func:`online_update`) or merged from two partial rows
  (:func:`lse_merge`), so that ``logsumexp(x) = m + log(s)`` never overflows;
* the cross-entropy loss of one row and the coefficients of its gradient,
  written once (:func:`ce_index_loss`, :func:`ce_index_grad_coeffs`).

The functions are plain Python; :mod:`kernels.cpu` compiles them with
``numba.njit`` and :mod:`kernels.cuda` with ``numba.cuda.jit(device=True)``,
so the two targets cannot drift apart.
"""

import math


def online_update(m, s, x):
    """Fold ``x`` into the running pair ``(m, s)``.

    ``m' = max(m, x)``, ``s' = s * exp(m - m') + exp(x - m')``, starting from
    ``(-inf, 0)``. The special values follow the two-pass form
    ``exp(x - max(x))`` exactly, as PyTorch computes it: ``-inf`` adds nothing
    (not ``exp(-inf - -inf)``), while a NaN, or a ``+inf`` (``inf - inf``),
    makes ``s`` NaN.
    """
    if x > m:
        s = s * math.exp(m - x) + 1.0
        m = x
        if x == math.inf:
            s = math.nan
    elif x != -math.inf:
        s = s + math.exp(x - m)
    return m, s


def lse_merge(m_a, s_a, m_b, s_b):
    """Merge two running pairs: the pair of the concatenated rows.

    An empty side is ``(-inf, 0)`` and contributes nothing (no ``-inf - -inf``).
    """
    if m_b > m_a:
        m_a, s_a, m_b, s_b = m_b, s_b, m_a, s_a
    if s_b == 0.0:
        return m_a, s_a
    return m_a, s_a + s_b * math.exp(m_b - m_a)


def ce_index_loss(m, log_s, x_t, w_t, sum_wd, w_sum, eps, n_classes):
    """Cross-entropy of one row with class-index target ``t``.

    With ``lse = m + log(s)``, label smoothing ``eps`` and class weights ``w``
    (``W = sum_c w_c``), PyTorch's loss is

        (1 - eps) * w_t * (lse - x_t)  +  eps / C * sum_c w_c * (lse - x_c).

    ``lse - x_c`` is formed as ``(m - x_c) + log(s)`` so that large logits do not
    cancel: ``sum_wd = sum_c w_c * (m - x_c)`` is accumulated by the caller.
    """
    loss = (1.0 - eps) * w_t * ((m - x_t) + log_s)
    if eps > 0.0:
        loss += eps / n_classes * (sum_wd + w_sum * log_s)
    return loss


def ce_index_grad_coeffs(s, w_t, w_sum, eps, n_classes, scale):
    """Coefficients of the gradient of :func:`ce_index_loss`.

    ``d loss / d x_j = A * p_j - eps / C * w_j - (1 - eps) * w_t * [j == t]``
    with ``p_j = exp(x_j - m) / s`` and ``A = (1 - eps) * w_t + eps / C * W``.
    Returns ``(A * scale / s, eps / C * scale, (1 - eps) * w_t * scale)``: the
    factor of ``exp(x_j - m)``, of ``w_j`` and of the one-hot term.
    """
    a = (1.0 - eps) * w_t + eps / n_classes * w_sum
    return a * scale / s, eps / n_classes * scale, (1.0 - eps) * w_t * scale
