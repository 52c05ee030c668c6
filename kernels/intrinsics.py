"""LLVM intrinsics that Numba does not expose, used by the CPU kernels.

Each one lowers to a handful of IR instructions that LLVM's loop vectoriser
understands, so the loops that call them still become SIMD code:

* ``maxnum(a, b)``: ``llvm.maxnum``, the IEEE maxNum (a NaN operand is
  ignored). Unlike ``a if a > b else b`` it is recognised as a vectorisable
  max-reduction without the ``nnan`` flag, which we never set.
* ``row_max(row)``: the max of a whole row, written as a SIMD loop (see
  there for why the vectoriser's maxnum reduction is not enough).
* ``lane_sum(a)``, ``lane_sum64(a)``, ``lane_dot64(a, b)``: sums in one
  fixed order, as explicit vector code (see :func:`lane_sum`).
* ``pow2_from_shifted(t)``: ``2**n`` built directly from the exponent bits
  (``ldexp`` without the call) of a float that carries ``n`` in its low bits.

and the memory operations the kernels need around their loops: non-temporal
stores, a fence, a prefetch, and an atomic add for the threads' shared work
queue.
"""

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic


@intrinsic
def maxnum(typingctx, a, b):
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, sig, args):
        ty = context.get_value_type(sig.return_type)
        fn = builder.module.declare_intrinsic("llvm.maxnum", [ty], ir.FunctionType(ty, [ty, ty]))
        return builder.call(fn, args)

    return a(a, b), codegen


#: Vectors that :func:`row_max` keeps in flight (independent accumulators).
_MAX_UNROLL = 4


@intrinsic
def row_max(typingctx, row):
    """The largest element of a C-contiguous 1-D float row, NaN elements skipped (-inf if none is left).

    Each lane keeps ``m = x if x > m else m``: a NaN never compares greater,
    so it is skipped. This is one ``vmaxps`` on x86 (``maxnum``, whose NaN
    rule is symmetric, costs a compare and a blend more, and ``x > m`` alone
    is not vectorised: LLVM reorders a max-reduction only under ``nnan``,
    which would make a NaN row poison). The callers do not need the NaN in
    ``m``: it reaches their results through ``sum_j exp(x_j - m)``. Written
    here as explicit 32-byte vectors, :data:`_MAX_UNROLL` accumulators, then
    a scalar tail; at 32000 float32 columns in L2 it is 1.7x faster than the
    maxnum loop.
    """
    if not (isinstance(row, types.Array) and row.ndim == 1 and row.layout == "C" and row.dtype in (types.float32, types.float64)):
        return None

    def codegen(context, builder, sig, args):
        elem = context.get_value_type(sig.return_type)
        size = context.get_abi_sizeof(elem)
        vty = ir.VectorType(elem, 32 // size)
        intp = context.get_value_type(types.intp)
        a = context.make_array(sig.args[0])(context, builder, args[0])
        n = builder.extract_value(a.shape, 0)
        lowest = ir.Constant(elem, float("-inf"))

        def larger(x, m):
            return builder.select(builder.fcmp_ordered(">", x, m), x, m)

        # the body: whole groups of _MAX_UNROLL vectors, one accumulator each
        step = vty.count * _MAX_UNROLL
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vty, [lowest] * vty.count)) for _ in range(_MAX_UNROLL)]
        body = builder.mul(builder.sdiv(n, ir.Constant(intp, step)), ir.Constant(intp, step))
        with cgutils.for_range_slice(builder, ir.Constant(intp, 0), body, ir.Constant(intp, step), intp=intp) as (j, _):
            for u, acc in enumerate(accs):
                ptr = builder.gep(a.data, [builder.add(j, ir.Constant(intp, u * vty.count))])
                v = builder.load(builder.bitcast(ptr, vty.as_pointer()), align=size)
                builder.store(larger(v, builder.load(acc)), acc)
        # the accumulators into one vector, its lanes into one scalar, then the tail
        vec = builder.load(accs[0])
        for acc in accs[1:]:
            vec = larger(builder.load(acc), vec)
        m = cgutils.alloca_once_value(builder, lowest)
        for k in range(vty.count):
            builder.store(larger(builder.extract_element(vec, ir.Constant(ir.IntType(32), k)), builder.load(m)), m)
        with cgutils.for_range_slice(builder, body, n, ir.Constant(intp, 1), intp=intp) as (j, _):
            builder.store(larger(builder.load(builder.gep(a.data, [j])), builder.load(m)), m)
        return builder.load(m)

    return row.dtype(row), codegen


