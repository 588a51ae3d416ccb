"""Plots of gene resolution."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from collections.abc import Mapping

    from matplotlib.axes import Axes

    from ..genes import GeneReport

_ORDER = ("ensembl_id", "retired_id", "symbol", "previous", "alias", "ortholog_previous",
          "case_insensitive", "other_species", "unique_suffix")


def coverage_by_method(reports: Mapping[str, GeneReport]) -> pd.DataFrame:
    """Fraction of counts resolved by each method, one row per report."""
    rows = {}
    for name, r in reports.items():
        if r.var_counts is None:
            msg = f"report {name!r} has no counts; call resolve(..., count_coverage=True)."
            raise ValueError(msg)
        total = r.var_counts.sum()
        share = pd.Series(r.var_counts, dtype=float).groupby(
            np.where(r.matched, r.method, "unresolved")).sum() / (total or 1)
        rows[name] = share
    df = pd.DataFrame(rows).T.fillna(0.0)
    cols = [c for c in _ORDER if c in df.columns]
    return df[cols + (["unresolved"] if "unresolved" in df.columns else [])]


def gene_coverage(reports: Mapping[str, GeneReport], *, ax: Axes | None = None,
                  show: bool | None = None, save: str | None = None) -> Axes | None:
    """Stacked bars: the share of each dataset's counts resolved by each method.

    Parameters
    ----------
    reports
        Dataset name -> :class:`~sclcm.genes.GeneReport` (with counts).
    ax
        Draw into this axes; a new figure otherwise.
    show
        Show the figure; by default when neither ``ax`` nor ``save`` is given.
    save
        Write the figure to this path.

    Returns
    -------
    The axes, unless the figure was shown.
    """
    import matplotlib.pyplot as plt

    df = coverage_by_method(reports)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 0.45 * len(df) + 1.4))
    left = np.zeros(len(df))
    colors = plt.get_cmap("tab10")
    for i, col in enumerate(df.columns):
        color = "lightgrey" if col == "unresolved" else colors(i)
        ax.barh(df.index, df[col], left=left, label=col.replace("_", " "), color=color)
        left += df[col].to_numpy()
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of counts")
    ax.invert_yaxis()
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, title="resolved by")
    ax.set_title("gene identity: counts resolved to Ensembl IDs")
    ax.figure.tight_layout()
    if save is not None:
        ax.figure.savefig(save, dpi=150, bbox_inches="tight")
    if show or (show is None and save is None and ax is not None and len(ax.figure.axes) == 1
                and plt.isinteractive()):
        plt.show()
        return None
    return ax
