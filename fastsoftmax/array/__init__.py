r"""The kernels for NumPy and CuPy arrays, with no PyTorch in the way.

``softmax``, ``log_softmax`` and ``logsumexp`` take SciPy's arguments
(:mod:`scipy.special`: ``axis`` an int, a tuple of ints or None for every
axis, ``b=``, ``keepdims=``, ``return_sign=``) and give SciPy's results,
NaN and infinities included; ``out=`` writes a forward's result into a given
array. SciPy has no backward; these do, and a fused cross-entropy that
returns its gradient from the same pass::

    import numpy as np
    import fastsoftmax.array as fa

    p = fa.softmax(x, axis=-1)
    lse = fa.logsumexp(x, axis=-1)
    loss, grad = fa.cross_entropy(x, target, label_smoothing=0.1, return_grad=True)

With :math:`m = \max_j x_j` and :math:`s = \sum_j e^{x_j - m}` along the
reduced axes (every exponent :math:`\le 0`, so nothing overflows):

.. math::

    \mathrm{softmax}(x)_j = e^{x_j - m} / s, \qquad
    \mathrm{log\_softmax}(x)_j = (x_j - m) - \log s, \qquad
    \mathrm{logsumexp}(x) = m + \log s.

NumPy arrays run the CPU kernels, CuPy arrays the CUDA kernels (on CuPy's
current stream, outputs allocated by CuPy), and any other array with
``__dlpack__`` (JAX, PyTorch) goes through DLPack and comes back as its own
kind (see :mod:`._devices`). float32 and float64 are computed as they are;
float16 (and ml_dtypes' bfloat16) in float32 on the CPU, a chunk of rows at
a time, and returned in their own dtype. Importing this module and using it
on NumPy arrays imports no torch.

Where these differ from SciPy: integer and complex inputs raise
(:class:`~fastsoftmax.errors.UnsupportedDTypeError`, as the torch API does)
instead of being computed in float64; a softmax over an axis of length 0
returns an empty array (SciPy raises); a weighted sum that cancels to
exactly 0 gives ``-inf`` (sign 0), where SciPy's unshifted recomputation may
give NaN; on CUDA arrays a log-softmax slice holding ``+inf`` is NaN
throughout. Results are laid out like the input where that is dense (as
NumPy's elementwise functions lay them out), and large NumPy outputs come
from a pool (:func:`empty_cache` releases it).
"""

import numpy as np

from .. import errors
from ..backends import pool as _pool
from . import _devices
from ._checks import as_axes, check_float, check_out, check_pair, is_float_dtype
from ._cross_entropy import cross_entropy
from ._layout import Layout

__all__ = [
    "softmax",
    "log_softmax",
    "logsumexp",
    "softmax_backward",
    "log_softmax_backward",
    "cross_entropy",
    "empty_cache",
]


def _take_out(dev, out, shape, dtype, fn: str):
    if out is None:
        return None
    arr = dev.take_other(out, "out", fn)
    check_out(arr, shape, dtype, fn)
    return arr


def _compute_into(dev, lay: Layout, out_arr, like, kernel, ins_k, extra):
    """Run a softmax-shaped kernel on the kernel-shaped inputs ``ins_k`` into ``out_arr`` or a new array.

    The kernels write into ``out_arr`` itself when its layout allows and it
    shares no memory with an input; otherwise into a new array (of
    ``like``'s dtype), then copied. Returns the kernel-shaped output and
    whether it is a view of ``out_arr``.
    """
    direct = None
    if out_arr is not None and not any(dev.xp.may_share_memory(out_arr, a) for a in ins_k):
        direct = lay.out_view(out_arr)
    yk = direct if direct is not None else dev.empty(lay.shape, like.dtype)
    dev.run(kernel, ins_k, [yk], *extra)
    return yk, direct is not None


def _finish(dev, taken, lay, yk, wrote_out, out, out_arr):
    if out is not None:
        if not wrote_out:
            dev.xp.copyto(out_arr, lay.back(yk))
        return out
    return _devices.give_back(taken, lay.back(yk))


