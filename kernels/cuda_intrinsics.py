r"""Device intrinsics numba-cuda lacks: 16-byte loads and stores, ``ex2.approx``, half-precision packing.

* :func:`vload` / :func:`vstore`: one 128-bit access at element ``j`` of a
  1-D contiguous array: 4 float32, 2 float64, or 8 half-precision values
  carried as 4 ``uint32`` words (float16 and bfloat16 arrays are passed as
  their ``uint16`` bits). numba-cuda has vector types but no arrays of them,
  and four scalar loads are never fused into one, so these emit an LLVM
  ``load <4 x float>, align 16`` directly (``ld.global.v4.f32`` in PTX).
  The caller guarantees the address is 16-byte aligned and the whole vector
  in bounds.
* :func:`exp2_approx`: :math:`2^x` by the ``ex2.approx.f32`` instruction
  (2 ulp; subnormal results kept, ``-inf`` gives 0).
* :func:`pack_bf16x2`, :func:`pack_f16x2`: two float32 rounded to nearest
  even into one word (``cvt.rn.bf16x2.f32``, sm_80 and later);
  :func:`f16_to_f32`, :func:`u32_as_f32`, :func:`f32_as_u32`: exact
  conversions and bit casts.
* :func:`sign_word`: 0 for a non-negative integer, all ones for a negative
  one, computed in inline PTX, so that neither NVVM nor ptxas knows its
  value: ``w | sign_word(n_cols)`` is ``w`` to the program but a new value
  to the compilers, which then cannot reuse what they computed from ``w``
  before (see :func:`kernels.cuda_softmax.backward`).

In the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) each has a NumPy
fallback with the same semantics and the same bits (little-endian word
packing, round to nearest even), so the simulator runs the kernels' own
vector paths.
"""

from numba.cuda.core import config

if config.ENABLE_CUDASIM:  # pragma: no cover - exercised by the simulator driver
    import numpy as np

    def _words(row):
        return row.view(np.uint32) if row.dtype == np.uint16 else row

    def vload(row, j):
        words = _words(row)
        k = j * row.dtype.itemsize // words.dtype.itemsize
        n = 16 // words.dtype.itemsize
        return tuple(words[k + i] for i in range(n))

    def vstore(row, j, values):
        words = _words(row)
        k = j * row.dtype.itemsize // words.dtype.itemsize
        for i, v in enumerate(values):
            words[k + i] = v

    def exp2_approx(x):
        return np.exp2(np.float32(x))

    def u32_as_f32(u):
        return np.uint32(int(u) & 0xFFFFFFFF).view(np.float32)

    def f32_as_u32(v):
        return np.float32(v).view(np.uint32)

    def _bf16_bits(v):
        u = int(np.float32(v).view(np.uint32))
        if (u & 0x7FFFFFFF) > 0x7F800000:
            return 0x7FFF  # the canonical NaN cvt.rn.bf16x2.f32 writes
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF

    def pack_bf16x2(lo, hi):
        return np.uint32(_bf16_bits(lo) | (_bf16_bits(hi) << 16))

    def _f16_bits(v):
        return int(np.float16(np.float32(v)).view(np.uint16))

    def pack_f16x2(lo, hi):
        return np.uint32(_f16_bits(lo) | (_f16_bits(hi) << 16))

    def f16_to_f32(u):
        return np.float32(np.uint16(int(u) & 0xFFFF).view(np.float16))

    def sign_word(n):
        return np.uint32(0xFFFFFFFF if n < 0 else 0)

