"""Numba kernels for softmax, log-softmax and cross-entropy.

This package never imports torch: it works on NumPy arrays (CPU, :mod:`.cpu`)
and CUDA device arrays (:mod:`.cuda`, imported only on demand). The row math
both targets share lives in :mod:`.rowmath`; every tunable in :mod:`.config`.
"""