#: Lanes of each accumulator of the lane sums, and accumulators in flight.
_SUM_LANES, _SUM_UNROLL = 8, 4


def _lane_sum_codegen(widen: bool, product: bool):
    """IR for ``sum_j a_j`` (``product``: ``sum_j a_j * b_j``), in the element type or, ``widen``, in float64.

    Element ``j`` of the body goes to lane ``j % 8`` of accumulator
    ``(j // 8) % 4``; the accumulators are added as ``(0 + 1) + (2 + 3)``, the
    lanes of the result halved pairwise (``lane k + lane k + 4``, then
    ``+ 2``, then ``+ 1``), and the tail added one element at a time in
    index order. The additions carry no fast-math flags, so LLVM may not
    reorder them: every compilation, serial or parallel, cached or fresh,
    on any target, adds in this order.
    """

    def codegen(context, builder, sig, args):
        arr_ty = sig.args[0]
        elem = context.get_value_type(arr_ty.dtype)
        acc_elem = ir.DoubleType() if widen else elem
        vin, vacc = ir.VectorType(elem, _SUM_LANES), ir.VectorType(acc_elem, _SUM_LANES)
        intp = context.get_value_type(types.intp)
        i32 = ir.IntType(32)
        arrays = [context.make_array(t)(context, builder, v) for t, v in zip(sig.args, args)]
        n = builder.extract_value(arrays[0].shape, 0)
        align = context.get_abi_sizeof(elem)

        def widened(value):
            return builder.fpext(value, vacc if isinstance(value.type, ir.VectorType) else acc_elem) if widen else value

        def term(j, vector):
            ptrs = [builder.gep(a.data, [j]) for a in arrays]
            if vector:
                vals = [builder.load(builder.bitcast(p, vin.as_pointer()), align=align) for p in ptrs]
            else:
                vals = [builder.load(p) for p in ptrs]
            vals = [widened(v) for v in vals]
            return builder.fmul(vals[0], vals[1]) if product else vals[0]

        step = _SUM_LANES * _SUM_UNROLL
        zero = ir.Constant(vacc, [0.0] * _SUM_LANES)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(_SUM_UNROLL)]
        body = builder.mul(builder.sdiv(n, ir.Constant(intp, step)), ir.Constant(intp, step))
        with cgutils.for_range_slice(builder, ir.Constant(intp, 0), body, ir.Constant(intp, step), intp=intp) as (j, _):
            for u, acc in enumerate(accs):
                v = term(builder.add(j, ir.Constant(intp, u * _SUM_LANES)), vector=True)
                builder.store(builder.fadd(builder.load(acc), v), acc)
        a01 = builder.fadd(builder.load(accs[0]), builder.load(accs[1]))
        a23 = builder.fadd(builder.load(accs[2]), builder.load(accs[3]))
        vec = builder.fadd(a01, a23)
        width = _SUM_LANES
        while width > 1:
            half = width // 2
            lo = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(i32, half), list(range(half))))
            hi = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(i32, half), list(range(half, width))))
            vec = builder.fadd(lo, hi)
            width = half
        total = cgutils.alloca_once_value(builder, builder.extract_element(vec, ir.Constant(i32, 0)))
        with cgutils.for_range_slice(builder, body, n, ir.Constant(intp, 1), intp=intp) as (j, _):
            builder.store(builder.fadd(builder.load(total), term(j, vector=False)), total)
        return builder.load(total)

    return codegen


def _is_row(a) -> bool:
    return isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype in (types.float32, types.float64)


@intrinsic
def lane_sum(typingctx, a):
    """``sum_j a_j`` of a C-contiguous 1-D float array, in its dtype, in one fixed order.

    Eight lanes times four accumulators, then a fixed tree, then the tail in
    order (:func:`_lane_sum_codegen`). LLVM vectorises a plain ``s += a[j]``
    only when allowed to reassociate, and then picks the order itself:
    differently for the serial and the parallel compilation of one kernel,
    and for a parallel kernel loaded from Numba's cache. A row's result would
    then depend on the batch it came in. This order is the same everywhere.
    """
    if not _is_row(a):
        return None
    return a.dtype(a), _lane_sum_codegen(widen=False, product=False)


