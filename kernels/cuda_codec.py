"""Reading and writing rows in 16-byte chunks, per storage dtype, in the accumulation type.

A row is processed in *chunks* of ``vec`` elements, 16 bytes: 4 float32, 2
float64, 8 float16 or bfloat16 (those two are passed as their ``uint16``
bits). Chunk ``c`` holds elements ``[c * vec, c * vec + vec)``. Each
function takes an ``aligned`` flag, chosen once per launch by the host: when
the row's base address is 16-byte aligned and its length a multiple of
``vec``, a chunk is one 128-bit access; otherwise the same elements are read
or written one at a time, those past the row's end skipped (loads give
``fill``). Both paths put the same element in the same place, so a kernel's
other code does not know which ran.

Values live in small per-thread ``cuda.local.array`` buffers indexed only
by compile-time constants (every loop over a chunk or over a thread's
chunks has a constant trip count and is unrolled), so they stay in
registers; the offline gates check that no kernel has a stack frame.

Accumulation is in float32, or float64 for float64 rows; no float64
instruction appears in the other kernels (typed constants throughout:
``float32(-math.inf)``, never ``-math.inf``).
"""

import math
from dataclasses import dataclass
from functools import lru_cache

from numba import cuda
from numba.cuda.core import config
from numba.cuda.types import float32, float64, uint16, uint32

from .cuda_intrinsics import (
    exp2_approx,
    f16_to_f32,
    pack_bf16x2,
    pack_f16x2,
    u32_as_f32,
    vload,
    vstore,
)

#: Device functions are compiled once per argument types and inlined by
#: NVVM (``alwaysinline``), not copied into every caller at Numba IR level
#: (``inline="always"``): the same code, a third of the compile time.
device = cuda.jit(device=True) if config.ENABLE_CUDASIM else cuda.jit(device=True, forceinline=True)

#: Storage dtypes by name: the numba element type each array is passed as.
STORAGE = {"float32": float32, "float64": float64, "float16": uint16, "bfloat16": uint16}

#: Short names used in kernel names.
SHORT = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16"}

_LOG2E = 1.4426950408889634
_LO16 = uint32(0xFFFF)
_HI16 = uint32(0xFFFF0000)
_SHIFT16 = uint32(16)


@device
def _exp_f32(d):
    # exp(d) = 2**(d * log2 e): one multiply and one ex2.approx (2 ulp), no float64
    return exp2_approx(d * float32(_LOG2E))


# the simulator runs these as Python, where math.log(0) raises: NumPy's give -inf, as the GPU does
if config.ENABLE_CUDASIM:  # pragma: no cover - exercised by the simulator driver
    import numpy

    _exp, _ln = numpy.exp, numpy.log
else:
    _exp, _ln = math.exp, math.log


@device
def _exp_f64(d):
    return _exp(d)


@device
def _log(s):
    return _ln(s)


@dataclass(frozen=True)
class Codec:
    """What a kernel needs to know about one storage dtype (see the module docstring)."""

    dtype: str
    #: numba type of the array elements and of the accumulators
    storage: object
    acc: object
    #: elements per 16-byte chunk, and raw items (:meth:`load_raw`) per chunk
    vec: int
    raw_per_chunk: int
    raw_type: object
    #: device functions
    exp: object
    log: object
    load: object
    store: object
    load_raw: object
    raw_value: object
    load_acc: object
    get: object
    put: object


def _scalar_ops(dtype):
    """``(get, put)``: one element of a storage row in the accumulation type, and back (rounded to nearest even)."""
    if dtype == "bfloat16":

        @device
        def get(row, j):
            return u32_as_f32(uint32(row[j]) << _SHIFT16)

        @device
        def put(row, j, v):
            row[j] = uint16(pack_bf16x2(v, float32(0.0)) & _LO16)

    elif dtype == "float16":

        @device
        def get(row, j):
            return f16_to_f32(uint32(row[j]))

        @device
        def put(row, j, v):
            row[j] = uint16(pack_f16x2(v, float32(0.0)) & _LO16)

    else:
        elem = STORAGE[dtype]

        @device
        def get(row, j):
            return row[j]

        @device
        def put(row, j, v):
            row[j] = elem(v)

    return get, put


def _half_word_ops(dtype):
    """``(lo, hi, pack)`` for a word holding two halves of ``dtype``."""
    if dtype == "bfloat16":

        @device
        def lo(w):
            return u32_as_f32(w << _SHIFT16)

        @device
        def hi(w):
            return u32_as_f32(w & _HI16)

        return lo, hi, pack_bf16x2

    @device
    def lo16(w):
        return f16_to_f32(w)

    @device
    def hi16(w):
        return f16_to_f32(w >> _SHIFT16)

    return lo16, hi16, pack_f16x2


