"""Arrays at a memory address, for kernels called with a tensor's ``data_ptr()`` instead of a NumPy view.

At the book's 256 x 10, with the caches as cold as a training step leaves
them, turning a tensor into a NumPy array (``tensor.numpy()``) costs about
15 us and a NumPy output turned into a tensor (``torch.from_numpy``) 13 us,
more than the kernel itself; Numba then unboxes each array argument (a
``MemInfo`` per array). A tensor's address, shape and strides cost a few
microseconds together, and integers unbox for almost nothing. The kernels of
:mod:`.cpu_small` that the book's calls reach therefore take addresses, and
build their arrays here, in compiled code.

**The caller owns every guarantee Numba cannot check**: the address is the
first element of live memory of the element type ``like`` holding the whole
array (for :func:`rows_at`, ``n_rows * n_cols`` elements C-contiguous; for
:func:`strided_rows_at`, every ``i * row_stride + j * col_stride``), and the
memory stays alive for the call (the caller holds the tensor). The arrays
own nothing: no reference count, nothing freed.

``like`` is any value of the element type (a NumPy scalar such as
``np.float32(0)``): it only gives the compiled code its type.
"""

from numba import types
from numba.extending import intrinsic


def _array_at(context, builder, array_type, address, shape, strides_in_elements, like):
    itemsize = context.get_abi_sizeof(context.get_data_type(like))
    intp = context.get_value_type(types.intp)
    ary = context.make_array(array_type)(context, builder)
    context.populate_array(
        ary,
        data=builder.inttoptr(address, context.get_value_type(types.CPointer(like))),
        shape=list(shape),
        strides=[builder.mul(s, intp(itemsize)) for s in strides_in_elements],
        itemsize=context.get_constant(types.intp, itemsize),
        meminfo=None,
    )
    return ary._getvalue()


@intrinsic
def rows_at(typingctx, address, n_rows, n_cols, like):
    """A C-contiguous ``(n_rows, n_cols)`` array of ``like``'s type starting at ``address``."""
    array_type = types.Array(like, 2, "C")

    def codegen(context, builder, signature, args):
        address, n_rows, n_cols, _ = args
        return _array_at(context, builder, array_type, address, (n_rows, n_cols), (n_cols, context.get_constant(types.intp, 1)), like)

    return array_type(address, n_rows, n_cols, like), codegen


@intrinsic
def strided_rows_at(typingctx, address, n_rows, n_cols, row_stride, col_stride, like):
    """An ``(n_rows, n_cols)`` array of ``like``'s type at ``address``, strides in elements (0 for an expanded one)."""
    array_type = types.Array(like, 2, "A")

    def codegen(context, builder, signature, args):
        address, n_rows, n_cols, row_stride, col_stride, _ = args
        return _array_at(context, builder, array_type, address, (n_rows, n_cols), (row_stride, col_stride), like)

    return array_type(address, n_rows, n_cols, row_stride, col_stride, like), codegen


@intrinsic
def vector_at(typingctx, address, length, like):
    """A contiguous 1-D array of ``length`` elements of ``like``'s type at ``address``."""
    array_type = types.Array(like, 1, "C")

    def codegen(context, builder, signature, args):
        address, length, _ = args
        return _array_at(context, builder, array_type, address, (length,), (context.get_constant(types.intp, 1),), like)

    return array_type(address, length, like), codegen