@intrinsic
def lane_sum64(typingctx, a):
    """:func:`lane_sum` with every element converted to float64 first: the sum in float64."""
    if not _is_row(a):
        return None
    return types.float64(a), _lane_sum_codegen(widen=True, product=False)


@intrinsic
def lane_dot64(typingctx, a, b):
    """``sum_j a_j * b_j`` in float64 (exact products of float32 inputs), in the order of :func:`lane_sum`.

    ``a`` and ``b`` must have the same dtype and at least ``len(a)`` elements.
    """
    if not (_is_row(a) and _is_row(b) and a.dtype == b.dtype):
        return None
    return types.float64(a, b), _lane_sum_codegen(widen=True, product=True)


@intrinsic
def pow2_from_shifted(typingctx, t):
    """``2**n`` from ``t = n + 1.5 * 2**m + bias`` (``m`` mantissa bits, ``bias`` the exponent bias).

    Adding the shifter ``1.5 * 2**m + bias`` to a float rounds it to an integer
    ``n`` and leaves ``n + bias`` in the low mantissa bits of ``t``; shifting
    the bits of ``t`` left by ``m`` moves them into the exponent field, which
    is ``2**n`` for ``-bias < n <= bias`` and 0.0 for ``n = -bias``.
    """
    if t not in (types.float32, types.float64):
        return None

    def codegen(context, builder, sig, args):
        if sig.return_type == types.float32:
            ity, shift, fty = ir.IntType(32), 23, ir.FloatType()
        else:
            ity, shift, fty = ir.IntType(64), 52, ir.DoubleType()
        bits = builder.bitcast(args[0], ity)
        return builder.bitcast(builder.shl(bits, ir.Constant(ity, shift)), fty)

    return t(t), codegen


@intrinsic
def stream_vector(typingctx, dst, src, j, scale):
    """``dst[j:j+W] = src[j:j+W] * scale`` as one 32-byte non-temporal store (``W = 32 / itemsize``).

    A non-temporal store writes the line to memory without first reading it
    into the cache (no read-for-ownership), so a large output costs one pass
    over memory instead of two. ``dst[j:]`` must be 32-byte aligned and
    ``W`` elements long; ``dst`` and ``src`` 1-D contiguous of one float dtype.
    """
    if not (isinstance(dst, types.Array) and dst == src and dst.ndim == 1 and dst.dtype in (types.float32, types.float64)):
        return None
    if scale != dst.dtype:
        return None

    def codegen(context, builder, sig, args):
        dst_ty, src_ty, _, _ = sig.args
        elem = context.get_value_type(dst_ty.dtype)
        width = 32 // context.get_abi_sizeof(elem)
        vec_ptr = ir.PointerType(ir.VectorType(elem, width))
        d = context.make_array(dst_ty)(context, builder, args[0])
        s = context.make_array(src_ty)(context, builder, args[1])
        src_ptr = builder.bitcast(builder.gep(s.data, [args[2]]), vec_ptr)
        dst_ptr = builder.bitcast(builder.gep(d.data, [args[2]]), vec_ptr)
        value = builder.load(src_ptr, align=context.get_abi_sizeof(elem))
        splat = builder.insert_element(ir.Constant(ir.VectorType(elem, width), None), args[3], ir.Constant(ir.IntType(32), 0))
        splat = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width))
        value = builder.fmul(value, splat)
        store = builder.store(value, dst_ptr, align=32)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.none(dst, src, j, scale), codegen


@intrinsic
def store_fence(typingctx):
    """A full memory fence: makes the non-temporal stores before it visible to other threads."""

    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def prefetch(typingctx, arr, j):
    """Hint the cache to fetch the line holding ``arr[j]`` (``llvm.prefetch``, read, keep in L2).

    The kernels prefetch the next row while computing on the current one, so
    that the memory read of a row overlaps the arithmetic of the row before.
    """
    if not (isinstance(arr, types.Array) and arr.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(a.data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", [ptr.type], ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        )
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(arr, j), codegen


@intrinsic
def fetch_add(typingctx, arr, i, v):
    """Atomically ``arr[i] += v`` on an int64 array; returns the old ``arr[i]``.

    The CPU kernels' threads claim rows from one shared counter with it
    (``atomicrmw add``, monotonic order: each claim gets a distinct value, and
    the claimed rows are written to disjoint places, so nothing else needs
    ordering).
    """
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and isinstance(v, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.gep(a.data, [args[1]])
        value = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, value, "monotonic")

    return types.int64(arr, i, v), codegen
