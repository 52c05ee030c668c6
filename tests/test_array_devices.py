"""fastsoftmax.array: which kernels an array goes to, DLPack in and out, and the CUDA log-sum-exp kernel.

No GPU here, and CuPy cannot run without one. What runs:

* the dispatch and the whole CUDA path of the array API above the numba
  glue, with a test double: a NumPy-backed array that exports
  ``__cuda_array_interface__``, a CuPy stand-in whose operations return such
  arrays, and a stub CUDA backend that records what it was called with and
  computes with the CPU backend (values checked against the CPU path);
* DLPack round trips with host-memory producers (a DLPack-only wrapper,
  torch, JAX when installed) and routing of a CUDA DLPack producer;
* the CUDA log-sum-exp kernel: compiled to PTX, and run in the CUDA
  simulator against SciPy.

Not run here: ``numba.cuda.as_cuda_array`` on real CuPy memory, CuPy's
stream handed to ``external_stream``, the CUDA backend itself.
"""

import os
import subprocess
import sys
import types

import numpy as np
import pytest
import scipy.special as sp

import fastsoftmax.array as fa
from fastsoftmax import errors
from fastsoftmax.array import _devices
from fastsoftmax.array._cuda import CUDADevice
from fastsoftmax.backends import cpu

RNG = np.random.default_rng(1717)


def logits(*shape, dtype=np.float32):
    return (RNG.standard_normal(shape) * 3).astype(dtype)


# --- a CuPy stand-in -------------------------------------------------------------------


class DeviceArray(np.ndarray):
    """NumPy memory that says it is a CUDA array (as a CuPy array does)."""

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ctypes.data, False), "version": 3,
                "strides": None if self.flags.c_contiguous else self.strides}


def _device(value):
    if isinstance(value, np.ndarray):
        return value.view(DeviceArray)
    if isinstance(value, (tuple, list)):
        return type(value)(_device(v) for v in value)
    return value


class FakeCuPy(types.ModuleType):
    """NumPy's functions, whose array results are :class:`DeviceArray` s; a current stream with a known handle."""

    ndarray = DeviceArray
    STREAM = 0xC0FFEE

    def __init__(self):
        super().__init__("cupy")
        self.cuda = types.SimpleNamespace(get_current_stream=lambda: types.SimpleNamespace(ptr=self.STREAM))

    def __getattr__(self, name):
        value = getattr(np, name)
        if not callable(value) or isinstance(value, type):
            return value

        def call(*args, **kwargs):
            with np.errstate(all="ignore"):  # CuPy does not warn about floating-point exceptions
                return _device(value(*args, **kwargs))

        return call

    @staticmethod
    def from_dlpack(value):
        return value.data.view(DeviceArray)  # the CUDA DLPack producer below holds NumPy memory


class Viewed:
    """What the numba glue hands the backend (a numba device array, on a GPU)."""

    def __init__(self, a):
        assert isinstance(a, DeviceArray), f"a {type(a).__name__} reached the CUDA backend"
        self.host = a.view(np.ndarray)


