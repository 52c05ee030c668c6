"""Test fixtures: every output buffer is poisoned with NaN before a kernel writes it.

Also: the offline CUDA checks (``test_cuda_offline.py``: the gates and the
simulator, three processes of mostly compiler work) start as soon as the
tests are collected, so that they run beside the CPU tests, whose time is
mostly single-threaded Numba compiles, instead of after them.
"""

import tempfile
from pathlib import Path

import pytest

from fastsoftmax.ops import layout


def pytest_collection_modifyitems(session, config, items):
    if any(item.nodeid.startswith("tests/test_cuda_offline.py") for item in items):
        try:
            from test_cuda_offline import Background, kernels
        except ImportError:  # pragma: no cover - numba-cuda missing
            return
        if kernels is not None:
            config.cuda_background = Background(Path(tempfile.mkdtemp(prefix="fastsoftmax-cuda-")))


def pytest_unconfigure(config):
    background = getattr(config, "cuda_background", None)
    if background is not None:
        background.close()


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
