"""sclcm: single-cell foundation models for the scverse ecosystem."""

from importlib.metadata import PackageNotFoundError, version

from . import genes, pl, pp, tokenizers
from ._checks import InputError
from ._settings import settings

try:
    __version__ = version("sclcm")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["InputError", "genes", "pl", "pp", "settings", "tokenizers"]
