"""Data sets for the softmax-regression example: Fashion-MNIST and scikit-learn's digits.

Fashion-MNIST comes as four gzip'd IDX files. :func:`load_fashion_mnist`
looks for them in ``data_dir`` (if given), then in the user's cache folder,
and otherwise downloads them from the official mirrors, verifying each
file's MD5 against the published checksum before it is cached. IDX is a
big-endian format: a magic number ``0x0000080N`` (``N`` the number of
dimensions, the type byte ``0x08`` meaning unsigned bytes), ``N`` 32-bit sizes,
then the data.

The digits set (8x8 images, 10 classes, 1797 samples) ships inside
scikit-learn, so it works offline: the optional extra ``d2l``.
"""

import gzip
import hashlib
import os
import shutil
import struct
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._extras import MissingExtra, require

FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip

FASHION_MNIST_MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",  # S3 website endpoint: HTTP only; the MD5 check guards it
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)

#: The official MD5 of each file, as published by Zalando Research.
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


class DataError(RuntimeError):
    """A data set that is missing, cannot be downloaded, or is corrupt."""


@dataclass
class Dataset:
    """Images as float32 in [0, 1], shape (n, h, w); labels int64; class names."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple

    @property
    def n_inputs(self) -> int:
        return self.train_images[0].numel()


def cache_dir() -> Path:
    """Where downloads are kept: ``$FASTSOFTMAX_CACHE``, else ``$XDG_CACHE_HOME/fastsoftmax``, else ``~/.cache/fastsoftmax``."""
    if "FASTSOFTMAX_CACHE" in os.environ:
        return Path(os.environ["FASTSOFTMAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastsoftmax"


def md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzip'd or plain) IDX file of unsigned bytes into an array of its shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(4)
            if len(header) != 4 or header[:3] != b"\x00\x00\x08" or not 1 <= header[3] <= 4:
                raise DataError(f"{path}: not an IDX file of unsigned bytes (magic {header.hex() or 'missing'})")
            ndim = header[3]
            raw_shape = f.read(4 * ndim)
            if len(raw_shape) != 4 * ndim:
                raise DataError(f"{path}: truncated IDX header")
            shape = struct.unpack(f">{ndim}I", raw_shape)
            data = f.read()
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot be read as IDX ({error})") from error
    expected = int(np.prod(shape))
    if len(data) != expected:
        raise DataError(f"{path}: header promises {expected} bytes for shape {shape}, file holds {len(data)}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _download(name: str, target: Path, mirrors, timeout: float) -> None:
    errors = []
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".part")
    for mirror in mirrors:
        url = mirror + name
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError) as error:
            errors.append(f"{url}: {error}")
            continue
        if md5(partial) != FASHION_MNIST_FILES[name]:
            errors.append(f"{url}: checksum mismatch")
            partial.unlink()
            continue
        partial.replace(target)
        return
    partial.unlink(missing_ok=True)
    raise DataError(
        f"could not download {name}:\n  " + "\n  ".join(errors) + "\n"
        f"Offline? Put the four Fashion-MNIST files ({', '.join(FASHION_MNIST_FILES)}) in a folder "
        "and pass it as --data-dir, or use --dataset digits (ships with scikit-learn)."
    )


def fashion_mnist_files(data_dir=None, download: bool = True, mirrors=FASHION_MNIST_MIRRORS, timeout: float = 30.0):
    """Paths of the four files: from ``data_dir``, else the cache, else downloaded and verified."""
    paths = {}
    for name, checksum in FASHION_MNIST_FILES.items():
        if data_dir is not None:
            local = Path(data_dir) / name
            if not local.exists():
                raise DataError(f"{local} not found: --data-dir must hold {', '.join(FASHION_MNIST_FILES)}")
            paths[name] = local
            continue
        cached = cache_dir() / "fashion-mnist" / name
        if not cached.exists() or md5(cached) != checksum:
            if not download:
                raise DataError(f"{cached} is missing and downloading is off")
            _download(name, cached, mirrors, timeout)
        paths[name] = cached
    return paths


def load_fashion_mnist(data_dir=None, download: bool = True, **kwargs) -> Dataset:
    """Fashion-MNIST: 60000 training and 10000 test images of 28x28, 10 classes."""
    paths = fashion_mnist_files(data_dir, download, **kwargs)
    arrays = {name: read_idx(path) for name, path in paths.items()}
    train_x, train_y = arrays["train-images-idx3-ubyte.gz"], arrays["train-labels-idx1-ubyte.gz"]
    test_x, test_y = arrays["t10k-images-idx3-ubyte.gz"], arrays["t10k-labels-idx1-ubyte.gz"]
    for images, labels, split in ((train_x, train_y, "train"), (test_x, test_y, "test")):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{split} split: {images.shape} images do not match {labels.shape} labels")
        if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{split} split: label {labels.max()} is not one of the 10 classes")
    return Dataset(
        "fashion-mnist",
        torch.from_numpy(train_x.astype(np.float32) / 255.0),
        torch.from_numpy(train_y.astype(np.int64)),
        torch.from_numpy(test_x.astype(np.float32) / 255.0),
        torch.from_numpy(test_y.astype(np.int64)),
        FASHION_MNIST_CLASSES,
    )


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's handwritten digits (8x8, values 0..16 scaled to [0, 1]), split at random."""
    try:
        datasets = require("sklearn.datasets", "d2l")
    except MissingExtra as error:
        raise DataError(str(error).removeprefix("fastsoftmax: ")) from error
    bunch = datasets.load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    classes = tuple(str(i) for i in range(10))
    return Dataset("digits", images[train], labels[train], images[test], labels[test], classes)


def load(name: str, data_dir=None) -> Dataset:
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if name == "digits":
        return load_digits()
    raise ValueError(f"unknown dataset {name!r}: expected 'fashion-mnist' or 'digits'")
