"""Shared test helpers: the tolerance table, comparison against float64, fresh random logits."""

import numpy as np
import torch

# One table by dtype: (rtol, atol) of an output against the float64 reference
# computed from the same (already rounded) input. Start from
# torch.testing.assert_close's defaults; every change is commented.
TOLERANCES = {
    # float64: the kernels' own rounding (exp <= 1 ulp, float64 sums) is ~1e-15;
    # torch's default (1e-7, 1e-7) would hide a float32 code path slipping in.
    torch.float64: (1e-12, 1e-13),
    torch.float32: (1.3e-6, 1e-5),
    # half precision: computed in float32, so the error is the final rounding
    # to the storage dtype (half an ulp): torch's defaults.
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}

FLOAT_DTYPES = list(TOLERANCES)


def assert_close(actual, expected, dtype=None):
    dtype = dtype or actual.dtype
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True)


def randn(*shape, dtype=torch.float32, scale=3.0, seed=None):
    """Fresh, non-zero random logits (never test on zeros)."""
    g = torch.Generator().manual_seed(seed if seed is not None else int(np.random.randint(1 << 30)))
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def backward_reference(log: bool, y, dy, dim):
    """The softmax (``log``: log-softmax) gradient in float64, from the output ``y`` the forward returned.

    The backward receives that output rounded to its dtype, as torch's does;
    computed from the float64 output instead, log-softmax's
    ``dy - exp(y) * sum(dy)`` would turn the float32 rounding of ``y`` into
    errors of ``p * |sum(dy)| * ulp(y)``: 1.4e-5 at 1000 classes, past the
    float32 tolerance, for torch's own kernel too.
    """
    y, dy = y.detach().double(), dy.double()
    if y.ndim == 0:
        return torch.zeros_like(y)
    if log:
        return dy - y.exp() * dy.sum(dim, keepdim=True)
    return y * (dy - (dy * y).sum(dim, keepdim=True))
