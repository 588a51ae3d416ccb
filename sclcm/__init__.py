"""sclcm: single-cell foundation models for the scverse ecosystem."""

from importlib.metadata import PackageNotFoundError, version

from . import genes, pl, pp, tl, tokenizers
from ._checks import InputError
from ._settings import settings

try:
    __version__ = version("sclcm")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

_LAZY = ("models", "data", "train", "metrics")  # torch, tiledbsoma, lightning, sklearn


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"sclcm.{name}")
    msg = f"module 'sclcm' has no attribute {name!r}"
    raise AttributeError(msg)

__all__ = ["InputError", "data", "genes", "metrics", "models", "pl", "pp", "settings", "tl",
           "tokenizers", "train"]
