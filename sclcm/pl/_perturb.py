"""Plot of an in-silico perturbation screen (:func:`sclcm.tl.perturb`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.text import Annotation


def perturbation(adata: AnnData, key: str = "sclcm_perturb", *, n_top: int = 20,
                 fdr: float = 0.05, ax: Axes | None = None, show: bool | None = None,
                 save: str | None = None) -> Axes | None:
    """Ranked effects of a perturbation screen, strongest on top, with their FDR.

    One bar per perturbation: the mean goal shift when the screen had a ``goal``, else the
    mean cosine shift. Bars with FDR below ``fdr`` are coloured; each is labelled with its
    FDR and the number of cells perturbed. A dashed line marks the null's mean effect.

    Parameters
    ----------
    adata
        An AnnData on which :func:`sclcm.tl.perturb` ran.
    key
        The ``key_added`` of that run.
    n_top
        Number of perturbations shown.
    fdr
        Significance threshold for the colour.
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

    if key not in adata.uns or "table" not in adata.uns[key]:
        msg = (f"adata.uns[{key!r}] has no perturbation table: run "
               f"sclcm.tl.perturb(adata, ..., key_added={key!r}) first.")
        raise KeyError(msg)
    table = adata.uns[key]["table"]
    goal = "mean_goal_shift" in table.columns
    col = "mean_goal_shift" if goal else "mean_shift"
    top = table.dropna(subset=[col]).head(n_top)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 0.3 * len(top) + 1.4))
    y = np.arange(len(top))
    significant = top["fdr"].to_numpy() < fdr
    ax.barh(y, top[col], color=np.where(significant, "tab:red", "lightgrey"))
    ax.set_yticks(y, top["gene"])
    ax.invert_yaxis()
    null = np.nanmean(table["null_mean"]) if table["null_mean"].notna().any() else None
    if null is not None:
        ax.axvline(null, color="black", linestyle="--", linewidth=0.8, label="null mean")
    # the labels form a column right of the axes, one per row: at the bar ends they ran
    # into the gene names (negative goal shifts), the null line and each other
    labels = [ax.annotate(f"FDR {q:.2g}, n={n}" if np.isfinite(q) else f"FDR n/a, n={n}",
                          (1, yi), xycoords=ax.get_yaxis_transform(), xytext=(3, 0),
                          textcoords="offset points", va="center", ha="left",
                          annotation_clip=False)
              for yi, (q, n) in enumerate(zip(top["fdr"], top["n_perturbed"], strict=True))]
    mode = adata.uns[key].get("params", {}).get("mode", "")
    ax.set_xlabel("mean shift toward the goal state (cosine)" if goal else
                  "mean embedding shift (1 - cosine)")
    ax.set_title(f"in-silico {mode}: top {len(top)} of {len(table)}".replace("  ", " "))
    if null is not None:
        ax.legend(loc="best", frameon=False, fontsize=8)  # "best" avoids bars and texts
    _fit_texts(ax, labels)
    if save is not None:
        ax.figure.savefig(save, dpi=150, bbox_inches="tight")
    if show or (show is None and save is None and len(ax.figure.axes) == 1
                and plt.isinteractive()):
        plt.show()
        return None
    return ax


def _fit_texts(ax: Axes, labels: list[Annotation]) -> None:
    """Lay out the figure so that no two texts overlap, whatever the axes' size: row texts
    (gene names, labels) no taller than a row, and no more x ticks than their labels' width
    leaves room for."""
    import matplotlib as mpl
    from matplotlib.font_manager import FontProperties
    from matplotlib.ticker import MaxNLocator

    fig = ax.figure
    fig.tight_layout()
    bottom, top = ax.get_ylim()
    row_pt = ax.get_position().height * fig.get_figheight() * 72 / max(abs(top - bottom), 1)
    tick_pt = FontProperties(size=mpl.rcParams["ytick.labelsize"]).get_size_in_points()
    size = 0.75 * row_pt  # a line of text is ~1.2 times its font size high
    ax.tick_params(axis="y", labelsize=min(tick_pt, size))
    for label in labels:
        label.set_fontsize(min(7, size))
    fig.tight_layout()  # again: the texts' widths changed
    fig.draw_without_rendering()  # sets the x tick labels' texts
    renderer = fig.canvas.get_renderer()
    widest = max((t.get_window_extent(renderer).width for t in ax.get_xticklabels()
                  if t.get_text()), default=0)
    if widest:  # ticks at least 1.5 labels apart: MaxNLocator spaces them >= width / nbins
        nbins = int(ax.get_window_extent(renderer).width // (1.5 * widest))
        ax.xaxis.set_major_locator(MaxNLocator(nbins=max(nbins, 1)))
