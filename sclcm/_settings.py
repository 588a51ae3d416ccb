"""Global settings: verbosity, progress bars, default device."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

_LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO,
           "hint": 15, "debug": logging.DEBUG}
_BY_INT = ("error", "warning", "info", "hint", "debug")  # scanpy's 0..4

Verbosity = Literal["error", "warning", "info", "hint", "debug"]


class SclcmSettings:
    """Package-wide defaults; they only fill arguments a caller leaves as ``None``.

    Attributes
    ----------
    verbosity
        ``"error"``, ``"warning"``, ``"info"`` (default), ``"hint"`` or ``"debug"``, or
        scanpy's integers 0..4. Sets the level of the ``"sclcm"`` logger.
    progress
        Show progress bars on long loops (default ``True``; ``SCLCM_PROGRESS=0`` turns
        them off, as CI does). Even on, they are drawn only on a terminal or in a
        notebook, never into a log file or pipe.
    device
        ``"auto"`` (CUDA when available, else CPU) or any torch device string.

    Examples
    --------
    >>> import sclcm
    >>> sclcm.settings.verbosity = "warning"
    >>> sclcm.settings.verbosity
    'warning'
    >>> sclcm.settings.verbosity = 2
    >>> sclcm.settings.verbosity
    'info'
    """

    def __init__(self) -> None:
        self._logger = logging.getLogger("sclcm")
        self.verbosity = os.environ.get("SCLCM_VERBOSITY", "info")
        self.progress = os.environ.get("SCLCM_PROGRESS", "1").lower() not in {"0", "false", "no"}
        self.device = os.environ.get("SCLCM_DEVICE", "auto")

    @property
    def verbosity(self) -> Verbosity:
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: Verbosity | int | str) -> None:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(_BY_INT):
            value = _BY_INT[value]
        elif isinstance(value, str) and value.isdigit() and int(value) < len(_BY_INT):
            value = _BY_INT[int(value)]
        if value not in _LEVELS:
            msg = f"verbosity must be one of {list(_LEVELS)} or 0..4, not {value!r}."
            raise ValueError(msg)
        self._verbosity = value
        self._logger.setLevel(_LEVELS[value])

    @property
    def progress(self) -> bool:
        return self._progress

    @progress.setter
    def progress(self, value: bool) -> None:
        if not isinstance(value, bool):
            msg = f"progress must be True or False, not {value!r}."
            raise TypeError(msg)
        self._progress = value

    @property
    def device(self) -> str:
        return self._device

    @device.setter
    def device(self, value: str) -> None:
        value = str(value)
        if value != "auto":
            import torch

            try:
                torch.device(value)
            except RuntimeError as e:
                msg = f"device must be 'auto' or a torch device such as 'cpu' or 'cuda:0': {e}"
                raise ValueError(msg) from None
        self._device = value

    def resolve_device(self, device: str | torch.device | None = None) -> torch.device:
        """The torch device for ``device``, falling back to :attr:`device` when ``None``."""
        import torch

        device = self.device if device is None else device
        if str(device) == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            msg = f"device {str(device)!r} was requested but CUDA is not available; use 'cpu'."
            raise RuntimeError(msg)
        return device

    def __repr__(self) -> str:
        return (f"SclcmSettings(verbosity={self.verbosity!r}, progress={self.progress}, "
                f"device={self.device!r})")


settings = SclcmSettings()