class StubBackend:
    """The CUDA backend's array-and-stream interface, recorded, computed by the CPU backend."""

    def __init__(self):
        self.calls = []
        self.grads = {}

    def _record(self, name, stream, *arrays):
        assert stream == ("stream", FakeCuPy.STREAM), stream
        self.calls.append((name, [a.host.shape for a in arrays if a is not None]))

    def softmax_forward(self, x, y, log, stream=0):
        self._record("softmax_forward", stream, x, y)
        cpu.softmax_forward(x.host, y.host, log)

    def softmax_backward(self, y, dy, dx, log, stream=0):
        self._record("softmax_backward", stream, y, dy, dx)
        cpu.softmax_backward(y.host, dy.host, dx.host, log)

    def _forward(self, prob, x, t, w, ignore_index, eps, reduction, loss, out, saved):
        xh = x.host
        wh = None if w is None else w.host.astype(xh.dtype)
        if prob:
            denom = count = xh.shape[0]
        else:
            denom, count = cpu.check_targets(t.host, xh.shape[1], ignore_index, wh)
        scale, z = cpu.scales(denom, count, reduction, 0.0)
        rows, grad = np.empty(xh.shape[0]), np.empty_like(xh)
        if prob:
            cpu.cross_entropy_prob(xh, t.host, wh, eps, scale, z, rows, np.empty(0), grad)
        else:
            cpu.cross_entropy_index(xh, t.host, wh, ignore_index, eps, scale, z, rows, np.empty(0), grad)
        loss.host[...] = rows
        if out is not None:
            out.host[0] = rows.sum() / denom if reduction == "mean" else rows.sum()
        self.grads[saved.host.ctypes.data] = grad

    def cross_entropy_index(self, x, t, w, ignore_index, eps, reduction, loss, out, saved, stream=0, check=False):
        self._record("cross_entropy_index", stream, x, t, w, loss, out, saved)
        self._forward(False, x, t, w, ignore_index, eps, reduction, loss, out, saved)

    def cross_entropy_prob(self, x, q, w, eps, reduction, loss, out, saved, stream=0):
        self._record("cross_entropy_prob", stream, x, q, w, loss, out, saved)
        self._forward(True, x, q, w, -100, eps, reduction, loss, out, saved)

    def _backward(self, saved, grad_out, grad):
        g = grad_out.host
        grad.host[...] = self.grads[saved.host.ctypes.data] * (g[:, None] if g.shape[0] > 1 else g)

    def cross_entropy_index_backward(self, x, t, w, ignore_index, eps, reduction, saved, grad_out, grad, stream=0):
        self._record("cross_entropy_index_backward", stream, x, t, w, saved, grad_out, grad)
        self._backward(saved, grad_out, grad)

    def cross_entropy_prob_backward(self, x, q, w, eps, reduction, saved, grad_out, grad, stream=0):
        self._record("cross_entropy_prob_backward", stream, x, q, w, saved, grad_out, grad)
        self._backward(saved, grad_out, grad)


@pytest.fixture
def fake_cuda(monkeypatch):
    backend = StubBackend()
    launches = []

    def lse_kernel(dtype):
        class Launch:
            def __getitem__(self, config):
                blocks, threads, stream = config
                assert stream == ("stream", FakeCuPy.STREAM)
                launches.append((dtype, blocks, threads))
                return lambda x, out: cpu.logsumexp(x.host, out.host)

        return Launch()

    device = CUDADevice(FakeCuPy(), backend, lambda a: None if a is None else Viewed(a), lambda: ("stream", FakeCuPy.STREAM), lse_kernel)
    monkeypatch.setattr(_devices, "cuda_device", lambda: device)
    backend.launches = launches
    return backend


# --- routing ---------------------------------------------------------------------------


def test_cuda_arrays_go_to_the_cuda_backend_on_cupys_stream(fake_cuda):
    x = logits(4, 30, 20)
    for op in ("softmax", "log_softmax"):
        fake_cuda.calls.clear()
        y = getattr(fa, op)(x.view(DeviceArray), axis=1)
        assert type(y) is DeviceArray and y.shape == x.shape
        rows = np.moveaxis(getattr(fa, op)(np.moveaxis(x, 1, -1), axis=-1), -1, 1)  # the CPU's row kernels: same bits
        np.testing.assert_array_equal(y.view(np.ndarray), rows)
        # on CUDA the classes are moved last for the row kernels (the CPU reduces them in place)
        assert fake_cuda.calls == [("softmax_forward", [(80, 30), (80, 30)])]
    lse = fa.logsumexp(x.view(DeviceArray), axis=1)
    assert type(lse) is DeviceArray
    np.testing.assert_allclose(lse, sp.logsumexp(x.astype(np.float64), axis=1), rtol=2e-6)
    assert fake_cuda.launches == [("float32", 80, 256)]


def test_numpy_arrays_never_reach_the_cuda_backend(fake_cuda):
    x = logits(6, 40)
    fa.softmax(x, axis=1)
    fa.logsumexp(x, axis=0)
    fa.cross_entropy(x, np.zeros(6, np.int64), return_grad=True)
    assert fake_cuda.calls == [] and fake_cuda.launches == []


