"""Shared test fixtures: the tolerance table, the float64 reference, output poisoning."""

import numpy as np
import pytest
import torch

import fastsoftmax._cpu_backend as cpu_backend

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


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every output buffer starts as NaN, so an element a kernel forgets to write fails the test."""
    real_empty = cpu_backend.empty

    def poisoned(shape, dtype, device=None):
        out = real_empty(shape, dtype, device)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(cpu_backend, "empty", poisoned)
    yield
