"""CUDA: the simulator runs everywhere; the rest needs a GPU.

``pytest -k cuda`` selects every test here.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as TF
from helpers import FLOAT_DTYPES, assert_close, randn

import fastsoftmax

HERE = Path(__file__).parent

try:  # numba-cuda (the dev extra brings it, with NVVM and nvJitLink for the offline gates)
    from numba import cuda as numba_cuda
except ImportError:  # pragma: no cover
    numba_cuda = None

needs_numba_cuda = pytest.mark.skipif(numba_cuda is None, reason="numba-cuda is not installed")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_numba_cuda
def test_cuda_simulator_runs_every_kernel_and_the_torch_side_against_float64():
    """Every launch shape, aligned and unaligned rows, every dtype (bfloat16 too), the shuffle reductions;
    then the torch side of the CUDA design (cuda_sim_torch.py): autograd, opcheck, torch.compile."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run(
        [sys.executable, str(HERE / "cuda_sim_driver.py"), "--torch"],
        env=env, capture_output=True, text=True, timeout=600, cwd=HERE,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all simulator checks passed" in proc.stdout


# --- on a GPU --------------------------------------------------------------------

GPU_COLUMNS = [
    1,  # one column
    1000,  # warp per row
    32768,  # block per row, online
    262144,  # the longest rows the issue names
]


@needs_gpu
@pytest.mark.parametrize("n_cols", GPU_COLUMNS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("op,ref", [(fastsoftmax.softmax, TF.softmax), (fastsoftmax.log_softmax, TF.log_softmax)], ids=["softmax", "log_softmax"])
def test_cuda_softmax_against_float64(op, ref, dtype, n_cols):
    x = randn(8, n_cols, dtype=dtype).cuda().requires_grad_()
    y = op(x, 1)
    x64 = x.detach().double().requires_grad_()
    y64 = ref(x64, 1)
    assert_close(y.cpu(), y64.cpu(), dtype)
    dy = randn(8, n_cols, dtype=dtype).cuda()
    (dx,) = torch.autograd.grad(y, x, dy)
    if dtype in (torch.float16, torch.bfloat16):  # backward from the rounded output, as in test_softmax
        yd = y.detach().double()
        dx64 = yd * (dy.double() - (dy.double() * yd).sum(1, keepdim=True)) if op is fastsoftmax.softmax else dy.double() - yd.exp() * dy.double().sum(1, keepdim=True)
    else:
        (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert_close(dx.cpu(), dx64.cpu(), dtype)


@needs_gpu
@pytest.mark.parametrize("n_cols", GPU_COLUMNS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_cross_entropy_against_float64(dtype, n_cols, reduction):
    x = randn(16, n_cols, dtype=dtype).cuda().requires_grad_()
    t = torch.randint(0, n_cols, (16,)).cuda()
    t[3] = -100
    w = (torch.rand(n_cols, dtype=torch.float64) + 0.5).cuda()
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    loss = fastsoftmax.cross_entropy(x, t, **kw)
    go = torch.rand_like(loss)
    (dx,) = torch.autograd.grad(loss, x, go)
    x64 = x.detach().double().requires_grad_()
    ref = TF.cross_entropy(x64, t, **kw)
    (dx64,) = torch.autograd.grad(ref, x64, go.double())
    assert_close(loss.cpu(), ref.cpu(), dtype)
    assert_close(dx.cpu(), dx64.cpu(), dtype)


@needs_gpu
def test_cuda_extremes_and_masks():
    x = (randn(4, 5000) * 1e30).cuda()
    assert_close(fastsoftmax.softmax(x, 1).cpu(), TF.softmax(x.double(), 1).cpu())
    x = (randn(4, 5000) - 200).cuda()
    assert_close(fastsoftmax.log_softmax(x, 1).cpu(), TF.log_softmax(x.double(), 1).cpu())
    x = randn(4, 5000).cuda()
    x[:, ::2] = float("-inf")
    y = fastsoftmax.softmax(x, 1)
    assert (y[:, ::2] == 0).all() and torch.isfinite(y).all()


@needs_gpu
def test_cuda_bad_target_raises():
    with pytest.raises(IndexError, match="out of bounds"):
        fastsoftmax.cross_entropy(torch.randn(4, 5).cuda(), torch.tensor([0, 1, 9, 2]).cuda())


@needs_gpu
@pytest.mark.slow
def test_cuda_tensor_past_two_to_the_31_elements():
    n_cols = 1 << 16
    n_rows = (1 << 31) // n_cols + 2  # 2**31 + 2 * 2**16 elements of float16: 4 GiB
    free, _ = torch.cuda.mem_get_info()
    if free < 12 << 30:
        pytest.skip("needs 12 GiB of free GPU memory")
    x = torch.randn(n_rows, n_cols, device="cuda", dtype=torch.float16)
    y = fastsoftmax.softmax(x, 1)
    for row in (0, n_rows // 2, n_rows - 1):  # the last rows lie past element 2**31
        assert_close(y[row].cpu(), TF.softmax(x[row].double(), 0).cpu(), torch.float16)