def test_cuda_results_stay_0d_arrays_not_scalars(fake_cuda):
    loss = fa.cross_entropy(logits(5, 7).view(DeviceArray), np.arange(5).view(DeviceArray))
    assert type(loss) is DeviceArray and loss.shape == ()  # a host scalar would wait for the device


def test_cuda_backward(fake_cuda):
    y = fa.softmax(logits(3, 50), axis=0)
    dy = logits(3, 50)
    dx = fa.softmax_backward(y.view(DeviceArray), dy.view(DeviceArray), axis=0)
    assert type(dx) is DeviceArray
    np.testing.assert_array_equal(dx.view(np.ndarray), fa.softmax_backward(y, dy, axis=0))
    assert fake_cuda.calls == [("softmax_backward", [(50, 3)] * 3)]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("prob", [False, True])
def test_cuda_cross_entropy_forward_then_backward(fake_cuda, reduction, prob):
    x = logits(6, 11, 4, dtype=np.float64)  # classes on axis 1
    target = sp.softmax(RNG.standard_normal(x.shape), axis=1) if prob else RNG.integers(0, 11, (6, 4))
    w = RNG.uniform(0.5, 2, 11)
    kw = dict(axis=1, reduction=reduction, label_smoothing=0.1, return_grad=True)
    loss, grad = fa.cross_entropy(x.view(DeviceArray), target.view(DeviceArray), weight=w.view(DeviceArray), **kw)
    ref_loss, ref_grad = fa.cross_entropy(x, target, weight=w, **kw)
    assert type(grad) is DeviceArray and grad.shape == x.shape and np.shape(loss) == np.shape(ref_loss)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-15)
    name = "cross_entropy_prob" if prob else "cross_entropy_index"
    assert [c[0] for c in fake_cuda.calls] == [name, name + "_backward"]
    assert fake_cuda.calls[0][1][0] == (24, 11)  # rows of 11 classes


def test_cuda_weighted_logsumexp_in_cupy_operations(fake_cuda):
    inf, nan = np.inf, np.nan
    x = np.array([[inf, 1.0, 2.0], [nan, 1.0, 2.0], [1.0, 1.0, 5.0], [inf, -inf, 0.0], [1.0, 2.0, 3.0], [0.5, -1, 2]])
    b = np.array([[0.0, 1, 1], [0, 1, 1], [1, -1, 0], [1, 1, 1], [0, 0, 0], [2, -0.5, 1]])
    ours = fa.logsumexp(x.view(DeviceArray), axis=1, b=b.view(DeviceArray), return_sign=True)
    ref = sp.logsumexp(x, axis=1, b=b, return_sign=True)
    for a, r in zip(ours, ref):
        assert type(a) is DeviceArray
        np.testing.assert_allclose(a.view(np.ndarray), r, rtol=1e-14)
    assert fake_cuda.calls == [] and fake_cuda.launches == []  # no kernel: CuPy operations


def test_host_and_device_arrays_do_not_mix(fake_cuda):
    x = logits(4, 5)
    with pytest.raises(errors.DeviceError, match="target is a NumPy array"):
        fa.cross_entropy(x.view(DeviceArray), np.zeros(4, np.int64))
    with pytest.raises(errors.DeviceError, match="dy is a CUDA array"):
        fa.softmax_backward(x, x.view(DeviceArray), axis=1)


def test_cuda_dlpack_producers_go_through_cupy_and_come_back_in_their_kind(fake_cuda):
    class OnCuda:
        def __init__(self, data):
            self.data = data

        def __dlpack__(self, **kwargs):
            raise AssertionError("taken by CuPy's from_dlpack")

        def __dlpack_device__(self):
            return (2, 0)  # kDLCUDA

        def __array_namespace__(self, api_version=None):
            return types.SimpleNamespace(from_dlpack=lambda a: OnCuda(np.asarray(a)))

    x = logits(3, 9)
    y = fa.softmax(OnCuda(x), axis=1)
    assert isinstance(y, OnCuda)
    np.testing.assert_array_equal(y.data, fa.softmax(x, axis=1))
    assert fake_cuda.calls[0][0] == "softmax_forward"


