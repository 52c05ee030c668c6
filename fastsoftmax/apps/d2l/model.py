r"""Softmax regression as in *Dive into Deep Learning* (section 3.6), trained with a choice of loss.

The model flattens each image to a vector :math:`x` and computes logits
:math:`o = x W + b`, with :math:`W` (inputs x classes) drawn from
:math:`\mathcal{N}(0, 0.01^2)` and :math:`b = 0`; minibatch SGD on the mean
cross-entropy. The loss is the only thing that changes:

* ``fused``: :func:`fastsoftmax.cross_entropy` (ours);
* ``torch``: :func:`torch.nn.functional.cross_entropy`;
* ``naive``: the book's ``softmax`` followed by ``-log(y_hat[range(n), y])``
  (:mod:`fastsoftmax.naive`), which overflows for large logits;
* ``fused-linear``: :func:`fastsoftmax.linear_cross_entropy` of the inputs,
  ``W`` and ``b``, through its :func:`~fastsoftmax.ops.linear_cross_entropy.value_and_grad`:
  the product, the loss and the gradients of ``W`` and ``b`` in one call,
  no autograd graph, the logits never returned (the running train accuracy
  then takes one more product, outside the step).
"""

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as TF

from ... import functional
from ...ops import linear_cross_entropy as linear_ce
from .. import naive
from .._extras import pyplot
from .data import Dataset

LOSSES = {
    "fused": functional.cross_entropy,
    "torch": TF.cross_entropy,
    "naive": naive.cross_entropy_loss,
}

#: every loss ``train`` takes: those of the logits, then the one of the model's own linear layer
CHOICES = (*LOSSES, "fused-linear")


@dataclass
class TrainConfig:
    dataset: str = "fashion-mnist"
    epochs: int = 10
    lr: float = 0.1
    batch_size: int = 256
    loss: str = "fused"
    device: str = "cpu"
    seed: int = 0


class SoftmaxRegression(torch.nn.Module):
    """``logits = X.reshape(-1, n_inputs) @ W + b``."""

    def __init__(self, n_inputs: int, n_classes: int, generator: torch.Generator = None):
        super().__init__()
        self.W = torch.nn.Parameter(torch.normal(0.0, 0.01, (n_inputs, n_classes), generator=generator))
        self.b = torch.nn.Parameter(torch.zeros(n_classes))

    def forward(self, X):
        return X.reshape(-1, self.W.shape[0]) @ self.W + self.b


def _sgd(params, lr: float) -> None:
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
            p.grad = None


def make_step(model: SoftmaxRegression, loss: str, lr: float):
    """One minibatch SGD step, ``step(X, y) -> (loss, logits or None)``: forward, loss, backward, update."""
    if loss not in CHOICES:
        raise ValueError(f"unknown loss {loss!r}: expected one of {sorted(CHOICES)}")
    params = list(model.parameters())
    if loss == "fused-linear":
        W, b = model.W, model.b
        wrt = ("linear_weight", "linear_bias")
        n_inputs = W.shape[0]

        def fused_linear_step(X, y):
            with torch.no_grad():
                # W.T: the (classes, inputs) weight the op takes, a view of the same parameter
                loss, _, grad_w, grad_b = linear_ce.value_and_grad(X.reshape(-1, n_inputs), W.T, y, linear_bias=b, wrt=wrt)
                for p, grad in ((W, grad_w.T), (b, grad_b)):
                    p -= lr * grad  # the update of _sgd, from the gradients the op returned
            return loss, None

        return fused_linear_step
    loss_fn = LOSSES[loss]

    def step(X, y):
        logits = model(X)
        loss = loss_fn(logits, y)
        loss.backward()
        _sgd(params, lr)
        return loss, logits

    return step


def _batches(n: int, batch_size: int, generator: torch.Generator = None):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def predict(model, images, batch_size: int = 1024):
    device = model.W.device
    return torch.cat([model(images[i].to(device)).argmax(1).cpu() for i in _batches(len(images), batch_size)])


