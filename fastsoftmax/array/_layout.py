"""Arrays to the layouts the kernels take, and back: the array twin of :mod:`fastsoftmax.ops.layout`.

The kernels see two layouts, C-contiguous and in a dtype they compute in:

* rows ``(R, C)``, the reduced axes last: any array reaches it by moving the
  reduced axes last (``transpose``) and reshaping, a copy only when that
  view is not already C-contiguous (a transposed array reduced over its
  first axis is not copied);
* ``(O, C, I)``, reduced over the middle (CPU only): when the reduced axes
  are consecutive, moving them last would copy, and at least
  ``config.CPU_MIDDLE_MIN_INNER`` positions lie after them, the middle-axis
  kernels reduce them in place (the rule of ``ops.layout._CPU.middle_shape``).

Results come back as views of the kernels' output (:meth:`Layout.back`):
laid out like the input, as NumPy lays out an elementwise result, not
always C-contiguous. float16 (and ml_dtypes' bfloat16) go through the
float32 kernels in chunks of rows (:func:`run`), so that no whole float32
copy is made.
"""

import math

import numpy as np

from ..kernels import config

#: the dtypes the CPU kernels compute in
KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class Layout:
    """How a reduction over ``axes`` of an array maps onto the kernels' layouts.

    ``kind`` is ``"rows"`` or ``"middle"``; ``shape`` the kernel shape,
    ``(R, C)`` or ``(O, C, I)``; ``kept`` the shape of one result per
    reduced slice (the input's shape without the reduced axes).
    """

    def __init__(self, x, axes: tuple, allow_middle: bool):
        ndim = x.ndim
        self.in_shape = tuple(x.shape)
        if ndim == 0:
            axes, ndim_shape = (0,), (1,)
        else:
            ndim_shape = self.in_shape
        self.axes = axes
        rest = [k for k in range(len(ndim_shape)) if k not in axes]
        self.perm = tuple(rest) + tuple(axes)
        self.moved_shape = tuple(ndim_shape[k] for k in self.perm)
        self.kept = tuple(ndim_shape[k] for k in rest) if x.ndim else ()
        n_classes = math.prod(ndim_shape[k] for k in axes)
        self.n_classes = n_classes
        self.kind = "rows"
        self.shape = (math.prod(self.kept), n_classes)
        consecutive = axes and axes[-1] - axes[0] == len(axes) - 1
        if allow_middle and x.ndim and consecutive and axes[-1] != x.ndim - 1 and not _dense(x.transpose(self.perm)):
            inner = math.prod(self.in_shape[axes[-1] + 1 :])
            if inner >= config.CPU_MIDDLE_MIN_INNER:
                self.kind = "middle"
                self.shape = (math.prod(self.in_shape[: axes[0]]), n_classes, inner)

    @property
    def rows(self) -> int:
        """The slices reduced (``R``, or ``O * I``)."""
        return math.prod(self.kept)

    def to_kernel(self, xp, x):
        """``x`` in the kernel shape, C-contiguous (a copy only where the view is not)."""
        if self.kind == "middle":
            return xp.ascontiguousarray(x).reshape(self.shape)
        moved = x.reshape(1) if x.ndim == 0 else x.transpose(self.perm)
        return xp.ascontiguousarray(moved).reshape(self.shape)

    def out_view(self, out):
        """``out`` (the input's shape) as a kernel-shaped view the kernels can write, or None."""
        if self.kind == "middle":
            return out.reshape(self.shape) if _dense(out) else None
        moved = out.reshape(1) if out.ndim == 0 else out.transpose(self.perm)
        return moved.reshape(self.shape) if _dense(moved) else None

    def back(self, y):
        """A kernel-shaped result ``y`` viewed in the input's shape."""
        if self.kind == "middle" or not self.in_shape:
            return y.reshape(self.in_shape)
        inverse = np.argsort(self.perm)
        return y.reshape(self.moved_shape).transpose(tuple(int(k) for k in inverse))

    def reduced_shape(self, keepdims: bool) -> tuple:
        """The shape of one result per reduced slice: the input's without the reduced axes (kept as 1s)."""
        if not keepdims:
            return self.kept
        return tuple(1 if k in self.axes else n for k, n in enumerate(self.in_shape))


def _dense(a) -> bool:
    return bool(a.flags.c_contiguous)


def needs_conversion(*arrays) -> bool:
    return any(np.dtype(a.dtype) not in KERNEL_DTYPES for a in arrays)


def run(kernel, ins, outs, *extra) -> None:
    """``kernel(*ins, *outs, *extra)`` on kernel-shaped arrays; arrays of other dtypes through float32 in chunks.

    float16 and bfloat16 arrays are converted to float32 a chunk of
    ``config.CPU_HALF_CHUNK_BYTES`` at a time along the first axis (inputs
    on the way in, outputs on the way out); float32 and float64 arrays are
    passed as slices.
    """
    if not needs_conversion(*ins, *outs):
        kernel(*ins, *outs, *extra)
        return
    n = ins[0].shape[0]
    row_bytes = max(1, math.prod(ins[0].shape[1:]) * 4)
    step = max(1, config.CPU_HALF_CHUNK_BYTES // row_bytes)
    for start in range(0, n, step):
        part = slice(start, start + step)
        chunk_ins = [a[part] if np.dtype(a.dtype) in KERNEL_DTYPES else a[part].astype(np.float32) for a in ins]
        chunk_outs = [o[part] if np.dtype(o.dtype) in KERNEL_DTYPES else np.empty(o[part].shape, np.float32) for o in outs]
        kernel(*chunk_ins, *chunk_outs, *extra)
        for o, c in zip(outs, chunk_outs):
            if np.dtype(o.dtype) not in KERNEL_DTYPES:
                o[part] = c
