"""Progress bars that follow ``sclcm.settings.progress``: the one helper every loop uses."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from tqdm.auto import tqdm

from ._settings import settings

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

T = TypeVar("T")


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str | None = None,
             unit: str = "it", size: Callable[[T], int] | None = None) -> Iterator[T]:
    """Yield the items of ``iterable`` while a tqdm bar counts them.

    Parameters
    ----------
    iterable
        The loop's items.
    total
        The count when the loop is done, in ``unit``; default ``len(iterable)`` where
        items count 1, else unknown.
    desc, unit
        The bar's label and what it counts.
    size
        How much of ``total`` an item is (e.g. a block's number of cells); default 1.
        The bar moves once the loop's body is done with the item.

    Notes
    -----
    Off with ``sclcm.settings.progress = False``. Otherwise tqdm draws it only where it
    can be redrawn in place: a terminal, or a notebook widget (``tqdm.auto``). On any other
    stream (a log file, CI) it writes nothing, since there every redraw, and the cursor
    moves of a bar opened inside another, would be left as escape codes. A bar inside
    another takes the next line (tqdm's ``position``) and is cleared when done.
    """
    if total is None and size is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # as tqdm(iterable) would
    # disable=None: tqdm turns the bar off when its stream is not a TTY (the notebook
    # widget takes None as False). The bar opens when the loop starts, not before.
    with tqdm(total=total, desc=desc, unit=unit, leave=False,
              disable=None if settings.progress else True) as bar:
        for item in iterable:
            yield item
            bar.update(1 if size is None else size(item))
