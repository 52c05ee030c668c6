"""An exp that LLVM can vectorise, for the CPU kernels.

``math.exp`` compiles to a libm call that LLVM cannot vectorise; :func:`vexp`
is polynomial arithmetic it can. Written as Python stubs (``math.exp``, so
that plain Python callers get the same function) with Numba overloads that
build the polynomial for float32 and float64.
"""

import math
import platform

import llvmlite.binding as ll
import numpy as np
from numba import types
from numba.core import config as numba_config
from numba.extending import overload

from . import config
from .intrinsics import pow2_from_shifted


def vexp(x):
    """exp(x), within one ulp over the normal range (float32 with FMA: plus ``|x| * 2.75e-9``, below).

    ``math.exp`` compiles to a libm call that LLVM cannot vectorise; this one is
    polynomial arithmetic it can. Range reduction ``x = n*ln2 + r`` with
    ``|r| <= ln2/2`` (Cody-Waite), a polynomial for ``exp(r)`` (float32:
    degree 6, fitted for relative error, truncation 1.7e-8; float64: Taylor
    degree 13, truncation below 1e-17), then ``2**n`` from the exponent
    bits. ``n`` is rounded by adding a shifter constant (see
    :func:`.intrinsics.pow2_from_shifted`), which also leaves the bits of ``2**n``
    in place: no rounding or float-to-int instruction. Results below
    ``2**-126`` (float64: ``2**-1022``) may lose bits, and those below about
    ``exp(-88)`` (``exp(-709)``) are 0; NaN stays NaN, ``-inf`` gives 0 and
    ``+inf`` gives inf.

    float64 splits ln2 in two parts, so that ``n * ln2_hi`` is exact. float32,
    where the machine has a fused multiply-add, subtracts ``n * fl(ln2)`` in
    one FMA instead of two, one multiply fewer in the kernels' hottest loop.
    ``fl(ln2)`` is off by 2.75e-9 (relative), which adds
    ``|x| * 2.75e-9`` to the relative error: 0.05 ulp per unit of ``|x|``,
    4.4 ulp at ``x = -87``. In the kernels ``x`` is itself a rounded float32
    (``x_j - max``, or a stored log-probability), whose rounding alone can
    put ``|x| * 6e-8`` into the result: 22 times as much.
    """
    return math.exp(x)


def vexp_nonpos(x):
    """:func:`vexp` for ``x <= 0`` (or NaN): ``exp(x - max)`` and ``exp(log p)``.

    Without the overflow handling it is a few instructions shorter; the
    kernels' exponents are all of this kind.
    """
    return math.exp(x)


#: float32 exp(r) on |r| <= ln2/2, highest degree first.
_F32_COEFFS = (
    0.0013843652559444308,
    0.00837415549904108,
    0.04166800156235695,
    0.16666431725025177,
    0.4999999403953552,
    1.0,
    1.0,
)

#: float64: Taylor coefficients 1/k!, k = 13..0.
_F64_COEFFS = tuple(1.0 / math.factorial(k) for k in range(13, -1, -1))


def _target_has_fma() -> bool:
    """Whether LLVM will compile ``x - n * ln2`` to one fused multiply-add for the CPU Numba targets."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return True
    if numba_config.CPU_NAME is not None:  # a target chosen by the user, e.g. ``generic`` for portable caches
        return "+fma" in (numba_config.CPU_FEATURES or "")
    try:
        return bool(ll.get_host_cpu_features().get("fma", False))
    except RuntimeError:  # LLVM could not read the host's features: assume none
        return False


class _Format:
    """The constants of the exp of one float format (``ln2_parts``: ln2 split in one or two parts)."""

    def __init__(self, ftype, mantissa_bits, max_exponent, ln2_parts, lowest, highest, coeffs):
        f = self.type = ftype
        self.log2e = f(1.4426950408889634)
        # x * log2e + shifter rounds to the nearest integer n (the shifter's
        # ulp is 1) and leaves n + max_exponent in the low mantissa bits
        self.shifter = f(1.5 * 2.0**mantissa_bits + max_exponent)
        self.ln2_parts = tuple(f(c) for c in ln2_parts)
        # below `lowest`, n = -max_exponent: 2**n has all-zero bits and exp
        # flushes to 0; above `highest` exp overflows to inf
        self.lowest, self.highest = f(lowest), f(highest)
        self.max_exponent = f(max_exponent)
        self.coeffs = tuple(f(c) for c in coeffs)


#: ln2 in one part (needs an FMA), or in two whose first has 9 significant bits (exact products with n).
_F32_LN2 = (math.log(2),) if _target_has_fma() else (0.693359375, -2.12194440e-4)
_F32 = _Format(np.float32, 23, 127, _F32_LN2, -88.0, 89.0, _F32_COEFFS)
_F64 = _Format(np.float64, 52, 1023, (6.93147180369123816490e-01, 1.90821492927058770002e-10), -709.0, 710.0, _F64_COEFFS)


def _exp_factory(fmt: _Format, handle_overflow: bool):
    log2e, shifter, ln2_parts = fmt.log2e, fmt.shifter, fmt.ln2_parts
    lowest, highest, max_exponent = fmt.lowest, fmt.highest, fmt.max_exponent
    two = fmt.type(2.0)
    one = fmt.type(1.0)
    lead, coeffs = fmt.coeffs[0], fmt.coeffs[1:]

    def exp(x):
        # the comparisons are written so that a NaN x falls through untouched
        x = lowest if x < lowest else x
        if handle_overflow:
            x = highest if x > highest else x
        t = x * log2e + shifter
        n = t - shifter
        r = x
        for part in ln2_parts:  # a constant tuple, unrolled by LLVM
            r = r - n * part
        p = lead
        for c in coeffs:  # Horner; a constant tuple, unrolled by LLVM
            p = p * r + c
        if handle_overflow:
            # 2**(max_exponent + 1) has no exponent bits: borrow a factor of 2 from p
            big = n > max_exponent
            p = p * two if big else p
            t = t - one if big else t
        return p * pow2_from_shifted(t)

    return exp


_EXP_OPTIONS = dict(jit_options={"fastmath": set(config.FASTMATH_EXACT)}, inline="never")


_FORMATS = {types.float32: _F32, types.float64: _F64}


@overload(vexp, **_EXP_OPTIONS)
def _vexp_impl(x):
    return _exp_factory(_FORMATS[x], handle_overflow=True) if x in _FORMATS else None


@overload(vexp_nonpos, **_EXP_OPTIONS)
def _vexp_nonpos_impl(x):
    return _exp_factory(_FORMATS[x], handle_overflow=False) if x in _FORMATS else None
