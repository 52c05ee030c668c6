"""The book's numerical-stability exercises, answered by measurement.

*Dive into Deep Learning* (3.6 and 4.1 exercises) asks what happens to the
naive softmax for logits of 100, for logits all below -100, and at large
scale, and which arguments of ``exp`` a floating-point type can take. For
each dtype this module compares the textbook loss and ours against a float64
reference and finds, by exhaustive or bisecting search over the dtype's own
values, the arguments where ``exp`` stops overflowing or underflowing.
"""

import math

import torch

from .. import functional
from . import naive

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _cases():
    base = torch.tensor([[1.5, -0.5, 0.25, 2.0, -1.0, 0.75]], dtype=torch.float64)
    return {
        "logits containing 100": (torch.cat([base, base]) + torch.tensor([[98.0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])),
        "every logit below -100": base.repeat(2, 1) - 150.0,
        "large scale (x 1e4)": base.repeat(2, 1) * torch.tensor([[1e4], [-1e4]]),
    }


def _rel_err(got: torch.Tensor, ref: torch.Tensor):
    got = got.double()
    if not torch.isfinite(got).all():
        return "nan" if torch.isnan(got).any() else "inf"
    return float(((got - ref).abs() / ref.abs().clamp_min(1e-300)).max())


def compare(dtype: torch.dtype):
    """Per case: relative error of the per-example loss, textbook and ours, against float64."""
    target = torch.tensor([0, 3])
    rows = []
    for name, logits64 in _cases().items():
        x = logits64.to(dtype)
        reference = torch.nn.functional.cross_entropy(x.double(), target, reduction="none")
        with torch.no_grad():
            try:
                book = naive.cross_entropy(naive.softmax(x), target)
                book_err = _rel_err(book, reference)
            except RuntimeError as error:  # e.g. an op without a half-precision CPU kernel
                book_err = f"error: {error}"
            ours = functional.cross_entropy(x, target, reduction="none")
        rows.append({"case": name, "naive": book_err, "fastsoftmax": _rel_err(ours, reference)})
    return rows


def _all_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16-bit float type, in increasing order."""
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype)
    values = values[torch.isfinite(values)].unique()
    return values


def _boundary(dtype: torch.dtype, inside: float, outside: float, ok):
    """The value of ``dtype`` between ``inside`` (where ``ok`` holds) and ``outside`` (where it does not) at which ``ok`` stops holding: bisection down to adjacent values."""
    lo = torch.tensor(inside, dtype=dtype)
    hi = torch.tensor(outside, dtype=dtype)
    assert ok(lo) and not ok(hi), (lo, hi)
    while torch.nextafter(lo, hi) != hi:
        mid = lo + (hi - lo) / 2
        if mid == lo or mid == hi:
            mid = torch.nextafter(lo, hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo.item()


def exp_limits(dtype: torch.dtype):
    """Arguments of ``torch.exp`` in ``dtype``: the largest with a finite result, the smallest with a normal one and with a non-zero one."""
    info = torch.finfo(dtype)

    def finite(x):
        return bool(torch.isfinite(torch.exp(x)))

    def normal(x):
        return bool(torch.exp(x) >= info.tiny)

    def nonzero(x):
        return bool(torch.exp(x) > 0)

    if info.bits == 16:
        values = _all_values(dtype)
        e = torch.exp(values)
        return {
            "largest_finite": values[torch.isfinite(e)].max().item(),
            "smallest_normal": values[e >= info.tiny].min().item(),
            "smallest_nonzero": values[e > 0].min().item(),
        }
    return {
        "largest_finite": _boundary(dtype, 0.0, 2 * math.log(info.max), finite),
        "smallest_normal": _boundary(dtype, 0.0, 2 * math.log(info.tiny), normal),
        "smallest_nonzero": _boundary(dtype, 0.0, 2 * math.log(info.tiny), nonzero),
    }


def report():
    return {name: {"cases": compare(dtype), "exp_limits": exp_limits(dtype)} for name, dtype in DTYPES.items()}


def _fmt(value) -> str:
    return value if isinstance(value, str) else f"{value:.1e}"


def format_table(result: dict) -> str:
    lines = ["relative error of the per-example cross-entropy against float64 (inf/nan: the result itself)", ""]
    lines.append(f"{'dtype':<9} {'case':<26} {'textbook (naive)':>18} {'fastsoftmax':>12}")
    for name, entry in result.items():
        for row in entry["cases"]:
            lines.append(f"{name:<9} {row['case']:<26} {_fmt(row['naive']):>18} {_fmt(row['fastsoftmax']):>12}")
    lines += ["", "arguments of exp(x) that neither overflow nor underflow (found by search in each dtype)", ""]
    lines.append(f"{'dtype':<9} {'largest finite':>16} {'smallest normal':>16} {'smallest > 0':>16}")
    for name, entry in result.items():
        lim = entry["exp_limits"]
        lines.append(
            f"{name:<9} {lim['largest_finite']:>16.8g} {lim['smallest_normal']:>16.8g} {lim['smallest_nonzero']:>16.8g}"
        )
    return "\n".join(lines)
