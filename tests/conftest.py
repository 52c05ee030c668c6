"""Test fixtures: every output buffer is poisoned with NaN before a kernel writes it.

Also: the offline CUDA checks (``test_cuda_offline.py``: the gates and the
simulator, three processes of mostly compiler work) start as soon as the
tests are collected, so that they run beside the CPU tests, whose time is
mostly single-threaded Numba compiles, instead of after them. Under
pytest-xdist (the README's ``-n 2``) the first worker starts them and the
worker that runs ``test_cuda_offline.py`` waits on their files.
"""

import os
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
        if kernels is None:
            return
        run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
        if run is None:  # one process
            config.cuda_background = Background(Path(tempfile.mkdtemp(prefix="fastsoftmax-cuda-")))
        else:  # pytest-xdist: the first worker starts the processes, every worker can wait on their files
            first = os.environ.get("PYTEST_XDIST_WORKER") == "gw0"
            config.cuda_background = Background(Path(tempfile.gettempdir()) / f"fastsoftmax-cuda-{run}", start=first)


def pytest_unconfigure(config):
    background = getattr(config, "cuda_background", None)
    if background is not None:
        # another worker may still be waiting on what this one started
        background.close(wait=900 if os.environ.get("PYTEST_XDIST_WORKER") else 0)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every output buffer starts as NaN, so an element a kernel forgets to write fails the test."""
    real_empty = layout._CPU.empty

    def poisoned(shape, dtype, device=None):
        out = real_empty(shape, dtype, device)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    real_empty_array = layout._CPU.empty_array

    def poisoned_array(shape, dtype):
        out, array = real_empty_array(shape, dtype)
        array.fill(float("nan"))
        return out, array

    monkeypatch.setattr(layout._CPU, "empty", staticmethod(poisoned))
    monkeypatch.setattr(layout._CPU, "empty_array", staticmethod(poisoned_array))
    yield
