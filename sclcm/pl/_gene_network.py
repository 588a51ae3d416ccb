"""Plots of gene networks (:func:`sclcm.tl.gene_network`) and attention maps
(:func:`sclcm.tl.attention`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ._figure import finish

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes


def _record(adata: AnnData, key: str, field: str, tool: str) -> dict:
    rec = adata.uns.get(key)
    if not isinstance(rec, dict) or field not in rec:
        msg = (f"adata.uns[{key!r}] holds no {field!r}: run sclcm.tl.{tool}(adata, ..., "
               f"key_added={key!r}) first.")
        raise KeyError(msg)
    return rec


def _group(rec: dict, group: str | None, key: str) -> str:
    groups = [str(g) for g in rec["groups"]]
    if group is None:
        if len(groups) > 1:
            msg = f"uns[{key!r}] has groups {groups}: pass group= one of them."
            raise ValueError(msg)
        return groups[0]
    if group not in groups:
        msg = f"group {group!r} is not in uns[{key!r}] (it has {groups})."
        raise ValueError(msg)
    return group

def gene_network(adata: AnnData, gene: str, *, key: str = "sclcm_network_attention",
                 group: str | None = None, n_neighbors: int = 10, ax: Axes | None = None,
                 show: bool | None = None, save: str | None = None) -> Axes | None:
    """A gene's neighbourhood in a network: the gene in the middle, its ``n_neighbors``
    strongest neighbours around it (strongest at the top, then clockwise), and the edges
    among all of them, wider for larger weights; genes are coloured by programme.

    Parameters
    ----------
    adata
        An AnnData on which :func:`sclcm.tl.gene_network` ran.
    gene
        The gene in the middle (one of ``uns[key]["genes"]``).
    key
        The ``key_added`` of that run.
    group
        The group whose network is drawn (needed when there are several).
    n_neighbors
        Neighbours drawn.
    ax, show, save
        As in :func:`sclcm.pl.perturbation`.

    Returns
    -------
    The axes, unless the figure was shown.
    """
    import matplotlib.pyplot as plt

    rec = _record(adata, key, "weights", "gene_network")
    group = _group(rec, group, key)
    genes = [str(g) for g in rec["genes"]]
    if gene not in genes:
        msg = f"{gene!r} is not a gene of uns[{key!r}] ({len(genes)} genes)."
        raise ValueError(msg)
    w = rec["weights"][group]
    i = genes.index(gene)
    row = w.getrow(i).toarray().ravel()
    row[i] = -np.inf
    nbrs = [int(j) for j in np.argsort(-row, kind="stable")[:n_neighbors] if row[j] > 0]
    nodes = [i, *nbrs]
    sub = w[nodes][:, nodes].toarray()
    programme = rec["programmes"][group].astype(str).to_numpy()
    angle = np.pi / 2 - 2 * np.pi * np.arange(len(nbrs)) / max(len(nbrs), 1)
    xy = np.vstack([[0, 0], np.c_[np.cos(angle), np.sin(angle)]])
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    top = np.abs(sub).max() or 1.0
    for a in range(len(nodes)):
        for b in range(a + 1, len(nodes)):
            v = max(sub[a, b], sub[b, a], key=abs)
            if v:
                ax.plot(*xy[[a, b]].T, color="tab:red" if v < 0 else "grey", zorder=1,
                        linewidth=0.3 + 3 * abs(v) / top, alpha=0.35 + 0.5 * abs(v) / top)
    cats = sorted(set(programme[nodes]), key=lambda c: (len(c), c))
    cmap = plt.get_cmap("tab20")
    colour = {c: cmap(k % 20) for k, c in enumerate(cats)}
    for k, node in enumerate(nodes):
        ax.scatter(*xy[k], s=500 if k == 0 else 260, color=colour[programme[node]],
                   edgecolor="black", linewidth=0.6, zorder=2)
        ax.annotate(genes[node], xy[k], xytext=(0, 13 if k == 0 else -15),
                    textcoords="offset points", ha="center", fontsize=8, zorder=3)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colour[c],
                          markeredgecolor="black", label=f"programme {c}") for c in cats]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1, 1), frameon=False,
              fontsize=8)
    method = rec.get("params", {}).get("method", "")
    ax.set_title(f"{gene}: {len(nbrs)} strongest neighbours ({method}, {group})")
    ax.set_xlim(-1.35, 1.35)
    ax.set_ylim(-1.35, 1.35)
    ax.set_aspect("equal")
    ax.axis("off")
    return None if finish(ax.figure, show=show, save=save, tight=False) else ax


def attention(adata: AnnData, genes: Sequence[str], *, key: str = "sclcm_attention",
              groups: Sequence[str] | None = None, form: str = "directed",
              show: bool | None = None, save: str | None = None) -> list[Axes] | None:
    """Heatmaps of the attention among ``genes``, one per group, on one colour scale.

    Rows attend to columns (``form="directed"``: row gene = query, column gene = key), as
    :func:`sclcm.tl.attention` wrote them; pairs it did not keep (below its ``top_k``, in
    fewer than ``min_cells`` cells together, or the diagonal) are blank.

    Parameters
    ----------
    adata
        An AnnData on which :func:`sclcm.tl.attention` ran.
    genes
        Genes to show, in this order (among ``uns[key]["genes"]``).
    key
        The ``key_added`` of that run.
    groups
        Groups to show; default all.
    form
        ``"directed"`` or ``"symmetric"``.
    show, save
        As in :func:`sclcm.pl.perturbation`.

    Returns
    -------
    The axes, one per group, unless the figure was shown.
    """
    import matplotlib.pyplot as plt

    rec = _record(adata, key, form, "attention")
    names = [str(g) for g in rec["genes"]]
    missing = [g for g in genes if g not in names]
    if missing:
        msg = f"genes not in uns[{key!r}]['genes']: {missing[:10]}."
        raise ValueError(msg)
    groups = [str(g) for g in rec["groups"]] if groups is None else \
        [_group(rec, g, key) for g in groups]
    idx = [names.index(g) for g in genes]
    mats = []
    for g in groups:
        m = rec[form][g][idx][:, idx].toarray()
        mats.append(np.where(m > 0, m, np.nan))
    vmax = max((np.nanmax(m) for m in mats if np.isfinite(m).any()), default=1.0)
    n = len(genes)
    size = 0.8 + 0.22 * n
    fig, axes = plt.subplots(1, len(groups), figsize=(size * len(groups) + 1.2, size),
                             squeeze=False, layout="constrained")
    axes = list(axes[0])
    for ax, g, m in zip(axes, groups, mats, strict=True):
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax)
        ax.set_xticks(range(n), genes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), genes if ax is axes[0] else [""] * n, fontsize=7)
        ax.set_title(g)
        ax.set_xlabel("key (attended to)" if form == "directed" else "gene")
    axes[0].set_ylabel("query (attending)" if form == "directed" else "gene")
    fig.colorbar(im, ax=axes, shrink=0.8, label="mean attention")
    return None if finish(fig, show=show, save=save, tight=False) else axes
