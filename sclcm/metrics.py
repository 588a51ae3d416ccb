"""How well an embedding keeps cell types apart: scIB's bio-conservation metrics.

The scores of Luecken et al. 2022 (scIB) that a cell embedding can be judged by without
any integration step, computed with scikit-learn and scanpy:

- ``NMI``, ``ARI``: Leiden clusters of the embedding's kNN graph against the labels, at
  the resolution (0.1, 0.2, ..., 2.0) with the best NMI (scIB's optimal resolution),
- ``cASW``: cell-type silhouette, ``(silhouette + 1) / 2`` over the labels,
- ``AvgBIO``: the mean of the three,
- ``bASW``: batch silhouette, within each cell type ``1 - |silhouette|`` over the batch
  labels, averaged per type and then over types (1: batches mixed).

Plus the two usual references, PCA of highly variable genes and PCA of all genes
(:func:`pca_embedding`, :func:`compare_with_pca`). Leiden needs the ``igraph`` package
(``pip install 'sclcm[bench]'``).

Examples
--------
>>> import numpy as np
>>> X = np.r_[np.zeros((20, 2)), np.ones((20, 2)) * 10] + np.random.default_rng(0).normal(
...     0, 0.1, (40, 2))
>>> labels = np.repeat(["a", "b"], 20)
>>> round(silhouette_label(X, labels), 2)
0.99
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from anndata import AnnData

#: scIB's resolution sweep for the optimal Leiden clustering.
RESOLUTIONS = tuple(round(0.1 * i, 1) for i in range(1, 21))
COLUMNS = ["NMI", "ARI", "cASW", "AvgBIO", "bASW"]


def leiden_nmi_ari(X: np.ndarray, labels: Sequence, *,
                   resolutions: Sequence[float] = RESOLUTIONS, n_neighbors: int = 15,
                   seed: int = 0) -> dict[str, float]:
    """NMI and ARI of Leiden clusters against ``labels`` at the resolution with best NMI.

    The kNN graph is scanpy's (exact, ``n_neighbors``, euclidean) on ``X``; Leiden is igraph's
    (scanpy ``flavor="igraph"``, 2 iterations). Returns ``NMI``, ``ARI``, ``resolution``
    and ``n_clusters``.
    """
    import anndata as ad
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    _require_igraph()
    labels = np.asarray(labels)
    tmp = ad.AnnData(obsm={"X": np.asarray(X, dtype=np.float32)},
                     obs=pd.DataFrame(index=np.arange(len(labels)).astype(str)))
    # exact kNN (scikit-learn): deterministic, and scanpy 1.11's pynndescent path (used from
    # 8,192 cells) fails on the sparse arrays of recent scipy
    sc.pp.neighbors(tmp, n_neighbors=n_neighbors, use_rep="X", transformer="sklearn",
                    random_state=seed)
    best: dict[str, float] = {"NMI": -1.0}
    for res in resolutions:
        sc.tl.leiden(tmp, resolution=res, flavor="igraph", n_iterations=2, directed=False,
                     random_state=seed, key_added="cluster")
        clusters = tmp.obs["cluster"].to_numpy()
        nmi = normalized_mutual_info_score(labels, clusters)
        if nmi > best["NMI"]:
            best = {"NMI": float(nmi), "ARI": float(adjusted_rand_score(labels, clusters)),
                    "resolution": res, "n_clusters": len(np.unique(clusters))}
    return best


def silhouette_label(X: np.ndarray, labels: Sequence) -> float:
    """Cell-type ASW: ``(silhouette + 1) / 2`` of ``X`` over ``labels`` (1: well apart)."""
    from sklearn.metrics import silhouette_score

    return float((silhouette_score(X, np.asarray(labels)) + 1) / 2)


def silhouette_batch(X: np.ndarray, batches: Sequence, labels: Sequence) -> float:
    """Batch ASW: per cell type, the mean of ``1 - |silhouette|`` over batch labels.

    Types seen in a single batch (or with one cell per batch) are left out, as in scIB;
    returns NaN when none is left.
    """
    from sklearn.metrics import silhouette_samples

    X, batches, labels = np.asarray(X), np.asarray(batches), np.asarray(labels)
    per_type = []
    for label in pd.unique(labels):
        cells = labels == label
        n_batches = len(np.unique(batches[cells]))
        if n_batches < 2 or n_batches == cells.sum():
            continue
        s = silhouette_samples(X[cells], batches[cells])
        per_type.append(float(np.mean(1 - np.abs(s))))
    return float(np.mean(per_type)) if per_type else float("nan")


def bio_conservation(X: np.ndarray, labels: Sequence, batches: Sequence | None = None, *,
                     seed: int = 0) -> dict[str, float]:
    """``NMI``, ``ARI``, ``cASW``, ``AvgBIO`` and, with ``batches``, ``bASW`` of ``X``.

    Cells whose embedding has a NaN (cells a model could not read) are left out.
    """
    X, labels = np.asarray(X, dtype=np.float32), np.asarray(labels)
    ok = ~np.isnan(X).any(axis=1)
    X, labels = X[ok], labels[ok]
    out = leiden_nmi_ari(X, labels, seed=seed)
    out["cASW"] = silhouette_label(X, labels)
    out["AvgBIO"] = (out["NMI"] + out["ARI"] + out["cASW"]) / 3
    out["bASW"] = float("nan") if batches is None else \
        silhouette_batch(X, np.asarray(batches)[ok], labels)
    out["n_cells"] = int(ok.sum())
    return out


def quality_table(adata: AnnData, embeddings: Mapping[str, str | np.ndarray], *,
                  label_key: str, batch_key: str | None = None, seed: int = 0) -> pd.DataFrame:
    """One row of :func:`bio_conservation` scores per embedding.

    ``embeddings`` maps a name to an ``obsm`` key of ``adata`` or to an array.
    """
    labels = adata.obs[label_key].astype(str).to_numpy()
    batches = None if batch_key is None else adata.obs[batch_key].astype(str).to_numpy()
    rows = {}
    for name, rep in embeddings.items():
        X = adata.obsm[rep] if isinstance(rep, str) else rep
        rows[name] = bio_conservation(X, labels, batches, seed=seed)
    table = pd.DataFrame.from_dict(rows, orient="index")
    return table[[*COLUMNS, "resolution", "n_clusters", "n_cells"]]


def compare_with_pca(adata: AnnData, use_rep: str | None = "X_sclcm", *, label_key: str,
                     batch_key: str | None = None, layer: str | None = None,
                     seed: int = 0) -> pd.DataFrame:
    """:func:`quality_table` of ``obsm[use_rep]`` beside the two PCA references.

    The references are computed from the counts in ``X`` (or ``layer``) by
    :func:`pca_embedding`: ``"HVG + PCA"`` (2,000 highly variable genes, scaled, 50 PCs)
    and ``"PCA (all genes)"`` (log-normalized, 50 PCs). ``use_rep=None`` scores the
    references alone. ``adata`` must be in memory; it is not changed.
    """
    reps: dict[str, str | np.ndarray] = {} if use_rep is None else {use_rep: use_rep}
    reps["HVG + PCA"] = pca_embedding(adata, layer=layer, seed=seed)
    reps["PCA (all genes)"] = pca_embedding(adata, layer=layer, n_top_genes=None, scale=False,
                                            seed=seed)
    return quality_table(adata, reps, label_key=label_key, batch_key=batch_key, seed=seed)


def pca_embedding(adata: AnnData, *, layer: str | None = None, n_top_genes: int | None = 2000,
                  scale: bool = True, n_comps: int = 50, seed: int = 0) -> np.ndarray:
    """The standard scanpy reference embedding of raw counts (``adata`` is not changed).

    normalize_total (10,000 per cell), log1p, then with ``n_top_genes`` the highly variable
    genes (Seurat flavor) and, with ``scale``, scaling to unit variance clipped at 10, as in
    scanpy's clustering tutorial; then ``n_comps`` principal components.
    ``n_top_genes=None, scale=False`` gives PCA of all log-normalized genes.
    """
    import anndata as ad
    import scanpy as sc

    X = adata.X if layer is None else adata.layers[layer]
    tmp = ad.AnnData(X.copy() if hasattr(X, "copy") else np.array(X),
                     obs=pd.DataFrame(index=adata.obs_names), var=pd.DataFrame(
                         index=adata.var_names))
    tmp.X = tmp.X.astype(np.float32)
    sc.pp.normalize_total(tmp, target_sum=1e4)
    sc.pp.log1p(tmp)
    if n_top_genes is not None and n_top_genes < tmp.n_vars:
        sc.pp.highly_variable_genes(tmp, n_top_genes=n_top_genes)
        tmp = tmp[:, tmp.var["highly_variable"].to_numpy()].copy()
    if scale:  # dense: centred genes are no longer sparse
        tmp.X = tmp.X.toarray() if hasattr(tmp.X, "toarray") else tmp.X
        sc.pp.scale(tmp, max_value=10)
    n_comps = min(n_comps, tmp.n_obs - 1, tmp.n_vars - 1)
    sc.pp.pca(tmp, n_comps=n_comps, random_state=seed)
    return tmp.obsm["X_pca"].astype(np.float32)


def _require_igraph() -> None:
    try:
        import igraph  # noqa: F401
    except ImportError:
        msg = ("Leiden clustering needs the igraph package: pip install igraph (or "
               "pip install 'sclcm[bench]').")
        raise ImportError(msg) from None
