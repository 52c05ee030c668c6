"""Test fixtures: every output buffer is poisoned with NaN before a kernel writes it."""

import pytest

from fastsoftmax.ops import layout


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every output buffer starts as NaN, so an element a kernel forgets to write fails the test."""
    real_empty = layout._CPU.empty

    def poisoned(shape, dtype, device=None):
        out = real_empty(shape, dtype, device)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(layout._CPU, "empty", staticmethod(poisoned))
    yield
