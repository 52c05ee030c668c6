"""Imports of what the optional extras bring, with an error that says which extra to install."""

import importlib


class MissingExtra(ImportError):
    """A command needs a package of an optional extra that is not installed."""


def require(module: str, extra: str):
    """``importlib.import_module(module)``, or :class:`MissingExtra` naming ``pip install 'fastsoftmax[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtra(
            f"fastsoftmax: this needs {module.split('.')[0]}, which is not installed: pip install 'fastsoftmax[{extra}]'"
        ) from error


def pyplot(extra: str = "plot"):
    """matplotlib's pyplot on the non-interactive Agg backend."""
    matplotlib = require("matplotlib", extra)
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", extra)