def _softmax(x, axis, out, log: bool, fn: str):
    taken = _devices.take(x, "x", fn)
    dev, a = taken.device, taken.array
    check_float(a, "x", fn)
    lay = Layout(a, as_axes(axis, a.ndim, fn), dev.allow_middle)
    out_arr = _take_out(dev, out, a.shape, a.dtype, fn)
    if a.size == 0:
        return out if out is not None else _devices.give_back(taken, dev.empty(a.shape, a.dtype))
    be = dev.backend()
    kernel = be.softmax_forward_middle if lay.kind == "middle" else be.softmax_forward
    xk = lay.to_kernel(dev.xp, a)
    yk, wrote = _compute_into(dev, lay, out_arr, a, kernel, [xk], (log,))
    if log:
        dev.scipy_log_softmax(xk, yk, lay.kind)
    return _finish(dev, taken, lay, yk, wrote, out, out_arr)


def softmax(x, axis=None, *, out=None):
    r"""Softmax along ``axis``, as :func:`scipy.special.softmax`.

    .. math:: \sigma(x)_j = e^{x_j - m} / \textstyle\sum_k e^{x_k - m}, \quad m = \max_k x_k

    ``axis``: an int, a tuple of ints, or None (default, SciPy's): every
    axis. A slice holding NaN or ``+inf``, or only ``-inf``, is NaN
    throughout; ``-inf`` entries of any other slice get exactly 0.
    ``out``: an array of ``x``'s shape and dtype to write the result into
    (returned). The result is laid out like ``x`` when that is dense.
    """
    return _softmax(x, axis, out, log=False, fn="softmax")


def log_softmax(x, axis=None, *, out=None):
    r"""Log-softmax along ``axis``, as :func:`scipy.special.log_softmax`.

    .. math:: y_j = (x_j - m) - \log \textstyle\sum_k e^{x_k - m}, \quad m = \max_k x_k

    SciPy's special values: a slice holding NaN, or only ``-inf``, is NaN;
    one holding ``+inf`` (and no NaN) is NaN at each ``+inf`` and ``-inf``
    elsewhere (on CUDA arrays such a slice is NaN throughout, as in PyTorch).
    ``axis`` and ``out`` as in :func:`softmax`.
    """
    return _softmax(x, axis, out, log=True, fn="log_softmax")


def _backward(y, dy, axis, out, log: bool, fn: str):
    taken = _devices.take(y, "y", fn)
    dev, ya = taken.device, taken.array
    dya = dev.take_other(dy, "dy", fn)
    check_pair(ya, dya, fn)
    lay = Layout(ya, as_axes(axis, ya.ndim, fn), dev.allow_middle)
    out_arr = _take_out(dev, out, ya.shape, ya.dtype, fn)
    if ya.size == 0:
        return out if out is not None else _devices.give_back(taken, dev.empty(ya.shape, ya.dtype))
    be = dev.backend()
    kernel = be.softmax_backward_middle if lay.kind == "middle" else be.softmax_backward
    ins_k = [lay.to_kernel(dev.xp, v) for v in (ya, dya)]
    dxk, wrote = _compute_into(dev, lay, out_arr, ya, kernel, ins_k, (log,))
    return _finish(dev, taken, lay, dxk, wrote, out, out_arr)


def softmax_backward(y, dy, axis=None, *, out=None):
    r"""The gradient of :func:`softmax` from its output ``y`` and the gradient ``dy`` of the output.

    .. math:: \partial x = y \odot \big(\partial y - \textstyle\sum_k y_k\, \partial y_k\big)

    ``y`` and ``dy`` of one shape and dtype; ``axis`` the forward's. The
    sum is taken in float64.
    """
    return _backward(y, dy, axis, out, log=False, fn="softmax_backward")


def log_softmax_backward(y, dy, axis=None, *, out=None):
    r"""The gradient of :func:`log_softmax` from its output ``y`` and the gradient ``dy`` of the output.

    .. math:: \partial x = \partial y - e^{y} \textstyle\sum_k \partial y_k
    """
    return _backward(y, dy, axis, out, log=True, fn="log_softmax_backward")