def accuracy(model, images, labels) -> float:
    return (predict(model, images) == labels).double().mean().item()


class _Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, total: int, label: str, enabled=None):
        self.total, self.label = total, label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.last = -1

    def update(self, done: int):
        if not self.enabled:
            return
        width = 30
        filled = width * done // self.total
        if filled != self.last:
            self.last = filled
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}")
            sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\r" + " " * (len(self.label) + 50) + "\r")
            sys.stderr.flush()


def train(data: Dataset, config: TrainConfig, log=print, progress=None):
    """Train from scratch; returns ``(model, metrics)`` with metrics as written to ``metrics.json``."""
    if config.loss not in CHOICES:
        raise ValueError(f"unknown loss {config.loss!r}: expected one of {sorted(CHOICES)}")
    device = torch.device(config.device)
    generator = torch.Generator().manual_seed(config.seed)
    model = SoftmaxRegression(data.n_inputs, len(data.classes), generator).to(device)
    step = make_step(model, config.loss, config.lr)
    metrics = {"config": asdict(config), "epochs": []}
    n = len(data.train_labels)
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        total_loss, correct = 0.0, 0
        bar = _Progress(n, f"epoch {epoch}", progress)
        seen = 0
        for index in _batches(n, config.batch_size, generator):
            X = data.train_images[index].to(device)
            y = data.train_labels[index].to(device)
            if config.loss == "fused-linear":
                with torch.no_grad():
                    predicted = model(X).argmax(1)  # before the update, as the other losses' logits are
            loss, logits = step(X, y)
            if logits is not None:
                predicted = logits.argmax(1)
            total_loss += loss.item() * len(y)
            correct += (predicted == y).sum().item()
            seen += len(y)
            bar.update(seen)
        bar.close()
        seconds = time.perf_counter() - start
        row = {
            "epoch": epoch,
            "train_loss": total_loss / n,
            "train_acc": correct / n,
            "test_acc": accuracy(model, data.test_images, data.test_labels),
            "seconds": seconds,
        }
        metrics["epochs"].append(row)
        log(
            f"epoch {epoch}, loss {row['train_loss']:.3f}, train acc {row['train_acc']:.3f}, "
            f"test acc {row['test_acc']:.3f} ({seconds:.3f} s)"
        )
    return model, metrics


def plot_curves(metrics: dict, path: Path) -> None:
    """Loss and accuracies per epoch, as the book's animator draws them."""
    plt = pyplot("d2l")

    epochs = [r["epoch"] for r in metrics["epochs"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_loss"] for r in metrics["epochs"]], label="train loss")
    ax.plot(epochs, [r["train_acc"] for r in metrics["epochs"]], "--", label="train acc")
    ax.plot(epochs, [r["test_acc"] for r in metrics["epochs"]], "-.", label="test acc")
    cfg = metrics["config"]
    ax.set(xlabel="epoch", title=f"softmax regression, {cfg['dataset']}, loss={cfg['loss']}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_mistakes(model, data: Dataset, path: Path, n: int = 18) -> int:
    """A grid of misclassified test images titled ``true / predicted``, as in the book. Returns how many are shown."""
    plt = pyplot("d2l")

    predicted = predict(model, data.test_images)
    wrong = (predicted != data.test_labels).nonzero().flatten()[:n]
    cols = 6
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong.tolist()):
        ax.imshow(data.test_images[i].numpy(), cmap="gray")
        ax.set_title(f"{data.classes[data.test_labels[i]]}\n{data.classes[predicted[i]]}", fontsize=8)
    fig.suptitle("misclassified test images (true / predicted)" if len(wrong) else "no misclassified test images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len(wrong)


def write_outputs(model, data: Dataset, metrics: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_curves(metrics, out / "curves.png")
    plot_mistakes(model, data, out / "mistakes.png")
