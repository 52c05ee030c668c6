"""Imports of what the optional extras bring, with an error that says which extra to install."""

import importlib


class MissingExtra(ImportError):
    """A command needs a package of an optional extra that is not installed."""


#: import name -> distribution name, where they differ
_DISTRIBUTIONS = {"sklearn": "scikit-learn"}


def require(module: str, extra: str):
    """``importlib.import_module(module)``, or :class:`MissingExtra` naming ``pip install 'fastsoftmax[extra]'``."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtra(
            f"fastsoftmax: this needs {_DISTRIBUTIONS.get(top, top)}, which is not installed: "
            f"pip install 'fastsoftmax[{extra}]'"
        ) from error


def pyplot(extra: str = "plot"):
    """matplotlib's pyplot on the non-interactive Agg backend."""
    matplotlib = require("matplotlib", extra)
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", extra)
