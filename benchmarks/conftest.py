"""The benchmark matrix of fastsoftmax.bench as pytest-benchmark tests.

The default test run passes ``--benchmark-disable`` (pyproject.toml): every
provider then runs once, as a test, on one small shape. With
``--benchmark-enable`` the whole matrix runs, grouped so that each group
compares the providers on one op and shape:

    .venv/bin/python -m pytest benchmarks --benchmark-enable --benchmark-json=out.json
"""

import torch

from fastsoftmax.apps import bench

# when benchmarks are only checked, not timed: one small shape, and torch.compile for one op
# (compiling the others checks torch, not the benchmark)
CHECK_SHAPES = ((256, 10),)
CHECK_COMPILED_OPS = ("softmax_fwd",)


def pytest_generate_tests(metafunc):
    if "case_spec" not in metafunc.fixturenames:
        return
    timing = metafunc.config.getoption("benchmark_enable")
    specs = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        shapes = (bench.GPU_SHAPES if device == "cuda" else bench.CPU_SHAPES) if timing else CHECK_SHAPES
        dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if device == "cuda" and timing else [])
        for dtype in dtypes:
            for shape in shapes:
                for op in bench.OPS:
                    for provider in bench.PROVIDERS:
                        if timing or provider != "torch.compile" or op in CHECK_COMPILED_OPS:
                            specs.append((op, shape, dtype, device, provider))
    ids = [f"{op}-{r}x{c}-{str(dt).removeprefix('torch.')}-{dev}-{p}" for op, (r, c), dt, dev, p in specs]
    metafunc.parametrize("case_spec", specs, ids=ids)
