"""Progress bars that follow ``sclcm.settings.progress``."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from tqdm.auto import tqdm

from ._settings import settings

if TYPE_CHECKING:
    from collections.abc import Iterable

T = TypeVar("T")


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str | None = None,
             unit: str = "it") -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar unless progress bars are off."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not settings.progress,
                leave=False)
