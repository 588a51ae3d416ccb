"""Plot of a cross-species mapping (:func:`sclcm.tl.map_species`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._annotate import UNASSIGNED, annotation_table
from ._figure import finish

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.figure import Figure


def map_species(joint: AnnData, *, label_key: str, key: str = "sclcm", basis: str = "umap",
                show: bool | None = None, save: str | None = None) -> Figure | None:
    """The joint embedding coloured by species and by label, and the confusion matrix of
    the types both species share.

    Parameters
    ----------
    joint
        What :func:`sclcm.tl.map_species` returned, with ``obsm[f"X_{basis}"]`` computed
        on its joint embedding (``sc.pp.neighbors(joint, use_rep="X_sclcm")``, then
        ``sc.tl.umap(joint)``).
    label_key
        The ``obs`` column of true labels (the reference's, and the query's own where it
        has them): the matrix compares the query cells whose true type the reference has
        with their transferred label.
    key
        ``key_added`` of that run.
    basis
        The 2-D embedding in ``obsm[f"X_{basis}"]``.
    show, save
        Show the figure (default: when not saving), or write it to this path.

    Returns
    -------
    The figure (three panels), unless it was shown.
    """
    import matplotlib.pyplot as plt

    label = f"{key}_label"
    for col in ("dataset", "species", label, label_key):
        if col not in joint.obs:
            msg = (f"{col!r} is not a column of joint.obs: pass what sclcm.tl.map_species "
                   f"returned (key_added={key!r}) and the obs column of true labels.")
            raise KeyError(msg)
    if f"X_{basis}" not in joint.obsm:
        msg = (f"obsm['X_{basis}'] is missing: run sc.pp.neighbors(joint, use_rep='X_{key}') "
               "and sc.tl.umap(joint) first.")
        raise KeyError(msg)
    query = joint[(joint.obs["dataset"] == "query").to_numpy()]
    classes = set(joint.uns.get(key, {}).get("classes", [])) or set(
        joint.obs.loc[joint.obs["dataset"] == "reference", label_key].dropna().astype(str))
    shared = query[query.obs[label_key].astype(str).isin(classes).to_numpy()]

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2),
                             gridspec_kw={"width_ratios": [1, 1, 1.05]})
    xy = np.asarray(joint.obsm[f"X_{basis}"])[:, :2]
    _scatter(axes[0], xy, joint.obs["species"], "species")
    _scatter(axes[1], xy, joint.obs[label], "label (reference: own; query: transferred)")
    ax = axes[2]
    if shared.n_obs:
        conf, f1 = annotation_table(shared, label, truth=label_key)
        ax.imshow(conf.to_numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(np.arange(conf.shape[1]), conf.columns, rotation=90)
        ax.set_yticks(np.arange(conf.shape[0]), conf.index)
        for (i, j), v in np.ndenumerate(conf.to_numpy()):
            if v >= 0.005:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 else "white")
        truth = shared.obs[label_key].astype(str).to_numpy()
        acc = float((shared.obs[label].astype(str).to_numpy() == truth).mean())
        ax.set_title(f"query, shared types: accuracy {acc:.3f}, macro-F1 {f1.mean():.3f}\n"
                     f"({UNASSIGNED} counts as wrong)", fontsize=10)
        ax.set_xlabel("transferred label")
        ax.set_ylabel(f"true ({label_key})")
    else:
        ax.set_axis_off()
        ax.set_title("no query cell has a true type the reference has")
    return None if finish(fig, show=show, save=save) else fig


def _scatter(ax, xy: np.ndarray, values, title: str) -> None:
    """Cells coloured by category, in a fixed random order (no category drawn on top)."""
    import pandas as pd
    from matplotlib import colormaps

    cats = pd.Categorical(values)
    order = np.random.default_rng(0).permutation(len(xy))
    palette = colormaps["tab20" if len(cats.categories) > 10 else "tab10"]
    colors = np.array([("lightgrey" if c == UNASSIGNED else palette(i % palette.N))
                       for i, c in enumerate(cats.categories)], dtype=object)
    codes = cats.codes[order]
    ax.scatter(xy[order, 0], xy[order, 1], s=4, linewidths=0,
               c=[colors[c] if c >= 0 else "black" for c in codes])
    for i, c in enumerate(cats.categories):
        ax.scatter([], [], s=20, color=colors[i], label=str(c))
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=7,
              markerscale=1)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