def _weights(dev, x, b, fn: str):
    """``(x, b)`` broadcast to one shape, and the result dtype (SciPy's promotion of the two)."""
    xp = dev.xp
    bb = dev.take_other(b, "b", fn)
    kind = np.dtype(bb.dtype).kind
    if kind not in "biuf" or (kind == "f" and not is_float_dtype(bb.dtype)):
        raise errors.DTypeError(f"fastsoftmax: {fn}(): b must be a real array, got {np.dtype(bb.dtype).name}")
    try:
        x, bb = xp.broadcast_arrays(x, bb)
    except ValueError as error:
        raise errors.ShapeError(
            f"fastsoftmax: {fn}(): b of shape {tuple(bb.shape)} does not broadcast against a of shape {tuple(x.shape)}"
        ) from error
    return x, bb, xp.result_type(x.dtype, bb.dtype)


def logsumexp(a, axis=None, b=None, keepdims=False, return_sign=False, *, out=None):
    r"""Log of the sum of exponentials along ``axis``, as :func:`scipy.special.logsumexp`.

    .. math:: \log \textstyle\sum_j b_j e^{a_j} = m + \log \sum_j b_j e^{a_j - m}, \quad m = \max_j a_j

    One read of ``a`` (with no ``b``). SciPy's special values: NaN in a
    slice gives NaN, else ``+inf`` gives ``+inf``; only ``-inf``, or no
    elements, gives ``-inf``. ``b``: weights broadcast against ``a``, which
    may be negative or 0 (a term with ``b_j = 0`` is left out, even where
    ``a_j`` is infinite or NaN); then ``a`` and ``b`` are copied into the
    kernel layout first, a slower path. ``return_sign``: return
    ``(log |sum|, sign of the sum)``; without it a negative sum gives NaN.
    ``out``: an array for the (first) result. float32 in, float32 out
    (SciPy's promotion with ``b``'s dtype).
    """
    fn = "logsumexp"
    taken = _devices.take(a, "a", fn)
    dev, x = taken.device, taken.array
    check_float(x, "a", fn)
    xp = dev.xp
    dtype = x.dtype
    bb = None
    if b is not None:
        x, bb, dtype = _weights(dev, x, b, fn)
    lay = Layout(x, as_axes(axis, x.ndim, fn), dev.allow_middle and bb is None)
    shape = lay.reduced_shape(bool(keepdims))
    out_arr = _take_out(dev, out, shape, dtype, fn)
    be = dev.backend()
    if x.size == 0:
        lse = xp.full(lay.kept, -xp.inf, dtype=xp.float64)
        sign = xp.full(lay.kept, -1.0)  # SciPy's sign of an empty sum
    elif bb is None:
        lse = dev.empty(lay.kept if lay.kind == "rows" else (lay.shape[0], lay.shape[2]), xp.float64)
        kernel = be.logsumexp_middle if lay.kind == "middle" else be.logsumexp
        dev.run(kernel, [lay.to_kernel(xp, x)], [lse.reshape(lay.rows) if lay.kind == "rows" else lse])
        sign = xp.where(lse != lse, xp.nan, xp.where(lse == -xp.inf, 0.0, 1.0)) if return_sign else None
    else:
        lse, sign = dev.empty(lay.rows, xp.float64), dev.empty(lay.rows, xp.float64)
        ins = [lay.to_kernel(xp, v.astype(dtype, copy=False)) for v in (x, bb)]
        dev.run(be.logsumexp_weighted, ins, [lse, sign])
        if not return_sign:
            lse = xp.where(sign < 0, xp.nan, lse)  # not a masked store: on CuPy that would wait for the device
    lse = lse.reshape(shape)
    if out is not None:
        xp.copyto(out_arr, lse, casting="same_kind")
        result = out
    else:
        result = _devices.give_back(taken, lse.astype(dtype))
    if return_sign:
        return result, _devices.give_back(taken, sign.reshape(shape).astype(dtype))
    return result


def empty_cache() -> int:
    """Release the cached memory of large NumPy outputs that no array uses any more; returns the bytes freed."""
    return _pool.empty_cache()
