"""Kernels built to fail the offline gates, one way each: they show the gates can fail.

Each entry is ``name -> (pyfunc, signature, max_threads, the gate it must fail)``.
"""

import math

from numba import cuda
from numba.cuda.types import float32, int64, void

row = float32[:, ::1]


def promoted_to_float64(x, y):
    # -math.inf is a float64: the max, and everything after it, runs in float64
    r = cuda.blockIdx.x
    m = -math.inf
    for j in range(cuda.threadIdx.x, x.shape[1], cuda.blockDim.x):
        m = max(m, x[r, j])
    for j in range(cuda.threadIdx.x, x.shape[1], cuda.blockDim.x):
        y[r, j] = math.exp(x[r, j] - m)


def local_array(x, y, k):
    # a dynamically indexed array cannot live in registers
    buf = cuda.local.array(40, float32)
    r = cuda.blockIdx.x
    for i in range(40):
        buf[i] = x[r, i]
    y[r, 0] = buf[k[r] % 40]


def scalar_loads(x, y):
    r = cuda.blockIdx.x
    for j in range(cuda.threadIdx.x, x.shape[1], cuda.blockDim.x):
        y[r, j] = x[r, j] * float32(2.0)


def spilling(x, y):
    # 32 running sums and 16 running maxima live across the loop, in a kernel allowed 64 registers
    r = cuda.blockIdx.x
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = float32(0.0)
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = b8 = b9 = b10 = b11 = b12 = b13 = b14 = b15 = float32(0.0)
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = c9 = c10 = c11 = c12 = c13 = c14 = c15 = float32(0.0)
    for j in range(x.shape[1]):
        v = x[r, j]
        a0 += v * 1; a1 += v * 2; a2 += v * 3; a3 += v * 4; a4 += v * 5; a5 += v * 6; a6 += v * 7; a7 += v * 8  # noqa: E702
        a8 += v * 9; a9 += v * 10; a10 += v * 11; a11 += v * 12; a12 += v * 13; a13 += v * 14; a14 += v * 15; a15 += v * 16  # noqa: E702
        b0 = max(b0, v + 1); b1 = max(b1, v + 2); b2 = max(b2, v + 3); b3 = max(b3, v + 4)  # noqa: E702
        b4 = max(b4, v + 5); b5 = max(b5, v + 6); b6 = max(b6, v + 7); b7 = max(b7, v + 8)  # noqa: E702
        b8 = max(b8, v + 9); b9 = max(b9, v + 10); b10 = max(b10, v + 11); b11 = max(b11, v + 12)  # noqa: E702
        b12 = max(b12, v + 13); b13 = max(b13, v + 14); b14 = max(b14, v + 15); b15 = max(b15, v + 16)  # noqa: E702
        c0 += v * a0; c1 += v * a1; c2 += v * a2; c3 += v * a3; c4 += v * a4; c5 += v * a5; c6 += v * a6; c7 += v * a7  # noqa: E702
        c8 += v * a8; c9 += v * a9; c10 += v * a10; c11 += v * a11; c12 += v * a12; c13 += v * a13; c14 += v * a14; c15 += v * a15  # noqa: E702
    y[r, 0] = (
        a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11 + a12 + a13 + a14 + a15
        + b0 * b1 * b2 * b3 * b4 * b5 * b6 * b7 * b8 * b9 * b10 * b11 * b12 * b13 * b14 * b15
        + c0 / c1 / c2 / c3 / c4 / c5 / c6 / c7 / c8 / c9 / c10 / c11 / c12 / c13 / c14 / c15
    )


CONTROLS = {
    "control_promoted_to_float64": (promoted_to_float64, void(row, row), 1024, "f64"),
    "control_local_array": (local_array, void(row, row, int64[::1]), 1024, "local"),
    "control_scalar_loads": (scalar_loads, void(row, row), 1024, "vector"),
    "control_spilling": (spilling, void(row, row), 1024, "spills"),
}
