"""Numba's on-disk cache must not serve kernels compiled from older sources.

Numba checks only the file that defines a cached function; our kernels in
``kernels/cpu_rows.py`` compile in code from ``exp.py``, ``intrinsics.py``,
``rowmath.py`` and ``config.py``. Here a copy of the kernels package is compiled into a private
cache, its exp polynomial is edited, and the kernel must change.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

KERNELS = Path(__file__).resolve().parent.parent / "kernels"

RUN = textwrap.dedent(
    """
    import numpy as np
    from kcopy import cpu_rows
    x = np.linspace(-3.0, 3.0, 64, dtype=np.float32).reshape(2, 32)
    y = np.full_like(x, np.nan)
    cpu_rows.softmax_forward[False](x, y, np.empty((1, 0), np.float32), np.array([0, 2, 1], np.int64))
    print(repr(y.tobytes().hex()))
    """
)


def test_editing_row_math_invalidates_cached_kernels(tmp_path):
    shutil.copytree(KERNELS, tmp_path / "kcopy", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(tmp_path))

    def run() -> str:
        out = subprocess.run([sys.executable, "-c", RUN], env=env, capture_output=True, text=True, check=True, timeout=300)
        return out.stdout.strip()

    first = run()
    assert run() == first  # served from the cache, same bits
    assert any((tmp_path / "cache").rglob("*.nbi"))
    rowmath = tmp_path / "kcopy" / "exp.py"
    source = rowmath.read_text()
    assert "0.4999999403953552" in source
    rowmath.write_text(source.replace("0.4999999403953552", "0.25"))  # a wrong exp
    assert run() != first
