"""The textbook versions from *Dive into Deep Learning* (section 3.6), naive on purpose.

They are the baseline the benchmarks compare against and the overflow the
precision suite demonstrates: ``exp(x)`` overflows to inf for float32 logits
above about 88.7 (giving inf/inf = NaN), every ``exp(x)`` underflows to 0 for
logits below about -103 (giving 0/0 = NaN), and ``log`` of an underflowed
probability is ``-inf``. Do not use them for training; use
:mod:`fastsoftmax.functional`.
"""

import torch

__all__ = ["softmax", "log_softmax", "cross_entropy", "cross_entropy_loss"]


def softmax(X):
    """The book's softmax over rows: ``exp(X) / exp(X).sum(1)``, no max subtracted."""
    X_exp = torch.exp(X)
    partition = X_exp.sum(1, keepdim=True)
    return X_exp / partition


def log_softmax(X):
    """``log(softmax(X))``: loses everything :func:`softmax` loses, then takes a log."""
    return torch.log(softmax(X))


def cross_entropy(y_hat, y):
    """The book's per-example loss ``-log(y_hat[range(n), y])`` from probabilities ``y_hat``."""
    return -torch.log(y_hat[range(len(y_hat)), y])


def cross_entropy_loss(logits, y):
    """Mean of :func:`cross_entropy` over the batch, from logits: the book's training loss."""
    return cross_entropy(softmax(logits), y).mean()