def test_cuda_arrays_without_cupy_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(CUDADevice, "_default", None)
    with pytest.raises(errors.DeviceError, match="pip install cupy"):
        fa.softmax(logits(2, 3).view(DeviceArray))
# --- DLPack from host memory ---------------------------------------------------------


class Foreign:
    """An array of another library, in host memory, that speaks DLPack (NumPy underneath)."""

    def __init__(self, data):
        self.data = data

    def __dlpack__(self, **kwargs):
        return self.data.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.data.__dlpack_device__()

    def __array_namespace__(self, api_version=None):
        return ForeignNamespace


class ForeignNamespace:
    @staticmethod
    def from_dlpack(x):
        return Foreign(np.from_dlpack(x))


def test_dlpack_in_and_out_in_the_callers_kind():
    x = logits(10, 30)
    y = fa.softmax(Foreign(x), axis=1)
    assert isinstance(y, Foreign)
    np.testing.assert_array_equal(y.data, fa.softmax(x, axis=1))
    lse, sign = fa.logsumexp(Foreign(x), axis=1, return_sign=True)
    assert isinstance(lse, Foreign) and isinstance(sign, Foreign)
    loss, grad = fa.cross_entropy(Foreign(x), Foreign(np.zeros(10, np.int64)), return_grad=True)
    assert isinstance(loss, Foreign) and loss.data.shape == () and isinstance(grad, Foreign)


def test_dlpack_torch_tensors_come_back_as_tensors():
    torch = pytest.importorskip("torch")
    x = torch.randn(8, 50, dtype=torch.float64)
    y = fa.log_softmax(x, axis=1)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64
    torch.testing.assert_close(y, torch.log_softmax(x, 1), rtol=1e-12, atol=1e-13)
    x.requires_grad_()
    with pytest.raises(errors.ArgumentError, match="DLPack"):
        fa.softmax(x, axis=1)
    with pytest.raises(errors.UnsupportedDTypeError, match="bfloat16"):
        fa.softmax(torch.randn(4, 5, dtype=torch.bfloat16), axis=1)


def test_dlpack_jax_arrays_come_back_as_jax_arrays():
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.asarray(logits(6, 40))
    y = fa.softmax(x, axis=-1)
    assert type(y) is type(x)
    np.testing.assert_allclose(np.asarray(y), sp.softmax(np.asarray(x, np.float64), axis=-1), rtol=1.3e-6, atol=1e-5)


# --- the CUDA log-sum-exp kernel ----------------------------------------------------

cuda_lse = pytest.importorskip("fastsoftmax.kernels.cuda_lse", reason="numba-cuda is not installed")


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_cuda_logsumexp_kernel_compiles_to_ptx(dtype):
    from numba import cuda

    for cc in ((8, 0), (9, 0)):
        ptx, _ = cuda.compile_ptx(cuda_lse.logsumexp_rows(dtype, 256), cuda_lse.signature(dtype), cc=cc)
        assert f".target sm_{cc[0]}{cc[1]}" in ptx and ".entry" in ptx


SIMULATOR_CHECK = """
import numpy as np, scipy.special as sp, warnings
from numba import cuda
from fastsoftmax.kernels import cuda_lse
warnings.simplefilter("ignore")
inf, nan = np.inf, np.nan
special = np.array([[1, 2, 3, 0.5, 0, 0, 0], [-inf] * 7, [1, inf, 2, -inf, 0, 0, 0], [1, nan, 2, 3, 0, 0, 0],
                    [nan, inf, -inf, 0, 0, 0, 0], [0, -inf, 1, -inf, 0, 0, 0], [80, -80, 81, 0, 0, 0, 0]])
rng = np.random.default_rng(0)
for dtype, tol in (("float32", 2e-6), ("float64", 1e-13), ("float16", 2e-3)):
    # 7 columns (fewer than the 8 threads), 37 (not a multiple), no columns; 9 rows on 4 blocks (grid-stride)
    for x in (special, rng.standard_normal((9, 37)) * 3, np.empty((3, 0))):
        x = x.astype(dtype)
        out = np.full(x.shape[0], 123.0)
        cuda.jit(cuda_lse.logsumexp_rows(dtype, 8))[4, 8](x, out)
        ref = sp.logsumexp(x.astype(np.float64), axis=1)
        assert np.array_equal(np.isnan(out), np.isnan(ref)), (dtype, out, ref)
        np.testing.assert_allclose(out, ref, rtol=tol)
print("simulator ok")
"""


