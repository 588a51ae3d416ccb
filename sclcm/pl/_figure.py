"""What every figure-level plot does last: save, show, return."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def finish(fig: Figure, *, show: bool | None, save: str | None, dpi: int = 150,
           tight: bool = True) -> bool:
    """Save ``fig`` to ``save`` and show it as scanpy does; whether it was shown.

    ``show=None`` shows only where nothing is saved and matplotlib is interactive, so that a
    script (Agg backend) gets the figure back instead of a warning.
    """
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    if save is not None:
        fig.savefig(save, dpi=dpi, bbox_inches="tight")
    if show or (show is None and save is None and plt.isinteractive()):
        plt.show()
        return True
    return False