else:
    from llvmlite import ir
    from numba.cuda import cgutils, types
    from numba.cuda.extending import intrinsic

    def _vector_of(arrty):
        """LLVM element type, lane count and numba lane type of a 16-byte access to ``arrty``."""
        dtype = arrty.dtype
        if dtype == types.float32:
            return ir.FloatType(), 4, types.float32
        if dtype == types.float64:
            return ir.DoubleType(), 2, types.float64
        if dtype in (types.uint16, types.int16, types.float16):
            return ir.IntType(32), 4, types.uint32
        raise TypeError(f"no 16-byte access for arrays of {dtype}")

    def _element_pointer(context, builder, arrty, arr, idxty, idx):
        ary = context.make_array(arrty)(context, builder, value=arr)
        idx = context.cast(builder, idx, idxty, types.intp)
        return cgutils.get_item_pointer(context, builder, arrty, ary, [idx], wraparound=False, boundscheck=False)

    def _check(arr, j):
        if not (isinstance(arr, types.Array) and arr.ndim == 1 and isinstance(j, types.Integer)):
            raise TypeError("vload/vstore take a 1-D array and an integer element index")

    @intrinsic
    def vload(typingctx, arr, j):
        """The 16 bytes at ``arr[j]``: a UniTuple of 4 float32, 2 float64 or 4 uint32 (8 halves)."""
        _check(arr, j)
        llty, lanes, nbty = _vector_of(arr)
        retty = types.UniTuple(nbty, lanes)

        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
            vec = builder.load(builder.bitcast(ptr, ir.VectorType(llty, lanes).as_pointer()), align=16)
            items = [builder.extract_element(vec, ir.Constant(ir.IntType(32), k)) for k in range(lanes)]
            return context.make_tuple(builder, retty, items)

        return retty(arr, j), codegen

    @intrinsic
    def vstore(typingctx, arr, j, values):
        """Write a tuple of :func:`vload`'s shape to the 16 bytes at ``arr[j]``."""
        _check(arr, j)
        llty, lanes, nbty = _vector_of(arr)
        if not (isinstance(values, types.BaseTuple) and len(values) == lanes):
            raise TypeError(f"vstore needs a {lanes}-tuple for arrays of {arr.dtype}")

        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
            vec = ir.Constant(ir.VectorType(llty, lanes), ir.Undefined)
            for k in range(lanes):
                item = context.cast(builder, builder.extract_value(args[2], k), sig.args[2][k], nbty)
                vec = builder.insert_element(vec, item, ir.Constant(ir.IntType(32), k))
            builder.store(vec, builder.bitcast(ptr, ir.VectorType(llty, lanes).as_pointer()), align=16)
            return context.get_dummy_value()

        return types.void(arr, j, values), codegen

    def _asm(builder, retty, argtys, text, constraints, args):
        fnty = ir.FunctionType(retty, argtys)
        return builder.call(ir.InlineAsm(fnty, text, constraints), args)

    @intrinsic
    def exp2_approx(typingctx, x):
        """:math:`2^x` in float32 (``ex2.approx.f32``)."""
        if x != types.float32:
            raise TypeError("exp2_approx takes a float32")

        def codegen(context, builder, sig, args):
            f32 = ir.FloatType()
            return _asm(builder, f32, [f32], "ex2.approx.f32 $0, $1;", "=f,f", args)

        return types.float32(x), codegen

    def _pack(instruction):
        def gen(typingctx, lo, hi):
            if lo != types.float32 or hi != types.float32:
                raise TypeError("packing takes two float32")

            def codegen(context, builder, sig, args):
                f32 = ir.FloatType()
                # cvt.rn.{bf16,f16}x2.f32 d, a, b puts a in the upper half
                return _asm(builder, ir.IntType(32), [f32, f32], f"{instruction} $0, $1, $2;", "=r,f,f", [args[1], args[0]])

            return types.uint32(lo, hi), codegen

        return gen

    pack_bf16x2 = intrinsic(_pack("cvt.rn.bf16x2.f32"))
    pack_f16x2 = intrinsic(_pack("cvt.rn.f16x2.f32"))

    def _word(context, builder, sig, args):
        # integer arithmetic on uint32 words types as 64-bit in numba: keep the low 32 bits
        return context.cast(builder, args[0], sig.args[0], types.uint32)

    @intrinsic
    def f16_to_f32(typingctx, u):
        """The float16 whose bits are the low 16 bits of the integer ``u``, as float32 (exact)."""
        if not isinstance(u, types.Integer):
            raise TypeError("f16_to_f32 takes an integer")

        def codegen(context, builder, sig, args):
            text = "{.reg .b16 h; cvt.u16.u32 h, $1; cvt.f32.f16 $0, h;}"
            return _asm(builder, ir.FloatType(), [ir.IntType(32)], text, "=f,r", [_word(context, builder, sig, args)])

        return types.float32(u), codegen

    @intrinsic
    def u32_as_f32(typingctx, u):
        """The float32 with the bits of the low 32 bits of the integer ``u``."""
        if not isinstance(u, types.Integer):
            raise TypeError("u32_as_f32 takes an integer")

        def codegen(context, builder, sig, args):
            return builder.bitcast(_word(context, builder, sig, args), ir.FloatType())

        return types.float32(u), codegen

    @intrinsic
    def f32_as_u32(typingctx, v):
        """The bits of the float32 ``v``."""
        if v != types.float32:
            raise TypeError("f32_as_u32 takes a float32")

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return types.uint32(v), codegen

    @intrinsic
    def sign_word(typingctx, n):
        """``0xFFFFFFFF`` if the integer ``n`` is negative, else 0, as a uint32 the compilers cannot fold."""
        if not isinstance(n, types.Integer):
            raise TypeError("sign_word takes an integer")

        def codegen(context, builder, sig, args):
            value = context.cast(builder, args[0], sig.args[0], types.int64)
            text = "{.reg .b64 t; shr.s64 t, $1, 63; cvt.u32.u64 $0, t;}"
            return _asm(builder, ir.IntType(32), [ir.IntType(64)], text, "=r,l", [value])

        return types.uint32(n), codegen