def test_cuda_logsumexp_kernel_in_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", SIMULATOR_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "simulator ok" in proc.stdout


# --- on a GPU, with CuPy (skipped here) ---------------------------------------------------


def _cupy_on_a_gpu():
    try:
        import cupy

        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device
        return None


CUPY = _cupy_on_a_gpu()
needs_gpu = pytest.mark.skipif(CUPY is None, reason="needs CuPy and a CUDA device")


def _backend_takes_arrays() -> bool:
    import inspect

    try:
        from fastsoftmax.backends import cuda as backend
    except ImportError:
        return False
    return "stream" in inspect.signature(backend.softmax_forward).parameters


needs_array_backend = pytest.mark.skipif(
    CUPY is None or not _backend_takes_arrays(), reason="needs a GPU and the CUDA backend's array-and-stream interface"
)


@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_gpu_logsumexp_on_cupy_arrays(dtype):
    rows = np.concatenate([RNG.standard_normal((300, 4097)) * 3, np.full((1, 4097), -np.inf)])
    rows[0, 5], rows[1, 7] = np.inf, np.nan
    x = CUPY.asarray(rows.astype(dtype))
    stream = CUPY.cuda.Stream(non_blocking=True)
    with stream:
        lse = fa.logsumexp(x, axis=1)
    stream.synchronize()
    assert isinstance(lse, CUPY.ndarray) and lse.dtype == dtype
    ref = sp.logsumexp(rows.astype(dtype).astype(np.float64), axis=1)
    np.testing.assert_allclose(CUPY.asnumpy(lse).astype(np.float64), ref, rtol=2e-3 if dtype == np.float16 else 2e-6)


@needs_array_backend
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_gpu_softmax_backward_and_cross_entropy_on_cupy_arrays(dtype):
    host = (RNG.standard_normal((64, 3, 1000)) * 3).astype(dtype)
    x = CUPY.asarray(host)
    tol = dict(rtol=2e-3, atol=1e-4) if dtype == np.float16 else dict(rtol=2e-5, atol=1e-6)
    for op in ("softmax", "log_softmax"):
        y = getattr(fa, op)(x, axis=-1)
        np.testing.assert_allclose(CUPY.asnumpy(y).astype(np.float64), getattr(fa, op)(host.astype(np.float64), axis=-1), **tol)
    y = fa.softmax(x, axis=1)
    dy = CUPY.asarray(RNG.standard_normal(host.shape).astype(dtype))
    dx = fa.softmax_backward(y, dy, axis=1)
    ref = fa.softmax_backward(CUPY.asnumpy(y).astype(np.float64), CUPY.asnumpy(dy).astype(np.float64), axis=1)
    np.testing.assert_allclose(CUPY.asnumpy(dx).astype(np.float64), ref, **tol)
    target = RNG.integers(0, 1000, (64, 3))
    loss, grad = fa.cross_entropy(x, CUPY.asarray(target), return_grad=True, label_smoothing=0.1)
    ref_loss, ref_grad = fa.cross_entropy(host.astype(np.float64), target, return_grad=True, label_smoothing=0.1)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-3 if dtype == np.float16 else 1e-5)
    np.testing.assert_allclose(CUPY.asnumpy(grad).astype(np.float64), ref_grad, **tol)


