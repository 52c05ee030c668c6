"""The softmax-regression example: IDX loading, download-and-verify, training, the CLI."""

import gzip
import hashlib
import http.server
import json
import struct
import sys
import threading
from functools import partial

import numpy as np
import pytest
import torch

from fastsoftmax.apps import cli, precision
from fastsoftmax.apps.d2l import data, model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_idx(path, array: np.ndarray, compress=True):
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def planted_fashion_files(folder, n_train=60, n_test=20, seed=0):
    """Four small Fashion-MNIST-shaped IDX files; each class lights up its own 3x28 band."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 40, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c : 2 * c + 3, :] = 250
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def test_read_idx_round_trip(tmp_path):
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(np.uint8)
    write_idx(tmp_path / "a.gz", a)
    write_idx(tmp_path / "a", a, compress=False)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz"), a)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a"), a)


@pytest.mark.parametrize(
    "content,match",
    [
        (gzip.compress(b"\x00\x00\x0d\x03" + struct.pack(">3I", 1, 2, 2) + bytes(4)), "not an IDX file"),
        (gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + bytes(7)), "holds 7"),
        (gzip.compress(b"\x00\x00\x08\x03\x00\x00"), "truncated IDX header"),
        (b"\x1f\x8b\x08\x00garbage that is not gzip", "cannot be read"),
    ],
    ids=["bad magic", "short data", "short header", "corrupt gzip"],
)
def test_corrupt_idx_raises_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.gz"
    path.write_bytes(content)
    with pytest.raises(data.DataError, match=match):
        data.read_idx(path)


def test_load_fashion_mnist_from_data_dir(tmp_path):
    ds = data.load_fashion_mnist(planted_fashion_files(tmp_path))
    assert ds.train_images.shape == (60, 28, 28) and ds.test_images.shape == (20, 28, 28)
    assert ds.train_images.dtype == torch.float32 and 0.0 <= ds.train_images.min() and ds.train_images.max() <= 1.0
    assert ds.classes[9] == "ankle boot" and ds.n_inputs == 784


def test_missing_file_in_data_dir(tmp_path):
    planted_fashion_files(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz not found"):
        data.load_fashion_mnist(tmp_path)


@pytest.fixture
def local_mirrors(tmp_path, monkeypatch):
    """Two HTTP mirrors on 127.0.0.1: the first serves corrupt files, the second good ones."""
    good = planted_fashion_files(tmp_path / "good")
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in data.FASHION_MNIST_FILES:
        (bad / name).write_bytes(b"corrupted")
    checksums = {name: hashlib.md5((good / name).read_bytes()).hexdigest() for name in data.FASHION_MNIST_FILES}
    monkeypatch.setattr(data, "FASHION_MNIST_FILES", checksums)
    monkeypatch.setenv("FASTSOFTMAX_CACHE", str(tmp_path / "cache"))
    servers = []
    for folder in (bad, good):
        handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *a, **k: None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield tuple(f"http://127.0.0.1:{s.server_address[1]}/" for s in servers)
    for server in servers:
        server.shutdown()
        server.server_close()


def test_download_verifies_checksums_and_caches(local_mirrors, tmp_path):
    ds = data.load_fashion_mnist(mirrors=local_mirrors, timeout=5)
    assert ds.train_images.shape == (60, 28, 28)
    cached = sorted(p.name for p in (tmp_path / "cache" / "fashion-mnist").iterdir())
    assert cached == sorted(data.FASHION_MNIST_FILES)  # the corrupt mirror's files were rejected
    # a second load reads the cache: no mirror is reachable now
    again = data.load_fashion_mnist(mirrors=("http://127.0.0.1:1/",), timeout=1)
    assert torch.equal(again.train_labels, ds.train_labels)


def test_offline_with_no_files_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSOFTMAX_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(data.DataError, match="--data-dir"):
        data.load_fashion_mnist(mirrors=("http://127.0.0.1:1/",), timeout=1)
    assert not list((tmp_path / "empty-cache" / "fashion-mnist").glob("*.part"))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return data.load_fashion_mnist(planted_fashion_files(tmp_path_factory.mktemp("planted"), n_train=512, n_test=128))


@pytest.mark.parametrize("loss", ["fused", "torch", "naive"])
def test_training_learns_the_planted_data_set(planted, loss):
    config = model.TrainConfig(dataset="planted", epochs=5, lr=0.1, batch_size=64, loss=loss)
    _, metrics = model.train(planted, config, log=lambda *_: None, progress=False)
    assert metrics["epochs"][-1]["test_acc"] > 0.9  # chance is 0.1


def test_fused_and_torch_losses_give_the_same_parameters(planted):
    params = {}
    for loss in ("fused", "torch"):
        config = model.TrainConfig(epochs=2, lr=0.1, batch_size=64, loss=loss, seed=3)
        trained, _ = model.train(planted, config, log=lambda *_: None, progress=False)
        params[loss] = [p.detach().clone() for p in trained.parameters()]
    for a, b in zip(params["fused"], params["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float32 rounding over 16 SGD steps


def test_naive_loss_overflows_where_fused_does_not(planted):
    net = model.SoftmaxRegression(784, 10, torch.Generator().manual_seed(0))
    with torch.no_grad():
        net.W.mul_(2e4)  # logits in the hundreds: exp overflows float32
    logits = net(planted.train_images[:64])
    y = planted.train_labels[:64]
    assert not torch.isfinite(model.LOSSES["naive"](logits, y))
    fused = model.LOSSES["fused"](logits, y)
    assert torch.isfinite(fused)
    torch.testing.assert_close(fused.double(), torch.nn.functional.cross_entropy(logits.double(), y), rtol=1e-5, atol=0)


def test_cli_train_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "digits", "--epochs", "3", "--loss", "fused", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "epoch 3, loss" in printed and "test acc" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["loss"] == "fused" and metrics["config"]["epochs"] == 3
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2, 3]
    assert set(metrics["epochs"][0]) == {"epoch", "train_loss", "train_acc", "test_acc", "seconds"}
    assert metrics["epochs"][-1]["test_acc"] > 0.5
    for png in ("curves.png", "mistakes.png"):
        content = (out / png).read_bytes()
        assert content.startswith(PNG_MAGIC) and len(content) > 5000


def test_cli_train_offline_fashion_mnist_fails_cleanly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTSOFTMAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "FASHION_MNIST_MIRRORS", ("http://127.0.0.1:1/",))
    monkeypatch.setattr(data.fashion_mnist_files, "__defaults__", (None, True, ("http://127.0.0.1:1/",), 1.0))
    assert cli.main(["train", "--dataset", "fashion-mnist", "--epochs", "1", "--out", str(tmp_path / "o")]) == 2
    assert "--data-dir" in capsys.readouterr().err


def test_precision_command_json_and_exp_limits(capsys):
    assert cli.main(["precision", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"float64", "float32", "float16", "bfloat16"}
    for name, entry in result.items():
        dtype = precision.DTYPES[name]
        for row in entry["cases"]:
            assert isinstance(row["fastsoftmax"], float) and row["fastsoftmax"] < 2e-3
        lim = entry["exp_limits"]
        largest = torch.tensor(lim["largest_finite"], dtype=dtype)
        assert torch.isfinite(torch.exp(largest)) and torch.isinf(torch.exp(torch.nextafter(largest, torch.tensor(1e30, dtype=dtype))))
        smallest = torch.tensor(lim["smallest_nonzero"], dtype=dtype)
        assert torch.exp(smallest) > 0 and torch.exp(torch.nextafter(smallest, torch.tensor(-1e30, dtype=dtype))) == 0
    assert result["float32"]["cases"][0]["naive"] == "nan"  # the textbook softmax at logits of 100
    assert abs(result["float32"]["exp_limits"]["largest_finite"] - 88.72) < 0.01


def test_a_missing_extra_names_the_extra_to_install(monkeypatch, capsys):
    import builtins

    from fastsoftmax.apps import _extras

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib") or name.startswith("sklearn"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.delitem(sys.modules, "matplotlib", raising=False)
    monkeypatch.delitem(sys.modules, "matplotlib.pyplot", raising=False)
    monkeypatch.delitem(sys.modules, "sklearn.datasets", raising=False)
    monkeypatch.delitem(sys.modules, "sklearn", raising=False)
    with pytest.raises(_extras.MissingExtra, match=r"needs matplotlib.*pip install 'fastsoftmax\[plot\]'"):
        _extras.pyplot("plot")
    assert cli.main(["train", "--dataset", "digits", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "needs scikit-learn" in err and "pip install 'fastsoftmax[d2l]'" in err
