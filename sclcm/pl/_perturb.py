"""Plot of an in-silico perturbation screen (:func:`sclcm.tl.perturb`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes


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
    for yi, (value, q, n) in enumerate(zip(top[col], top["fdr"], top["n_perturbed"],
                                           strict=True)):
        label = "FDR n/a" if not np.isfinite(q) else f"FDR {q:.2g}"
        ax.annotate(f" {label}, n={n}", (value, yi), va="center", fontsize=7,
                    ha="left" if value >= 0 else "right")
    mode = adata.uns[key].get("params", {}).get("mode", "")
    ax.set_xlabel("mean shift toward the goal state (cosine)" if goal else
                  "mean embedding shift (1 - cosine)")
    ax.set_title(f"in-silico {mode}: top {len(top)} of {len(table)}".replace("  ", " "))
    if null is not None:
        ax.legend(loc="lower right", frameon=False, fontsize=8)
    ax.figure.tight_layout()
    if save is not None:
        ax.figure.savefig(save, dpi=150, bbox_inches="tight")
    if show or (show is None and save is None and len(ax.figure.axes) == 1
                and plt.isinteractive()):
        plt.show()
        return None
    return ax