def _numba_gpu() -> bool:
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not _numba_gpu(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_gpu_logsumexp_kernel_on_numba_device_arrays(dtype):
    # no CuPy needed: the kernel itself on the GPU, long rows and the special values
    from fastsoftmax.kernels import cuda as kernels
    from numba import cuda

    rows = np.concatenate([RNG.standard_normal((500, 32000)) * 3, np.full((1, 32000), -np.inf), np.empty((1, 32000))])
    rows[-1] = 1.0
    rows[0, 5], rows[1, 7], rows[2, 9], rows[3, :] = np.inf, np.nan, -np.inf, np.inf
    host = rows.astype(dtype)
    out = cuda.device_array(host.shape[0], dtype=np.float64)
    kernel = kernels.get("logsumexp", dtype)  # as fastsoftmax.array launches it: launch bounds, cuda_lse.THREADS threads
    kernel[min(host.shape[0], 65535), cuda_lse.THREADS](cuda.to_device(host), out)
    got = out.copy_to_host()
    ref = sp.logsumexp(host.astype(np.float64), axis=1)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got, ref, rtol=2e-3 if dtype == "float16" else 2e-6)


BACKEND_SIMULATOR_CHECK = """
import sys
import numpy as np
sys.path.insert(0, {tests!r})
import cuda_sim
cuda_sim.install()
cuda_sim.small_launch_shapes()
from numba import cuda
import fastsoftmax.array as fa
from fastsoftmax.array import _devices
from fastsoftmax.array._cuda import CUDADevice
from fastsoftmax.backends import cuda as backend
from fastsoftmax.kernels import cuda_lse
from test_array_devices import DeviceArray, FakeCuPy

def view(a):
    return None if a is None else np.asarray(a).view(np.ndarray)  # the simulator launches on NumPy memory

device = CUDADevice(FakeCuPy(), backend, view, lambda: 0, lambda dtype: cuda.jit(cuda_lse.logsumexp_rows(dtype, 16)), 16)
_devices.cuda_device = lambda: device
rng = np.random.default_rng(3)
for dtype, tol in ((np.float32, 2e-6), (np.float16, 2e-3)):
    x = (rng.standard_normal((3, 37, 2)) * 3).astype(dtype)
    x64 = x.astype(np.float64)
    on = lambda a: a.view(DeviceArray)
    for op in ("softmax", "log_softmax", "logsumexp"):
        got = getattr(fa, op)(on(x), axis=1)
        assert type(got) is DeviceArray and got.dtype == dtype, (op, type(got), got.dtype)
        np.testing.assert_allclose(got.astype(np.float64), getattr(fa, op)(x64, axis=1), rtol=tol, atol=tol)
    y = fa.softmax(x64, axis=1).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    got = fa.softmax_backward(on(y), on(dy), axis=1)
    np.testing.assert_allclose(got.astype(np.float64), fa.softmax_backward(y.astype(np.float64), dy.astype(np.float64), axis=1), rtol=tol, atol=tol)
    t = rng.integers(0, 37, (3, 2))
    t[0, 1] = -100
    w = rng.uniform(0.5, 2.0, 37)
    if dtype == np.float16:
        continue  # the simulator is slow: the cross-entropy in float32 only
    for target, reduction in ((t, "mean"), (rng.dirichlet(np.ones(37), (3, 2)).transpose(0, 2, 1), "none")):
        kw = dict(axis=1, reduction=reduction, label_smoothing=0.1, return_grad=True)
        loss, grad = fa.cross_entropy(on(x), on(target), weight=on(w), **kw)
        ref_loss, ref_grad = fa.cross_entropy(x64, target, weight=w, **kw)
        np.testing.assert_allclose(np.asarray(loss, np.float64), ref_loss, rtol=max(tol, 1e-6), atol=tol)
        np.testing.assert_allclose(grad.astype(np.float64), ref_grad, rtol=tol, atol=max(tol, 1e-6))
    try:  # the backend's target check, raised through the array API
        fa.cross_entropy(on(x), on(np.full((3, 2), 40)), axis=1)
        raise AssertionError("no IndexError")
    except IndexError as error:
        assert "out of bounds" in str(error)
print("backend simulator ok")
"""


def test_cuda_path_on_the_real_cuda_backend_in_the_simulator():
    # the CUDA backend itself (kernels.cuda, as merged), driven by the array API's CUDA device on NumPy memory
    from pathlib import Path

    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    code = BACKEND_SIMULATOR_CHECK.format(tests=tests)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=tests)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "backend simulator ok" in proc.stdout
