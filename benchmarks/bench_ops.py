"""Providers compared per op and shape; see conftest.py for how the matrix is chosen."""

import torch

from fastsoftmax.apps import bench


def test_provider(benchmark, case_spec):
    op, (n_rows, n_cols), dtype, device, provider = case_spec
    case = bench.make_case(op, n_rows, n_cols, dtype, device, providers=(provider,))
    call = case.calls[provider]
    call()  # warm-up: Numba and torch.compile compile here, outside the timing
    benchmark.group = f"{op} {n_rows}x{n_cols} {str(dtype).removeprefix('torch.')} {device}"
    benchmark.extra_info["bytes"] = case.bytes
    result = benchmark(call)
    if result is not None and provider != "naive":  # the forward ops return their output
        assert torch.isfinite(result).all()
