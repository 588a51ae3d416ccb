"""Plot of an annotation (:func:`sclcm.tl.annotate`) against known labels."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._figure import finish

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.figure import Figure

UNASSIGNED = "Unassigned"


def annotation_table(adata: AnnData, key: str = "sclcm_label", *, truth: str
                     ) -> tuple[pd.DataFrame, pd.Series]:
    """The row-normalized confusion matrix (true labels x predicted labels, each row summing
    to 1, ``"Unassigned"`` as the last column) and the F1 per true label.

    A true label the predictions never use (a type the reference lacks) has F1 0 and its
    row shows where its cells went.

    >>> import anndata as ad
    >>> a = ad.AnnData(obs=pd.DataFrame({"t": list("aabb"), "p": ["a", "a", "a", "Unassigned"]},
    ...                                 index=list("wxyz")))
    >>> conf, f1 = annotation_table(a, "p", truth="t")
    >>> conf.round(2).to_dict("index"), f1.round(2).to_dict()
    ({'a': {'a': 1.0, 'Unassigned': 0.0}, 'b': {'a': 0.5, 'Unassigned': 0.5}}, {'a': 0.8, 'b': 0.0})
    """
    from sklearn.metrics import f1_score

    for col, what in ((key, "key"), (truth, "truth")):
        if col not in adata.obs:
            hint = (f" Run sclcm.tl.annotate(adata, ..., key_added={key!r}) first."
                    if what == "key" else "")
            msg = f"{what} {col!r} is not a column of adata.obs.{hint}"
            raise KeyError(msg)
    known = adata.obs[truth].notna().to_numpy()
    t = adata.obs[truth].astype(str).to_numpy()[known]
    p = adata.obs[key].astype(str).to_numpy()[known]
    rows = sorted(set(t))
    cols = [*sorted(set(p) - {UNASSIGNED}, key=lambda c: (c not in rows, c)), UNASSIGNED]
    conf = pd.crosstab(pd.Categorical(t, categories=rows),
                       pd.Categorical(p, categories=cols), dropna=False)
    conf = conf.div(conf.sum(axis=1).replace(0, 1), axis=0)
    conf.index.name, conf.columns.name = truth, key
    f1 = pd.Series(f1_score(t, p, labels=rows, average=None, zero_division=0), index=rows,
                   name="F1")
    return conf, f1


def annotation(adata: AnnData, key: str = "sclcm_label", *, truth: str,
               cmap: str = "viridis", show: bool | None = None, save: str | None = None
               ) -> Figure | None:
    """Predicted labels against true labels: a row-normalized confusion matrix (left) and
    the F1 of each true label (right), with accuracy and macro-F1 in the title.

    Parameters
    ----------
    adata
        An AnnData on which :func:`sclcm.tl.annotate` ran.
    key
        The ``obs`` column of predicted labels (``key_added`` of that run, or its
        ``f"{key_added}_majority"`` column).
    truth
        The ``obs`` column of true labels (cells with NaN are left out).
    cmap
        Colormap of the matrix.
    show, save
        Show the figure (default: when not saving), or write it to this path.

    Returns
    -------
    The figure, unless it was shown.
    """
    import matplotlib.pyplot as plt

    conf, f1 = annotation_table(adata, key, truth=truth)
    n_rows, n_cols = conf.shape
    fig, (ax, bar) = plt.subplots(
        1, 2, figsize=(0.55 * n_cols + 4.5, 0.45 * n_rows + 2),
        gridspec_kw={"width_ratios": [max(n_cols, 2), 2.5]})
    im = ax.imshow(conf.to_numpy(), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(np.arange(n_cols), conf.columns, rotation=90)
    ax.set_yticks(np.arange(n_rows), conf.index)
    ax.set_xlabel(f"predicted ({key})")
    ax.set_ylabel(f"true ({truth})")
    for (i, j), v in np.ndenumerate(conf.to_numpy()):
        if v >= 0.005:
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if v > 0.6 else "white")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="share of the row's cells")
    ax.grid(visible=False)
    bar.barh(np.arange(n_rows), f1.to_numpy(), color="tab:blue")
    bar.set_yticks(np.arange(n_rows), [])
    bar.set_ylim(ax.get_ylim())
    bar.set_xlim(0, 1)
    bar.set_xlabel("F1")
    for i, v in enumerate(f1.to_numpy()):
        bar.text(min(v, 0.97), i, f" {v:.2f}", va="center", ha="left" if v < 0.8 else "right",
                 fontsize=7, color="black" if v < 0.8 else "white")
    t = adata.obs[truth]
    ok = t.notna().to_numpy()
    acc = float((adata.obs[key].astype(str).to_numpy()[ok] == t.astype(str).to_numpy()[ok])
                .mean())
    fig.suptitle(f"{key} vs {truth}: accuracy {acc:.3f}, macro-F1 {f1.mean():.3f}",
                 fontsize=10)
    return None if finish(fig, show=show, save=save) else fig
