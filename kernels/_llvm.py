"""LLVM intrinsics that Numba does not expose, used by the CPU kernels.

Each one lowers to a handful of IR instructions that LLVM's loop vectoriser
understands, so the loops that call them still become SIMD code:

* ``maxnum(a, b)``: ``llvm.maxnum``, the IEEE maxNum (a NaN operand is
  ignored). Unlike ``a if a > b else b`` it is recognised as a vectorisable
  max-reduction without the ``nnan`` flag, which we never set.
* ``pow2i(n)``: ``2**n`` for an integral-valued float ``n`` in the normal
  exponent range, built directly from the exponent bits (``ldexp`` without
  the call).
"""

from llvmlite import ir
from numba.core import types
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


@intrinsic
def pow2i(typingctx, n):
    if n not in (types.float32, types.float64):
        return None

    def codegen(context, builder, sig, args):
        if sig.return_type == types.float32:
            ity, bias, shift, fty = ir.IntType(32), 127, 23, ir.FloatType()
        else:
            ity, bias, shift, fty = ir.IntType(64), 1023, 52, ir.DoubleType()
        i = builder.fptosi(args[0], ity)
        i = builder.add(i, ir.Constant(ity, bias))
        i = builder.shl(i, ir.Constant(ity, shift))
        return builder.bitcast(i, fty)

    return n(n), codegen
