"""Test fixtures: every output buffer is poisoned with NaN before a kernel writes it."""

import pytest

import fastsoftmax._cpu_backend as cpu_backend


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