@lru_cache(maxsize=None)
def codec(dtype: str) -> Codec:
    """The :class:`Codec` of a storage dtype: ``float32``, ``float64``, ``float16`` or ``bfloat16``."""
    storage = STORAGE[dtype]
    acc = float64 if dtype == "float64" else float32
    get, put = _scalar_ops(dtype)
    vec = 16 // (8 if dtype == "float64" else 4 if dtype == "float32" else 2)
    acc_lanes = 2 if dtype == "float64" else 4  # accumulation-type elements per 16-byte access

    @device
    def load_scalar(row, c, n_cols, fill, buf, base):
        j0 = c * vec
        for e in range(vec):
            buf[base + e] = get(row, j0 + e) if j0 + e < n_cols else fill

    @device
    def store_scalar(row, c, n_cols, buf, base):
        j0 = c * vec
        for e in range(vec):
            if j0 + e < n_cols:
                put(row, j0 + e, buf[base + e])

    @device
    def load_acc(row, c, n_cols, aligned, fill, buf, base):
        """Chunk ``c`` (``vec`` elements) of a row of the accumulation type, such as class weights."""
        j0 = c * vec
        if aligned:
            for h in range(vec // acc_lanes):
                words = vload(row, j0 + h * acc_lanes)
                for e in range(acc_lanes):
                    buf[base + h * acc_lanes + e] = words[e]
        else:
            for e in range(vec):
                buf[base + e] = row[j0 + e] if j0 + e < n_cols else fill

    if dtype in ("float32", "float64"):

        @device
        def load(row, c, n_cols, aligned, fill, buf, base):
            """Chunk ``c`` of ``row`` into ``buf[base:base + vec]``, ``fill`` past the row's end."""
            if aligned:
                words = vload(row, c * vec)
                for e in range(vec):
                    buf[base + e] = words[e]
            else:
                load_scalar(row, c, n_cols, fill, buf, base)

        if vec == 4:

            @device
            def store(row, c, n_cols, aligned, buf, base):
                """``buf[base:base + vec]`` to chunk ``c`` of ``row``, rounded to the storage dtype."""
                if aligned:
                    vstore(row, c * vec, (buf[base], buf[base + 1], buf[base + 2], buf[base + 3]))
                else:
                    store_scalar(row, c, n_cols, buf, base)

        else:

            @device
            def store(row, c, n_cols, aligned, buf, base):
                if aligned:
                    vstore(row, c * vec, (buf[base], buf[base + 1]))
                else:
                    store_scalar(row, c, n_cols, buf, base)

        @device
        def raw_value(buf, base, e):
            return buf[base + e]

        load_raw = load
        raw_per_chunk, raw_type = vec, acc
    else:
        lo, hi, pack = _half_word_ops(dtype)

        @device
        def load(row, c, n_cols, aligned, fill, buf, base):
            if aligned:
                words = vload(row, c * vec)
                for k in range(4):
                    buf[base + 2 * k] = lo(words[k])
                    buf[base + 2 * k + 1] = hi(words[k])
            else:
                load_scalar(row, c, n_cols, fill, buf, base)

        @device
        def store(row, c, n_cols, aligned, buf, base):
            if aligned:
                vstore(
                    row,
                    c * vec,
                    (
                        pack(buf[base], buf[base + 1]),
                        pack(buf[base + 2], buf[base + 3]),
                        pack(buf[base + 4], buf[base + 5]),
                        pack(buf[base + 6], buf[base + 7]),
                    ),
                )
            else:
                store_scalar(row, c, n_cols, buf, base)

        @device
        def load_raw(row, c, n_cols, aligned, fill, buf, base):
            """Chunk ``c`` as 4 words of two halves each (zero past the row's end): half the registers of :func:`load`."""
            if aligned:
                words = vload(row, c * vec)
                for k in range(4):
                    buf[base + k] = words[k]
            else:
                j0 = c * vec
                for k in range(4):
                    a = uint32(row[j0 + 2 * k]) if j0 + 2 * k < n_cols else uint32(0)
                    b = uint32(row[j0 + 2 * k + 1]) if j0 + 2 * k + 1 < n_cols else uint32(0)
                    buf[base + k] = a | (b << _SHIFT16)

        @device
        def raw_value(buf, base, e):
            w = buf[base + e // 2]
            return lo(w) if e % 2 == 0 else hi(w)

        raw_per_chunk, raw_type = 4, uint32

    return Codec(
        dtype=dtype,
        storage=storage,
        acc=acc,
        vec=vec,
        raw_per_chunk=raw_per_chunk,
        raw_type=raw_type,
        exp=_exp_f64 if dtype == "float64" else _exp_f32,
        log=_log,
        load=load,
        store=store,
        load_raw=load_raw,
        raw_value=raw_value,
        load_acc=load_acc,
        get=get,
        put=put,
    )
